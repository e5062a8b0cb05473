"""Turning what `LogitWriter.add` is given (maps or rows, numpy or torch) into checked rows."""

from __future__ import annotations

import numpy as np
import torch

from blda_tools.errors import BLDAError
from blda_tools.store.schema import FLOAT16_MAX, _checked_int


def _as_array(value, what: str, where: str) -> np.ndarray:
    """A numpy view or copy of a numpy array or torch tensor (moved to the CPU)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise BLDAError(
        f"{where}: {what} must be a numpy array or torch tensor, got {type(value).__name__}"
    )


def _map_rows(logits, labels, stride, image_size, pixel_index, where):
    """Rows `(h * w, C)` of a `(C, H, W)` map sampled every `stride` pixels, row-major."""
    num_classes, height, width = logits.shape
    if height == 0 or width == 0:
        raise BLDAError(f"{where}: the logit map {tuple(logits.shape)} has no pixels")
    if pixel_index is not None:
        raise BLDAError(
            f"{where}: pixel_index is for (N, C) rows; a (C, H, W) map gives its own positions"
        )
    if image_size is not None and tuple(image_size) != (height, width):
        raise BLDAError(
            f"{where}: image_size {tuple(image_size)} differs from the map's size {(height, width)}; "
            "pass the full-resolution map, the writer keeps every stride-th pixel"
        )
    labels = _map_labels(labels, (height, width), stride, f"logits {tuple(logits.shape)}", where)
    strided = logits[:, ::stride, ::stride]
    if isinstance(strided, torch.Tensor):
        rows = strided.permute(1, 2, 0)  # (h, w, C) view: `_torch_rows` copies it once
    else:
        rows = np.ascontiguousarray(strided.reshape(num_classes, -1).T)
    return rows, labels, {"height": height, "width": width, "stride": stride, "kind": "map"}


def _map_labels(labels, size, stride, matched: str, where):
    """A map's `(H, W)` labels (checked against `size`) as the rows keep them: every `stride`-th
    pixel, row-major; `matched` names what they must match in the error."""
    if labels is None:
        return None
    if labels.shape != tuple(size):
        raise BLDAError(
            f"{where}: labels have shape {labels.shape}; expected {tuple(size)} to match {matched}"
        )
    return np.ascontiguousarray(labels[::stride, ::stride]).reshape(-1)


def _laid_out_map_rows(rows, labels, image_size, stride, largest, store, where):
    """Checked `(rows, labels, record)` of a map laid out by the caller
    (`LogitWriter.prepare_map_rows`); `store` is `(num_classes, dtype)`."""
    num_classes, dtype = store
    height, width = (_checked_int(v, "image_size", where, minimum=1) for v in image_size)
    count = -(-height // stride) * -(-width // stride)
    if isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.shape[1] != num_classes:
        # the same words as `prepare`: usually a model of another class count
        raise BLDAError(
            f"{where}: logits have {rows.shape[1]} classes; the store has {num_classes}"
        )
    if (
        not isinstance(rows, np.ndarray)
        or rows.shape != (count, num_classes)
        or rows.dtype != np.dtype(dtype)
        or not rows.flags.c_contiguous
    ):
        shape = getattr(rows, "shape", type(rows).__name__)
        raise BLDAError(
            f"{where}: laid-out rows must be C-contiguous {dtype} ({count}, {num_classes}) for a "
            f"{height} x {width} map at stride {stride}, got {getattr(rows, 'dtype', '')} {shape}"
        )
    if not np.isfinite(largest):
        raise BLDAError(f"{where}: logits contain NaN or Inf")
    _check_float16_range(largest, dtype, where)
    labels = _map_labels(labels, (height, width), stride, "the map", where)
    return rows, labels, {"height": height, "width": width, "stride": stride, "kind": "map"}


def _sample_rows(logits, labels, stride, pixel_index, image_size, where):
    """Rows `(N, C)` that do not form a map, optionally with their flat pixel positions."""
    if stride != 1:
        raise BLDAError(
            f"{where}: stride={stride} applies to (C, H, W) maps; (N, C) rows are stored as given"
        )
    count = logits.shape[0]
    if labels is not None and labels.shape != (count,):
        raise BLDAError(
            f"{where}: labels have shape {labels.shape}; expected ({count},) to match logits {tuple(logits.shape)}"
        )
    height = width = 0
    if image_size is not None:
        height, width = (_checked_int(v, "image_size", where, minimum=1) for v in image_size)
    if pixel_index is not None:
        pixel_index = _as_array(pixel_index, "pixel_index", where)
        if image_size is None:
            raise BLDAError(f"{where}: pixel_index needs image_size=(H, W) of the full label map")
        if pixel_index.shape != (count,) or pixel_index.dtype.kind not in "iu":
            raise BLDAError(
                f"{where}: pixel_index must be ({count},) integers, got {pixel_index.dtype} {pixel_index.shape}"
            )
        if count and (pixel_index.min() < 0 or pixel_index.max() >= height * width):
            raise BLDAError(
                f"{where}: pixel_index values must lie in [0, {height * width}) for image_size {(height, width)}"
            )
        pixel_index = pixel_index.astype(np.int64, copy=False)
    return (
        logits,
        labels,
        pixel_index,
        {"height": height, "width": width, "stride": 1, "kind": "samples"},
    )


# Tensors of these dtypes are checked and cast in torch (`_torch_rows`); the cast from them
# rounds exactly as numpy's. Others (float64: no double rounding through float32) go to numpy.
TORCH_CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_torch_castable(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in TORCH_CAST_DTYPES


def _torch_rows(rows: torch.Tensor, dtype: str, where: str) -> np.ndarray:
    """C-contiguous `(N, C)` numpy rows of `dtype` from `(..., C)` logits, checked in torch.

    One copy casts and lays the rows out (torch's copy is multi-threaded, numpy's checks and
    cast are not); one `aminmax` pass gives both finiteness (NaN propagates, Inf is an extreme)
    and the float16 range. For float16 it runs on the cast rows, half the bytes of float32:
    a NaN or Inf stays one, and a value beyond the range becomes Inf or the largest float16,
    so the cast rows reach +-FLOAT16_MAX or beyond whenever the logits leave the range (and
    then the numpy check decides on the logits themselves). A failure is reported by the
    numpy check, with its position.
    """
    rows = rows.detach()
    num_classes = rows.shape[-1]
    stored = torch.empty(rows.shape, dtype=getattr(torch, dtype))
    stored.copy_(rows)
    if rows.numel():
        checked = stored if dtype == "float16" else rows
        # The same elements in memory order: a reduction over a transposed view is ~6x slower.
        memory_order = sorted(range(checked.dim()), key=lambda dim: -checked.stride(dim))
        low, high = (float(v) for v in torch.aminmax(checked.permute(memory_order)))
        extreme = max(-low, high)
        suspect = extreme >= FLOAT16_MAX if dtype == "float16" else False
        if not (np.isfinite(low) and np.isfinite(high)) or suspect:
            _check_logit_values(
                _as_array(rows.reshape(-1, num_classes), "logits", where), dtype, where
            )
    return stored.reshape(-1, num_classes).numpy()


def _check_logit_values(rows: np.ndarray, dtype: str, where: str) -> None:
    if rows.dtype.kind != "f":
        raise BLDAError(f"{where}: logits must be floating point, got {rows.dtype}")
    if not np.isfinite(rows).all():
        bad = np.argwhere(~np.isfinite(rows))[0]
        raise BLDAError(
            f"{where}: logits contain NaN or Inf (first at row {bad[0]}, class {bad[1]})"
        )
    if dtype == "float16" and rows.size:
        _check_float16_range(float(np.abs(rows).max()), dtype, where)


def _check_float16_range(largest: float, dtype: str, where: str) -> None:
    """Refuses a largest magnitude a float16 store cannot hold."""
    if dtype == "float16" and largest > FLOAT16_MAX:
        raise BLDAError(
            f"{where}: logits reach {largest:.6g}, beyond the float16 range (+-{FLOAT16_MAX:g}); "
            'store them with dtype="float32" (`blda dump-logits --float32`)'
        )


def _check_label_values(
    labels: np.ndarray, num_classes: int, ignore_index: int, where: str
) -> None:
    if labels.dtype.kind not in "iu":
        raise BLDAError(f"{where}: labels must be integers, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise BLDAError(
            f"{where}: label {labels[bad][0]} is not a class in [0, {num_classes}) nor the ignore index {ignore_index}"
        )
