"""Datasets in their official on-disk layouts, behind one registry.

`build_dataset("cityscapes", root, "val")` returns a dataset whose items are
`SegmentationSample(image uint8 (3, H, W), label int64 (H, W) train ids or None, name)`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import TYPE_CHECKING

from blda_tools.errors import BLDAError
from blda_tools.runtime.lazy import lazy_exports

if TYPE_CHECKING:
    from blda_tools.datasets.base import SegmentationDataset

# The registry names each dataset's module and class instead of importing them, so that
# `list_datasets()` (the CLI's --dataset choices, shown by `blda dump-logits --help`) costs
# no torch import; `build_dataset` and attribute access import them on first use.
DATASETS: dict[str, tuple[str, str]] = {
    "cityscapes": ("cityscapes", "CityscapesDataset"),
    "gta5": ("gta5", "GTA5Dataset"),
    "synthia": ("synthia", "SynthiaDataset"),
    "folder": ("folder", "FolderDataset"),
    "image-folder": ("classification", "ImageFolderDataset"),
}

# Public name -> the submodule defining it (PEP 562 module `__getattr__` below).
_EXPORTS = {
    "IGNORE_INDEX": "base",
    "CorruptSampleError": "base",
    "SegmentationDataset": "base",
    "SegmentationSample": "base",
    "default_palette": "base",
    "label_to_color": "base",
    "write_color_png": "base",
    "write_label_png": "base",
    "CITYSCAPES_CLASSES": "cityscapes",
    "CITYSCAPES_PALETTE": "cityscapes",
    "CityscapesDataset": "cityscapes",
    "cityscapes_id_lookup": "cityscapes",
    "ImageFolderDataset": "classification",
    "FolderDataset": "folder",
    "GTA5Dataset": "gta5",
    "SizeMismatchWarning": "gta5",
    "SYNTHIA_13_CLASSES": "synthia",
    "SYNTHIA_16_CLASSES": "synthia",
    "SYNTHIA_TO_TRAIN_ID": "synthia",
    "SynthiaDataset": "synthia",
    "make_synthcity": "synthcity",  # as docs/architecture.md lists it (synthcity/__init__)
}

__all__ = sorted([*_EXPORTS, "build_dataset", "list_datasets"])


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def list_datasets() -> list[str]:
    """Names accepted by `build_dataset`."""
    return list(DATASETS)


def dataset_class(name: str) -> type[SegmentationDataset]:
    """The class behind the dataset `name` (imported on first use)."""
    if name not in DATASETS:
        raise BLDAError(f"dataset {name!r} is unknown; valid datasets: {', '.join(DATASETS)}")
    module, class_name = DATASETS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), class_name)


def build_dataset(
    name: str, root: str | os.PathLike, split: str | None = None, **options
) -> SegmentationDataset:
    """Build the dataset `name` reading `root`; `split=None` takes the dataset's default.

    Options are the keyword arguments of that dataset's class (e.g. `label_type` for
    Cityscapes, `size_mismatch` for GTA5, `class_names` for the folder datasets); an unknown
    name or option raises `BLDAError` listing the valid ones.
    """
    cls = dataset_class(name)
    parameters = inspect.signature(cls.__init__).parameters
    valid = [option for option in parameters if option not in ("self", "root", "split")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise BLDAError(
            f"dataset option {unknown[0]!r} is not valid for {name}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    if split is None:
        return cls(root, **options)
    return cls(root, split, **options)
