"""One BLDA state on every process of a distributed run (DDP).

`RankSync` is the only place the online statistics talk to `torch.distributed`: class counts are
summed over the processes and the drawn samples are gathered, in rank order, so every process
runs the same EM on the same samples and holds the same mixtures, equal to one process that
sees the whole global batch (the concatenation of the ranks' batches). Without an initialised
process group (or with one process) every method is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class RankSync:
    """Sum and gather across the processes of `group` (None: the default group)."""

    def __init__(self, group=None, enabled: bool = True) -> None:
        self.group = group
        self.active = (
            bool(enabled)
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1

    def sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of `tensor` over the processes (a new tensor)."""
        total = tensor.clone()
        if self.active:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def sizes(self, count: int, device) -> list[int]:
        """`count` of every process, in rank order."""
        if not self.active:
            return [int(count)]
        local = torch.tensor([int(count)], dtype=torch.int64, device=device)
        every = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(every, local, group=self.group)
        return [int(size) for size in torch.cat(every).tolist()]

    def gather(self, rows: Tensor) -> Tensor:
        """The rows (dim 0) of every process concatenated in rank order; sizes may differ."""
        if not self.active:
            return rows
        sizes = self.sizes(rows.shape[0], rows.device)
        longest = max(sizes)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        every = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(every, padded, group=self.group)
        return torch.cat([part[:size] for part, size in zip(every, sizes, strict=True)])
