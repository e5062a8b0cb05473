"""The per-pixel passes of `BLDALoss` on a CPU, compiled with numba.

- `lookup_offsets`: for every class c of every pixel, the cell (row, c), the piece of its table
  that z = f[c] falls in and a + b z (`OffsetTables`). In eager torch the lookup is a dozen
  passes over the (B, C, P) logits (the path of every other device, in `OffsetTables.gather`).
- `adjusted_cross_entropy`: the same lookup fused with the cross-entropy of Eq. 9 and its
  gradient, one pass over the logits: no offsets tensor, no adjusted logits, no log-softmax
  kept for autograd (the loss's hot path on a CPU).
- `label_fields`: which pixels are labelled, their labels with 0 where ignored, and whether
  any lies outside the classes: one pass instead of six torch operations.
- `cdf_targets`: d = F_yy(f[y]) of Eq. 10 for every pixel, interpolated on the CDF nodes of its
  diagonal cell where f[y] lies on that cell's grid, the exact mixture CDF elsewhere.

The lookups' and the CDF pass's threads split blocks of pixels (their count follows torch's);
the sampling passes (a few operations per sampled pixel) run in one thread: a parallel region
costs a scheduler slice on a busy machine.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import torch
from torch import Tensor

from blda_tools.online.buffers import GRADIENTS
from blda_tools.runtime import float32_math
from blda_tools.runtime.float32_math import exp32, float32_from_bits, log32
from blda_tools.runtime.jit import kernel

# Pixels per task: each task reads C x BLOCK logits and writes as many outputs.
BLOCK = 4096
# Pixels per task of the fused cross-entropy: its C x LOSS_BLOCK adjusted logits stay in L2.
LOSS_BLOCK = 1024
_SQRT_HALF = math.sqrt(0.5)


@numba.njit(inline="always")
def _offset(z, cell, grids, pairs, stride, top):
    """a + b z from the piece of cell `cell`'s table that z falls in (see `OffsetTables`):
    `grids` ``(cells, 2)`` each cell's (inverse_step, origin), `pairs` each piece's (a, b) as
    one int64, so a lookup is one 8-byte gather (about 2x faster than two 4-byte ones)."""
    position = z * grids[cell, 0] + grids[cell, 1]
    # selects, not branches; NaN logits land on piece 0 and the result stays NaN
    position = position if position >= np.float32(0.0) else np.float32(0.0)
    position = position if position <= top else top
    pair = pairs[cell * stride + np.uint64(np.int64(position))]
    a = float32_from_bits(np.int32(pair & np.int64(0xFFFFFFFF)))  # little-endian: a first
    b = float32_from_bits(np.int32(pair >> np.int64(32)))
    return a + b * z


@kernel(parallel=True, depends_on=(float32_math,))
def _lookup(logits, row, grids, pairs, points, out):  # pragma: no cover - numba
    batch, classes, size = logits.shape
    blocks = (size + BLOCK - 1) // BLOCK
    top = np.float32(points)
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
                out_plane[p] = _offset(z_plane[p], cell, grids, pairs, stride, top)


@kernel(parallel=True, vectorise=True, depends_on=(float32_math,))
def _adjusted_cross_entropy(
    logits, row, labels, valid, grids, pairs, points, loss, gradient
):  # pragma: no cover - numba
    batch, classes, size = logits.shape
    blocks = (size + LOSS_BLOCK - 1) // LOSS_BLOCK
    top, zero, one = np.float32(points), np.float32(0.0), np.float32(1.0)
    lowest = np.float32(-80.0)
    stride, width = np.uint64(points + 1), np.uint64(classes)
    for task in numba.prange(batch * blocks):
        image = task // blocks
        start = (task % blocks) * LOSS_BLOCK
        stop = min(size, start + LOSS_BLOCK)
        count = stop - start
        peak = np.full(count, -np.inf, dtype=np.float32)
        own = np.zeros(count, dtype=np.float32)
        total = np.zeros(count, dtype=np.float32)
        # a - a: 0 for a finite value, NaN for NaN or an infinity; added to the loss and the
        # gradient so that a non-finite logit shows there, as in F.cross_entropy (the max and
        # the selects below would drop it)
        poison = np.zeros(count, dtype=np.float32)
        image_rows, image_labels = row[image, start:stop], labels[image, start:stop]
        for c in range(classes):  # the adjusted logits f + scale Delta (Eq. 9), kept in gradient
            z_plane, out = logits[image, c, start:stop], gradient[image, c, start:stop]
            column = np.uint64(c)
            for p in range(count):
                cell = np.uint64(image_rows[p]) * width + column
                z = z_plane[p]
                adjusted = z + _offset(z, cell, grids, pairs, stride, top)
                out[p] = adjusted
                poison[p] += adjusted - adjusted
                peak[p] = adjusted if adjusted > peak[p] else peak[p]
                own[p] = adjusted if image_labels[p] == c else own[p]
        for c in range(classes):  # exp(a_c - max a): the peak's term is 1, so total >= 1
            out = gradient[image, c, start:stop]
            for p in range(count):
                term = exp32(max(out[p] - peak[p], lowest))
                out[p] = term
                total[p] += term
        image_valid, image_loss = valid[image, start:stop], loss[image, start:stop]
        for p in range(count):  # -log softmax_y = max + log(total) - a_y; ignored pixels 0
            value = peak[p] + log32(total[p]) - own[p] + poison[p]
            image_loss[p] = value if image_valid[p] else zero
            total[p] = one / total[p] if image_valid[p] else zero
        for c in range(classes):  # d loss / d f_c = softmax_c - [c = y] (Delta is a constant)
            out = gradient[image, c, start:stop]
            for p in range(count):
                hit = one if image_valid[p] and image_labels[p] == c else zero
                value = out[p] * total[p] - hit + poison[p]
                out[p] = value if image_valid[p] else zero


def _table_arrays(tables) -> tuple[np.ndarray, np.ndarray, int]:
    """(grids, pairs, points) of an `OffsetTables` as the kernels read them (`_offset`)."""
    grids = torch.stack((tables.inverse_step, tables.origin), 1).contiguous().numpy()
    pairs = tables.pieces.contiguous().view(torch.int64).reshape(-1).numpy()
    return grids, pairs, int(tables.points)


def adjusted_cross_entropy(logits, row, labels, valid, tables) -> tuple[Tensor, Tensor]:
    """Cross-entropy of f + scale Delta (Eq. 9) per pixel ``(B, P)`` and its gradient in f
    ``(B, C, P)`` (Delta held constant), in one pass that never stores Delta: logits ``(B, C,
    P)`` float32 on the CPU, row / labels / valid ``(B, P)`` (labels of invalid pixels any
    class), `tables` an `OffsetTables`. Ignored pixels have loss 0 and gradient 0; a labelled
    pixel with a NaN or infinite logit gets NaN in both (its Eq. 6 offset is undefined)."""
    logits = logits.contiguous()
    loss = torch.empty(labels.shape, dtype=torch.float32)
    gradient = GRADIENTS.empty(tuple(logits.shape))  # every element is written below
    with _numba_threads():
        _adjusted_cross_entropy(
            logits.numpy(),
            np.ascontiguousarray(row.to(torch.int32).numpy()),
            labels.contiguous().numpy(),
            valid.contiguous().numpy(),
            *_table_arrays(tables),
            loss.numpy(),
            gradient.numpy(),
        )
    return loss, gradient


@kernel
def _label_fields(labels, ignore_index, classes, valid, clean):  # pragma: no cover - numba
    out_of_range = False
    for i in range(labels.size):
        label = labels[i]
        labelled = label != ignore_index
        valid[i] = labelled
        clean[i] = label if labelled else 0
        out_of_range |= labelled & ((label < 0) | (label >= classes))
    return out_of_range


def label_fields(labels: Tensor, ignore_index: int, classes: int) -> tuple[Tensor, Tensor, bool]:
    """For int64 labels of any shape: where a pixel is labelled (label != ignore_index), the
    labels with 0 at the others, and whether a labelled pixel lies outside [0, classes)."""
    valid = torch.empty(labels.shape, dtype=torch.bool)
    clean = torch.empty(labels.shape, dtype=torch.int64)
    flat = labels.contiguous().reshape(-1).numpy()
    args = (int(ignore_index), int(classes), valid.reshape(-1).numpy(), clean.reshape(-1).numpy())
    return valid, clean, bool(_label_fields(flat, *args))


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


def lookup_offsets(logits: Tensor, row: Tensor, tables) -> Tensor:
    """a + b z for every pixel and class of `tables` (an `OffsetTables`): logits ``(B, C, P)``
    float32 on the CPU, row ``(B, P)`` each pixel's table row."""
    logits = logits.contiguous()
    out = torch.empty_like(logits)
    with _numba_threads():
        _lookup(
            logits.numpy(),
            np.ascontiguousarray(row.to(torch.int32).numpy()),
            *_table_arrays(tables),
            out.numpy(),
        )
    return out


