"""Decoder heads for the MiT encoder: DAFormer (context-aware fusion) and SegFormer (all-MLP).

Attribute names follow the DAFormer-family mmsegmentation code so checkpoints load unchanged:
`embed_layers.<i>.proj`, `fuse_layer.aspp_modules.<j>`, `fuse_layer.bottleneck`, `conv_seg`
(DAFormer head) and `linear_c.<i>.proj`, `linear_fuse`, `linear_pred` (SegFormer head as
re-implemented in DAFormer; NVlabs' original names are converted in `checkpoints.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blda_tools.models.blocks import ConvModule, DepthwiseSeparableConvModule, tokens_to_grid

# Separable ASPP fusion of DAFormer's `daformer_sepaspp_mitb5.py` config.
DAFORMER_FUSION_DILATIONS = (1, 6, 12, 18)


class LinearEmbedding(nn.Module):
    """Per-pixel linear projection of a feature map (mmseg's `MLP`, parameters under `proj`)."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        return tokens_to_grid(self.proj(x.flatten(2).transpose(1, 2)), height, width)


def _embed_and_upsample(
    embeddings: nn.ModuleDict, features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Embed every stage, resize to the finest stage and concatenate in stage order."""
    target_size = features[0].shape[2:]
    embedded = []
    for index, feature in enumerate(features):
        x = embeddings[str(index)](feature)
        if x.shape[2:] != target_size:
            x = F.interpolate(x, size=target_size, mode="bilinear", align_corners=False)
        embedded.append(x)
    return torch.cat(embedded, dim=1)


class SeparableASPPFusion(nn.Module):
    """DAFormer's context-aware fusion: parallel (separable) atrous branches, then a 3 x 3 conv.

    The 1 x 1 branch (dilation 1) is a plain ConvModule; the others are depthwise separable,
    as in mmseg's `DepthwiseSeparableASPPModule`. No image pooling branch (`pool=False`).
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1)
            if dilation == 1
            else DepthwiseSeparableConvModule(in_channels, channels, 3, dilation=dilation)
            for dilation in dilations
        )
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [branch(x) for branch in self.aspp_modules]
        return self.bottleneck(torch.cat(branches, dim=1))


class DAFormerHead(nn.Module):
    """Linear embedding of each MiT stage, separable-ASPP fusion, dropout, 1 x 1 classifier.

    `fusion="conv1"` replaces the separable ASPP by one 1 x 1 ConvModule (BN + ReLU), the
    `daformer_conv1` layout that HRDA's scale-attention head uses (`models/hrda.py`).
    `regression_head=True` adds the 1 x 1 `conv_reg` (one channel) that the BLDA release trains
    on the fused features; its checkpoints carry `decode_head.conv_reg.*`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        embed_dim: int = 256,
        channels: int = 256,
        dilations: Sequence[int] = DAFORMER_FUSION_DILATIONS,
        dropout_ratio: float = 0.1,
        regression_head: bool = False,
        fusion: str = "aspp",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.embed_layers = nn.ModuleDict(
            {str(index): LinearEmbedding(c, embed_dim) for index, c in enumerate(in_channels)}
        )
        fused_channels = embed_dim * len(in_channels)
        if fusion == "aspp":
            self.fuse_layer = SeparableASPPFusion(fused_channels, channels, dilations)
        elif fusion == "conv1":
            self.fuse_layer = ConvModule(fused_channels, channels, 1)
        else:
            raise ValueError(f"DAFormerHead: fusion must be 'aspp' or 'conv1', got {fusion!r}")
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.conv_reg = nn.Conv2d(channels, 1, 1) if regression_head else None
        _init_classifier(self.conv_seg)

    def forward_with_features(
        self, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.fuse_layer(_embed_and_upsample(self.embed_layers, features))
        return self.conv_seg(self.dropout(fused)), fused

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_with_features(features)[0]


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder: linear embeddings, 1 x 1 fusion conv + BN + ReLU, classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        embed_dim: int = 768,
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.channels = embed_dim
        self.linear_c = nn.ModuleDict(
            {str(index): LinearEmbedding(c, embed_dim) for index, c in enumerate(in_channels)}
        )
        self.linear_fuse = ConvModule(embed_dim * len(in_channels), embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        _init_classifier(self.linear_pred)

    def forward_with_features(
        self, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.linear_fuse(_embed_and_upsample(self.linear_c, features))
        return self.linear_pred(self.dropout(fused)), fused

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_with_features(features)[0]


def _init_classifier(conv: nn.Conv2d) -> None:
    # mmseg initialises the classifier with N(0, 0.01) and zero bias.
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
