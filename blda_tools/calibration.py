"""Post-hoc CDF alignment (paper Sec. 3.3.3, Eq. 6-7, Appendix A): the fitted `Calibrator`.

Eq. 6 aligns a logit z of cell [c, l] (c = the pixel's class, l = the logit's class) to an anchor
through the CDFs: z' = F_anchor^-1(F_cl(z)), with the positive anchor for c = l and the negative
anchor for c != l, F_cl clamped to [eps, 1 - eps]; the offset is Delta_cl(z) = z' - z. Eq. 7
predicts argmax_c of softmax_c'(f[c'] + tau Delta_cc'(f[c'])) evaluated at c.

Speed. Evaluating CDFs per pixel for C x C cells is far too slow, so `fit` tabulates every cell's
offset function once on a uniform grid of `table_points` values per logit column l (covering the
fitted data and every cell's clamp points) and prediction interpolates it linearly. The table of
column l is stored as rows (l, g) holding Delta_{., l} at grid point g and the step to g + 1 for all
C classes c, so per pixel the grid position of f[l] is computed once per column and one row gather
returns the C offsets of that column. Beyond the table every cell's clamped CDF is constant, so the
aligned value z' is constant there and Delta = Delta_end - (z - z_end): the rare pixels outside
the table get that exact correction (see `gather_offsets`).

Eq. 7 is computed in log space as
    log score_c = -log sum_l exp(X_lc - X_cc),   X_lc = f[l] + tau Delta_cl(f[l]),
which needs no running maximum (the l = c term is exp(0) = 1, so the sum is >= 1); rows where a
term overflows are recomputed with a max-shifted logsumexp. X_lc - X_cc = (f[l] - f[c]) +
tau (Delta_cl - Delta_cc): both differences are computed once per block (`score_gaps`), so each
further tau of a sweep costs an add, a clamp, an exp and a sum over the (n, C, C) block. These
functions are TorchScript compatible: `blda export` scripts them, so `--apply` and the exported
module run the same code.

Predictions (`Calibrator.predict`, the tau sweep) first bound every class's Eq. 7 score from
C-vectors (see "exact pruning of Eq. 7" below); only the few pixels those bounds leave undecided
(~3% at tau = 1 for C = 19) go through the C x C computation, with identical results.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from blda_tools.alignment import (
    NEWTON_STEPS,
    Anchors,
    anchor_histograms,
    empirical_cdf,
    fitting_bins,
    mixture_parameters,
)
from blda_tools.errors import BLDAError
from blda_tools.fileio import atomic_output
from blda_tools.gmm import GaussianMixture1D
from blda_tools.statistics import LogitSetStatistics

FORMAT_NAME = "blda-calibrator"
FORMAT_VERSION = 1
ESTIMATORS = ("gmm", "empirical")
# Pixels per block in prediction: the (block, C, C) float32 temporaries are 1.5 MB each for
# C = 19; 1024 was the fastest of 256 to 16384 in benchmarks/bench_calibrate.py.
BLOCK_PIXELS = 1024
# Pixels per block of the pruning bounds, whose temporaries are only (block, C).
PRUNE_BLOCK = 8192


# ---------------------------------------------------------------------- the hot path (scriptable)
def gather_offsets(
    logits: Tensor, rows: Tensor, low: Tensor, inv_step: Tensor, high: Tensor, adjusted_lc: Tensor
) -> Tensor:
    """Offsets Delta_cl(f[l]) of every pixel, ``(n, C_l, C_c)``, by linear table interpolation.

    `rows` ``(C * G, 2 * C)``: row l * G + g holds Delta_{c, l} at grid point g of column l for all c,
    then the increment to point g + 1. `low`, `high`, `inv_step` ``(C,)`` describe each column's
    grid; `adjusted_lc` ``(C_l, C_c)`` is 1.0 where cell [c, l] has an offset, else 0.0.
    """
    n = logits.shape[0]
    num_classes = logits.shape[1]
    points = rows.shape[0] // num_classes
    position = ((logits - low) * inv_step).clamp_(0.0, float(points - 1))
    index = position.to(torch.int64)
    fraction = position - index
    index += torch.arange(num_classes, device=logits.device) * points  # column's first row
    pairs = rows.index_select(0, index.view(-1)).view(n, num_classes, 2, num_classes)
    offsets = torch.addcmul(pairs[:, :, 0], fraction.unsqueeze(2), pairs[:, :, 1])
    # Beyond the table z' is constant (clamped CDF), so Delta falls with slope -1 (Eq. 6).
    beyond = logits - torch.maximum(torch.minimum(logits, high), low)
    if bool((beyond != 0).any()):  # rare: one global test, rows only when needed
        outside = (beyond != 0).any(1).nonzero().squeeze(1)
        correction = beyond.index_select(0, outside).unsqueeze(2) * adjusted_lc
        offsets.index_add_(0, outside, -correction)
    return offsets


def score_gaps(logits: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The tau-independent parts of Eq. 7 for a block, both ``(n, C_l, C_c)``:
    f[l] - f[c] and Delta_cl(f[l]) - Delta_cc(f[c]). `offsets` is overwritten by the second."""
    logit_gap = logits.unsqueeze(2) - logits.unsqueeze(1)
    own = torch.diagonal(offsets, 0, 1, 2).clone()
    offsets -= own.unsqueeze(1)
    return logit_gap, offsets


