"""The steps of the Eq. 7 certificate (`blda_tools.calibration.eq7.certify`), compiled with numba.

Steps 1 and 2 (`block_steps`, `block_step_two`) run class-major over the pixels of a block, so
that their loops run over pixels and the compiler vectorises them; step 3 (`candidate_pairs`,
`pair_gaps`, `pair_sums`, `pair_winner`) runs over the (pixel, candidate) pairs of the pixels
the bounds leave undecided, all of a block's together. The module docstring of
`eq7_certify` gives the bounds and why the result is exact.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from blda_tools.runtime.float32_math import (
    bits_of_float64,
    float64_from_bits,
    fused_multiply_add,
)

UNDECIDED = -1


@numba.njit(inline="always")
def rule_out_threshold(total: float, shift: float, margin: float) -> float:
    """At least softplus^-1(softplus(g) + 3 margin), g = log(total) + shift the lower gap: a
    class whose upper gap exceeds it has U_c < L - 3 margin, L = -softplus(g) (softplus is
    increasing).

    softplus^-1(y) = log(expm1(y)) and expm1(softplus(g) + 3 margin) = (1 + e^g) e^(3 margin)
    - 1 = total e^(shift + 3 margin) + expm1(3 margin): no logarithm of `total` first. The
    sum is rounded up (relative 1e-9, i.e. +1e-9 after the logarithm, covers the 1e-10 of
    `fast_exp` and `fast_expm1` and the roundings; the clamp at -700 errs upward too) and
    1e-12 added for `fast_log`'s error; beyond exp(700) nothing is ruled out (+inf). Selects
    and straight-line arithmetic only, so that the loop over a block's pixels is vectorised:
    with libm's log and expm1 it ran one pixel at a time, 19 of step 1's 63 ns per pixel (5
    now; bench_calibrate.py's data, one tau)."""
    exponent = shift + 3.0 * margin
    level = (total * fast_exp(exponent) + fast_expm1(3.0 * margin)) * (1.0 + 1e-9)
    beyond = (exponent > 700.0) | (3.0 * margin > 700.0)
    return math.inf if beyond else fast_log(level) + 1e-12


# exp(v) = 2^n exp(r), n = round(v / ln 2), r = v - n ln 2 with ln 2 split in two (Cody-Waite:
# _LN2_HIGH has 32 significant bits, so n _LN2_HIGH is exact for |n| <= 1024); exp(r), |r| <=
# 0.347, by its Taylor polynomial of degree 10 (truncation below 3e-13 relative). Adding 1.5 *
# 2^52 + 1023 rounds v / ln 2 to an integer and leaves n + 1023 in the low bits of the sum, so
# 2^n is those bits shifted into the exponent field (AVX2 has no vector float-to-int64).
_LOG2_E = 1.0 / math.log(2.0)
_LN2_HIGH, _LN2_LOW = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_SHIFTER = 1.5 * 2.0**52 + 1023.0
_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(9, -1, -1))  # 1/9!, ..., 1/0!


@numba.njit(inline="always")
def fast_exp(value: float) -> float:
    """exp(value) for value in [-700, 700] (clamped there) with a relative error below 1e-12:
    straight-line code of fused multiply-adds (no libm call, no float-to-int conversion), so
    that a loop calling it over pixels is vectorised."""
    clamped = min(max(value, -700.0), 700.0)
    shifted = fused_multiply_add(clamped, _LOG2_E, _SHIFTER)
    n = shifted - _SHIFTER  # round(clamped / ln 2), exactly
    r = fused_multiply_add(-n, _LN2_LOW, fused_multiply_add(-n, _LN2_HIGH, clamped))
    power = 1.0 / 3628800.0
    for coefficient in _TAYLOR:  # unrolled by numba: a tuple of constants
        power = fused_multiply_add(power, r, coefficient)
    return power * float64_from_bits(bits_of_float64(shifted) << np.int64(52))


