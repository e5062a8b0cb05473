"""`LogitStore`: one file or a list of shards read as one store, chunk by chunk, with memory that
does not grow with the data."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from blda_tools.errors import BLDAError
from blda_tools.store.schema import Chunk, _checked_int
from blda_tools.store.shards import (
    _check_shards_agree,
    _image_records,
    _open_shard,
    _Shard,
)


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
        dtype: torch.dtype | None = torch.float32,
    ) -> Iterator[Chunk]:
        """Yield rows `[start, stop)` in chunks of `rows` (the last may be shorter).

        Chunks span shard boundaries. With `validate`, each chunk is checked for non-finite
        logits and labels outside `[0, C)` other than the ignore index. With `reuse_buffers`,
        every chunk is written into the same two tensors (no fresh memory to fault in; the
        float16 -> float32 step alone measured 2.5x faster): only for consumers done with a
        chunk before they take the next. `dtype` is that of `Chunk.logits`: float32 (default)
        or float16, or None for the stored dtype (float32 if any shard stores float32), which
        skips the conversion for consumers that convert in cache themselves.
        """
        stop = self.num_rows if stop is None else stop
        _checked_int(rows, "rows", "iter_chunks", minimum=1)
        if not (0 <= start <= stop <= self.num_rows):
            raise BLDAError(
                f"iter_chunks: row range [{start}, {stop}) is not inside [0, {self.num_rows})"
            )
        dtype = self.stored_dtype if dtype is None else dtype
        if dtype not in (torch.float16, torch.float32):
            raise BLDAError(f"iter_chunks: dtype must be float16, float32 or None, got {dtype}")
        buffers = _ReadBuffers(min(rows, stop - start), self.num_classes, self.has_labels, dtype)
        for first in range(start, stop, rows):
            last = min(stop, first + rows)
            logits, labels = buffers.outputs(last - first, fresh=not reuse_buffers)
            self._read_range(first, last, logits, labels, buffers, validate)
            yield Chunk(logits, labels, first)

    @property
    def stored_dtype(self) -> torch.dtype:
        """float16 when every shard stores float16 logits, else float32."""
        stored = {shard.file["logits"].dtype for shard in self._shards}
        return torch.float16 if stored == {np.dtype(np.float16)} else torch.float32

    def read_image(
        self, index: int, validate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored raster of map image `index`: logits `(C, h, w)` float32, labels `(h, w)` int64."""
        record = self.images[index]
        if record.kind != "map":
            raise BLDAError(
                f"{self.paths[record.shard]}: image {record.name!r} holds {record.kind}, not a map; read it with iter_chunks"
            )
        buffers = _ReadBuffers(record.count, self.num_classes, self.has_labels, torch.float32)
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

    def validate(self, rows: int = 1 << 20, start: int = 0, stop: int | None = None) -> None:
        """Read rows `[start, stop)` (default: the whole store), raising BLDAError at the first
        non-finite logit or bad label."""
        for _ in self.iter_chunks(rows, start, stop, validate=True, reuse_buffers=True):
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
    """Reusable raw-read buffers and (optionally reused) logits (`dtype`) / int64 label tensors."""

    def __init__(self, rows: int, num_classes: int, has_labels: bool, dtype: torch.dtype) -> None:
        self.rows, self.num_classes, self.has_labels = rows, num_classes, has_labels
        self.dtype = dtype
        self._raw: dict[np.dtype, np.ndarray] = {}
        self._outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def outputs(self, count: int, fresh: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if fresh or self._outputs is None:
            logits = torch.empty(
                (count if fresh else self.rows, self.num_classes), dtype=self.dtype
            )
            labels = torch.empty(logits.shape[0], dtype=torch.int64) if self.has_labels else None
            if fresh:
                return logits, labels
            self._outputs = (logits, labels)
        logits, labels = self._outputs
        return logits[:count], None if labels is None else labels[:count]

    def read_logits(self, dataset: h5py.Dataset, first: int, count: int, out: torch.Tensor) -> None:
        if dataset.dtype == out.numpy().dtype:  # straight into the output, no conversion
            dataset.read_direct(out.numpy(), np.s_[first : first + count], np.s_[0:count])
            return
        raw = self._raw_buffer(dataset.dtype, (self.num_classes,))
        dataset.read_direct(raw, np.s_[first : first + count], np.s_[0:count])
        out.copy_(torch.from_numpy(raw[:count]))  # float16 <-> float32 in torch (fast, threaded)

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
    """Cheap checks: one min/max pass finds any NaN/Inf (exact search only when there is one);
    labels are checked as stored, one byte each."""
    where = f"{path}: rows [{first}, {first + logits.shape[0]})"
    # The minimum and maximum are NaN if any value is, and infinite if any value is.
    if logits.numel() and not torch.isfinite(torch.stack(torch.aminmax(logits))).all():
        row = first + int(torch.nonzero(~torch.isfinite(logits).all(dim=1))[0])
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
