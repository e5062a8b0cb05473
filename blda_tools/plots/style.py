"""What every figure shares: the palette, figure creation on an Agg canvas (see the package
docstring), atomic PNG saving, panel grids, legends, notes, class ticks and label placement."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from matplotlib import rc_context, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def literal_text(plot):
    """Draw `plot`'s text as given. Class names and image names come from the user's data, and
    matplotlib would read "$...$" in them as mathtext: "$\\foo$" raised and ended the job,
    "cost $5 to $10" came out as math. Only for the figure being drawn: a user's session keeps
    its own setting."""

    @functools.wraps(plot)
    def drawn(*arguments, **options):
        with rc_context({"text.parse_math": False}):
            return plot(*arguments, **options)

    return drawn


def format_count(count: float) -> str:
    """A pixel count in a short human form: 950, 12.3k, 4.56M, 1.2G."""
    count = float(count)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return f"{count:.0f}"


def _figure(width: float, height: float):
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    box = "tight" if tight else None
    if tight and figure.get_layout_engine() is None:
        # The box `bbox_inches="tight"` finds, computed here: savefig would draw the whole
        # figure once more (with drawing switched off) to find it, ~30 % of a figure's time.
        # The PNG is the same, pixel for pixel (tests/test_plots_report.py). A figure with a
        # layout engine is laid out by that extra draw, so it keeps savefig's way.
        box = figure.get_tightbbox(figure.canvas.get_renderer())
        box = box.padded(rcParams["savefig.pad_inches"])
    with atomic_output(path) as temporary:
        # The temporary name ends in ".partial", so the format must be named.
        figure.savefig(temporary, format="png", dpi=DPI, bbox_inches=box, facecolor="white")
    return path


# Space around the panels of `_panel_grid`, in inches, for its fonts: a panel title (9 pt), tick
# labels (7 pt) and the "logit" label (8 pt) under a panel, the suptitle (11 pt) and the legend
# (8 pt, one row) at the bottom.
_PANEL_TITLE, _TICK_LABELS, _X_LABEL = 0.24, 0.16, 0.17
_SUPTITLE, _LEGEND, _SIDE = 0.42, 0.34, 0.12


def _panel_grid(count: int, columns: int, panel_size: tuple[float, float], shared_x: bool):
    """A figure with `count` small panels in rows of `columns`; x labels on each column's last.

    With `shared_x` (all panels on one x-range) only those last panels keep their tick labels.
    The margins are fixed in inches (the fonts are known) rather than found by a layout engine,
    which measured the whole figure twice: ~35 % of drawing the 19-panel densities figure.
    The legend (`_figure_legend`) goes in the bottom margin, the suptitle in the top one.
    """
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    width, height = panel_size
    # Between two rows: the lower row's titles, the upper row's tick labels and, where one of
    # its panels is the last of its column (an incomplete last row), the "logit" label.
    upper_row_labels = (0.0 if shared_x else _TICK_LABELS) + (
        _TICK_LABELS + _X_LABEL if shared_x and count % columns else 0.0
    )
    gap = _PANEL_TITLE + upper_row_labels + (_X_LABEL if not shared_x and count % columns else 0)
    bottom = _TICK_LABELS + _X_LABEL + _LEGEND
    figure_width = width * columns
    figure_height = height * rows + 0.8
    panel_height = (figure_height - _SUPTITLE - _PANEL_TITLE - bottom - gap * (rows - 1)) / rows
    panel_width = (figure_width - 2 * _SIDE - 0.1 * (columns - 1)) / columns
    figure = Figure(figsize=(figure_width, figure_height), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(
        left=_SIDE / figure_width,
        right=1 - _SIDE / figure_width,
        top=1 - (_SUPTITLE + _PANEL_TITLE) / figure_height,
        bottom=bottom / figure_height,
        hspace=gap / panel_height,
        wspace=0.1 / panel_width,
    )
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
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
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
