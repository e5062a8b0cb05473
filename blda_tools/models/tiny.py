"""A small CNN encoder-decoder (~0.2 M parameters) for CPU demos, tests and SynthCity runs.

Three conv stages at strides 4, 8 and 16, each projected to a common width, upsampled to
stride 4, concatenated and fused: a miniature of the DAFormer decoder layout,
so the same training code (backbone / decode_head parameter groups, auxiliary features) applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blda_tools.models.blocks import ConvModule

TINY_STAGE_CHANNELS = (24, 48, 96)


class TinyEncoder(nn.Module):
    """Strided 3 x 3 conv stages; returns feature maps at strides 4, 8 and 16."""

    def __init__(self, stage_channels: Sequence[int] = TINY_STAGE_CHANNELS) -> None:
        super().__init__()
        first, second, third = stage_channels
        self.stage1 = nn.Sequential(
            ConvModule(3, 16, 3, stride=2, padding=1),
            ConvModule(16, first, 3, stride=2, padding=1),
        )
        self.stage2 = nn.Sequential(
            ConvModule(first, second, 3, stride=2, padding=1),
            ConvModule(second, second, 3, padding=1),
        )
        self.stage3 = nn.Sequential(
            ConvModule(second, third, 3, stride=2, padding=1),
            ConvModule(third, third, 3, padding=2, dilation=2),
        )
        self.out_channels = tuple(stage_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stride4 = self.stage1(x)
        stride8 = self.stage2(stride4)
        return [stride4, stride8, self.stage3(stride8)]


class TinyDecoder(nn.Module):
    """1 x 1 projection per stage, upsampling to stride 4, fusion, 1 x 1 classifier."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64) -> None:
        super().__init__()
        self.channels = channels
        self.lateral = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels)
        # A 1 x 1 fusion and a depthwise 3 x 3 refinement: a dense 3 x 3 conv over all stages
        # at stride 4 would cost most of the model's compute.
        self.fuse = ConvModule(channels * len(in_channels), channels, 1)
        self.refine = ConvModule(channels, channels, 3, padding=1, groups=channels)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward_with_features(
        self, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = features[0].shape[2:]
        projected = [
            F.interpolate(lateral(x), size=size, mode="bilinear", align_corners=False)
            for lateral, x in zip(self.lateral, features, strict=True)
        ]
        fused = self.refine(self.fuse(torch.cat(projected, dim=1)))
        return self.conv_seg(fused), fused

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_with_features(features)[0]