# log(x) = e ln 2 + log m, x = 2^e m with m in [1/sqrt 2, sqrt 2) from the float's bits; log m =
# 2 atanh(u) = 2 (u + u^3/3 + ...), u = (m - 1) / (m + 1), |u| <= 0.172, to u^17 (truncation
# below 4e-16). 1 / (m + 1) by Newton's iteration from a linear first guess (relative error
# 0.015, squared by each of the three steps): a division would raise on zero in numba's
# default error model, a branch that stops LLVM vectorising the loop. The biased exponent is
# read as a float through the bits of 2^52 + e (AVX2 has no vector int64-to-float
# conversion); e ln 2 with ln 2 split as in `fast_exp`.
_MANTISSA, _ONE_BITS, _TWO_52_BITS = 0x000FFFFFFFFFFFFF, 0x3FF0000000000000, 0x4330000000000000
_SQRT_2, _TWO_52 = math.sqrt(2.0), 2.0**52
_ATANH_SERIES = tuple(1.0 / k for k in range(17, 0, -2))  # 1/17, ..., 1/3, 1


@numba.njit(inline="always")
def fast_log(value: float) -> float:
    """log(value) for a positive normal float64 to within 2e-13 absolute: straight-line code
    with selects, so that a loop over pixels calling it is vectorised."""
    bits = bits_of_float64(value)
    m = float64_from_bits((bits & np.int64(_MANTISSA)) | np.int64(_ONE_BITS))  # in [1, 2)
    biased = float64_from_bits((bits >> np.int64(52)) | np.int64(_TWO_52_BITS)) - _TWO_52
    big = m >= _SQRT_2
    m = 0.5 * m if big else m
    exponent = biased - 1023.0 + (1.0 if big else 0.0)
    denominator = m + 1.0  # in [1.707, 2.415)
    reciprocal = fused_multiply_add(-0.239, denominator, 0.985)
    for _ in range(3):  # unrolled by LLVM
        error = fused_multiply_add(-denominator, reciprocal, 1.0)
        reciprocal = fused_multiply_add(reciprocal, error, reciprocal)
    u = (m - 1.0) * reciprocal
    square, series = u * u, 0.0
    for coefficient in _ATANH_SERIES:  # unrolled by numba: a tuple of constants
        series = fused_multiply_add(series, square, coefficient)
    log_m = 2.0 * u * series
    return fused_multiply_add(exponent, _LN2_HIGH, fused_multiply_add(exponent, _LN2_LOW, log_m))


@numba.njit(inline="always")
def fast_expm1(value: float) -> float:
    """expm1(value) for 0 <= value <= 700 to 1e-10 relative, with a select: below 0.01 its
    Taylor polynomial of degree 5 (truncation below 2e-13 relative), else fast_exp - 1
    (fast_exp's 1e-12 relative grows by at most e^0.01 / expm1(0.01) ~ 100 in the difference)."""
    taylor = value * (1.0 + value * (0.5 + value * (1.0 / 6 + value * (1.0 / 24 + value / 120))))
    return taylor if value < 0.01 else fast_exp(value) - 1.0


@numba.njit(inline="always")
def grid_point(value, low, inv_step, last):
    """(grid point as a float32, fraction) of logit `value` on a column's grid (`low`,
    `inv_step`, `last` = points - 1): the position computed in float32 exactly as
    `gather_offsets` does, so that every step interpolates the same grid cell as the full
    computation. Selects only: a loop over pixels calling it is vectorised."""
    position = min(max((value - low) * inv_step, np.float32(0.0)), last)
    point = np.float32(np.int32(position))  # exact: grids have fewer than 2^24 points
    return point, position - point


@numba.njit(inline="always")
def interpolate(by_point, row, column, fraction):
    """The float32 table value of `by_point` ``(R + 1, C)`` at `row` + `fraction` in
    `column`: exactly `gather_offsets`' value + fraction increment, as the calibrator's
    increments are the float32 differences of neighbouring points (at a column's last point
    the fraction is 0, and the next row is finite). Reading the next point instead of a stored
    increment halves the table step 3 reads at random (2.9 MB for C = 19, G = 2048)."""
    value = by_point[row, column]
    return value + fraction * (by_point[row + np.uint64(1), column] - value)


