"""`LogitSetStatistics`: streaming, mergeable statistics of the logit-set matrix (Sec. 3.3.2, Eq. 3).

For every class pair ``[c, l]`` (c = the pixel's given class, ground truth or pseudo-label; l = the
class whose logit is observed) we keep a histogram of the logits on a shared fine grid, the count,
the float64 sum and sum of squares, and the exact minimum and maximum; plus the confusion matrix
(rows = given labels, columns = argmax of the logits). Objects follow the torchmetrics habit:
``update`` on chunks, ``merge`` partial results exactly (integer counts add, float64 sums add),
then read the derived quantities.

`update` runs the compiled kernel (`statistics.kernel`) in up to two threads: it releases the GIL,
and each thread counts the rows of its own given classes, so the result does not depend on the
number of threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from blda_tools.errors import BLDAError, check_number, check_same_classes
from blda_tools.runtime.arrays import as_numpy, check_float32_range, logit_rows
from blda_tools.statistics import kernel
from blda_tools.statistics.grid import LogitGrid, as_grid, check_histograms_fit
from blda_tools.statistics.io import ARRAYS, StatisticsHeader, read_statistics, write_statistics

UPDATE_THREADS = min(2, os.cpu_count() or 1)
# Fewer rows than this per thread are not worth a thread.
MIN_ROWS_PER_THREAD = 4096
# Logits are counted as stored when float16 or float32; other floating types are converted to
# float32 first.
KERNEL_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


# The fields `kernel.count_rows` adds into, in its argument order.
_KERNEL_TABLES = ("histogram", "sum", "sum_squares", "minimum", "maximum", "clipped", "confusion")


def _share_classes(class_rows: np.ndarray, threads: int) -> np.ndarray:
    """The thread that counts each class: largest classes first, each to the least loaded."""
    owners = np.zeros(len(class_rows), dtype=np.int64)
    load = [0] * threads
    for given_class in np.argsort(-class_rows, kind="stable"):
        owner = load.index(min(load))
        owners[given_class] = owner
        load[owner] += int(class_rows[given_class])
    return owners


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

    Fields (numpy arrays): ``histogram (C, C, B) int64``, ``count (C, C) int64``,
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
        check_number(num_classes, "num_classes", integer=True)
        if num_classes < 1:
            raise BLDAError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.grid = as_grid(grid)
        self.ignore_index = int(ignore_index)
        self.class_names = tuple(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise BLDAError(
                f"class_names: {len(self.class_names)} names for {self.num_classes} classes"
            )
        C, B = self.num_classes, self.grid.bins
        check_histograms_fit(C, self.grid)
        self.histogram = np.zeros((C, C, B), dtype=np.int64)
        self.count = np.zeros((C, C), dtype=np.int64)
        self.sum = np.zeros((C, C), dtype=np.float64)
        self.sum_squares = np.zeros((C, C), dtype=np.float64)
        self.minimum = np.full((C, C), math.inf, dtype=np.float64)
        self.maximum = np.full((C, C), -math.inf, dtype=np.float64)
        self.confusion = np.zeros((C, C), dtype=np.int64)
        self.clipped = np.zeros((C, C), dtype=np.int64)
        self.num_ignored = 0
        # Where the rows came from, when known ("gt" / "pseudo"; the stores' paths): saved with
        # the statistics so that `blda calibrate` can check a statistics file it is given.
        self.label_source: str | None = None
        self.stores: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ update
    def update(self, logits, labels=None) -> None:
        """Add rows: `logits` ``(n, C)`` float, `labels` ``(n,)`` integer (given classes), numpy
        arrays or torch tensors (on any device), or None for pseudo-labels (each row's first
        maximal class, every row counted). Maps ``(B, C, H, W)`` with labels ``(B, H, W)`` (a
        model's output and its label maps) are rows of their pixels.

        Pixels whose label is `ignore_index` are skipped for every statistic. Raises `BLDAError`
        for a shape mismatch, a label outside ``[0, C)`` that is not the ignore index, or a
        non-finite logit; the statistics are unchanged when it raises. float16 logits are
        counted exactly as their float32 values.
        """
        values, labels = self._check_inputs(logits, labels)
        rows = values.shape[0]
        if rows == 0:
            return
        values, table = kernel.value_reader(values)
        given = np.empty(rows, dtype=np.int32)
        pseudo = labels is None
        labels = np.empty(0, dtype=np.int64) if pseudo else labels
        threads = max(1, min(UPDATE_THREADS, rows // MIN_ROWS_PER_THREAD))
        bounds = [rows * i // threads for i in range(threads + 1)]

        def scan(part: int) -> tuple[int, int]:
            return kernel.scan_rows(
                values, table, labels, pseudo, self.ignore_index,
                bounds[part], bounds[part + 1], given,
            )  # fmt: skip

        statuses = self._in_threads(scan, threads)
        self._raise_for(statuses, labels)
        # Entry 0: ignored rows (given -1); entry c + 1: rows of class c.
        class_rows = np.bincount(given + 1, minlength=self.num_classes + 1)
        owners = _share_classes(class_rows[1:], threads)
        tables = [getattr(self, name) for name in _KERNEL_TABLES]
        scale, shift = self.grid.bin_scale_and_shift()
        exact, bins = kernel.FLOAT16_EXACT, kernel.bin_table(scale, shift, self.grid.bins)

        def count(part: int) -> None:
            kernel.count_rows(
                values, exact, bins, given, owners == part, scale, shift,
                self.grid.low, self.grid.high, *tables,
            )  # fmt: skip

        self._in_threads(count, threads)
        self.count += class_rows[1:, None]
        self.num_ignored += int(class_rows[0])

    @staticmethod
    def _in_threads(work, threads: int) -> list:
        """`work(part)` for each part, in parallel threads when more than one."""
        if threads == 1:
            return [work(0)]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(work, range(threads)))

    def _raise_for(self, statuses: list[tuple[int, int]], labels: np.ndarray) -> None:
        """The first bad row found by `kernel.scan_rows`, as a `BLDAError`."""
        bad = [(row, status) for status, row in statuses if status != kernel.ROWS_OK]
        if not bad:
            return
        row, status = min(bad)
        if status == kernel.NOT_FINITE:
            raise BLDAError(f"logits: contain NaN or infinite values (first at row {row})")
        raise BLDAError(
            f"labels: value {int(labels[row])} is outside [0, {self.num_classes}) and is not the "
            f"ignore index {self.ignore_index} (row {row})"
        )

    def _check_inputs(self, logits, labels) -> tuple[np.ndarray, np.ndarray | None]:
        """Contiguous CPU numpy logits (float16 or float32) and labels (any integer type);
        maps ``(B, C, H, W)`` (any number of spatial dimensions) as one row per pixel."""
        logits, pixels = logit_rows(as_numpy(logits), self.num_classes)
        dtype = logits.dtype if logits.dtype in KERNEL_DTYPES else np.float32
        check_float32_range(logits)
        values = np.ascontiguousarray(logits, dtype=dtype)
        if labels is None:
            return values, None
        labels = as_numpy(labels)
        expected = (logits.shape[0],) if pixels is None else pixels
        if labels.shape != expected:
            raise BLDAError(
                f"labels: expected shape {expected} to match the logits, got {tuple(labels.shape)}"
            )
        labels = labels.reshape(-1)
        if labels.dtype.kind not in "iu":
            raise BLDAError(f"labels: expected an integer array, got {labels.dtype}")
        # Two label types reach the kernels, uint8 (stores of up to 255 classes) and int64
        # (the rest): each other type would be one more compile of them, announced again.
        kind = np.uint8 if labels.dtype == np.uint8 else np.int64
        return values, np.ascontiguousarray(labels, dtype=kind)

    # ------------------------------------------------------------------ derived
    def mean(self) -> np.ndarray:
        """Mean logit per cell ``(C, C)`` float64; NaN for empty cells."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum / self.count

    def variance(self) -> np.ndarray:
        """Population variance (ddof=0) per cell ``(C, C)``; NaN for empty cells.

        Computed as E[z^2] - E[z]^2 from the float64 moments, clamped at 0.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum / self.count
            variance = self.sum_squares / self.count - mean * mean
        return np.maximum(variance, 0.0, out=variance)  # NaN (empty cells) stays NaN

    def std(self) -> np.ndarray:
        """Population standard deviation per cell ``(C, C)``; NaN for empty cells."""
        return np.sqrt(self.variance())

    def density(self) -> np.ndarray:
        """Histogram as a probability density on the grid ``(C, C, B)`` float64.

        Each non-empty cell integrates to 1 over the grid (``sum(density) * width == 1``); empty
        cells are NaN.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.histogram / (self.count[..., None] * self.grid.width)

    def positive_anchor_histogram(self) -> np.ndarray:
        """Global positive anchor: the diagonal cells ``[l, l]`` pooled, ``(B,)`` int64."""
        return np.diagonal(self.histogram, axis1=0, axis2=1).sum(1)

    def negative_anchor_histogram(self) -> np.ndarray:
        """Global negative anchor: every off-diagonal cell ``[c, l]``, c != l, pooled, ``(B,)``."""
        return self.histogram.sum((0, 1)) - self.positive_anchor_histogram()

    @property
    def num_rows(self) -> int:
        """Number of labelled (not ignored) rows seen."""
        return int(self.count[:, 0].sum())

    def outside_grid_note(self, option: str = "--grid") -> str | None:
        """A note when logits fell outside the grid (they are counted in its edge bins, which
        distorts the tails of the densities), else None."""
        clipped = int(self.clipped.sum())
        if clipped == 0:
            return None
        return (
            f"{clipped:,} logits fell outside the histogram grid [{self.grid.low:g}, "
            f"{self.grid.high:g}] and were counted in its edge bins; a wider {option} keeps them."
        )

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
            check_same_classes(self.class_names, other.class_names, "merge", ("these", "other"))
        self.class_names = self.class_names or other.class_names
        for name in ("histogram", "count", "sum", "sum_squares", "confusion", "clipped"):
            table = getattr(self, name)
            table += getattr(other, name)
        np.minimum(self.minimum, other.minimum, out=self.minimum)
        np.maximum(self.maximum, other.maximum, out=self.maximum)
        self.num_ignored += other.num_ignored
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an HDF5 file (atomically)."""
        header = StatisticsHeader(
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            num_ignored=self.num_ignored,
            grid_low=self.grid.low,
            grid_high=self.grid.high,
            grid_bins=self.grid.bins,
            class_names=self.class_names,
            label_source=self.label_source,
            stores=self.stores,
        )
        write_statistics(path, header, {name: getattr(self, name) for name in ARRAYS})

    @classmethod
    def load(cls, path: str | os.PathLike) -> LogitSetStatistics:
        """Read statistics written by `save`; `BLDAError` for anything else."""
        header, arrays = read_statistics(path)
        try:
            statistics = cls(
                header.num_classes,
                LogitGrid(header.grid_low, header.grid_high, header.grid_bins),
                ignore_index=header.ignore_index,
                class_names=header.class_names,
            )
        except BLDAError as error:  # a header the constructor refuses: name the file
            # and the header's fields, not the --grid option the user did not give
            message = str(error).replace("--grid: ", "grid_low / grid_high / grid_bins: ", 1)
            raise BLDAError(f"{path}: {message}") from None
        statistics.num_ignored = header.num_ignored
        statistics.label_source, statistics.stores = header.label_source, header.stores
        for name in ARRAYS:
            target = getattr(statistics, name)
            target[...] = arrays[name]
        return statistics
