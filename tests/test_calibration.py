"""Post-hoc CDF alignment (Eq. 6-7): offsets against closed forms and scipy, Eq. 7 against a slow
per-pixel reference, the tau sweep and its baselines against hand-worked and numpy cases, and the
tau spec parser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special, stats

from blda_tools.calibration.calibrator import Calibrator
from blda_tools.calibration.sweep import TauSweep, parse_tau_spec, select_tau
from blda_tools.errors import BLDAError
from blda_tools.statistics import LogitGrid, LogitSetStatistics

GRID = LogitGrid(-40.0, 40.0, 1600)


def _gaussian_statistics(means, stds, total=2_000_000, names=None) -> LogitSetStatistics:
    """Statistics whose cell [c, l] histogram holds the exact bin masses of N(means, stds^2)
    (from scipy's normal CDF), scaled to `total` logits and rounded."""
    means, stds = np.asarray(means, float), np.asarray(stds, float)
    num_classes = means.shape[0]
    edges = GRID.edges
    cdf = stats.norm.cdf((edges[None, None, :] - means[..., None]) / stds[..., None])
    counts = np.rint(np.diff(cdf, axis=-1) * total).astype(np.int64)
    statistics = LogitSetStatistics(num_classes, GRID, class_names=names)
    statistics.histogram = counts
    statistics.count = statistics.histogram.sum(2)
    occupied = counts > 0
    first = occupied.argmax(-1)
    last = counts.shape[-1] - 1 - occupied[..., ::-1].argmax(-1)
    statistics.minimum = edges[first]
    statistics.maximum = edges[last + 1]
    return statistics


def _anchor_statistics(positive, negative, num_classes=2) -> LogitSetStatistics:
    """Every diagonal cell N(positive), every off-diagonal cell N(negative): pooled anchors are
    then exactly Gaussian."""
    eye = np.eye(num_classes, dtype=bool)
    means = np.where(eye, positive[0], negative[0])
    stds = np.where(eye, positive[1], negative[1])
    return _gaussian_statistics(means, stds)


normal = st.tuples(st.floats(-6.0, 6.0), st.floats(0.5, 3.0))


@settings(max_examples=30, deadline=None)
@given(
    cells=st.lists(normal, min_size=4, max_size=4),
    positive=normal,
    negative=normal,
    estimator=st.sampled_from(["gmm", "empirical"]),
)
def test_offsets_match_the_gaussian_closed_form(cells, positive, negative, estimator):
    # Eq. 6 with Gaussians: F_a^-1(F_cl(z)) = mu_a + sigma_a (z - mu_cl) / sigma_cl.
    means = np.array([cell[0] for cell in cells]).reshape(2, 2)
    stds = np.array([cell[1] for cell in cells]).reshape(2, 2)
    calibrator = Calibrator(estimator, n_components=1, min_samples=10, table_points=2048).fit(
        _gaussian_statistics(means, stds), _anchor_statistics(positive, negative)
    )
    # Bulk points of every cell: F_cl in [0.023, 0.977], inside the [0.01, 0.99] clamp.
    quantiles = np.linspace(-2.0, 2.0, 9)
    for c in range(2):
        for l in range(2):  # noqa: E741 - the paper's cell index [c, l]
            z = means[c, l] + stds[c, l] * quantiles
            logits = torch.zeros(len(z), 2)
            logits[:, l] = torch.tensor(z, dtype=torch.float32)
            offsets = calibrator.offsets(logits)[:, l, c].double().numpy()
            anchor_mean, anchor_std = positive if c == l else negative
            expected = anchor_mean + anchor_std * (z - means[c, l]) / stds[c, l] - z
            # Rounded bin masses and float32 tables: well under 1% of the anchor's spread.
            np.testing.assert_allclose(offsets, expected, atol=5e-3 * anchor_std + 2e-3)


def _mixture_cdf(z, weights, means, variances):
    return float(np.sum(weights * stats.norm.cdf((z - means) / np.sqrt(variances))))


def _fitted_three_class_calibrator(estimator="gmm"):
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (30_000,), generator=generator)
    logits = torch.randn(30_000, 3, generator=generator) * torch.tensor([1.0, 1.5, 0.7])
    logits += 3.0 * torch.nn.functional.one_hot(labels, 3) + torch.tensor([1.0, 0.0, -0.5])
    statistics = LogitSetStatistics(3, LogitGrid(-20, 20, 800), class_names=["a", "b", "c"])
    statistics.update(logits, labels)
    calibrator = Calibrator(estimator, n_components=2, min_samples=50, table_points=1024)
    return calibrator.fit(statistics), logits