@numba.njit(inline="always")
def grid_cell(value, column, by_column, points):
    """(row of the table, fraction, distance beyond the table) of logit `value` in `column`
    (`grid_point` on the column's grid)."""
    low, inv_step, high = by_column[0, column], by_column[1, column], by_column[2, column]
    point, fraction = grid_point(value, low, inv_step, np.float32(points - 1))
    beyond = float(value - min(max(value, low), high))
    return column * points + np.int64(point), fraction, beyond


# Step 3 works on a block's undecided pixels together, one (pixel, candidate) pair per lane:
# each loop runs over every pair of the block, so it is vectorised whatever a pixel's candidate
# count (2 for most pixels, 3.8 on average on overlapping classes). Scoring the candidates
# pixel by pixel, padded to 8 lanes, cost ~165 ns per pixel and tau against ~70 now, and the
# certificate took 1308 -> 1036 ns per pixel at ten taus on overlapping classes with a strong
# bias (one thread, both versions in one process, 2026-12-05). `pair_gaps` now dominates,
# ~3.6 ns per pair and class: about eight scalar gathers each, not waiting on memory (with
# every table row cache-resident it was only 4 % faster).
# A term clamped by `fast_exp` (at exp(700)) makes its sum exceed this.
_LARGEST_SUM = math.exp(699.0)


