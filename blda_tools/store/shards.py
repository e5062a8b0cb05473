"""Opening one file of a logit store and checking its header, layout and image index, and that
the shards of a store agree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from blda_tools.errors import BLDAError, check_same_classes
from blda_tools.fileio import PARTIAL_SUFFIX, partial_path
from blda_tools.store.schema import (
    COMPRESSED_CHUNK_CACHE_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_COLUMNS,
    KINDS,
    ImageRecord,
    _checked_class_names,
    _checked_ignore_index,
)


@dataclass
class _Shard:
    """One open file of a store, with its header already checked."""

    path: Path
    file: h5py.File
    class_names: list[str]
    ignore_index: int
    num_rows: int
    metadata: dict
    index: dict  # image index columns as numpy arrays


UNFINISHED = (
    "this store was not completed (the dump was interrupted); continue it with the same "
    "`blda dump-logits ... --out {out} --resume`"
)


def _open_shard(path: Path) -> _Shard:
    if path.name.endswith(PARTIAL_SUFFIX):
        if not path.exists():
            raise BLDAError(f"{path}: no such file")
        out = path.with_name(path.name[: -len(PARTIAL_SUFFIX)])  # in the same folder
        raise BLDAError(f"{path}: " + UNFINISHED.format(out=out))
    if path.is_dir():
        raise BLDAError(f"{path}: is a directory; expected a logit store file (.h5)")
    if not path.exists():
        partial = partial_path(path)
        if partial.exists():
            raise BLDAError(
                f"{path}: no such file, but {partial} exists: " + UNFINISHED.format(out=path)
            )
        raise BLDAError(f"{path}: no such file")
    if not path.is_file():
        raise BLDAError(f"{path}: not a regular file; expected a logit store file (.h5)")
    if not h5py.is_hdf5(path):
        raise BLDAError(f"{path}: not an HDF5 file (expected a blda logit store)")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise BLDAError(
            f"{path}: cannot open the HDF5 file, it is truncated or damaged ({error})"
        ) from None
    try:
        shard = _checked_shard(path, file)
    except (OSError, KeyError, RuntimeError) as error:  # HDF5's, on a damaged file: no name
        file.close()
        raise BLDAError(
            f"{path}: cannot read the store's attributes or image index, the file is damaged "
            f"({error})"
        ) from None
    except BaseException:
        file.close()
        raise
    if file["logits"].compression is not None:
        file.close()
        shard.file = h5py.File(path, "r", rdcc_nbytes=COMPRESSED_CHUNK_CACHE_BYTES)
    return shard


def _checked_shard(path: Path, file: h5py.File) -> _Shard:
    attrs = file.attrs
    if attrs.get("format") != FORMAT_NAME:
        raise BLDAError(
            f"{path}: an HDF5 file but not a blda logit store (no format={FORMAT_NAME!r} attribute)"
        )
    version = attrs.get("format_version", -1)
    if not (isinstance(version, (int, np.integer)) and version == FORMAT_VERSION):
        raise BLDAError(
            f"{path}: store format version {_shown(version)} is not supported (this blda reads version {FORMAT_VERSION})"
        )
    complete = attrs.get("complete", False)
    if not isinstance(complete, (bool, np.bool_)):
        raise BLDAError(
            f"{path}: damaged blda logit store: complete is {complete!r}, not a boolean"
        )
    if not complete:
        raise BLDAError(f"{path}: " + UNFINISHED.format(out=path))
    try:
        class_names = _checked_class_names(_json_attribute(path, attrs, "class_names", list), path)
        metadata = {
            "domain": str(attrs["domain"]),
            "producer": str(attrs["producer"]),
            "created": str(attrs["created"]),
        }
        metadata.update(_json_attribute(path, attrs, "metadata", dict))
        ignore_index = _checked_ignore_index(
            _image_folder_ignore(attrs["ignore_index"], metadata, len(class_names)),
            len(class_names),
            path,
        )
        logits, images = _dataset(path, file, "logits"), file["images"]
        index = {column: _dataset(path, images, column)[:] for column in INDEX_COLUMNS}
    except (KeyError, ValueError, OSError, TypeError) as error:
        raise BLDAError(
            f"{path}: damaged blda logit store, a field is missing or unreadable ({error})"
        ) from None
    index["name"] = _image_names(path, index["name"])
    if index["kind"].max(initial=0) >= len(KINDS):
        raise BLDAError(f"{path}: the image index has an unknown kind code {index['kind'].max()}")
    index["kind"] = np.asarray(KINDS, dtype=object)[index["kind"]]
    num_rows = logits.shape[0]
    _check_row_counts(path, attrs, len(class_names), num_rows)
    _check_layout(path, file, index, len(class_names), num_rows)
    return _Shard(path, file, class_names, ignore_index, num_rows, metadata, index)


def _image_folder_ignore(ignore_index, metadata: dict, num_classes: int):
    """The ignore value of a store: as written, except an image-folder store of 256 or more
    classes from blda before 2026-12-07, which wrote 255 although 255 is then a class. Every
    image of an image-folder dataset has a class (none is ignored), so its labels are class
    ids throughout and C is the right ignore value."""
    folder = metadata.get("dataset") == "image-folder"
    if folder and isinstance(ignore_index, (int, np.integer)) and 0 <= ignore_index < num_classes:
        return num_classes
    return ignore_index


def _shown(value) -> str:
    """An attribute's value as written in messages (numpy scalars as plain numbers)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _json_attribute(path: Path, attrs, name: str, kind: type):
    """Attribute `name`, JSON text holding a `kind` (list or dict)."""
    try:
        value = json.loads(attrs[name])
    except (TypeError, ValueError):
        raise BLDAError(f"{path}: damaged blda logit store: {name} is not JSON text") from None
    if not isinstance(value, kind):
        raise BLDAError(
            f"{path}: damaged blda logit store: {name} holds {type(value).__name__} "
            f"{value!r:.80}; expected a JSON {'list' if kind is list else 'object'}"
        )
    return value


