"""The HDF5 file format of saved logit-set statistics ("blda-logit-statistics", version 1).

This module knows the file, not the statistics object: `write_statistics` takes a header and
plain arrays, `read_statistics` returns them checked (format, version, attributes, datasets and
their shapes), and `LogitSetStatistics.save` / `load` convert. Imports run one way:
logit_sets -> io.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from blda_tools.errors import BLDAError
from blda_tools.fileio import as_text, atomic_output, check_input_file

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


@dataclass(frozen=True)
class StatisticsHeader:
    """The scalar attributes of a statistics file."""

    num_classes: int
    ignore_index: int
    num_ignored: int
    grid_low: float
    grid_high: float
    grid_bins: int
    class_names: tuple[str, ...] | None
    # Optional (absent in older files): the rows' source ("gt" or "pseudo") and the stores.
    label_source: str | None = None
    stores: tuple[str, ...] | None = None

    def array_shape(self, name: str) -> tuple[int, ...]:
        """The shape of dataset `name`: (C, C, B) for the histogram, (C, C) for the others."""
        C = self.num_classes
        return (C, C, self.grid_bins) if name == "histogram" else (C, C)


def write_statistics(
    path: str | os.PathLike, header: StatisticsHeader, arrays: dict[str, np.ndarray]
) -> None:
    """Write `header` and the `ARRAYS` to an HDF5 file (atomically)."""
    with atomic_output(path) as temporary, h5py.File(temporary, "w") as file:
        file.attrs["format"] = FORMAT_NAME
        file.attrs["format_version"] = FORMAT_VERSION
        for name in ("num_classes", "ignore_index", "num_ignored", "grid_low", "grid_high"):
            file.attrs[name] = getattr(header, name)
        file.attrs["grid_bins"] = header.grid_bins
        if header.class_names is not None:
            file.attrs["class_names"] = list(header.class_names)
        if header.label_source is not None:
            file.attrs["label_source"] = header.label_source
        if header.stores is not None:
            file.attrs["stores"] = [as_text(store) for store in header.stores]
        for name in ARRAYS:
            compression = "gzip" if name == "histogram" else None
            file.create_dataset(name, data=arrays[name], compression=compression)


def read_statistics(path: str | os.PathLike) -> tuple[StatisticsHeader, dict[str, np.ndarray]]:
    """Read a file written by `write_statistics`; `BLDAError` for anything else."""
    check_input_file(path, str(path), "a statistics file (statistics.h5)")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise BLDAError(f"{path}: cannot open as an HDF5 statistics file ({error})") from None
    try:
        header, arrays = _read_open(file, path)
    except (OSError, KeyError, RuntimeError) as error:  # HDF5's, on a damaged file: no name
        raise BLDAError(
            f"{path}: cannot read the statistics file, it is damaged ({error})"
        ) from None
    finally:
        file.close()
    for name in ("histogram", "count", "confusion", "clipped"):  # counts of pixels
        values = arrays[name]
        whole = values.dtype.kind in "iu" or bool((values == np.floor(values)).all())
        if not (np.isfinite(values).all() and (values >= 0).all() and whole):
            raise BLDAError(
                f"{path}: dataset '{name}' holds values that are not counts (< 0, NaN or "
                "fractional)"
            )
    return header, arrays


def _read_open(file: h5py.File, path) -> tuple[StatisticsHeader, dict[str, np.ndarray]]:
    """The header and arrays of the open statistics file `file`."""
    if _optional_text(file.attrs.get("format")) != FORMAT_NAME:  # str or bytes in HDF5
        raise BLDAError(f"{path}: not a blda statistics file (format attribute missing)")
    version = int(file.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise BLDAError(f"{path}: statistics format version {version}, expected {FORMAT_VERSION}")
    try:
        names = file.attrs.get("class_names")
        header = StatisticsHeader(
            num_classes=int(file.attrs["num_classes"]),
            ignore_index=int(file.attrs["ignore_index"]),
            num_ignored=int(file.attrs["num_ignored"]),
            grid_low=float(file.attrs["grid_low"]),
            grid_high=float(file.attrs["grid_high"]),
            grid_bins=int(file.attrs["grid_bins"]),
            class_names=_class_names(names, path),
            label_source=_label_source(file.attrs.get("label_source"), path),
            stores=_optional_texts(file.attrs.get("stores")),
        )
    except KeyError as error:
        raise BLDAError(f"{path}: statistics file is missing {error}") from None
    except (ValueError, TypeError) as error:  # an attribute of the wrong type
        raise BLDAError(f"{path}: statistics file has a bad header field ({error})") from None
    if header.num_ignored < 0:
        raise BLDAError(f"{path}: num_ignored is {header.num_ignored}, not a count")
    arrays = {name: _read_array(file, name, header.array_shape(name), path) for name in ARRAYS}
    return header, arrays


def _class_names(names, path) -> tuple[str, ...] | None:
    """The `class_names` attribute: a list of names, or (as the logit store writes it) their
    JSON text."""
    if names is None:
        return None
    text = _optional_text(names) if isinstance(names, str | bytes) else None
    if text is not None:
        try:
            names = json.loads(text)
        except ValueError:
            names = None
    if (
        names is None
        or isinstance(names, str)
        or not all(isinstance(name, str | bytes) for name in names)
    ):
        raise BLDAError(f"{path}: class_names is not a list of class names")
    names = tuple(_optional_text(name) for name in names)
    if len(set(names)) != len(names):
        raise BLDAError(f"{path}: class_names names a class twice")
    return names


def _label_source(value, path) -> str | None:
    source = _optional_text(value)
    if source not in (None, "gt", "pseudo"):
        raise BLDAError(f"{path}: label_source is {source!r}, not 'gt' or 'pseudo'")
    return source


def _read_array(file: h5py.File, name: str, shape: tuple[int, ...], path) -> np.ndarray:
    if name not in file:
        raise BLDAError(f"{path}: statistics file is missing the dataset '{name}'")
    dataset = file[name]
    if tuple(dataset.shape) != shape:
        raise BLDAError(f"{path}: dataset '{name}' has shape {dataset.shape}, expected {shape}")
    try:
        return dataset[()]
    except OSError as error:
        raise BLDAError(f"{path}: cannot read dataset '{name}' ({error})") from None


def _optional_text(value) -> str | None:
    return None if value is None else str(value.decode() if isinstance(value, bytes) else value)


def _optional_texts(values) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise TypeError(f"expected a list of texts, got {values!r}")
    return tuple(_optional_text(value) for value in values)
