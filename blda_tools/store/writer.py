"""`LogitWriter`: appends images to `<path>.partial`, renamed onto `path` when closed cleanly;
resumable after an interruption."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from blda_tools import __version__
from blda_tools.errors import BLDAError
from blda_tools.fileio import describe_os_error, ensure_writable_dir, partial_path
from blda_tools.store.file_io import (
    check_resumable,
    keep_metadata_in_memory_until_flush,
    start_writeback,
    write_rows,
)
from blda_tools.store.rows import (
    _as_array,
    _check_label_values,
    _check_logit_values,
    _is_torch_castable,
    _laid_out_map_rows,
    _map_rows,
    _sample_rows,
    _torch_rows,
)
from blda_tools.store.schema import (
    COMPRESSIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_COLUMNS,
    KINDS,
    LOGIT_DTYPES,
    MAX_NAME_BYTES,
    _checked_choice,
    _checked_class_names,
    _checked_ignore_index,
    _checked_int,
    _checked_metadata,
)


class StoreWriteError(BLDAError):
    """The file system refused a write of the store (a full disk, ...): what the writer had
    committed stays in its unfinished file."""


@dataclass(frozen=True)
class PreparedImage:
    """One image's checked rows, ready for `LogitWriter.append`: `(N, C)` logits of the
    store's dtype, `(N,)` labels and pixel positions (or None), and its index entry."""

    rows: np.ndarray
    labels: np.ndarray | None
    pixel_index: np.ndarray | None
    record: dict