@pytest.mark.parametrize("inverse_chunk", [None, 1000], ids=["one-chunk", "many-chunks"])
def test_offsets_match_eq6_computed_with_scipy_including_beyond_the_table(
    monkeypatch, inverse_chunk
):
    if inverse_chunk is not None:  # the anchors' inversion taken in pieces: the same values
        import blda_tools.calibration.alignment as alignment

        monkeypatch.setattr(alignment, "INVERSE_CHUNK", inverse_chunk)
    calibrator, _ = _fitted_three_class_calibrator()
    cells = calibrator.cell_mixture_
    anchors = {
        name: [parameters[key].double().numpy() for key in ("weights", "means", "variances")]
        for name, parameters in calibrator.anchor_mixtures_.items()
    }
    low, high = calibrator.table_low_.numpy(), calibrator.table_high_.numpy()
    for c in range(3):
        for l in range(3):  # noqa: E741 - the paper's cell index [c, l]
            parameters = [
                cells[key][c, l].double().numpy() for key in ("weights", "means", "variances")
            ]
            anchor = anchors["positive" if c == l else "negative"]
            points = np.concatenate(
                [np.linspace(low[l] + 0.5, high[l] - 0.5, 7), [low[l] - 7.0, high[l] + 9.0]]
            )
            logits = torch.zeros(len(points), 3)
            logits[:, l] = torch.tensor(points, dtype=torch.float32)
            got = calibrator.offsets(logits)[:, l, c].double().numpy()
            for z, value in zip(logits[:, l].double().numpy(), got, strict=True):
                p = min(max(_mixture_cdf(z, *parameters), 0.01), 0.99)  # clamp of Eq. 6
                aligned = optimize.brentq(lambda x: _mixture_cdf(x, *anchor) - p, -60, 60)  # noqa: B023
                assert value == pytest.approx(aligned - z, abs=2e-3)


def _slow_eq7(calibrator: Calibrator, logits: np.ndarray, tau: float) -> np.ndarray:
    """Eq. 7 pixel by pixel: Delta_cl(z) = z'(z) - z with z' interpolated from the table (held
    constant beyond it, as the clamped CDF makes it), then a softmax over c' per class c."""
    num_classes = logits.shape[1]
    grids = [
        np.linspace(
            calibrator.table_low_[l].item(),
            calibrator.table_high_[l].item(),
            calibrator.table_points,
        )
        for l in range(num_classes)  # noqa: E741 - the paper's cell index
    ]
    offsets = calibrator.offsets_.double().numpy()
    result = np.empty_like(logits, dtype=np.float64)
    for n, pixel in enumerate(logits.astype(np.float64)):
        for c in range(num_classes):
            terms = []
            for other in range(num_classes):
                z = pixel[other]
                if calibrator.adjusted_[c, other]:
                    aligned = np.interp(z, grids[other], grids[other] + offsets[c, other])
                    delta = aligned - z
                else:
                    delta = 0.0
                terms.append(z + tau * delta)
            result[n, c] = special.log_softmax(np.array(terms))[c]
    return result


