"""ResNet-50 / ResNet-101 image classifiers with torchvision's state-dict key names, so that
classifiers saved in that common layout (the paper's App. G, VisDA-2017) load unchanged;
torchvision itself is not needed.

Layout (torchvision `models/resnet.py`, ResNet v1.5): a 7 x 7 stride-2 `conv1` + `bn1` + ReLU +
3 x 3 stride-2 max pool; `layer1`...`layer4` of bottleneck blocks (`conv1` 1 x 1, `conv2`
3 x 3 carrying the block's stride, `conv3` 1 x 1 to 4x the width, `bn1`-`bn3`, and
`downsample.0` (1 x 1 conv) + `downsample.1` (BN) on the first block of a stage); global
average pooling; `fc`. Convolutions have no bias. `forward` returns class scores `(B, C)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Blocks per stage (torchvision resnet50 / resnet101).
RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
_WIDTHS = (64, 128, 256, 512)
_EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * _EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ResNetClassifier(nn.Module):
    """A whole-image classifier; `task = "classification"` tells the dump to store one row of
    `num_classes` scores per image."""

    task = "classification"
    test_protocol = "classifier"

    def __init__(self, depths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for stage, (width, blocks) in enumerate(zip(_WIDTHS, depths, strict=True), start=1):
            layers = []
            for block in range(blocks):
                stride = 2 if block == 0 and stage > 1 else 1
                layers.append(Bottleneck(in_channels, width, stride))
                in_channels = width * _EXPANSION
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
