"""Streaming, mergeable statistics of the logit-set matrix (paper Sec. 3.3.2, Eq. 3).

For every class pair ``[c, l]`` (c = the pixel's given class, ground truth or pseudo-label; l = the
class whose logit is observed) we keep a histogram of the logits on a shared fine grid, the count,
the float64 sum and sum of squares, and the exact minimum and maximum; plus the confusion matrix
(rows = given labels, columns = argmax of the logits). Objects follow the torchmetrics habit:
``update`` on chunks, ``merge`` partial results exactly (integer counts add, float64 sums add),
then read the derived quantities.

Speed (the hot path of ``blda diagnose``): a chunk is split into sub-chunks processed by two
Python threads (torch releases the GIL; its own intra-op threads are set to 1 meanwhile). Inside a
sub-chunk, cache-sized blocks of rows go through one multiply-add and one clamp into bin units, a
conversion to int32 and the addition of the cell offset ``(c * C + l) * B`` (a row offset by label
plus a column offset), so every logit becomes one flat index and one ``torch.bincount`` counts all
cells. Sums and sums of squares are one-hot matrix products in float32 over each block of 8192
rows, added in float64 across blocks (relative error ~1e-7, not growing with the row count). The
exact minimum and maximum are looked up only for cells whose first/last occupied bin reaches the
running extreme's bin, so after the first chunks they cost one scan of the chunk's counts.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from blda_tools.errors import BLDAError
from blda_tools.fileio import atomic_output

FORMAT_NAME = "blda-logit-statistics"
FORMAT_VERSION = 1
# Rows per unit of work inside `update`: large enough that the fixed cost of one bincount over all
# cells (allocating and adding C*C*B counters) is amortised, small enough to split a 1M-row chunk
# between two threads.
SUB_CHUNK_ROWS = 1 << 18
UPDATE_THREADS = min(2, os.cpu_count() or 1)
# Rows per block inside a sub-chunk: 8192 x 19 float32 (0.6 MB) stays in L2 through every pass.
CACHE_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class LogitGrid:
    """A uniform grid of `bins` bins on ``[low, high]`` shared by every cell's histogram.

    Values below `low` are counted in the first bin and values above `high` in the last; the exact
    minimum and maximum are tracked separately and the number clipped is recorded per cell.
    A value in ``[edge_k, edge_k+1)`` falls in bin k (the last bin also holds `high`), computed in
    float32 as ``floor((z - low) / width)``: a value within about 1e-4 of a bin width from an edge
    may land on either side of it.
    """

    low: float = -50.0
    high: float = 50.0
    bins: int = 4000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise BLDAError(
                f"LogitGrid: need finite low < high, got low={self.low}, high={self.high}"
            )
        if int(self.bins) != self.bins or self.bins < 1:
            raise BLDAError(f"LogitGrid: bins must be a positive integer, got {self.bins}")

    @property
    def width(self) -> float:
        """Width of one bin."""
        return (self.high - self.low) / self.bins

    @property
    def edges(self) -> torch.Tensor:
        """The ``bins + 1`` bin edges, float64."""
        return torch.linspace(self.low, self.high, self.bins + 1, dtype=torch.float64)

    @property
    def centers(self) -> torch.Tensor:
        """The ``bins`` bin centers, float64."""
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    def bin_index(self, values: torch.Tensor) -> torch.Tensor:
        """Bin of each value (int64), clipped to the edge bins; the same arithmetic as `update`."""
        scaled = self.to_bin_units(values.to(torch.float32), torch.empty(values.shape))
        return scaled.to(torch.int64)

    def to_bin_units(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``clamp((values - low) / width, 0, bins - 1)`` in float32, written into `out`.

        Its integer part is the bin. One multiply then one add, always in this order, so that
        `update` and `bin_index` agree bit for bit.
        """
        torch.mul(values, np.float32(1.0 / self.width), out=out)
        return out.add_(np.float32(-self.low / self.width)).clamp_(0, self.bins - 1)


@dataclass
class _SubChunk:
    """One sub-chunk's rows and what it contributes; added to the statistics only after every
    sub-chunk of the update succeeded, so a bad chunk leaves the statistics unchanged."""

    logits: torch.Tensor  # (n, C) float32
    labels: torch.Tensor  # (n,) int64, ignored pixels mapped to the discard row C
    index: torch.Tensor  # (n, C) int32 flat histogram index of every logit
    cell_counts: torch.Tensor  # ((C + 1) * C * B,) int64
    sums: torch.Tensor  # (C + 1, C) float64
    sum_squares: torch.Tensor
    confusion: torch.Tensor  # (C, C) int64


