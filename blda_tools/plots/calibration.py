"""Figures of the calibrate report: metrics against tau, per-class change before and after,
and the fitted Gaussian mixtures over their logit histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from blda_tools.errors import BLDAError
from blda_tools.plots.arrays import _mass_range, _names, _unit_area, _vector
from blda_tools.plots.style import (
    BLUE,
    DARK,
    DPI,
    GREY,
    METHOD_COLORS,
    SKY,
    VERMILLION,
    _class_ticks,
    _figure,
    _figure_legend,
    _panel_grid,
    _panel_note,
    _save,
    _width_for_classes,
    literal_text,
)


@literal_text
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


@literal_text
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
        axes.text(position, 0.5, "n/a", transform=axes.get_xaxis_transform(), ha="center",
                  fontsize=8, color=GREY)  # fmt: skip
    _class_ticks(axes, names)
    unit = " (%)" if as_percent else ""
    axes.set_ylabel(f"{metric_name}{unit}")
    axes.grid(axis="y", color="#e5e5e5", zorder=0)
    marker = dict(marker="o", linestyle="")
    handles = [
        Line2D([], [], **marker, markerfacecolor="white", markeredgecolor=DARK, label="before"),
        Line2D([], [], **marker, color=BLUE, label="after (better)"),
        Line2D([], [], **marker, color=VERMILLION, label="after (worse)"),
    ]
    axes.legend(handles=handles, fontsize=8, frameon=False, ncol=3, loc="lower center",
                bbox_to_anchor=(0.5, 1.0))  # fmt: skip
    axes.set_title(f"{metric_name} per class before and after calibration", fontsize=10, pad=24)
    return _save(figure, path)


@literal_text
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
