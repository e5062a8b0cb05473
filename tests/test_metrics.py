"""Metrics and bias measures against independent truths: cityscapesscripts, scipy, hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import integrate, special, stats
from scipy.spatial.distance import jensenshannon

from blda_tools.errors import BLDAError
from blda_tools.statistics import LogitGrid, LogitSetStatistics
from blda_tools.statistics.metrics import (
    SegmentationMetrics,
    anchor_divergences,
    bias_from_confusion,
    bias_from_histograms,
    js_divergence,
    prediction_groups,
    prediction_probabilities_from_histograms,
    spearman,
)


# ------------------------------------------------------------------ Cityscapes evaluator
def test_iou_and_miou_match_the_official_cityscapes_evaluator(tmp_path, monkeypatch):
    evaluator = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import labels as cityscapes_labels

    train_to_id = {lab.trainId: lab.id for lab in cityscapes_labels if lab.trainId not in (255, -1)}
    id_to_train = np.full(256, 255, dtype=np.int64)
    for train_id, label_id in train_to_id.items():
        id_to_train[label_id] = train_id
    rng = np.random.default_rng(0)
    confusion = np.zeros((19, 19), dtype=np.int64)
    # The evaluator is driven through its module-level options object, as its CLI does.
    args = evaluator.args
    for option, value in (
        ("evalInstLevelScore", False),
        ("evalPixelAccuracy", False),
        ("quiet", True),
    ):
        monkeypatch.setattr(args, option, value)
    monkeypatch.setattr(args, "evalLabels", [])
    matrix = evaluator.generateMatrix(args)
    for image in range(3):
        # Classes 16 (train) never appear; 17 (motorcycle) is only ever predicted.
        truth = rng.integers(0, 16, size=(30, 40))
        truth_ids = np.vectorize(train_to_id.get)(truth)
        truth_ids[rng.random(truth.shape) < 0.1] = 0  # "unlabeled": ignored in evaluation
        prediction = np.where(
            rng.random(truth.shape) < 0.6, truth, rng.integers(0, 16, truth.shape)
        )
        prediction[rng.random(truth.shape) < 0.02] = 17
        prediction_ids = np.vectorize(train_to_id.get)(prediction)
        gt_path, prediction_path = tmp_path / f"gt{image}.png", tmp_path / f"pred{image}.png"
        Image.fromarray(truth_ids.astype(np.uint8)).save(gt_path)
        Image.fromarray(prediction_ids.astype(np.uint8)).save(prediction_path)
        evaluator.evaluatePair(str(prediction_path), str(gt_path), matrix, None, {}, args)
        truth_train = id_to_train[truth_ids]
        kept = truth_train != 255
        np.add.at(confusion, (truth_train[kept], prediction[kept]), 1)

    metrics = SegmentationMetrics.from_confusion(torch.from_numpy(confusion))
    official = {
        train_id: evaluator.getIouScoreForLabel(label_id, matrix, args)
        for train_id, label_id in train_to_id.items()
    }
    for train_id, score in official.items():
        if math.isnan(score):
            assert math.isnan(metrics.iou[train_id])
        else:
            assert metrics.iou[train_id] == pytest.approx(score, abs=1e-6)
    names = {str(train_id): score for train_id, score in official.items()}
    assert metrics.miou == pytest.approx(evaluator.getScoreAverage(names, args), abs=1e-6)
    assert metrics.excluded == (16, 18)
    assert metrics.iou[17] == 0.0 and math.isnan(metrics.acc[17])


def test_accuracy_and_population_std_on_a_hand_worked_confusion():
    # rows = truth: class 0 has 4 pixels (3 right), class 1 has 2 (1 right), class 2 none.
    confusion = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    metrics = SegmentationMetrics.from_confusion(confusion)
    # IoU: 3 / (4 + 4 - 3) = 0.6 and 1 / (2 + 2 - 1) = 1/3; acc: 0.75 and 0.5.
    assert metrics.iou[:2] == pytest.approx((0.6, 1 / 3))
    assert metrics.acc[:2] == pytest.approx((0.75, 0.5))
    assert metrics.miou == pytest.approx((0.6 + 1 / 3) / 2)
    assert metrics.iou_std == pytest.approx((0.6 - 1 / 3) / 2)  # ddof = 0 on two values
    assert metrics.acc_std == pytest.approx(0.125)
    assert metrics.excluded == (2,) and metrics.class_pixels == (4, 2, 0)


# ------------------------------------------------------------------ Eq. 4
def test_bias_eq4_on_a_hand_worked_confusion():
    confusion = torch.tensor([[6, 3, 1], [2, 2, 0], [0, 1, 4]])
    # P(k | c) rows: [0.6, 0.3, 0.1], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8]
    # column means: 1.1/3, 1.0/3, 0.9/3; minus 1/3 -> 0.1/3, 0, -0.1/3
    expected = np.array([0.1 / 3, 0.0, -0.1 / 3])
    np.testing.assert_allclose(bias_from_confusion(confusion), expected, rtol=1e-12, atol=1e-15)


def test_bias_eq4_averages_over_present_rows_only():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    # Present rows 0 and 2: P = [0.75, 0.25, 0] and [0.25, 0.25, 0.5]; mean [0.5, 0.25, 0.25].
    expected = np.array([0.5, 0.25, 0.25]) - 1 / 3
    bias = bias_from_confusion(confusion)
    np.testing.assert_allclose(bias, expected, rtol=1e-12, atol=1e-15)
    assert float(bias.sum()) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(BLDAError, match="every row is empty"):
        bias_from_confusion(torch.zeros(3, 3))


# ------------------------------------------------------------------ Eq. 5
MEANS = np.array(
    [[2.0, 0.0, -1.0, 0.5], [0.5, 1.5, -0.5, 0.0], [0.0, 0.0, 1.0, 0.5], [1.0, 0.0, 0.0, 0.8]]
)
STDS = np.array([1.0, 1.5, 0.7, 2.0])  # per logit class k


def exact_prediction_probability(c: int, k: int) -> float:
    """P(argmax = k | y = c) for independent Gaussian logits, by adaptive quadrature."""

    def integrand(z):
        others = [stats.norm.cdf(z, MEANS[c, y], STDS[y]) for y in range(4) if y != k]
        return stats.norm.pdf(z, MEANS[c, k], STDS[k]) * np.prod(others)

    return integrate.quad(integrand, -40, 40, limit=200)[0]


@pytest.fixture(scope="module")
def exact_probabilities():
    return np.array([[exact_prediction_probability(c, k) for k in range(4)] for c in range(4)])


# Eq. 5 and the JS divergences run in blocks of rows bounded in bytes; one row per block must
# give the same truth.
ROW_BLOCKS = pytest.mark.parametrize("block_bytes", [None, 1], ids=["default-blocks", "row-by-row"])


@pytest.fixture
def eq5_blocks(monkeypatch, block_bytes):
    if block_bytes is not None:
        import blda_tools.statistics.metrics as metrics

        monkeypatch.setattr(metrics, "TEMPORARY_BYTES", block_bytes)


@ROW_BLOCKS
def test_eq5_with_exact_bin_masses(exact_probabilities, eq5_blocks):
    grid = LogitGrid(-20.0, 20.0, 800)
    edges = grid.edges
    masses = np.stack(
        [[np.diff(stats.norm.cdf(edges, MEANS[c, k], STDS[k])) for k in range(4)] for c in range(4)]
    )
    estimated = prediction_probabilities_from_histograms(torch.from_numpy(masses))
    np.testing.assert_allclose(estimated, exact_probabilities, atol=1e-3)
    exact_bias = exact_probabilities.mean(0) - 0.25
    np.testing.assert_allclose(bias_from_histograms(masses), exact_bias, atol=1e-3)


@ROW_BLOCKS
def test_eq5_from_sampled_logits_within_001(exact_probabilities, eq5_blocks):
    generator = torch.Generator().manual_seed(0)
    statistics = LogitSetStatistics(4)
    for c in range(4):
        samples = torch.randn(40_000, 4, generator=generator, dtype=torch.float64)
        logits = samples * torch.from_numpy(STDS) + torch.from_numpy(MEANS[c])
        statistics.update(logits.float(), torch.full((40_000,), c))
    exact_bias = exact_probabilities.mean(0) - 0.25
    estimated = bias_from_histograms(statistics.histogram)
    np.testing.assert_allclose(estimated, exact_bias, atol=0.01)
    np.testing.assert_allclose(
        prediction_probabilities_from_histograms(statistics.histogram),
        exact_probabilities,
        atol=0.01,
    )
    # The confusion of the same samples measures Eq. 4 directly.
    np.testing.assert_allclose(bias_from_confusion(statistics.confusion), exact_bias, atol=0.01)


def test_eq5_rows_without_pixels_are_left_out():
    histogram = torch.zeros(3, 3, 4)
    histogram[0, 0] = torch.tensor([0, 0, 0, 1.0])  # class 0 always wins in row 0
    histogram[0, 1] = torch.tensor([1.0, 0, 0, 0])
    histogram[0, 2] = torch.tensor([1.0, 0, 0, 0])
    probabilities = prediction_probabilities_from_histograms(histogram)
    np.testing.assert_allclose(probabilities[0], [1.0, 0, 0], rtol=1e-12, atol=1e-15)
    assert np.isnan(probabilities[1:]).all()
    expected = np.array([1.0, 0, 0]) - 1 / 3
    np.testing.assert_allclose(bias_from_histograms(histogram), expected, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ Spearman
@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.floats(-10, 10)), min_size=3, max_size=25))
def test_spearman_matches_scipy(pairs):
    first = np.array([a for a, _ in pairs], dtype=float)
    second = np.array([b for _, b in pairs], dtype=float)
    expected = stats.spearmanr(first, second).statistic
    result = spearman(first, second)
    if np.isnan(expected):
        assert math.isnan(result)
    else:
        assert result == pytest.approx(expected, abs=1e-9)


def test_spearman_drops_nan_pairs():
    first = np.array([1.0, 2.0, np.nan, 4.0, 3.0])
    second = np.array([2.0, 1.0, 5.0, 4.0, np.nan])
    assert spearman(first, second) == pytest.approx(stats.spearmanr([1, 2, 4], [2, 1, 4]).statistic)


# ------------------------------------------------------------------ Table 18 groups
def test_prediction_groups():
    bias = np.array([0.10, -0.05, 0.0, -0.02, 0.03, np.nan])
    iou = np.array([0.9, 0.4, 0.7, 0.5, np.nan, 0.2])
    acc = np.array([0.95, 0.5, 0.8, 0.6, 0.7, 0.3])
    groups = prediction_groups(bias, iou, acc)
    assert groups["over"].classes == (0, 4) and groups["under"].classes == (1, 3)
    assert groups["over"].iou_mean == pytest.approx(0.9) and groups["over"].iou_std == 0.0
    assert groups["over"].acc_mean == pytest.approx(np.mean([0.95, 0.7]))
    assert groups["over"].acc_std == pytest.approx(np.std([0.95, 0.7]))
    assert groups["under"].iou_mean == pytest.approx(0.45)
    assert groups["under"].iou_std == pytest.approx(np.std([0.4, 0.5]))
    assert groups["under"].acc_std == pytest.approx(np.std([0.5, 0.6]))
    assert groups["balanced"].classes == (2,)  # Bias exactly 0: in neither of the paper's groups


def test_prediction_groups_with_a_tolerance_call_small_biases_balanced():
    bias = np.array([0.10, -0.05, 0.0, -0.02, 0.03, np.nan])
    iou = np.array([0.9, 0.4, 0.7, 0.5, np.nan, 0.2])
    acc = np.array([0.95, 0.5, 0.8, 0.6, 0.7, 0.3])
    groups = prediction_groups(bias, iou, acc, tolerance=0.03)
    # |Bias| <= 0.03: classes 2, 3 and 4 (the boundary 0.03 included); NaN in no group.
    assert groups["over"].classes == (0,) and groups["under"].classes == (1,)
    assert groups["balanced"].classes == (2, 3, 4)
    assert groups["balanced"].iou_mean == pytest.approx(0.6)  # NaN IoU of class 4 left out
    assert groups["balanced"].acc_mean == pytest.approx(np.mean([0.8, 0.6, 0.7]))
    with pytest.raises(BLDAError, match="tolerance"):
        prediction_groups(bias, iou, acc, tolerance=-0.1)


# ------------------------------------------------------------------ JS divergence (Table 15)
# Without subnormal masses: the scipy reference halves them to 0 in its middle distribution
# (an infinite term); `js_divergence` is checked on them below, against a closed form.
masses = st.lists(st.floats(0, 10, allow_subnormal=False), min_size=2, max_size=12)


def scipy_js_divergence(p, q) -> float:
    """JS divergence from scipy's relative entropy, as `jensenshannon` forms it before its
    square root (which turns a divergence rounded to -1e-17 into NaN, e.g. p = [2.2e-16, 1.5],
    q = [0, 1])."""
    p, q = np.asarray(p) / np.sum(p), np.asarray(q) / np.sum(q)
    middle = (p + q) / 2
    return float((special.rel_entr(p, middle).sum() + special.rel_entr(q, middle).sum()) / 2)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_js_matches_scipy_is_symmetric_and_bounded(data):
    p = np.array(data.draw(masses))
    q = np.array(data.draw(st.lists(st.floats(0, 10, allow_subnormal=False), min_size=len(p),
                                    max_size=len(p))))  # fmt: skip
    if p.sum() == 0 or q.sum() == 0:
        assert math.isnan(float(js_divergence(p, q)))
        return
    value = float(js_divergence(p, q))
    assert value == pytest.approx(scipy_js_divergence(p, q), abs=1e-9)
    assert value == pytest.approx(float(js_divergence(q, p)), abs=1e-12)
    assert 0.0 <= value <= math.log(2) + 1e-12


def test_js_with_a_subnormal_mass_stays_finite():
    # hypothesis found [0, 0, 0, 1, 0] against [0, 0, 0, 1, 5e-324]: the middle mass 5e-324 / 2
    # rounded to 0 and the term was infinite. The closed form: with m_4 = 2.5e-324 the terms are
    # 1 * log(1 / (1 - 2.5e-324)) ~ 2.5e-324 and 5e-324 * log 2, so JS ~ 2e-324 (that is, 0 or
    # the smallest subnormal in float64)
    value = float(js_divergence([0, 0, 0, 1.0, 0], [0, 0, 0, 1.0, 5e-324]))
    assert 0.0 <= value <= 1e-320


def test_js_of_disjoint_distributions_is_ln2():
    assert float(js_divergence([1.0, 0.0], [0.0, 3.0])) == pytest.approx(math.log(2))


@ROW_BLOCKS
@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_anchor_divergences_against_scipy_per_cell(eq5_blocks, dtype):
    rng = np.random.default_rng(3)
    histogram = rng.integers(0, 6, size=(3, 3, 7)).astype(dtype)
    histogram[2, 0] = 0  # an empty negative cell is left out of class 0's average
    js_positive, js_negative = anchor_divergences(histogram)
    positive_anchor = sum(histogram[k, k] for k in range(3))
    negative_anchor = histogram.sum((0, 1)) - positive_anchor
    for k in range(3):
        expected = jensenshannon(histogram[k, k], positive_anchor) ** 2
        assert float(js_positive[k]) == pytest.approx(expected, abs=1e-9)
        cells = [c for c in range(3) if c != k and histogram[c, k].sum() > 0]
        expected = np.mean([jensenshannon(histogram[c, k], negative_anchor) ** 2 for c in cells])
        assert float(js_negative[k]) == pytest.approx(expected, abs=1e-9)
