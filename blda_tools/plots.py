"""Figures for the diagnose and calibrate reports, drawn from plain numpy arrays.

Every function takes arrays, class names and an output path, writes one PNG atomically and
returns the path. Nothing here knows about the statistics classes: callers (the diagnose and
calibrate jobs) pass numpy arrays, so any figure can be redrawn from saved results.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas rather than through pyplot:
nothing is registered in pyplot's global figure list (no leak, nothing to close) and the
backend of a user's interactive session is left alone, while it still works headless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.stats import spearmanr

from blda_tools.errors import BLDAError
from blda_tools.fileio import atomic_output

DPI = 110
# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies.
BLUE, ORANGE, VERMILLION, SKY, GREEN, PURPLE = (
    "#0072B2",
    "#E69F00",
    "#D55E00",
    "#56B4E9",
    "#009E73",
    "#CC79A7",
)
GREY, DARK = "#999999", "#222222"
METHOD_COLORS = (BLUE, ORANGE, GREEN, PURPLE, SKY, VERMILLION)
# Quantiles of the densities (anchors and classes) that bound the x-range of density panels.
MASS_QUANTILES = (0.001, 0.999)
# Bins drawn across the visible range of the density panels.
DISPLAY_BINS = 150
# (has positive pixels, has negative pixels) -> note in a class's density panel.
MISSING_NOTES = {
    (False, False): "no data",
    (False, True): "no positive pixels",
    (True, False): "no negative pixels",
}


def plot_bias(
    class_names: Sequence[str],
    bias: Sequence[float],
    bias_estimated: Sequence[float] | None = None,
    *,
    path: str | Path,
) -> Path:
    """Bar chart of Bias(l) (Eq. 4) per class, sorted descending, as in the paper's Fig. 1(d).

    Over-predicted classes (Bias > 0) and under-predicted ones are coloured apart. The Eq. 5
    estimate from the logit distributions, when given, is drawn as markers and its Spearman
    rank correlation with Eq. 4 (over classes where both are finite) goes in the title.
    Classes whose bias is NaN (no pixels, no predictions) are placed last and marked n/a.
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
        both = finite & np.isfinite(estimate)
        # Ranks need at least three classes and some spread in each series.
        if both.sum() >= 3 and np.ptp(bias[both]) > 0 and np.ptp(estimate[both]) > 0:
            rho = spearmanr(bias[both], estimate[both]).statistic
            title += (
                f"\nSpearman rank correlation of Eq. 4 and Eq. 5: {rho:.3f} ({both.sum()} classes)"
            )
    for position in positions[~finite[order]]:
        axes.text(position, 0.0, "n/a", ha="center", va="bottom", fontsize=8, color=GREY)
    _class_ticks(axes, [names[i] for i in order])
    axes.set_xlim(-0.6, len(names) - 0.4)
    axes.set_ylabel("Bias(l)  (+ over-, - under-predicted)")
    axes.grid(axis="y", color="#dddddd", zorder=0)
    axes.legend(handles=handles, fontsize=8, loc="upper right", frameon=False)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


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


