"""`LogitSetStatistics`: streaming, mergeable statistics of the logit-set matrix (Sec. 3.3.2, Eq. 3).

For every class pair ``[c, l]`` (c = the pixel's given class, ground truth or pseudo-label; l = the
class whose logit is observed) we keep a histogram of the logits on a shared fine grid, the count,
the float64 sum and sum of squares, and the exact minimum and maximum; plus the confusion matrix
(rows = given labels, columns = argmax of the logits). Objects follow the torchmetrics habit:
``update`` on chunks, ``merge`` partial results exactly (integer counts add, float64 sums add),
then read the derived quantities.

`update` splits a chunk into sub-chunks counted by `kernel.count_rows` in two Python threads
(torch releases the GIL; its own intra-op threads are set to 1 meanwhile) and adds the partial
results only once every sub-chunk succeeded.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from blda_tools.errors import BLDAError
from blda_tools.statistics.grid import LogitGrid
from blda_tools.statistics.io import load_statistics, save_statistics
from blda_tools.statistics.kernel import (
    PartialStatistics,
    Workspace,
    count_rows,
    running_extreme_bins,
)

# Rows per unit of work inside `update`: large enough that the fixed costs of a sub-chunk (C
# bincounts, the candidate table) are amortised, small enough to split a 1M-row chunk between
# two threads. Each concurrent sub-chunk holds a (C, rows) int32 workspace (40 MB for C = 19).
SUB_CHUNK_ROWS = 1 << 19
UPDATE_THREADS = min(2, os.cpu_count() or 1)
# Logits are counted as stored when float16 or float32 (the kernel converts in cache); other
# floating types are converted to float32 first.
KERNEL_DTYPES = (torch.float16, torch.float32)


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
        # Kernel buffers, one per concurrent sub-chunk; not part of the statistics' state.
        self._workspaces: queue.SimpleQueue[Workspace] = queue.SimpleQueue()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_workspaces"]  # buffers, and a queue cannot be pickled
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workspaces = queue.SimpleQueue()

    # ------------------------------------------------------------------ update
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows: `logits` ``(n, C)`` float, `labels` ``(n,)`` integer (given classes).

        Pixels whose label is `ignore_index` are skipped for every statistic. Raises `BLDAError`
        for a shape mismatch, a label outside ``[0, C)`` that is not the ignore index, or a
        non-finite logit; the statistics are unchanged when it raises. float16 logits are
        counted exactly as their float32 values.
        """
        with _own_threads_only():
            self._update(*self._check_inputs(logits, labels))

    def _update(self, logits: torch.Tensor, mapped_labels: torch.Tensor, num_ignored: int) -> None:
        if logits.shape[0] == 0:
            return
        running_bins = running_extreme_bins(self.grid, self.minimum, self.maximum)
        starts = range(0, logits.shape[0], SUB_CHUNK_ROWS)
        pieces = [
            (logits[s : s + SUB_CHUNK_ROWS], mapped_labels[s : s + SUB_CHUNK_ROWS]) for s in starts
        ]

        def count(piece: tuple[torch.Tensor, torch.Tensor]) -> PartialStatistics:
            return self._count(*piece, running_bins)

        if len(pieces) == 1:
            parts = [count(pieces[0])]
        else:
            # torch releases the GIL inside its operations, so Python threads run in parallel.
            with ThreadPoolExecutor(min(UPDATE_THREADS, len(pieces))) as pool:
                parts = list(pool.map(count, pieces))
        self._add(parts, num_ignored)

    def _count(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        running_bins: tuple[torch.Tensor, torch.Tensor],
    ) -> PartialStatistics:
        """One sub-chunk through the kernel, with a workspace no other thread is using."""
        try:
            workspace = self._workspaces.get_nowait()
        except queue.Empty:
            workspace = Workspace(self.num_classes)
        try:
            return count_rows(logits, labels, self.grid, running_bins, workspace)
        finally:
            self._workspaces.put(workspace)

    def _add(self, parts: list[PartialStatistics], num_ignored: int) -> None:
        """Add the sub-chunks' tables (indexed ``[l, c]``, discard row c = C) as ``[c, l]``."""
        C = self.num_classes
        counts = parts[0].counts
        for part in parts[1:]:
            counts += part.counts
        counts = counts.permute(1, 0, 2)[:C]
        self.histogram += counts
        self.count += counts.sum(2)
        for part in parts:
            sums, sum_squares = part.moments[:C].T[:C], part.moments[C:].T[:C]
            self.sum += sums
            self.sum_squares += sum_squares
            self.confusion += part.confusion
            self.clipped += part.clipped.T[:C]
            torch.minimum(self.minimum, part.minimum.T[:C], out=self.minimum)
            torch.maximum(self.maximum, part.maximum.T[:C], out=self.maximum)
        self.num_ignored += num_ignored

    def _check_inputs(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """CPU logits (float16 or float32), labels with ignored pixels mapped to the discard row
        C, and how many were ignored."""
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
        dtype = logits.dtype if logits.dtype in KERNEL_DTYPES else torch.float32
        logits = logits.to("cpu", dtype)
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
    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an HDF5 file (atomically)."""
        save_statistics(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LogitSetStatistics:
        """Read statistics written by `save`; `BLDAError` for anything else."""
        return load_statistics(cls, path)