@pytest.mark.parametrize("estimator", ["gmm", "empirical"])
def test_eq7_matches_a_slow_per_pixel_reference(estimator):
    calibrator, logits = _fitted_three_class_calibrator(estimator)
    sample = logits[:300].clone()
    sample[:20] *= 6.0  # some logits far beyond the table
    sample[20:25] *= 60.0  # exp overflows in float32: the logsumexp fallback
    for tau in (0.3, 1.0):
        expected = _slow_eq7(calibrator, sample.numpy(), tau)
        got = calibrator.log_scores(sample, tau).double().numpy()
        np.testing.assert_allclose(got, expected, atol=2e-4)
        margin = np.sort(expected, 1)[:, -1] - np.sort(expected, 1)[:, -2]
        clear = margin > 1e-3  # no near-ties where float32 rounding could pick either
        assert (calibrator.predict(sample, tau).numpy() == expected.argmax(1))[clear].all()


def test_a_model_output_with_gradients_is_calibrated_without_them():
    calibrator, logits = _fitted_three_class_calibrator()
    layer = torch.nn.Linear(3, 3)
    output = layer(logits[:200])  # as a model's output: requires grad, has a grad_fn
    plain = output.detach().clone()
    scores = calibrator.log_scores(output, 0.5)
    assert not scores.requires_grad and torch.equal(scores, calibrator.log_scores(plain, 0.5))
    assert torch.equal(calibrator.predict(output, 0.5), calibrator.predict(plain, 0.5))


def _confusion_numpy(labels: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, prediction), 1)
    return confusion


