"""Eq. 9's adjusted cross-entropy against F.cross_entropy: zero offsets give it exactly, fixed
offsets give its value and gradient on f - tau Delta (the fused CPU pass and the torch path),
ignored and non-finite pixels behave as in F.cross_entropy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_online import IGNORE, fitted_loss, make_batch, reference_cross_entropy

from blda_tools.online.loss import BLDALoss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ["segmentation", "classification"])
def test_zero_offsets_equal_cross_entropy_exactly(reduction, shape):
    logits, labels = make_batch(4, seed=1)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0))
    if shape == "classification":
        logits, labels, weights = (
            logits.permute(0, 2, 3, 1).reshape(-1, 4),
            labels.reshape(-1),
            weights.reshape(-1),
        )
    expected = reference_cross_entropy(logits, labels, weights, reduction)
    none = BLDALoss(4, mode="none", reduction=reduction)
    assert torch.equal(none(logits, labels, weights, domain="target"), expected)
    untrained = BLDALoss(4, min_samples=40, reduction=reduction)  # no cell fitted yet: no offset
    assert torch.equal(untrained(logits, labels, weights, domain="target", update=False), expected)
    zero_tau = fitted_loss(4, tau=0.0, reduction=reduction)
    assert torch.equal(zero_tau(logits, labels, weights, domain="mixed"), expected)
    assert zero_tau.source.fitted.all() and zero_tau.target.fitted.all()


def test_mean_reduction_is_f_cross_entropy_mean_without_ignored_pixels():
    logits, labels = make_batch(3, ignored=0.0, seed=2)
    loss = BLDALoss(3, mode="none")(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- fixed offsets


def test_gradient_equals_cross_entropy_on_shifted_logits():
    blda = fitted_loss(4, tau=0.7)
    logits, labels = make_batch(4, seed=3)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    for domain in ("source", "mixed"):
        delta = blda.offsets(logits, labels, domain, weights)
        assert delta.abs().sum() > 0
        leaf = logits.clone().requires_grad_(True)
        blda(leaf, labels, weights, domain, update=False).backward()
        reference = logits.clone().requires_grad_(True)
        reference_cross_entropy(reference - 0.7 * delta, labels, weights).backward()
        torch.testing.assert_close(leaf.grad, reference.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_loss_equals_cross_entropy_on_shifted_logits(reduction):
    """The fused CPU pass (offsets, log-softmax, loss, gradient in one kernel) against
    F.cross_entropy of f - tau Delta, per pixel, with huge logits at ignored pixels."""
    blda = fitted_loss(4, tau=0.7, reduction=reduction)
    logits, labels = make_batch(4, seed=5)
    logits.permute(0, 2, 3, 1)[labels == IGNORE] = 1e4
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2))
    for domain in ("source", "mixed", "target"):
        delta = blda.offsets(logits, labels, domain, weights)
        got = blda(logits, labels, weights, domain, update=False)
        shifted = reference_cross_entropy(logits - 0.7 * delta, labels, weights, reduction)
        torch.testing.assert_close(got, shifted, rtol=2e-6, atol=1e-6)
        if reduction == "none":
            assert (got[labels == IGNORE] == 0).all()


def test_second_backward_through_the_fused_loss_is_refused():
    """The fused CPU pass scales its saved gradient in place: a second backward through the
    same graph must fail loudly, not return a doubly scaled gradient."""
    blda = fitted_loss(3, tau=0.5)
    logits, labels = make_batch(3, seed=4)
    leaf = logits.clone().requires_grad_(True)
    loss = blda(leaf, labels, domain="source", update=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_non_finite_logits_show_in_the_loss_as_in_cross_entropy():
    """A NaN or infinite logit of a labelled pixel makes that pixel's loss and gradient
    non-finite (F.cross_entropy gives NaN or inf there), others stay finite, ignored pixels 0."""
    blda = fitted_loss(4, tau=0.7, reduction="none")
    logits, labels = make_batch(4, seed=5)
    labelled = (labels[0, 0] != IGNORE).nonzero()[:, 0][:3].tolist()
    ignored = int((labels[0, 0] == IGNORE).nonzero()[0, 0])
    for column, value in zip(labelled, (float("nan"), float("inf"), float("-inf")), strict=True):
        other = (int(labels[0, 0, column]) + 1) % 4  # not the label's class
        logits[0, other, 0, column] = value
    logits[0, :, 0, ignored] = float("nan")
    leaf = logits.clone().requires_grad_(True)
    loss = blda(leaf, labels, domain="source", update=False)
    reference = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE)
    for column in labelled[:2]:  # NaN and +inf: torch's loss is not finite either
        assert not torch.isfinite(reference[0, 0, column])
        assert not torch.isfinite(loss[0, 0, column])
    assert not torch.isfinite(loss[0, 0, labelled[2]])  # -inf: refused as non-finite input
    assert loss[0, 0, ignored] == 0
    rest = torch.ones_like(loss, dtype=torch.bool)
    rest[0, 0, labelled] = False
    assert torch.isfinite(loss[rest]).all()
    loss.sum().backward()
    assert not torch.isfinite(leaf.grad[0, :, 0, labelled[0]]).all()
    assert (leaf.grad[0, :, 0, ignored] == 0).all()


def test_the_first_compiled_pass_of_a_process_keeps_torchs_thread_count():
    """numba's OpenMP layer shares libgomp with torch; its first parallel kernel in a process
    set torch's intra-op threads to numba's pool size. A fresh process (the pool not yet
    started) that asks torch for one thread still has one after the loss."""
    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from test_online import fitted_loss, make_batch\n"
        "blda = fitted_loss()\n"
        "logits, labels = make_batch(seed=7)\n"
        "blda(logits, labels)\n"
        "print(torch.get_num_threads())\n"
    )
    tests = Path(__file__).resolve().parent
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "1"
