"""Test-time image resizing as the base methods' mmcv pipelines do it.

mmseg's test pipeline (`LoadImageFromFile`, `MultiScaleFlipAug(img_scale=...)` with
`Resize(keep_ratio=True)`, `Normalize`) decodes a uint8 image, resizes the **uint8** image with
OpenCV (`mmcv.imrescale` -> `mmcv.imresize` -> `cv2.resize(..., INTER_LINEAR)`) and only then
normalises it. Resizing the normalised float tensor with torch instead (the older path,
`predict_logits(resize=...)`, kept) differs by up to half a grey level.

Keep-ratio rule (`mmcv.rescale_size`): with bounds `(a, b)` the factor is
`min(max(a, b) / long_side, min(a, b) / short_side)` and each side becomes
`int(side * factor + 0.5)`. mmcv loads BGR and `Normalize(to_rgb=True)` swaps to RGB; a
bilinear resize treats the channels independently, so resizing RGB gives the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from blda_tools.errors import BLDAError


def rescaled_size(size: Sequence[int], target: Sequence[int], keep_ratio: bool) -> tuple[int, int]:
    """`(height, width)` an image of `size` is resized to: `target` itself, or with
    `keep_ratio` the largest size within the bounds `target` with the same aspect ratio
    (mmcv's `rescale_size`)."""
    height, width = int(size[0]), int(size[1])
    if not keep_ratio:
        return int(target[0]), int(target[1])
    factor = min(max(target) / max(height, width), min(target) / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def resize_uint8(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """uint8 RGB images `(B, 3, H, W)` (CPU) resized to `size` = `(h, w)` with OpenCV's
    bilinear interpolation, as mmcv does; returns uint8 `(B, 3, h, w)`."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise BLDAError(
            f"resize: expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[2:]) == size:
        return images
    resized = np.empty((len(images), size[0], size[1], 3), dtype=np.uint8)
    for index, image in enumerate(images.cpu().permute(0, 2, 3, 1).numpy()):
        # cv2 takes (width, height) and a contiguous HWC array.
        resized[index] = cv2.resize(
            np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR
        )
    return torch.from_numpy(resized).permute(0, 3, 1, 2)
