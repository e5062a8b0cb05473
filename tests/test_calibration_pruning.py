"""Exact pruning of Eq. 7: the certificate's offset bounds enclose every offset, pruned
predictions and sweep confusions equal the full computation (ties, unadjusted cells, loaded
calibrators included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_calibration import _confusion_numpy

from blda_tools.calibration import calibrator as calibration
from blda_tools.calibration.calibrator import Calibrator
from blda_tools.calibration.eq7.certify import UNDECIDED, certified_predictions, offset_bounds_rows
from blda_tools.calibration.eq7.kernel import gather_offsets
from blda_tools.calibration.sweep import TauSweep
from blda_tools.statistics import LogitGrid, LogitSetStatistics


@pytest.fixture(scope="module")
def five_class_calibrator():
    """Five classes with a rare one, so that some off-diagonal cells stay unadjusted."""
    generator = torch.Generator().manual_seed(7)
    labels = torch.multinomial(
        torch.tensor([0.4, 0.3, 0.2, 0.098, 0.002]), 40_000, True, generator=generator
    )
    logits = torch.randn(40_000, 5, generator=generator) * torch.tensor([1.0, 1.4, 0.8, 2.0, 1.2])
    logits += 3.0 * torch.nn.functional.one_hot(labels, 5) + torch.tensor([1.0, 0.5, 0, -0.5, -1])
    statistics = LogitSetStatistics(5, LogitGrid(-20, 20, 800), class_names=list("abcde"))
    statistics.update(logits, labels)
    calibrator = Calibrator(n_components=2, min_samples=150, table_points=512).fit(statistics)
    assert calibrator.unadjusted_cells_ and not bool((~calibrator.adjusted_).all())
    return calibrator, logits


def _interpolated_offsets(calibrator: Calibrator, logits: np.ndarray) -> np.ndarray:
    """Delta_cl(f[l]) ``(n, C_c, C_l)`` in float64 with np.interp (z' constant beyond the table)."""
    low, high = calibrator.table_low_.double().numpy(), calibrator.table_high_.double().numpy()
    offsets = calibrator.offsets_.double().numpy()
    count, num_classes = logits.shape
    result = np.zeros((count, num_classes, num_classes))
    for l in range(num_classes):  # noqa: E741 - the paper's cell index
        grid = np.linspace(low[l], high[l], calibrator.table_points)
        for c in range(num_classes):
            if calibrator.adjusted_[c, l]:
                aligned = np.interp(logits[:, l], grid, grid + offsets[c, l])
                result[:, c, l] = aligned - logits[:, l]
    return result


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), reach=st.sampled_from([0.0, 5.0, 40.0]))
def test_offset_bounds_enclose_every_off_diagonal_offset(five_class_calibrator, seed, reach):
    calibrator, _ = five_class_calibrator
    low, high = calibrator.table_low_, calibrator.table_high_
    generator = torch.Generator().manual_seed(seed)
    # Uniform over each column's table, widened by `reach` on both sides (extrapolation).
    logits = low - reach + torch.rand(400, 5, generator=generator) * (high - low + 2 * reach)
    own, lowest, highest = offset_bounds_rows(logits.numpy(), tuple(calibrator.certify_tables()))
    truth = _interpolated_offsets(calibrator, logits.double().numpy())
    tolerance = 1e-4 * (1.0 + np.abs(truth))
    for c in range(5):
        np.testing.assert_allclose(own[:, c], truth[:, c, c], atol=1e-4, rtol=1e-5)
        for l in range(5):  # noqa: E741 - the paper's cell index
            if l != c:
                assert (lowest[:, l] <= truth[:, c, l] + tolerance[:, c, l]).all()
                assert (truth[:, c, l] <= highest[:, l] + tolerance[:, c, l]).all()
    # The bounds are tight where every off-diagonal cell of a column is adjusted and equal:
    # at least they must not be vacuous.
    assert np.isfinite(lowest).all() and np.isfinite(highest).all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1.0, 6.0, 60.0]),
    step=st.sampled_from([None, 0.25]),
    tau=st.sampled_from([0.0, 0.1, 1.0, 5.0]),
)
def test_pruned_prediction_is_exactly_the_full_computation(
    five_class_calibrator, seed, scale, step, tau
):
    calibrator, logits = five_class_calibrator
    generator = torch.Generator().manual_seed(seed)
    sample = logits[torch.randint(0, logits.shape[0], (600,), generator=generator)]
    sample = sample * scale + torch.randn(600, 5, generator=generator)
    if step is not None:  # coarse values: many exact and near ties
        sample = torch.round(sample / step) * step
    got = calibrator.predict(sample, tau)
    if tau == 0.0:
        assert np.array_equal(got.numpy(), np.argmax(sample.numpy(), 1))
    else:
        assert torch.equal(got, calibrator.log_scores(sample, tau).argmax(1))
        kernel = calibrator.kernel_tensors()
        assert torch.equal(got, calibration.full_prediction(sample, kernel, tau, block=257))


