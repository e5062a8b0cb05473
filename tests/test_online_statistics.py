"""BLDALoss statistics as released (pixel-weighted anchors, the mixed call on the target set
only), checked against closed forms of numpy-drawn data, and the fast paths (compiled lookup,
interpolated CDF target) against the plain computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize
from test_online import fitted_loss, make_batch, scipy_mixture_cdf

from blda_tools.online.loss import BLDALoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- release statistics


def dominated_batch(rng, pixels=6000, shares=(0.9, 0.06, 0.04), positive=(6.0, 2.0, -1.0)):
    """(N, C) logits where class 0 holds most pixels: f[y] = positive[y] + N(0, 0.5^2) and the
    other columns N(0, 1); drawn with numpy."""
    classes = len(shares)
    labels = rng.choice(classes, size=pixels, p=shares)
    logits = rng.normal(size=(pixels, classes))
    logits[np.arange(pixels), labels] = np.asarray(positive)[labels] + 0.5 * rng.normal(size=pixels)
    return logits, labels


def test_default_anchors_are_the_pooled_pixel_distribution():
    """K = 1: every update's estimate is the sample mean of f[y] over ALL labelled pixels of the
    call (pixel-weighted), so after calls t = 1..T the anchor mean follows
    mu_t = (1 - m) M_t + m mu_(t-1), M_t the numpy pooled mean; the class-balanced option lands
    near the mean of the class means instead (3 points away here)."""
    rng = np.random.default_rng(11)
    momentum = 0.7
    options = dict(n_components=1, momentum=momentum, momentum_warmup=0, min_samples=100)
    pooled, balanced = (
        BLDALoss(3, **options),
        BLDALoss(3, anchor_sampling="class_balanced", **options),
    )
    expected = None
    for _ in range(4):
        logits, labels = dominated_batch(rng)
        for blda in (pooled, balanced):
            blda.update_statistics(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
        pooled_mean = logits[np.arange(labels.size), labels].mean()
        expected = (
            pooled_mean if expected is None else (1 - momentum) * pooled_mean + momentum * expected
        )
    assert float(pooled.anchors.means[0, 0]) == pytest.approx(expected, abs=1e-4)
    class_means = [logits[labels == c, c].mean() for c in range(3)]
    assert float(balanced.anchors.means[0, 0]) == pytest.approx(np.mean(class_means), abs=0.1)
    assert abs(float(balanced.anchors.means[0, 0]) - expected) > 2.5
    # the negative anchor: one uniform l != y per labelled pixel, so its mean estimates the
    # pooled off-label mean (0 here) within a few standard errors (1 / sqrt(6000) = 0.013)
    assert abs(float(pooled.anchors.means[1, 0])) < 0.06


def test_default_k_anchor_mixture_mean_is_the_pooled_mean():
    """Default K = 5 and momentum on the same data every call: EM keeps the mixture mean at the
    sample mean, so the positive anchor's mixture mean is the pooled mean of f[y]."""
    rng = np.random.default_rng(12)
    logits, labels = dominated_batch(rng)
    blda = BLDALoss(3, min_samples=100)
    for _ in range(3):
        blda.update_statistics(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    mixture_mean = float((blda.anchors.weights[0] * blda.anchors.means[0]).sum())
    assert mixture_mean == pytest.approx(logits[np.arange(labels.size), labels].mean(), abs=1e-3)


def test_anchor_subsample_is_uniform_over_pixels():
    """A cap below the pixel count draws a uniform pixel subsample: its positive mean is within a
    few standard errors of the pooled mean (not of the class-balanced one)."""
    rng = np.random.default_rng(13)
    logits, labels = dominated_batch(rng, pixels=40000)
    blda = BLDALoss(3, n_components=1, min_samples=100, anchor_max_samples=4000)
    blda.update_statistics(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert blda.last_terms["anchor_samples"] == 4000
    positive = logits[np.arange(labels.size), labels]
    error = positive.std() / np.sqrt(4000)
    assert abs(float(blda.anchors.means[0, 0]) - positive.mean()) < 4 * error


def _state(mixture_set):
    return {name: tensor.clone() for name, tensor in mixture_set.state_dict().items()}


def test_mixed_call_updates_the_target_set_only():
    classes = 3
    blda = BLDALoss(classes, min_samples=40)
    for seed in range(3):
        logits, labels = make_batch(classes, seed=seed, ignored=0.05)
        blda.update_statistics(logits, labels, domain="source")
    source, anchors = _state(blda.source), _state(blda.anchors)
    logits, labels = make_batch(classes, seed=9, ignored=0.05)
    weights = torch.where(
        torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) < 0.5, 1.0, 0.7
    )
    blda.update_statistics(logits, labels, weights, domain="mixed")
    for before, after in ((source, blda.source), (anchors, blda.anchors)):
        for name, tensor in after.state_dict().items():
            assert torch.equal(tensor, before[name]), name
    assert blda.target.fitted.all() and int(blda.target.updates) == 1
    legacy = BLDALoss(classes, min_samples=40, mixed_updates_source=True)
    legacy.load_state_dict(blda.state_dict())
    legacy.update_statistics(logits, labels, weights, domain="mixed")
    assert int(legacy.source.updates) == int(blda.source.updates) + 1
    assert not torch.equal(legacy.anchors.means, blda.anchors.means)


def test_compiled_lookup_equals_the_torch_path():
    """The numba kernel (CPU) and the torch ops (every other device) give the same offsets."""
    from blda_tools.online.state import OffsetTables

    blda = fitted_loss(4)
    logits, labels = make_batch(4, seed=21)
    pixels = blda._pixels(logits, labels, torch.full(labels.shape, 0.5), "mixed")
    tables = OffsetTables.build(blda._sets(), blda.anchors, blda.eps, 512, 8192, -0.3)
    row = torch.where(pixels.valid, pixels.in_target.long() * 4 + pixels.labels, 8)
    compiled = tables.gather(pixels.logits, row)
    plain = tables.gather(pixels.logits, row, compiled=False)
    torch.testing.assert_close(compiled, plain, rtol=0, atol=1e-6)
    assert (compiled[row[:, None, :].expand_as(compiled) == 8] == 0).all()  # the zero row


def test_training_regression_term_uses_the_exact_cdf_target():
    """forward's Eq. 10 term per pixel (CDF nodes interpolated inside each grid) equals the L2
    loss against `regression_target` (the mixture CDF evaluated at every pixel) within 5e-5
    (step^2 max|F"| / 8 of the 512-point grids; measured 1e-5 on these narrow 80-sample fits)."""
    blda = fitted_loss(4, tau=0.0, reduction="none")
    logits, labels = make_batch(4, seed=22)
    prediction = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5))
    target, available = blda.regression_target(logits, labels)
    assert available.float().mean() > 0.8
    expected = torch.where(available, (prediction - target) ** 2, 0.0)
    blda(logits, labels, regression=prediction, update=False)
    torch.testing.assert_close(blda.last_terms["regression"], expected, rtol=0, atol=5e-5)


