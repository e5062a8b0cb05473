"""The HDF5 logit store: a model's logits (and labels) for many images, streamed in fixed-size chunks.

The schema is documented in docs/store-format.md. `LogitWriter` appends images to `<path>.partial`
and renames it onto `path` only when closed cleanly; `LogitStore` reads one file or a list of
shards as one store, chunk by chunk, with memory that does not grow with the data.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from blda_tools import __version__
from blda_tools.errors import BLDAError
from blda_tools.fileio import PARTIAL_SUFFIX, ensure_writable_dir, partial_path

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
    """Rows `[first_row, first_row + len(logits))` of a store (global row numbers)."""

    logits: torch.Tensor
    labels: torch.Tensor | None
    first_row: int

    @property
    def stop_row(self) -> int:
        return self.first_row + self.logits.shape[0]


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class LogitWriter:
    """Append logits (and labels) image by image to an HDF5 logit store.

    Use as a context manager. Rows go to `<path>.partial`, flushed after each `add`; a clean
    exit marks the store complete and renames it onto `path`. An exception inside the block
    leaves the `.partial` file, which `resume=True` reopens: anything past the last completed
    `add` is dropped and `names` lists the images already stored, so callers can skip them.
    Keyword arguments beyond the listed ones are stored as JSON metadata (`domain` and
    `producer` become root attributes).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        class_names: Sequence[str],
        ignore_index: int = 255,
        *,
        dtype: str = "float16",
        compression: str | None = None,
        chunk_rows: int = 65536,
        resume: bool = False,
        **metadata,
    ) -> None:
        self.path = Path(path)
        self.partial_path = partial_path(self.path)
        self.class_names = _checked_class_names(class_names, self.path)
        self.ignore_index = _checked_int(ignore_index, "ignore_index", self.path)
        self.dtype = _checked_choice(dtype, LOGIT_DTYPES, "dtype", self.path)
        self.compression = _checked_choice(compression, COMPRESSIONS, "compression", self.path)
        self.chunk_rows = _checked_int(chunk_rows, "chunk_rows", self.path, minimum=1)
        self._metadata = _checked_metadata(metadata, self.path)
        self.label_dtype = (
            np.uint8 if 0 <= self.ignore_index <= 255 and len(self.class_names) <= 255 else np.int32
        )
        ensure_writable_dir(self.path.parent)
        self.names: list[str] = []
        self.num_rows = 0
        self._has_labels: bool | None = None
        if resume and self.partial_path.exists():
            self._file = self._reopen_partial()
        elif resume and self.path.exists():
            raise BLDAError(
                f"{self.path}: resume=True but the store is already complete; delete it to rewrite it"
            )
        else:
            self._file = self._create_partial()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_images(self) -> int:
        return len(self.names)

    def __enter__(self) -> LogitWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    def add(
        self, logits, labels=None, name=None, stride=1, pixel_index=None, image_size=None
    ) -> None:
        """Append one image: `(C, H, W)` map (with `(H, W)` labels) or `(N, C)` rows (`(N,)` labels).

        A map is stored every `stride` pixels (`logits[:, ::stride, ::stride]`) in row-major
        order; its full size `(H, W)` is recorded. Rows may carry `pixel_index` (flat
        `y * W + x` positions in a full label map of size `image_size = (H, W)`). Logits may be
        numpy or torch of any float dtype on any device.
        """
        if self._file is None:
            raise BLDAError(f"{self.path}: the writer is closed; cannot add more images")
        name = "" if name is None else str(name)
        where = f"{self.path}: image {name!r}" if name else f"{self.path}: image #{self.num_images}"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise BLDAError(f"{where}: the name is longer than {MAX_NAME_BYTES} bytes (UTF-8)")
        if name and name in self._name_set:
            raise BLDAError(
                f"{where}: an image with this name was already added (names must be unique)"
            )
        logits = _as_array(logits, "logits", where)
        labels = None if labels is None else _as_array(labels, "labels", where)
        if self._has_labels is not None and (labels is not None) != self._has_labels:
            stored = "with" if self._has_labels else "without"
            raise BLDAError(
                f"{where}: earlier images were added {stored} labels; all adds must agree"
            )
        stride = _checked_int(stride, "stride", where, minimum=1)
        if logits.ndim == 3:
            rows, labels, record = _map_rows(logits, labels, stride, image_size, pixel_index, where)
        elif logits.ndim == 2:
            rows, labels, pixel_index, record = _sample_rows(
                logits, labels, stride, pixel_index, image_size, where
            )
        else:
            raise BLDAError(
                f"{where}: logits have shape {tuple(logits.shape)}; expected (N, C) rows or a (C, H, W) map"
            )
        if rows.shape[1] != self.num_classes:
            raise BLDAError(
                f"{where}: logits have {rows.shape[1]} classes; the store has {self.num_classes}"
            )
        _check_logit_values(rows, self.dtype, where)
        if labels is not None:
            _check_label_values(labels, self.num_classes, self.ignore_index, where)
        self._append(
            rows.astype(self.dtype, copy=False), labels, pixel_index, dict(record, name=name)
        )

    def close(self) -> None:
        """Mark the store complete and rename `<path>.partial` onto `path`."""
        if self._file is None:
            return
        self._file.attrs["complete"] = True
        self._file.close()
        self._file = None
        with open(self.partial_path, "rb+") as handle:  # durable before it gets its final name
            os.fsync(handle.fileno())
        os.replace(self.partial_path, self.path)

    def _abandon(self) -> None:
        """Close without completing: the `.partial` file stays for `resume=True`."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _create_partial(self) -> h5py.File:
        try:
            file = h5py.File(self.partial_path, "w")
        except OSError as error:
            raise BLDAError(f"{self.partial_path}: cannot create the store: {error}") from None
        file.attrs.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            complete=False,
            committed_rows=0,
            committed_images=0,
            class_names=json.dumps(self.class_names),
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        self._write_metadata(file)
        file.create_dataset(
            "logits",
            shape=(0, self.num_classes),
            maxshape=(None, self.num_classes),
            dtype=self.dtype,
            chunks=(self.chunk_rows, self.num_classes),
            **self._compression_options(),
        )
        index = file.create_group("images")
        for column, dtype in INDEX_COLUMNS.items():
            index.create_dataset(column, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
        _keep_metadata_in_memory_until_flush(file)
        file.flush()
        self._name_set: set[str] = set()
        return file

    def _reopen_partial(self) -> h5py.File:
        where = f"{self.partial_path} (resume)"
        try:
            file = h5py.File(self.partial_path, "r+")
        except OSError as error:
            raise BLDAError(
                f"{where}: cannot reopen the unfinished store ({error}); delete it and start again"
            ) from None
        try:
            self._check_resumable(file, where)
            self._truncate_to_committed(file, where)
        except BaseException:
            file.close()
            raise
        _keep_metadata_in_memory_until_flush(file)
        self._write_metadata(file)
        file.flush()
        return file

    def _check_resumable(self, file: h5py.File, where: str) -> None:
        if (
            file.attrs.get("format") != FORMAT_NAME
            or file.attrs.get("format_version") != FORMAT_VERSION
        ):
            raise BLDAError(
                f"{where}: not a blda logit store of format version {FORMAT_VERSION}; delete it"
            )
        stored_names = json.loads(file.attrs["class_names"])
        if stored_names != self.class_names:
            raise BLDAError(
                f"{where}: the unfinished store has classes {stored_names}, not {self.class_names}"
            )
        if file["logits"].dtype != np.dtype(self.dtype):
            raise BLDAError(
                f"{where}: the unfinished store holds {file['logits'].dtype} logits, not dtype={self.dtype!r}"
            )
        if int(file.attrs["ignore_index"]) != self.ignore_index:
            raise BLDAError(
                f"{where}: the unfinished store has ignore_index {file.attrs['ignore_index']}, not {self.ignore_index}"
            )

    def _truncate_to_committed(self, file: h5py.File, where: str) -> None:
        """Drop rows and images written after the last completed add (the interrupted one)."""
        rows, images = int(file.attrs["committed_rows"]), int(file.attrs["committed_images"])
        row_datasets = [file[key] for key in ("logits", "labels", "pixel_index") if key in file]
        index = [file["images"][column] for column in INDEX_COLUMNS]
        if any(d.shape[0] < rows for d in row_datasets) or any(d.shape[0] < images for d in index):
            raise BLDAError(
                f"{where}: the unfinished store is damaged (fewer rows than committed); delete it"
            )
        for dataset in row_datasets:
            dataset.resize(rows, axis=0)
        for dataset in index:
            dataset.resize(images, axis=0)
        if images == 0:  # the first add never completed: labelled or not is still open
            for key in ("labels", "pixel_index"):
                if key in file:
                    del file[key]
        self.num_rows = rows
        self.names = [name.decode() for name in file["images/name"][:]]
        self._name_set = {n for n in self.names if n}
        self._has_labels = ("labels" in file) if images else None

    def _write_metadata(self, file: h5py.File) -> None:
        extra = dict(self._metadata)
        file.attrs["domain"] = str(extra.pop("domain", ""))
        file.attrs["producer"] = str(extra.pop("producer", f"blda_tools {__version__}"))
        file.attrs["metadata"] = json.dumps(extra)

    def _append(self, rows: np.ndarray, labels, pixel_index, record: dict) -> None:
        file, start = self._file, self.num_rows
        stop = start + rows.shape[0]
        self._create_optional_datasets(labels is not None, pixel_index is not None)
        if "pixel_index" in file and pixel_index is None:
            pixel_index = np.full(rows.shape[0], -1, np.int64)  # not sampled pixels
        for key, values in (("logits", rows), ("labels", labels), ("pixel_index", pixel_index)):
            if values is not None:
                file[key].resize(stop, axis=0)
                if stop > start:
                    file[key][start:stop] = values
        record.update(offset=start, count=stop - start, kind=KINDS.index(record["kind"]))
        for column in INDEX_COLUMNS:
            file["images"][column].resize(self.num_images + 1, axis=0)
            file["images"][column][self.num_images] = record[column]
        # Two flushes: the data and index reach the file before the counts that commit them,
        # which a resumed writer trusts (everything past them is dropped).
        file.flush()
        file.attrs["committed_rows"] = stop
        file.attrs["committed_images"] = self.num_images + 1
        file.flush()
        self.num_rows = stop
        self.names.append(record["name"])
        if record["name"]:
            self._name_set.add(record["name"])

    def _create_optional_datasets(self, with_labels: bool, with_pixel_index: bool) -> None:
        """`labels` at the first add (if it has labels), `pixel_index` at the first positions."""
        if self._has_labels is None:
            self._has_labels = with_labels
            if with_labels:
                self._create_row_dataset("labels", self.label_dtype)
        if with_pixel_index and "pixel_index" not in self._file:
            # rows of earlier images are not sampled pixels: -1
            self._create_row_dataset("pixel_index", np.int64, fill=-1)

    def _create_row_dataset(self, key: str, dtype, fill: int = 0) -> None:
        self._file.create_dataset(
            key,
            data=np.full(self.num_rows, fill, dtype),
            maxshape=(None,),
            chunks=(self.chunk_rows,),
            **self._compression_options(),
        )

    def _compression_options(self) -> dict:
        return {"compression": self.compression, "shuffle": True} if self.compression else {}


def _keep_metadata_in_memory_until_flush(file: h5py.File) -> None:
    """Stop HDF5 writing metadata between flushes, so a killed writer leaves the last flush.

    Between flushes only row data reaches the file, past what the committed counts cover.
    """
    config = file.id.get_mdc_config()
    # Evictions can only be disabled with automatic cache resizing off (HDF5 rule).
    config.evictions_enabled = False
    config.incr_mode = config.flash_incr_mode = config.decr_mode = 0
    file.id.set_mdc_config(config)


def _as_array(value, what: str, where: str) -> np.ndarray:
    """A numpy view or copy of a numpy array or torch tensor (moved to the CPU)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise BLDAError(
        f"{where}: {what} must be a numpy array or torch tensor, got {type(value).__name__}"
    )


