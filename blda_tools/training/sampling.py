"""Rare Class Sampling (DAFormer, Sec. 3.3 of Hoyer et al. 2022) over the source images.

Facts read from DAFormer's `mmseg/datasets/uda_dataset.py`: class frequencies f_c are the pixel
shares of each class over all source labels (classes that never occur are not sampled);
P(c) = softmax((1 - f_c) / T); an image is eligible for class c when it holds more than
`min_pixels` pixels of c; after sampling (class, image) the crop is redrawn up to 10 times until
it holds more than `min_pixels * min_crop_ratio` pixels of c.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from blda_tools.errors import BLDAError
from blda_tools.runtime.process import readable_worker_errors


def rcs_class_probabilities(
    class_pixels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, probabilities) from total pixel counts per class (C,).

    Only classes with at least one pixel are candidates; P(c) = softmax((1 - f_c) / T) with
    f_c = n_c / sum(n).
    """
    class_pixels = class_pixels.double()
    classes = torch.nonzero(class_pixels > 0).flatten()
    frequency = class_pixels[classes] / class_pixels.sum()
    return classes, torch.softmax((1.0 - frequency) / temperature, dim=0)


class RareClassSampler:
    """Draw (class, source image index) pairs; a pure function of the generator it is given.

    `image_class_pixels` is an (N, C) table of per-image pixel counts per class (see
    `count_class_pixels`). Attributes: `classes`, `probabilities`, `images_with_class`
    (class -> tensor of eligible image indices), `min_crop_pixels`.
    """

    def __init__(
        self,
        image_class_pixels: torch.Tensor,
        *,
        temperature: float,
        min_pixels: int,
        min_crop_ratio: float,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.temperature = temperature
        self.min_pixels = min_pixels
        self.min_crop_ratio = min_crop_ratio
        self.classes, self.probabilities = rcs_class_probabilities(
            image_class_pixels.sum(dim=0), temperature
        )
        self.images_with_class: dict[int, torch.Tensor] = {}
        for c in self.classes.tolist():
            eligible = torch.nonzero(image_class_pixels[:, c] > min_pixels).flatten()
            if len(eligible) == 0:
                name = class_names[c] if class_names else str(c)
                raise BLDAError(
                    f"rcs.min_pixels: class {name!r} occurs in the source, but no source image "
                    f"has more than {min_pixels} pixels of it; lower rcs.min_pixels or set "
                    "rcs.enabled=false"
                )
            self.images_with_class[c] = eligible

    @property
    def min_crop_pixels(self) -> float:
        """A crop is accepted when it holds more pixels of the sampled class than this."""
        return self.min_pixels * self.min_crop_ratio

    def sample(self, generator: torch.Generator) -> tuple[int, int]:
        """(class, image index): a class by its RCS probability, then an eligible image."""
        draw = torch.multinomial(self.probabilities.float(), 1, generator=generator).item()
        class_id = int(self.classes[draw])
        images = self.images_with_class[class_id]
        image = int(images[torch.randint(len(images), (), generator=generator)])
        return class_id, image


class _LabelCounts(torch.utils.data.Dataset):
    def __init__(self, dataset, num_classes: int, ignore_index: int) -> None:
        self.dataset, self.num_classes, self.ignore_index = dataset, num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        label = self.dataset[index].label
        if label is None:
            raise BLDAError("rcs.enabled: the source dataset has no labels to count classes in")
        valid = label[(label != self.ignore_index) & (label >= 0) & (label < self.num_classes)]
        return torch.bincount(valid.flatten(), minlength=self.num_classes)


def count_class_pixels(
    dataset, num_classes: int, ignore_index: int = 255, num_workers: int = 0
) -> torch.Tensor:
    """(N, C) int64 pixel counts of every class in every label of `dataset` (one full pass)."""
    loader = DataLoader(
        _LabelCounts(dataset, num_classes, ignore_index),
        batch_size=None,
        num_workers=num_workers,
    )
    rows = list(readable_worker_errors(loader))
    if not rows:
        raise BLDAError("rcs.enabled: the source dataset is empty")
    return torch.stack(rows).long()