def plot_tau_sweep(
    taus: Sequence[float] | Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    miou: Sequence[float] | None = None,
    macc: Sequence[float] | None = None,
    chosen_tau: float | None = None,
    baseline: tuple[float, float] | None = None,
    *,
    path: str | Path,
) -> Path:
    """mIoU and mAcc against the scale tau of Eq. 7 (paper Fig. 5), one line per method.

    Either `taus`, `miou`, `macc` arrays for one method (drawn as "BLDA"), or a mapping
    `method -> (taus, miou, macc)` (e.g. BLDA and prior logit adjustment) with `miou` and `macc`
    left out. `baseline` is the uncalibrated (mIoU, mAcc), drawn as dashed lines; `chosen_tau`
    as a dotted vertical line. Metrics are fractions in [0, 1] and shown in %.
    """
    sweeps = _as_sweeps(taus, miou, macc)
    figure = Figure(figsize=(11.0, 4.3), dpi=DPI)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2)
    for index, (method, (method_taus, method_miou, method_macc)) in enumerate(sweeps.items()):
        tau_values = _vector(method_taus, None, f"{method} taus")
        color = METHOD_COLORS[index % len(METHOD_COLORS)]
        for axes, values, name in (
            (panels[0], method_miou, "miou"),
            (panels[1], method_macc, "macc"),
        ):
            metric = _vector(values, len(tau_values), f"{method} {name}")
            axes.plot(
                tau_values, 100 * metric, marker="o", markersize=3.5, color=color, label=str(method)
            )
    for axes, label, position in ((panels[0], "mIoU (%)", 0), (panels[1], "mAcc (%)", 1)):
        if baseline is not None:
            axes.axhline(
                100 * float(baseline[position]),
                color=GREY,
                linestyle="--",
                linewidth=1.0,
                label="no adjustment",
            )
        if chosen_tau is not None:
            axes.axvline(
                float(chosen_tau),
                color=DARK,
                linestyle=":",
                linewidth=1.2,
                label=f"chosen tau = {float(chosen_tau):g}",
            )
        axes.set_xlabel("tau (scale of the offsets, Eq. 7)")
        axes.set_ylabel(label)
        axes.grid(color="#e5e5e5")
        axes.legend(fontsize=8, frameon=False)
    figure.suptitle(
        "Post-hoc balancing: metrics against tau (Eq. 7; cf. paper Fig. 5)", fontsize=11
    )
    figure.tight_layout()
    return _save(figure, path, tight=False)


def plot_per_class_change(
    class_names: Sequence[str],
    before: Sequence[float],
    after: Sequence[float],
    metric_name: str,
    *,
    path: str | Path,
    as_percent: bool = True,
    higher_is_better: bool = True,
) -> Path:
    """Dumbbell chart of a per-class metric before and after calibration.

    Each class gets a hollow marker (before) joined to a filled one (after), coloured by whether
    the change is an improvement. With `as_percent` the values (fractions) are shown in %.
    """
    names = _names(class_names)
    scale = 100.0 if as_percent else 1.0
    before = scale * _vector(before, len(names), "before")
    after = scale * _vector(after, len(names), "after")
    change = after - before
    improved = change > 0 if higher_is_better else change < 0
    colors = np.where(improved, BLUE, VERMILLION)
    positions = np.arange(len(names))

    figure, axes = _figure(_width_for_classes(len(names)), 4.6)
    axes.vlines(positions, before, after, colors=colors, linewidth=2.0, zorder=2)
    axes.scatter(positions, before, s=34, facecolors="white", edgecolors=DARK, zorder=3)
    axes.scatter(positions, after, s=34, color=colors, zorder=4)
    for position in positions[~(np.isfinite(before) & np.isfinite(after))]:
        axes.text(
            position,
            0.5,
            "n/a",
            transform=axes.get_xaxis_transform(),
            ha="center",
            fontsize=8,
            color=GREY,
        )
    _class_ticks(axes, names)
    unit = " (%)" if as_percent else ""
    axes.set_ylabel(f"{metric_name}{unit}")
    axes.grid(axis="y", color="#e5e5e5", zorder=0)
    axes.legend(
        handles=[
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markerfacecolor="white",
                markeredgecolor=DARK,
                label="before",
            ),
            Line2D([], [], marker="o", linestyle="", color=BLUE, label="after (better)"),
            Line2D([], [], marker="o", linestyle="", color=VERMILLION, label="after (worse)"),
        ],
        fontsize=8,
        frameon=False,
        ncol=3,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
    )
    axes.set_title(f"{metric_name} per class before and after calibration", fontsize=10, pad=24)
    return _save(figure, path)