def _biased_gaussian_logits(seed, pixels=40_000):
    """Class-conditional Gaussian logits; class 0 favoured by +1.5, class 3 handicapped by -1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(
        torch.tensor([0.4, 0.3, 0.2, 0.1]), pixels, True, generator=generator
    )
    logits = torch.randn(pixels, 4, generator=generator)
    logits += 2.5 * torch.nn.functional.one_hot(labels, 4)
    logits += torch.tensor([1.5, 0.0, 0.0, -1.0])
    return logits, labels


def test_tau_one_balances_gaussian_logits_and_tau_zero_is_exactly_uncalibrated():
    logits, labels = _biased_gaussian_logits(0)
    statistics = LogitSetStatistics(4, LogitGrid(-20, 20, 800), class_names=list("abcd"))
    statistics.update(logits, logits.argmax(1))  # pseudo-labels: no target label used
    calibrator = Calibrator(n_components=3, min_samples=50).fit(statistics)
    sweep = TauSweep(calibrator, [1.0])
    sweep.update(logits, labels)
    rows = {(row.method, row.tau): row.metrics for row in sweep.compute()}
    confusion = _confusion_numpy(labels.numpy(), logits.argmax(1).numpy(), 4)
    recall = np.diag(confusion) / confusion.sum(1)
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    for method in ("blda", "prior"):
        plain = rows[(method, 0.0)]
        assert plain.macc == recall.mean() and plain.miou == iou.mean()
        assert np.array_equal(np.array(plain.acc), recall)
    balanced = rows[("blda", 1.0)]
    assert balanced.macc > rows[("blda", 0.0)].macc + 0.01
    assert balanced.acc_std < rows[("blda", 0.0)].acc_std - 0.01


def test_prior_adjustment_against_a_hand_computed_case():
    # Fit-on labels 6 x a, 3 x b, 1 x c: pi = (0.6, 0.3, 0.1), -log pi = (0.511, 1.204, 2.303).
    # tau = 1, f - log pi:
    #   (1.0, 0.6, 0.0) label a -> (1.511, 1.804, 2.303): c   (argmax f would say a)
    #   (2.0, 0.0, 0.0) label a -> (2.511, 1.204, 2.303): a
    #   (0.0, 1.0, 0.0) label b -> (0.511, 2.204, 2.303): c
    # tau = 0.5, f - 0.5 log pi:
    #   (1.0, 0.6, 0.0) label a -> (1.255, 1.202, 1.151): a
    #   (2.0, 0.0, 0.0) label a -> (2.255, 0.602, 1.151): a
    #   (0.0, 1.0, 0.0) label b -> (0.255, 1.602, 1.151): b
    fit_labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    statistics = LogitSetStatistics(3, LogitGrid(-5, 5, 100), class_names=["a", "b", "c"])
    statistics.update(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), fit_labels)
    calibrator = Calibrator("empirical", min_samples=100).fit(statistics)  # no cell adjusted
    logits = torch.tensor([[1.0, 0.6, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    sweep = TauSweep(calibrator, [0.5, 1.0])
    sweep.update(logits, labels)
    expected_tau_1 = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 0]])
    assert torch.equal(sweep.confusion_at(1.0, "prior"), expected_tau_1)
    expected_tau_half = torch.tensor([[2, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert torch.equal(sweep.confusion_at(0.5, "prior"), expected_tau_half)
    # With no cell adjusted Eq. 7 is the plain argmax at every tau.
    assert torch.equal(
        sweep.confusion_at(1.0, "blda"), torch.tensor([[2, 0, 0], [0, 1, 0], [0, 0, 0]])
    )


def test_select_tau_prefers_the_best_metric_and_the_smallest_tau_on_ties():
    logits, labels = _biased_gaussian_logits(1, pixels=5000)
    statistics = LogitSetStatistics(4, LogitGrid(-20, 20, 400), class_names=list("abcd"))
    statistics.update(logits, labels)
    calibrator = Calibrator("empirical", min_samples=20).fit(statistics)
    sweep = TauSweep(calibrator, [0.5, 1.0])
    sweep.update(logits, labels)
    rows = sweep.compute()
    best = select_tau(rows, "macc", [0.0, 0.5, 1.0])
    assert best.metrics.macc == max(r.metrics.macc for r in rows if r.method == "blda")
    with pytest.raises(BLDAError, match="--metric"):
        select_tau(rows, "accuracy", [0.5])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0.1", [0.1]),
        ("0:1:0.25", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("0:1:0.1", [round(0.1 * i, 10) for i in range(11)]),
        ("0,0.1,0.5,1", [0.0, 0.1, 0.5, 1.0]),
        ("1, 0.5 ,0.5", [0.5, 1.0]),
        ("0.2:0.2:0.1", [0.2]),
    ],
)
def test_tau_spec_parser(spec, expected):
    assert parse_tau_spec(spec) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abc", "cannot parse"),
        ("0:1", "cannot parse"),
        ("0,,1", "cannot parse"),
        ("-0.1", ">= 0"),
        ("0,-1", ">= 0"),
        ("0:1:0", "step must be > 0"),
        ("0:1:-0.1", "step must be > 0"),
        ("1:0:0.1", "below START"),
        ("nan", "expected a number, got nan"),
        # an infinite range or count raised OverflowError from math.floor
        ("0:inf:1", "at most 10000"),
        ("0:1e308:1e-308", "at most 10000"),
        ("0:10000:1e-305", "more than 1000 values"),
        ("0:1:inf", "step must be > 0 and finite"),
        ("0:1:nan", "step must be > 0 and finite"),
    ],
)
def test_tau_spec_errors(spec, message):
    with pytest.raises(BLDAError, match=f"--tau.*{message}"):
        parse_tau_spec(spec)


def test_a_negative_zero_tau_is_zero():
    # -0.0 was written as such into sweep.csv, the chosen tau and the exported module
    taus = parse_tau_spec("-0") + parse_tau_spec("-0:0:1")
    assert [math.copysign(1.0, tau) for tau in taus] == [1.0, 1.0]


def test_fit_errors_are_clear():
    statistics = LogitSetStatistics(2, LogitGrid(-5, 5, 50), class_names=["road", "car"])
    statistics.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.5]]), torch.tensor([0, 1, 0]))
    with pytest.raises(BLDAError, match="positive anchor has 3 logits, fewer than n_components=5"):
        Calibrator(min_samples=5).fit(statistics)
    absent = LogitSetStatistics(3, LogitGrid(-5, 5, 50), class_names=["road", "car", "bus"])
    absent.update(torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.1]]), torch.tensor([0, 1]))
    with pytest.raises(BLDAError, match="positive anchor has no logits: .*--anchor takes"):
        Calibrator("empirical", anchor="class:bus", min_samples=1).fit(absent)
    with pytest.raises(BLDAError, match="unknown class 'bus'.*road, car"):
        Calibrator("empirical", anchor="class:bus").fit(statistics)
    with pytest.raises(BLDAError, match="--components 5 and --min-samples 2: .*--min-samples >= 5"):
        Calibrator(n_components=5, min_samples=2)
    with pytest.raises(BLDAError, match="--table-points: expected an integer >= 16"):
        Calibrator(table_points=8)
    calibrator = Calibrator("empirical", min_samples=1).fit(statistics)
    with pytest.raises(BLDAError, match="NaN"):
        calibrator.predict(torch.tensor([[math.nan, 0.0]]))
    # finite, but their difference overflows float32: the scores were NaN (inf - inf)
    huge = torch.tensor([[2e38, -2e38]])
    for method in (calibrator.predict, calibrator.log_scores):
        with pytest.raises(BLDAError, match=r"values up to 2e\+38 .* within \+-1.7e\+38"):
            method(huge)
    assert not calibrator.log_scores(torch.tensor([[1.7e38, -1.7e38]]), tau=0.2).isnan().any()
    with pytest.raises(BLDAError, match=r"expected shape \(n, 2\) or \(B, 2, H, W\)"):
        calibrator.predict(torch.zeros(4, 3))
    with pytest.raises(BLDAError, match="logits: expected a floating-point array, got int64"):
        calibrator.predict(torch.zeros(4, 2, dtype=torch.int64))


def test_maps_are_calibrated_pixel_by_pixel_in_their_own_shape():
    """A model's output (B, C, H, W) gives (B, H, W) predictions and (B, C, H, W) scores: each
    pixel's row as `predict` and `log_scores` give it for rows, laid out by hand with numpy."""
    calibrator, logits = _fitted_three_class_calibrator("empirical")
    maps = logits[:24].numpy().reshape(2, 3, 4, 3).transpose(0, 3, 1, 2)  # (B, C, H, W)
    rows = torch.from_numpy(maps.transpose(0, 2, 3, 1).reshape(-1, 3).copy())
    prediction = calibrator.predict(torch.from_numpy(maps.copy()), 1.0)
    assert prediction.shape == (2, 3, 4)
    assert torch.equal(prediction.reshape(-1), calibrator.predict(rows, 1.0))
    scores = calibrator.log_scores(maps, 1.0)  # numpy maps too
    assert scores.shape == (2, 3, 3, 4)
    by_row = calibrator.log_scores(rows, 1.0).numpy().reshape(2, 3, 4, 3).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(scores.numpy(), by_row)
    offsets = calibrator.offsets(torch.from_numpy(maps.copy()))
    assert offsets.shape == (2, 3, 4, 3, 3)
    assert torch.equal(offsets.reshape(-1, 3, 3), calibrator.offsets(rows))


