"""Small building blocks whose attribute names match mmcv's, so state-dict keys match mmseg's.

mmcv's `ConvModule` stores its layers as `conv` and, for batch norm, `bn` (mmcv infers the
name "bn" from any `_BatchNorm` subclass); `DepthwiseSeparableConvModule` holds two of them as
`depthwise_conv` and `pointwise_conv`. Checkpoints written by mmsegmentation therefore carry keys
such as `fuse_layer.bottleneck.conv.weight` and `fuse_layer.bottleneck.bn.running_mean`.
"""

from __future__ import annotations

import torch
from torch import nn


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(B, H * W, C)` tokens as a `(B, C, H, W)` view, channels-last in memory (no copy).

    Why not `tokens.transpose(1, 2).reshape(B, C, H, W)`: it views the same memory, but with
    batch 1 its batch stride is C rather than H * W * C, so torch does not recognise the
    layout as channels-last; upsampling and concatenation then run strided copies, which took
    two thirds of a SegFormer-B0 forward at 256 x 512 on a CPU.
    """
    batch, _, channels = tokens.shape
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class ConvModule(nn.Module):
    """Convolution, optional batch norm, optional ReLU (mmcv's default conv/norm/act order).

    As in mmcv, the convolution has a bias only when there is no norm layer after it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        norm: bool = True,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=not norm,
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise k x k ConvModule followed by a pointwise 1 x 1 ConvModule, both with BN + ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.depthwise_conv = ConvModule(
            in_channels,
            in_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training."""

    def __init__(self, drop_probability: float = 0.0) -> None:
        super().__init__()
        self.drop_probability = drop_probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_probability == 0.0 or not self.training:
            return x
        keep_probability = 1.0 - self.drop_probability
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        keep_mask = x.new_empty(mask_shape).bernoulli_(keep_probability)
        # Rescale so the expected value of the branch is unchanged.
        return x * keep_mask / keep_probability

    def extra_repr(self) -> str:
        return f"drop_probability={self.drop_probability}"
