"""The histogram grid shared by every cell of the logit-set statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from blda_tools.errors import BLDAError, check_number
from blda_tools.runtime.memory import check_fits_in_memory

_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
        check_number(self.low, "--grid: LOW")
        check_number(self.high, "--grid: HIGH")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise BLDAError(
                f"--grid: expected finite LOW < HIGH, got low={self.low}, high={self.high}"
            )
        # Logits are float32: a wider grid has infinite widths and centres in the statistics
        # and the plots (-1e308:1e308 gave all-zero estimates and a matplotlib traceback).
        if not self.high - self.low <= _FLOAT32_MAX:
            raise BLDAError(
                f"--grid: expected HIGH - LOW of at most {_FLOAT32_MAX:.4g} (the float32 range "
                f"of logits), got low={self.low}, high={self.high}"
            )
        check_number(self.bins, "--grid: BINS", integer=True)
        if self.bins < 1:
            raise BLDAError(f"--grid: BINS must be a positive integer, got {self.bins!r}")

    @property
    def width(self) -> float:
        """Width of one bin."""
        return (self.high - self.low) / self.bins

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges, float64."""
        return np.linspace(self.low, self.high, self.bins + 1, dtype=np.float64)

    @property
    def centers(self) -> np.ndarray:
        """The ``bins`` bin centers, float64."""
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    def bin_index(self, values) -> np.ndarray:
        """Bin of each value (int64), clipped to the edge bins; the same float32 arithmetic as
        `LogitSetStatistics.update`: ``clamp(z * scale + shift, 0, bins - 1)``, one multiply then
        one add, always in this order, so that both agree bit for bit."""
        scale, shift = self.bin_scale_and_shift()
        units = np.asarray(values, dtype=np.float32) * scale
        units += shift
        return np.clip(units, np.float32(0), np.float32(self.bins - 1)).astype(np.int64)

    def bin_scale_and_shift(self) -> tuple[np.float32, np.float32]:
        """The float32 ``1 / width`` and ``-low / width`` of the bin arithmetic (the statistics
        kernel uses the same two numbers)."""
        return np.float32(1.0 / self.width), np.float32(-self.low / self.width)


def as_grid(value) -> LogitGrid:
    """`value` as a LogitGrid: a LogitGrid, a (low, high, bins) sequence, or None (the
    default grid)."""
    if value is None:
        return LogitGrid()
    if isinstance(value, LogitGrid):
        return value
    try:
        low, high, bins = value
        return LogitGrid(float(low), float(high), int(bins))
    except (TypeError, ValueError):
        raise BLDAError(
            f"--grid: expected a LogitGrid or (low, high, bins), got {value!r}"
        ) from None


def check_histograms_fit(num_classes: int, grid: LogitGrid, copies: int = 1) -> None:
    """Refuse a grid whose `copies` sets of ``(C, C, BINS)`` int64 histograms cannot fit in
    memory (`runtime.memory`): numpy would get the memory lazily and the OOM killer end the
    run part-way, without a word."""
    held = "the" if copies == 1 else f"{copies} sets of"
    check_fits_in_memory(
        copies * num_classes * num_classes * grid.bins * 8,
        f"--grid: {grid.bins:,} BINS for {num_classes} classes: {held} (C, C, BINS) int64 "
        "histograms",
        f"give fewer BINS (the default is {LogitGrid.bins:,})",
    )
