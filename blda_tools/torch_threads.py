"""`torch_threads`: torch's intra-op thread count changed for a block of work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` meanwhile (process-wide), restored afterwards.

    Used where the caller runs its own threads: torch's OpenMP workers, spinning after each
    multi-threaded torch call, would take cores from them.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
