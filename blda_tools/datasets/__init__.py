"""Datasets in their official on-disk layouts, behind one registry.

`build_dataset("cityscapes", root, "val")` returns a dataset whose items are
`SegmentationSample(image uint8 (3, H, W), label int64 (H, W) train ids or None, name)`.
"""

from __future__ import annotations

import inspect
import os

from blda_tools.datasets.base import (
    IGNORE_INDEX,
    CorruptSampleError,
    SegmentationDataset,
    SegmentationSample,
    default_palette,
    label_to_color,
    write_color_png,
    write_label_png,
)
from blda_tools.datasets.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    CityscapesDataset,
    cityscapes_id_lookup,
)
from blda_tools.datasets.classification import ImageFolderDataset
from blda_tools.datasets.folder import FolderDataset
from blda_tools.datasets.gta5 import GTA5Dataset, SizeMismatchWarning
from blda_tools.datasets.synthia import (
    SYNTHIA_13_CLASSES,
    SYNTHIA_16_CLASSES,
    SYNTHIA_TO_TRAIN_ID,
    SynthiaDataset,
)
from blda_tools.errors import BLDAError

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "SYNTHIA_13_CLASSES",
    "SYNTHIA_16_CLASSES",
    "SYNTHIA_TO_TRAIN_ID",
    "CityscapesDataset",
    "CorruptSampleError",
    "FolderDataset",
    "GTA5Dataset",
    "ImageFolderDataset",
    "SegmentationDataset",
    "SegmentationSample",
    "SizeMismatchWarning",
    "SynthiaDataset",
    "build_dataset",
    "cityscapes_id_lookup",
    "default_palette",
    "label_to_color",
    "list_datasets",
    "write_color_png",
    "write_label_png",
]

DATASETS: dict[str, type[SegmentationDataset]] = {
    "cityscapes": CityscapesDataset,
    "gta5": GTA5Dataset,
    "synthia": SynthiaDataset,
    "folder": FolderDataset,
    "image-folder": ImageFolderDataset,
}


def list_datasets() -> list[str]:
    """Names accepted by `build_dataset`."""
    return list(DATASETS)


def build_dataset(
    name: str, root: str | os.PathLike, split: str | None = None, **options
) -> SegmentationDataset:
    """Build the dataset `name` reading `root`; `split=None` takes the dataset's default.

    Options are the keyword arguments of that dataset's class (e.g. `label_type` for
    Cityscapes, `size_mismatch` for GTA5, `class_names` for the folder datasets); an unknown
    name or option raises `BLDAError` listing the valid ones.
    """
    if name not in DATASETS:
        raise BLDAError(f"dataset {name!r} is unknown; valid datasets: {', '.join(DATASETS)}")
    dataset_class = DATASETS[name]
    parameters = inspect.signature(dataset_class.__init__).parameters
    valid = [option for option in parameters if option not in ("self", "root", "split")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise BLDAError(
            f"dataset option {unknown[0]!r} is not valid for {name}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    if split is None:
        return dataset_class(root, **options)
    return dataset_class(root, split, **options)
