"""Streaming a logit store into `LogitSetStatistics`, in this process or in worker processes."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable

from blda_tools.errors import BLDAError
from blda_tools.runtime.process import worker_processes
from blda_tools.statistics import logit_sets
from blda_tools.statistics.grid import LogitGrid, as_grid, check_histograms_fit
from blda_tools.statistics.logit_sets import LogitSetStatistics

LABEL_SOURCES = ("auto", "gt", "pseudo")


def resolve_label_source(labels: str, has_labels: bool, where: str = "store") -> str:
    """Map "auto" to "gt" or "pseudo"; `BLDAError` for "gt" on unlabelled data or bad names."""
    if labels not in LABEL_SOURCES:
        raise BLDAError(f"labels: expected one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
    if labels == "auto":
        return "gt" if has_labels else "pseudo"
    if labels == "gt" and not has_labels:
        raise BLDAError(f"{where}: labels='gt' asked for, but the store has no ground-truth labels")
    return labels


def _statistics_of_range(
    store,
    source: str,
    grid: LogitGrid,
    start: int,
    stop: int,
    rows_per_chunk: int,
    progress: Callable[[int], None] | None,
) -> LogitSetStatistics:
    statistics = LogitSetStatistics(
        store.num_classes, grid, ignore_index=store.ignore_index, class_names=store.class_names
    )
    # Each chunk is consumed before the next is taken, so the store may reuse its buffers; logits
    # stay in the stored dtype (float16 mostly; the kernel converts them in cache) and labels in
    # theirs (uint8 mostly). The store does not validate them: `update` rejects the same bad
    # values, and only then is the chunk validated, for an error that names the file, row and
    # image.
    chunks = store.iter_arrays(
        rows=rows_per_chunk,
        start=start,
        stop=stop,
        validate=False,
        reuse_buffers=True,
        read_ahead=True,  # the read hides behind the kernel, which releases the GIL
    )
    for chunk in chunks:
        try:
            statistics.update(chunk.logits, chunk.labels if source == "gt" else None)
        except BLDAError:
            store.validate(rows_per_chunk, start=chunk.first_row, stop=chunk.stop_row)
            raise
        if progress is not None:
            progress(chunk.logits.shape[0])
    return statistics


def _worker(paths, source, grid, start, stop, rows_per_chunk, threads):
    """Entry point of one worker process: open the store itself and collect one row range."""
    from blda_tools.store import LogitStore

    # The processes already share the cores; each updates with its share of the threads.
    logit_sets.UPDATE_THREADS = threads

    with LogitStore(paths) as store:
        statistics = _statistics_of_range(store, source, grid, start, stop, rows_per_chunk, None)
    return statistics, stop - start


def collect_statistics(
    store,
    labels: str = "auto",
    grid: LogitGrid | None = None,
    workers: int = 1,
    rows_per_chunk: int = 1 << 20,
    progress: Callable[[int], None] | None = None,
) -> LogitSetStatistics:
    """Stream a `LogitStore` into `LogitSetStatistics`.

    `labels`: "gt" (ground truth; `BLDAError` if the store has none), "pseudo" (argmax of the
    logits, every pixel) or "auto" (gt when present, else pseudo). With ``workers > 1`` the global
    row range is split into contiguous ranges processed by separate processes, each opening the
    store itself, and the results are merged exactly (a store of fewer than two chunks is read in
    this process). `progress(rows)` is called as rows are done (per chunk with one worker; per
    finished range with several).
    """
    grid = as_grid(grid)
    source = resolve_label_source(labels, store.has_labels, where=", ".join(map(str, store.paths)))
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise BLDAError(f"workers: expected a positive integer, got {workers!r}")
    if rows_per_chunk < 1:
        raise BLDAError(f"rows_per_chunk: expected a positive integer, got {rows_per_chunk}")
    # At least each worker's statistics and the merged result hold a histogram set each.
    parallel = _in_workers(store, workers, rows_per_chunk)
    check_histograms_fit(store.num_classes, as_grid(grid), copies=workers + 1 if parallel else 1)
    statistics = _collect(store, source, grid, workers, rows_per_chunk, progress)
    statistics.label_source = source
    # absolute: calibrate, run from another folder, compares them with its stores
    statistics.stores = tuple(os.path.abspath(path) for path in store.paths)
    return statistics


def _in_workers(store, workers: int, rows_per_chunk: int) -> bool:
    """Whether the pass runs in worker processes (a small store is read in this one)."""
    return workers > 1 and store.num_rows >= 2 * rows_per_chunk


def _collect(store, source, grid, workers, rows_per_chunk, progress) -> LogitSetStatistics:
    total = store.num_rows
    if not _in_workers(store, workers, rows_per_chunk):
        return _statistics_of_range(store, source, grid, 0, total, rows_per_chunk, progress)
    from concurrent.futures import as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    # More ranges than workers so the progress callback moves; ranges stay contiguous.
    pieces = min(workers * 4, max(workers, total // rows_per_chunk))
    bounds = [round(i * total / pieces) for i in range(pieces + 1)]
    tasks = [
        (list(store.paths), source, grid, bounds[i], bounds[i + 1], rows_per_chunk, threads)
        for i in range(pieces)
        if bounds[i + 1] > bounds[i]
    ]
    result = LogitSetStatistics(
        store.num_classes, grid, ignore_index=store.ignore_index, class_names=store.class_names
    )
    # Compile (or load) the kernels here on a few rows first: the workers then load them from
    # the on-disk cache instead of each compiling them, and the compile notice is shown once.
    _statistics_of_range(store, source, grid, 0, min(total, 256), 256, None)
    with worker_processes(workers, "statistics") as pool:
        for done in as_completed([pool.submit(_worker, *task) for task in tasks]):
            part, rows = done.result()
            result.merge(part)
            if progress is not None:
                progress(rows)
    return result