def _map_rows(logits, labels, stride, image_size, pixel_index, where):
    """Rows `(h * w, C)` of a `(C, H, W)` map sampled every `stride` pixels, row-major."""
    num_classes, height, width = logits.shape
    if height == 0 or width == 0:
        raise BLDAError(f"{where}: the logit map {tuple(logits.shape)} has no pixels")
    if pixel_index is not None:
        raise BLDAError(
            f"{where}: pixel_index is for (N, C) rows; a (C, H, W) map gives its own positions"
        )
    if image_size is not None and tuple(image_size) != (height, width):
        raise BLDAError(
            f"{where}: image_size {tuple(image_size)} differs from the map's size {(height, width)}; "
            "pass the full-resolution map, the writer keeps every stride-th pixel"
        )
    if labels is not None and labels.shape != (height, width):
        raise BLDAError(
            f"{where}: labels have shape {labels.shape}; expected {(height, width)} to match logits {logits.shape}"
        )
    strided = logits[:, ::stride, ::stride]
    rows = np.ascontiguousarray(strided.reshape(num_classes, -1).T)
    if labels is not None:
        labels = np.ascontiguousarray(labels[::stride, ::stride]).reshape(-1)
    return rows, labels, {"height": height, "width": width, "stride": stride, "kind": "map"}