def log_scores_from_gaps(logit_gap: Tensor, offset_gap: Tensor, tau: float, work: Tensor) -> Tensor:
    """Log Eq. 7 scores ``(n, C)`` at one tau; `work` is an ``(n, C, C)`` scratch tensor.

    log score_c = -log sum_l exp(X_lc - X_cc) with X_lc - X_cc = gap_f + tau gap_Delta: four
    passes over (n, C, C) per tau (add, clamp, exp, sum). The l = c term is 1, so the sum is >= 1 and
    needs no running maximum; rows where a term overflows are redone with logsumexp.
    """
    torch.add(logit_gap, offset_gap, alpha=tau, out=work)
    # exp of x < -87 gives float32 denormals, which cost ~60x a normal exp on x86; terms below
    # exp(-80) cannot change a sum that is >= 1 in float32, so clamping them is exact.
    work.clamp_(min=-80.0).exp_()
    log_scores = torch.log(work.sum(1)).neg_()
    if bool(torch.isinf(log_scores).any()):
        overflow = torch.isinf(log_scores).any(1).nonzero().squeeze(1)
        exponent = logit_gap.index_select(0, overflow) + tau * offset_gap.index_select(0, overflow)
        log_scores.index_copy_(0, overflow, torch.logsumexp(exponent, 1).neg_())
    return log_scores


def balanced_log_scores_blocks(
    logits: Tensor,
    rows: Tensor,
    low: Tensor,
    inv_step: Tensor,
    high: Tensor,
    adjusted_lc: Tensor,
    tau: float,
    block: int,
) -> Tensor:
    """Eq. 7 log scores ``(n, C)`` of `logits` ``(n, C)``, `block` pixels at a time."""
    if tau == 0.0:
        # No offset: log softmax, whose argmax is exactly the uncalibrated argmax.
        return torch.log_softmax(logits, 1)
    num_classes = logits.shape[1]
    result = torch.empty_like(logits)
    scratch = torch.empty(min(block, logits.shape[0]), num_classes, num_classes)
    for start in range(0, logits.shape[0], block):
        part = logits[start : start + block]
        offsets = gather_offsets(part, rows, low, inv_step, high, adjusted_lc)
        logit_gap, offset_gap = score_gaps(part, offsets)
        work = scratch[: part.shape[0]]
        result[start : start + block] = log_scores_from_gaps(logit_gap, offset_gap, tau, work)
    return result


# ---------------------------------------------------------------------- exact pruning of Eq. 7
# Most pixels' Eq. 7 winner can be certified from C-vectors instead of the (C, C) matrix. For
# candidate c, s_c = a_cc - log(exp(a_cc) + sum_{c' != c} exp(a_cc')), a_cc' = f[c'] + tau
# Delta_cc'(f[c']), falls as any a_cc' grows. With lo(f[c']) <= Delta_cc'(f[c']) <= hi(f[c'])
# over every row c != c', every a_cc' at its lowest gives U_c >= s_c and at its highest
# L_c <= s_c. A class with U_c < max_c' L_c' cannot win; a pixel left with one candidate is
# decided without the C x C sum, the others are computed in full. A margin larger than the
# float32 error of either computation keeps the full computation's winner among the candidates,
# so the pruned prediction is the full one, ties (lowest index) included. The bounds work on
# class-major (C, n) blocks: reductions over classes are then elementwise over pixels.
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


