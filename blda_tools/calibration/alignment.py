"""The distributions of Eq. 6: class-wise CDFs and the anchors' inverse CDFs.

Two estimators: Gaussian mixtures fitted by EM on the logit-set histograms (`GaussianMixture1D`)
or the histograms themselves ("empirical": mass uniform inside each bin, so the CDF is the
cumulative sum at the bin edges, linearly interpolated). Anchors are the pooled diagonal /
off-diagonal cells (global) or one class's cells (Table 14).
"""

from __future__ import annotations

import torch
from torch import Tensor

from blda_tools.errors import BLDAError
from blda_tools.gmm import GaussianMixture1D, mixture_cdf, mixture_pdf
from blda_tools.statistics import LogitSetStatistics

# Newton steps on the anchors' inverse CDF at fit time: the table then carries no inversion error.
NEWTON_STEPS = 3
INVERSE_TABLE_POINTS = 1 << 16
# Probabilities inverted at once by `Anchors.inverse_cdf` (~12 float64 temporaries of this size).
INVERSE_CHUNK = 1 << 22
# Bins EM works on at most (histograms are merged by an integer factor down to this).
FIT_BINS = 512


def _empirical_cdf_at_edges(histogram: Tensor) -> Tensor:
    """CDF at the ``B + 1`` grid edges of each histogram ``(..., B)`` (float64); NaN if empty."""
    counts = histogram.to(torch.float64)
    cumulative = torch.cumsum(counts, -1) / counts.sum(-1, keepdim=True)
    return torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative], -1)


def empirical_cdf(histogram: Tensor, low: float, width: float, z: Tensor) -> Tensor:
    """CDF of histograms ``(..., B)`` on a grid (low, width) at `z` ``(..., M)``.

    Mass is uniform inside each bin, so the CDF is the cumulative sum at the edges, linearly
    interpolated in between; 0 below the grid and 1 above it.
    """
    edges_cdf = _empirical_cdf_at_edges(histogram)
    bins = histogram.shape[-1]
    position = ((z.to(torch.float64) - low) / width).clamp(0.0, float(bins))
    index = position.floor().clamp(max=bins - 1).to(torch.int64)
    shape = torch.broadcast_shapes(edges_cdf.shape[:-1], index.shape[:-1])
    edges_cdf = edges_cdf.expand(*shape, bins + 1)
    index = index.expand(*shape, index.shape[-1])
    left = edges_cdf.gather(-1, index)
    right = edges_cdf.gather(-1, index + 1)
    return left + (position.expand_as(left) - index) * (right - left)


def empirical_inverse_cdf(histogram: Tensor, low: float, width: float, p: Tensor) -> Tensor:
    """Inverse of `empirical_cdf` for probabilities ``0 < p < 1`` (one histogram ``(B,)``)."""
    edges_cdf = _empirical_cdf_at_edges(histogram)
    flat = p.to(torch.float64).reshape(-1)
    right = torch.searchsorted(edges_cdf, flat).clamp(1, edges_cdf.numel() - 1)
    f_left, f_right = edges_cdf[right - 1], edges_cdf[right]
    fraction = (flat - f_left) / (f_right - f_left)  # f_left < p <= f_right: no zero rise
    return (low + width * (right - 1 + fraction)).reshape(p.shape)


class Anchors:
    """Positive and negative anchor distributions (histograms, and GMMs for estimator "gmm")."""

    def __init__(self, positive: Tensor, negative: Tensor, estimator: str, components: int, grid):
        self.positive_histogram, self.negative_histogram = positive, negative
        self.grid = grid
        self.estimator = estimator
        self.mixtures: dict[str, GaussianMixture1D] = {}
        for name, histogram in (("positive", positive), ("negative", negative)):
            total = int(histogram.sum())
            if total == 0:  # fewer components cannot help
                raise BLDAError(
                    f"anchor: the {name} anchor has no logits: the anchor data (--anchor-from, "
                    "else the fitting data) hold no labelled pixel of the class(es) --anchor "
                    "takes; give data with them, or another --anchor"
                )
            if total < components:
                raise BLDAError(
                    f"anchor: the {name} anchor has {total} logits, fewer than "
                    f"n_components={components}; give more data (--anchor-from) or fewer components"
                )
            if estimator == "gmm":
                mixture = GaussianMixture1D(components, dtype=torch.float64)
                centers, counts, width = fitting_bins(grid, histogram)
                self.mixtures[name] = mixture.fit_histogram(centers, counts, bin_width=width)

    def inverse_cdf(self, name: str, p: Tensor) -> Tensor:
        """The anchor's inverse CDF at `p` (any shape), elementwise, float64.

        Taken INVERSE_CHUNK values at a time: the inversion holds ~12 temporaries the size of
        its input, and the fit's input is (C, C, table points) (133M values for 255 classes)."""
        flat = p.reshape(-1)
        result = torch.empty(flat.shape, dtype=torch.float64)
        for start in range(0, flat.numel(), INVERSE_CHUNK):
            result[start : start + INVERSE_CHUNK] = self._inverse_cdf(
                name, flat[start : start + INVERSE_CHUNK]
            )
        return result.reshape(p.shape)

    def _inverse_cdf(self, name: str, p: Tensor) -> Tensor:
        if self.estimator == "gmm":
            return mixture_inverse_cdf(self.mixtures[name], p)
        histogram = self.positive_histogram if name == "positive" else self.negative_histogram
        return empirical_inverse_cdf(histogram, self.grid.low, self.grid.width, p)


