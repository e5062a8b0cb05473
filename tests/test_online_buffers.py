"""The recycled gradient buffers: an array is reused only once no tensor holds it, so a gradient
the caller keeps is never overwritten by a later call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blda_tools.online.buffers import BufferPool
from blda_tools.online.loss import BLDALoss


def test_a_freed_buffer_is_reused_and_a_held_one_never():
    pool = BufferPool(capacity=3)
    first = pool.empty((2, 3, 4))
    address = first.data_ptr()
    second = pool.empty((2, 3, 4))  # `first` is alive: a new array
    assert second.data_ptr() != address
    view = first.view(-1)[5:]  # a view keeps the array in use too
    del first
    assert pool.empty((2, 3, 4)).data_ptr() not in (address, second.data_ptr())
    del view
    assert pool.empty((6, 4)).data_ptr() == address  # same size, any shape


def test_the_pool_stays_within_its_capacity_when_sizes_change():
    pool = BufferPool(capacity=2)
    held = [pool.empty((n,)) for n in (10, 20, 30, 40)]  # all alive: the oldest are dropped
    assert len(pool._arrays) == 2
    held[2].fill_(3.0)
    del held[3]
    again = pool.empty((40,))
    assert again.numel() == 40 and torch.all(held[2] == 3.0)
    assert len(pool._arrays) == 2


def test_kept_gradients_survive_later_calls_of_the_loss():
    """The gradient of each call equals plain cross-entropy's on f - tau Delta (Delta from the
    loss's own offsets), also while earlier gradients are still held by the caller."""
    generator = torch.Generator().manual_seed(0)
    loss = BLDALoss(4, min_samples=20)
    kept, expected = [], []
    for _ in range(4):
        logits = torch.randn(2, 4, 16, 16, generator=generator)
        labels = torch.randint(0, 4, (2, 16, 16), generator=generator)
        leaf = logits.clone().requires_grad_(True)
        loss(leaf, labels).backward()
        kept.append(leaf.grad)  # held, not copied
        adjusted = (logits - loss.tau * loss.offsets(logits, labels)).requires_grad_(True)
        F.cross_entropy(adjusted, labels, ignore_index=255).backward()
        expected.append(adjusted.grad)
    for gradient, reference in zip(kept, expected, strict=True):
        torch.testing.assert_close(gradient, reference, rtol=1e-5, atol=1e-7)