@contextlib.contextmanager
def _own_threads_only() -> Iterator[None]:
    """Run with torch's intra-op threads set to 1: `update` parallelises over sub-chunks itself,
    and OpenMP workers beside its threads (spinning, waiting at barriers) cost more than they
    help, especially on a busy machine."""
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(intra_op_threads)


def _first_occupied_bin(occupied: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last axis (argmax returns the first maximum)."""
    return occupied.view(torch.uint8).argmax(-1)


class LogitSetStatistics:
    """Histograms and moments of every logit-set cell ``[c, l]`` (Eq. 3), streaming and mergeable.

    Parameters
    ----------
    num_classes:
        C, the number of classes (columns of the logits).
    grid:
        The shared histogram grid.
    ignore_index:
        Label value skipped by `update`; any other label outside ``[0, C)`` is an error.
    class_names:
        Optional names, saved with the statistics and checked by `merge`.

    Fields (torch tensors): ``histogram (C, C, B) int64``, ``count (C, C) int64``,
    ``sum``/``sum_squares (C, C) float64``, ``minimum``/``maximum (C, C) float64`` (+inf/-inf for
    empty cells), ``confusion (C, C) int64``, ``clipped (C, C) int64`` (values outside the grid).
    """

    def __init__(
        self,
        num_classes: int,
        grid: LogitGrid | None = None,
        ignore_index: int = 255,
        class_names: Iterable[str] | None = None,
    ) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise BLDAError(f"num_classes must be a positive integer, got {num_classes}")
        self.num_classes = int(num_classes)
        self.grid = grid if grid is not None else LogitGrid()
        self.ignore_index = int(ignore_index)
        self.class_names = tuple(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise BLDAError(
                f"class_names: {len(self.class_names)} names for {self.num_classes} classes"
            )
        C, B = self.num_classes, self.grid.bins
        self.histogram = torch.zeros(C, C, B, dtype=torch.int64)
        self.count = torch.zeros(C, C, dtype=torch.int64)
        self.sum = torch.zeros(C, C, dtype=torch.float64)
        self.sum_squares = torch.zeros(C, C, dtype=torch.float64)
        self.minimum = torch.full((C, C), math.inf, dtype=torch.float64)
        self.maximum = torch.full((C, C), -math.inf, dtype=torch.float64)
        self.confusion = torch.zeros(C, C, dtype=torch.int64)
        self.clipped = torch.zeros(C, C, dtype=torch.int64)
        self.num_ignored = 0
        # Cell [c, l] starts at flat index (c * C + l) * B; this is the l * B part.
        self._column_offset = torch.arange(C, dtype=torch.int32) * B

    # ------------------------------------------------------------------ update
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows: `logits` ``(n, C)`` float, `labels` ``(n,)`` integer (given classes).

        Pixels whose label is `ignore_index` are skipped for every statistic. Raises `BLDAError`
        for a shape mismatch, a label outside ``[0, C)`` that is not the ignore index, or a
        non-finite logit; the statistics are unchanged when it raises.
        """
        with _own_threads_only():
            self._update(*self._check_inputs(logits, labels))

    def _update(self, logits: torch.Tensor, mapped_labels: torch.Tensor, num_ignored: int) -> None:
        if logits.shape[0] == 0:
            return
        starts = range(0, logits.shape[0], SUB_CHUNK_ROWS)
        pieces = [
            (logits[s : s + SUB_CHUNK_ROWS], mapped_labels[s : s + SUB_CHUNK_ROWS]) for s in starts
        ]
        if len(pieces) == 1:
            parts = [self._count(*pieces[0])]
        else:
            # torch releases the GIL inside its operations, so Python threads run in parallel.
            with ThreadPoolExecutor(min(UPDATE_THREADS, len(pieces))) as pool:
                parts = list(pool.map(lambda piece: self._count(*piece), pieces))
        C, B = self.num_classes, self.grid.bins
        counts = parts[0].cell_counts
        for part in parts[1:]:
            counts += part.cell_counts
        counts = counts.view(C + 1, C, B)[:C]
        minimum, maximum, clipped = self._extremes(counts, parts)
        self.histogram += counts
        self.count += counts.sum(2)
        for part in parts:
            self.sum += part.sums[:C]
            self.sum_squares += part.sum_squares[:C]
            self.confusion += part.confusion
        self.num_ignored += num_ignored
        torch.minimum(self.minimum, minimum, out=self.minimum)
        torch.maximum(self.maximum, maximum, out=self.maximum)
        self.clipped += clipped

    def _check_inputs(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """float32 logits, labels with ignored pixels mapped to the discard row C, and how many."""
        logits = torch.as_tensor(logits)
        labels = torch.as_tensor(labels)
        C = self.num_classes
        if logits.ndim != 2 or logits.shape[1] != C:
            raise BLDAError(f"logits: expected shape (n, {C}), got {tuple(logits.shape)}")
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise BLDAError(
                f"labels: expected shape ({logits.shape[0]},) to match the logits, "
                f"got {tuple(labels.shape)}"
            )
        if not logits.is_floating_point():
            raise BLDAError(f"logits: expected a floating-point tensor, got {logits.dtype}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise BLDAError(f"labels: expected an integer tensor, got {labels.dtype}")
        # Statistics live on the CPU; logits computed on a GPU are brought over here.
        logits = logits.to("cpu", torch.float32).contiguous()
        labels = labels.to("cpu", torch.int64)
        if labels.numel() == 0:
            return logits, labels, 0
        lowest, highest = torch.aminmax(labels)
        if lowest >= 0 and highest < C:
            return logits, labels, 0
        outside = (labels < 0) | (labels >= C)
        wrong = outside & (labels != self.ignore_index)
        if wrong.any():
            bad = labels[wrong][0].item()
            raise BLDAError(
                f"labels: value {bad} is outside [0, {C}) and is not the ignore index "
                f"{self.ignore_index}"
            )
        return logits, labels.masked_fill(outside, C), int(outside.sum())

    def _count(self, logits: torch.Tensor, labels: torch.Tensor) -> _SubChunk:
        """Histogram counts, sums and confusion of one sub-chunk (labels mapped, ignored -> C)."""
        C, B = self.num_classes, self.grid.bins
        sums = torch.zeros(C + 1, C, dtype=torch.float64)
        sum_squares = torch.zeros(C + 1, C, dtype=torch.float64)
        index = torch.empty(logits.shape, dtype=torch.int32)
        block_rows = min(CACHE_BLOCK_ROWS, logits.shape[0])
        work = torch.empty(block_rows, C, dtype=torch.float32)
        one_hot = torch.empty(block_rows, C + 1, dtype=torch.float32)
        row_offset = (labels * (C * B)).to(torch.int32)[:, None]
        # Blocks small enough to stay in cache through every pass over them.
        for start in range(0, logits.shape[0], CACHE_BLOCK_ROWS):
            block = slice(start, start + CACHE_BLOCK_ROWS)
            values = logits[block]
            block_work = work[: values.shape[0]]
            block_one_hot = (
                one_hot[: values.shape[0]].zero_().scatter_(1, labels[block, None], 1.0).T
            )
            # float32 products within a block, float64 across blocks.
            sums += (block_one_hot @ values).to(torch.float64)
            torch.mul(values, values, out=block_work)
            sum_squares += (block_one_hot @ block_work).to(torch.float64)
            # Eq. 3 cells: bin units (one multiply-add, one clamp), truncated to int32, plus the
            # cell's flat offset (c * C + l) * B = a row offset by label + a column offset.
            self.grid.to_bin_units(values, out=block_work)
            index[block].copy_(block_work).add_(row_offset[block]).add_(self._column_offset)
        # A NaN or Inf makes the sums non-finite; it must be caught before it is counted at a
        # garbage index.
        if not (torch.isfinite(sums).all() and torch.isfinite(sum_squares).all()):
            raise BLDAError("logits: contain NaN or infinite values")
        cell_counts = torch.bincount(index.view(-1), minlength=(C + 1) * C * B)
        # max(1) returns the first maximal index like argmax, and runs faster here.
        pairs = labels * C + logits.max(1).indices  # the discard row lands beyond C * C
        confusion = torch.bincount(pairs, minlength=(C + 1) * C)[: C * C].view(C, C)
        return _SubChunk(logits, labels, index, cell_counts, sums, sum_squares, confusion)

    def _extremes(
        self, counts: torch.Tensor, parts: list[_SubChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact per-cell min/max of this chunk where they could beat the running values, and
        the number of values outside the grid.

        A cell's minimum lies in its first non-empty bin; only when that bin is not above the
        bin of the running minimum are the values in it looked at (likewise for the maximum).
        After the first chunks this is rare, so the usual cost is one scan of the counts.
        """
        C, B = self.num_classes, self.grid.bins
        occupied = counts > 0
        present = occupied.any(2)
        low_bin = _first_occupied_bin(occupied)
        high_bin = B - 1 - _first_occupied_bin(occupied.flip(2))
        running_low = torch.where(
            torch.isinf(self.minimum), B, self.grid.bin_index(self.minimum.clamp(-3e38, 3e38))
        )
        running_high = torch.where(
            torch.isinf(self.maximum), -1, self.grid.bin_index(self.maximum.clamp(-3e38, 3e38))
        )
        cell_start = torch.arange(C * C).view(C, C) * B
        need_low = present & (low_bin <= running_low)
        need_high = present & (high_bin >= running_high)
        minimum = torch.full(((C + 1) * C,), math.inf, dtype=torch.float64)
        maximum = torch.full(((C + 1) * C,), -math.inf, dtype=torch.float64)
        if need_low.any() or need_high.any():
            # One table of candidate bins for both: a cell's min-bin values can not beat its
            # running max, nor its max-bin values its running min, so sharing is harmless.
            candidate_bins = torch.cat(
                [(cell_start + low_bin)[need_low], (cell_start + high_bin)[need_high]]
            )
            for cells, values in self._values_in_bins(candidate_bins, parts):
                minimum.scatter_reduce_(0, cells, values, "amin")
                maximum.scatter_reduce_(0, cells, values, "amax")
        clipped = torch.zeros((C + 1) * C, dtype=torch.int64)
        edge_cells = present & ((low_bin == 0) | (high_bin == B - 1))
        if edge_cells.any():
            edge_bins = torch.cat([cell_start[edge_cells], cell_start[edge_cells] + B - 1])
            for cells, values in self._values_in_bins(edge_bins, parts):
                outside = (values < self.grid.low) | (values > self.grid.high)
                clipped += torch.bincount(cells[outside], minlength=(C + 1) * C)
        shape = (C + 1, C)
        return minimum.view(shape)[:C], maximum.view(shape)[:C], clipped.view(shape)[:C]

    def _values_in_bins(self, flat_bins: torch.Tensor, parts: list[_SubChunk]):
        """Yield (cell number c * C + l, value as float64) of every logit in the given flat bins."""
        C, B = self.num_classes, self.grid.bins
        wanted = torch.zeros((C + 1) * C * B, dtype=torch.bool)
        wanted[flat_bins] = True
        for part in parts:
            flat_index = part.index.view(-1)
            positions = wanted.index_select(0, flat_index).nonzero().squeeze(1)
            values = part.logits.view(-1)[positions].to(torch.float64)
            yield flat_index[positions].to(torch.int64) // B, values

    # ------------------------------------------------------------------ derived
    def mean(self) -> torch.Tensor:
        """Mean logit per cell ``(C, C)`` float64; NaN for empty cells."""
        return self.sum / self.count.to(torch.float64)

    def variance(self) -> torch.Tensor:
        """Population variance (ddof=0) per cell ``(C, C)``; NaN for empty cells.

        Computed as E[z^2] - E[z]^2 from the float64 moments, clamped at 0.
        """
        count = self.count.to(torch.float64)
        mean = self.sum / count
        return (self.sum_squares / count - mean * mean).clamp_(min=0)

    def std(self) -> torch.Tensor:
        """Population standard deviation per cell ``(C, C)``; NaN for empty cells."""
        return self.variance().sqrt()

    def density(self) -> torch.Tensor:
        """Histogram as a probability density on the grid ``(C, C, B)`` float64.

        Each non-empty cell integrates to 1 over the grid (``sum(density) * width == 1``); empty
        cells are NaN.
        """
        count = self.count.to(torch.float64)[..., None]
        return self.histogram.to(torch.float64) / (count * self.grid.width)

    def positive_anchor_histogram(self) -> torch.Tensor:
        """Global positive anchor: the diagonal cells ``[l, l]`` pooled, ``(B,)`` int64."""
        return torch.diagonal(self.histogram, dim1=0, dim2=1).sum(1)

    def negative_anchor_histogram(self) -> torch.Tensor:
        """Global negative anchor: every off-diagonal cell ``[c, l]``, c != l, pooled, ``(B,)``."""
        return self.histogram.sum((0, 1)) - self.positive_anchor_histogram()

    @property
    def num_rows(self) -> int:
        """Number of labelled (not ignored) rows seen."""
        return int(self.count[:, 0].sum())

    # ------------------------------------------------------------------ merge
    def merge(self, other: LogitSetStatistics) -> LogitSetStatistics:
        """Add `other`'s statistics into this object exactly and return self."""
        if not isinstance(other, LogitSetStatistics):
            raise BLDAError(f"merge: expected LogitSetStatistics, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise BLDAError(
                f"merge: statistics have {other.num_classes} classes, expected {self.num_classes}"
            )
        if other.grid != self.grid:
            raise BLDAError(f"merge: grid {other.grid} differs from {self.grid}")
        if other.ignore_index != self.ignore_index:
            raise BLDAError(
                f"merge: ignore index {other.ignore_index} differs from {self.ignore_index}"
            )
        if None not in (self.class_names, other.class_names) and (
            self.class_names != other.class_names
        ):
            raise BLDAError(
                f"merge: class names {other.class_names} differ from {self.class_names}"
            )
        self.class_names = self.class_names or other.class_names
        for name in ("histogram", "count", "sum", "sum_squares", "confusion", "clipped"):
            getattr(self, name).add_(getattr(other, name))
        torch.minimum(self.minimum, other.minimum, out=self.minimum)
        torch.maximum(self.maximum, other.maximum, out=self.maximum)
        self.num_ignored += other.num_ignored
        return self

    # ------------------------------------------------------------------ persistence
    _ARRAYS = (
        "histogram",
        "count",
        "sum",
        "sum_squares",
        "minimum",
        "maximum",
        "confusion",
        "clipped",
    )

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an HDF5 file (atomically)."""
        with atomic_output(path) as temporary, h5py.File(temporary, "w") as file:
            file.attrs["format"] = FORMAT_NAME
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["num_classes"] = self.num_classes
            file.attrs["ignore_index"] = self.ignore_index
            file.attrs["num_ignored"] = self.num_ignored
            file.attrs["grid_low"] = self.grid.low
            file.attrs["grid_high"] = self.grid.high
            file.attrs["grid_bins"] = self.grid.bins
            if self.class_names is not None:
                file.attrs["class_names"] = list(self.class_names)
            for name in self._ARRAYS:
                array = getattr(self, name).numpy()
                compression = "gzip" if name == "histogram" else None
                file.create_dataset(name, data=array, compression=compression)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LogitSetStatistics:
        """Read statistics written by `save`; `BLDAError` for anything else."""
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
                for name in cls._ARRAYS:
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


# ---------------------------------------------------------------------- collection from a store
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
    # Each chunk is consumed before the next is read, so the store may reuse its buffers.
    chunks = store.iter_chunks(rows=rows_per_chunk, start=start, stop=stop, reuse_buffers=True)
    for chunk in chunks:
        labels = chunk.labels if source == "gt" else chunk.logits.max(1).indices
        statistics.update(chunk.logits, labels)
        if progress is not None:
            progress(chunk.logits.shape[0])
    return statistics


def _worker(paths, source, grid, start, stop, rows_per_chunk, threads):
    """Entry point of one worker process: open the store itself and collect one row range."""
    from blda_tools.store import LogitStore

    # The processes already share the cores; each updates with its share of the threads.
    global UPDATE_THREADS
    UPDATE_THREADS = threads

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
    grid = grid if grid is not None else LogitGrid()
    source = resolve_label_source(labels, store.has_labels, where=", ".join(map(str, store.paths)))
    if int(workers) != workers or workers < 1:
        raise BLDAError(f"workers: expected a positive integer, got {workers}")
    if rows_per_chunk < 1:
        raise BLDAError(f"rows_per_chunk: expected a positive integer, got {rows_per_chunk}")
    total = store.num_rows
    if workers == 1 or total < 2 * rows_per_chunk:
        return _statistics_of_range(store, source, grid, 0, total, rows_per_chunk, progress)
    import multiprocessing

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
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        for part, rows in pool.imap_unordered(_star_worker, tasks):
            result.merge(part)
            if progress is not None:
                progress(rows)
    return result


def _star_worker(task):
    return _worker(*task)
