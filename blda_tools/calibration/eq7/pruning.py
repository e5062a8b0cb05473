"""Exact pruning of Eq. 7: most pixels' winner certified from C-vectors, not the C x C sum.

For candidate c, the Eq. 7 log score s_c = a_cc - log(exp(a_cc) + sum_{c' != c} exp(a_cc')), with
a_cc' = f[c'] + tau Delta_cc'(f[c']), falls as any a_cc' grows. With lo(f[c']) <= Delta_cc'(f[c'])
<= hi(f[c']) over every row c != c' (`bound_tables`), every a_cc' at its lowest gives U_c >= s_c
and at its highest L_c <= s_c. A class with U_c < max_c' L_c' cannot win; a pixel left with one
candidate is decided without the C x C sum (`blda_tools.calibration.eq7.certify`, which also certifies a
whole range of taus at once, and at a single tau scores the remaining candidates exactly in
float64); the very few others are computed in full (`blda_tools.calibration.eq7.kernel`).

A margin larger than the float32 error of the full computation keeps its winner among the
candidates, so the pruned prediction is the full one, ties (lowest index) included.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from blda_tools.calibration.eq7.certify import (
    UNDECIDED,
    CertifyTables,
    certified_predictions,
    prediction_dtype,
)
from blda_tools.calibration.eq7.kernel import (
    BLOCK_PIXELS,
    gather_offsets,
    log_scores_from_gaps,
    score_gaps,
)
from blda_tools.runtime.process import torch_threads

# Rows per certificate task when threads share the rows (`predict_taus`): the threads take
# tasks in turn, so that they finish together whatever the difficulty of each part.
TASK_ROWS = 1 << 15


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
    `highest_inside`: the bounds with those zeros folded in, for logits inside the table (the
    common case, loaded without any extrapolation arithmetic).
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
    return tables


def predict_taus(
    logits: Tensor,
    kernel: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    tables: CertifyTables,
    taus: Sequence[float],
    threads: int = 1,
    out: Tensor | None = None,
    task_rows: int = TASK_ROWS,
) -> Tensor:
    """Eq. 7 predictions ``(T, n)`` of `logits` ``(n, C)`` (float32, contiguous, finite) at the
    sorted positive `taus`: certified from the bounds where they decide (`certified_predictions`,
    one certificate for many taus at once), by the full C x C computation elsewhere; identical
    to the argmax of `balanced_log_scores_blocks` at each tau. Into `out` when given (``(T, n)``,
    any integer type; the certificates write into it directly when it is contiguous and of
    `prediction_dtype`), else a new int64 tensor. With several `threads` they take tasks of
    `task_rows` rows in turn (numba releases the GIL); the few undecided entries are completed
    afterwards, in the calling thread."""
    count, narrow = logits.shape[0], prediction_dtype(logits.shape[1])
    prediction = torch.empty(len(taus), count, dtype=torch.int64) if out is None else out
    direct = prediction.dtype == narrow and prediction.is_contiguous()
    certified = prediction if direct else torch.empty(len(taus), count, dtype=narrow)
    threads = max(1, min(threads, count // 4096))  # small inputs: one thread
    step = max(1, min(task_rows, -(-count // threads)))  # at least one task per thread
    parts = [slice(start, start + step) for start in range(0, count, step)]

    def work(rows: slice) -> None:
        certified_predictions(logits, list(taus), tables, certified, rows)

    # With threads, torch is held at one thread throughout: its spinning OpenMP workers took
    # cores from the certificate threads (measured: 2 threads 0.38 s instead of 0.31 s per
    # million pixels).
    with torch_threads(1) if threads > 1 else contextlib.nullcontext():
        if threads == 1:
            work(slice(None))
        else:
            list(thread_pool(threads).map(work, parts))
        # Completed once, here: in each certificate thread the completion's ~60 small torch
        # calls took ~0.9 ms instead of ~0.3, the threads taking turns with the GIL.
        _complete(logits, certified, kernel, taus)
    if not direct:
        prediction.copy_(certified)
    return prediction


@functools.cache
def thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process: starting threads for every block cost
    a few milliseconds per call (measured: 2 threads on 2^18 pixels 57 ms with a new pool,
    50 ms with a kept one)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="blda-eq7")


def _complete(logits: Tensor, certified: Tensor, kernel, taus: Sequence[float]) -> None:
    """Fill the UNDECIDED entries of `certified` ``(T, n)`` with the full computation. They are
    found from the smallest value of each pixel (UNDECIDED is the only negative one): a
    reduction over taus, then a look at those few pixels; comparing every entry took 13 ns per
    pixel at ten taus, 3 % of a sweep (int16 predictions, one thread)."""
    suspects = (certified.amin(0) == UNDECIDED).nonzero().squeeze(1)
    if suspects.numel() == 0:
        return
    selected = certified.index_select(1, suspects)  # (T, suspects)
    marked = selected == UNDECIDED
    full = full_predictions(logits.index_select(0, suspects), kernel, taus, marked)
    certified[:, suspects] = torch.where(marked, full.to(certified.dtype), selected)


def predict_pruned(
    logits: Tensor,
    kernel: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    tables: CertifyTables,
    tau: float,
    threads: int = 1,
    task_rows: int = TASK_ROWS,
) -> Tensor:
    """Eq. 7 prediction ``(n,)`` int64 of `logits` ``(n, C)`` at one tau (see `predict_taus`);
    identical to the argmax of `balanced_log_scores_blocks`."""
    if tau == 0.0:
        return logits.max(1).indices
    prediction = torch.empty(1, logits.shape[0], dtype=torch.int64)
    return predict_taus(logits, kernel, tables, [tau], threads, prediction, task_rows)[0]


def full_prediction(logits: Tensor, kernel, tau: float, block: int = BLOCK_PIXELS) -> Tensor:
    """Eq. 7 prediction ``(n,)`` by the full C x C computation, `block` pixels at a time."""
    return full_predictions(logits, kernel, [tau], block=block)[0]


def full_predictions(
    logits: Tensor,
    kernel,
    taus: Sequence[float],
    wanted: Tensor | None = None,
    block: int = BLOCK_PIXELS,
) -> Tensor:
    """Eq. 7 predictions ``(T, n)`` int64 by the full C x C computation at each of `taus`,
    `block` pixels at a time; with `wanted` ``(T, n)`` bool only its entries (the others are
    UNDECIDED). The tau-independent gaps are formed once per block for every tau: their table
    gather was two thirds of a call on a few pixels (67 of ~110 us), paid per tau before."""
    num_classes = logits.shape[1]
    prediction = torch.full((len(taus), logits.shape[0]), UNDECIDED, dtype=torch.int64)
    scratch = torch.empty(min(block, logits.shape[0]), num_classes, num_classes)
    for start in range(0, logits.shape[0], block):
        part = logits[start : start + block]
        gaps = score_gaps(part, gather_offsets(part, *kernel))
        for index, tau in enumerate(taus):
            if wanted is None:  # every pixel of the block
                chosen, target = gaps, slice(start, start + part.shape[0])
            else:  # the few pixels the certificate left at this tau
                rows = wanted[index, start : start + block].nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                chosen, target = [gap.index_select(0, rows) for gap in gaps], start + rows
            scores = log_scores_from_gaps(*chosen, tau, scratch[: chosen[0].shape[0]])
            prediction[index, target] = scores.argmax(1)
    return prediction
