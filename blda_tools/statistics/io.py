"""Saving and loading `LogitSetStatistics` as HDF5 (format "blda-logit-statistics", version 1)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import h5py
import torch

from blda_tools.errors import BLDAError
from blda_tools.fileio import atomic_output
from blda_tools.statistics.grid import LogitGrid

if TYPE_CHECKING:
    from blda_tools.statistics.logit_sets import LogitSetStatistics

FORMAT_NAME = "blda-logit-statistics"
FORMAT_VERSION = 1
ARRAYS = (
    "histogram",
    "count",
    "sum",
    "sum_squares",
    "minimum",
    "maximum",
    "confusion",
    "clipped",
)


def save_statistics(statistics: LogitSetStatistics, path: str | os.PathLike) -> None:
    """Write `statistics` to an HDF5 file (atomically)."""
    with atomic_output(path) as temporary, h5py.File(temporary, "w") as file:
        file.attrs["format"] = FORMAT_NAME
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["num_classes"] = statistics.num_classes
        file.attrs["ignore_index"] = statistics.ignore_index
        file.attrs["num_ignored"] = statistics.num_ignored
        file.attrs["grid_low"] = statistics.grid.low
        file.attrs["grid_high"] = statistics.grid.high
        file.attrs["grid_bins"] = statistics.grid.bins
        if statistics.class_names is not None:
            file.attrs["class_names"] = list(statistics.class_names)
        for name in ARRAYS:
            array = getattr(statistics, name).numpy()
            compression = "gzip" if name == "histogram" else None
            file.create_dataset(name, data=array, compression=compression)


def load_statistics(cls: type[LogitSetStatistics], path: str | os.PathLike) -> LogitSetStatistics:
    """Read statistics written by `save_statistics` as a `cls`; `BLDAError` for anything else."""
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise BLDAError(f"{path}: cannot open as an HDF5 statistics file ({error})") from None
    with file:
        if file.attrs.get("format") != FORMAT_NAME:
            raise BLDAError(f"{path}: not a blda statistics file (format attribute missing)")
        version = int(file.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise BLDAError(
                f"{path}: statistics format version {version}, expected {FORMAT_VERSION}"
            )
        try:
            names = file.attrs.get("class_names")
            statistics = cls(
                int(file.attrs["num_classes"]),
                LogitGrid(
                    float(file.attrs["grid_low"]),
                    float(file.attrs["grid_high"]),
                    int(file.attrs["grid_bins"]),
                ),
                ignore_index=int(file.attrs["ignore_index"]),
                class_names=None if names is None else [str(name) for name in names],
            )
            statistics.num_ignored = int(file.attrs["num_ignored"])
            for name in ARRAYS:
                _read_array_into(file, name, getattr(statistics, name), path)
        except KeyError as error:
            raise BLDAError(f"{path}: statistics file is missing {error}") from None
    return statistics


def _read_array_into(file: h5py.File, name: str, target: torch.Tensor, path) -> None:
    if name not in file:
        raise BLDAError(f"{path}: statistics file is missing the dataset '{name}'")
    dataset = file[name]
    if tuple(dataset.shape) != tuple(target.shape):
        raise BLDAError(
            f"{path}: dataset '{name}' has shape {dataset.shape}, expected {tuple(target.shape)}"
        )
    try:
        target.copy_(torch.from_numpy(dataset[()].astype(target.numpy().dtype)))
    except OSError as error:
        raise BLDAError(f"{path}: cannot read dataset '{name}' ({error})") from None
