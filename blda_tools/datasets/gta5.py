"""GTA5 (Playing for Data) as distributed: `images/NNNNN.png` + `labels/NNNNN.png`.

Label pixels are Cityscapes label ids (palette PNGs whose indices are the ids), mapped to the
19 train ids with the official table. A few real image/label pairs differ in size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blda_tools.datasets.base import (
    SegmentationDataset,
    map_ids,
    read_id_image,
)
from blda_tools.datasets.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    cityscapes_id_lookup,
)
from blda_tools.datasets.listing import DAFORMER_CONVERTED, paired_listing, require_dir
from blda_tools.errors import BLDAError

SIZE_MISMATCH_POLICIES = ("resize-image", "skip", "error")


class SizeMismatchWarning(UserWarning):
    """An image was resized to its label's size because the two differed."""


class GTA5Dataset(SegmentationDataset):
    """GTA5 images with labels mapped to the 19 Cityscapes train ids.

    `split`: GTA5 has no official split, so "all" (default) takes every image; otherwise a path
    to a list file with one image name per line (`00001`, `00001.png` or `images/00001.png`).

    `size_mismatch`, for the few pairs whose image and label sizes differ; a sample is never
    returned misaligned:
    - "resize-image" (default): resize the image to the label's size (bilinear); the label is
      never interpolated. Each occurrence emits a `SizeMismatchWarning` naming the files and is
      recorded in `resized` (name -> (image size, label size), W x H, in this process).
    - "skip": leave such pairs out. Every pair's PNG header is read when the dataset is built
      (a few seconds for the full dataset); `skipped` lists the names left out.
    - "error": accessing such a sample raises `BLDAError` (not `CorruptSampleError`, so it
      is fatal even for callers that skip corrupt samples).

    Unknown label ids are mapped to 255.
    """

    dataset_name = "gta5"

    def __init__(
        self, root: str | os.PathLike, split: str = "all", size_mismatch: str = "resize-image"
    ):
        if size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise BLDAError(
                f"gta5: size_mismatch {size_mismatch!r} is not one of "
                f"{', '.join(SIZE_MISMATCH_POLICIES)}"
            )
        self.size_mismatch = size_mismatch
        self.resized: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        self.skipped: list[str] = []
        root = require_dir(Path(root), "gta5", "the GTA5 data root")
        image_dir = require_dir(root / "images", "gta5", "images/NNNNN.png")
        label_dir = root / "labels"
        # DAFormer's tools/convert_datasets/gta.py writes NAME_labelTrainIds.png beside
        # each label; blda maps the original ids itself, to the same train ids.
        image_paths, label_paths = paired_listing(
            image_dir, label_dir, split, "gta5", derived_labels=DAFORMER_CONVERTED
        )
        if size_mismatch == "skip" and label_paths is not None:
            image_paths, label_paths = self._drop_mismatched(root, image_paths, label_paths)
        super().__init__(
            root,
            split,
            image_paths=image_paths,
            label_paths=label_paths,
            class_names=CITYSCAPES_CLASSES,
            palette=CITYSCAPES_PALETTE,
        )

    def _drop_mismatched(
        self, root: Path, image_paths: list[Path], label_paths: list[Path]
    ) -> tuple[list[Path], list[Path]]:
        kept_images, kept_labels = [], []
        for image_path, label_path in zip(image_paths, label_paths, strict=True):
            image_size, label_size = _header_size(image_path), _header_size(label_path)
            # An unreadable header is left in: reading it later raises CorruptSampleError.
            if image_size is not None and label_size is not None and image_size != label_size:
                self.skipped.append(image_path.relative_to(root).with_suffix("").as_posix())
                continue
            kept_images.append(image_path)
            kept_labels.append(label_path)
        if not kept_images:
            raise BLDAError(f"gta5: every image under {root} differs in size from its label")
        return kept_images, kept_labels

    def read_label(self, path: Path) -> torch.Tensor:
        return map_ids(read_id_image(path), cityscapes_id_lookup())

    def align(self, index: int, image: np.ndarray, label: torch.Tensor) -> np.ndarray:
        label_size = (label.shape[-1], label.shape[-2])
        size = (image.shape[1], image.shape[0])
        if size == label_size:
            return image
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        description = (
            f"image {image_path} is {size[0]}x{size[1]} but label {label_path} is "
            f"{label_size[0]}x{label_size[1]} (W x H)"
        )
        if self.size_mismatch == "resize-image":
            warnings.warn(
                f"gta5: {description}; image resized to the label size",
                SizeMismatchWarning,
                stacklevel=4,
            )
            self.resized[self.names[index]] = (size, label_size)
            resized = Image.fromarray(image).resize(label_size, Image.Resampling.BILINEAR)
            return np.array(resized)
        # "error"; "skip" removed these pairs when the dataset was built.
        raise BLDAError(f"gta5: {description} (size_mismatch='{self.size_mismatch}')")


def _header_size(path: Path) -> tuple[int, int] | None:
    """Image size from the file header only, or None when the header cannot be read."""
    try:
        with Image.open(path) as opened:
            return opened.size
    except (OSError, SyntaxError, ValueError):
        return None
