"""A generic folder dataset: `images/` and `labels/` (train-id PNGs) matched by file stem."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from blda_tools.datasets.base import (
    IMAGE_EXTENSIONS,
    RGB,
    SegmentationDataset,
    default_palette,
    identity_lookup,
    map_ids,
    read_id_image,
)
from blda_tools.datasets.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from blda_tools.datasets.listing import paired_listing, read_names_option, require_dir


class FolderDataset(SegmentationDataset):
    """Images under `root/images` (.png, .jpg, .jpeg, any depth) with labels under `root/labels`.

    A label is the PNG with the same relative path and stem as its image
    (`images/a/0001.jpg` <-> `labels/a/0001.png`) holding train ids 0..C-1 and 255 (ignore);
    any other value is unknown and becomes 255. Without a `labels` folder the dataset has no
    labels.

    `split`: "all" (default) uses `images/` and `labels/`; a name with a folder
    `images/<split>` uses `images/<split>` and `labels/<split>`; otherwise a list file with one
    image per line. `class_names`: a list or a text file with one name per line (default the
    19 Cityscapes classes). `palette`: one RGB tuple per class (default the Cityscapes palette
    for the Cityscapes classes, else distinct generated colours).
    """

    dataset_name = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "all",
        class_names: Sequence[str] | str | os.PathLike | None = None,
        palette: Sequence[RGB] | None = None,
    ):
        root = require_dir(Path(root), "folder", "the data root")
        names = (
            list(CITYSCAPES_CLASSES)
            if class_names is None
            else read_names_option(class_names, "class_names")
        )
        if palette is None:
            palette = (
                CITYSCAPES_PALETTE
                if tuple(names) == CITYSCAPES_CLASSES
                else default_palette(len(names))
            )
        image_dir = require_dir(root / "images", "folder", "images/<name>.png|jpg")
        label_dir = root / "labels"
        if split != "all" and (image_dir / split).is_dir():
            image_dir, label_dir = image_dir / split, label_dir / split
            selection = "all"
        else:
            selection = split
        image_paths, label_paths = paired_listing(
            image_dir, label_dir, selection, "folder", IMAGE_EXTENSIONS
        )
        super().__init__(
            root,
            split,
            image_paths=image_paths,
            label_paths=label_paths,
            class_names=names,
            palette=palette,
        )
        self._lookup = identity_lookup(len(names))

    def read_label(self, path: Path) -> torch.Tensor:
        return map_ids(read_id_image(path), self._lookup)
