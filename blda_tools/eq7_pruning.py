"""Exact pruning of Eq. 7: most pixels' winner certified from C-vectors, not the C x C sum.

For candidate c, the Eq. 7 log score s_c = a_cc - log(exp(a_cc) + sum_{c' != c} exp(a_cc')), with
a_cc' = f[c'] + tau Delta_cc'(f[c']), falls as any a_cc' grows. With lo(f[c']) <= Delta_cc'(f[c'])
<= hi(f[c']) over every row c != c', every a_cc' at its lowest gives U_c >= s_c and at its highest
L_c <= s_c. A class with U_c < max_c' L_c' cannot win; a pixel left with one candidate is decided
without the C x C sum, the others are computed in full (`blda_tools.eq7_kernel`).

A margin larger than the float32 error of either computation keeps the full computation's winner
among the candidates, so the pruned prediction is the full one, ties (lowest index) included. The
bounds work on class-major (C, n) blocks: reductions over classes are then elementwise over pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from blda_tools.eq7_kernel import BLOCK_PIXELS, gather_offsets, log_scores_from_gaps, score_gaps

# Pixels per block of the pruning bounds, whose temporaries are only (block, C).
PRUNE_BLOCK = 8192


def bound_tables(offsets: Tensor, adjusted: Tensor, rows: Tensor) -> dict[str, Tensor]:
    """Per-column tables of the pruning bounds, from `offsets_` ``(C, C, G)`` and `adjusted_`.

    `own`, `own_step`, `lowest`, `highest` ``(C * G,)``, entry l * G + g: the diagonal Delta_ll
    at grid point g of column l and its increment to g + 1 (copied from the `gather_offsets`
    rows, so it interpolates to the same float), then the lowest and highest off-diagonal
    Delta_cl (c != l) of *adjusted* cells over the grid cell [g, g + 1]. A linear interpolant
    stays between its end values, so the min (max) over c of both ends bounds every cell's
    interpolant on the whole grid cell (the last point, fraction 0, uses its own value).
    Beyond the table adjusted cells all continue with slope -1 (Eq. 6, z' constant), so their
    bounds shift with them, while unadjusted cells stay at 0: `slope` / `own_slope` ``(C, 1)``
    are 1.0 where column l has adjusted off-diagonal / diagonal cells, `floor` / `ceiling` 0
    where it has unadjusted off-diagonal cells and +inf / -inf where not. `lowest_inside`,
    `highest_inside`: the bounds with those zeros folded in, for blocks inside the table (no
    extrapolation, the common case); `magnitude`: the largest |value| of the inside tables.
    """
    num_classes, _, points = offsets.shape
    diagonal = torch.arange(num_classes)
    not_diagonal = ~torch.eye(num_classes, dtype=torch.bool)
    own = rows.view(num_classes, points, 2, num_classes)[diagonal, :, :, diagonal]  # (C, G, 2)
    off_diagonal = (adjusted & not_diagonal)[..., None]  # [c, l]
    following = torch.cat([offsets[..., 1:], offsets[..., -1:]], 2)  # the grid cell's other end
    cell_low = torch.minimum(offsets, following).masked_fill(~off_diagonal, math.inf)
    cell_high = torch.maximum(offsets, following).masked_fill(~off_diagonal, -math.inf)
    has_adjusted = off_diagonal.any(0)  # (C_l, 1)
    lowest = torch.where(has_adjusted, cell_low.amin(0), 0.0)  # (C_l, G)
    highest = torch.where(has_adjusted, cell_high.amax(0), 0.0)
    has_unadjusted = (~adjusted & not_diagonal).any(0)[:, None]
    tables = {
        "own": own[..., 0].reshape(-1).contiguous(),
        "own_step": own[..., 1].reshape(-1).contiguous(),
        "lowest": lowest.reshape(-1).to(torch.float32),
        "highest": highest.reshape(-1).to(torch.float32),
        "slope": has_adjusted.to(torch.float32),
        "own_slope": adjusted[diagonal, diagonal, None].to(torch.float32),
        "floor": torch.where(has_unadjusted, 0.0, math.inf).to(torch.float32),
        "ceiling": torch.where(has_unadjusted, 0.0, -math.inf).to(torch.float32),
        # Inside the table unadjusted cells are 0 like any tabulated value: folded in.
        "lowest_inside": torch.where(has_unadjusted, lowest.clamp(max=0), lowest)
        .reshape(-1)
        .to(torch.float32),
        "highest_inside": torch.where(has_unadjusted, highest.clamp(min=0), highest)
        .reshape(-1)
        .to(torch.float32),
    }
    # The largest |offset| inside the table (interpolation stays between table values).
    tables["magnitude"] = torch.stack(
        [tables[name].abs().max() for name in ("own", "lowest_inside", "highest_inside")]
    ).max()
    return tables


class OffsetBounds(NamedTuple):
    """`offset_bounds` of a block: ``(C, n)`` tensors and the largest magnitudes in the block
    (for the rounding margin)."""

    own: Tensor
    lowest: Tensor
    highest: Tensor
    logit_magnitude: float
    offset_magnitude: float

    def select(self, pixels: Tensor) -> OffsetBounds:
        """The bounds of some pixels (the block's magnitudes still bound theirs)."""
        own, lowest, highest = (bound.index_select(1, pixels) for bound in self[:3])
        return OffsetBounds(own, lowest, highest, self.logit_magnitude, self.offset_magnitude)


def offset_bounds(
    logits: Tensor, tables: dict[str, Tensor], low: Tensor, inv_step: Tensor, high: Tensor
) -> OffsetBounds:
    """For class-major `logits` ``(C, n)``: Delta_cc(f[c]) and the lower and upper bounds of
    Delta_c'c(f[c]) over c' != c, each ``(C, n)``. `low`, `inv_step`, `high` are ``(C, 1)``;
    the grid position is computed as in `gather_offsets`, so both use the same grid cell."""
    num_classes, points = logits.shape[0], tables["own"].shape[0] // logits.shape[0]
    logit_magnitude = max(abs(float(value)) for value in torch.aminmax(logits))
    position = ((logits - low) * inv_step).clamp_(0.0, float(points - 1))
    index = position.floor()
    fraction = position - index
    # Column l's first entry; int32 indices gather faster, and C * G is far below 2^31.
    index += (torch.arange(num_classes, dtype=torch.float32) * points)[:, None]
    index = index.to(torch.int32)
    own, own_step, lowest, highest = (
        tables[name].index_select(0, index.view(-1)).view(logits.shape)
        for name in ("own", "own_step", "lowest_inside", "highest_inside")
    )
    own = torch.addcmul(own, fraction, own_step)
    bounds = OffsetBounds(own, lowest, highest, logit_magnitude, float(tables["magnitude"]))
    # Pixels with a logit beyond its column's table (rare): redone with the extrapolation.
    below, above = (low - logits).amax(0), (logits - high).amax(0)
    outside = ((below > 0) | (above > 0)).nonzero().squeeze(1)
    if outside.numel():
        bounds = _extrapolated_bounds(logits, bounds, index, outside, tables, low, high)
    return bounds


def _extrapolated_bounds(logits, bounds, index, outside, tables, low, high) -> OffsetBounds:
    """`bounds` with the pixels `outside` the table recomputed: beyond it adjusted cells fall
    with slope -1 and unadjusted ones stay at 0 (see `bound_tables`)."""
    values = logits.index_select(1, outside)
    beyond = values - torch.maximum(torch.minimum(values, high), low)
    own = bounds.own.index_select(1, outside) - beyond * tables["own_slope"]
    cells = index.index_select(1, outside).view(-1)
    slope = beyond.mul_(tables["slope"])
    lowest = tables["lowest"].index_select(0, cells).view(values.shape).sub_(slope)
    highest = tables["highest"].index_select(0, cells).view(values.shape).sub_(slope)
    lowest = torch.minimum(lowest, tables["floor"])
    highest = torch.maximum(highest, tables["ceiling"])
    magnitude = bounds.offset_magnitude
    for part, whole in zip((own, lowest, highest), bounds[:3], strict=True):
        whole.index_copy_(1, outside, part)
        magnitude = max(magnitude, float(part.abs().max()))
    return bounds._replace(offset_magnitude=magnitude)


def _log_sum_exp_of_others(exponents: Tensor) -> tuple[Tensor, Tensor]:
    """log sum_{c' != c} exp(x_c') for every c of class-major `exponents` ``(C, n)``, and per
    pixel whether it is accurate (``(n,)`` bool).

    No cancellation: for the largest term(s) the sum of the others is formed directly, for every
    other term by subtracting it from the total, which then keeps at least exp(0) = 1. Terms
    below exp(-80) are raised to exp(-80), as in `log_scores_from_gaps` (float32 denormals are
    ~60x slower); that changes a sum >= exp(-60) by a relative C exp(-20) < 1 ulp, so a pixel
    whose largest term has a sum of others below exp(-60) is flagged inaccurate instead."""
    largest = exponents.amax(0)
    terms = torch.sub(exponents, largest).clamp_(min=-80.0).exp_()  # exactly 1.0 at the largest
    # 0.0 / 1.0 written straight into float32 (boolean temporaries are slow here).
    is_smaller = torch.lt(exponents, largest, out=torch.empty_like(exponents))
    ties = exponents.shape[0] - is_smaller.sum(0)
    others_of_largest = (terms * is_smaller).sum(0).add_(ties - 1.0)
    # Three non-negative parts, so no cancellation: 1 - term is exactly 0 at the largest.
    others = (1.0 - terms).add_(others_of_largest)
    return others.log_().add_(largest), others_of_largest >= math.exp(-60.0)


def _certainty_margin(bounds: OffsetBounds, num_classes: int, tau: float) -> float:
    """More than the float32 error of a log score in either computation, for a whole block.

    Both round sums and products of terms no larger than `scale` (~10 roundings each) and a sum
    of C exponentials (relative error ~C ulp, the same error in log space); 64 scale + 64 + 4 C
    ulp is a several-fold safety factor. One figure per block: a larger margin only leaves more
    pixels to the full computation, never a wrong one."""
    scale = bounds.logit_magnitude + tau * bounds.offset_magnitude
    ulp = float(torch.finfo(torch.float32).eps)
    return (64.0 * scale + 64.0 + 4.0 * num_classes) * ulp


def certified_prediction(
    logits: Tensor, bounds: OffsetBounds, tau: float, tau_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """(prediction ``(n,)``, decided ``(n,)`` bool) of class-major `logits` ``(C, n)``: where
    `decided`, the Eq. 7 argmax certified by the bounds (see `bound_tables`), elsewhere junk.

    With `tau_high`, one certificate for every tau in [tau, tau_high] (a sweep decides most
    pixels for all its taus at once): a_cc = f[c] + tau Delta_cc is linear in tau, so it lies
    between its values at the two ends, and tau lo <= tau Delta_cc' <= tau hi lies between
    min(tau lo) and max(tau hi) over the ends (tau >= 0)."""
    own, lowest, highest = bounds[:3]
    tau_high = tau if tau_high is None else tau_high
    if tau_high == tau:
        own_high = own_low = torch.add(logits, own, alpha=tau)  # a_cc
        weakest = torch.add(logits, lowest, alpha=tau)
        strongest = torch.add(logits, highest, alpha=tau)
    else:
        own_low = torch.minimum(own * tau, own * tau_high).add_(logits)
        own_high = torch.maximum(own * tau, own * tau_high).add_(logits)
        weakest = torch.minimum(lowest * tau, lowest * tau_high).add_(logits)
        strongest = torch.maximum(highest * tau, highest * tau_high).add_(logits)
    # U_c = -softplus(upper_gap_c), upper_gap_c = log sum_{c' != c} exp(weakest_c') - a_cc at
    # its highest; L_c = -softplus(lower_gap_c) with the strongest terms and a_cc at its lowest.
    upper_gap, upper_accurate = _log_sum_exp_of_others(weakest)
    lower_gap, lower_accurate = _log_sum_exp_of_others(strongest)
    upper_gap -= own_high
    lower_gap -= own_low
    margin = _certainty_margin(bounds, logits.shape[0], tau_high)
    # The full computation's winner has U >= max L - 2 margin. Softplus is increasing, so the
    # test U_c >= max L - 3 margin reads upper_gap_c <= softplus^-1(softplus(min lower_gap) +
    # 3 margin): one inverse per pixel instead of a softplus per class; the third margin covers
    # the few ulp of rounding in the threshold.
    level = torch.nn.functional.softplus(lower_gap.amin(0)) + 3.0 * margin
    threshold = level + torch.log(-torch.expm1(-level))  # softplus^-1
    candidate = torch.le(upper_gap, threshold, out=torch.empty_like(upper_gap))  # 0.0 / 1.0
    decided = (candidate.sum(0) == 1.0) & upper_accurate & lower_accurate
    classes = torch.arange(logits.shape[0], dtype=torch.float32)[:, None]
    return (candidate * classes).sum(0).to(torch.int64), decided


def first_argmax(class_major: Tensor) -> Tensor:
    """argmax over classes of `class_major` ``(C, n)`` (finite values), the lowest index on ties,
    as `argmax`; with float masks, as argmax over dim 0 is several times slower."""
    num_classes = class_major.shape[0]
    is_largest = torch.eq(class_major, class_major.amax(0), out=torch.empty_like(class_major))
    countdown = torch.arange(num_classes, 0, -1, dtype=torch.float32)[:, None]  # C - c
    return (num_classes - is_largest.mul_(countdown).amax(0)).to(torch.int64)


def predict_block(
    logits: Tensor,
    class_major: Tensor,
    bounds: OffsetBounds,
    kernel: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    tau: float,
) -> Tensor:
    """Eq. 7 prediction ``(n,)`` of a block, `logits` ``(n, C)`` and its `class_major` copy with
    their `offset_bounds`: certified where the bounds decide, fully computed elsewhere."""
    prediction, decided = certified_prediction(class_major, bounds, tau)
    undecided = (~decided).nonzero().squeeze(1)
    if undecided.numel():
        prediction.index_copy_(0, undecided, full_prediction(logits[undecided], kernel, tau))
    return prediction


def predict_pruned(
    logits: Tensor,
    kernel: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    tables: dict[str, Tensor],
    tau: float,
    block: int,
) -> Tensor:
    """Eq. 7 prediction ``(n,)`` of `logits` ``(n, C)``, `block` pixels at a time (see
    `predict_block`); identical to the argmax of `balanced_log_scores_blocks`."""
    if tau == 0.0:
        return logits.max(1).indices
    _, low, inv_step, high, _ = kernel
    low, inv_step, high = low[:, None], inv_step[:, None], high[:, None]
    prediction = torch.empty(logits.shape[0], dtype=torch.int64)
    for start in range(0, logits.shape[0], block):
        part = logits[start : start + block]
        class_major = part.T.contiguous()
        bounds = offset_bounds(class_major, tables, low, inv_step, high)
        prediction[start : start + block] = predict_block(part, class_major, bounds, kernel, tau)
    return prediction


def full_prediction(logits: Tensor, kernel, tau: float, block: int = BLOCK_PIXELS) -> Tensor:
    """Eq. 7 prediction ``(n,)`` by the full C x C computation, `block` pixels at a time."""
    num_classes = logits.shape[1]
    prediction = torch.empty(logits.shape[0], dtype=torch.int64)
    scratch = torch.empty(min(block, logits.shape[0]), num_classes, num_classes)
    for start in range(0, logits.shape[0], block):
        part = logits[start : start + block]
        gaps = score_gaps(part, gather_offsets(part, *kernel))
        work = scratch[: part.shape[0]]
        prediction[start : start + block] = log_scores_from_gaps(*gaps, tau, work).argmax(1)
    return prediction
