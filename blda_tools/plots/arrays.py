"""The plain arrays the figures take: validation (class names, vectors, matrices) and densities
on the logit grid (unit area, coarsening for display, the visible x-range)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from blda_tools.errors import BLDAError

# Quantiles of the densities (anchors and classes) that bound the x-range of density panels.
MASS_QUANTILES = (0.001, 0.999)
# Bins drawn across the visible range of the density panels.
DISPLAY_BINS = 150


def _names(class_names: Sequence[str]) -> list[str]:
    names = [str(name) for name in class_names]
    if not names:
        raise BLDAError("class_names: expected at least one class name")
    return names


def _vector(values, length: int | None, field: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise BLDAError(f"{field}: expected a 1-D array, got shape {array.shape}")
    if length is not None and len(array) != length:
        raise BLDAError(
            f"{field}: expected {length} values (one per class / bin), got {len(array)}"
        )
    return array


def _matrix(values, shape: tuple[int, int], field: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.shape != shape:
        raise BLDAError(f"{field}: expected shape {shape}, got {array.shape}")
    return array


def _bin_widths(centers: np.ndarray) -> np.ndarray:
    if len(centers) < 2 or np.any(np.diff(centers) <= 0):
        raise BLDAError("grid_centers: expected at least two strictly increasing bin centres")
    return np.gradient(centers)


def _unit_area(centers: np.ndarray, densities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `densities` (n, B) scaled to unit area on the grid, and which rows hold mass.

    Negative or NaN values count as zero; a row without mass (no data) stays all zeros.
    """
    clean = np.nan_to_num(np.clip(densities, 0.0, None), nan=0.0, posinf=0.0)
    mass = clean @ _bin_widths(centers)
    has_mass = mass > 0
    return clean / np.where(has_mass, mass, 1.0)[:, None], has_mass


def _coarsen(centers: np.ndarray, densities: np.ndarray, low: float, high: float):
    """Merge neighbouring bins so about DISPLAY_BINS lie in [low, high], preserving mass.

    The statistics grid is fine (thousands of bins) so that Eq. 5 is accurate; drawn as is, a
    rare class's histogram is mostly sampling noise.
    """
    visible = int(((centers >= low) & (centers <= high)).sum())
    factor = max(1, visible // DISPLAY_BINS)
    usable = len(centers) // factor * factor
    if factor == 1 or usable == 0:
        return centers, densities
    widths = _bin_widths(centers)[:usable].reshape(-1, factor)
    mass = (densities[:, :usable] * _bin_widths(centers)[:usable]).reshape(
        len(densities), -1, factor
    )
    merged_centers = (centers[:usable].reshape(-1, factor) * widths).sum(1) / widths.sum(1)
    return merged_centers, mass.sum(2) / widths.sum(1)


def _mass_range(centers: np.ndarray, densities: np.ndarray) -> tuple[float, float]:
    """From the lowest 0.1% to the highest 99.9% quantile of the unit-area rows, plus a margin."""
    if len(densities) == 0:
        return float(centers[0]), float(centers[-1])
    widths = _bin_widths(centers)
    cumulative = np.cumsum(densities * widths, axis=1)
    cumulative /= cumulative[:, -1:]
    lower, upper = MASS_QUANTILES
    last = len(centers) - 1
    low = centers[np.minimum((cumulative < lower).sum(axis=1), last).min()]
    high = centers[np.minimum((cumulative < upper).sum(axis=1), last).max()]
    margin = 0.05 * (high - low) if high > low else 5 * float(widths.mean())
    return float(low - margin), float(high + margin)
