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

`workers` draws figures in worker processes while the caller computes (the diagnose job).
The names below are imported from their modules on first use (PEP 562), so that a job can
start its figure workers (`blda_tools.plots.workers`) without importing matplotlib.
"""

from __future__ import annotations

from blda_tools.runtime.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["DISPLAY_BINS", "MASS_QUANTILES", "_coarsen", "_mass_range", "_unit_area"], "arrays"
    ),
    **dict.fromkeys(["plot_gmm_fits", "plot_per_class_change", "plot_tau_sweep"], "calibration"),
    **dict.fromkeys(
        [
            "MISSING_NOTES",
            "plot_bias",
            "plot_confusion",
            "plot_frequency_vs_accuracy",
            "plot_logit_densities",
        ],
        "diagnosis",
    ),
    **dict.fromkeys(
        [
            "BLUE",
            "DARK",
            "DPI",
            "GREEN",
            "GREY",
            "METHOD_COLORS",
            "ORANGE",
            "PURPLE",
            "SKY",
            "VERMILLION",
            "format_count",
            "_separate_labels",
        ],
        "style",
    ),
    "plot_training_curves": "training",
}

__all__ = sorted(name for name in _EXPORTS if not name.startswith("_"))


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
