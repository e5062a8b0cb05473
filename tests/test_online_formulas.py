"""BLDALoss's CPU fast path (compiled lookup that adds the logits, offset tables for the cells a
call reads, compiled CDF targets and sampling passes) against a direct numpy/scipy computation
of the published formulas on a small case: the momentum EM update of the mixtures (Eq. 8,
Algorithm 1 lines 9-17 and 26-32), the offsets of Eq. 6 by root finding, the adjusted
cross-entropy of Eq. 9 and the CDF regression of Eq. 10, value and gradient.

Two classes with exactly as many labelled pixels each and no sample caps make the draws
deterministic: every cell's samples are all pixels of its class and the negative anchor's are
f[1 - y], so the expected state follows from the data alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from blda_tools.online.loss import BLDALoss

IGNORE = 255
FLOOR = 1e-4  # variance floor of the M step (as released)
RESPONSIBILITY_EPSILON = 1e-7  # added to every normalised responsibility (docs/training.md)
OPTIONS = dict(
    n_components=2, em_steps=2, momentum=0.6, momentum_warmup=0, min_samples=20, eps=0.02,
    tau=0.5, regression_weight=0.3, max_samples_per_cell=None, anchor_max_samples=None,
)  # fmt: skip


def balanced_batch(rng, shape=(2, 16, 16), ignored=16, target_share=None):
    """(B, 2, H, W) logits and labels with exactly as many labelled pixels of each class (among
    the target pixels too, when `target_share` gives mixed weights: 1 = source, 0.7 =
    target); f[y] from a two-bump mixture, f[1 - y] ~ N(-1, 0.7^2); drawn with numpy."""
    pixels = int(np.prod(shape))
    labels = np.full(pixels, IGNORE)
    order = rng.permutation(pixels)
    labelled = order[ignored:]
    labels[labelled] = np.arange(labelled.size) % 2
    weights = np.ones(pixels)
    if target_share is not None:
        target = labelled[: int(target_share * labelled.size) // 2 * 2]
        weights[target] = 0.7
    bump = rng.random(pixels) < 0.3
    positive = np.where(bump, 3.5, 1.5) + 0.6 * rng.normal(size=pixels)
    negative = -1.0 + 0.7 * rng.normal(size=pixels)
    valid_labels = np.where(labels == IGNORE, 0, labels)
    logits = np.where(np.arange(2)[:, None] == valid_labels, positive, negative)  # (2, pixels)
    logits = logits.reshape(2, *shape).transpose(1, 0, 2, 3).copy()
    return logits, labels.reshape(shape), weights.reshape(shape)


def as_tensors(logits, labels, weights):
    return (
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(weights, dtype=torch.float32),
    )


def params(mixture_set):
    return [getattr(mixture_set, n).double().numpy().copy() for n in ("weights", "means", "variances")]  # fmt: skip


def em_momentum(old, samples, steps, momentum):
    """T EM steps from the old parameters on `samples`, then Algorithm 1's momentum (one
    update since the last: n = 1): phi = (1 - m) phi_new + m phi_old, weights renormalised."""
    weights, means, variances = (p.copy() for p in old)
    for _ in range(steps):
        variances = np.maximum(variances, FLOOR)
        density = weights * stats.norm.pdf(samples[:, None], means, np.sqrt(variances))
        responsibility = density / density.sum(1, keepdims=True) + RESPONSIBILITY_EPSILON
        mass = responsibility.sum(0)
        means = (responsibility * samples[:, None]).sum(0) / mass
        variances = np.maximum(
            (responsibility * samples[:, None] ** 2).sum(0) / mass - means**2, FLOOR
        )
        weights = mass / mass.sum()
    mixed = [
        (1 - momentum) * new + momentum * o
        for new, o in zip((weights, means, variances), old, strict=True)
    ]
    mixed[0] = mixed[0] / mixed[0].sum()
    mixed[2] = np.maximum(mixed[2], FLOOR)
    return mixed


def expected_set(before, logits, labels, members):
    """Every cell (c, l) of the 2 x 2 set from all member pixels of class c, column l."""
    after = [p.copy() for p in before]
    for c in range(2):
        chosen = members & (labels == c)
        for column in range(2):
            new = em_momentum([p[c, column] for p in before], logits[:, column][chosen], 2, 0.6)
            for target, value in zip(after, new, strict=True):
                target[c, column] = value
    return after


def mixture_cdf(z, weights, means, variances):
    return sum(
        w * stats.norm.cdf(z, m, np.sqrt(v))
        for w, m, v in zip(weights, means, variances, strict=True)
    )


def aligned(z, cell, anchor, eps):
    """Eq. 6: F_anchor^-1(clip(F_cell(z), eps, 1 - eps)) for an array z, by bisection (float64,
    100 halvings: far below float32 resolution)."""
    p = np.clip(mixture_cdf(z, *cell), eps, 1 - eps)
    spread = 20 * np.sqrt(anchor[2].max())
    low = np.full_like(z, anchor[1].min() - spread)
    high = np.full_like(z, anchor[1].max() + spread)
    for _ in range(100):
        middle = (low + high) / 2
        below = mixture_cdf(middle, *anchor) < p
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return (low + high) / 2


def direct_loss(sets, anchors, logits, labels, weights, in_target, regression):
    """Eq. 9 + lambda Eq. 10 per the formulas, mean over all pixels, and both gradients."""
    tau, lam, eps = OPTIONS["tau"], OPTIONS["regression_weight"], OPTIONS["eps"]
    flat = logits.transpose(1, 0, 2, 3).reshape(2, -1).T  # (pixels, 2)
    shape = labels.shape
    labels, weights = labels.reshape(-1), weights.reshape(-1)
    in_target, regression = in_target.reshape(-1), regression.reshape(-1)
    count = labels.size
    valid = labels != IGNORE
    y = np.where(valid, labels, 0)
    adjusted = flat.copy()
    for row in range(2):
        for c in range(2):
            for domain in range(2):
                chosen = valid & (y == row) & (in_target == domain)
                cell = [p[row, c] for p in sets[domain]]
                anchor = [p[0 if c == row else 1] for p in anchors]
                offset = aligned(flat[chosen, c], cell, anchor, eps) - flat[chosen, c]
                adjusted[chosen, c] -= tau * offset  # Eq. 9: f - tau Delta
    log_p = adjusted - np.logaddexp.reduce(adjusted, axis=1, keepdims=True)
    target = np.zeros(count)
    for row in range(2):
        for domain in range(2):
            chosen = valid & (y == row) & (in_target == domain)
            diagonal = [p[row, row] for p in sets[domain]]
            target[chosen] = mixture_cdf(flat[chosen, row], *diagonal)  # Eq. 10: d = F_yy(f[y])
    error = regression - target
    per_pixel = -log_p[np.arange(count), y] + lam * error**2
    total = float((np.where(valid, weights * per_pixel, 0.0)).sum())
    scale = np.where(valid, weights, 0.0)[:, None] / count
    grad = scale * (np.exp(log_p) - np.eye(2)[y])
    head = scale[:, 0] * lam * 2 * error
    grad = grad.T.reshape(2, logits.shape[0], *logits.shape[2:]).transpose(1, 0, 2, 3)
    return total / count, grad, head.reshape(shape)


def run_call(blda, logits, labels, weights, domain, regression):
    leaf = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    head = torch.tensor(regression, dtype=torch.float32, requires_grad=True)
    _, label_tensor, weight_tensor = as_tensors(logits, labels, weights)
    weight_tensor = None if domain == "source" else weight_tensor
    loss = blda(leaf, label_tensor, weight_tensor, domain=domain, regression=head[:, None])
    loss.backward()
    return float(loss.detach()), leaf.grad.double().numpy(), head.grad.double().numpy()


def check_call(blda, rng, domain):
    """One call of `domain` after the state `blda` holds: the updated state, the loss and its
    gradients against the direct computation from the state before."""
    logits, labels, weights = balanced_batch(rng, target_share=None if domain == "source" else 0.5)
    regression = rng.random(labels.shape)
    before = {name: params(getattr(blda, name)) for name in ("source", "target", "anchors")}
    loss, grad, head = run_call(blda, logits, labels, weights, domain, regression)
    pixels = logits.transpose(1, 0, 2, 3).reshape(2, -1).T
    flat_labels, flat_weights = labels.reshape(-1), weights.reshape(-1)
    valid = flat_labels != IGNORE
    safe = np.where(valid, flat_labels, 0)
    expected = dict(before)
    if domain == "source":
        expected["source"] = expected_set(before["source"], pixels, safe, valid)
        positive = pixels[np.arange(safe.size), safe][valid]
        negative = pixels[np.arange(safe.size), 1 - safe][valid]
        expected["anchors"] = [p.copy() for p in before["anchors"]]
        for row, samples in enumerate((positive, negative)):
            new = em_momentum([p[row] for p in before["anchors"]], samples, 2, 0.6)
            for target, value in zip(expected["anchors"], new, strict=True):
                target[row] = value
    else:
        target_members = valid & (flat_weights > 0) & (flat_weights < 1)
        expected["target"] = expected_set(before["target"], pixels, safe, target_members)
    for name, values in expected.items():
        for got, want in zip(params(getattr(blda, name)), values, strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
    sets = (expected["source"], expected["target"])
    in_target = weights != 1 if domain == "mixed" else np.zeros(labels.shape, dtype=bool)
    value, want_grad, want_head = direct_loss(
        sets, expected["anchors"], logits, labels, weights, in_target, regression
    )
    assert loss == pytest.approx(value, rel=2e-5)
    np.testing.assert_allclose(grad, want_grad, atol=2e-7)
    np.testing.assert_allclose(head, want_head, atol=2e-7)


def test_fast_path_follows_the_published_formulas():
    rng = np.random.default_rng(41)
    blda = BLDALoss(2, **OPTIONS)
    first = balanced_batch(rng, target_share=0.5)
    # first calls: each set's cells are initialised from their samples (quantile start)
    blda.update_statistics(*as_tensors(*first)[:2], domain="source")
    blda.update_statistics(*as_tensors(*first), domain="mixed")
    check_call(blda, rng, "source")
    check_call(blda, rng, "mixed")
    check_call(blda, rng, "source")
