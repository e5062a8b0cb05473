"""The certified Eq. 7 winners (`blda_tools.calibration.eq7.certify`) against independent truths: numpy's
and mpmath's exp / softplus, and the unpruned C x C computation of Eq. 7 (`full_prediction`,
`log_scores(...).argmax`), which shares none of the certificate's code."""

from __future__ import annotations

import math

import mpmath
import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blda_tools.calibration.calibrator import Calibrator, full_prediction, predict_taus
from blda_tools.calibration.eq7.certify import UNDECIDED, certified_predictions, prediction_dtype
from blda_tools.calibration.eq7.kernel import gather_offsets
from blda_tools.calibration.eq7.pruning import full_predictions
from blda_tools.calibration.eq7.steps import (
    candidate_pairs,
    fast_exp,
    fast_expm1,
    fast_log,
    grid_cell,
    pair_gaps,
    pair_sums,
    pair_winner,
    pair_work,
    rule_out_threshold,
)
from blda_tools.calibration.sweep import TauSweep
from blda_tools.calibration.sweep_counts import count_sweep
from blda_tools.errors import BLDAError
from blda_tools.statistics import LogitGrid, LogitSetStatistics


def _biased_logits(num_classes: int, pixels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional Gaussian logits with a long-tailed prior (rare classes leave cells
    with few samples, hence unadjusted)."""
    generator = torch.Generator().manual_seed(seed)
    prior = torch.logspace(0, -2.5, num_classes)
    labels = torch.multinomial(prior / prior.sum(), pixels, True, generator=generator)
    spread = torch.linspace(0.7, 2.0, num_classes)
    bias = torch.linspace(1.0, -1.0, num_classes)
    logits = torch.randn(pixels, num_classes, generator=generator) * spread + bias
    return logits + 3.0 * torch.nn.functional.one_hot(labels, num_classes), labels


@pytest.fixture(scope="module", params=[2, 19], ids=["C2", "C19"])
def fitted(request):
    num_classes = request.param
    logits, labels = _biased_logits(num_classes, 30_000, seed=num_classes)
    statistics = LogitSetStatistics(num_classes, LogitGrid(-20, 20, 400))
    statistics.update(logits, labels)
    calibrator = Calibrator("empirical", min_samples=60, table_points=256).fit(statistics)
    if num_classes == 19:  # the case really has unadjusted cells next to adjusted ones
        assert calibrator.unadjusted_cells_ and bool(calibrator.adjusted_.any())
    return calibrator, logits


def test_fast_exp_has_a_relative_error_below_1e_12():
    generator = np.random.default_rng(0)
    values = np.concatenate([np.linspace(-700, 700, 20001), generator.uniform(-5, 5, 20000)])
    # the ends of the reduced argument (|r| = ln 2 / 2) and of the exponent field (n = +-1010)
    halfway = (np.arange(-1010, 1011) + 0.5) * math.log(2.0)
    values = np.concatenate([values, halfway[np.abs(halfway) <= 700], [-700.0, 700.0, 0.0]])
    got = np.array([fast_exp(value) for value in values])
    np.testing.assert_allclose(got, np.exp(values), rtol=1e-12, atol=0)
    # Clamped beyond [-700, 700]: an upper bound below (the side the certificate relies on).
    assert fast_exp(-900.0) >= math.exp(-900.0) and fast_exp(-900.0) == fast_exp(-700.0)


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        st.floats(np.finfo(np.float64).tiny, 1e308),
        st.floats(0.5, 2.0),  # around the mantissa's switch at sqrt 2
        st.sampled_from([1.0, 2.0, 0.5, math.sqrt(2.0), math.nextafter(math.sqrt(2.0), 0.0)]),
    )
)
def test_fast_log_is_within_2e_13_of_the_logarithm(value):
    assert abs(fast_log(value) - math.log(value)) <= 2e-13  # an ulp of 709 is 1.1e-13


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.floats(0.0, 700.0), st.floats(0.0, 0.02), st.floats(1e-12, 1e-6)))
def test_fast_expm1_has_a_relative_error_below_1e_10(value):
    exact = float(mpmath.expm1(value))
    assert abs(fast_expm1(value) - exact) <= 1e-10 * exact


def test_threshold_rules_out_nothing_beyond_exp_700():
    assert rule_out_threshold(1.0, 699.0, 1.0) == math.inf  # shift + 3 margin > 700
    assert rule_out_threshold(1.0, -800.0, 240.0) == math.inf  # expm1(3 margin) itself


@settings(max_examples=50, deadline=None)
@given(
    lower_gap=st.one_of(st.floats(-800.0, 800.0), st.floats(-40.0, 10.0)),
    margin=st.floats(1e-8, 1e-1),
    total=st.sampled_from([1.0, 1.5, 18.0, 1e-30]),
)
def test_threshold_is_at_least_the_exact_inverse_softplus(lower_gap, margin, total):
    mpmath.mp.dps = 60
    softplus = mpmath.log1p(mpmath.exp(lower_gap))
    exact = mpmath.log(mpmath.expm1(softplus + 3 * mpmath.mpf(margin)))
    # lower_gap = log(total) + shift: the kernel passes the sum and its shift apart
    shift = float(lower_gap - mpmath.log(total))
    got = rule_out_threshold(total, shift, margin)
    if shift + 3 * margin > 700:  # beyond fast_exp's range nothing is ruled out
        assert got == math.inf
        return
    # At least the exact value (up to float64 rounding, far inside the spare margin), and
    # close to it: a loose threshold would leave confident pixels undecided.
    assert got >= float(exact) - 1e-12 * (1.0 + abs(lower_gap))
    assert got - float(exact) <= 1e-5 + 1e-12 * abs(lower_gap)


def _adversarial(logits: torch.Tensor, seed: int, scale: float, step, reach: float):
    """Logits drawn from the fit data, scaled, shifted beyond the table by up to `reach`, and
    optionally rounded to `step` plus nudges of a few float32 ulps (exact and near ties)."""
    generator = torch.Generator().manual_seed(seed)
    sample = logits[torch.randint(0, logits.shape[0], (400,), generator=generator)]
    sample = sample * scale + torch.randn(sample.shape, generator=generator)
    sample += reach * (2 * torch.rand(sample.shape[0], 1, generator=generator) - 1)
    if step is not None:
        sample = torch.round(sample / step) * step
        nudge = torch.randint(-2, 3, sample.shape, generator=generator).float()
        sample = sample + nudge * 1e-7 * (1.0 + sample.abs())
    return sample.contiguous()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1.0, 6.0, 60.0]),
    step=st.sampled_from([None, 0.25, 1.0]),
    reach=st.sampled_from([0.0, 30.0]),
    taus=st.sampled_from(
        [
            [1.0],
            [0.1, 0.5, 1.0],
            [0.05, 0.3, 2.0, 5.0],
            [0.0, 0.2, 1.0],
            # evenly spaced (step 3 chains each term from one tau to the next), and nearly so
            [0.1 * index for index in range(1, 11)],
            [0.5, 1.0],
            [0.2, 0.4, 0.6 + 1e-9],
        ]
    ),
)
def test_certified_predictions_are_the_full_computation(fitted, seed, scale, step, reach, taus):
    calibrator, logits = fitted
    sample = _adversarial(logits, seed, scale, step, reach)
    kernel = calibrator.kernel_tensors()
    certified = certified_predictions(sample, taus, calibrator.certify_tables())
    complete = predict_taus(sample, kernel, calibrator.certify_tables(), taus)
    for index, tau in enumerate(taus):
        full = full_prediction(sample, kernel, tau, block=333)
        decided = certified[index] != UNDECIDED
        assert torch.equal(certified[index][decided], full[decided])
        assert torch.equal(complete[index], full)
        if tau > 0:
            assert torch.equal(calibrator.predict(sample, tau), full)
            assert torch.equal(calibrator.log_scores(sample, tau).argmax(1), full)


@pytest.mark.parametrize("gap", [550.0, 650.0, 720.0])
def test_huge_gaps_between_weak_terms_stay_exact(fitted, gap):
    """One or two classes raised by about 600 to 700 over the rest: the rescaled sums of step
    2 (their fallback beyond a gap of 600) and the clamps of fast_exp near exp(700)."""
    calibrator, logits = fitted
    generator = torch.Generator().manual_seed(int(gap))
    sample = logits[:600].clone()
    rows = torch.arange(600)
    first = torch.randint(0, sample.shape[1], (600,), generator=generator)
    second = (first + 1) % sample.shape[1]
    sample[rows, first] += gap
    pair = rows % 3 == 0  # a near tie at the top, far above the others
    sample[rows[pair], second[pair]] += gap + torch.randn(int(pair.sum()), generator=generator)
    sample = sample.contiguous()
    kernel, tables = calibrator.kernel_tensors(), calibrator.certify_tables()
    taus = [0.1, 0.5, 1.0]
    certified = certified_predictions(sample, taus, tables)
    for index, tau in enumerate(taus):
        full = full_prediction(sample, kernel, tau)
        decided = certified[index] != UNDECIDED
        assert torch.equal(certified[index][decided], full[decided])
        assert torch.equal(calibrator.predict(sample, tau), full)


def test_sweep_confusion_is_the_full_computation_for_every_tau(fitted):
    calibrator, logits = fitted
    C = calibrator.num_classes
    sample = _adversarial(logits, seed=3, scale=1.5, step=0.5, reach=5.0)
    labels = torch.arange(sample.shape[0]) % C
    taus = [0.1 * index for index in range(11)]
    sweep = TauSweep(calibrator, taus, block=256)
    sweep.update(sample, labels)
    for tau in taus:
        if tau == 0:
            prediction = np.argmax(sample.numpy(), 1)
        else:
            prediction = full_prediction(sample, calibrator.kernel_tensors(), tau).numpy()
        expected = np.zeros((C, C), dtype=np.int64)
        np.add.at(expected, (labels.numpy(), prediction), 1)
        assert np.array_equal(sweep.confusion_at(tau).numpy(), expected)


def test_one_certificate_decides_most_pixels_for_a_whole_sweep(fitted):
    calibrator, logits = fitted
    taus = [0.1 * index for index in range(1, 11)]
    certified = certified_predictions(logits[:3000], taus, calibrator.certify_tables())
    decided = certified != UNDECIDED
    assert decided.float().mean() > 0.995  # the share left to the full computation is tiny
    for index, tau in enumerate(taus):
        full = full_prediction(logits[:3000], calibrator.kernel_tensors(), tau)
        assert torch.equal(certified[index][decided[index]], full[decided[index]])


@pytest.mark.parametrize("task_rows", [1000, 1 << 15])
@pytest.mark.parametrize("dtype", [torch.int64, prediction_dtype(19)])
def test_threads_give_the_full_computation_too(fitted, task_rows, dtype):
    """Two threads taking tasks in turn (nine of 1000 rows, the last partial, or one per
    thread), into a new int64 tensor or the caller's tensor of either type."""
    calibrator, logits = fitted
    sample = (logits[:9000] * 1.3).contiguous()
    taus, kernel, tables = [0.2, 1.0], calibrator.kernel_tensors(), calibrator.certify_tables()
    out = torch.full((len(taus), 9000), 99, dtype=dtype)
    two = predict_taus(sample, kernel, tables, taus, threads=2, out=out, task_rows=task_rows)
    assert two is out
    for index, tau in enumerate(taus):
        assert torch.equal(two[index].long(), full_prediction(sample, kernel, tau))


def test_certificates_of_some_rows_leave_the_others_alone(fitted):
    calibrator, logits = fitted
    sample, tables, taus = logits[:700], calibrator.certify_tables(), [0.5, 1.0]
    out = torch.full((2, 700), 99, dtype=prediction_dtype(19))
    certified_predictions(sample, taus, tables, out, slice(123, 456))
    assert torch.equal(out[:, 123:456], certified_predictions(sample[123:456], taus, tables))
    assert (out[:, :123] == 99).all() and (out[:, 456:] == 99).all()
    with pytest.raises(BLDAError, match="rows: expected a slice of step 1"):
        certified_predictions(sample, taus, tables, out, slice(0, 700, 2))


def test_full_predictions_of_chosen_entries_are_the_block_computation(fitted):
    """`full_predictions` at several taus, only the `wanted` entries, in blocks of 37 pixels:
    each the argmax of the calibrator's own block computation (`log_scores`), the rest left
    UNDECIDED."""
    calibrator, logits = fitted
    sample = (logits[:200] * 1.7).contiguous()
    taus = [0.1, 1.0, 3.0]
    wanted = torch.rand(len(taus), 200, generator=torch.Generator().manual_seed(3)) < 0.3
    wanted[1] = False  # a tau with nothing wanted
    got = full_predictions(sample, calibrator.kernel_tensors(), taus, wanted, block=37)
    for index, tau in enumerate(taus):
        expected = calibrator.log_scores(sample, tau).argmax(1)
        assert torch.equal(got[index][wanted[index]], expected[wanted[index]])
        assert (got[index][~wanted[index]] == UNDECIDED).all()


def test_bad_logits_raise_clear_errors(fitted):
    calibrator, logits = fitted
    with pytest.raises(BLDAError, match="logits: expected a contiguous"):
        certified_predictions(logits[:10].double(), [1.0], calibrator.certify_tables())
    bad = logits[:10].clone()
    bad[3, 0] = math.nan
    with pytest.raises(BLDAError, match="logits: contain NaN"):
        TauSweep(calibrator, [1.0]).update(bad, torch.zeros(10, dtype=torch.int64))


def _check_sweep_counts(logits, labels, predictions, taus, log_prior):
    """count_sweep's cells against numpy's argmax at every tau, both methods."""
    num_classes = logits.shape[1]
    cells = np.zeros((2, len(taus), num_classes, num_classes), dtype=np.int64)
    count_sweep(logits, labels, predictions, taus, log_prior, cells)
    for position, tau in enumerate(taus):
        # float64 as the baseline is defined; argmax takes the first index on ties
        adjusted = logits.astype(np.float64) - tau * log_prior if tau else logits
        prior_prediction = np.argmax(adjusted, 1)
        blda = np.argmax(logits, 1) if position == 0 else predictions[position - 1]
        for method, prediction in enumerate((blda, prior_prediction)):
            expected = np.zeros((num_classes, num_classes), dtype=np.int64)
            np.add.at(expected, (labels, prediction), 1)
            assert np.array_equal(cells[method, position], expected)


# Row counts: tiny, one block exactly, and blocks with a partial last one (COUNT_BLOCK = 512).
SWEEP_SHAPES = [(1, 2), (500, 4), (512, 19), (1100, 7)]


@pytest.mark.parametrize(("rows", "num_classes"), SWEEP_SHAPES)
def test_sweep_counts_match_numpy_with_ties_and_an_unseen_class(rows, num_classes):
    generator = np.random.default_rng(5)
    logits = generator.normal(size=(rows, num_classes))
    logits = np.round(logits, 1).astype(np.float32)  # many exact ties
    labels = generator.integers(0, num_classes, rows)
    prior = np.linspace(2.0, 1.0, num_classes)
    prior[-1] = 0.0  # the last class never seen: log 0 = -inf, it wins wherever tau > 0
    with np.errstate(divide="ignore"):
        log_prior = np.log(prior / prior.sum())
    predictions = generator.integers(0, num_classes, (2, rows))
    _check_sweep_counts(logits, labels, predictions, np.array([0.0, 0.5, 2.0]), log_prior)


@pytest.mark.parametrize("prior_step", [0.5, 2.0])  # about half / nearly all pixels change
@pytest.mark.parametrize(("rows", "num_classes"), SWEEP_SHAPES)
def test_sweep_counts_with_ties_at_taus_inside_the_sweep(rows, num_classes, prior_step):
    """Quarters for logits and taus, halves for the log prior: every score is exact, so two
    classes tie exactly wherever their lines cross at one of the taus, and the baseline's
    shortcut for pixels with the same winner at both ends must leave every such pixel to the
    per-tau argmax."""
    generator = np.random.default_rng(6)
    logits = (np.round(generator.normal(size=(rows, num_classes)) * 4) / 4).astype(np.float32)
    labels = generator.integers(0, num_classes, rows)
    taus = np.arange(9) * 0.25
    log_prior = -prior_step * generator.integers(1, 6, num_classes)
    predictions = generator.integers(0, num_classes, (len(taus) - 1, rows)).astype(np.int16)
    _check_sweep_counts(logits, labels, predictions, taus, log_prior)
    scores = logits.astype(np.float64)[None] - taus[1:-1, None, None] * log_prior  # (T, n, C)
    best = scores.max(2, keepdims=True)
    tied_inside = ((scores == best).sum(2) > 1).any(0)
    assert rows < 500 or tied_inside.sum() >= 20
    # and pixels whose winner changes inside the sweep, away from its ends
    winners = np.argmax(scores, 2)
    assert rows < 500 or (winners != winners[:1]).any(0).mean() > 0.05


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 1200),
    num_classes=st.integers(2, 8),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    top=st.sampled_from([0.3, 1.0, 4.0]),
    count=st.integers(2, 12),
    seed=st.integers(0, 2**16),
)
def test_sweep_counts_match_numpy_on_any_finite_prior(rows, num_classes, scale, top, count, seed):
    """Random logits at any scale (close leads included), any finite log prior, any sorted
    taus from 0: the same counts as numpy's argmax at every tau."""
    generator = np.random.default_rng(seed)
    logits = (generator.normal(size=(rows, num_classes)) * scale).astype(np.float32)
    labels = generator.integers(0, num_classes, rows)
    log_prior = np.log(generator.dirichlet(np.ones(num_classes)) + 1e-6)
    taus = np.concatenate([[0.0], np.sort(generator.uniform(0.0, top, count - 1))])
    predictions = generator.integers(0, num_classes, (count - 1, rows)).astype(np.int16)
    _check_sweep_counts(logits, labels, predictions, taus, log_prior)