@numba.njit(inline="always")
def pair_work(num_classes: int, block: int, taus: int):
    """The arrays of step 3 for a block of `block` pixels and ranges of at most `taus` taus
    (see `candidate_pairs`): at most C pairs per pixel, and a spare pixel's worth for
    `candidate_pairs`' unconditional writes."""
    pairs = num_classes * (block + 1)
    rows = -(-taus // _CHAIN_TAUS) * _CHAIN_TAUS
    return (
        np.empty(block, np.int64), np.empty(block, np.int64), np.empty(block + 1, np.int64),
        np.empty(pairs, np.uint64), np.empty(pairs, np.uint64), np.empty(pairs),
        np.empty((num_classes, pairs)), np.empty((num_classes, pairs)), np.empty((rows, pairs)),
        np.empty(pairs), np.empty(pairs), np.empty(pairs, np.bool_),
    )  # fmt: skip


@numba.njit(inline="always")
def candidate_pairs(entries, winner, kept, column_of, work) -> int:
    """The (pixel, candidate) pairs of step 3; returns their number. `work` (`pair_work`) =
    (entry_pixel, entry_index: the `entries` undecided pixels' places in the block and in
    `winner` ``(B,)``; first: where each pixel's pairs start, then the end; pair_pixel,
    pair_class ``(P,)``; own ``(P,)``, logit_gaps, offset_gaps ``(C, P)``, totals ``(P,)``,
    for `pair_gaps` and `pair_sums`). A pixel's candidates are its `winner` and the classes
    step 2 `kept` ``(C, B')`` at its `column_of` (every class the bounds could not rule out,
    so the full computation's winner is among them)."""
    entry_pixel, entry_index, first, pair_pixel, pair_class = work[:5]
    pairs = 0
    for entry in range(entries):
        k, pixel = entry_index[entry], np.uint64(entry_pixel[entry])
        column = column_of[k]
        first[entry] = pairs
        pair_pixel[pairs], pair_class[pairs] = pixel, np.uint64(winner[k])
        pairs += 1
        for c in range(kept.shape[0]):  # without a branch: the flags are unpredictable
            pair_pixel[pairs], pair_class[pairs] = pixel, np.uint64(c)
            pairs += np.int64(kept[c, column])
    first[entries] = pairs
    return pairs


@numba.njit(inline="always")
def pair_gaps(pairs, logit, grid, tables, outside, work) -> None:
    """Step 3's part that does not depend on tau: for each pair (pixel, candidate c) and every
    class l, f[l] - f[c] and Delta_cl(f[l]) - Delta_cc(f[c]) in float64, from the offsets
    interpolated in float32 as `gather_offsets` does (beyond the table they fall with slope -1
    where adjusted; `outside`: whether any logit of the block is beyond). `logit` ``(C, B)``
    float32 and `grid` = (table rows ``(C, B)`` uint64, fractions ``(C, B)`` float32): the
    block as loaded; `tables`: a `CertifyTables` tuple."""
    by_column, by_point, adjusted_lc = tables[1], tables[2], tables[3]
    pair_pixel, pair_class, own, logit_gaps, offset_gaps = work[3:8]
    rows, fractions = grid
    for p in range(pairs):
        pixel, c = pair_pixel[p], pair_class[p]
        offset = float(interpolate(by_point, rows[c, pixel], c, fractions[c, pixel]))
        if outside:  # rare
            offset -= _beyond(logit[c, pixel], c, by_column) * adjusted_lc[c, c]
        own[p] = offset  # Delta_cc(f[c])
    for column in range(logit.shape[0]):
        row, fraction, values = rows[column], fractions[column], logit[column]
        offset_gap, logit_gap = offset_gaps[column], logit_gaps[column]
        for p in range(pairs):
            pixel, c = pair_pixel[p], pair_class[p]
            offset = float(interpolate(by_point, row[pixel], c, fraction[pixel]))
            if outside:
                offset -= _beyond(values[pixel], column, by_column) * adjusted_lc[column, c]
            offset_gap[p] = offset - own[p]
            logit_gap[p] = float(values[pixel]) - float(logit[c, pixel])


@numba.njit(inline="always")
def _beyond(value, column, by_column) -> float:
    """How far logit `value` lies beyond its column's table (0 inside)."""
    return float(value - min(max(value, by_column[0, column]), by_column[2, column]))


# Exponents of step 3 beyond which `pair_sums` chains no terms (fast_exp clamps at 700): a
# term below exp(-600) is dropped (the sums are >= 1: the l = c term is exp(0)), and a term
# that crosses -600 within a range or exceeds 600 leaves its pixel undecided.
_CHAIN_LIMIT = 600.0
# Taus per pass of `pair_sums`' chain (`pair_work` pads its rows to a multiple).
_CHAIN_TAUS = 4


@numba.njit(inline="always")
def evenly_spaced(taus, low, high) -> bool:
    """Whether taus[low..high] lie within 1e-9 taus[high] of an even spacing (a sweep's
    START:STOP:STEP does, up to the decimal rounding of each value)."""
    step = (taus[high] - taus[low]) / max(high - low, 1)
    for position in range(low + 1, high):
        if abs(taus[position] - (taus[low] + (position - low) * step)) > 1e-9 * taus[high]:
            return False
    return True


@numba.njit(inline="always")
def pair_sums(pairs, taus, low, high, work) -> None:
    """Step 3 at taus[low..high]: the Eq. 7 sums T_c = sum_l exp(X_lc - X_cc) of every pair
    into `totals[position - low]` (score s_c = -log T_c, as in `eq7_kernel`), in float64 from
    `pair_gaps`.

    Evenly spaced taus (`evenly_spaced`) chain each term, X_lc - X_cc = g + tau h: exp(g +
    tau_low h) times exp(h step) per further tau, two exponentials per term for the whole
    range instead of one per tau (ten taus: 3.4 instead of 7.0 ns per pair and class,
    measured alone). That evaluates tau_low + i step instead of tau_i, within 1e-9 tau_high
    of it: |h| <= 2 max|Delta| moves the exponent by less than 2e-9 scale, and the chain's
    products add at most one rounding and one fast_exp error (1e-12) per tau, both far inside
    the spare third margin. The chain stays within exp(+-600) (`_CHAIN_LIMIT`), so that no
    factor is clamped and no product is subnormal; a pair whose terms leave it is `unsure`."""
    logit_gaps, offset_gaps, totals, term, ratio, unsure = work[6:]
    count = high - low + 1
    totals[:, :pairs] = 0.0  # the padding rows too: no stale subnormals in the chain
    unsure[:pairs] = False
    if count == 1 or not evenly_spaced(taus, low, high):
        for position in range(count):
            tau, total = taus[low + position], totals[position]
            for column in range(logit_gaps.shape[0]):
                logit_gap, offset_gap = logit_gaps[column], offset_gaps[column]
                for p in range(pairs):  # vectorised
                    total[p] += fast_exp(logit_gap[p] + tau * offset_gap[p])
        return
    step = (taus[high] - taus[low]) / (count - 1)
    for column in range(logit_gaps.shape[0]):
        logit_gap, offset_gap = logit_gaps[column], offset_gaps[column]
        for p in range(pairs):  # vectorised
            first = logit_gap[p] + taus[low] * offset_gap[p]
            increment = step * offset_gap[p]
            last = first + (count - 1) * increment
            top, bottom = max(first, last), min(first, last)
            dropped = top < -_CHAIN_LIMIT
            beyond = (bottom < -_CHAIN_LIMIT) | (top > _CHAIN_LIMIT)
            unsure[p] |= beyond & ~dropped
            term[p] = 0.0 if dropped else fast_exp(first)
            ratio[p] = fast_exp(increment)
        # Four taus per pass over the pairs: the term stays in a register between them (one
        # tau per pass loaded and stored it each time). Rows past the range are padding; their
        # products may leave the limits (subnormal at worst, and never read).
        for start in range(0, count, _CHAIN_TAUS):
            first_total, second_total = totals[start], totals[start + 1]
            third_total, fourth_total = totals[start + 2], totals[start + 3]
            for p in range(pairs):  # vectorised
                value, factor = term[p], ratio[p]
                first_total[p] += value
                value *= factor
                second_total[p] += value
                value *= factor
                third_total[p] += value
                value *= factor
                fourth_total[p] += value
                term[p] = value * factor


@numba.njit(inline="always")
def pair_winner(entry, position, margin, work) -> int:
    """The winner of one pixel (`entry`) at tau `position` of `pair_sums`' range: the
    candidate with the smallest sum when it beats every other by more than 3 margin (T_other
    > T_best e^(3 margin)), else UNDECIDED, as when a term exceeds exp(700), where `fast_exp`
    would clamp it, or a pair is `unsure`. The error, below 1e-11 (`fast_exp` 1e-12 relative,
    float64 roundings), is far inside the spare third margin (>= 7e-6)."""
    first, pair_class, totals, unsure = work[2], work[4], work[8][position], work[11]
    best, smallest, runner_up, doubtful = first[entry], math.inf, math.inf, False
    for p in range(first[entry], first[entry + 1]):  # one pass, selects only
        total = totals[p]
        # a sum of unclamped terms may pass it too: undecided, which is always safe
        doubtful |= (total > _LARGEST_SUM) | unsure[p]
        smaller = total < smallest
        runner_up = min(runner_up, smallest) if smaller else min(runner_up, total)
        best = p if smaller else best
        smallest = min(smallest, total)
    # ties (the full computation takes the lower index) are left UNDECIDED: the runner-up
    # equals the smallest
    decided = (runner_up > smallest * math.exp(3.0 * margin)) & ~doubtful
    return np.int64(pair_class[best]) if decided else UNDECIDED


@numba.njit(inline="always")
def range_ends(columns, count, tau_low, tau_high, ends) -> None:
    """`ends` = (own_low, own_high, weak, strong) ``(C, B)``: a_cc at its lowest and highest
    over the tau range, and f[c] + tau Delta_c'c(f[c]) at the lowest and highest bound."""
    logit, own, lowest, highest = columns
    own_low, own_high, weak, strong = ends
    for c in range(logit.shape[0]):
        for j in range(count):
            low_end, high_end = tau_low * own[c, j], tau_high * own[c, j]
            own_low[c, j] = logit[c, j] + min(low_end, high_end)
            own_high[c, j] = logit[c, j] + max(low_end, high_end)
            weak[c, j] = logit[c, j] + min(tau_low * lowest[c, j], tau_high * lowest[c, j])
            strong[c, j] = logit[c, j] + max(tau_low * highest[c, j], tau_high * highest[c, j])


@numba.njit(inline="always")
def _two_largest(values, count, largest, largest_at, second) -> None:
    """Per pixel j of `values` ``(C, B)``: the largest value, its first index and the largest
    of the other classes (equal to the largest on ties); a loop over pixels, with selects
    only, which the compiler vectorises."""
    largest[:count], second[:count], largest_at[:count] = -math.inf, -math.inf, 0
    for c in range(values.shape[0]):
        row = values[c]
        for j in range(count):
            value, previous = row[j], largest[j]
            greater = value > previous
            # = previous if greater else max(second, value), as second <= previous: written
            # with min and max, LLVM vectorises the loop (with the nested select it did not,
            # 4x slower)
            second[j] = min(max(second[j], value), previous)
            largest_at[j] = c if greater else largest_at[j]
            largest[j] = value if greater else previous


@numba.njit(inline="always")
def _block_left(own_high, winner, weakest, threshold, count, left, found) -> None:
    """`_any_left` per pixel of the block, AND-ed into `left` (a decided pixel stays decided);
    `found`: scratch ``(B,)``."""
    largest, largest_at, second = weakest
    found[:count] = False
    for c in range(own_high.shape[0]):
        for j in range(count):
            others = second[j] if c == largest_at[j] else largest[j]
            found[j] |= (c != winner[j]) & (others - own_high[c, j] <= threshold[j])
    for j in range(count):
        left[j] &= found[j]


@numba.njit(inline="always")
def block_step_two(ends, count, winner, threshold, weakest, left, compact) -> None:
    """Step 2 of the certificate (U_c exact) for the pixels of the block still `left`,
    on a compacted class-major copy of them so that the loops run over pixels (vectorised);
    a pixel every other class of which is ruled out leaves `left`. For step 3, `compact`
    keeps pixel j's classes not ruled out (`kept_left`) at column `position[j]`."""
    own_high, weak = ends[1], ends[2]
    index, position, own_high_left, weak_left, shifted, kept_left, per_pixel = compact
    largest, largest_at, second, candidate, limit, total, resum, found = per_pixel
    pixels = 0
    for j in range(count):
        index[pixels], position[j] = j, pixels
        pixels += left[j]
    for c in range(own_high.shape[0]):
        for k in range(pixels):
            own_high_left[c, k], weak_left[c, k] = own_high[c, index[k]], weak[c, index[k]]
    for k in range(pixels):
        j = index[k]
        largest[k], largest_at[k], second[k] = weakest[0][j], weakest[1][j], weakest[2][j]
        candidate[k], limit[k] = winner[j], threshold[j]
        total[k], resum[k], found[k] = 0.0, 0.0, False
    for c in range(own_high.shape[0]):
        for k in range(pixels):
            term = fast_exp(weak_left[c, k] - largest[k])
            shifted[c, k] = term
            total[k] += term
            resum[k] += 0.0 if c == largest_at[k] else term
    for k in range(pixels):
        # For c = largest_at the sum without it, shifted by `second` instead: one rescaling
        # per pixel, not a second exponential per class. Beyond a gap of 600 the clamped
        # exponentials could overstate it; 1 (the term of `second` itself) is a lower bound,
        # which only keeps more classes.
        gap = largest[k] - second[k]
        resum[k] = resum[k] * fast_exp(gap) if gap <= 600.0 else 1.0
    for c in range(own_high.shape[0]):
        for k in range(pixels):
            others = second[k] if c == largest_at[k] else largest[k]
            others_sum = resum[k] if c == largest_at[k] else total[k] - shifted[c, k]
            bound = fast_exp(limit[k] - others + own_high_left[c, k])
            kept = (others - own_high_left[c, k] <= limit[k]) & (others_sum <= bound)
            kept_left[c, k] = (c != candidate[k]) & kept
            found[k] |= kept_left[c, k]
    for k in range(pixels):
        left[index[k]] = found[k]


@numba.njit(inline="always")
def _block_candidates(ends, count, strongest, winner, best) -> None:
    """Per pixel the candidate k and its margin (see `eq7.certify`): the best lowest a_kk over
    the others' strongest terms, first index on ties."""
    own_low, strong = ends[0], ends[3]
    largest, largest_at, second = strongest
    _two_largest(strong, count, largest, largest_at, second)
    best[:count], winner[:count] = -math.inf, 0
    for c in range(own_low.shape[0]):
        row = own_low[c]
        for j in range(count):
            value = row[j] - (second[j] if c == largest_at[j] else largest[j])
            previous = best[j]
            winner[j] = c if value > previous else winner[j]
            best[j] = max(previous, value)


@numba.njit(inline="always")
def block_steps(ends, columns, count, taus, margin, scratch, winner, threshold, left) -> None:
    """Step 1 of the certificate for every pixel of the block, class-major: `winner` and L_k
    exact (the others' strongest terms summed, shifted by their largest), and in `left`
    whether step 2 is still needed (then with its `threshold`); `columns`: the loaded block,
    `taus` = (lowest, highest) of the range. A cruder step without exponentials (log sum exp
    <= largest term + log(C - 1)) was dropped: its threshold is never below this one's, so it
    ruled out nothing more, and it cost a pass and a threshold per pixel."""
    own_low, own_high, weak, strong = ends
    strongest, weakest, best, total, found, own_k, second_end = scratch
    _block_candidates(ends, count, strongest, winner, best)
    _two_largest(weak, count, weakest[0], weakest[1], weakest[2])
    largest, largest_at, second = strongest
    for j in range(count):  # at least every term of L_k at either end: no exponent above 0
        best[j] = second[j] if winner[j] == largest_at[j] else largest[j]
    if taus[1] == taus[0]:
        for j in range(count):  # a gather by `winner`: a scalar loop of its own
            own_k[j] = own_low[winner[j], j]
        _lower_threshold(strong, count, best, own_k, margin, winner, total, threshold)
    else:
        # L_k = -softplus(log sum_{c != k} exp(f[c] + tau hi_c) - f[k] - tau Delta_kk) is
        # concave in tau (-softplus of a convex function): over a range it is lowest at an
        # end. Taken at both ends, not with each term at its own worst end (also a bound,
        # but looser; see `eq7.certify`). `strong` is free for the terms: step 1 is done
        # with it, step 2 does not read it. The one-tau path above is the same sum.
        logit, own, highest = columns[0], columns[1], columns[3]
        for end in range(2):
            tau = taus[end]
            for c in range(logit.shape[0]):
                for j in range(count):
                    strong[c, j] = logit[c, j] + tau * highest[c, j]
            for j in range(count):
                own_k[j] = logit[winner[j], j] + tau * own[winner[j], j]
            out = threshold if end == 0 else second_end
            _lower_threshold(strong, count, best, own_k, margin, winner, total, out)
        for j in range(count):  # the threshold grows with the lower gap: the larger one
            threshold[j] = max(threshold[j], second_end[j])
    left[:count] = True
    _block_left(own_high, winner, weakest, threshold, count, left, found)


@numba.njit(inline="always")
def _lower_threshold(terms, count, best, own_k, margin, winner, total, out) -> None:
    """Per pixel the `rule_out_threshold` of L_k into `out`, from the others' `terms`
    ``(C, B)`` summed shifted by `best` and a_kk = `own_k`; `total`: scratch."""
    for j in range(count):
        total[j] = 0.0
    for c in range(terms.shape[0]):
        for j in range(count):
            term = fast_exp(terms[c, j] - best[j])  # computed first: a select, vectorised
            total[j] += 0.0 if c == winner[j] else term
    for j in range(count):  # vectorised
        out[j] = rule_out_threshold(total[j], best[j] - own_k[j], margin[j])