def _sample_rows(logits, labels, stride, pixel_index, image_size, where):
    """Rows `(N, C)` that do not form a map, optionally with their flat pixel positions."""
    if stride != 1:
        raise BLDAError(
            f"{where}: stride={stride} applies to (C, H, W) maps; (N, C) rows are stored as given"
        )
    count = logits.shape[0]
    if labels is not None and labels.shape != (count,):
        raise BLDAError(
            f"{where}: labels have shape {labels.shape}; expected ({count},) to match logits {logits.shape}"
        )
    height = width = 0
    if image_size is not None:
        height, width = (_checked_int(v, "image_size", where, minimum=1) for v in image_size)
    if pixel_index is not None:
        pixel_index = _as_array(pixel_index, "pixel_index", where)
        if image_size is None:
            raise BLDAError(f"{where}: pixel_index needs image_size=(H, W) of the full label map")
        if pixel_index.shape != (count,) or pixel_index.dtype.kind not in "iu":
            raise BLDAError(
                f"{where}: pixel_index must be ({count},) integers, got {pixel_index.dtype} {pixel_index.shape}"
            )
        if count and (pixel_index.min() < 0 or pixel_index.max() >= height * width):
            raise BLDAError(
                f"{where}: pixel_index values must lie in [0, {height * width}) for image_size {(height, width)}"
            )
        pixel_index = pixel_index.astype(np.int64, copy=False)
    return (
        logits,
        labels,
        pixel_index,
        {"height": height, "width": width, "stride": 1, "kind": "samples"},
    )