def fitting_bins(grid, histogram: Tensor) -> tuple[Tensor, Tensor, float]:
    """(centers, counts, bin width) for EM: the bins between the first and last occupied one of any cell,
    merged by an integer factor into at most FIT_BINS bins.

    EM's cost grows with the number of bins; the statistics grid (4000 bins of 0.025 by default)
    is far finer than a 5-component mixture needs, and `fit_histogram`'s Sheppard correction
    accounts for the wider bins.
    """
    occupied = (histogram.reshape(-1, histogram.shape[-1]) > 0).any(0).nonzero().squeeze(1)
    if occupied.numel() == 0:
        return torch.from_numpy(grid.centers), histogram, grid.width
    first, last = int(occupied[0]), int(occupied[-1]) + 1
    factor = -(-(last - first) // FIT_BINS)
    merged = -(-(last - first) // factor)
    counts = histogram[..., first:last]
    # Zero-padded at the top to a whole number of merged bins (centres continue the grid).
    counts = torch.nn.functional.pad(counts, (0, merged * factor - (last - first)))
    counts = counts.reshape(*counts.shape[:-1], merged, factor).sum(-1)
    steps = torch.arange(merged, dtype=torch.float64) + 0.5
    return grid.low + grid.width * (first + factor * steps), counts, grid.width * factor


def mixture_inverse_cdf(mixture: GaussianMixture1D, p: Tensor) -> Tensor:
    """Inverse CDF of one mixture (batch shape ()) at any number of probabilities.

    The CDF is tabulated once on INVERSE_TABLE_POINTS points over mu_k -/+ 10 sigma_k, inverted
    by linear interpolation and polished by safeguarded Newton steps: exact to ~1e-9 in the bulk.
    """
    std = mixture.variances.sqrt()
    lower = float((mixture.means - 10 * std).min())
    upper = float((mixture.means + 10 * std).max())
    points = torch.linspace(lower, upper, INVERSE_TABLE_POINTS, dtype=torch.float64)
    parameters = (mixture.weights, mixture.means, mixture.variances)
    table = mixture_cdf(points, *parameters).cummax(0).values
    flat = p.to(torch.float64).reshape(-1)
    right = torch.searchsorted(table, flat).clamp(1, INVERSE_TABLE_POINTS - 1)
    f_left, f_right = table[right - 1], table[right]
    fraction = ((flat - f_left) / (f_right - f_left).clamp_min(1e-300)).clamp(0.0, 1.0)
    x_left, x_right = points[right - 1], points[right]
    x = torch.lerp(x_left, x_right, fraction)
    for _ in range(NEWTON_STEPS):
        slope = mixture_pdf(x, *parameters)
        step = torch.where(slope > 0, (mixture_cdf(x, *parameters) - flat) / slope, 0.0)
        x = torch.minimum(torch.maximum(x - step, x_left), x_right)
    return x.reshape(p.shape)


def anchor_class(anchor: str, class_names) -> str | None:
    """The class of an `--anchor` spec ("class:NAME"; None for "global"), checked against
    `class_names` (`blda calibrate` checks it before any pass)."""
    if anchor == "global":
        return None
    if not anchor.startswith("class:"):
        raise BLDAError(f"--anchor: expected 'global' or 'class:NAME', got {anchor!r}")
    name, names = anchor[len("class:") :], list(class_names or [])
    if name not in names:
        raise BLDAError(
            f"--anchor: unknown class {name!r}; the classes are: {', '.join(names) or '(unnamed)'}"
        )
    return name


def anchor_histograms(statistics: LogitSetStatistics, anchor: str) -> tuple[Tensor, Tensor]:
    """(positive, negative) anchor histograms ``(B,)``: "global" pools the diagonal / off-diagonal
    cells (Sec. 3.3.3); "class:NAME" takes that class's positive cell and its negative cells
    [c, NAME], c != NAME, pooled (Table 14)."""
    if anchor == "global":
        positive = statistics.positive_anchor_histogram()
        negative = statistics.negative_anchor_histogram()
    else:
        names = list(statistics.class_names or [])
        index = names.index(anchor_class(anchor, names))
        column = statistics.histogram[:, index]
        positive, negative = column[index].copy(), column.sum(0) - column[index]
    return torch.from_numpy(positive), torch.from_numpy(negative)


def mixture_parameters(mixture: GaussianMixture1D) -> dict[str, Tensor]:
    return {
        "weights": mixture.weights.to(torch.float32),
        "means": mixture.means.to(torch.float32),
        "variances": mixture.variances.to(torch.float32),
        "fitted": mixture.fitted_.clone(),
    }
