"""Recycled float32 buffers for the fused cross-entropy's gradient (CPU).

The gradient of Eq. 9 is a fresh ``(B, C, H, W)`` tensor every call (it becomes the caller's
`logits.grad`), 40 MB for 2 x 19 x 512 x 512. glibc serves a block that large with its own
mapping and unmaps it on free, so each call page-faults all of it back in: measured about 10 ms
of the loss's 25 ms fused pass on a 2-core VM (benchmarks/bench_online_loss.py). This pool keeps
the arrays it handed out; once no tensor uses one any more (its only reference is the pool's),
the next call of the same size writes into it again, with no fault and no zeroing.

A handed-out buffer is an ordinary tensor (from `torch.from_numpy`): the caller may keep it,
accumulate into it or free it. The pool only reuses an array nobody else references, so a kept
gradient is never overwritten; the cost is up to `capacity` arrays kept resident.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch
from torch import Tensor

# References to an array nobody else holds: the pool's list entry and getrefcount's argument.
_UNUSED_REFERENCES = 2


class BufferPool:
    """Up to `capacity` float32 numpy arrays, reused once their tensors are gone."""

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = int(capacity)
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...]) -> Tensor:
        """An uninitialised float32 CPU tensor of `shape`, on a recycled array when one of
        exactly that size is unused."""
        count = int(np.prod(shape, dtype=np.int64))
        with self._lock:
            array = self._unused(count)
            if array is None:
                array = np.empty(count, dtype=np.float32)
                self._keep(array)
        return torch.from_numpy(array).view(shape)

    def _unused(self, count: int) -> np.ndarray | None:
        for array in self._arrays:
            if array.size == count and sys.getrefcount(array) <= _UNUSED_REFERENCES + 1:
                return array  # + 1: the loop variable
        return None

    def _keep(self, array: np.ndarray) -> None:
        """Remember `array`; past the capacity an unused array (else the oldest) is dropped, so
        a changing input size never grows the pool."""
        if len(self._arrays) >= self.capacity:
            unused = [
                i
                for i, kept in enumerate(self._arrays)
                if sys.getrefcount(kept) <= _UNUSED_REFERENCES + 1
            ]
            del self._arrays[unused[0] if unused else 0]
        self._arrays.append(array)


GRADIENTS = BufferPool()
