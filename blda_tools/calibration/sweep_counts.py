"""The confusion counts of a tau sweep, one compiled pass over blocks of pixels.

For every pixel: the plain argmax (tau = 0, both methods), the Eq. 7 prediction at each further
tau (given: `predict_taus`), and the prior-adjusted argmax of f - tau log pi (Menon et al. 2020)
at each further tau, added to a ``(2, T, C, C)`` count table [method, tau, label, prediction].

Pixels go `COUNT_BLOCK` at a time, copied class-major, and every tau's argmax runs over the
block with the pixels in the inner loop: the compiler vectorises those loops (selects only),
where one pixel at a time it could not (each class's compare waits for the previous one).
Measured on one core (bench_calibrate.py's data): 181 -> 70 ns per pixel for 11 taus, 41 -> 21
for one tau; a float64 copy, or one written pixel by pixel, cost up to 3x more.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from blda_tools.runtime.jit import kernel

# Pixels per block: the class-major copy (C, block) float32 is 39 KB for C = 19, in L2.
COUNT_BLOCK = 512


@kernel
def count_sweep(logits, labels, predictions, taus, log_prior, cells) -> None:
    """Add the counts of `logits` ``(n, C)`` float32 with `labels` ``(n,)`` (in [0, C)) into
    `cells` ``(2, T, C, C)`` int64: method 0 ("blda") takes `predictions` ``(T - 1, n)`` (any
    integer type) at taus[1:], method 1 ("prior") argmax_c f[c] - tau log_prior[c] (float64;
    `log_prior` ``(C,)`` may hold -inf for a class never seen), both the first index on ties;
    taus[0] is 0.

    Counted as changes from one tau to the next (`changes`, summed over taus at the end): most
    pixels keep their prediction across a sweep, so a pixel costs a compare per tau and an
    increment per change instead of an increment per tau."""
    rows, num_classes = logits.shape
    columns = np.empty((num_classes, COUNT_BLOCK), np.float32)  # the logits, exactly
    best, best_at = np.empty(COUNT_BLOCK), np.empty(COUNT_BLOCK, np.int64)
    previous = np.empty((2, COUNT_BLOCK), np.int64)  # each method's prediction at the last tau
    changes = np.zeros(cells.shape, np.int64)
    for first in range(0, rows, COUNT_BLOCK):
        count = min(COUNT_BLOCK, rows - first)
        for c in range(num_classes):  # contiguous stores: measured 3x faster than j outer
            for j in range(count):
                columns[c, j] = logits[first + j, c]
        # tau = 0 compares the logits themselves: 0 * log_prior would be NaN for -inf.
        _block_argmax(columns, count, 0.0, log_prior, False, best, best_at)
        for j in range(count):
            label, prediction = labels[first + j], best_at[j]
            changes[0, 0, label, prediction] += 1
            changes[1, 0, label, prediction] += 1
            previous[0, j], previous[1, j] = prediction, prediction
        for position in range(1, taus.shape[0]):
            _block_argmax(columns, count, taus[position], log_prior, True, best, best_at)
            for j in range(count):
                label = labels[first + j]
                for method in range(2):
                    now = predictions[position - 1, first + j] if method == 0 else best_at[j]
                    if now != previous[method, j]:
                        changes[method, position, label, now] += 1
                        changes[method, position, label, previous[method, j]] -= 1
                        previous[method, j] = now
    for method in range(2):
        running = np.zeros((num_classes, num_classes), np.int64)
        for position in range(taus.shape[0]):
            running += changes[method, position]
            cells[method, position] += running


@numba.njit(inline="always")
def _block_argmax(columns, count, tau, log_prior, adjust, best, best_at) -> None:
    """Per pixel j < `count` of `columns` ``(C, B)`` the first index of the largest
    f[c] - tau log_prior[c] (of f[c] itself when not `adjust`) into `best_at`; a loop over
    pixels with selects only, which the compiler vectorises. In float64 as the prior baseline
    is defined (`sweep.TauSweep`): the float32 logit is promoted exactly before the subtraction."""
    best[:count], best_at[:count] = -math.inf, 0
    for c in range(columns.shape[0]):
        shift = tau * log_prior[c] if adjust else 0.0
        for j in range(count):
            value = columns[c, j] - shift
            greater = value > best[j]
            best_at[j] = c if greater else best_at[j]
            best[j] = value if greater else best[j]