@numba.njit
def _step_three(values, winners, kept, tables, tau, margin):
    """Step 3 on pixels `values` ``(n, C)`` as one block: each pixel an undecided entry with
    its `winners` and its `kept` ``(C, n)`` classes. Returns (decisions, first pairs)."""
    count, num_classes = values.shape
    by_column, points = tables[1], (tables[2].shape[0] - 1) // num_classes
    logit = np.ascontiguousarray(values.T)
    rows = np.empty((num_classes, count), np.uint64)
    fractions = np.empty((num_classes, count), np.float32)
    outside = False
    for c in range(num_classes):
        for j in range(count):
            row, fractions[c, j], beyond = grid_cell(logit[c, j], c, by_column, points)
            rows[c, j] = np.uint64(row)
            outside |= beyond != 0.0
    work = pair_work(num_classes, count, 1)
    work[0][:], work[1][:] = np.arange(count), np.arange(count)
    pairs = candidate_pairs(count, winners, kept, np.arange(count), work)
    pair_gaps(pairs, logit, (rows, fractions), tables, outside, work)
    pair_sums(pairs, np.array([tau]), 0, 0, work)
    decisions = np.array([pair_winner(j, 0, margin, work) for j in range(count)])
    return decisions, work[2][: count + 1].copy(), work[8][0, :pairs].copy()