def plot_gmm_fits(
    grid_centers: Sequence[float],
    histograms: Mapping[str, Sequence[float]],
    gmm_densities: Mapping[str, Sequence[float]],
    *,
    path: str | Path,
) -> Path:
    """Fitted Gaussian mixtures over the logit histograms they were fitted to (paper Fig. 7).

    One panel per title in `histograms`; `gmm_densities` holds the mixture density on the same
    grid for the same titles. Both are renormalised to unit area so their shapes compare.
    """
    centers = _vector(grid_centers, None, "grid_centers")
    if not histograms:
        raise BLDAError("plot_gmm_fits: histograms is empty; expected at least one cell to draw")
    unknown = set(gmm_densities) - set(histograms)
    if unknown:
        raise BLDAError(
            f"plot_gmm_fits: gmm_densities has titles without a histogram: {sorted(unknown)}"
        )
    titles = list(histograms)
    observed, has_samples = _unit_area(
        centers,
        np.stack([_vector(histograms[t], len(centers), f"histograms[{t!r}]") for t in titles]),
    )
    missing_fit = np.zeros(len(centers))
    fitted, has_fit = _unit_area(
        centers,
        np.stack(
            [
                _vector(gmm_densities.get(t, missing_fit), len(centers), f"gmm_densities[{t!r}]")
                for t in titles
            ]
        ),
    )
    figure, panels = _panel_grid(len(titles), columns=4, panel_size=(3.2, 2.1), shared_x=False)
    for index, axes in enumerate(panels):
        if has_samples[index]:
            axes.fill_between(centers, observed[index], step="mid", color=SKY, linewidth=0)
        if has_fit[index]:
            axes.plot(centers, fitted[index], color=VERMILLION, linewidth=1.4)
        if not has_samples[index] or not has_fit[index]:
            _panel_note(axes, "no samples" if not has_samples[index] else "no fit")
        present = np.stack([observed[index], fitted[index]])[[has_samples[index], has_fit[index]]]
        axes.set_xlim(*_mass_range(centers, present))
        axes.set_title(str(titles[index]), fontsize=9)
    _figure_legend(
        figure,
        Patch(color=SKY, label="histogram of the logits"),
        Line2D([], [], color=VERMILLION, linewidth=1.4, label="fitted mixture density"),
    )
    figure.suptitle(
        "Fitted Gaussian mixtures over logit histograms (cf. paper Fig. 7)", fontsize=11
    )
    return _save(figure, path, tight=False)


def plot_training_curves(records: Sequence[Mapping[str, float]], *, path: str | Path) -> Path:
    """Losses and mIoU / mAcc against the iteration, from training log records.

    Each record needs an "iteration"; every other key containing "loss" is a loss curve, and
    "miou" / "macc" (fractions) are drawn in % on a second panel. A record may hold only some
    keys (evaluation runs less often than logging).
    """
    if not records:
        raise BLDAError(
            "plot_training_curves: no records; expected a list of dicts with an 'iteration'"
        )
    if any("iteration" not in record for record in records):
        raise BLDAError("plot_training_curves: every record needs an 'iteration' field")
    keys = sorted({key for record in records for key in record})
    loss_keys = [key for key in keys if "loss" in key]
    metric_keys = [key for key in ("miou", "macc") if key in keys]

    figure = Figure(figsize=(11.0, 4.2), dpi=DPI)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2)
    for axes, names, scale in ((panels[0], loss_keys, 1.0), (panels[1], metric_keys, 100.0)):
        for index, key in enumerate(names):
            points = np.array([(r["iteration"], r[key]) for r in records if key in r], dtype=float)
            axes.plot(
                points[:, 0],
                scale * points[:, 1],
                color=METHOD_COLORS[index % len(METHOD_COLORS)],
                marker="o" if len(points) < 30 else None,
                markersize=3,
                linewidth=1.2,
                label=key,
            )
        if not names:
            axes.text(
                0.5, 0.5, "nothing logged", transform=axes.transAxes, ha="center", va="center"
            )
        else:
            axes.legend(fontsize=8, frameon=False)
        axes.set_xlabel("iteration")
        axes.grid(color="#e5e5e5")
    panels[0].set_ylabel("loss")
    panels[1].set_ylabel("%")
    panels[0].set_title("Training losses", fontsize=10)
    panels[1].set_title("Evaluation metrics", fontsize=10)
    figure.tight_layout()
    return _save(figure, path, tight=False)