def test_offsets_at_the_clamp_kinks_match_scipy():
    """A bimodal cell and skewed anchors (K = 2): on 400 logits spanning both clamp kinks of the
    cell (its eps and 1 - eps quantiles, from scipy), the table's Delta is within 1e-4 of
    F_anchor^-1(clip(F(z), eps, 1 - eps)) - z computed with scipy and brentq."""
    eps = 0.01
    blda = BLDALoss(2, n_components=2, min_samples=2, eps=eps)
    cell = ([0.7, 0.3], [1.0, 4.0], [0.25, 1.5])
    anchor = ([0.6, 0.4], [6.0, 8.0], [1.0, 0.3])
    for mixture_set, parameters in ((blda.source, cell), (blda.anchors, anchor)):
        mixture_set.fitted.fill_(True)
        for name, values in zip(("weights", "means", "variances"), parameters, strict=True):
            getattr(mixture_set, name).copy_(torch.tensor(values))

    def quantile(parameters, p):
        return optimize.brentq(lambda x: scipy_mixture_cdf(x, *parameters) - p, -60, 60, xtol=1e-12)

    kinks = [quantile(cell, eps), quantile(cell, 1 - eps)]
    z = np.concatenate([np.linspace(k - 0.05, k + 0.05, 150) for k in kinks])
    z = np.concatenate([z, np.linspace(kinks[0], kinks[1], 100)])
    logits = torch.tensor(np.stack((z, z), axis=1), dtype=torch.float32)
    z = logits[:, 0].double().numpy()  # the float32 values the loss sees
    delta = blda.offsets(logits, torch.zeros(len(z), dtype=torch.int64))[:, 0].double().numpy()
    probability = np.clip(scipy_mixture_cdf(z, *cell), eps, 1 - eps)
    expected = np.array([quantile(anchor, p) for p in probability]) - z
    np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-4)
