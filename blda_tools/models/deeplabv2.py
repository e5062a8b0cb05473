"""DeepLabV2 with a ResNet-101 V1c backbone, as in the DAFormer-family trainers (`dlv2red`).

Names follow mmsegmentation 0.16 (`ResNetV1c`, `DLV2Head`) so the UDA checkpoints of DAFormer,
HRDA's and MIC's DeepLabV2 baselines load unchanged:
  * a deep stem of three 3 x 3 convs (`stem.0/1/3/4/6/7`, conv + BN pairs with ReLUs between);
  * bottlenecks with the stride on the 3 x 3 conv ("pytorch" style), `conv1..3`, `bn1..3`,
    `downsample.0` (1 x 1 conv) and `downsample.1` (BN);
  * stages 3 and 4 dilated (2 and 4, first block contracted to 1 and 2): output stride 8;
  * the classifier is the ASPP itself: parallel 3 x 3 convs with bias, outputs summed.
DAFormer's `deeplabv2red` config keeps only dilations 6 and 12 of the original (6, 12, 18, 24),
reproducing earlier UDA code whose classifier returned inside its loop after two branches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

RESNET101_BLOCKS = (3, 4, 23, 3)
DLV2_REDUCED_DILATIONS = (6, 12)


class Bottleneck(nn.Module):
    """1 x 1 reduce, 3 x 3 (strided, dilated), 1 x 1 expand (x4), residual."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_stage(
    in_channels: int, planes: int, num_blocks: int, stride: int, dilation: int
) -> nn.Sequential:
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    # contract_dilation=True: the first block of a dilated stage uses half the dilation.
    first_dilation = dilation // 2 if dilation > 1 else 1
    blocks = [
        Bottleneck(
            in_channels, planes, stride=stride, dilation=first_dilation, downsample=downsample
        )
    ]
    blocks += [Bottleneck(out_channels, planes, dilation=dilation) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class ResNetV1c(nn.Module):
    """ResNet with a deep stem; strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) per stage."""

    def __init__(self, blocks_per_stage: Sequence[int] = RESNET101_BLOCKS) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        in_channels = 64
        for index, num_blocks in enumerate(blocks_per_stage):
            planes = 64 * 2**index
            stage = _make_stage(in_channels, planes, num_blocks, strides[index], dilations[index])
            setattr(self, f"layer{index + 1}", stage)
            in_channels = planes * Bottleneck.expansion
        self.out_channels = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        features = []
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            features.append(x)
        return features


class ClassifierConv(nn.Module):
    """mmcv ConvModule without norm or activation: just `conv` (with bias)."""

    def __init__(self, in_channels: int, num_classes: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=dilation, dilation=dilation)
        nn.init.normal_(self.conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DLV2Head(nn.Module):
    """Sum of parallel dilated 3 x 3 classifiers on the last backbone stage."""

    def __init__(
        self, in_channels: int, num_classes: int, dilations: Sequence[int] = DLV2_REDUCED_DILATIONS
    ) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ClassifierConv(in_channels, num_classes, dilation) for dilation in dilations
        )

    def forward_with_features(
        self, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The classifier is the whole head, so the "features" are the backbone's last stage.
        last_stage = features[-1]
        logits = torch.stack([branch(last_stage) for branch in self.aspp_modules]).sum(dim=0)
        return logits, last_stage

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_with_features(features)[0]