class LogitWriter:
    """Append logits (and labels) image by image to an HDF5 logit store.

    Use as a context manager. Rows go to `<path>.partial`; a clean exit marks the store
    complete and renames it onto `path`. An exception inside the block leaves the `.partial`
    file, which `resume=True` reopens: anything past the last commit is dropped and `names`
    lists the images already stored, so callers can skip them; without it an unfinished store
    is replaced, or refused with `exclusive=True`. Keyword arguments beyond the
    listed ones are stored as JSON metadata (`domain` and `producer` become root attributes).

    Commits: by default every `add` is committed (flushed, then counted) before it returns.
    With `commit_interval=T` seconds, `add` commits only when T seconds have passed since the
    last commit, and `commit()` commits on demand: fewer flushes, and an interruption loses
    (a resume redoes) the adds of at most the last T seconds. Leaving the block, even by an
    exception, commits every completed `add`.
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
        commit_interval: float = 0.0,
        resume: bool = False,
        exclusive: bool = False,
        **metadata,
    ) -> None:
        self.path = Path(path)
        self.partial_path = partial_path(self.path)
        self.class_names = _checked_class_names(class_names, self.path)
        self.ignore_index = _checked_ignore_index(ignore_index, len(self.class_names), self.path)
        self.dtype = _checked_choice(dtype, LOGIT_DTYPES, "dtype", self.path)
        self.compression = _checked_choice(compression, COMPRESSIONS, "compression", self.path)
        self.chunk_rows = _checked_int(chunk_rows, "chunk_rows", self.path, minimum=1)
        if not isinstance(commit_interval, int | float) or not commit_interval >= 0:
            raise BLDAError(
                f"{self.path}: commit_interval must be a number of seconds >= 0, "
                f"got {commit_interval!r}"
            )
        self.commit_interval = float(commit_interval)
        self._metadata = _checked_metadata(metadata, self.path)
        self._exclusive = bool(exclusive)
        self.label_dtype = (
            np.uint8 if 0 <= self.ignore_index <= 255 and len(self.class_names) <= 255 else np.int32
        )
        ensure_writable_dir(self.path.parent)
        self.names: list[str] = []
        self.num_rows = 0
        self._has_labels: bool | None = None
        # Index entries of the adds since the last commit: written by `commit`, so that one
        # commit costs one resize and one write per index column, however many images it covers.
        self._uncommitted: list[dict] = []
        self._open_datasets: dict[str, h5py.Dataset] = {}
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

    @property
    def uncommitted_images(self) -> int:
        """Images added since the last commit (0 with the default `commit_interval`)."""
        return len(self._uncommitted)

    def __enter__(self) -> LogitWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            try:
                self.close()
            except OSError as error:
                raise self._write_failure(error) from None
            return
        self._abandon()
        if isinstance(exc, OSError):  # a full disk while appending: the committed part is kept
            raise self._write_failure(exc) from None

    def _write_failure(self, error: OSError) -> StoreWriteError:
        kept = self.partial_path.exists() and self.num_images > self.uncommitted_images
        return StoreWriteError(
            f"{self.partial_path}: cannot write: {describe_os_error(error)}"
            + ("; the images committed so far stay in it" if kept else "")
        )

    def add(
        self, logits, labels=None, name=None, stride=1, pixel_index=None, image_size=None
    ) -> None:
        """Append one image: `(C, H, W)` map (with `(H, W)` labels) or `(N, C)` rows (`(N,)` labels).

        A map is stored every `stride` pixels (`logits[:, ::stride, ::stride]`) in row-major
        order; its full size `(H, W)` is recorded. Rows may carry `pixel_index` (flat
        `y * W + x` positions in a full label map of size `image_size = (H, W)`). Logits may be
        numpy or torch of any float dtype on any device.

        `add` is `append(prepare(...))`: a caller may prepare images in other threads.
        """
        self.append(self.prepare(logits, labels, name, stride, pixel_index, image_size))

    def prepare(
        self, logits, labels=None, name=None, stride=1, pixel_index=None, image_size=None
    ) -> PreparedImage:
        """Check one image and lay out its rows as `add` stores them, without touching the
        file or the writer's state: safe to call from several threads while another appends
        (the casts run in torch, which releases the GIL)."""
        name, where = self._checked_name(name)
        in_torch = _is_torch_castable(logits)  # checked and cast in torch, see `_torch_rows`
        logits = logits.detach() if in_torch else _as_array(logits, "logits", where)
        labels = None if labels is None else _as_array(labels, "labels", where)
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
        if rows.shape[-1] != self.num_classes:
            raise BLDAError(
                f"{where}: logits have {rows.shape[-1]} classes; the store has {self.num_classes}"
            )
        if in_torch:
            rows = _torch_rows(rows, self.dtype, where)
        else:
            _check_logit_values(rows, self.dtype, where)
            rows = rows.astype(self.dtype, copy=False)
        labels = self._stored_labels(labels, where)
        return PreparedImage(rows, labels, pixel_index, dict(record, name=name))

    def _stored_labels(self, labels: np.ndarray | None, where: str) -> np.ndarray | None:
        """Laid-out labels checked to be classes or the ignore index, in the store's type."""
        if labels is None:
            return None
        _check_label_values(labels, self.num_classes, self.ignore_index, where)
        # checked to fit: numpy's cast is cheaper than HDF5's conversion on write
        return labels.astype(self.label_dtype, copy=False)

    def _checked_name(self, name) -> tuple[str, str]:
        """The image's name as stored and how errors describe it; refused once closed."""
        if self._file is None:
            raise BLDAError(f"{self.path}: the writer is closed; cannot add more images")
        name = "" if name is None else str(name)
        where = self._describe_image(name)
        if len(name.encode()) > MAX_NAME_BYTES:
            raise BLDAError(f"{where}: the name is longer than {MAX_NAME_BYTES} bytes (UTF-8)")
        return name, where

    def prepare_map_rows(
        self, rows: np.ndarray, labels, name, image_size, stride: int = 1, *, largest: float
    ) -> PreparedImage:
        """`prepare` of a `(C, H, W)` map whose rows the caller has laid out and cast itself:
        `rows` `(ceil(H / stride) * ceil(W / stride), C)` of the store's dtype in the order
        `prepare` stores the map, `image_size` `(H, W)`, `largest` the largest magnitude of
        the values the rows were rounded from: the range check uses it instead of a pass over
        the rows (`inference.upsample` computes it in the same pass). Same record as `prepare`."""
        name, where = self._checked_name(name)
        stride = _checked_int(stride, "stride", where, minimum=1)
        labels = None if labels is None else _as_array(labels, "labels", where)
        rows, labels, record = _laid_out_map_rows(
            rows, labels, image_size, stride, largest, (self.num_classes, self.dtype), where
        )
        return PreparedImage(
            rows, self._stored_labels(labels, where), None, dict(record, name=name)
        )

    def append(self, image: PreparedImage) -> None:
        """Write an image from `prepare` (in the order of the calls to `append`)."""
        if self._file is None:
            raise BLDAError(f"{self.path}: the writer is closed; cannot add more images")
        name = image.record["name"]
        where = self._describe_image(name)
        if name and name in self._name_set:
            raise BLDAError(
                f"{where}: an image with this name was already added (names must be unique)"
            )
        if self._has_labels is not None and (image.labels is not None) != self._has_labels:
            stored = "with" if self._has_labels else "without"
            raise BLDAError(
                f"{where}: earlier images were added {stored} labels; all adds must agree"
            )
        self._append(image.rows, image.labels, image.pixel_index, dict(image.record))

    def commit(self) -> None:
        """Make every completed `add` survive an interruption: write the pending index entries,
        flush, then raise the committed counts and flush again."""
        if self._file is None:
            raise BLDAError(f"{self.path}: the writer is closed; nothing to commit")
        file, pending = self._file, self._uncommitted
        if pending:
            first = self.num_images - len(pending)
            for column in INDEX_COLUMNS:
                values = [record[column] for record in pending]
                if column == "name":  # fixed-length UTF-8 (numpy would encode as ASCII)
                    values = [name.encode() for name in values]
                dataset = file["images"][column]
                dataset.resize(self.num_images, axis=0)
                dataset[first:] = np.array(values, dataset.dtype)
        # Two flushes: the data and index reach the file before the counts that commit them,
        # which a resumed writer trusts (everything past them is dropped).
        file.flush()
        file.attrs["committed_rows"] = self.num_rows
        file.attrs["committed_images"] = self.num_images
        file.flush()
        self._release_pages()
        self._uncommitted = []
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit, mark the store complete and rename `<path>.partial` onto `path`."""
        if self._file is None:
            return
        self.commit()
        self._file.attrs["complete"] = True
        self._close_file()
        with open(self.partial_path, "rb+") as handle:  # durable before it gets its final name
            os.fsync(handle.fileno())
        os.replace(self.partial_path, self.path)

    def _abandon(self) -> None:
        """Close without completing: the `.partial` file stays for `resume=True`.

        The completed adds are committed first; if that fails too (the error being raised may
        be HDF5's own), they are left uncommitted and a resume redoes them.
        """
        if self._file is None:
            return
        # The exception already propagating is the one to report: on a full disk, HDF5's
        # close fails as well (its flush of the rows written), with a RuntimeError that would
        # replace the write error. The file stays what the last commit made it.
        with contextlib.suppress(Exception):
            if self._uncommitted:
                self.commit()
        try:
            self._close_file()
        except Exception:  # noqa: BLE001 - see above
            self._file = None

    def _close_file(self) -> None:
        self._open_datasets.clear()
        self._file.close()
        self._file = None

    def _describe_image(self, name: str) -> str:
        """The image named in error messages: its name, or its position when unnamed."""
        return f"{self.path}: image {name!r}" if name else f"{self.path}: image #{self.num_images}"

    def _create_partial(self) -> h5py.File:
        # `exclusive`: an unfinished store already there (another writer's now, or one stopped
        # earlier) is refused, never truncated (O_EXCL: also against a writer starting now).
        mode = "w-" if self._exclusive else "w"
        try:
            file = h5py.File(self.partial_path, mode, **self._chunk_cache_options())
        except OSError as error:
            if self._exclusive and self.partial_path.exists():
                raise BLDAError(
                    f"{self.partial_path}: an unfinished store is already there (another "
                    "writer's, or one stopped earlier); resume it (--resume) or delete it"
                ) from None
            raise BLDAError(
                f"{self.partial_path}: cannot create the store: {describe_os_error(error)}"
            ) from None
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
        keep_metadata_in_memory_until_flush(file)
        file.flush()
        self._name_set: set[str] = set()
        self._writeback_marks = (0, 0)  # file ends at the last two `_release_pages`
        self._last_commit = time.monotonic()
        return file

    def _reopen_partial(self) -> h5py.File:
        where = f"{self.partial_path} (resume)"
        try:
            file = h5py.File(self.partial_path, "r+", **self._chunk_cache_options())
        except OSError as error:
            raise BLDAError(
                f"{where}: cannot reopen the unfinished store ({error}); delete it and start again"
            ) from None
        try:
            check_resumable(file, where, self.class_names, self.dtype, self.ignore_index)
            self._truncate_to_committed(file, where)
        except BaseException:
            file.close()
            raise
        keep_metadata_in_memory_until_flush(file)
        self._write_metadata(file)
        file.flush()
        self._writeback_marks = (0, 0)  # file ends at the last two `_release_pages`
        self._last_commit = time.monotonic()
        return file

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
        """Write the rows now (they are past the committed count until a commit) and keep the
        index entry for the next commit."""
        start = self.num_rows
        stop = start + rows.shape[0]
        self._create_optional_datasets(labels is not None, pixel_index is not None)
        if "pixel_index" in self._file and pixel_index is None:
            pixel_index = np.full(rows.shape[0], -1, np.int64)  # not sampled pixels
        for key, values in (("logits", rows), ("labels", labels), ("pixel_index", pixel_index)):
            if values is not None:
                dataset = self._row_dataset(key)
                dataset.resize(stop, axis=0)
                if stop > start:
                    write_rows(dataset, start, values, direct=not self.compression)
        record.update(offset=start, count=stop - start, kind=KINDS.index(record["kind"]))
        self._uncommitted.append(record)
        self.num_rows = stop
        self.names.append(record["name"])
        if record["name"]:
            self._name_set.add(record["name"])
        if time.monotonic() - self._last_commit >= self.commit_interval:
            self.commit()  # which releases the pages too
        else:
            self._release_pages()

    def _release_pages(self) -> None:
        """`start_writeback` from the end of the file two calls ago (the pages written since
        the call before were still being written back then), after every add and commit.
        Once a second (at commits only) a 256 x 512 image's append took 2.6-3.7 ms of CPU
        (median) and 7-8 on average, with commits up to 30 ms: new page-cache pages cost
        this VM about 10 us each, recycled ones far less (`benchmarks/bench_dump.py`)."""
        end = start_writeback(self._file, self._writeback_marks[0])
        self._writeback_marks = (self._writeback_marks[1], end)

    def _row_dataset(self, key: str) -> h5py.Dataset:
        """The row dataset `key`, kept open between adds: opening and closing it per add cost
        the dump's appending thread ~1 ms per 256 x 512 image (`benchmarks/bench_dump.py`)."""
        if key not in self._open_datasets:
            self._open_datasets[key] = self._file[key]
        return self._open_datasets[key]

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

    def _chunk_cache_options(self) -> dict:
        """h5py.File options: no chunk cache for uncompressed stores. Rows are written once,
        so caching a chunk (8 MiB by default since HDF5 2.0) only copies it before writing;
        without the cache HDF5 writes it straight from the caller's array. Filters need whole
        chunks, so compressed stores keep HDF5's cache."""
        return {} if self.compression else {"rdcc_nbytes": 0}

    def _compression_options(self) -> dict:
        return {"compression": self.compression, "shuffle": True} if self.compression else {}
