"""DAFormer's thing-class ImageNet feature distance (Hoyer et al. 2022, Sec. 3.3).

Facts read from DAFormer's `dacs.py` (`calc_feat_dist`, `masked_feat_dist`) and
`downscale_label_ratio`: the L2 distance between the student's and a frozen ImageNet model's
last encoder feature maps, averaged over the feature cells whose downscaled source label is a
thing class; a cell keeps a class when that class covers at least `scale_min_ratio` of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def downscale_label_ratio(
    labels: torch.Tensor,
    factor: int,
    min_ratio: float,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Labels (B, H, W) -> (B, H / factor, W / factor): a cell's majority class if it covers at
    least `min_ratio` of the cell's pixels (ignored pixels included), else `ignore_index`."""
    one_hot_index = labels.clone()
    one_hot_index[(labels < 0) | (labels >= num_classes)] = num_classes  # extra "ignore" bin
    one_hot = F.one_hot(one_hot_index, num_classes + 1).permute(0, 3, 1, 2).float()
    shares = F.avg_pool2d(one_hot, kernel_size=factor)
    best_share, best_class = shares.max(dim=1)
    best_class[(best_share < min_ratio) | (best_class == num_classes)] = ignore_index
    return best_class


def last_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The deepest encoder feature map (backbones return a list of maps, shallow to deep)."""
    features = backbone(images)
    return features[-1] if isinstance(features, list | tuple) else features


class ImageNetFeatureDistance:
    """lambda * mean over thing-class cells of ||f_student - f_imagenet||_2."""

    def __init__(
        self,
        imagenet_model: nn.Module,
        *,
        weight: float,
        classes: Sequence[int],
        scale_min_ratio: float,
        num_classes: int,
        ignore_index: int = 255,
    ) -> None:
        self.imagenet_model = imagenet_model.eval()
        for parameter in self.imagenet_model.parameters():
            parameter.requires_grad_(False)
        self.weight, self.classes = weight, torch.tensor(list(classes))
        self.scale_min_ratio, self.num_classes = scale_min_ratio, num_classes
        self.ignore_index = ignore_index

    def __call__(
        self, student_features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The weighted distance, given the student's deepest encoder features of the normalised
        source `images` and their `labels`."""
        student = student_features
        with torch.no_grad():
            reference = last_features(self.imagenet_model.backbone, images)
        factor = labels.shape[-1] // student.shape[-1]
        cell_labels = downscale_label_ratio(
            labels, factor, self.scale_min_ratio, self.num_classes, self.ignore_index
        )
        mask = torch.isin(cell_labels, self.classes.to(labels.device))
        distance = torch.linalg.vector_norm(student.float() - reference.float(), dim=1)
        if not mask.any():
            return distance.sum() * 0.0  # keeps the graph; no thing pixels in this batch
        return self.weight * distance[mask].mean()