def test_maps_of_no_pixel_views_of_any_strides_and_tau_as_a_tensor():
    calibrator, logits = _fitted_three_class_calibrator("empirical")
    assert calibrator.log_scores(np.zeros((0, 3, 4, 4), np.float32)).shape == (0, 3, 4, 4)
    assert calibrator.predict(np.zeros((2, 3, 0, 4), np.float32)).shape == (2, 0, 4)
    maps = logits[:24].numpy().reshape(2, 3, 4, 3).transpose(0, 3, 1, 2)
    flipped = np.flip(maps, 3)  # negative strides: torch.as_tensor refused them
    expected = calibrator.predict(torch.from_numpy(flipped.copy()), 0.5)
    assert torch.equal(calibrator.predict(flipped, torch.tensor(0.5)), expected)
    assert torch.equal(calibrator.predict(flipped, np.float64(0.5)), expected)
    with pytest.raises(BLDAError, match="tau: expected a tau of at most 10000"):
        calibrator.predict(flipped, 10**400)  # beyond float64: no OverflowError


def test_class_anchor_uses_that_class_cells():
    _, logits = _fitted_three_class_calibrator("empirical")
    statistics = LogitSetStatistics(3, LogitGrid(-20, 20, 800), class_names=["a", "b", "c"])
    statistics.update(logits, logits.argmax(1))
    single = Calibrator("empirical", min_samples=50, anchor="class:b").fit(statistics)
    # Cell [b, b] is its own positive anchor: Delta_bb = 0 inside the clamp (up to the table).
    z = torch.zeros(50, 3)
    lows, highs = np.quantile(logits[logits.argmax(1) == 1, 1].numpy(), [0.05, 0.95])
    z[:, 1] = torch.linspace(float(lows), float(highs), 50)
    assert single.offsets(z)[:, 1, 1].abs().max() < 0.05


