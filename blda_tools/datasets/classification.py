"""An image-folder classification dataset: `root/<split>/<class_name>/*.{png,jpg,jpeg}`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from blda_tools.datasets.base import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    SegmentationDataset,
    SegmentationSample,
    array_to_tensor,
    default_palette,
    read_rgb_array,
)
from blda_tools.datasets.listing import read_names_option, require_dir
from blda_tools.errors import BLDAError


class ImageFolderDataset(SegmentationDataset):
    """Whole-image classification, one folder per class.

    Each sample's `label` is a 0-d int64 tensor holding the class index (not a (H, W) map).
    Class names are sorted; by default they are the union of the class folders (holding at
    least one image) of every split folder under `root`, so that train and val index classes
    the same way even when a split lacks a class. `class_names` (a list or a file with one name
    per line) fixes them explicitly; a class folder not in it is an error. Images are sorted by
    class, then by path. The palette is generated (distinct colours), for plots.
    """

    dataset_name = "image-folder"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        class_names: Sequence[str] | str | os.PathLike | None = None,
    ):
        root = require_dir(Path(root), "image-folder", "the data root")
        split_dir = require_dir(root / split, "image-folder", f"{split}/<class_name>/<image>")
        stray = sorted(path for path in split_dir.iterdir() if _is_image(path))
        if stray:
            raise BLDAError(
                f"image-folder: image {stray[0]} lies directly in the split folder; expected "
                f"{split_dir}/<class_name>/<image>"
            )
        if class_names is None:
            names = sorted(_class_folders(root))
        else:
            names = read_names_option(class_names, "class_names", max_classes=None)
        index_of = {name: index for index, name in enumerate(names)}
        image_paths, targets = [], []
        for class_dir in sorted(path for path in split_dir.iterdir() if path.is_dir()):
            images = sorted(path for path in class_dir.rglob("*") if _is_image(path))
            if not images:
                continue
            if class_dir.name not in index_of:
                raise BLDAError(
                    f"image-folder: class folder {class_dir} is not in class_names {names}"
                )
            image_paths += images
            targets += [index_of[class_dir.name]] * len(images)
        if not image_paths:
            raise BLDAError(f"image-folder: no images under {split_dir}/<class_name>/")
        super().__init__(
            root,
            split,
            image_paths=image_paths,
            label_paths=None,
            class_names=names,
            palette=default_palette(len(names)),
        )
        self.targets: tuple[int, ...] = tuple(targets)
        # Every class index is a label here: with 256 classes or more, 255 is a class, so the
        # ignore value (which no image carries) moves just past the last class.
        if len(names) > IGNORE_INDEX:
            self.ignore_index = len(names)

    @property
    def has_labels(self) -> bool:
        return True

    def read_sample(self, index: int) -> SegmentationSample:
        """The image and its class index (a 0-d int64 tensor); also `self[index]`."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"image-folder: index {index} out of range for {len(self)}")
        index = index % len(self)
        # MIC's classification code reads with torchvision's ImageFolder, i.e. Pillow
        image = array_to_tensor(read_rgb_array(self.image_paths[index], reader="pillow"))
        label = torch.tensor(self.targets[index], dtype=torch.int64)
        return SegmentationSample(image=image, label=label, name=self.names[index])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(root: Path) -> set[str]:
    """Names of the folders `root/<split>/<class>` holding at least one image, over all splits."""
    names = set()
    for split_dir in (path for path in root.iterdir() if path.is_dir()):
        for class_dir in (path for path in split_dir.iterdir() if path.is_dir()):
            if any(_is_image(path) for path in class_dir.rglob("*")):
                names.add(class_dir.name)
    return names
