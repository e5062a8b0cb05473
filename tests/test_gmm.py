"""GaussianMixture1D against independent truths: known mixtures, scikit-learn, scipy, hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from sklearn.mixture import GaussianMixture

from blda_tools.errors import BLDAError
from blda_tools.gmm import (
    RESPONSIBILITY_EPSILON,
    GaussianMixture1D,
    StepsSinceUpdate,
    normal_cdf_abramowitz_stegun,
)

FAST = settings(max_examples=30, deadline=None)


def draw_mixture(rng, weights, means, stds, n):
    """Samples from a known mixture, drawn with numpy (not with the code under test)."""
    component = rng.choice(len(weights), size=n, p=weights)
    return rng.normal(np.asarray(means)[component], np.asarray(stds)[component])


def sorted_parameters(model, cell=()):
    order = model.means[cell].argsort()
    return [p[cell][order].double().numpy() for p in (model.weights, model.means, model.variances)]


def scipy_mixture_cdf(z, weights, means, variances):
    return sum(
        w * stats.norm.cdf(z, m, np.sqrt(v))
        for w, m, v in zip(weights, means, variances, strict=True)
    )


def scipy_mixture_pdf(z, weights, means, variances):
    return sum(
        w * stats.norm.pdf(z, m, np.sqrt(v))
        for w, m, v in zip(weights, means, variances, strict=True)
    )


def set_parameters(model, weights, means, variances):
    dtype = model.dtype
    model.weights = torch.as_tensor(weights, dtype=dtype)
    model.means = torch.as_tensor(means, dtype=dtype)
    model.variances = torch.as_tensor(variances, dtype=dtype)
    model.fitted_ = torch.ones(model.weights.shape[:-1], dtype=torch.bool)
    model.batch_shape = tuple(model.weights.shape[:-1])
    return model


mixtures = st.integers(1, 3).flatmap(
    lambda k: st.tuples(
        st.lists(st.floats(0.2, 1.0), min_size=k, max_size=k),
        st.lists(st.floats(-3.0, 3.0), min_size=k, max_size=k),
        st.lists(st.floats(0.5, 2.0), min_size=k, max_size=k),
    )
)


def model_from(mixture, dtype=torch.float64):
    raw_weights, means, stds = mixture
    weights = np.asarray(raw_weights) / np.sum(raw_weights)
    model = GaussianMixture1D(len(means), dtype=dtype)
    return set_parameters(model, weights, means, np.square(stds)), (weights, means, np.square(stds))


# -- fitting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["quantile", "kmeans++"])
def test_recovers_known_well_separated_mixtures_in_one_batch(init):
    rng = np.random.default_rng(0)
    truths = [
        ([0.3, 0.7, 0.0], [-4.0, 3.0, 0.0], [0.5, 1.0, 1.0]),
        ([0.2, 0.5, 0.3], [-6.0, 0.0, 5.0], [0.5, 1.0, 0.7]),
    ]
    n = 20000
    samples = np.zeros((2, n))
    mask = np.zeros((2, n), dtype=bool)
    # The two-component cell has only 15000 valid samples; the rest is padding with garbage.
    samples[0, :15000] = draw_mixture(
        rng, truths[0][0][:2], truths[0][1][:2], truths[0][2][:2], 15000
    )
    samples[0, 15000:] = np.nan
    mask[0, :15000] = True
    samples[1] = draw_mixture(rng, *truths[1], n)
    mask[1] = True
    two = GaussianMixture1D(2, init=init).fit(
        torch.tensor(samples[:1]), mask=torch.tensor(mask[:1])
    )
    three = GaussianMixture1D(3, init=init).fit(torch.tensor(samples[1]))
    for model, cell, (weights, means, stds) in ((two, (0,), truths[0]), (three, (), truths[1])):
        k = model.n_components
        fitted_weights, fitted_means, fitted_variances = sorted_parameters(model, cell)
        # Tolerances: about 4 standard errors at these sample sizes.
        np.testing.assert_allclose(fitted_weights, weights[:k], atol=0.02)
        np.testing.assert_allclose(fitted_means, means[:k], atol=0.06)
        np.testing.assert_allclose(fitted_variances, np.square(stds[:k]), rtol=0.08)
        assert bool(model.fitted_.all()) and bool(model.converged_.all())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_log_likelihood_matches_scikit_learn_within_half_a_percent():
    rng = np.random.default_rng(1)
    cells, n = 3, 10000
    samples = np.stack(
        [
            draw_mixture(
                rng, rng.dirichlet(np.ones(3)), rng.uniform(-8, 8, 3), rng.uniform(0.3, 2.0, 3), n
            )
            for _ in range(cells)
        ]
    )
    model = GaussianMixture1D(5).fit(torch.tensor(samples, dtype=torch.float32))
    ours = model.log_likelihood(torch.tensor(samples, dtype=torch.float32)).double().numpy()
    for cell in range(cells):
        reference = GaussianMixture(5, tol=1e-6, max_iter=100, random_state=0)
        reference.fit(samples[cell, :, None])
        theirs = reference.score(samples[cell, :, None])
        assert abs(ours[cell] - theirs) <= 0.005 * abs(theirs), (cell, ours[cell], theirs)
        # The log-likelihood itself against scipy, with our own fitted parameters.
        weights, means, variances = (
            p[cell].double().numpy() for p in (model.weights, model.means, model.variances)
        )
        expected = np.log(scipy_mixture_pdf(samples[cell], weights, means, variances)).mean()
        assert ours[cell] == pytest.approx(expected, abs=2e-4)


def test_fit_histogram_matches_fit_on_the_samples():
    rng = np.random.default_rng(2)
    samples = draw_mixture(rng, [0.4, 0.6], [-2.0, 3.0], [0.7, 1.2], 50000)
    edges = np.arange(-8.0, 10.0 + 1e-9, 0.05)
    counts, _ = np.histogram(samples, edges)
    centers = (edges[:-1] + edges[1:]) / 2
    from_samples = GaussianMixture1D(2, dtype=torch.float64).fit(torch.tensor(samples))
    from_bins = GaussianMixture1D(2, dtype=torch.float64).fit_histogram(
        torch.tensor(centers), torch.tensor(counts[None]).double()
    )
    bins = sorted_parameters(from_bins, (0,))
    exact = sorted_parameters(from_samples)
    np.testing.assert_allclose(bins[0], exact[0], atol=2e-3)
    np.testing.assert_allclose(bins[1], exact[1], atol=5e-3)
    np.testing.assert_allclose(bins[2], exact[2], rtol=5e-3)
    likelihood_bins = float(from_bins.log_likelihood(torch.tensor(samples)[None])[0])
    likelihood_samples = float(from_samples.log_likelihood(torch.tensor(samples)))
    assert likelihood_bins == pytest.approx(likelihood_samples, rel=1e-4)


def test_fit_histogram_single_component_is_the_sheppard_corrected_moments():
    rng = np.random.default_rng(3)
    width = 0.5
    edges = np.arange(-7.0, 7.0 + 1e-9, width)
    counts, _ = np.histogram(rng.normal(0.3, 1.0, 200000), edges)
    centers = (edges[:-1] + edges[1:]) / 2
    mean = np.average(centers, weights=counts)
    grouped_variance = np.average((centers - mean) ** 2, weights=counts)
    corrected = GaussianMixture1D(1, dtype=torch.float64).fit_histogram(centers, counts)
    raw = GaussianMixture1D(1, dtype=torch.float64).fit_histogram(
        centers, counts, sheppard_correction=False
    )
    assert float(raw.means[0]) == pytest.approx(mean, abs=1e-9)
    assert float(raw.variances[0]) == pytest.approx(grouped_variance, rel=1e-6)
    assert float(corrected.variances[0]) == pytest.approx(
        grouped_variance - width**2 / 12, rel=1e-6
    )
    # The correction moves the estimate towards the true variance 1 (by width^2 / 12 ~ 0.02).
    assert abs(float(corrected.variances[0]) - 1.0) < 0.01 < abs(float(raw.variances[0]) - 1.0)


def test_one_em_step_equals_the_hand_computed_update():
    samples = np.array([-2.0, -1.0, 0.5, 1.0, 3.0, 4.0])
    weights, means, variances = np.array([0.4, 0.6]), np.array([-1.0, 2.0]), np.array([1.0, 2.0])
    joint = np.stack(
        [
            w * stats.norm.pdf(samples, m, np.sqrt(v))
            for w, m, v in zip(weights, means, variances, strict=True)
        ],
        1,
    )
    responsibility = joint / joint.sum(1, keepdims=True) + RESPONSIBILITY_EPSILON
    mass = responsibility.sum(0)
    new_means = (responsibility * samples[:, None]).sum(0) / mass
    new_variances = (responsibility * (samples[:, None] - new_means) ** 2).sum(0) / mass
    model = set_parameters(GaussianMixture1D(2, dtype=torch.float64), weights, means, variances)
    stepped = model.em_step(torch.tensor(samples), n_steps=1)
    np.testing.assert_allclose(stepped.weights.numpy(), mass / mass.sum(), rtol=1e-12)
    np.testing.assert_allclose(stepped.means.numpy(), new_means, rtol=1e-12)
    np.testing.assert_allclose(stepped.variances.numpy(), new_variances, rtol=1e-10)
    assert torch.equal(model.means, torch.tensor(means))  # em_step leaves the model unchanged


def _numpy_em_steps(samples, sample_weight, weights, means, variances, steps, floor=1e-4):
    """EM steps of one cell in float64 numpy (log-space E step), the released update: 1e-7
    added to every normalised responsibility, variances floored."""
    for _ in range(steps):
        log_joint = (
            np.log(weights)
            - 0.5 * np.log(2 * np.pi * variances)
            - 0.5 * (samples[:, None] - means) ** 2 / variances
        )
        log_evidence = np.logaddexp.reduce(log_joint, axis=1, keepdims=True)
        responsibility = np.exp(log_joint - log_evidence) + RESPONSIBILITY_EPSILON
        responsibility *= sample_weight[:, None]
        mass = responsibility.sum(0)
        means = (responsibility * samples[:, None]).sum(0) / mass
        second = (responsibility * samples[:, None] ** 2).sum(0) / mass
        variances = np.maximum(second - means**2, floor)
        weights = mass / mass.sum()
    return weights, means, variances


def test_float32_em_steps_match_a_float64_numpy_em():
    # float32 on a CPU runs the compiled kernel: cells of different sizes (masks, not a
    # multiple of its block of samples), fractional sample weights, a far-away outlier.
    rng = np.random.default_rng(7)
    counts = [6, 300, 1000]
    samples = np.zeros((3, 1000))
    mask = np.zeros((3, 1000), dtype=bool)
    for cell, count in enumerate(counts):
        samples[cell, :count] = draw_mixture(rng, [0.3, 0.7], [-2.0, 1.5], [0.5, 1.0], count)
        mask[cell, :count] = True
    samples[2, 5] = 40.0
    sample_weight = rng.uniform(0.2, 3.0, samples.shape)
    start = (np.array([0.5, 0.5]), np.array([-1.0, 1.0]), np.array([1.0, 2.0]))
    model = GaussianMixture1D(2, batch_shape=(3,))
    set_parameters(model, *(np.tile(p, (3, 1)) for p in start))
    stepped = model.em_step(
        torch.tensor(samples, dtype=torch.float32),
        sample_weight=torch.tensor(sample_weight, dtype=torch.float32),
        mask=torch.tensor(mask),
        n_steps=8,
    )
    for cell, count in enumerate(counts):
        kept = slice(0, count)
        # EM runs on samples centred on their weighted mean (mixture.py), so shift the same way.
        weight = sample_weight[cell, kept]
        center = (weight * samples[cell, kept]).sum() / weight.sum()
        centred_start = (start[0], start[1] - center, start[2])
        expected = _numpy_em_steps(samples[cell, kept] - center, weight, *centred_start, 8)
        expected = (expected[0], expected[1] + center, expected[2])
        got = [
            p[cell].double().numpy() for p in (stepped.weights, stepped.means, stepped.variances)
        ]
        for value, truth in zip(got, expected, strict=True):
            np.testing.assert_allclose(value, truth, rtol=2e-5, atol=2e-6)


def test_float32_fit_stops_where_a_float64_fit_does():
    # The stopping rule on the float32 mean log-likelihood: the fit's log-likelihood equals
    # the float64 fit's (which runs the torch path) to float32 precision.
    rng = np.random.default_rng(3)
    data = np.stack([draw_mixture(rng, [0.5, 0.5], [-3, 2], [0.7, 1.2], 3000) for _ in range(4)])
    single = GaussianMixture1D(3).fit(torch.tensor(data, dtype=torch.float32))
    double = GaussianMixture1D(3, dtype=torch.float64).fit(torch.tensor(data))
    assert bool(single.converged_.all()) and bool(double.converged_.all())
    got = single.log_likelihood(torch.tensor(data)).double()
    np.testing.assert_allclose(got.numpy(), double.log_likelihood(torch.tensor(data)), rtol=1e-5)


def test_compiled_quantile_init_matches_the_torch_one():
    # float32 on a CPU: numpy's argsort and the compiled walk; the torch path is the reference
    # (means exact: the same sorted samples; the pooled variance summed in float64 there).
    from blda_tools.gmm.em import _quantile_init, _quantile_init_torch

    rng = np.random.default_rng(11)
    x = torch.tensor(rng.normal(0, 3, (7, 1001)), dtype=torch.float32)
    w = torch.tensor(rng.uniform(0.1, 2.0, (7, 1001)), dtype=torch.float32)
    w[1, 500:] = 0.0  # half the cell is padding
    w[2] = 1.0  # unit weights: cumulative counts land exactly on targets
    w[3, :-3] = 0.0  # three samples for five components
    w[4, 1:] = 0.0  # one sample
    x[5] = torch.round(x[5])  # ties
    pairs = zip(_quantile_init(x, w, 5, 1e-4), _quantile_init_torch(x, w, 5, 1e-4), strict=True)
    for got, expected in pairs:
        assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=2e-6)


def test_thin_cells_are_not_fitted_and_em_step_skips_them():
    rng = np.random.default_rng(4)
    samples = torch.tensor(rng.normal(size=(3, 40)), dtype=torch.float32)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 2:] = False  # 2 samples < K = 3
    mask[2, 10:] = False  # 10 samples < min_samples = 20
    model = GaussianMixture1D(3, min_samples=20).fit(samples, mask=mask)
    assert model.fitted_.tolist() == [True, False, False]
    stepped = model.em_step(samples, mask=mask, n_steps=2)
    assert stepped.updated_.tolist() == [True, False, False]
    assert torch.equal(stepped.means[1:], model.means[1:])
    # A cell fitted for the first time by em_step is initialised from its own samples.
    mask[2] = True
    stepped = model.em_step(samples, mask=mask, n_steps=2)
    assert stepped.updated_.tolist() == [True, False, True]
    assert stepped.fitted_.tolist() == [True, False, True]
    assert torch.all(stepped.means[2].abs() < 3)


def test_kmeans_plus_plus_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    samples = torch.tensor(rng.normal(size=(6, 500)) * 3, dtype=torch.float32)
    first = GaussianMixture1D(4, init="kmeans++", seed=7).fit(samples, max_iter=3)
    second = GaussianMixture1D(4, init="kmeans++", seed=7).fit(samples, max_iter=3)
    for name in ("weights", "means", "variances"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_bad_input_raises_blda_error():
    with pytest.raises(BLDAError, match="cannot fit 5 components"):
        GaussianMixture1D(5).fit(torch.randn(4))
    with pytest.raises(BLDAError, match="NaN"):
        GaussianMixture1D(2).fit(torch.tensor([0.0, 1.0, float("nan"), 2.0]))
    with pytest.raises(BLDAError, match="infinite"):
        GaussianMixture1D(2).fit(torch.tensor([[0.0, 1.0, 2.0], [0.0, -float("inf"), 2.0]]))
    with pytest.raises(BLDAError, match="min_samples"):
        GaussianMixture1D(5, min_samples=3)
    with pytest.raises(BLDAError, match="init"):
        GaussianMixture1D(2, init="random")
    with pytest.raises(BLDAError, match="mask"):
        GaussianMixture1D(2).fit(torch.randn(2, 10), mask=torch.ones(2, 9, dtype=torch.bool))


# -- momentum ----------------------------------------------------------------------------------


def test_momentum_update_against_a_hand_computed_case():
    old = GaussianMixture1D(2, batch_shape=(3,), dtype=torch.float64)
    set_parameters(old, [[0.5, 0.5]] * 3, [[0.0, 10.0]] * 3, [[1.0, 2.0]] * 3)
    old.fitted_ = torch.tensor([True, True, False])
    new = GaussianMixture1D(2, dtype=torch.float64)
    set_parameters(new, [[0.3, 0.7]] * 3, [[4.0, 14.0]] * 3, [[3.0, 6.0]] * 3)
    before = old.means.clone()
    # Cell 0: m = 0.5, n = 2 -> weight m^n = 0.25 on the old value. Cell 1: not updated.
    # Cell 2: never fitted before -> takes the new estimate as it is.
    old.momentum_update(new, 0.5, torch.tensor([2, 5, 1]), torch.tensor([True, False, True]))
    np.testing.assert_allclose(old.weights[0].numpy(), [0.35, 0.65])
    np.testing.assert_allclose(old.means[0].numpy(), [3.0, 13.0])
    np.testing.assert_allclose(old.variances[0].numpy(), [2.5, 5.0])
    assert torch.equal(old.means[1], before[1])
    np.testing.assert_allclose(old.means[2].numpy(), [4.0, 14.0])
    assert old.fitted_.tolist() == [True, True, True]
    np.testing.assert_allclose(old.weights.sum(-1).numpy(), 1.0)


def test_steps_since_update_counts_iterations_per_cell():
    clock = StepsSinceUpdate((3,))
    assert clock.tick().tolist() == [1, 1, 1]
    clock.reset(torch.tensor([True, False, False]))
    assert clock.tick().tolist() == [1, 2, 2]
    clock.reset(torch.tensor([False, True, False]))
    assert clock.tick().tolist() == [2, 1, 3]
    restored = StepsSinceUpdate((3,)).load_state_dict(clock.state_dict())
    assert restored.steps.tolist() == [2, 1, 3]


# -- CDF, density, inverse ---------------------------------------------------------------------


@FAST
@given(mixtures, st.lists(st.floats(-12.0, 12.0), min_size=2, max_size=30))
def test_cdf_and_pdf_match_scipy_and_the_cdf_is_monotone(mixture, points):
    model, (weights, means, variances) = model_from(mixture)
    z = np.sort(np.asarray(points))
    cdf = model.cdf(torch.tensor(z)).numpy()
    np.testing.assert_allclose(cdf, scipy_mixture_cdf(z, weights, means, variances), atol=1e-12)
    np.testing.assert_allclose(
        model.pdf(torch.tensor(z)).numpy(),
        scipy_mixture_pdf(z, weights, means, variances),
        atol=1e-12,
    )
    assert np.all(np.diff(cdf) >= 0) and np.all((cdf >= 0) & (cdf <= 1))
    float32 = model.copy().to(dtype=torch.float32)
    assert np.all(np.diff(float32.cdf(torch.tensor(z, dtype=torch.float32)).numpy()) >= 0)


@FAST
@given(mixtures)
def test_pdf_integrates_to_one(mixture):
    model, _ = model_from(mixture)
    grid = np.linspace(-20, 20, 20001)
    assert integrate.trapezoid(model.pdf(torch.tensor(grid)).numpy(), grid) == pytest.approx(
        1.0, abs=1e-6
    )


@FAST
@given(
    st.floats(-3.0, 3.0),
    st.floats(0.1, 3.0),
    st.lists(st.floats(-15.0, 15.0), min_size=1, max_size=20),
)
def test_single_component_cdf_is_scipys_normal_cdf(mean, std, points):
    model = set_parameters(GaussianMixture1D(1), [1.0], [mean], [std**2])
    z = np.asarray(points, dtype=np.float32)
    np.testing.assert_allclose(
        model.cdf(torch.tensor(z)).numpy(), stats.norm.cdf(z, mean, std), atol=2e-6
    )


@FAST
@given(st.lists(st.floats(-40.0, 40.0), min_size=1, max_size=50))
def test_abramowitz_stegun_error_is_below_its_bound(points):
    z = np.concatenate([np.asarray(points), np.linspace(-8, 8, 1601)])
    approximate = normal_cdf_abramowitz_stegun(torch.tensor(z, dtype=torch.float64)).numpy()
    assert np.max(np.abs(approximate - stats.norm.cdf(z))) < 7.5e-8


@FAST
@given(mixtures, st.lists(st.floats(0.01, 0.99), min_size=1, max_size=20))
def test_inverse_cdf_round_trip_in_the_bulk(mixture, levels):
    model, _ = model_from(mixture, dtype=torch.float32)
    z = model.inverse_cdf(torch.tensor(levels), newton_steps=3)  # points with F(z) in [0.01, 0.99]
    z = z[model.pdf(z) > 0.01]  # inside gaps between components F^-1 is ill-conditioned
    round_trip = model.inverse_cdf(model.cdf(z))  # default: pure interpolation, as released
    assert torch.all((round_trip - z).abs() < 1e-3)


def test_inverse_cdf_with_narrow_components_and_newton_refinement():
    model = set_parameters(
        GaussianMixture1D(2, dtype=torch.float64), [0.5, 0.5], [-20.0, 20.0], [0.01, 0.01]
    )
    z = torch.tensor([-20.1, -20.0, -19.95, 19.9, 20.05])
    truth = torch.tensor(scipy_mixture_cdf(z.numpy(), [0.5, 0.5], [-20.0, 20.0], [0.01, 0.01]))
    refined = model.inverse_cdf(truth, newton_steps=2)
    assert torch.all((refined - z).abs() < 1e-6)


def test_inverse_cdf_is_finite_for_degenerate_cells_and_extreme_probabilities():
    model = GaussianMixture1D(2, batch_shape=(2,), variance_floor=0.0)
    set_parameters(
        model, [[0.5, 0.5], [0.3, 0.7]], [[1.0, 1.0], [-1.0, 2.0]], [[0.0, 0.0], [0.0, 1.0]]
    )
    p = torch.tensor([0.0, 1e-12, 0.3, 0.5, 1.0, float("inf")]).clamp_max(1.0)
    result = model.inverse_cdf(p)
    assert result.shape == (2, 6) and bool(torch.isfinite(result).all())
    assert torch.all(result[0] == 1.0)
    assert bool(torch.isfinite(model.cdf(torch.tensor([0.0, 1.0, 2.0]))).all())


def test_points_broadcast_against_the_batch_shape():
    model = GaussianMixture1D(2, batch_shape=(2, 3))
    assert model.cdf(torch.zeros(7)).shape == (2, 3, 7)
    assert model.inverse_cdf(torch.full((2, 1, 4), 0.5)).shape == (2, 3, 4)
    with pytest.raises(BLDAError, match="broadcast"):
        model.cdf(torch.zeros(5, 7))


# -- persistence -------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    samples = torch.tensor(np.random.default_rng(6).normal(size=(2, 3, 200)), dtype=torch.float32)
    model = GaussianMixture1D(3, init="kmeans++", seed=3, variance_floor=1e-3).fit(
        samples, max_iter=5
    )
    model.save(tmp_path / "gmm.pt")
    loaded = GaussianMixture1D.load(tmp_path / "gmm.pt")
    for name in ("weights", "means", "variances", "fitted_", "converged_", "n_iter_"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))
    assert (loaded.variance_floor, loaded.init, loaded.seed, loaded.batch_shape) == (
        1e-3,
        "kmeans++",
        3,
        (2, 3),
    )
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BLDAError, match="junk.pt"):
        GaussianMixture1D.load(tmp_path / "junk.pt")
    with pytest.raises(BLDAError, match="no such file"):
        GaussianMixture1D.load(tmp_path / "missing.pt")