def _dataset(path: Path, group, name: str) -> h5py.Dataset:
    item = group[name]
    if not isinstance(item, h5py.Dataset):
        where = name if group.name == "/" else f"{group.name.lstrip('/')}/{name}"
        raise BLDAError(f"{path}: damaged blda logit store: {where} is not a dataset")
    return item


def _image_names(path: Path, raw: np.ndarray) -> np.ndarray:
    """The stored image names as str (UTF-8); `_check_shards_agree` refuses repeats."""
    try:
        return np.array([name.decode("utf-8") for name in raw], dtype=object)
    except (UnicodeDecodeError, AttributeError):
        raise BLDAError(
            f"{path}: damaged blda logit store: images/name is not UTF-8 text"
        ) from None


def _check_row_counts(path: Path, attrs, num_classes: int, num_rows: int) -> None:
    """The header's own counts, where it has them, agree with the datasets."""
    for name, actual in (("num_classes", num_classes), ("committed_rows", num_rows)):
        if name in attrs and attrs[name] != actual:
            what = "class names" if name == "num_classes" else "logit rows"
            raise BLDAError(
                f"{path}: damaged blda logit store: {name} is {_shown(attrs[name])} but it holds "
                f"{actual} {what}"
            )


def _check_layout(path, file, index, num_classes, num_rows) -> None:
    """Shapes, dtypes and the image index agree with each other (vectorised over images)."""
    logits, labels = file["logits"], file.get("labels")
    if (
        logits.ndim != 2
        or logits.shape[1] != num_classes
        or logits.dtype not in (np.float16, np.float32)
    ):
        raise BLDAError(
            f"{path}: logits are {logits.dtype} {logits.shape}; expected float16/float32 (rows, {num_classes})"
        )
    if labels is not None and (labels.shape != (num_rows,) or labels.dtype.kind not in "iu"):
        raise BLDAError(
            f"{path}: labels are {labels.dtype} {labels.shape}; expected integers ({num_rows},)"
        )
    pixel_index = file.get("pixel_index")
    if pixel_index is not None and pixel_index.shape != (num_rows,):
        raise BLDAError(
            f"{path}: pixel_index has shape {pixel_index.shape}; expected ({num_rows},)"
        )
    counts, offsets = index["count"], index["offset"]
    if len({len(column) for column in index.values()}) != 1:
        raise BLDAError(f"{path}: the image index columns have different lengths")
    for column in ("count", "height", "width"):
        if (index[column] < 0).any():
            raise BLDAError(f"{path}: the image index has a negative images/{column}")
    if (index["stride"] < 1).any():
        raise BLDAError(f"{path}: the image index has an images/stride below 1")
    expected_offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    if counts.sum() != num_rows or not np.array_equal(offsets, expected_offsets):
        raise BLDAError(f"{path}: the image index does not cover the {num_rows} rows contiguously")
    is_map = index["kind"] == "map"
    raster = -(-index["height"] // index["stride"]) * -(-index["width"] // index["stride"])
    if not np.array_equal(counts[is_map], raster[is_map]):
        raise BLDAError(
            f"{path}: the image index has an unknown kind or a map whose row count differs from its size"
        )


def _check_shards_agree(shards: list[_Shard]) -> None:
    first = shards[0]
    for shard in shards[1:]:
        pair = f"{first.path} and {shard.path}"
        check_same_classes(
            first.class_names,
            shard.class_names,
            f"shards {pair}",
            (first.path.name, shard.path.name),
        )
        if shard.ignore_index != first.ignore_index:
            raise BLDAError(
                f"shards {pair} have different ignore indices: {first.ignore_index} vs {shard.ignore_index}"
            )
        if ("labels" in shard.file) != ("labels" in first.file):
            with_labels = first.path if "labels" in first.file else shard.path
            raise BLDAError(
                f"shards {pair}: only {with_labels} has labels; all shards must have labels or none"
            )
    # Names say where outputs go: two images of one name, in one shard or two, would
    # overwrite each other. (Unnamed images, "", are allowed.)
    seen: dict[str, Path] = {}
    for shard in shards:
        for name in shard.index["name"]:
            if not name:
                continue
            if name not in seen:
                seen[name] = shard.path
            elif seen[name] == shard.path:
                raise BLDAError(f"{shard.path}: the image index holds image {name!r} twice")
            else:
                raise BLDAError(f"shards {seen[name]} and {shard.path} both hold image {name!r}")


def _image_records(shards: list[_Shard], shard_starts: list[int]) -> list[ImageRecord]:
    records = []
    for number, (shard, start) in enumerate(zip(shards, shard_starts, strict=False)):
        index = shard.index
        for i in range(len(index["name"])):
            records.append(
                ImageRecord(
                    name=index["name"][i],
                    offset=start + int(index["offset"][i]),
                    count=int(index["count"][i]),
                    height=int(index["height"][i]),
                    width=int(index["width"][i]),
                    stride=int(index["stride"][i]),
                    kind=index["kind"][i],
                    shard=number,
                )
            )
    return records