@pytest.mark.parametrize("kept_count", [0, 1, 7, 8, 9, 18, -1])
def test_step_three_scores_any_number_of_candidates(fitted, kept_count):
    """Step 3 alone on 200 pixels, each with 1 to 19 candidates (-1: a random number per pixel),
    some logits beyond the table, against the Eq. 7 sums T_c = sum_l exp(f[l] - f[c] +
    tau (Delta_cl(f[l]) - Delta_cc(f[c]))) in float64 with numpy's exp, from the offsets of
    `gather_offsets`: the candidate with the smallest sum when it leads by more than
    e^(3 margin), else UNDECIDED."""
    calibrator, logits = fitted
    num_classes = logits.shape[1]
    if kept_count >= num_classes:
        pytest.skip("fewer classes than candidates")
    tau = 0.7
    tables = tuple(calibrator.certify_tables())
    sample = logits[:200].clone()
    low, high = tables[1][0], tables[1][2]
    sample[::17, 0] = float(high[0]) + 2.5  # beyond the table, both sides
    sample[5::23, -1] = float(low[-1]) - 1.5
    offsets = gather_offsets(sample, *calibrator.kernel_tensors()).double().numpy()
    values = sample.numpy()
    generator = np.random.default_rng(kept_count + 2)
    winners = np.empty(len(values), np.int64)
    kept = np.zeros((num_classes, len(values)), np.bool_)
    for pixel in range(len(values)):
        order = generator.permutation(num_classes)
        size = kept_count if kept_count >= 0 else generator.integers(0, num_classes)
        winners[pixel] = order[0]
        kept[order[1 : 1 + size], pixel] = True
    truth = []  # (candidates, numpy's sums, lead of the best over the runner-up)
    for pixel in range(len(values)):
        candidates = [int(winners[pixel]), *np.flatnonzero(kept[:, pixel]).tolist()]
        f = values[pixel].astype(np.float64)
        own = np.array([offsets[pixel, c, c] for c in candidates])
        exponents = (f[:, None] - f[candidates][None, :]) + tau * (
            offsets[pixel][:, candidates] - own[None, :]
        )
        totals = np.exp(exponents).sum(0)
        best = int(np.argmin(totals))
        lead = np.min(np.delete(totals, best)) / totals[best] if len(totals) > 1 else math.inf
        truth.append((candidates, totals, lead))
    leads = [lead for *_, lead in truth if lead < math.inf]
    # a margin that leaves about one pixel in six within it, so that it is exercised
    margin = math.log(np.quantile(leads, 0.15)) / 3 if leads else 1e-6
    got, first, sums = _step_three(values, winners, kept, tables, tau, margin)
    assert np.array_equal(np.diff(first), kept.sum(0) + 1)
    decided, within = 0, 0
    for pixel, (candidates, totals, lead) in enumerate(truth):
        # the offsets agree to a float32 rounding (torch may fuse the multiply-add)
        np.testing.assert_allclose(sums[first[pixel] : first[pixel + 1]], totals, rtol=1e-5)
        if abs(lead - math.exp(3 * margin)) < 1e-5:
            continue  # too close to the decision threshold for float32 offsets
        expected = candidates[int(np.argmin(totals))] if lead > math.exp(3 * margin) else UNDECIDED
        assert got[pixel] == expected, (pixel, candidates, totals)
        decided += got[pixel] != UNDECIDED
        within += lead <= math.exp(3 * margin)
    assert decided >= 100 and (within >= 10 or kept_count == 0)