def _check_logit_values(rows: np.ndarray, dtype: str, where: str) -> None:
    if rows.dtype.kind != "f":
        raise BLDAError(f"{where}: logits must be floating point, got {rows.dtype}")
    if not np.isfinite(rows).all():
        bad = np.argwhere(~np.isfinite(rows))[0]
        raise BLDAError(
            f"{where}: logits contain NaN or Inf (first at row {bad[0]}, class {bad[1]})"
        )
    if dtype == "float16" and rows.size and np.abs(rows).max() > FLOAT16_MAX:
        raise BLDAError(
            f"{where}: logits reach {np.abs(rows).max():.6g}, beyond the float16 range (+-{FLOAT16_MAX:g}); "
            'store them with dtype="float32"'
        )


def _check_label_values(
    labels: np.ndarray, num_classes: int, ignore_index: int, where: str
) -> None:
    if labels.dtype.kind not in "iu":
        raise BLDAError(f"{where}: labels must be integers, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise BLDAError(
            f"{where}: label {labels[bad][0]} is not a class in [0, {num_classes}) nor the ignore index {ignore_index}"
        )


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


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


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


class LogitStore:
    """Read one logit store file, or a list of shards as one store, without loading it.

    Rows are numbered globally across shards in the order given; `images` carry global
    offsets, `metadata` is the first shard's. Use as a context manager or call `close()`.
    Pickling reopens the files by path, so a store can be handed to worker processes.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise BLDAError("logit store: no file given")
        self.paths = tuple(Path(p) for p in paths)
        if len({p.resolve() for p in self.paths}) != len(self.paths):
            raise BLDAError(
                f"logit store: a shard is listed twice in {[str(p) for p in self.paths]}"
            )
        self._shards: list[_Shard] = []
        try:
            for path in self.paths:
                self._shards.append(_open_shard(path))
            _check_shards_agree(self._shards)
        except BaseException:
            self.close()
            raise
        first = self._shards[0]
        self.class_names = tuple(first.class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = first.ignore_index
        self.has_labels = "labels" in first.file
        self.metadata = first.metadata
        self._shard_starts = np.cumsum([0] + [s.num_rows for s in self._shards]).tolist()
        self.num_rows = self._shard_starts[-1]
        self.images = _image_records(self._shards, self._shard_starts)
        if self.num_rows == 0:
            self.close()
            raise BLDAError(f"{', '.join(map(str, self.paths))}: the store is empty (zero rows)")

    def __len__(self) -> int:
        return self.num_rows

    def __reduce__(self):
        # Worker processes reopen the files (HDF5 handles cannot be pickled).
        return (LogitStore, (self.paths,))

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for shard in self._shards:
            shard.file.close()

    def iter_chunks(
        self,
        rows: int = 1 << 20,
        start: int = 0,
        stop: int | None = None,
        validate: bool = True,
        *,
        reuse_buffers: bool = False,
    ) -> Iterator[Chunk]:
        """Yield rows `[start, stop)` in chunks of `rows` (the last may be shorter).

        Chunks span shard boundaries. With `validate`, each chunk is checked for non-finite
        logits and labels outside `[0, C)` other than the ignore index. With `reuse_buffers`,
        every chunk is written into the same two tensors (no fresh memory to fault in; the
        float16 -> float32 step alone measured 2.5x faster): only for consumers done with a
        chunk before they take the next.
        """
        stop = self.num_rows if stop is None else stop
        _checked_int(rows, "rows", "iter_chunks", minimum=1)
        if not (0 <= start <= stop <= self.num_rows):
            raise BLDAError(
                f"iter_chunks: row range [{start}, {stop}) is not inside [0, {self.num_rows})"
            )
        buffers = _ReadBuffers(min(rows, stop - start), self.num_classes, self.has_labels)
        for first in range(start, stop, rows):
            last = min(stop, first + rows)
            logits, labels = buffers.outputs(last - first, fresh=not reuse_buffers)
            self._read_range(first, last, logits, labels, buffers, validate)
            yield Chunk(logits, labels, first)

    def read_image(
        self, index: int, validate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored raster of map image `index`: logits `(C, h, w)` float32, labels `(h, w)` int64."""
        record = self.images[index]
        if record.kind != "map":
            raise BLDAError(
                f"{self.paths[record.shard]}: image {record.name!r} holds {record.kind}, not a map; read it with iter_chunks"
            )
        buffers = _ReadBuffers(record.count, self.num_classes, self.has_labels)
        logits, labels = buffers.outputs(record.count, fresh=True)
        self._read_range(
            record.offset, record.offset + record.count, logits, labels, buffers, validate
        )
        height, width = record.shape
        logits = logits.reshape(height, width, self.num_classes).permute(2, 0, 1).contiguous()
        return logits, None if labels is None else labels.reshape(height, width)

    def read_pixel_index(self, index: int) -> torch.Tensor | None:
        """Flat positions `y * width + x` of a sampled image's rows, or None if it has none."""
        record = self.images[index]
        shard = self._shards[record.shard]
        if "pixel_index" not in shard.file or record.kind != "samples":
            return None
        local = record.offset - self._shard_starts[record.shard]
        positions = torch.from_numpy(shard.file["pixel_index"][local : local + record.count])
        return None if record.count and positions[0] < 0 else positions

    def validate(self, rows: int = 1 << 20) -> None:
        """Read the whole store, raising BLDAError at the first non-finite logit or bad label."""
        for _ in self.iter_chunks(rows, validate=True, reuse_buffers=True):
            pass

    def _read_range(self, first, last, logits, labels, buffers, validate) -> None:
        """Fill `logits`/`labels` with global rows `[first, last)`, shard by shard."""
        shard_number = bisect.bisect_right(self._shard_starts, first) - 1
        filled = 0
        while filled < last - first:
            shard, shard_start = self._shards[shard_number], self._shard_starts[shard_number]
            local_first = first + filled - shard_start
            count = min(last - first - filled, shard.num_rows - local_first)
            shard_number += 1
            if count == 0:  # an empty shard
                continue
            target = slice(filled, filled + count)
            try:
                buffers.read_logits(shard.file["logits"], local_first, count, logits[target])
                stored_labels = None
                if labels is not None:
                    stored_labels = buffers.read_labels(
                        shard.file["labels"], local_first, count, labels[target]
                    )
            except OSError as error:
                raise BLDAError(
                    f"{shard.path}: cannot read rows [{local_first}, {local_first + count}): {error} (truncated or damaged file?)"
                ) from None
            if validate:
                _validate_rows(logits[target], stored_labels, self, shard.path, first + filled)
            filled += count


