"""numpy arrays from what users pass (numpy, lists, torch tensors), without importing torch.

A value can only be a torch tensor if torch is already loaded, so `sys.modules` answers the
isinstance question for free: code paths that never meet torch (`blda diagnose`) never pay its
second of import time.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from blda_tools.errors import BLDAError


def loaded_torch():
    """The torch module if this process has imported it, else None."""
    return sys.modules.get("torch")


def is_tensor(value) -> bool:
    torch = loaded_torch()
    return torch is not None and isinstance(value, torch.Tensor)


def as_numpy(value) -> np.ndarray:
    """A numpy view or copy of `value`: tensors are detached and brought to the CPU (bfloat16,
    which numpy lacks, as float32, which holds it exactly); anything else via `np.asarray`."""
    if is_tensor(value):
        value = value.detach()
        if value.dtype == loaded_torch().bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(values, name: str = "logits") -> None:
    """For float64 `values` (numpy or torch) about to become float32: a BLDAError when a finite
    value lies beyond float32's range, where the cast would make it infinite (and the error
    would then wrongly say the input held infinities)."""
    array = as_numpy(values)
    if array.dtype != np.float64 or array.size == 0:
        return
    with np.errstate(invalid="ignore"):
        largest = np.nanmax(np.abs(np.where(np.isfinite(array), array, 0.0)))
    if largest > FLOAT32_MAX:
        raise BLDAError(
            f"{name}: finite values up to {largest:.3g} lie beyond the float32 range "
            f"(+-{FLOAT32_MAX:.3g}) they are computed in"
        )


# Eq. 7 takes differences of logits in float32 (f[l] - f[c]): beyond half the float32 range
# they overflow, and inf - inf made NaN scores from finite logits.
LARGEST_LOGIT = FLOAT32_MAX / 2


def check_eq7_logits(rows) -> None:
    """BLDAError unless every value of the float32 tensor `rows` is finite and within
    +-`LARGEST_LOGIT`: one `aminmax` pass (min and max propagate NaN and show infinities)."""
    if rows.numel() == 0:
        return
    low, high = (float(value) for value in loaded_torch().aminmax(rows))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise BLDAError("logits: contain NaN or infinite values")
    if max(-low, high) > LARGEST_LOGIT:
        raise BLDAError(
            f"logits: values up to {max(-low, high):.3g} in magnitude; Eq. 7 takes their "
            f"differences in float32 and needs them within +-{LARGEST_LOGIT:.3g}"
        )


def logit_rows(logits, num_classes: int):
    """`logits` as rows ``(n, C)``, and the shape of the maps they came from: maps ``(B, C, H,
    W)`` (any number of spatial dimensions, a model's output) give one row per pixel and
    ``(B, H, W)``; rows ``(n, C)`` give themselves and None. For numpy arrays and torch tensors
    alike (a view where the layout allows); a BLDAError names any other shape, or a dtype that
    is not floating point."""
    shape = tuple(logits.shape)
    pixels = None
    if len(shape) >= 3 and shape[1] == num_classes:
        pixels = (shape[0], *shape[2:])
        moved = logits.movedim(1, -1) if is_tensor(logits) else np.moveaxis(logits, 1, -1)
        logits = moved.reshape(-1, num_classes)
    if len(logits.shape) != 2 or logits.shape[1] != num_classes:
        raise BLDAError(
            f"logits: expected shape (n, {num_classes}) or (B, {num_classes}, H, W), got {shape}"
        )
    floating = logits.is_floating_point() if is_tensor(logits) else logits.dtype.kind == "f"
    if not floating:
        dtype = str(logits.dtype).removeprefix("torch.")  # the same name for both
        raise BLDAError(f"logits: expected a floating-point array, got {dtype}")
    return logits, pixels