def test_save_and_load_round_trip(tmp_path):
    calibrator, logits = _fitted_three_class_calibrator()
    calibrator.tau = 0.7
    calibrator.save(tmp_path / "calibrator.pt")
    state = torch.load(tmp_path / "calibrator.pt", weights_only=True)  # plain tensors only
    assert state["class_names"] == ["a", "b", "c"] and state["tau"] == 0.7
    loaded = Calibrator.load(tmp_path / "calibrator.pt")
    assert torch.equal(loaded.predict(logits[:500]), calibrator.predict(logits[:500]))
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(BLDAError, match="junk.pt: not a blda calibrator"):
        Calibrator.load(tmp_path / "junk.pt")


def test_a_calibrator_refuses_bad_tau_other_anchors_and_damaged_files(tmp_path):
    statistics = LogitSetStatistics(2, LogitGrid(-5, 5, 50), class_names=["road", "car"])
    statistics.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.5]]), torch.tensor([0, 1, 0]))
    calibrator = Calibrator("empirical", min_samples=1).fit(statistics)
    with pytest.raises(BLDAError, match="tau: expected a finite tau >= 0"):
        calibrator.tau = -2.0
    other = LogitSetStatistics(3, LogitGrid(-5, 5, 50))
    other.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(BLDAError, match="anchor statistics: 3 classes, the fit-on statistics 2"):
        Calibrator("empirical", min_samples=1).fit(statistics, other)
    calibrator.save(tmp_path / "good.pt")
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    damaged = {
        "low_shape": ("table_low", torch.zeros(5), "table_low has shape"),
        "nan": ("offsets", torch.full_like(state["offsets"], float("nan")), "offsets holds NaN"),
        "names": ("class_names", 5, "class_names is not a list of names"),
        "tau": ("tau", float("nan"), "tau: expected a number, got nan"),
        "components": ("n_components", 0, "--components"),
    }
    for name, (field, value, message) in damaged.items():
        torch.save({**state, field: value}, tmp_path / f"{name}.pt")
        with pytest.raises(BLDAError, match=message) as raised:
            Calibrator.load(tmp_path / f"{name}.pt")
        assert str(raised.value).startswith(f"{tmp_path / name}.pt: "), raised.value  # the file


def test_calibrator_follows_the_scikit_learn_parameter_protocol():
    from sklearn.base import clone

    calibrator = Calibrator("empirical", eps=0.05, min_samples=7, tau=0.5)
    assert repr(calibrator) == "Calibrator(estimator='empirical', eps=0.05, min_samples=7, tau=0.5)"
    copy = clone(calibrator)  # scikit-learn's own check of get_params and the constructor
    assert copy is not calibrator and copy.get_params() == calibrator.get_params()
    assert copy.set_params(table_points=32, tau=1.0) is copy and copy.table_points == 32
    with pytest.raises(BLDAError, match="set_params: unknown parameter"):
        copy.set_params(n_component=3)
    with pytest.raises(BLDAError, match="--eps: expected 0 < eps < 0.5"):
        copy.set_params(eps=5)
    # assigned after the constructor: refused when fitting (it was saved, and `load` refused it)
    statistics = LogitSetStatistics(2, LogitGrid(-5, 5, 50), class_names=["road", "car"])
    statistics.update(torch.randn(200, 2), torch.randint(0, 2, (200,)))
    calibrator.eps = 5
    with pytest.raises(BLDAError, match="--eps: expected 0 < eps < 0.5, got 5"):
        calibrator.fit(statistics)
