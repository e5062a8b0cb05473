"""Segmentation metrics and class-bias measures (paper Eq. 4, Eq. 5, Tables 15 and 18).

Conventions, used everywhere in blda:
- Metrics are fractions in [0, 1].
- A class with no pixels and no predictions has NaN IoU and accuracy and is left out of every
  mean and standard deviation (`SegmentationMetrics.excluded` lists it). A class with predictions
  but no pixels has IoU 0 (as in the Cityscapes evaluator) and NaN accuracy (recall is undefined).
- Standard deviations are population standard deviations (ddof=0); this reproduces the "std"
  columns of the paper's tables (e.g. DAFormer's per-class IoU in Table 14 gives 16.8).
- Jensen-Shannon divergence uses the natural logarithm, so it lies in [0, ln 2].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blda_tools.errors import BLDAError
from blda_tools.runtime.arrays import as_numpy


def _as_float64(values, name: str) -> np.ndarray:
    try:
        return as_numpy(values).astype(np.float64)
    except (TypeError, ValueError):
        raise BLDAError(f"{name}: expected numbers, got {type(values).__name__}") from None


def _checked_histogram(histogram) -> np.ndarray:
    """A ``(C, C, B)`` histogram of finite non-negative counts, as numpy. Integer counts keep
    their dtype: a fine grid's float64 copy would double the memory, so callers convert the
    parts they work on."""
    counts = as_numpy(histogram)
    if counts.dtype.kind not in "iu":
        counts = _as_float64(counts, "histogram")
    if counts.ndim != 3 or counts.shape[0] != counts.shape[1]:
        raise BLDAError(f"histogram: expected shape (C, C, B), got {tuple(counts.shape)}")
    if not ((counts.dtype.kind in "iu" or np.isfinite(counts).all()) and (counts >= 0).all()):
        raise BLDAError("histogram: counts must be finite and non-negative")
    return counts


def _square_confusion(confusion, name: str = "confusion") -> np.ndarray:
    matrix = _as_float64(confusion, name)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise BLDAError(
            f"{name}: expected a non-empty square (C, C) matrix, got {tuple(matrix.shape)}"
        )
    if (matrix < 0).any() or not np.isfinite(matrix).all():
        raise BLDAError(f"{name}: counts must be finite and non-negative")
    return matrix


def _nan_mean_std(values: np.ndarray) -> tuple[float, float]:
    kept = values[~np.isnan(values)]
    if kept.size == 0:
        return math.nan, math.nan
    return float(kept.mean()), float(kept.std())  # population std (ddof=0)


@dataclass(frozen=True)
class SegmentationMetrics:
    """Per-class IoU and accuracy (recall) with their means and population stds."""

    iou: tuple[float, ...]
    acc: tuple[float, ...]
    miou: float
    macc: float
    iou_std: float
    acc_std: float
    class_pixels: tuple[int, ...]
    excluded: tuple[int, ...]  # classes with no pixels and no predictions

    @classmethod
    def from_confusion(cls, confusion, classes: Sequence[int] = ()) -> SegmentationMetrics:
        """Metrics of a confusion matrix (rows = true class, columns = predicted class); the
        means and stds over `classes` only when given (`evaluation_classes`, e.g. SYNTHIA's
        16), each class's IoU still from the whole matrix."""
        matrix = _square_confusion(confusion)
        true_positive = np.diagonal(matrix)
        pixels = matrix.sum(1)
        predicted = matrix.sum(0)
        union = pixels + predicted - true_positive
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, true_positive / union, math.nan)
            acc = np.where(pixels > 0, true_positive / pixels, math.nan)
        averaged = list(classes) if len(classes) else slice(None)
        miou, iou_std = _nan_mean_std(iou[averaged])
        macc, acc_std = _nan_mean_std(acc[averaged])
        excluded = tuple(int(c) for c in np.flatnonzero(union == 0))
        return cls(
            iou=tuple(iou.tolist()),
            acc=tuple(acc.tolist()),
            miou=miou,
            macc=macc,
            iou_std=iou_std,
            acc_std=acc_std,
            class_pixels=tuple(int(p) for p in pixels.tolist()),
            excluded=excluded,
        )


