"""Figures for the diagnose and calibrate reports, drawn from plain numpy arrays.

Every function takes arrays, class names and an output path, writes one PNG atomically and
returns the path. Nothing here knows about the statistics classes: callers (the diagnose and
calibrate jobs) pass numpy arrays, so any figure can be redrawn from saved results.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas rather than through pyplot:
nothing is registered in pyplot's global figure list (no leak, nothing to close) and the
backend of a user's interactive session is left alone, while it still works headless.

Modules: `style` (palette, figure creation, layout, saving), `arrays` (validating the input arrays,
densities on the logit grid), `diagnosis` (the diagnose report's figures), `calibration` (the
calibrate report's figures) and `training` (training curves).
"""

from __future__ import annotations

from blda_tools.plots.arrays import DISPLAY_BINS, MASS_QUANTILES
from blda_tools.plots.arrays import _coarsen as _coarsen
from blda_tools.plots.arrays import _mass_range as _mass_range
from blda_tools.plots.arrays import _unit_area as _unit_area
from blda_tools.plots.calibration import plot_gmm_fits, plot_per_class_change, plot_tau_sweep
from blda_tools.plots.diagnosis import (
    MISSING_NOTES,
    plot_bias,
    plot_confusion,
    plot_frequency_vs_accuracy,
    plot_logit_densities,
)
from blda_tools.plots.style import (
    BLUE,
    DARK,
    DPI,
    GREEN,
    GREY,
    METHOD_COLORS,
    ORANGE,
    PURPLE,
    SKY,
    VERMILLION,
    format_count,
)
from blda_tools.plots.style import _separate_labels as _separate_labels
from blda_tools.plots.training import plot_training_curves

__all__ = [
    "BLUE",
    "DARK",
    "DISPLAY_BINS",
    "DPI",
    "GREEN",
    "GREY",
    "MASS_QUANTILES",
    "METHOD_COLORS",
    "MISSING_NOTES",
    "ORANGE",
    "PURPLE",
    "SKY",
    "VERMILLION",
    "format_count",
    "plot_bias",
    "plot_confusion",
    "plot_frequency_vs_accuracy",
    "plot_gmm_fits",
    "plot_logit_densities",
    "plot_per_class_change",
    "plot_tau_sweep",
    "plot_training_curves",
]
