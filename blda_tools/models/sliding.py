"""The sliding-window grid of mmseg's `slide_inference`, shared by the outer windows of
`blda_tools.inference.predict` and HRDA's detail crops inside a window (`models/hrda.py`)."""

from __future__ import annotations


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis, as mmseg: a grid `stride` apart, the last one flush with
    the end (windows are `min(crop, length)` long)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]