class Calibrator:
    """Post-hoc CDF alignment (Eq. 6-7), fitted from logit-set statistics.

    Hyper-parameters: `estimator` ("gmm": K-component mixtures fitted on the statistics
    histograms; "empirical": the histograms' own CDFs), `n_components` (K), `eps` (CDF clamp),
    `min_samples` (cells with fewer logits get Delta = 0 and are listed in `unadjusted_cells_`),
    `table_points` (G, grid points per logit column), `anchor` ("global" or "class:NAME"), `tau`.

    After `fit`: `class_names`, `ignore_index`, `table_low_`, `table_high_` ``(C,)``,
    `offsets_` ``(C, C, G)`` (Delta_cl on column l's grid), `adjusted_` ``(C, C)`` bool,
    `class_prior_` ``(C,)`` (of the fit-on labels), `cell_mixture_` / `anchor_mixtures_`
    (fitted GMM parameters, for reference).
    """

    def __init__(
        self,
        estimator: str = "gmm",
        n_components: int = 5,
        eps: float = 0.01,
        min_samples: int = 100,
        table_points: int = 2048,
        anchor: str = "global",
        tau: float = 1.0,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise BLDAError(f"--estimator: expected one of {ESTIMATORS}, got {estimator!r}")
        if int(n_components) != n_components or n_components < 1:
            raise BLDAError(f"--components: expected a positive integer, got {n_components}")
        if not 0 < eps < 0.5:
            raise BLDAError(f"--eps: expected 0 < eps < 0.5, got {eps}")
        fewest = n_components if estimator == "gmm" else 1  # a mixture needs K samples
        if int(min_samples) != min_samples or min_samples < fewest:
            raise BLDAError(
                f"--min-samples: expected an integer >= {fewest}"
                + (f" (n_components={n_components})" if estimator == "gmm" else "")
                + f", got {min_samples}"
            )
        if int(table_points) != table_points or table_points < 16:
            raise BLDAError(f"table_points: expected an integer >= 16, got {table_points}")
        check_tau(tau, "tau")
        self.estimator, self.n_components, self.eps = estimator, int(n_components), float(eps)
        self.min_samples, self.table_points = int(min_samples), int(table_points)
        self.anchor, self.tau = anchor, float(tau)
        self.class_names: tuple[str, ...] | None = None
        self.ignore_index = 255
        self.cell_mixture_: dict[str, Tensor] | None = None
        self.anchor_mixtures_: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        statistics: LogitSetStatistics,
        anchor_statistics: LogitSetStatistics | None = None,
    ) -> Calibrator:
        """Tabulate Delta_cl (Eq. 6) from `statistics` (rows = fit-on labels); anchors from
        `anchor_statistics` (default: the same statistics)."""
        anchor_statistics = statistics if anchor_statistics is None else anchor_statistics
        if anchor_statistics.grid != statistics.grid:
            raise BLDAError("anchor statistics: histogram grid differs from the fit-on statistics")
        if None not in (statistics.class_names, anchor_statistics.class_names) and (
            statistics.class_names != anchor_statistics.class_names
        ):
            raise BLDAError(
                f"anchor statistics: classes {anchor_statistics.class_names} differ from the "
                f"fit-on classes {statistics.class_names}"
            )
        num_classes = statistics.num_classes
        self.class_names = tuple(
            statistics.class_names or [f"class{c}" for c in range(num_classes)]
        )
        self.ignore_index = statistics.ignore_index
        anchors = Anchors(
            *anchor_histograms(anchor_statistics, self.anchor),
            self.estimator,
            self.n_components if self.estimator == "gmm" else 1,
            statistics.grid,
        )
        self.adjusted_ = statistics.count >= self.min_samples
        cell_cdf, quantiles = self._cell_distributions(statistics)
        low, high = self._table_range(statistics, quantiles)
        steps = torch.linspace(0.0, 1.0, self.table_points, dtype=torch.float64)
        grid = low[:, None] + (high - low)[:, None] * steps  # (C_l, G)
        probability = cell_cdf(grid.expand(num_classes, num_classes, -1)).clamp(
            self.eps, 1.0 - self.eps
        )
        aligned = anchors.inverse_cdf("negative", probability)  # Eq. 6, c != l
        diagonal = torch.arange(num_classes)
        aligned[diagonal, diagonal] = anchors.inverse_cdf(
            "positive", probability[diagonal, diagonal]
        )  # Eq. 6, c = l
        offsets = torch.where(self.adjusted_[..., None], aligned - grid, 0.0)
        self.offsets_ = offsets.to(torch.float32)
        self.table_low_, self.table_high_ = low.to(torch.float32), high.to(torch.float32)
        counts = statistics.count[:, 0].to(torch.float64)
        # A class never seen counts as one pixel, so log(prior) stays finite.
        self.class_prior_ = (counts.clamp(min=1) / counts.clamp(min=1).sum()).to(torch.float32)
        self.anchor_mixtures_ = {
            name: mixture_parameters(mixture) for name, mixture in anchors.mixtures.items()
        }
        self._build_rows()
        return self

    def _cell_distributions(self, statistics: LogitSetStatistics):
        """(CDF function of grid points (C, C, G), per-cell [eps, 1 - eps] quantiles or None)."""
        grid = statistics.grid
        if self.estimator == "empirical":
            histogram = statistics.histogram

            def cdf(z: Tensor) -> Tensor:
                return empirical_cdf(histogram, grid.low, grid.width, z)

            return cdf, None
        mixture = GaussianMixture1D(
            self.n_components, dtype=torch.float64, min_samples=self.min_samples
        )
        centers, counts, width = fitting_bins(grid, statistics.histogram)
        mixture.fit_histogram(centers, counts, bin_width=width)
        self.adjusted_ &= mixture.fitted_
        self.cell_mixture_ = mixture_parameters(mixture)
        levels = torch.tensor([self.eps, 1.0 - self.eps], dtype=torch.float64)
        quantiles = mixture.inverse_cdf(
            levels.expand(*mixture.batch_shape, 2), newton_steps=NEWTON_STEPS
        )
        return mixture.cdf, quantiles

    def _table_range(self, statistics, quantiles) -> tuple[Tensor, Tensor]:
        """Each column's grid covers its cells' data and their clamp points (so z' is constant
        beyond it)."""
        present = statistics.count > 0
        low = torch.where(present, statistics.minimum, math.inf)
        high = torch.where(present, statistics.maximum, -math.inf)
        if quantiles is not None:
            low = torch.where(self.adjusted_, torch.minimum(low, quantiles[..., 0]), low)
            high = torch.where(self.adjusted_, torch.maximum(high, quantiles[..., 1]), high)
        low, high = low.amin(0), high.amax(0)
        empty = ~torch.isfinite(low) | ~torch.isfinite(high)
        low = torch.where(empty, -1.0, low)
        high = torch.where(empty, 1.0, high)
        high = torch.maximum(high, low + 1e-3)
        return low, high

    def _build_rows(self) -> None:
        """The hot-path layout of the table (see `gather_offsets`)."""
        num_classes, _, points = self.offsets_.shape
        by_column = self.offsets_.permute(1, 2, 0)  # (C_l, G, C_c)
        increment = torch.zeros_like(by_column)
        increment[:, :-1] = by_column[:, 1:] - by_column[:, :-1]
        self._rows = torch.cat([by_column, increment], 2).reshape(num_classes * points, -1)
        self._rows = self._rows.contiguous()
        self._inv_step = ((points - 1) / (self.table_high_ - self.table_low_)).to(torch.float32)
        self._adjusted_lc = self.adjusted_.T.to(torch.float32).contiguous()
        self._bound_tables = bound_tables(self.offsets_, self.adjusted_, self._rows)

    # ------------------------------------------------------------------ apply
    @property
    def num_classes(self) -> int:
        return len(self._require_fitted())

    @property
    def unadjusted_cells_(self) -> list[tuple[str, str]]:
        """Cells [c, l] left with Delta = 0 (fewer than `min_samples` logits, or not fitted)."""
        names = self._require_fitted()
        return [(names[row], names[column]) for row, column in (~self.adjusted_).nonzero().tolist()]

    def _require_fitted(self) -> tuple[str, ...]:
        if self.class_names is None:
            raise BLDAError("Calibrator: not fitted; call fit() or Calibrator.load() first")
        return self.class_names

    def offsets(self, logits: Tensor) -> Tensor:
        """Delta_cl(f[l]) for every pixel, ``(n, C_l, C_c)`` (the table interpolated)."""
        logits = self._check_logits(logits)
        return gather_offsets(logits, *self.kernel_tensors())

    def kernel_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(rows, low, inv_step, high, adjusted_lc): the arguments of `gather_offsets`."""
        self._require_fitted()
        return self._rows, self.table_low_, self._inv_step, self.table_high_, self._adjusted_lc

    def log_scores(self, logits: Tensor, tau: float | None = None) -> Tensor:
        """Eq. 7 log scores ``(n, C)`` (the "balanced logits") of `logits` ``(n, C)``."""
        logits = self._check_logits(logits)
        tau = self.tau if tau is None else check_tau(tau, "tau")
        return balanced_log_scores_blocks(logits, *self.kernel_tensors(), tau, BLOCK_PIXELS)

    def predict(self, logits: Tensor, tau: float | None = None) -> Tensor:
        """Eq. 7 prediction ``(n,)`` int64: the argmax of `log_scores` (lowest index on ties),
        certified from bounds where they decide, else fully computed (`predict_pruned`)."""
        logits = self._check_logits(logits)
        tau = self.tau if tau is None else check_tau(tau, "tau")
        return predict_pruned(logits, self.kernel_tensors(), self.bound_tables(), tau, PRUNE_BLOCK)

    def bound_tables(self) -> dict[str, Tensor]:
        """The tables of the pruning bounds (see `bound_tables`)."""
        self._require_fitted()
        return self._bound_tables

    def _check_logits(self, logits) -> Tensor:
        names = self._require_fitted()
        logits = torch.as_tensor(logits)
        if logits.ndim != 2 or logits.shape[1] != len(names):
            raise BLDAError(f"logits: expected shape (n, {len(names)}), got {tuple(logits.shape)}")
        logits = logits.to(torch.float32).contiguous()
        # min and max propagate NaN and show infinities: one cheap pass instead of isfinite.
        if logits.numel() and not all(map(math.isfinite, map(float, torch.aminmax(logits)))):
            raise BLDAError("logits: contain NaN or infinite values")
        return logits

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain tensors and primitives only (loadable with torch.load(weights_only=True))."""
        names = self._require_fitted()
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "class_names": list(names),
            "ignore_index": self.ignore_index,
            "tau": self.tau,
            "eps": self.eps,
            "estimator": self.estimator,
            "n_components": self.n_components,
            "min_samples": self.min_samples,
            "table_points": self.table_points,
            "anchor": self.anchor,
            "table_low": self.table_low_,
            "table_high": self.table_high_,
            "offsets": self.offsets_,
            "adjusted": self.adjusted_,
            "class_prior": self.class_prior_,
            "cell_mixture": self.cell_mixture_,
            "anchor_mixtures": self.anchor_mixtures_,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` with torch.save (atomically)."""
        with atomic_output(path) as temporary:
            torch.save(self.state_dict(), temporary)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibrator:
        """Read a calibrator written by `save` (torch.load with weights_only=True)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise BLDAError(f"{path}: no such calibrator file") from None
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
            raise BLDAError(f"{path}: not a blda calibrator ({error})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise BLDAError(f"{path}: not a blda calibrator (format {FORMAT_NAME!r} missing)")
        if state.get("format_version") != FORMAT_VERSION:
            raise BLDAError(
                f"{path}: calibrator format version {state.get('format_version')}, "
                f"expected {FORMAT_VERSION}"
            )
        try:
            calibrator = cls(
                state["estimator"],
                state["n_components"],
                state["eps"],
                state["min_samples"],
                state["table_points"],
                state["anchor"],
                state["tau"],
            )
            calibrator.class_names = tuple(state["class_names"])
            calibrator.ignore_index = int(state["ignore_index"])
            calibrator.table_low_ = state["table_low"].to(torch.float32)
            calibrator.table_high_ = state["table_high"].to(torch.float32)
            calibrator.offsets_ = state["offsets"].to(torch.float32)
            calibrator.adjusted_ = state["adjusted"].to(torch.bool)
            calibrator.class_prior_ = state["class_prior"]
            calibrator.cell_mixture_ = state["cell_mixture"]
            calibrator.anchor_mixtures_ = state["anchor_mixtures"]
        except (KeyError, AttributeError) as error:
            raise BLDAError(f"{path}: calibrator is missing or has a bad field {error}") from None
        C = len(calibrator.class_names)
        if calibrator.offsets_.ndim != 3 or calibrator.offsets_.shape[:2] != (C, C):
            raise BLDAError(f"{path}: offsets have shape {tuple(calibrator.offsets_.shape)}")
        calibrator._build_rows()
        return calibrator

    def check_classes(self, class_names: Sequence[str], where: str) -> None:
        """BLDAError unless `class_names` are the calibrator's classes, in the same order."""
        names = self._require_fitted()
        if tuple(class_names) != names:
            raise BLDAError(
                f"{where}: classes {list(class_names)} differ from the calibrator's {list(names)}"
            )


def check_tau(tau: float, option: str = "--tau") -> float:
    """A finite tau >= 0, else BLDAError naming `option`."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise BLDAError(f"{option}: expected a number, got {tau!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BLDAError(f"{option}: expected a finite tau >= 0, got {tau!r}")
    return value