@kernel(parallel=True)
def _cdf_targets(
    logits, labels, valid, in_target, fitted, weights, means, inv_std, tables, origin,
    inverse_step, nodes, target, available,
):  # pragma: no cover - numba  # fmt: skip
    batch, classes, size = logits.shape
    points = nodes.shape[1]
    blocks = (size + BLOCK - 1) // BLOCK
    last = np.float32(points - 1)
    for task in numba.prange(batch * blocks):
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


def cdf_targets(
    logits, labels, valid, in_target, fitted, diagonal, floor, tables=None, threads=None
):
    """(target, available) ``(B, P)`` of Eq. 10 (see `BLDALoss._cdf_targets`): logits ``(B, C,
    P)`` float32 on the CPU; labels, valid, in_target ``(B, P)``; fitted ``(2 C,)`` bool, the
    diagonal cells' (weights, means, variances) ``(2 C, K)``, variances clamped at `floor`;
    `tables` an `OffsetTables` whose CDF nodes are interpolated inside each grid, or None;
    `threads` numba's threads (None: torch's)."""
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
    with _numba_threads(threads):
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
def _numba_threads(count: int | None = None):
    """numba's thread count set to `count` (None: torch's) meanwhile, capped at numba's pool.

    torch's own count is restored afterwards: numba's OpenMP threading layer shares libgomp
    with torch, and the first parallel kernel of a process set torch's intra-op threads to
    numba's pool size (measured on the 2-core VM: 1 -> 2), so a process that asked torch for
    one thread ran with two from then on, and its first training run differed by float
    rounding from every later identical one."""
    torch_count = torch.get_num_threads()
    count = torch_count if count is None else count
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
        if torch.get_num_threads() != torch_count:
            torch.set_num_threads(torch_count)


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
    for i in range(pixel.size):
        image = pixel[i] // size  # one integer division per pixel, not per pixel and class
        position = pixel[i] - image * size
        for c in range(classes):
            out[i, c] = logits[image, c, position]


