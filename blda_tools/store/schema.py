"""The logit store's schema: format constants, the image index columns, `ImageRecord`, `Chunk`,
and the checks of writer options shared by the writer and the reader (docs/store-format.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np

from blda_tools.errors import BLDAError

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "blda-logit-store"
FORMAT_VERSION = 1
LOGIT_DTYPES = ("float16", "float32")
COMPRESSIONS = (None, "gzip", "lzf")
FLOAT16_MAX = float(np.finfo(np.float16).max)
KINDS = ("map", "samples")
MAX_NAME_BYTES = 512
# Image index columns. Fixed-size types only: variable-length strings live in HDF5's global
# heap, which a killed writer was seen to leave inconsistent (the rows themselves survived).
INDEX_COLUMNS = {
    "name": h5py.string_dtype("utf-8", MAX_NAME_BYTES),
    "offset": np.dtype(np.int64),
    "count": np.dtype(np.int64),
    "height": np.dtype(np.int64),
    "width": np.dtype(np.int64),
    "stride": np.dtype(np.int64),
    "kind": h5py.enum_dtype({kind: code for code, kind in enumerate(KINDS)}, basetype="u1"),
}
# Compressed chunks straddling two reads stay decompressed in this cache; uncompressed reads
# bypass the cache (a large cache only adds a copy there, measured 125 -> 70 M rows/s).
COMPRESSED_CHUNK_CACHE_BYTES = 32 << 20


@dataclass(frozen=True)
class ImageRecord:
    """One added image: its rows `[offset, offset + count)` in the (possibly sharded) store.

    `kind` is "map" (a row-major raster of the full label map sampled every `stride` pixels,
    `shape` rows by columns) or "samples" (rows that do not form a map). `height` and `width`
    are the full label map's size (0 when unknown for samples); `shard` indexes `paths`.
    """

    name: str
    offset: int
    count: int
    height: int
    width: int
    stride: int
    kind: str
    shard: int

    @property
    def shape(self) -> tuple[int, int]:
        """The stored raster of a map image, `(ceil(height / stride), ceil(width / stride))`."""
        return (-(-self.height // self.stride), -(-self.width // self.stride))


@dataclass
class Chunk:
    """Rows `[first_row, first_row + len(logits))` of a store (global row numbers).

    From `LogitStore.iter_chunks`: torch tensors, `logits` ``(n, C)`` float32 unless another
    dtype was asked for, `labels` ``(n,)`` int64. From `LogitStore.iter_arrays`: numpy arrays,
    logits in the stored dtype unless another was asked for, labels in their stored integer
    type (uint8 for up to 255 classes). `labels` is None for a store without labels.
    """

    logits: torch.Tensor | np.ndarray
    labels: torch.Tensor | np.ndarray | None
    first_row: int

    @property
    def stop_row(self) -> int:
        return self.first_row + self.logits.shape[0]


def _checked_class_names(class_names, path) -> list[str]:
    if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
        raise BLDAError(f"{path}: class_names must be a list of strings, got {class_names!r}")
    names = list(class_names)
    if not names or len(set(names)) != len(names):
        raise BLDAError(f"{path}: class_names must be non-empty and distinct, got {names}")
    return names


def _checked_int(value, option: str, where, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BLDAError(f"{where}: {option} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise BLDAError(f"{where}: {option} must be at least {minimum}, got {value}")
    return int(value)


def _checked_ignore_index(value, num_classes: int, where) -> int:
    """An integer outside the class ids ``[0, C)``: a label equal to a class id cannot also
    mean "no label" (that class's pixels would all be skipped, its IoU falling to 0)."""
    value = _checked_int(value, "ignore_index", where)
    if 0 <= value < num_classes:
        raise BLDAError(
            f"{where}: ignore_index {value} is a class id (the classes are 0..{num_classes - 1}); "
            "expected a value outside them, such as "
            + ("255" if num_classes <= 255 else f"{num_classes} or -1")
        )
    return value


def _checked_choice(value, choices, option: str, path):
    if value not in choices:
        raise BLDAError(
            f"{path}: {option}={value!r} is not supported; expected one of {list(choices)}"
        )
    return value


def _checked_metadata(metadata: dict, path) -> dict:
    for key, value in metadata.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise BLDAError(f"{path}: metadata {key}={value!r} is not JSON-serialisable") from None
    return metadata
