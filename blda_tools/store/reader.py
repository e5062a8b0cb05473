"""`LogitStore`: one file or a list of shards read as one store, chunk by chunk, with memory that
does not grow with the data."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from blda_tools.errors import BLDAError
from blda_tools.store.schema import Chunk, _checked_int
from blda_tools.store.shards import (
    _check_shards_agree,
    _image_records,
    _open_shard,
    _Shard,
)

if TYPE_CHECKING:
    import torch

# Rows checked at a time for NaN / Inf: the bit masks' temporaries stay in cache.
CHECK_ROWS = 1 << 14


class LogitStore:
    """Read one logit store file, or a list of shards as one store, without loading it.

    Rows are numbered globally across shards in the order given; `images` carry global
    offsets, `metadata` is the first shard's. Use as a context manager or call `close()`.
    Pickling reopens the files by path, so a store can be handed to worker processes.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        given = paths
        try:
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        except TypeError:
            paths = [None]
        if not all(isinstance(path, (str, os.PathLike)) for path in paths):
            raise BLDAError(f"logit store: expected a path or a list of paths, got {given!r}")
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
        dtype: torch.dtype | str | None = "float32",
        read_ahead: bool = False,
    ) -> Iterator[Chunk]:
        """Yield rows `[start, stop)` in chunks of `rows` (the last may be shorter), as torch
        tensors: logits ``(n, C)`` of `dtype`, labels ``(n,)`` int64.

        Chunks span shard boundaries. With `validate`, each chunk is checked for non-finite
        logits and labels outside `[0, C)` other than the ignore index. With `reuse_buffers`,
        every chunk is written into the same two tensors (no fresh memory to fault in; the
        float16 -> float32 step alone measured 2.5x faster): only for consumers done with a
        chunk before they take the next. `dtype`: float32 (default) or float16 (torch dtypes or
        their names), or None for the stored dtype (float32 if any shard stores float32).
        `read_ahead`: read the next chunk in a background thread (`iter_arrays`).
        """
        import torch

        target = getattr(torch, self._logit_dtype_name(dtype, "iter_chunks"))
        converted = target != self.stored_dtype
        arrays = self.iter_arrays(
            rows,
            start,
            stop,
            validate,
            reuse_buffers=reuse_buffers or converted,
            dtype=None,
            read_ahead=read_ahead,
        )
        reused = None  # the output tensors, sized by the first (largest) chunk
        for chunk in arrays:
            logits = torch.from_numpy(chunk.logits)
            labels = None if chunk.labels is None else torch.from_numpy(chunk.labels)
            if not reuse_buffers:  # fresh tensors; float16 <-> float32 in torch's threads
                labels = None if labels is None else labels.to(torch.int64)
                yield Chunk(logits.to(target), labels, chunk.first_row)
                continue
            if reused is None:
                reused = (
                    torch.empty(logits.shape, dtype=target),
                    None if labels is None else torch.empty(labels.shape, dtype=torch.int64),
                )
            n = logits.shape[0]
            if converted:
                logits = reused[0][:n].copy_(logits)
            if labels is not None:
                labels = reused[1][:n].copy_(labels)
            yield Chunk(logits, labels, chunk.first_row)

    def iter_arrays(
        self,
        rows: int = 1 << 20,
        start: int = 0,
        stop: int | None = None,
        validate: bool = True,
        *,
        reuse_buffers: bool = False,
        dtype: str | None = None,
        read_ahead: bool = False,
    ) -> Iterator[Chunk]:
        """`iter_chunks` as numpy arrays, without torch: logits in `dtype` ("float16",
        "float32", or None for the stored dtype), labels in their stored integer type (uint8
        for up to 255 classes: widen them before arithmetic). The same checks and buffer reuse.

        With `read_ahead`, a background thread reads the next chunk while the caller works on
        this one (into a second set of buffers when they are reused, so a chunk still stays
        valid until the next is taken): for callers whose work on a chunk releases the GIL
        (compiled kernels), which then hides the read. An error reading a chunk is raised
        when that chunk is taken.
        """
        stop = self.num_rows if stop is None else stop
        _checked_int(rows, "rows", "iter_chunks", minimum=1)
        if not (0 <= start <= stop <= self.num_rows):
            raise BLDAError(
                f"iter_chunks: row range [{start}, {stop}) is not inside [0, {self.num_rows})"
            )
        name = self._logit_dtype_name(dtype, "iter_arrays")
        buffer_sets = [
            _ReadBuffers(min(rows, stop - start), self.num_classes, name, self._label_dtype())
            for _ in range(2 if read_ahead and reuse_buffers else 1)
        ]

        def read(first: int, number: int) -> Chunk:
            last, buffers = min(stop, first + rows), buffer_sets[number % len(buffer_sets)]
            logits, labels = buffers.outputs(last - first, fresh=not reuse_buffers)
            self._read_range(first, last, logits, labels, buffers, validate)
            return Chunk(logits, labels, first)

        firsts = range(start, stop, rows)
        if not read_ahead:
            yield from (read(first, 0) for first in firsts)
            return
        yield from _read_one_ahead(read, firsts)

    @property
    def stored_dtype(self) -> torch.dtype:
        """float16 when every shard stores float16 logits, else float32 (a torch dtype)."""
        import torch

        return getattr(torch, self.stored_dtype_name)

    @property
    def stored_dtype_name(self) -> str:
        """ "float16" when every shard stores float16 logits, else "float32"."""
        stored = {shard.file["logits"].dtype for shard in self._shards}
        return "float16" if stored == {np.dtype(np.float16)} else "float32"

    def _logit_dtype_name(self, dtype, where: str) -> str:
        """ "float16" or "float32" from a torch dtype, a name, or None (the stored dtype)."""
        if dtype is None:
            return self.stored_dtype_name
        name = str(dtype).removeprefix("torch.")
        if name not in ("float16", "float32"):
            raise BLDAError(f"{where}: dtype must be float16, float32 or None, got {dtype}")
        return name

    def has_labelled_pixel(self, rows: int = 1 << 22) -> bool:
        """Whether any row's label is not the ignore index (reads the labels only, `rows` at
        a time, and stops at the first)."""
        for shard in self._shards if self.has_labels else ():
            labels = shard.file["labels"]
            for first in range(0, labels.shape[0], rows):
                if bool((labels[first : first + rows] != self.ignore_index).any()):
                    return True
        return False

    def _label_dtype(self) -> np.dtype | None:
        """The stored label type (the widest, should shards differ), None without labels."""
        if not self.has_labels:
            return None
        return np.result_type(*(shard.file["labels"].dtype for shard in self._shards))

    def read_image(
        self, index: int, validate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored raster of map image `index`: logits `(C, h, w)` float32, labels `(h, w)` int64."""
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not -len(self.images) <= index < len(self.images)
        ):
            raise BLDAError(
                f"{', '.join(map(str, self.paths))}: no image {index!r} (the store holds "
                f"{len(self.images)}: 0 to {len(self.images) - 1})"
            )
        record = self.images[index]
        if record.kind != "map":
            raise BLDAError(
                f"{self.paths[record.shard]}: image {record.name!r} holds {record.kind}, not a map; read it with iter_chunks"
            )
        chunk = next(
            self.iter_chunks(record.count, record.offset, record.offset + record.count, validate)
        )
        height, width = record.shape
        logits = chunk.logits.reshape(height, width, self.num_classes).permute(2, 0, 1)
        labels = chunk.labels
        return logits.contiguous(), None if labels is None else labels.reshape(height, width)

    def read_pixel_index(self, index: int) -> torch.Tensor | None:
        """Flat positions `y * width + x` of a sampled image's rows, or None if it has none."""
        record = self.images[index]
        shard = self._shards[record.shard]
        if "pixel_index" not in shard.file or record.kind != "samples":
            return None
        local = record.offset - self._shard_starts[record.shard]
        import torch

        positions = torch.from_numpy(shard.file["pixel_index"][local : local + record.count])
        return None if record.count and positions[0] < 0 else positions

    def validate(self, rows: int = 1 << 20, start: int = 0, stop: int | None = None) -> None:
        """Read rows `[start, stop)` (default: the whole store), raising BLDAError at the first
        non-finite logit or bad label."""
        for _ in self.iter_arrays(rows, start, stop, validate=True, reuse_buffers=True):
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
                buffers.read(shard.file["logits"], local_first, count, logits[target])
                if labels is not None:
                    buffers.read(shard.file["labels"], local_first, count, labels[target])
            except OSError as error:
                raise BLDAError(
                    f"{shard.path}: cannot read rows [{local_first}, {local_first + count}): {error} (truncated or damaged file?)"
                ) from None
            if validate:
                _validate_rows(
                    logits[target],
                    None if labels is None else labels[target],
                    self,
                    shard.path,
                    first + filled,
                )
            filled += count


def _read_one_ahead(read, firsts: range) -> Iterator[Chunk]:
    """`read(first, number)` for each chunk, the next one in a background thread while the
    caller holds this one. Closing the iterator early waits for the read in flight."""
    from concurrent.futures import ThreadPoolExecutor

    if not firsts:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="blda-read-ahead") as reader:
        pending = reader.submit(read, firsts[0], 0)
        for number in range(len(firsts)):
            chunk = pending.result()
            if number + 1 < len(firsts):
                # Into the buffers of the chunk before this one, which the caller is done with.
                pending = reader.submit(read, firsts[number + 1], number + 1)
            yield chunk


