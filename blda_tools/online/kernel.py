"""The per-pixel offset lookup of `OffsetTables.gather` on a CPU, compiled with numba.

One pass per (image, block of pixels): for every class c of every pixel, the cell (row, c),
the piece of its table that z = f[c] falls in and a + b z, while the pixels are in cache. In
eager torch the same lookup is a dozen passes over the (B, C, P) logits (the CUDA path in
`OffsetTables.gather`). Threads split the (image, block) tasks; their count follows torch's.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from blda_tools.runtime.jit import kernel

# Pixels per task: each task reads C x BLOCK logits and writes as many offsets.
BLOCK = 4096


@kernel(parallel=True)
def _lookup(logits, row, origin, inverse_step, pieces, points, out):  # pragma: no cover - numba
    batch, classes, size = logits.shape
    blocks = (size + BLOCK - 1) // BLOCK
    top = float(points)
    for task in numba.prange(batch * blocks):
        image = task // blocks
        start = (task % blocks) * BLOCK
        stop = min(size, start + BLOCK)
        for c in range(classes):
            for p in range(start, stop):
                cell = row[image, p] * classes + c
                z = logits[image, c, p]
                position = z * inverse_step[cell] + origin[cell]
                if not position >= 0.0:  # also NaN logits: piece 0, the result stays NaN
                    position = 0.0
                elif position > top:
                    position = top
                index = cell * (points + 1) + int(position)
                out[image, c, p] = pieces[index, 0] + pieces[index, 1] * z


def lookup_offsets(
    logits: Tensor, row: Tensor, origin: Tensor, inverse_step: Tensor, pieces: Tensor, points: int
) -> Tensor:
    """a + b z for every pixel and class (see `OffsetTables`): logits ``(B, C, P)`` float32 on
    the CPU, row ``(B, P)``, the tables as `OffsetTables` holds them."""
    logits = logits.contiguous()
    out = torch.empty_like(logits)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _lookup(
            logits.numpy(),
            np.ascontiguousarray(row.to(torch.int64).numpy()),
            origin.contiguous().numpy(),
            inverse_step.contiguous().numpy(),
            pieces.contiguous().numpy(),
            int(points),
            out.numpy(),
        )
    finally:
        numba.set_num_threads(previous)
    return out
