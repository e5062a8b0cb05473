"""Figures of the diagnose report: bias per class, logit densities against the anchors, the
confusion matrix, and class frequency against accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from blda_tools.errors import BLDAError
from blda_tools.plots.arrays import _coarsen, _mass_range, _matrix, _names, _unit_area, _vector
from blda_tools.plots.style import (
    BLUE,
    DARK,
    GREY,
    VERMILLION,
    _class_ticks,
    _figure,
    _figure_legend,
    _panel_grid,
    _panel_note,
    _save,
    _separate_labels,
    _width_for_classes,
    format_count,
    literal_text,
)

# (has positive pixels, has negative pixels) -> note in a class's density panel.
MISSING_NOTES = {
    (False, False): "no data",
    (False, True): "no positive pixels",
    (True, False): "no negative pixels",
}


def _rank_correlation_line(bias: np.ndarray, estimate: np.ndarray, given: float | None) -> str:
    """The title's line for the Spearman correlation of Eq. 4 and Eq. 5 over the classes where
    both are finite (`given` when the caller has it, else scipy's); empty when undefined."""
    both = np.isfinite(bias) & np.isfinite(estimate)
    # Ranks need at least three classes and some spread in each series.
    if both.sum() < 3 or np.ptp(bias[both]) == 0 or np.ptp(estimate[both]) == 0:
        return ""
    rho = given
    if rho is None:
        from scipy.stats import spearmanr  # 0.6 s to import: only when needed

        rho = spearmanr(bias[both], estimate[both]).statistic
    return f"\nSpearman rank correlation of Eq. 4 and Eq. 5: {rho:.3f} ({both.sum()} classes)"


@literal_text
def plot_bias(
    class_names: Sequence[str],
    bias: Sequence[float],
    bias_estimated: Sequence[float] | None = None,
    *,
    path: str | Path,
    rank_correlation: float | None = None,
) -> Path:
    """Bar chart of Bias(l) (Eq. 4) per class, sorted descending, as in the paper's Fig. 1(d).

    Over-predicted classes (Bias > 0) and under-predicted ones are coloured apart. The Eq. 5
    estimate from the logit distributions, when given, is drawn as markers and its Spearman
    rank correlation with Eq. 4 (over classes where both are finite) goes in the title.
    Classes whose bias is NaN (no pixels, no predictions) are placed last and marked n/a.
    `rank_correlation`: that Spearman correlation when the caller has it (diagnose's
    `metrics.spearman`), so drawing needs no scipy; otherwise scipy computes it here.
    """
    names = _names(class_names)
    bias = _vector(bias, len(names), "bias")
    estimate = (
        None if bias_estimated is None else _vector(bias_estimated, len(names), "bias_estimated")
    )
    finite = np.isfinite(bias)
    # Descending by bias, NaN classes last (argsort of -bias sends NaN to the end).
    order = np.argsort(np.where(finite, -bias, np.inf), kind="stable")
    positions = np.arange(len(names))
    shown = np.nan_to_num(bias[order])
    colors = [VERMILLION if value > 0 else BLUE for value in shown]

    figure, axes = _figure(_width_for_classes(len(names)), 4.6)
    axes.bar(positions, shown, color=colors, width=0.75, zorder=2)
    axes.axhline(0.0, color=DARK, linewidth=0.8, zorder=3)
    handles = [
        Patch(color=VERMILLION, label="over-predicted (Bias > 0)"),
        Patch(color=BLUE, label="under-predicted (Bias < 0)"),
    ]
    title = "Bias per class, sorted (Eq. 4, from the confusion matrix; cf. paper Fig. 1(d))"
    if estimate is not None:
        axes.scatter(positions, estimate[order], marker="D", s=26, color=DARK, zorder=4)
        handles.append(
            Line2D([], [], marker="D", linestyle="", color=DARK, label="Eq. 5 estimate from logits")
        )
        title += _rank_correlation_line(bias, estimate, rank_correlation)
    for position in positions[~finite[order]]:
        axes.text(position, 0.0, "n/a", ha="center", va="bottom", fontsize=8, color=GREY)
    _class_ticks(axes, [names[i] for i in order])
    axes.set_xlim(-0.6, len(names) - 0.4)
    axes.set_ylabel("Bias(l)  (+ over-, - under-predicted)")
    axes.grid(axis="y", color="#dddddd", zorder=0)
    axes.legend(handles=handles, fontsize=8, loc="upper right", frameon=False)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def _density_panel(axes, centers, curves, has_mass, index: int, count: int) -> None:
    """Class `index`'s positive and negative densities (rows index and count + index of
    `curves`) over the two anchors (the last two rows), and a note for a missing set."""
    for color, row in ((BLUE, -2), (VERMILLION, -1)):  # the anchors
        if has_mass[row]:
            axes.plot(centers, curves[row], color=color, linestyle="--", linewidth=0.9)
    has_positive, has_negative = has_mass[index], has_mass[count + index]
    for color, row, present in (
        (BLUE, index, has_positive),
        (VERMILLION, count + index, has_negative),
    ):
        if present:
            axes.fill_between(centers, curves[row], color=to_rgba(color, 0.25), linewidth=0)
            axes.plot(centers, curves[row], color=color, linewidth=1.3)
    note = MISSING_NOTES.get((bool(has_positive), bool(has_negative)))
    if note:
        _panel_note(axes, note)


@literal_text
def plot_logit_densities(
    class_names: Sequence[str],
    grid_centers: Sequence[float],
    positive_density: np.ndarray,
    negative_density: np.ndarray,
    positive_anchor: Sequence[float],
    negative_anchor: Sequence[float],
    *,
    path: str | Path,
) -> Path:
    """One panel per class: its positive and negative logit densities over the global anchors.

    As in the paper's Fig. 1(c), 6 and 9: class l's positive set is M_ll and its negative set
    pools M_cl for c != l (Eq. 3); the anchors pool all positive / all negative cells. Every
    curve is renormalised to unit area on the grid; the shared x-range spans the 0.1%..99.9%
    quantiles of the anchors and of every class. Classes without pixels are marked.
    """
    names = _names(class_names)
    centers = _vector(grid_centers, None, "grid_centers")
    bins, count = len(centers), len(names)
    curves, has_mass = _unit_area(
        centers,
        np.concatenate(
            [
                _matrix(positive_density, (count, bins), "positive_density"),
                _matrix(negative_density, (count, bins), "negative_density"),
                _vector(positive_anchor, bins, "positive_anchor")[None],
                _vector(negative_anchor, bins, "negative_anchor")[None],
            ]
        ),
    )
    # Shifted classes are the interesting ones, so the range covers them as well as the anchors.
    low, high = _mass_range(centers, curves[has_mass])
    centers, curves = _coarsen(centers, curves, low, high)
    figure, panels = _panel_grid(count, columns=5, panel_size=(2.6, 1.6), shared_x=True)
    for index, axes in enumerate(panels):
        _density_panel(axes, centers, curves, has_mass, index, count)
        axes.set_title(f"{index}: {names[index]}", fontsize=9)
        axes.set_xlim(low, high)
        axes.set_ylim(bottom=0.0)
    _figure_legend(
        figure,
        Line2D([], [], color=BLUE, linewidth=1.3, label="class positive (M_ll)"),
        Line2D([], [], color=VERMILLION, linewidth=1.3, label="class negative (M_cl, c != l)"),
        Line2D([], [], color=BLUE, linestyle="--", label="global positive anchor"),
        Line2D([], [], color=VERMILLION, linestyle="--", label="global negative anchor"),
    )
    figure.suptitle(
        "Logit densities per class against the global anchors (Eq. 3; cf. paper Fig. 1(c), 6, 9)",
        fontsize=11,
    )
    return _save(figure, path, tight=False)


@literal_text
def plot_confusion(class_names: Sequence[str], confusion: np.ndarray, *, path: str | Path) -> Path:
    """Heat map of the confusion matrix normalised by rows (row = true class, column = predicted).

    Cells show the percentage of the row's pixels; the right-hand labels give each row's pixel
    count. Rows without pixels are drawn grey.
    """
    names = _names(class_names)
    counts = _matrix(confusion, (len(names), len(names)), "confusion")
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise BLDAError("confusion: expected finite, non-negative pixel counts")
    row_totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = counts / row_totals[:, None]
    fractions[row_totals == 0] = np.nan

    size = min(max(5.0, 0.42 * len(names) + 2.5), 22.0)
    figure, axes = _figure(size + 1.0, size)
    colormap = colormaps["Blues"].with_extremes(bad="#e0e0e0")
    image = axes.imshow(np.ma.masked_invalid(fractions), cmap=colormap, vmin=0.0, vmax=1.0)
    decimals = 1 if len(names) <= 8 else 0
    font = 9 if len(names) <= 10 else 6.5
    # Numbers in cells stop being legible beyond about 40 classes; the colours still read.
    annotated = np.nan_to_num(fractions) >= (0.005 if len(names) <= 40 else np.inf)
    for row, column in zip(*np.nonzero(annotated), strict=True):
        value = fractions[row, column]
        axes.text(
            column,
            row,
            f"{100 * value:.{decimals}f}",
            ha="center",
            va="center",
            fontsize=font,
            color="white" if value > 0.55 else DARK,
            in_layout=False,  # inside its cell: measuring hundreds of them for the box is waste
        )
    for row in np.flatnonzero(row_totals == 0):
        axes.text(
            len(names) / 2 - 0.5,
            row,
            "no pixels",
            ha="center",
            va="center",
            fontsize=font,
            color=DARK,
        )
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    axes.set_yticks(ticks, names, fontsize=8)
    axes.set_xlabel("predicted class (argmax)")
    axes.set_ylabel("true class")
    counts_axis = axes.secondary_yaxis("right")
    counts_axis.set_yticks(ticks, [format_count(total) for total in row_totals], fontsize=7)
    counts_axis.set_ylabel("pixels in row", fontsize=8)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.1, shrink=0.8)
    colorbar.set_label("% of the true class's pixels", fontsize=8)
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_ticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25", "50", "75", "100"])
    axes.set_title("Confusion matrix, row-normalised (% of each true class's pixels)", fontsize=10)
    return _save(figure, path)


