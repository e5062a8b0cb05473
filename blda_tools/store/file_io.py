"""How `LogitWriter` writes to its HDF5 file: rows (whole chunks directly), the kernel's
writeback after a commit, metadata kept in memory between flushes, and whether an unfinished
file can be resumed by this writer."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from blda_tools.errors import BLDAError, check_same_classes
from blda_tools.store.schema import FORMAT_NAME, FORMAT_VERSION


def write_rows(dataset: h5py.Dataset, start: int, values: np.ndarray, direct: bool) -> None:
    """`dataset[start:start + len(values)] = values`; with `direct` (an uncompressed store),
    the whole chunks inside that range written as they are (`write_direct_chunk`) when the
    values are C-contiguous in the file's own type: HDF5's write path copies the rows through
    its type-conversion buffer first (with the lighter writeback of `start_writeback`, the
    append of a 256 x 512 image went from 3.7 to 2.3 ms, `benchmarks/bench_dump.py`). The
    dataset's contents are the same."""
    stop = start + len(values)
    chunk = dataset.chunks[0]
    direct = direct and values.flags.c_contiguous and values.dtype.str == dataset.dtype.str
    first = min(-(-start // chunk) * chunk, stop) if direct else stop  # first boundary
    last = max(stop // chunk * chunk, first)
    if first > start:
        dataset[start:first] = values[: first - start]
    trailing_offsets = (0,) * (values.ndim - 1)
    for row in range(first, last, chunk):
        begin = row - start
        dataset.id.write_direct_chunk((row, *trailing_offsets), values[begin : begin + chunk])
    if stop > last:
        dataset[last:stop] = values[last - start :]


def start_writeback(file: h5py.File, start: int = 0) -> int:
    """Have the kernel start writing the flushed store from byte `start` on to disk now, in
    the background, and drop it from the page cache once written (Linux;
    `POSIX_FADV_DONTNEED`); returns the file's size (0 where this is not done).

    Otherwise the data stays dirty in memory until the kernel's thresholds (~10% of RAM):
    writes into the growing page cache cost more (the dump's appending thread: 12-14 ms of CPU
    per 256 x 512 image instead of 5.5) and `close` (fsync) waits for all of it at once (0.4 s
    at the end of a 21 s, 1 GB dump; `benchmarks/bench_dump.py`). A store is written once, so
    its pages are not worth caching. The caller passes the size two calls ago (the writer
    calls it after every add and commit): rows are appended at the end, so going over the
    whole file at every commit (5.5 ms per commit, 0.45 ms per image of the dump) mostly
    revisited pages already dropped (~0.3 ms per image).
    """
    if not (hasattr(os, "posix_fadvise") and file.driver == "sec2"):
        return 0
    handle = file.id.get_vfd_handle()
    os.posix_fadvise(handle, start, 0, os.POSIX_FADV_DONTNEED)
    return os.fstat(handle).st_size


def keep_metadata_in_memory_until_flush(file: h5py.File) -> None:
    """Stop HDF5 writing metadata between flushes, so a killed writer leaves the last flush.

    Between flushes only row data reaches the file, past what the committed counts cover.
    """
    config = file.id.get_mdc_config()
    # Evictions can only be disabled with automatic cache resizing off (HDF5 rule).
    config.evictions_enabled = False
    config.incr_mode = config.flash_incr_mode = config.decr_mode = 0
    file.id.set_mdc_config(config)


def check_resumable(
    file: h5py.File, where: str, class_names: list[str], dtype: str, ignore_index: int
) -> None:
    """Refuse an unfinished store that this writer's options cannot continue."""
    if (
        file.attrs.get("format") != FORMAT_NAME
        or file.attrs.get("format_version") != FORMAT_VERSION
    ):
        raise BLDAError(
            f"{where}: not a blda logit store of format version {FORMAT_VERSION}; delete it"
        )
    stored_names = json.loads(file.attrs["class_names"])
    check_same_classes(stored_names, class_names, where, ("the store", "this run"))
    if file["logits"].dtype != np.dtype(dtype):
        raise BLDAError(
            f"{where}: the unfinished store holds {file['logits'].dtype} logits, not dtype={dtype!r}"
        )
    if int(file.attrs["ignore_index"]) != ignore_index:
        raise BLDAError(
            f"{where}: the unfinished store has ignore_index {file.attrs['ignore_index']}, not {ignore_index}"
        )
