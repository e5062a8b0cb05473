"""Certified Eq. 7 winners per pixel, compiled with numba: one bound pass for a whole tau sweep.

For candidate c the Eq. 7 log score is s_c = a_cc - log sum_c' exp(a_cc'), a_cc' = f[c'] +
tau Delta_cc'(f[c']) (Sec. 3.3.3, Appendix A). It falls as any a_cc' (c' != c) grows. With
lo(f[c']) <= Delta_cc'(f[c']) <= hi(f[c']) over the rows c != c' (`eq7_pruning.bound_tables`):
    U_c = -softplus(log sum_{c' != c} exp(f[c'] + tau lo_c') - a_cc) >= s_c,
    L_c = -softplus(log sum_{c' != c} exp(f[c'] + tau hi_c') - a_cc) <= s_c.
For tau in [tau_0, tau_1] (0 <= tau_0), a_cc and tau lo, tau hi lie between their values at the
two ends, so the same bounds with the lowest (for L) or highest (for U) end hold for EVERY tau of
the range: one certificate decides a pixel for a whole sweep. Step 1 takes L_k tighter, at each
end of the range: it is concave in tau (-softplus of a log sum exp of affine functions, minus
one), so its lowest value over the range is at an end (steps 1 and 2 over the range [0.1, 1]
then decide 86.6 % of bench_calibrate.py's pixels instead of 83.5 %, and 40.0 % instead of
28.4 % on overlapping classes with a strong bias). A sweep starts with its full
range and halves it only for the pixels left undecided, down to ranges of at most
`EXACT_RANGE_TAUS` taus, where the third step decides each tau.

Certification of a range: k, the class with the best margin of its lowest a_kk over the others'
strongest terms, gives a lower bound L_k on the winner's score (s_winner >= s_k >= L_k); every
other class c is ruled out when U_c < L_k - 3 margin. Two steps, the second deciding what the
first left: with L_k exact (log sum exp >= largest term in U_c), with both exact. For C = 19
and one tau (bench_calibrate.py's data) they decide about 76% and 21% of the pixels. At a
single tau a third step decides the rest (about 4%): the log scores of k and of the classes
not ruled out, computed in float64 from the interpolated offsets themselves, one (pixel,
candidate) pair per lane for all of a block's undecided pixels at once (`eq7_steps.pair_sums`;
their tau-independent part once per range, `eq7_steps.pair_gaps`, and over evenly spaced taus
each term chained from one tau to the next); the best wins when it leads every other by more
than 3 margin. What none decides (about 0.02%: exact ties, terms beyond exp(600) or exp(700))
is left to the full computation (UNDECIDED in the output).

Pixels go `BLOCK_ROWS` at a time (`SWEEP_BLOCK_ROWS` for several taus), class-major: each tau
range runs the steps over the pixels it concerns, copied side by side, so that every loop runs
over pixels and is vectorised (`eq7_steps`).

Exactness: the bounds and the step-3 scores are formed in float64, far more accurately than the
float32 full computation (`blda_tools.calibration.eq7.kernel`), whose error in a log score stays below
`margin`: it rounds sums and products of terms no larger than scale = max|f| + tau max|Delta| of
that pixel (~10 roundings each) and a sum of C exponentials (relative error ~C ulp), and margin =
(64 scale + 64 + 4 C) ulp is a several-fold safety factor. The full computation's winner w then
has U_w >= s_w >= s_k - 2 margin >= L_k - 2 margin, so it is never ruled out, ties (lowest index)
included, and a class that trails another by more than 3 margin in float64 cannot be its winner.
The third margin (>= 7e-6) covers the certificate's own error: float64 rounding (~1e-13) and
`fast_exp` (relative 1e-12, in sums whose largest term is exactly 1 or at least 1).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from blda_tools.calibration.eq7 import steps
from blda_tools.calibration.eq7.steps import (
    UNDECIDED,  # noqa: F401 (the marker of undecided pixels, for callers)
    block_step_two,
    block_steps,
    candidate_pairs,
    grid_cell,
    grid_point,
    pair_gaps,
    pair_sums,
    pair_winner,
    pair_work,
    range_ends,
)
from blda_tools.errors import BLDAError
from blda_tools.runtime import float32_math
from blda_tools.runtime.jit import kernel

FLOAT32_EPS = float(np.finfo(np.float32).eps)


class CertifyTables(NamedTuple):
    """The bound tables as numpy arrays for the kernel (see `eq7_pruning.bound_tables`).

    `by_cell` ``(C * G, 4)`` float32: own, own_step, lowest_inside, highest_inside (a grid
    cell's values side by side: 16 bytes per logit); `by_column` ``(7, C)`` float32: low,
    inv_step, high (the grid of `gather_offsets`), slope, own_slope, floor, ceiling (the
    extrapolation beyond the table); `by_point` ``(C_l * G + 1, C_c)`` float32: the values of
    the table of `gather_offsets` (row l * G + g: grid point g of column l, for every target
    class c; `steps.interpolate` forms the increments) and `adjusted_lc` ``(C_l, C_c)``
    float32, for the exact scores of the pixels the bounds leave undecided; `by_cell_beyond`
    ``(C * G, 2)`` float32: lowest, highest without the unadjusted zeros, for the rare logits
    beyond the table."""

    by_cell: np.ndarray
    by_column: np.ndarray
    by_point: np.ndarray
    adjusted_lc: np.ndarray
    by_cell_beyond: np.ndarray


def certify_tables(
    tables: dict[str, Tensor], kernel: tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
) -> CertifyTables:
    """`CertifyTables` from the torch bound tables and the tables of `gather_offsets`,
    `kernel` = (rows, low, inv_step, high, adjusted_lc)."""
    rows, low, inv_step, high, adjusted_lc = kernel
    cells = ("own", "own_step", "lowest_inside", "highest_inside")
    columns = [low, inv_step, high] + [
        tables[name].reshape(-1) for name in ("slope", "own_slope", "floor", "ceiling")
    ]
    by_cell = torch.stack([tables[name].reshape(-1) for name in cells], 1).to(torch.float32)
    by_column = torch.stack([column.reshape(-1) for column in columns]).to(torch.float32)
    num_classes = by_column.shape[1]
    # the values only (see `steps.interpolate`), and a row of zeros after the last point
    by_point = torch.cat([rows[:, :num_classes], rows.new_zeros(1, num_classes)])
    return CertifyTables(
        by_cell.contiguous().numpy(),
        by_column.contiguous().numpy(),
        by_point.to(torch.float32).contiguous().numpy(),
        adjusted_lc.to(torch.float32).contiguous().numpy(),
        torch.stack([tables["lowest"], tables["highest"]], 1).to(torch.float32).numpy(),
    )


# Pixels certified together, class-major (see `certify_rows`): one tau, and a sweep, whose
# halved tau ranges each concern a fraction of the block (fastest in bench_calibrate.py).
# Not 512 for the sweep: rows of 2 KB (float32) or 4 KB (float64) put a pixel's 19 classes
# in the same cache sets, and the block copy, which writes them pixel by pixel, took 26
# instead of 9 ns per pixel (measured alone); 480 took the ten-tau certificate from 290-315
# to 263-274 ns per pixel (one thread, bench_calibrate.py's data, alternated runs).
BLOCK_ROWS, SWEEP_BLOCK_ROWS = 256, 480
# Undecided pixels of a range of at most this many taus get exact scores at each of its taus
# instead of more halvings. With step 3's terms chained from tau to tau (`steps.pair_sums`)
# the default sweep's ten taus beyond 0 go straight to step 3: 5 -> 10 took the certificate
# from 330 to 275 ns per pixel on bench_calibrate.py's data and 946 -> 841 on overlapping
# classes with a strong bias (16: the same; one thread, 2026-12-05).
EXACT_RANGE_TAUS = 10


@numba.njit(inline="always")
def _load_block(logits, first, count, tables, columns, magnitude, grid) -> bool:
    """Rows [first, first + count) of `logits` into `columns` = (logit, own, lowest, highest),
    class-major ``(C, BLOCK_ROWS)`` float32: the logits, Delta_cc(f[c]) and the bounds of
    Delta_c'c(f[c]) over c' != c; and per pixel the largest |logit| and |offset| into
    `magnitude` ``(2, BLOCK_ROWS)``; `tables`: a `CertifyTables` tuple; `grid`: each logit's
    table row ``(C, BLOCK_ROWS)`` uint64 and fraction float32 (kept for step 3). Returns
    whether any logit lies beyond its table. Gathered as if every logit were inside the
    table, then the rare ones beyond it corrected (`_load_beyond`).

    Three passes, so that only the table reads stay scalar: the class-major copy, then per
    class the table rows and fractions (`grid_point`; vectorised) and the reads. With all
    three in one scalar loop the one-tau certificate took 9-12 % longer (bench_calibrate.py's
    data, both versions in one process); the rows are unsigned so that numba's indexing needs
    no check for negative indices (the reads pass 33 -> 26 ns/px, measured alone)."""
    by_cell, by_column = tables[0], tables[1]
    logit, own, lowest, highest = columns
    num_classes = logits.shape[1]
    points = by_cell.shape[0] // num_classes
    block = logits[first : first + count]  # indexed from 0: no check for negative indices
    for j in range(count):  # each pixel's row read once: 6 of 17 ns/px less than class-major
        for c in range(num_classes):
            logit[c, j] = block[j, c]
    last, outside = np.float32(points - 1), False
    for c in range(num_classes):
        low, inv_step, high = by_column[0, c], by_column[1, c], by_column[2, c]
        cells, fraction, values, start = grid[0][c], grid[1][c], logit[c], c * points
        for j in range(count):
            point, fraction[j] = grid_point(values[j], low, inv_step, last)
            cells[j] = np.uint64(start + np.int64(point))
            outside |= (values[j] < low) | (values[j] > high)
        for j in range(count):  # scalar: LLVM does not vectorise the table gathers
            cell, share = cells[j], fraction[j]
            # float32 as in gather_offsets: the same cell and fraction, the same value up to
            # one rounding (torch may fuse the multiply-add; the margin covers it)
            own[c, j] = by_cell[cell, 0] + share * by_cell[cell, 1]
            lowest[c, j], highest[c, j] = by_cell[cell, 2], by_cell[cell, 3]
    if outside:
        _load_beyond(logits, first, count, tables, columns)
    # A pass of its own over the class-major arrays: vectorised, 4x cheaper than in the loop.
    magnitude[:, :count] = 0.0
    for c in range(num_classes):
        for j in range(count):
            magnitude[0, j] = max(magnitude[0, j], abs(logit[c, j]))
            largest = max(abs(own[c, j]), abs(lowest[c, j]), abs(highest[c, j]))
            magnitude[1, j] = max(magnitude[1, j], largest)
    return outside


@numba.njit(inline="always")
def _load_beyond(logits, first, count, tables, columns) -> None:
    """The logits of the block beyond their column's table: there adjusted cells fall with
    slope -1 (Eq. 6, z' constant) and unadjusted ones stay 0 (floor, ceiling), in float32 as
    `gather_offsets` subtracts, a rounding that keeps each bound on its side (monotone)."""
    by_cell, by_column, by_cell_beyond = tables[0], tables[1], tables[4]
    logit, own, lowest, highest = columns
    points = by_cell.shape[0] // logits.shape[1]
    for c in range(logits.shape[1]):
        slope, own_slope = by_column[3, c], by_column[4, c]
        floor, ceiling = by_column[5, c], by_column[6, c]
        for j in range(count):
            if by_column[0, c] <= logit[c, j] <= by_column[2, c]:
                continue
            cell, fraction, beyond = grid_cell(logit[c, j], c, by_column, points)
            offset = by_cell[cell, 0] + fraction * by_cell[cell, 1]
            own[c, j] = offset - beyond * own_slope
            lowest[c, j] = min(by_cell_beyond[cell, 0] - beyond * slope, floor)
            highest[c, j] = max(by_cell_beyond[cell, 1] - beyond * slope, ceiling)


@kernel(depends_on=(steps, float32_math))
def certify_rows(logits, start, stop, taus, tables, prediction) -> None:
    """Certified Eq. 7 predictions of rows [start, stop) of `logits` ``(n, C)`` float32 for the
    sorted positive `taus` ``(T,)`` into `prediction` ``(T, n)`` (`prediction_dtype`;
    UNDECIDED where even the exact scores do not decide); `tables`: a `CertifyTables` tuple.
    `BLOCK_ROWS` pixels at a time, `SWEEP_BLOCK_ROWS` for several taus (`_certify_block`)."""
    size = BLOCK_ROWS if taus.shape[0] == 1 else SWEEP_BLOCK_ROWS
    block = _BlockArrays(logits.shape[1], size, taus.shape[0])
    for first in range(start, stop, size):
        count = min(size, stop - first)
        outside = _load_block(logits, first, count, tables, block[0], block[1], block[14])
        _certify_block(first, count, taus, tables, block, outside, prediction)


@numba.njit(inline="always")
def _BlockArrays(num_classes: int, block: int, count: int):  # noqa: N802 (a record of arrays)
    """The scratch of `_certify_block`, allocated once per call of `certify_rows`."""
    shape = (num_classes, block)
    # float32: every loaded value is a float32 (logits, table values and their float32
    # interpolation), so the class-major copies are exact at half the bytes; the steps
    # compute in float64 from them.
    f32 = np.float32
    columns = (
        np.empty(shape, f32),
        np.empty(shape, f32),
        np.empty(shape, f32),
        np.empty(shape, f32),
    )
    chosen = (
        np.empty(shape, f32),
        np.empty(shape, f32),
        np.empty(shape, f32),
        np.empty(shape, f32),
    )
    ends = (np.empty(shape), np.empty(shape), np.empty(shape), np.empty(shape))
    strongest = (np.empty(block), np.empty(block, np.int64), np.empty(block))
    weakest = (np.empty(block), np.empty(block, np.int64), np.empty(block))
    scratch = (
        strongest, weakest, np.empty(block), np.empty(block), np.empty(block, np.bool_),
        np.empty(block), np.empty(block),
    )  # fmt: skip
    per_pixel = (
        np.empty(block), np.empty(block, np.int64), np.empty(block), np.empty(block, np.int64),
        np.empty(block), np.empty(block), np.empty(block), np.empty(block, np.bool_),
    )  # fmt: skip
    compact = (
        np.empty(block, np.int64), np.empty(block, np.int64), np.empty(shape), np.empty(shape),
        np.empty(shape), np.empty(shape, np.bool_), per_pixel,
    )  # fmt: skip
    ranges = np.empty((2 * count + 2, 3), np.int64)  # (first tau, last tau, pixels) to certify
    members = np.empty((2 * count + 2, block), np.int64)  # their pixels
    magnitude, chosen_magnitude = np.empty((2, block)), np.empty((2, block))
    margin, threshold = np.empty(block), np.empty(block)
    winner, left = np.empty(block, np.int64), np.empty(block, np.bool_)
    grid = (np.empty(shape, np.uint64), np.empty(shape, f32))
    exact = pair_work(num_classes, block, min(count, EXACT_RANGE_TAUS))
    return (
        columns, magnitude, chosen, chosen_magnitude, ends, scratch, compact, exact, ranges,
        members, margin, threshold, winner, left, grid,
    )  # fmt: skip


@numba.njit(inline="always")
def _certify_block(first, count, taus, tables, block, outside, prediction) -> None:
    """Certify the loaded block (rows `first`...; `outside`: whether a logit lies beyond its
    table): the whole tau range for every pixel first, then each half of it for the pixels
    left undecided, and so on down to ranges of at most `EXACT_RANGE_TAUS` taus, where step 3
    decides what the bounds do not. Each range runs the steps class-major over the pixels it
    concerns (copied together), so that the loops run over pixels and are vectorised."""
    columns, magnitude, chosen, chosen_magnitude, ends, scratch, compact, exact = block[:8]
    ranges, members, margin, threshold, winner, left, grid = block[8:]
    entry_pixel, entry_index = exact[0], exact[1]
    num_classes = columns[0].shape[0]
    for k in range(count):
        members[0, k] = k
    ranges[0, 0], ranges[0, 1], ranges[0, 2], depth = 0, taus.shape[0] - 1, count, 1
    while depth:
        depth -= 1
        low, high, size = ranges[depth, 0], ranges[depth, 1], ranges[depth, 2]
        pixels = members[depth]
        if size == count:  # every pixel of the block, in order: no copy needed
            current, current_magnitude = columns, magnitude
        else:
            _gather_pixels(columns, magnitude, pixels, size, chosen, chosen_magnitude)
            current, current_magnitude = chosen, chosen_magnitude
        range_ends(current, size, taus[low], taus[high], ends)
        for k in range(size):
            scale = current_magnitude[0, k] + taus[high] * current_magnitude[1, k]
            margin[k] = (64.0 * scale + 64.0 + 4.0 * num_classes) * FLOAT32_EPS
        block_steps(
            ends, current, size, (taus[low], taus[high]), margin, scratch, winner, threshold, left
        )
        block_step_two(ends, size, winner, threshold, scratch[1], left, compact)
        undecided, entries = 0, 0
        for k in range(size):
            row = first + pixels[k]
            if not left[k]:
                for position in range(low, high + 1):  # a loop: cheaper than a slice of one
                    prediction[position, row] = winner[k]
            elif high - low < EXACT_RANGE_TAUS:  # to step 3, with the range's other pixels
                entry_pixel[entries], entry_index[entries] = pixels[k], k
                entries += 1
            else:  # in place: the k-th pixel is read before position `undecided` <= k is written
                pixels[undecided] = pixels[k]
                undecided += 1
        if entries:
            pairs = candidate_pairs(entries, winner, compact[5], compact[1], exact)
            pair_gaps(pairs, columns[0], grid, tables, outside, exact)
            pair_sums(pairs, taus, low, high, exact)
            for position in range(low, high + 1):
                for entry in range(entries):
                    decision = pair_winner(entry, position - low, margin[entry_index[entry]], exact)
                    prediction[position, first + entry_pixel[entry]] = decision
        if undecided and low < high:
            middle = (low + high) // 2
            members[depth + 1, :undecided] = pixels[:undecided]
            ranges[depth, 0], ranges[depth, 1], ranges[depth, 2] = low, middle, undecided
            ranges[depth + 1, 0], ranges[depth + 1, 1] = middle + 1, high
            ranges[depth + 1, 2] = undecided
            depth += 2


@numba.njit(inline="always")
def _gather_pixels(columns, magnitude, pixels, size, chosen, chosen_magnitude) -> None:
    """The `size` pixels listed in `pixels` side by side: their columns and magnitudes."""
    for name in range(4):
        source, target = columns[name], chosen[name]
        for c in range(source.shape[0]):
            for k in range(size):
                target[c, k] = source[c, pixels[k]]
    for k in range(size):
        chosen_magnitude[0, k] = magnitude[0, pixels[k]]
        chosen_magnitude[1, k] = magnitude[1, pixels[k]]


@kernel(depends_on=(steps, float32_math))
def offset_bounds_rows(logits, tables):
    """Delta_cc(f[c]) and the bounds of Delta_c'c(f[c]) over c' != c, each ``(n, C)`` float32
    (what `certify_rows` loads, for tests and diagnostics); `tables`: a `CertifyTables`
    tuple."""
    count, num_classes = logits.shape
    columns = (
        np.empty((num_classes, count), np.float32), np.empty((num_classes, count), np.float32),
        np.empty((num_classes, count), np.float32), np.empty((num_classes, count), np.float32),
    )  # fmt: skip
    grid = (np.empty((num_classes, count), np.uint64), np.empty((num_classes, count), np.float32))
    _load_block(logits, 0, count, tables, columns, np.empty((2, count)), grid)
    return columns[1].T.copy(), columns[2].T.copy(), columns[3].T.copy()


def prediction_dtype(num_classes: int) -> torch.dtype:
    """The integer type of certified predictions: int16 up to 32767 classes, else int32.
    Narrow, because a sweep writes and reads one per pixel and tau: 10 taus in int64 were 160
    bytes of memory traffic per pixel, with fresh pages for each block."""
    return torch.int16 if num_classes <= 32767 else torch.int32


def certified_predictions(
    logits: Tensor,
    taus: list[float],
    tables: CertifyTables,
    out: Tensor | None = None,
    rows: slice | None = None,
) -> Tensor:
    """``(T, n)`` `prediction_dtype`: the certified Eq. 7 prediction of `logits` ``(n, C)``
    (float32, contiguous, finite) at each sorted positive tau, UNDECIDED where the bounds leave
    it to the full computation; written into `out` when given (contiguous, of that shape and
    type). With `rows` (a slice with step 1) only those columns of `out` are written, so that
    threads can share one output. The kernel releases the GIL: callers may run parts in
    threads."""
    if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.ndim != 2:
        # The kernel must find the grid cells of `gather_offsets`, which works in float32.
        raise BLDAError(f"logits: expected a contiguous (n, C) float32 tensor, got {logits.dtype}")
    shape, dtype = (len(taus), logits.shape[0]), prediction_dtype(logits.shape[1])
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise BLDAError(f"out: expected a contiguous {shape} {dtype} tensor, got {out.dtype}")
    start, stop, step = (rows or slice(None)).indices(shape[1])
    if step != 1:
        raise BLDAError(f"rows: expected a slice of step 1, got {rows}")
    tau_array = np.asarray(taus, dtype=np.float64)
    certify_rows(logits.numpy(), start, stop, tau_array, tuple(tables), out.numpy())
    return out
