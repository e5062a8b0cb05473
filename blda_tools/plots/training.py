"""The training curves figure: losses and evaluation metrics against the iteration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from blda_tools.errors import BLDAError
from blda_tools.plots.style import DPI, METHOD_COLORS, _save, literal_text


@literal_text
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
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "iteration 2.5" on short runs
        axes.grid(color="#e5e5e5")
    panels[0].set_ylabel("loss")
    panels[1].set_ylabel("%")
    panels[0].set_title("Training losses", fontsize=10)
    panels[1].set_title("Evaluation metrics", fontsize=10)
    figure.tight_layout()
    return _save(figure, path, tight=False)
