"""Cityscapes as distributed, and the 19-class table every street-scene dataset maps into.

Layout: `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` and
`gtFine/<split>/<city>/<stem>_gtFine_labelIds.png` (or the derived `_gtFine_labelTrainIds.png`
written by cityscapesscripts' `createTrainIdLabelImgs`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from cityscapesscripts.helpers import labels as cityscapes_labels

from blda_tools.datasets.base import (
    SegmentationDataset,
    identity_lookup,
    map_ids,
    read_id_image,
    train_id_lookup,
)
from blda_tools.datasets.listing import pair_labels, require_dir
from blda_tools.errors import BLDAError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIXES = {
    "labelIds": "_gtFine_labelIds.png",
    "labelTrainIds": "_gtFine_labelTrainIds.png",
}
LABEL_TYPES = ("auto", *LABEL_SUFFIXES)

# The evaluation classes are the labels with a real train id (not 255, not -1), in train-id order.
_EVALUATED = sorted(
    (label for label in cityscapes_labels.labels if 0 <= label.trainId < 255),
    key=lambda label: label.trainId,
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(label.name for label in _EVALUATED)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    tuple(label.color) for label in _EVALUATED
)


@functools.cache
def cityscapes_id_lookup() -> torch.Tensor:
    """256-entry table, Cityscapes label id -> train id, from the official label table.

    Ids whose train id is 255 or -1 (license plate), and ids absent from the table, map to 255.
    GTA5 labels use the same ids.
    """
    return train_id_lookup(
        {
            label.id: label.trainId
            for label in cityscapes_labels.labels
            if 0 <= label.id < 256 and 0 <= label.trainId < 255
        }
    )


class CityscapesDataset(SegmentationDataset):
    """Cityscapes images with fine labels mapped to the 19 train ids.

    `label_type`:
    - "labelIds": read `*_gtFine_labelIds.png` and map ids through the official table;
    - "labelTrainIds": read pre-converted `*_gtFine_labelTrainIds.png`; values >= 19 other than
      255 are treated as unknown and become 255;
    - "auto" (default): labelIds when the split has any, else labelTrainIds, else no labels.
      The official labelIds files are preferred because they come with the dataset, while
      labelTrainIds files are derived and may have been written by another tool or mapping.

    A split without a `gtFine/<split>` folder (or without label files) has no labels
    (`has_labels` False, `label` None). Unknown label ids are mapped to 255.
    """

    dataset_name = "cityscapes"

    def __init__(self, root: str | os.PathLike, split: str = "val", label_type: str = "auto"):
        if label_type not in LABEL_TYPES:
            raise BLDAError(
                f"cityscapes: label_type {label_type!r} is not one of {', '.join(LABEL_TYPES)}"
            )
        root = require_dir(Path(root), "cityscapes", "the Cityscapes data root")
        image_root = root / "leftImg8bit"
        require_dir(image_root, "cityscapes", "leftImg8bit/<split>/<city>/*_leftImg8bit.png")
        image_dir = image_root / split
        if not image_dir.is_dir():
            available = sorted(path.name for path in image_root.iterdir() if path.is_dir())
            raise BLDAError(
                f"cityscapes: expected folder {image_dir} for split {split!r}; "
                f"available splits: {', '.join(available) or 'none'}"
            )
        images = {
            path.relative_to(image_dir).as_posix()[: -len(IMAGE_SUFFIX)]: path
            for path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        }
        if not images:
            raise BLDAError(f"cityscapes: no images <city>/*{IMAGE_SUFFIX} under {image_dir}")
        label_dir = root / "gtFine" / split
        self.label_type = self._resolve_label_type(label_type, label_dir)
        labels: dict[str, Path] = {}
        if self.label_type is not None:
            suffix = LABEL_SUFFIXES[self.label_type]
            labels = {
                path.relative_to(label_dir).as_posix()[: -len(suffix)]: path
                for path in sorted(label_dir.glob(f"*/*{suffix}"))
            }
        keys = list(images)
        label_paths = pair_labels(
            keys,
            labels,
            dataset="cityscapes",
            all_image_keys=keys,
            expected_label=f"{label_dir}/{{key}}{LABEL_SUFFIXES.get(self.label_type or '', '')}",
        )
        super().__init__(
            root,
            split,
            image_paths=list(images.values()),
            label_paths=label_paths,
            class_names=CITYSCAPES_CLASSES,
            palette=CITYSCAPES_PALETTE,
        )
        self._lookup = (
            cityscapes_id_lookup()
            if self.label_type == "labelIds"
            else identity_lookup(len(CITYSCAPES_CLASSES))
        )

    @staticmethod
    def _resolve_label_type(label_type: str, label_dir: Path) -> str | None:
        """The label files to read, or None for an unlabelled split."""
        present = {
            kind: label_dir.is_dir() and any(label_dir.glob(f"*/*{suffix}"))
            for kind, suffix in LABEL_SUFFIXES.items()
        }
        if label_type == "auto":
            return next((kind for kind in LABEL_SUFFIXES if present[kind]), None)
        if not present[label_type]:
            raise BLDAError(
                f"cityscapes: label_type={label_type!r} but there are no "
                f"<city>/*{LABEL_SUFFIXES[label_type]} files under {label_dir}"
            )
        return label_type

    def read_label(self, path: Path) -> torch.Tensor:
        return map_ids(read_id_image(path), self._lookup)