def test_pruning_keeps_exact_ties_at_the_lowest_index():
    # No cell adjusted: Eq. 7 is the softmax of f, and small integer logits give many exact ties.
    statistics = LogitSetStatistics(5, LogitGrid(-5, 5, 100), class_names=list("abcde"))
    statistics.update(
        torch.randn(50, 5, generator=torch.Generator().manual_seed(1)), torch.arange(50) % 5
    )
    calibrator = Calibrator("empirical", min_samples=1000).fit(statistics)
    sample = torch.randint(0, 3, (2000, 5), generator=torch.Generator().manual_seed(2)).float()
    scores = calibrator.log_scores(sample, 1.0).numpy()
    top = np.sort(scores, 1)
    assert (top[:, -1] == top[:, -2]).sum() > 500  # the case really has many exact ties
    got = calibrator.predict(sample, 1.0).numpy()
    # numpy's argmax takes the first maximum. (The float32 sums are not symmetric in the
    # classes, so a tie of f is not always an exact tie of the scores: compare with the scores.)
    assert np.array_equal(got, np.argmax(scores, 1))
    # Near ties within float32 rounding: only the rounding margin keeps these exact (without
    # it ~1% of these pixels are decided differently from the full computation).
    nudge = torch.randint(-2, 3, (2000, 5), generator=torch.Generator().manual_seed(3)) * 1e-7
    near = sample + nudge
    assert np.array_equal(
        calibrator.predict(near, 1.0).numpy(),
        np.argmax(calibrator.log_scores(near, 1.0).numpy(), 1),
    )


def test_bounds_decide_most_pixels_of_a_calibrated_model(five_class_calibrator):
    calibrator, logits = five_class_calibrator
    # At a single tau the exact float64 scores of the candidates (step 4) leave only ties and
    # overflows to the full computation.
    for tau, least in ((0.1, 0.995), (1.0, 0.995)):
        prediction = certified_predictions(logits[:5000], [tau], calibrator.certify_tables())[0]
        decided = prediction != UNDECIDED
        assert decided.float().mean() > least
        full = calibrator.log_scores(logits[:5000], tau).argmax(1)
        assert torch.equal(prediction[decided], full[decided])


def test_sweep_confusion_matches_the_full_computation(five_class_calibrator):
    calibrator, logits = five_class_calibrator
    sample, labels = logits[:6000] * 1.3, torch.arange(6000) % 5
    sweep = TauSweep(calibrator, [0.1, 1.0, 5.0], block=1000)
    sweep.update(sample, labels)
    log_prior = np.log(calibrator.class_prior_.numpy())
    for tau in (0.0, 0.1, 1.0, 5.0):
        full = calibrator.log_scores(sample, tau).argmax(1).numpy() if tau else sample.argmax(1)
        expected = _confusion_numpy(labels.numpy(), np.asarray(full), 5)
        assert np.array_equal(sweep.confusion_at(tau, "blda").numpy(), expected)
        prior = np.argmax(sample.numpy() - tau * log_prior, 1)
        expected = _confusion_numpy(labels.numpy(), prior, 5)
        assert np.array_equal(sweep.confusion_at(tau, "prior").numpy(), expected)


def test_pruning_keeps_an_unadjusted_class_far_beyond_the_table(five_class_calibrator):
    # Class e is rare, so its whole row of cells is unadjusted (Delta = 0): its score is plain
    # f[e] - logsumexp(f), while every other class's sum holds f[e] + tau Delta_ce(f[e]), far
    # above the others beyond the table (slope -1 there). The certificate's sums then span more
    # than exp(700) (a case found by hypothesis): e must stay a candidate.
    calibrator, _ = five_class_calibrator
    assert not bool(calibrator.adjusted_[4].any())
    pixel = torch.tensor([[100.475, -118.793, -47.962, 2.9348, -228.862]])
    full = calibration.full_prediction(pixel, calibrator.kernel_tensors(), 5.0)
    assert int(full) == 4  # the unadjusted class wins
    assert torch.equal(calibrator.predict(pixel, 5.0), full)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), reach=st.sampled_from([0.0, 5.0, 40.0]))
def test_loaded_own_offsets_are_those_of_the_full_computation(five_class_calibrator, seed, reach):
    """Delta_cc(f[c]) as the certificate loads it is the full computation's (`gather_offsets`)
    up to one float32 rounding, inside and beyond the table: the same grid cell and fraction
    (a neighbouring cell or another fraction would be off by up to a table increment, ~1e-2
    here). Not bit for bit: torch's addcmul may fuse the multiply-add, numba does not; the
    certificate's margin covers that rounding (`eq7.certify`)."""
    calibrator, _ = five_class_calibrator
    low, high = calibrator.table_low_, calibrator.table_high_
    generator = torch.Generator().manual_seed(seed)
    logits = low - reach + torch.rand(333, 5, generator=generator) * (high - low + 2 * reach)
    logits = logits.contiguous()
    own, _, _ = offset_bounds_rows(logits.numpy(), tuple(calibrator.certify_tables()))
    full = torch.diagonal(gather_offsets(logits, *calibrator.kernel_tensors()), 0, 1, 2).numpy()
    one_rounding = np.spacing(np.float32(np.abs(full).max() + 1.0))
    assert np.abs(own - full).max() <= one_rounding
