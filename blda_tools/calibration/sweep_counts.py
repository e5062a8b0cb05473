"""The confusion counts of a tau sweep, one compiled pass over blocks of pixels.

For every pixel: the plain argmax (tau = 0, both methods), the Eq. 7 prediction at each further
tau (given: `predict_taus`), and the prior-adjusted argmax of f - tau log pi (Menon et al. 2020)
at each further tau, added to a ``(2, T, C, C)`` count table [method, tau, label, prediction].

Pixels go `COUNT_BLOCK` at a time, copied class-major, and every tau's argmax runs over the
block with the pixels in the inner loop: the compiler vectorises those loops (selects only),
where one pixel at a time it could not (each class's compare waits for the previous one).
Measured on one core (bench_calibrate.py's data): 181 -> 70 ns per pixel for 11 taus, 41 -> 21
for one tau; a float64 copy, or one written pixel by pixel, cost up to 3x more.

The prior baseline's scores are lines in tau: a class that leads every other at tau = 0 and at
the last tau leads at every tau between (`_unsteady` keeps the other pixels), so only the
pixels whose baseline may change get an argmax per tau: 14.5 % of the benchmark's pixels for
[0, 1], and 11 taus took 65-70 -> 45-49 ns per pixel (one thread, best of 4 runs alternated
with the previous code); a pass over a block's argmax without the runner-up now compiles
without it (constant flags), so one tau stayed at 28-30. With the copy read from a slice
(below): 39 and 20.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from blda_tools.runtime.jit import kernel

# Pixels per block: the class-major copy (C, block) float32 is 39 KB for C = 19, in L2.
COUNT_BLOCK = 512
# Each float64 score f - tau log_prior is within 2^-53 (|f| + 2 tau |log_prior|) of its exact
# line, and |f| <= |score| + tau |log_prior|; a lead above this fraction of the scale in
# `_unsteady` at both ends (10^4 times that bound; a class far below the leader has a larger
# |f| but a larger lead in proportion) keeps the exact lines, and so the rounded scores,
# apart at every tau between.
_LEAD_TOLERANCE = 1e-12
# Unsteady pixels are gathered when at most this share of a block: beyond, the copy costs more
# than the per-tau argmax of the steady ones it saves (overlapping classes, strong bias: 90 %
# unsteady between tau 0 and 1).
_GATHER_SHARE = 0.75


@kernel
def count_sweep(logits, labels, predictions, taus, log_prior, cells) -> None:
    """Add the counts of `logits` ``(n, C)`` float32 with `labels` ``(n,)`` (in [0, C)) into
    `cells` ``(2, T, C, C)`` int64: method 0 ("blda") takes `predictions` ``(T - 1, n)`` (any
    integer type) at taus[1:], method 1 ("prior") argmax_c f[c] - tau log_prior[c] (float64;
    `log_prior` ``(C,)`` may hold -inf for a class never seen), both the first index on ties;
    `taus` sorted, taus[0] = 0.

    Counted as changes from one tau to the next (`_count_changes`, summed over taus at the
    end): most pixels keep their prediction across a sweep, so a pixel costs a compare per tau
    and an increment per change instead of an increment per tau."""
    rows, num_classes = logits.shape
    columns = np.empty((num_classes, COUNT_BLOCK), np.float32)  # the logits, exactly
    moving = np.empty((num_classes, COUNT_BLOCK), np.float32)  # those of unsteady pixels
    at_zero = (np.empty(COUNT_BLOCK), np.empty(COUNT_BLOCK), np.empty(COUNT_BLOCK, np.int64))
    at_tau = (np.empty(COUNT_BLOCK), np.empty(COUNT_BLOCK), np.empty(COUNT_BLOCK, np.int64))
    pixels, moving_labels = np.empty(COUNT_BLOCK, np.int64), np.empty(COUNT_BLOCK, np.int64)
    previous = np.empty(COUNT_BLOCK, np.int64)  # a method's predictions at the last tau
    changes = np.zeros(cells.shape, np.int64)
    # a class never seen (-inf) is no line: then every pixel gets an argmax per tau
    lines = taus.shape[0] > 2 and np.isfinite(log_prior).all()
    spread = 3.0 * taus[-1] * np.abs(log_prior).max() if lines else 0.0  # for `_unsteady`
    for first in range(0, rows, COUNT_BLOCK):
        count = min(COUNT_BLOCK, rows - first)
        block_labels, block = labels[first : first + count], logits[first : first + count]
        # contiguous stores: measured 3x faster than j outer; indexing a slice from 0 rather
        # than `logits[first + j]`, numba knows the index is not negative (no wrap-around
        # select): 16 -> 10 ns per pixel
        for c in range(num_classes):
            for j in range(count):
                columns[c, j] = block[j, c]
        # tau = 0 compares the logits themselves: 0 * log_prior would be NaN for -inf.
        if lines:  # with the leads: constant flags, so that each call compiles without branches
            _block_argmax(columns, count, 0.0, log_prior, False, True, at_zero)
        else:
            _block_argmax(columns, count, 0.0, log_prior, False, False, at_zero)
        for j in range(count):
            changes[0, 0, block_labels[j], at_zero[2][j]] += 1
            changes[1, 0, block_labels[j], at_zero[2][j]] += 1
        previous[:count] = at_zero[2][:count]
        for position in range(1, taus.shape[0]):
            now = predictions[position - 1, first : first + count]
            _count_changes(changes[0, position], block_labels, now, previous, count)
        source, moved = columns, count
        if lines:
            _block_argmax(columns, count, taus[-1], log_prior, True, True, at_tau)
            moved = _unsteady(at_zero, at_tau, count, spread, pixels)
        if moved <= _GATHER_SHARE * count:  # the unsteady pixels' logits, side by side
            for c in range(num_classes):
                for i in range(moved):
                    moving[c, i] = columns[c, pixels[i]]
            source = moving
        else:
            moved, pixels[:count] = count, np.arange(count)
        for i in range(moved):
            moving_labels[i], previous[i] = block_labels[pixels[i]], at_zero[2][pixels[i]]
        for position in range(1, taus.shape[0]):
            _block_argmax(source, moved, taus[position], log_prior, True, False, at_tau)
            _count_changes(changes[1, position], moving_labels, at_tau[2], previous, moved)
    for method in range(2):
        running = np.zeros((num_classes, num_classes), np.int64)
        for position in range(taus.shape[0]):
            running += changes[method, position]
            cells[method, position] += running


@numba.njit(inline="always")
def _block_argmax(columns, count, tau, log_prior, adjust, leads, result) -> None:
    """Per pixel j < `count` of `columns` ``(C, B)``: the largest f[c] - tau log_prior[c] (f[c]
    itself when not `adjust`), the runner-up when `leads`, and the first index of the largest
    into `result`; a loop over pixels with selects only, which the compiler vectorises. In
    float64 as the prior baseline is defined (`sweep.TauSweep`): the float32 logit is promoted
    exactly."""
    best, runner_up, best_at = result
    best[:count], runner_up[:count], best_at[:count] = -math.inf, -math.inf, 0
    for c in range(columns.shape[0]):
        shift = tau * log_prior[c] if adjust else 0.0
        for j in range(count):
            value = columns[c, j] - shift
            greater = value > best[j]
            if leads:  # min and max rather than a nested select: LLVM vectorises it
                runner_up[j] = min(max(runner_up[j], value), best[j])
            best_at[j] = c if greater else best_at[j]
            best[j] = value if greater else best[j]


@numba.njit(inline="always")
def _unsteady(at_zero, at_end, count, spread, pixels) -> int:
    """Write the pixels whose prior baseline may change between tau 0 and the last tau into
    `pixels` and return how many: all but those with the same winner at both ends, leading by
    more than `_LEAD_TOLERANCE` of the scores' scale there, 1 + the largest |score| + `spread`
    (3 tau_last max|log_prior|); a tie is left for the per-tau argmax."""
    moved = 0
    for j in range(count):
        scale = 1.0 + max(abs(at_zero[0][j]), abs(at_end[0][j])) + spread
        lead = min(at_zero[0][j] - at_zero[1][j], at_end[0][j] - at_end[1][j])
        steady = (at_zero[2][j] == at_end[2][j]) & (lead > _LEAD_TOLERANCE * scale)
        pixels[moved] = j
        moved += 0 if steady else 1
    return moved


@numba.njit(inline="always")
def _count_changes(changes, labels, now, previous, count) -> None:
    """Count the predictions `now[:count]` that differ from `previous` into `changes` ``(C,
    C)`` [label, prediction] (+1 at the new class, -1 at the old) and remember them."""
    for j in range(count):
        if now[j] != previous[j]:
            changes[labels[j], now[j]] += 1
            changes[labels[j], previous[j]] -= 1
            previous[j] = now[j]
