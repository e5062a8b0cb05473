"""Certified Eq. 7 winners per pixel, compiled with numba: one bound pass for a whole tau sweep.

For candidate c the Eq. 7 log score is s_c = a_cc - log sum_c' exp(a_cc'), a_cc' = f[c'] +
tau Delta_cc'(f[c']) (Sec. 3.3.3, Appendix A). It falls as any a_cc' (c' != c) grows. With
lo(f[c']) <= Delta_cc'(f[c']) <= hi(f[c']) over the rows c != c' (`eq7_pruning.bound_tables`):
    U_c = -softplus(log sum_{c' != c} exp(f[c'] + tau lo_c') - a_cc) >= s_c,
    L_c = -softplus(log sum_{c' != c} exp(f[c'] + tau hi_c') - a_cc) <= s_c.
For tau in [tau_0, tau_1] (0 <= tau_0), a_cc and tau lo, tau hi lie between their values at the
two ends, so the same bounds with the lowest (for L) or highest (for U) end hold for EVERY tau of
the range: one certificate decides a pixel for a whole sweep. A sweep starts with its full
range and halves it only for the pixels left undecided, down to single taus.

Certification of a range: k, the class with the best margin of its lowest a_kk over the others'
strongest terms, gives a lower bound L_k on the winner's score (s_winner >= s_k >= L_k); every
other class c is ruled out when U_c < L_k - 3 margin. Three steps, each only for the pixels the
previous one left (about 40%, 35% and 25% of them for C = 19): without any exponential (log sum
exp <= largest term + log(C - 1) in L_k, >= largest term in U_c), with L_k exact, with both
exact. A pixel is decided when every other class is ruled out: the full computation's winner
then is k.

Exactness: the bounds are formed in float64, far more accurately than the float32 full
computation (`blda_tools.eq7_kernel`), whose error in a log score stays below `margin`: it rounds
sums and products of terms no larger than scale = max|f| + tau max|Delta| of that pixel (~10
roundings each) and a sum of C exponentials (relative error ~C ulp), and margin = (64 scale + 64
+ 4 C) ulp is a several-fold safety factor. The full computation's winner w then has U_w >= s_w
>= s_k - 2 margin >= L_k - 2 margin, so it is never ruled out, ties (lowest index) included. The
third margin (>= 7e-6) covers the certificate's own error: float64 rounding (~1e-13) and
`fast_exp` (relative 1e-10, in sums whose largest term is exactly 1). The undecided pixels are
left to the full computation (UNDECIDED in the output).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from blda_tools.errors import BLDAError

UNDECIDED = -1
FLOAT32_EPS = float(np.finfo(np.float32).eps)


class CertifyTables(NamedTuple):
    """The bound tables as numpy arrays for the kernel (see `eq7_pruning.bound_tables`).

    `by_cell` ``(C * G, 6)`` float32: own, own_step, lowest_inside, highest_inside, lowest,
    highest (a grid cell's values side by side: one cache line per logit); `by_column`
    ``(7, C)`` float32: low, inv_step, high (the grid of `gather_offsets`), slope, own_slope,
    floor, ceiling (the extrapolation beyond the table)."""

    by_cell: np.ndarray
    by_column: np.ndarray


def certify_tables(tables: dict[str, Tensor], low: Tensor, inv_step: Tensor, high: Tensor):
    """`CertifyTables` from the torch bound tables and the grid of `gather_offsets`."""
    cells = ("own", "own_step", "lowest_inside", "highest_inside", "lowest", "highest")
    columns = [low, inv_step, high] + [
        tables[name].reshape(-1) for name in ("slope", "own_slope", "floor", "ceiling")
    ]
    by_cell = torch.stack([tables[name].reshape(-1) for name in cells], 1).to(torch.float32)
    by_column = torch.stack([column.reshape(-1) for column in columns]).to(torch.float32)
    return CertifyTables(by_cell.contiguous().numpy(), by_column.contiguous().numpy())


@numba.njit(inline="always")
def _offset_bounds(logits, row, by_cell, by_column, own, lowest, highest) -> float:
    """Delta_cc(f[c]) and the bounds of Delta_c'c(f[c]) over c' != c of one pixel into `own`,
    `lowest`, `highest` (float64, ``(C,)``); returns the largest |value|. The grid position is
    computed in float32 exactly as `gather_offsets` does, so both use the same grid cell."""
    num_classes = logits.shape[1]
    points = by_cell.shape[0] // num_classes
    magnitude = 0.0
    for column in range(num_classes):
        value = logits[row, column]
        low, inv_step, high = by_column[0, column], by_column[1, column], by_column[2, column]
        position = min(max((value - low) * inv_step, np.float32(0.0)), np.float32(points - 1))
        point = int(position)
        fraction = position - np.float32(point)
        cell = column * points + point
        own[column] = by_cell[cell, 0] + fraction * by_cell[cell, 1]
        beyond = value - min(max(value, low), high)
        if beyond == 0.0:
            lowest[column] = by_cell[cell, 2]
            highest[column] = by_cell[cell, 3]
        else:  # beyond the table adjusted cells fall with slope -1, unadjusted ones stay 0
            shift = float(beyond) * by_column[3, column]
            own[column] -= float(beyond) * by_column[4, column]
            lowest[column] = min(by_cell[cell, 4] - shift, by_column[5, column])
            highest[column] = max(by_cell[cell, 5] - shift, by_column[6, column])
        magnitude = max(magnitude, abs(own[column]), abs(lowest[column]), abs(highest[column]))
    return magnitude


@numba.njit(inline="always")
def _threshold(lower_gap: float, margin: float) -> float:
    """At least softplus^-1(softplus(lower_gap) + 3 margin): a class whose upper gap exceeds it
    has U_c < L - 3 margin, L = -softplus(lower_gap) (softplus is increasing).

    softplus^-1 is concave with slope 1 / sigmoid(g) = 1 + exp(-g) at softplus(g), so the tangent
    g + 3 margin (1 + exp(-g)) is at least it; where that step is small the tangent is also
    tight (within its square) and needs no logarithm. Elsewhere (confident pixels, g << 0, where
    the slope is huge) the exact formula, in float64."""
    if lower_gap > -30.0:
        step = 3.0 * margin * (1.0 + fast_exp(-lower_gap))
        if step < 1e-3:
            return lower_gap + step
    level = max(lower_gap, 0.0) + math.log1p(math.exp(-abs(lower_gap))) + 3.0 * margin
    return level + math.log(-math.expm1(-level))


@numba.njit(inline="always")
def fast_exp(value: float) -> float:
    """exp(value) for value in [-700, 700] (clamped there) with a relative error below 1e-10:
    exp(v / 2048) by its Taylor polynomial of degree 11 (error < 6e-15 for |v / 2048| <= 0.342),
    then squared 11 times (each doubles the relative error). Only multiplications and
    additions, no libm call: about twice as fast as math.exp here."""
    clamped = min(max(value, -700.0), 700.0)
    step = clamped * (1.0 / 2048.0)
    power = 1.0 / 39916800.0
    for degree in range(10, -1, -1):  # Horner: 1/11!, 1/10!, ..., 1/0!
        power = power * step + _INVERSE_FACTORIALS[degree]
    for _ in range(11):
        power *= power
    return power


_INVERSE_FACTORIALS = np.array([1.0 / math.factorial(degree) for degree in range(11)])


@numba.njit(inline="always")
def _largest(values, skip: int):
    """(largest value, its first index) of `values` other than index `skip` (-1: none).
    Written without data-dependent branches (selects), which mispredict on random data."""
    largest = -math.inf
    for index in range(values.shape[0]):
        largest = max(largest, -math.inf if index == skip else values[index])
    where = 0
    for index in range(values.shape[0] - 1, -1, -1):
        where = index if (values[index] == largest) & (index != skip) else where
    return largest, where


@numba.njit(inline="always")
def _sum_without(values, skip: int) -> float:
    total = 0.0
    for index in range(values.shape[0]):
        total += 0.0 if index == skip else values[index]
    return total


@numba.njit(inline="always")
def _certify(logit, own, lowest, highest, tau_low, tau_high, margin, work):
    """The Eq. 7 winner for every tau in [tau_low, tau_high] of one pixel, or UNDECIDED.
    `logit`, `own`, `lowest`, `highest` as from `_offset_bounds` (float64); `work`: five
    ``(C,)`` scratch arrays (separate arrays: views of one would cost reference counting)."""
    num_classes = logit.shape[0]
    own_low, own_high, weak, strong, shifted = work
    for c in range(num_classes):
        low_end, high_end = tau_low * own[c], tau_high * own[c]
        own_low[c] = logit[c] + min(low_end, high_end)
        own_high[c] = logit[c] + max(low_end, high_end)
        weak[c] = logit[c] + min(tau_low * lowest[c], tau_high * lowest[c])
        strong[c] = logit[c] + max(tau_low * highest[c], tau_high * highest[c])
    strongest, strongest_at = _largest(strong, -1)
    second_strongest, _ = _largest(strong, strongest_at)
    # The candidate: the best margin of its lowest a_kk over the others' strongest terms.
    for c in range(num_classes):
        shifted[c] = own_low[c] - (second_strongest if c == strongest_at else strongest)
    best, winner = _largest(shifted, -1)
    weakest, weakest_at = _largest(weak, -1)
    second_weakest, _ = _largest(weak, weakest_at)
    # U_c < L_k - 3 margin <=> upper gap_c = log sum_{c' != c} exp(weak_c') - a_cc at its highest
    # exceeds `threshold`. Three steps, each only for the pixels the previous one left: (1) no
    # exponential: log sum_{c' != k} exp(strong_c') <= its largest + log(C - 1) in L_k, and
    # log sum_{c' != c} exp(weak_c') >= its largest in U_c; (2) L_k exact; (3) U_c exact too.
    threshold = _threshold(math.log(num_classes - 1.0) - best, margin)
    if not _any_left(own_high, winner, weakest, weakest_at, second_weakest, threshold):
        return winner
    # Sums of exponentials shifted by their largest term, so that it is exactly 1 and the
    # terms `fast_exp` clamps at exp(-700) change the sum by less than 1e-300 relative.
    strongest_other = second_strongest if winner == strongest_at else strongest
    for c in range(num_classes):  # a vectorised loop
        shifted[c] = fast_exp(strong[c] - strongest_other)
    lower_gap = math.log(_sum_without(shifted, winner)) + strongest_other - own_low[winner]
    threshold = _threshold(lower_gap, margin)
    if not _any_left(own_high, winner, weakest, weakest_at, second_weakest, threshold):
        return winner
    ruled_out = _rule_out_exactly(
        own_high, weak, shifted, winner, threshold, weakest, weakest_at, second_weakest
    )
    return winner if ruled_out else UNDECIDED


@numba.njit(inline="always")
def _rule_out_exactly(
    own_high, weak, shifted, winner, threshold, weakest, weakest_at, second_weakest
) -> bool:
    """Whether every class but `winner` has its exact upper gap above `threshold` (`weakest`,
    `weakest_at`, `second_weakest`: the largest weak term, its index, the next one)."""
    num_classes = weak.shape[0]
    for c in range(num_classes):
        shifted[c] = fast_exp(weak[c] - weakest)
    total = _sum_without(shifted, -1)
    for c in range(num_classes):
        others = second_weakest if c == weakest_at else weakest
        if c == winner or others - own_high[c] > threshold:
            continue
        if c == weakest_at:  # without the largest term: summed afresh, shifted by the next one
            others_sum = 0.0
            for index in range(num_classes):
                others_sum += 0.0 if index == c else fast_exp(weak[index] - others)
        else:  # the largest term (exactly 1.0) stays: no cancellation
            others_sum = total - shifted[c]
        # U_c >= L - 3 margin, without a logarithm (a limit below exp(-700) is clamped up, so
        # such a class is kept: the safe side)
        if others_sum <= fast_exp(threshold - others + own_high[c]):
            return False
    return True


@numba.njit(inline="always")
def _any_left(own_high, winner, weakest, weakest_at, second_weakest, threshold) -> bool:
    """Whether a class other than `winner` is not ruled out by the largest weak term alone."""
    left = False
    for c in range(own_high.shape[0]):
        others = second_weakest if c == weakest_at else weakest
        left |= (c != winner) & (others - own_high[c] <= threshold)
    return left


@numba.njit(nogil=True, cache=True)
def certify_rows(logits, start, stop, taus, by_cell, by_column, prediction) -> None:
    """Certified Eq. 7 predictions of rows [start, stop) of `logits` ``(n, C)`` float32 for the
    sorted positive `taus` ``(T,)`` into `prediction` ``(T, n)`` int64 (UNDECIDED where the
    bounds do not decide)."""
    num_classes, count = logits.shape[1], taus.shape[0]
    logit, own = np.empty(num_classes), np.empty(num_classes)
    lowest, highest = np.empty(num_classes), np.empty(num_classes)
    work = (
        np.empty(num_classes), np.empty(num_classes), np.empty(num_classes), np.empty(num_classes),
        np.empty(num_classes),
    )  # fmt: skip
    pending = np.empty((2 * count, 2), dtype=np.int64)  # tau ranges still to certify
    for row in range(start, stop):
        offset_magnitude = _offset_bounds(logits, row, by_cell, by_column, own, lowest, highest)
        logit_magnitude = 0.0
        for c in range(num_classes):
            logit[c] = logits[row, c]
            logit_magnitude = max(logit_magnitude, abs(logit[c]))
        pending[0, 0], pending[0, 1], depth = 0, count - 1, 1
        while depth:
            depth -= 1
            first, last = pending[depth, 0], pending[depth, 1]
            scale = logit_magnitude + taus[last] * offset_magnitude
            margin = (64.0 * scale + 64.0 + 4.0 * num_classes) * FLOAT32_EPS
            winner = _certify(logit, own, lowest, highest, taus[first], taus[last], margin, work)
            if winner != UNDECIDED or first == last:
                for index in range(first, last + 1):
                    prediction[index, row] = winner
            else:  # halve the range
                middle = (first + last) // 2
                pending[depth, 0], pending[depth, 1] = first, middle
                pending[depth + 1, 0], pending[depth + 1, 1] = middle + 1, last
                depth += 2


@numba.njit(nogil=True, cache=True)
def offset_bounds_rows(logits, by_cell, by_column):
    """Delta_cc(f[c]) and the bounds of Delta_c'c(f[c]) over c' != c, each ``(n, C)`` float64
    (the per-pixel part of `certify_rows`, for tests and diagnostics)."""
    shape = logits.shape
    own, lowest, highest = np.empty(shape), np.empty(shape), np.empty(shape)
    for row in range(shape[0]):
        _offset_bounds(logits, row, by_cell, by_column, own[row], lowest[row], highest[row])
    return own, lowest, highest


def certified_predictions(logits: Tensor, taus: list[float], tables: CertifyTables) -> Tensor:
    """``(T, n)`` int64: the certified Eq. 7 prediction of `logits` ``(n, C)`` (float32,
    contiguous, finite) at each sorted positive tau, UNDECIDED where the bounds leave it to the
    full computation (the kernel releases the GIL: callers may run parts in threads)."""
    if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.ndim != 2:
        # The kernel must find the grid cells of `gather_offsets`, which works in float32.
        raise BLDAError(f"logits: expected a contiguous (n, C) float32 tensor, got {logits.dtype}")
    values = logits.numpy()
    prediction = np.empty((len(taus), values.shape[0]), dtype=np.int64)
    tau_array = np.asarray(taus, dtype=np.float64)
    certify_rows(values, 0, values.shape[0], tau_array, *tables, prediction)
    return torch.from_numpy(prediction)
