"""The encoder-decoder wrapper every built-in model shares, and ImageNet input normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from blda_tools.errors import BLDAError

# ImageNet statistics on 0-255 RGB, as in mmseg's `img_norm_cfg`.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Turn 0-255 RGB images `(..., 3, H, W)` (uint8 or float) into ImageNet-normalised float32."""
    if images.dim() < 3 or images.shape[-3] != 3:
        raise BLDAError(
            f"normalize: images must have shape (..., 3, H, W) (RGB), got {tuple(images.shape)}"
        )
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise BLDAError(f"normalize: images must be uint8 or float 0-255, got {images.dtype}")
    if images.dtype == torch.uint8 and images.device.type == "cpu" and images.is_contiguous():
        return _normalize_by_table(images)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() - mean) / std


def normalisation_table() -> torch.Tensor:
    """`(3, 256)` float32: `normalize`'s value of every uint8 level in every channel, computed
    with the same float32 operations, so that looking a pixel up gives the same bits."""
    levels = torch.arange(256, dtype=torch.uint8).float()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1)
    return (levels[None] - mean) / std


_TABLE = None


def _normalize_by_table(images: torch.Tensor) -> torch.Tensor:
    """`normalize` of contiguous CPU uint8 images as one table lookup per channel plane
    (OpenCV's LUT: 0.13 ms instead of 0.93 for a 256 x 512 image, one thread)."""
    import cv2  # imported here: `blda_tools.models` stays importable without loading OpenCV

    global _TABLE
    if _TABLE is None:
        _TABLE = normalisation_table().numpy()
    normalised = torch.empty(images.shape, dtype=torch.float32)
    levels = images.reshape(-1, 3, *images.shape[-2:]).numpy()
    values = normalised.view(levels.shape).numpy()
    for image in range(levels.shape[0]):
        for channel in range(3):
            cv2.LUT(levels[image, channel], _TABLE[channel], dst=values[image, channel])
    return normalised


class Segmentor(nn.Module):
    """`backbone` (image -> list of feature maps) followed by `decode_head` (-> logits).

    Attributes used by the rest of the toolkit:
      * `feature_channels`: channels of the decoder features returned by
        `forward_with_features` (the input of an auxiliary 1 x 1 head);
      * `output_stride`: input size / logit size;
      * `optional_checkpoint_keys`: key prefixes that released checkpoints may carry although
        this model does not use them (dropped, and reported, when loading);
      * `test_protocol`: the name of the test protocol its family is evaluated with
        (`blda_tools.inference.protocols`), or None (whole images at native size);
      * `supports_training`: False for models blda can only run for inference (HRDA).
    """

    supports_training = True

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        *,
        feature_channels: int,
        output_stride: int,
        optional_checkpoint_keys: Sequence[str] = (),
        test_protocol: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.feature_channels = feature_channels
        self.output_stride = output_stride
        self.optional_checkpoint_keys = tuple(optional_checkpoint_keys)
        self.test_protocol = test_protocol

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(logits (B, C, h, w), decoder features (B, feature_channels, h, w))`."""
        return self.decode_head.forward_with_features(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `(B, C, H / output_stride, W / output_stride)` for normalised images."""
        return self.forward_with_features(images)[0]

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation of 0-255 RGB images (see `blda_tools.models.normalize`)."""
        return normalize(images)