def bias_from_confusion(confusion) -> np.ndarray:
    """Bias(l) of Eq. 4 from a confusion matrix (rows = true class c, columns = prediction l).

    ``Bias(l) = mean_c P(argmax = l | y = c) - 1/C``. Rows with no pixels carry no estimate of
    P(. | c), so the mean runs over the K present rows only, while the uniform reference stays
    1/C over all C classes; the biases therefore still sum to 0. Returns ``(C,)`` float64.
    """
    matrix = _square_confusion(confusion)
    row_totals = matrix.sum(1)
    present = row_totals > 0
    if not present.any():
        raise BLDAError("confusion: every row is empty, Bias (Eq. 4) is undefined")
    conditional = matrix[present] / row_totals[present, None]  # P(l | c), Eq. 4
    return conditional.mean(0) - 1.0 / matrix.shape[0]


# Gauss-Legendre nodes on [0, 1]: inside one bin each CDF is linear (mass uniform within the bin),
# so the Eq. 5 integrand is a polynomial of degree C - 1 there; ceil(C / 2) nodes integrate it
# exactly.
def _unit_gauss_legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(points)
    return (nodes + 1) / 2, weights / 2


def prediction_probabilities_from_histograms(histogram) -> np.ndarray:
    """P(argmax = l | y = c) of Eq. 5 for every (c, l), from per-cell logit histograms.

    `histogram` is ``(C, C, B)`` counts (or masses) on one uniform grid; mass is taken as uniform
    within each bin, and the integral ``int P_cl(z) prod_{y' != l} F_cy'(z) dz`` is computed
    exactly for that piecewise-uniform model by Gauss-Legendre quadrature inside each bin. The
    product over y' != l comes from exclusive cumulative products over y', so no loop over class
    pairs.
    Rows c whose cells are empty give NaN. Logits clipped into the grid's edge bins are treated as
    lying in those bins, so keep the grid wide enough (the statistics record how many were
    clipped). Returns ``(C, C)`` float64.
    """
    counts = _checked_histogram(histogram)
    num_classes = counts.shape[0]
    # Bins empty in every cell add nothing to the integral and leave every CDF unchanged past
    # them, so the quadrature only needs the occupied range of the (usually wide) grid.
    occupied = np.flatnonzero(counts.sum((0, 1)) > 0)
    if occupied.size:
        counts = counts[..., int(occupied[0]) : int(occupied[-1]) + 1]
    # Rows c are independent (the product runs over y' within a row): a block of rows at a time
    # keeps the ~8 temporaries of a fine grid within TEMPORARY_BYTES instead of 8 copies of the
    # whole histogram.
    per_row = 8 * num_classes * max(counts.shape[2], 1)
    rows = max(1, min(num_classes, TEMPORARY_BYTES // per_row))
    probability = np.empty((num_classes, num_classes), dtype=np.float64)
    for first in range(0, num_classes, rows):
        block = counts[first : first + rows].astype(np.float64)
        probability[first : first + rows] = _prediction_probabilities(block)
    return probability


# Bytes of one temporary of the Eq. 5 quadrature (it holds ~8): 64 MB.
TEMPORARY_BYTES = 1 << 26


def _prediction_probabilities(counts: np.ndarray) -> np.ndarray:
    """Eq. 5 for rows ``(R, C, B)`` of the histogram (see the function above)."""
    num_classes = counts.shape[1]
    totals = counts.sum(2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mass = counts / totals  # per-bin probability of each cell; NaN for empty cells
    cdf_below = np.cumsum(mass, 2) - mass  # F at each bin's left edge
    nodes, weights = _unit_gauss_legendre(max(1, math.ceil(num_classes / 2)))
    probability = np.zeros(counts.shape[:2], dtype=np.float64)
    ones = np.ones_like(mass[:, :1])
    for node, weight in zip(nodes.tolist(), weights.tolist(), strict=True):
        cdf = cdf_below + node * mass  # F_cy'(z) at this node of every bin
        # prod over y' != l as (prod over y' < l) * (prod over y' > l): exclusive cumulative
        # products, exact with zeros, no log / exp.
        below = np.cumprod(np.concatenate([ones, cdf[:, :-1]], 1), 1)
        above = np.cumprod(np.concatenate([ones, cdf[:, ::-1][:, :-1]], 1), 1)[:, ::-1]
        # The density is mass / width and dz = width * d(node): widths cancel.
        integrand = np.where(mass > 0, mass * below * above, 0.0)
        probability += weight * integrand.sum(2)
    empty_row = (totals[..., 0] == 0).any(1)
    probability[empty_row] = math.nan
    return probability


def bias_from_histograms(histogram) -> np.ndarray:
    """Bias(l) estimated from logit distributions alone: Eq. 5 plugged into Eq. 4, ``(C,)``.

    Rows with no pixels are left out of the mean as in `bias_from_confusion`.
    """
    probability = prediction_probabilities_from_histograms(histogram)
    present = ~np.isnan(probability).any(1)
    if not present.any():
        raise BLDAError("histogram: every row is empty, Bias (Eq. 5) is undefined")
    return probability[present].mean(0) - 1.0 / probability.shape[0]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="stable")
    _, group, group_sizes = np.unique(values[order], return_inverse=True, return_counts=True)
    # A tie group of size s starting at (0-based) position p has ranks p+1 .. p+s: mean p+(s+1)/2.
    group_starts = np.cumsum(group_sizes) - group_sizes
    ranks = np.empty_like(values)
    ranks[order] = (group_starts + (group_sizes + 1) / 2)[group]
    return ranks


def spearman(first, second) -> float:
    """Spearman rank correlation (average ranks for ties); pairs with a NaN are dropped.

    NaN when fewer than two pairs remain or either side is constant.
    """
    a = _as_float64(first, "first").ravel()
    b = _as_float64(second, "second").ravel()
    if a.shape != b.shape:
        raise BLDAError(f"spearman: lengths differ ({a.size} and {b.size})")
    kept = ~(np.isnan(a) | np.isnan(b))
    a, b = a[kept], b[kept]
    if a.size < 2:
        return math.nan
    rank_a = _average_ranks(a) - (a.size + 1) / 2
    rank_b = _average_ranks(b) - (b.size + 1) / 2
    denominator = math.sqrt((rank_a * rank_a).sum() * (rank_b * rank_b).sum())
    if denominator == 0:
        return math.nan
    return float((rank_a * rank_b).sum() / denominator)


@dataclass(frozen=True)
class PredictionGroup:
    """One group of Table 18: its classes and the mean/std of their IoU and accuracy."""

    classes: tuple[int, ...]
    iou_mean: float
    iou_std: float
    acc_mean: float
    acc_std: float


def prediction_groups(bias, iou, acc, tolerance: float = 0.0) -> dict[str, PredictionGroup]:
    """Over-predicted (Bias > tolerance) and under-predicted (Bias < -tolerance) groups
    (Appendix L, Table 18), and the "balanced" classes between them (|Bias| <= tolerance).

    With the default tolerance 0 the paper's groups: a class with Bias exactly 0 is balanced,
    in neither. NaN Bias belongs to no group; NaN IoU/accuracy values are left out of the
    group statistics (population std).
    """
    bias = _as_float64(bias, "bias")
    iou = _as_float64(iou, "iou")
    acc = _as_float64(acc, "acc")
    if not (bias.shape == iou.shape == acc.shape) or bias.ndim != 1:
        raise BLDAError(
            f"prediction_groups: bias, iou and acc must be (C,) vectors of equal length, got "
            f"{tuple(bias.shape)}, {tuple(iou.shape)}, {tuple(acc.shape)}"
        )
    if not tolerance >= 0:
        raise BLDAError(f"prediction_groups: tolerance must be >= 0, got {tolerance!r}")
    groups = {}
    members_of = {
        "over": bias > tolerance,
        "under": bias < -tolerance,
        "balanced": np.abs(bias) <= tolerance,
    }
    for name, members in members_of.items():
        iou_mean, iou_std = _nan_mean_std(iou[members])
        acc_mean, acc_std = _nan_mean_std(acc[members])
        classes = tuple(int(c) for c in np.flatnonzero(members))
        groups[name] = PredictionGroup(classes, iou_mean, iou_std, acc_mean, acc_std)
    return groups


def js_divergence(p, q) -> np.ndarray:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between discrete distributions.

    `p` and `q` hold non-negative masses or counts on the same grid along the last dimension
    (broadcast over leading dimensions); each is normalised to sum to 1. NaN where one is empty.
    """
    p, q = _non_negative(p, "p"), _non_negative(q, "q")
    shape = np.broadcast_shapes(p.shape, q.shape)
    if len(shape) < 2:
        return _js_divergence(p.astype(np.float64), q.astype(np.float64))
    # Blocks along the first axis, each converted to float64 on its own: the ~6 temporaries of
    # a (C, C, BINS) histogram on a fine grid stay within TEMPORARY_BYTES each.
    p, q = np.broadcast_to(p, shape), np.broadcast_to(q, shape)
    rows = max(1, TEMPORARY_BYTES // (8 * max(math.prod(shape[1:]), 1)))
    blocks = [
        _js_divergence(p[first : first + rows].astype(np.float64), q[first : first + rows])
        for first in range(0, shape[0], rows)
    ]
    return np.concatenate(blocks) if blocks else np.empty(shape[:-1])


def _non_negative(values, name: str) -> np.ndarray:
    array = as_numpy(values)
    if array.dtype.kind not in "iu":
        array = _as_float64(array, name)
    if (array < 0).any():
        raise BLDAError("js_divergence: masses must be non-negative")
    return array


def _js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    p, q = p.astype(np.float64, copy=False), q.astype(np.float64, copy=False)
    p_total = p.sum(-1, keepdims=True)
    q_total = q.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / p_total
        q = q / q_total
    total = p + q  # twice the middle distribution m

    def relative_entropy(x: np.ndarray) -> np.ndarray:
        # 0 * log(0 / m) = 0; where x > 0, m > 0 too. x / m as 2 x / (p + q), which lies in
        # [0, 2]: halving first made a subnormal mass's m zero, and its term infinite.
        x = np.broadcast_to(x, total.shape)
        positive = x > 0
        terms = np.zeros(total.shape)
        terms[positive] = x[positive] * np.log(2 * x[positive] / total[positive])
        return terms.sum(-1)

    divergence = np.maximum((relative_entropy(p) + relative_entropy(q)) / 2, 0.0)
    empty = (p_total == 0) | (q_total == 0)
    return np.where(empty[..., 0], math.nan, divergence)


def anchor_divergences(histogram) -> tuple[np.ndarray, np.ndarray]:
    """Table 15: JS divergence of each class's logit distributions from the global anchors.

    `histogram` is ``(C, C, B)``. Returns ``(js_positive, js_negative)``, each ``(C,)``:
    js_positive[l] = JS(cell [l, l], global positive anchor = all diagonal cells pooled);
    js_negative[l] = mean over c != l of JS(cell [c, l], global negative anchor = all
    off-diagonal cells pooled), empty cells left out. NaN where no cell qualifies.
    """
    counts = _checked_histogram(histogram)
    num_classes = counts.shape[0]
    # Bins empty in every cell add nothing to any divergence: only the occupied range is needed.
    occupied = np.flatnonzero(counts.sum((0, 1)) > 0)
    if occupied.size:
        counts = counts[..., int(occupied[0]) : int(occupied[-1]) + 1]
    diagonal = np.eye(num_classes, dtype=bool)
    positive_cells = counts[diagonal]  # (C, B): cell [l, l] for each l
    positive_anchor = positive_cells.sum(0)
    negative_anchor = counts.sum((0, 1)) - positive_anchor
    js_positive = js_divergence(positive_cells, positive_anchor)
    js_cells = js_divergence(counts, negative_anchor)  # (C, C)
    usable = (~diagonal) & (counts.sum(2) > 0)
    js_sum = np.where(usable, js_cells, 0.0).sum(0)
    usable_count = usable.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        js_negative = np.where(usable_count > 0, js_sum / usable_count, math.nan)
    return js_positive, js_negative
