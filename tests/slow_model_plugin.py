"""A `--model tests.slow_model_plugin:slow_model` plugin for CLI tests: a 1x1 convolution that
sleeps in every forward pass, so a test can interrupt a dump while it runs."""

from __future__ import annotations

import time

import torch
from torch import nn

SECONDS_PER_FORWARD = 0.25


class SlowModel(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(SECONDS_PER_FORWARD)
        return self.head(images)


def slow_model(num_classes: int) -> nn.Module:
    return SlowModel(num_classes)
