"""The per-pixel passes of `BLDALoss` on a CPU, compiled with numba.

- `lookup_offsets`: for every class c of every pixel, the cell (row, c), the piece of its table
  that z = f[c] falls in and a + b z (`OffsetTables`), optionally plus z itself, so the
  adjusted logits f - tau Delta of Eq. 9 come out of the same pass (no offsets tensor, no
  second pass over the logits). In eager torch the lookup is a dozen passes over the
  (B, C, P) logits (the path of every other device, in `OffsetTables.gather`).
- `cdf_targets`: d = F_yy(f[y]) of Eq. 10 for every pixel, interpolated on the CDF nodes of its
  diagonal cell where f[y] lies on that cell's grid, the exact mixture CDF elsewhere.

The lookup's threads split blocks of pixels (their count follows torch's); the other passes
(a few operations per pixel, not per pixel and class) run in one thread: a parallel region
costs a scheduler slice on a busy machine.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import torch
from torch import Tensor

from blda_tools.runtime.jit import kernel

# Pixels per task: each task reads C x BLOCK logits and writes as many outputs.
BLOCK = 4096
_SQRT_HALF = math.sqrt(0.5)


@kernel(parallel=True)
def _lookup(logits, row, origin, inverse_step, pieces, points, add, out):  # pragma: no cover
    batch, classes, size = logits.shape
    blocks = (size + BLOCK - 1) // BLOCK
    top = np.float32(points)
    zero = np.float32(0.0)
    stride, width = np.uint64(points + 1), np.uint64(classes)
    for task in numba.prange(batch * blocks):
        image = task // blocks
        start = (task % blocks) * BLOCK
        stop = min(size, start + BLOCK)
        image_rows, image_logits, image_out = row[image], logits[image], out[image]
        for c in range(classes):
            z_plane, out_plane, column = image_logits[c], image_out[c], np.uint64(c)
            for p in range(start, stop):
                # unsigned indices: no negative-index wrap-around code, about 2x faster
                cell = np.uint64(image_rows[p]) * width + column
                z = z_plane[p]
                position = z * inverse_step[cell] + origin[cell]
                # selects, not branches; NaN logits land on piece 0 and the result stays NaN
                position = position if position >= zero else zero
                position = position if position <= top else top
                index = cell * stride + np.uint64(np.int64(position))
                offset = pieces[index, 0] + pieces[index, 1] * z
                out_plane[p] = z + offset if add else offset


@kernel
def _rows(labels, valid, in_target, active, out):  # pragma: no cover - numba
    batch, size = labels.shape
    classes = active.size // 2
    for image in range(batch):
        for p in range(size):
            row = labels[image, p] + classes if in_target[image, p] else labels[image, p]
            out[image, p] = row if valid[image, p] and active[row] else 2 * classes


def table_rows(labels: Tensor, valid: Tensor, in_target: Tensor, active: Tensor) -> Tensor:
    """(B, P) int32: each pixel's table row, set * C + label where `active` ``(2 C,)`` allows
    and the pixel is valid, else the zero row 2 C (see `BLDALoss._offsets`)."""
    out = torch.empty(labels.shape, dtype=torch.int32)
    _rows(
        labels.contiguous().numpy(),
        valid.contiguous().numpy(),
        in_target.contiguous().numpy(),
        active.contiguous().numpy(),
        out.numpy(),
    )
    return out


def lookup_offsets(
    logits: Tensor,
    row: Tensor,
    origin: Tensor,
    inverse_step: Tensor,
    pieces: Tensor,
    points: int,
    add_logits: bool = False,
) -> Tensor:
    """a + b z for every pixel and class (see `OffsetTables`), plus z with `add_logits`: logits
    ``(B, C, P)`` float32 on the CPU, row ``(B, P)``, the tables as `OffsetTables` holds them."""
    logits = logits.contiguous()
    out = torch.empty_like(logits)
    with _numba_threads():
        _lookup(
            logits.numpy(),
            np.ascontiguousarray(row.to(torch.int32).numpy()),
            origin.contiguous().numpy(),
            inverse_step.contiguous().numpy(),
            pieces.contiguous().numpy(),
            int(points),
            bool(add_logits),
            out.numpy(),
        )
    return out


@kernel
def _cdf_targets(
    logits, labels, valid, in_target, fitted, weights, means, inv_std, tables, origin,
    inverse_step, nodes, target, available,
):  # pragma: no cover - numba  # fmt: skip
    batch, classes, size = logits.shape
    points = nodes.shape[1]
    blocks = (size + BLOCK - 1) // BLOCK
    last = np.float32(points - 1)
    for task in range(batch * blocks):
        image = task // blocks
        start = (task % blocks) * BLOCK
        for p in range(start, min(size, start + BLOCK)):
            label = labels[image, p]
            row = label + classes if in_target[image, p] else label
            if not (valid[image, p] and fitted[row]):
                target[image, p], available[image, p] = 0.0, False
                continue
            available[image, p] = True
            z = logits[image, label, p]
            if tables:
                cell = row * classes + label
                position = z * inverse_step[cell] + origin[cell] - np.float32(1.0)
                if position >= 0.0 and position <= last:
                    left = min(np.int32(position), points - 2)
                    fraction = position - np.float32(left)
                    below, above = nodes[row, left], nodes[row, left + 1]
                    target[image, p] = below + fraction * (above - below)
                    continue
            total = 0.0  # the exact mixture CDF: sum_k pi_k Phi((z - mu_k) / sigma_k)
            for k in range(weights.shape[1]):
                standard = (np.float64(z) - means[row, k]) * inv_std[row, k]
                total += weights[row, k] * 0.5 * math.erfc(-standard * _SQRT_HALF)
            target[image, p] = min(max(total, 0.0), 1.0)


def cdf_targets(logits, labels, valid, in_target, fitted, diagonal, floor, tables=None):
    """(target, available) ``(B, P)`` of Eq. 10 (see `BLDALoss._cdf_targets`): logits ``(B, C,
    P)`` float32 on the CPU; labels, valid, in_target ``(B, P)``; fitted ``(2 C,)`` bool, the
    diagonal cells' (weights, means, variances) ``(2 C, K)``, variances clamped at `floor`;
    `tables` an `OffsetTables` whose CDF nodes are interpolated inside each grid, or None."""
    batch, _, size = logits.shape
    weights, means, variances = (p.double().contiguous() for p in diagonal)
    inv_std = variances.clamp_min(floor).rsqrt()
    if tables is None:
        origin = inverse_step = torch.zeros(1)
        nodes = torch.zeros(1, 2)
    else:
        origin, inverse_step, nodes = tables.origin, tables.inverse_step, tables.cdf_nodes
    target = torch.empty((batch, size), dtype=torch.float32)
    available = torch.empty((batch, size), dtype=torch.bool)
    _cdf_targets(
        logits.contiguous().numpy(),
        labels.contiguous().numpy(),
        valid.contiguous().numpy(),
        in_target.contiguous().numpy(),
        fitted.contiguous().numpy(),
        weights.numpy(),
        means.numpy(),
        inv_std.numpy(),
        tables is not None,
        origin.contiguous().numpy(),
        inverse_step.contiguous().numpy(),
        nodes.contiguous().numpy(),
        target.numpy(),
        available.numpy(),
    )
    return target, available


@contextlib.contextmanager
def _numba_threads():
    """numba's thread count set to torch's meanwhile (capped at numba's pool)."""
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


@kernel
def _member_counts(group, member, groups):  # pragma: no cover - numba
    counts = np.zeros(groups, dtype=np.int64)
    for i in range(group.size):
        if member[i]:
            counts[group[i]] += 1
    return counts


def member_counts(group: Tensor, member: Tensor, groups: int) -> Tensor:
    """(groups,) int64: how many `member` pixels each group has; group, member flat ``(N,)``."""
    return torch.from_numpy(_member_counts(group.numpy(), member.numpy(), int(groups)))


@kernel
def _below_threshold(key, group, member, threshold):  # pragma: no cover - numba
    found = 0
    for i in range(key.size):
        if member[i] and key[i] < threshold[group[i]]:
            found += 1
    out = np.empty(found, dtype=np.int64)
    found = 0
    for i in range(key.size):
        if member[i] and key[i] < threshold[group[i]]:
            out[found] = i
            found += 1
    return out


def below_threshold(key: Tensor, group: Tensor, member: Tensor, threshold: Tensor) -> Tensor:
    """The positions (ascending, int64) of the member pixels whose key is below their group's
    threshold; key, group, member flat ``(N,)``, threshold ``(groups,)``."""
    arrays = (t.contiguous().numpy() for t in (key, group, member, threshold))
    return torch.from_numpy(_below_threshold(*arrays))


@kernel
def _pixel_logits(logits, pixel, out):  # pragma: no cover - numba
    classes, size = logits.shape[1], logits.shape[2]
    for c in range(classes):
        for i in range(pixel.size):
            out[i, c] = logits[pixel[i] // size, c, pixel[i] % size]


def pixel_logits(logits: Tensor, pixel: Tensor) -> Tensor:
    """(m, C) float32: the logits of the flat pixel indices `pixel` of ``(B, C, P)`` logits."""
    out = torch.empty((pixel.numel(), logits.shape[1]), dtype=torch.float32)
    _pixel_logits(logits.contiguous().numpy(), pixel.contiguous().numpy(), out.numpy())
    return out