class _ReadBuffers:
    """Reusable raw-read buffers and (optionally reused) float32 / int64 output tensors."""

    def __init__(self, rows: int, num_classes: int, has_labels: bool) -> None:
        self.rows, self.num_classes, self.has_labels = rows, num_classes, has_labels
        self._raw: dict[np.dtype, np.ndarray] = {}
        self._outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def outputs(self, count: int, fresh: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if fresh or self._outputs is None:
            logits = torch.empty(
                (count if fresh else self.rows, self.num_classes), dtype=torch.float32
            )
            labels = torch.empty(logits.shape[0], dtype=torch.int64) if self.has_labels else None
            if fresh:
                return logits, labels
            self._outputs = (logits, labels)
        logits, labels = self._outputs
        return logits[:count], None if labels is None else labels[:count]

    def read_logits(self, dataset: h5py.Dataset, first: int, count: int, out: torch.Tensor) -> None:
        if dataset.dtype == np.float32:  # straight into the output, no conversion
            dataset.read_direct(out.numpy(), np.s_[first : first + count], np.s_[0:count])
            return
        raw = self._raw_buffer(dataset.dtype, (self.num_classes,))
        dataset.read_direct(raw, np.s_[first : first + count], np.s_[0:count])
        out.copy_(torch.from_numpy(raw[:count]))  # float16 -> float32 in torch (fast, threaded)

    def read_labels(
        self, dataset: h5py.Dataset, first: int, count: int, out: torch.Tensor
    ) -> np.ndarray:
        """Fill `out` (int64); returns the labels as stored (uint8 mostly: cheaper to check)."""
        raw = self._raw_buffer(dataset.dtype, ())
        dataset.read_direct(raw, np.s_[first : first + count], np.s_[0:count])
        out.copy_(torch.from_numpy(raw[:count]))
        return raw[:count]

    def _raw_buffer(self, dtype: np.dtype, row_shape: tuple) -> np.ndarray:
        key = (np.dtype(dtype), row_shape)
        if key not in self._raw:
            self._raw[key] = np.empty((self.rows, *row_shape), dtype=dtype)
        return self._raw[key]


def _validate_rows(
    logits: torch.Tensor, labels: np.ndarray | None, store: LogitStore, path: Path, first: int
) -> None:
    """Cheap checks: one float32 sum finds any NaN/Inf (exact search only when it is not finite);
    labels are checked as stored, one byte each."""
    where = f"{path}: rows [{first}, {first + logits.shape[0]})"
    if not torch.isfinite(logits.sum()):
        finite_rows = torch.isfinite(logits).all(dim=1)
        if not finite_rows.all():  # else the sum merely overflowed (float32 stores)
            row = first + int(torch.nonzero(~finite_rows)[0])
            raise BLDAError(
                f"{where}: logits contain NaN or Inf (first at row {row}{_image_at(store, row)})"
            )
    if labels is not None:
        bad = (labels != store.ignore_index) & ((labels < 0) | (labels >= store.num_classes))
        if bad.any():
            row = first + int(np.flatnonzero(bad)[0])
            raise BLDAError(
                f"{where}: label {int(labels[row - first])} at row {row}{_image_at(store, row)} is not a class "
                f"in [0, {store.num_classes}) nor the ignore index {store.ignore_index}"
            )


def _image_at(store: LogitStore, row: int) -> str:
    offsets = [record.offset for record in store.images]
    position = bisect.bisect_right(offsets, row) - 1
    return f", image {store.images[position].name!r}" if position >= 0 else ""


def _open_shard(path: Path) -> _Shard:
    if path.name.endswith(PARTIAL_SUFFIX):
        raise BLDAError(
            f"{path}: this store was not completed (the writer was interrupted), rerun with --resume"
        )
    if not path.is_file():
        raise BLDAError(f"{path}: no such file")
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
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise BLDAError(
            f"{path}: store format version {version} is not supported (this blda reads version {FORMAT_VERSION})"
        )
    if not attrs.get("complete", False):
        raise BLDAError(
            f"{path}: this store was not completed (the writer was interrupted), rerun with --resume"
        )
    try:
        class_names = json.loads(attrs["class_names"])
        logits, images = file["logits"], file["images"]
        index = {column: images[column][:] for column in INDEX_COLUMNS}
        metadata = {
            "domain": str(attrs["domain"]),
            "producer": str(attrs["producer"]),
            "created": str(attrs["created"]),
        }
        metadata.update(json.loads(attrs["metadata"]))
        ignore_index = int(attrs["ignore_index"])
    except (KeyError, ValueError, OSError) as error:
        raise BLDAError(
            f"{path}: damaged blda logit store, a field is missing or unreadable ({error})"
        ) from None
    index["name"] = np.array([name.decode() for name in index["name"]], dtype=object)
    if index["kind"].max(initial=0) >= len(KINDS):
        raise BLDAError(f"{path}: the image index has an unknown kind code {index['kind'].max()}")
    index["kind"] = np.asarray(KINDS, dtype=object)[index["kind"]]
    num_rows = logits.shape[0]
    _check_layout(path, file, index, len(class_names), num_rows)
    return _Shard(path, file, class_names, ignore_index, num_rows, metadata, index)


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
        if shard.class_names != first.class_names:
            raise BLDAError(
                f"shards {pair} have different class names: {first.class_names} vs {shard.class_names}"
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
    seen: dict[str, Path] = {}
    for shard in shards:
        for name in shard.index["name"]:
            if name and seen.setdefault(name, shard.path) != shard.path:
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