@literal_text
def plot_frequency_vs_accuracy(
    class_names: Sequence[str],
    class_pixels: Sequence[float],
    accuracy: Sequence[float],
    *,
    path: str | Path,
) -> Path:
    """Scatter of each class's labelled pixel count (log scale) against its accuracy.

    Shows whether bias follows class frequency (paper Fig. 1(a)-(b)); classes without pixels
    or without an accuracy cannot be placed and are listed under the plot instead.
    """
    names = _names(class_names)
    pixels = _vector(class_pixels, len(names), "class_pixels")
    accuracy = _vector(accuracy, len(names), "accuracy")
    placed = (pixels > 0) & np.isfinite(accuracy)

    figure, axes = _figure(8.0, 5.2)
    axes.scatter(pixels[placed], 100 * accuracy[placed], s=30, color=BLUE, zorder=3)
    labels = [
        axes.annotate(
            names[i],
            (pixels[i], 100 * accuracy[i]),
            xytext=(5, 2),
            textcoords="offset points",
            fontsize=8,
            color=DARK,
        )
        for i in np.flatnonzero(placed)
    ]
    axes.set_xscale("log")
    axes.set_ylim(-3, 108)
    if placed.any():
        axes.set_xlim(pixels[placed].min() / 2, pixels[placed].max() * 4)
    axes.set_xlabel("labelled pixels of the class (log scale)")
    axes.set_ylabel("class accuracy (%)")
    axes.grid(color="#e5e5e5", zorder=0)
    if not placed.all():
        left_out = ", ".join(names[i] for i in np.flatnonzero(~placed))
        axes.text(
            0.0,
            -0.16,
            f"not shown (no pixels or no accuracy): {left_out}",
            transform=axes.transAxes,
            fontsize=8,
            color=DARK,
            va="top",
        )
    axes.set_title("Class frequency against class accuracy", fontsize=10)
    _separate_labels(figure, labels)
    return _save(figure, path)