@numba.njit
def _sums_and_decisions(work, pairs, entries, taus, margin):
    """`pair_sums` over all of `taus`, then `pair_winner` of every entry at every tau."""
    pair_sums(pairs, taus, 0, taus.shape[0] - 1, work)
    decisions = np.empty((taus.shape[0], entries), np.int64)
    for position in range(taus.shape[0]):
        for entry in range(entries):
            decisions[position, entry] = pair_winner(entry, position, margin, work)
    return decisions


@pytest.mark.parametrize("even", [True, False])
def test_step_three_sums_over_a_range_of_taus(even):
    """`pair_sums` on hand-made gaps for 40 pixels x 3 candidates against numpy's exp at each
    tau: evenly spaced taus chain each term from tau to tau, others take one exponential per
    tau. Pixel 0 has a term crossing exp(-600) within the range, pixel 1 one above exp(600),
    pixel 2's first candidate only terms below exp(-600) besides its own: chained, the first
    two are left undecided and the third's dropped terms change nothing; one exponential per
    tau scores all three (fast_exp is exact to exp(700))."""
    num_classes, entries, per_pixel = 6, 40, 3
    pairs = entries * per_pixel
    taus = np.round(np.arange(1, 11) * 0.1, 12)
    if not even:
        taus[4] += 0.013
    work = pair_work(num_classes, entries, len(taus))
    work[2][: entries + 1] = np.arange(entries + 1) * per_pixel  # each pixel's first pair
    work[4][:pairs] = np.tile(np.arange(per_pixel, dtype=np.uint64), entries)
    generator = np.random.default_rng(5)
    logit_gaps = generator.normal(-2.0, 2.0, (num_classes, pairs))
    offset_gaps = generator.normal(0.0, 1.5, (num_classes, pairs))
    logit_gaps[0], offset_gaps[0] = 0.0, 0.0  # the own term, exp(0)
    logit_gaps[1, 0], offset_gaps[1, 0] = -640.0, 60.0  # -634 at tau 0.1, -580 at 1
    logit_gaps[2, 3], offset_gaps[2, 3] = 605.0, 0.0
    logit_gaps[1:, 6], offset_gaps[1:, 6] = -700.0, 10.0  # at most -690: pixel 2 wins with it
    work[6][:, :pairs], work[7][:, :pairs] = logit_gaps, offset_gaps
    margin = 1e-3
    decisions = _sums_and_decisions(work, pairs, entries, taus, margin)
    exponents = logit_gaps[None] + taus[:, None, None] * offset_gaps[None]  # (T, C, P)
    expected = np.exp(exponents).sum(1)
    got = work[8][: len(taus), :pairs]
    usable = np.ones(pairs, bool)
    usable[0] = usable[3] = not even  # chained: the unsure term and the one beyond exp(600)
    np.testing.assert_allclose(got[:, usable], expected[:, usable], rtol=1e-11)
    for position in range(len(taus)):
        for entry in range(entries):
            sums = expected[position, entry * per_pixel : (entry + 1) * per_pixel]
            best = int(np.argmin(sums))
            lead = np.min(np.delete(sums, best)) / sums[best]
            undecided = lead <= math.exp(3 * margin) or (entry in (0, 1) and even)
            assert decisions[position, entry] == (UNDECIDED if undecided else best)
    assert (decisions[:, 2] != UNDECIDED).all() and (decisions[:, 3:] != UNDECIDED).mean() > 0.9