class _ReadBuffers:
    """Reusable output arrays (logits of one dtype, labels of the stored type) and, for shards
    stored in another type, a raw read buffer per type."""

    def __init__(self, rows: int, num_classes: int, dtype: str, label_dtype) -> None:
        self.rows, self.num_classes = rows, num_classes
        self.dtype, self.label_dtype = np.dtype(dtype), label_dtype
        self._raw: dict[tuple, np.ndarray] = {}
        self._outputs: tuple[np.ndarray, np.ndarray | None] | None = None

    def outputs(self, count: int, fresh: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if fresh or self._outputs is None:
            logits = np.empty((count if fresh else self.rows, self.num_classes), self.dtype)
            labels = None
            if self.label_dtype is not None:
                labels = np.empty(logits.shape[0], dtype=self.label_dtype)
            if fresh:
                return logits, labels
            self._outputs = (logits, labels)
        logits, labels = self._outputs
        return logits[:count], None if labels is None else labels[:count]

    def read(self, dataset: h5py.Dataset, first: int, count: int, out: np.ndarray) -> None:
        """Rows `[first, first + count)` of `dataset` into `out`, converted if stored otherwise."""
        if dataset.dtype == out.dtype:  # straight into the output, no conversion
            dataset.read_direct(out, np.s_[first : first + count], np.s_[0:count])
            return
        key = (dataset.dtype, out.shape[1:])
        if key not in self._raw:
            self._raw[key] = np.empty((self.rows, *out.shape[1:]), dtype=dataset.dtype)
        raw = self._raw[key]
        dataset.read_direct(raw, np.s_[first : first + count], np.s_[0:count])
        out[...] = raw[:count]


def _first_non_finite_row(logits: np.ndarray) -> int | None:
    """The first row holding a NaN or Inf, or None. A float is non-finite exactly when its
    exponent bits are all set, so one integer mask and maximum per block decide it (numpy has
    no fast float16 arithmetic; the bits work for both float16 and float32)."""
    if logits.dtype == np.float16:
        bits, magnitude, exponent = logits.view(np.uint16), 0x7FFF, 0x7C00
    else:
        bits, magnitude, exponent = logits.view(np.uint32), 0x7FFFFFFF, 0x7F800000
    for begin in range(0, bits.shape[0], CHECK_ROWS):
        block = bits[begin : begin + CHECK_ROWS] & magnitude
        if block.size and block.max() >= exponent:
            return begin + int(np.flatnonzero((block >= exponent).any(1))[0])
    return None


def _validate_rows(
    logits: np.ndarray, labels: np.ndarray | None, store: LogitStore, path: Path, first: int
) -> None:
    """NaN / Inf logits and labels that are neither a class nor the ignore index, as BLDAError."""
    where = f"{path}: rows [{first}, {first + logits.shape[0]})"
    bad_row = _first_non_finite_row(logits)
    if bad_row is not None:
        row = first + bad_row
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