def format_count(count: float) -> str:
    """A pixel count in a short human form: 950, 12.3k, 4.56M, 1.2G."""
    count = float(count)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return f"{count:.0f}"


# --- helpers -------------------------------------------------------------------------------


def _figure(width: float, height: float):
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    with atomic_output(path) as temporary:
        # The temporary name ends in ".partial", so the format must be named.
        figure.savefig(
            temporary,
            format="png",
            dpi=DPI,
            bbox_inches="tight" if tight else None,
            facecolor="white",
        )
    return path


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


def _as_sweeps(taus, miou, macc) -> dict:
    """The two call forms of `plot_tau_sweep` as one mapping method -> (taus, miou, macc)."""
    if isinstance(taus, Mapping):
        if miou is not None or macc is not None:
            raise BLDAError(
                "plot_tau_sweep: give either a mapping method -> (taus, miou, macc) or three arrays"
            )
        if not taus:
            raise BLDAError("plot_tau_sweep: no method to plot")
        return dict(taus)
    if miou is None or macc is None:
        raise BLDAError("plot_tau_sweep: miou and macc are required when taus is an array")
    return {"BLDA": (taus, miou, macc)}


def _panel_grid(count: int, columns: int, panel_size: tuple[float, float], shared_x: bool):
    """A figure with `count` small panels in rows of `columns`; x labels on each column's last.

    With `shared_x` (all panels on one x-range) only those last panels keep their tick labels.
    """
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    width, height = panel_size
    figure = Figure(figsize=(width * columns, height * rows + 0.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = list(figure.subplots(rows, columns, squeeze=False).flat)
    for index, axes in enumerate(grid):
        lowest_in_column = index + columns >= count
        axes.set_visible(index < count)
        axes.tick_params(labelsize=7, labelbottom=lowest_in_column or not shared_x)
        axes.set_yticks([])
        if lowest_in_column:
            axes.set_xlabel("logit", fontsize=8)
    return figure, grid[:count]


def _figure_legend(figure: Figure, *handles) -> None:
    figure.legend(
        handles=list(handles),
        loc="outside lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )


def _panel_note(axes, text: str) -> None:
    """A boxed message in the middle of a panel (missing data)."""
    axes.text(
        0.03,
        0.94,
        text,
        transform=axes.transAxes,
        ha="left",
        va="top",
        fontsize=8,
        color=DARK,
        bbox={"facecolor": "white", "edgecolor": GREY, "boxstyle": "round"},
    )


def _width_for_classes(count: int) -> float:
    """Figure width in inches for one bar or marker per class, capped for very many classes."""
    return min(max(6.0, 0.42 * count + 2.0), 26.0)


def _class_ticks(axes, names: list[str]) -> None:
    axes.set_xticks(
        np.arange(len(names)),
        names,
        rotation=60,
        ha="right",
        rotation_mode="anchor",
        fontsize=8 if len(names) <= 30 else 6,
    )


def _separate_labels(figure: Figure, labels: list) -> None:
    """Nudge point labels upwards until no two overlap (labels are few: one per class)."""
    renderer = figure.canvas.get_renderer()
    placed = []
    for label in sorted(labels, key=lambda text: text.get_window_extent(renderer).y0):
        for _ in range(len(labels) + 1):
            box = label.get_window_extent(renderer)
            clash = next((other for other in placed if box.overlaps(other)), None)
            if clash is None:
                break
            offset_x, offset_y = label.xyann
            label.xyann = (offset_x, offset_y + (clash.y1 - box.y0 + 1.0) * 72.0 / figure.dpi)
        placed.append(label.get_window_extent(renderer))