def pixel_logits(logits: Tensor, pixel: Tensor) -> Tensor:
    """(m, C) float32: the logits of the flat pixel indices `pixel` of ``(B, C, P)`` logits."""
    out = torch.empty((pixel.numel(), logits.shape[1]), dtype=torch.float32)
    _pixel_logits(logits.contiguous().numpy(), pixel.contiguous().numpy(), out.numpy())
    return out


@kernel
def _pixel_class_logits(logits, pixel, columns, out):  # pragma: no cover - numba
    size = logits.shape[2]
    for i in range(pixel.size):
        image = pixel[i] // size
        position = pixel[i] - image * size
        for j in range(columns.shape[1]):
            out[i, j] = logits[image, columns[i, j], position]


def pixel_class_logits(logits: Tensor, pixel: Tensor, columns: Tensor) -> Tensor:
    """(m, k) float32: f[columns[i, j]] of flat pixel `pixel[i]` of ``(B, C, P)`` logits, for
    the classes `columns` ``(m, k)`` int64 of each pixel (the anchors' f[y] and drawn f[l])."""
    out = torch.empty(columns.shape, dtype=torch.float32)
    arrays = (t.contiguous().numpy() for t in (logits, pixel, columns))
    _pixel_class_logits(*arrays, out.numpy())
    return out
