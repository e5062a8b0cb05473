"""The `blda calibrate` job: fit the Eq. 6 offsets, sweep tau (Eq. 7), choose it honestly, and
write sweep.csv, calibration.json, plots and calibrator.pt.

Passes over the data: statistics of the fit-on stores (and of the anchor stores when they differ);
a tau sweep of the select-on stores when given; one sweep of the evaluated stores (every tau at
once, with the tau = 0 and prior-adjustment baselines); and one pass over the evaluated stores
at the chosen tau that collects the statistics of the logits before and after calibration, for
the JS divergences to the anchors (Table 15). The rows of those statistics are the ground truth
when the evaluated stores have it, else the uncalibrated pseudo-labels (argmax f), the same rows
before and after: only the logits change. A calibrated logit of a pixel of row class c is
f[l] + tau Delta_cl(f[l]), the quantity Eq. 7 puts in the softmax.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blda_tools import __version__, plots
from blda_tools.calibration.calibrator import anchor_histograms, gather_offsets
from blda_tools.calibration.inputs import (
    DEFAULT_COMPONENTS,
    DEFAULT_TAUS,
    CalibrationInputs,
    as_paths,
    open_inputs,
)
from blda_tools.calibration.sweep import (
    TauSweep,
    select_tau,
    sweep_stores,
    sweep_table,
)
from blda_tools.fileio import atomic_output, json_ready, none_to_nan, write_json
from blda_tools.gmm import mixture_pdf
from blda_tools.outputs import output_set
from blda_tools.statistics import LogitGrid, LogitSetStatistics, as_grid
from blda_tools.statistics.evaluation_classes import UNUSED_EVAL_CLASSES, averaging_note
from blda_tools.statistics.grid import check_histograms_fit
from blda_tools.statistics.metrics import SegmentationMetrics, js_divergence

Paths = str | os.PathLike | Sequence[str | os.PathLike]
GMM_PLOT_CELLS = 6
# Every file `calibrate` may write in its output directory (replaced or removed on a re-run).
OUTPUT_FILES = (
    "calibrator.pt",
    "sweep.csv",
    "calibration.json",
    "tau_sweep.png",
    "per_class_iou.png",
    "per_class_acc.png",
    "gmm_fits.png",
)


@dataclass
class CalibrationResult:
    """What `calibrate` measured and chose; `to_json()` is calibration.json."""

    classes: list[str]
    chosen_tau: float
    selection: dict
    warnings: list[str]
    before: dict | None
    after: dict | None
    js: dict
    unadjusted_cells: list[list[str]]
    fit: dict
    sweep: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    # The prior-adjustment baseline at ITS best tau, chosen the way BLDA's tau was, with its
    # metrics on the evaluated stores (None without labels there).
    prior_baseline: dict | None = None
    eval_classes: list[str] | None = None  # those mIoU / mAcc average over; None: all
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        content = {k: v for k, v in self.__dict__.items() if k != "sweep"}
        content["producer"] = f"blda calibrate {__version__}"
        return json_ready(content)


@dataclass(frozen=True)
class CalibrateOptions:
    """Options of `calibrate` (the CLI's options, one to one)."""

    taus: str | Sequence[float] = DEFAULT_TAUS
    fit_on: Paths | None = None
    fit_labels: str = "pseudo"
    anchor_from: Paths | None = None
    anchor: str = "global"
    select_on: Paths | None = None
    # What the choice of tau maximises: "miou" (also when None) or "macc"; given with a
    # single tau, where nothing is chosen, it is refused.
    metric: str | None = None
    # The classes mIoU / mAcc average over: "all", "synthia16", "synthia13" or class names.
    eval_classes: str | Sequence[str] | None = "all"
    estimator: str = "gmm"
    n_components: int = DEFAULT_COMPONENTS
    eps: float = 0.01
    min_samples: int = 100
    table_points: int = 2048
    grid: LogitGrid = field(default_factory=LogitGrid)
    plots: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", as_grid(self.grid))  # (low, high, bins) accepted

    @property
    def selection_metric(self) -> str:
        return self.metric or "miou"


def calibration_passes(stores: Paths, options: CalibrateOptions) -> int:
    """Rows `calibrate` will stream in all (for a progress bar's total)."""
    return open_inputs(stores, options).rows()


def calibrate(
    stores: Paths,
    out_dir: str | os.PathLike,
    options: CalibrateOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> CalibrationResult:
    """Fit, sweep, select tau and write the outputs to `out_dir` (see the module docstring).

    Every input is checked first; the files are written as one set (`outputs.output_set`).
    """
    options = options or CalibrateOptions()
    inputs = open_inputs(stores, options)
    # Held at once: the fitting statistics, the anchors' (when apart), before and after.
    copies = 3 + (inputs.anchors is not None)
    check_histograms_fit(inputs.evaluated.num_classes, as_grid(options.grid), copies)
    inputs.calibrator.check_tables_fit(inputs.evaluated.num_classes)
    # the files this run may write: a foreign plot is no reason to refuse a --no-plots run
    names = OUTPUT_FILES if options.plots else [n for n in OUTPUT_FILES if not n.endswith(".png")]
    with output_set(out_dir, "calibrate", names) as outputs:
        return _calibrate(inputs, outputs.staging, options, progress)


def _calibrate(inputs: CalibrationInputs, out_dir: Path, options, progress) -> CalibrationResult:
    evaluated, taus = inputs.evaluated, inputs.taus
    warnings: list[str] = []
    fit_statistics, anchor_statistics = _fit_statistics(inputs, options, warnings, progress)
    calibrator = inputs.calibrator.fit(fit_statistics, anchor_statistics)
    selection, evaluation = _choose_tau(calibrator, inputs, options, warnings, progress)
    calibrator.tau = selection["tau"]
    labelled = inputs.evaluated_labelled
    if evaluation is None and labelled:
        evaluation = sweep_stores(calibrator, evaluated, taus, progress, classes=inputs.averaged)
    before_after = _before_after_statistics(calibrator, evaluated, labelled, options.grid, progress)
    anchors = anchor_histograms(anchor_statistics, options.anchor)
    result = CalibrationResult(
        classes=list(calibrator.class_names),
        chosen_tau=calibrator.tau,
        selection=selection,
        warnings=warnings,
        before=None,
        after=None,
        js=_js_summary(before_after, anchors, labelled),
        unadjusted_cells=[list(cell) for cell in calibrator.unadjusted_cells_],
        fit=_fit_summary(calibrator, inputs, options),
    )
    if evaluation is not None:
        if inputs.averaged:  # only where there are metrics to average
            result.eval_classes = [result.classes[c] for c in inputs.averaged]
            result.notes.append(averaging_note(inputs.averaged, result.classes))
        _add_metrics(result, evaluation)
    elif inputs.averaged:  # accepted, and nothing to apply it to
        result.notes.append(UNUSED_EVAL_CLASSES)
    for statistics, what in ((fit_statistics, "fitting"), (anchor_statistics, "anchor")):
        note = statistics.outside_grid_note()
        if note is not None and (what == "fitting" or anchor_statistics is not fit_statistics):
            result.notes.append(f"{what} data: {note}")
    _describe_choice(result)
    _write_outputs(result, calibrator, evaluation, fit_statistics, out_dir, options)
    return result


def _fit_statistics(inputs: CalibrationInputs, options, warnings, progress):
    """(fit-on statistics, anchor statistics), warning when either uses the ground truth of
    evaluated pixels."""
    evaluated = [str(path) for path in inputs.evaluated.paths]
    fit_statistics = inputs.fit.statistics(options.fit_labels, options.grid, progress)
    if options.fit_labels == "gt" and _overlap(inputs.fit.paths, evaluated):
        warnings.append(
            "FITTING USES THE GROUND TRUTH OF THE EVALUATED PIXELS (--fit-labels gt on stores "
            "that are also evaluated): the reported metrics are optimistic."
        )
    if inputs.anchors is None:
        return fit_statistics, fit_statistics
    anchor_statistics = inputs.anchors.statistics("auto", options.grid, progress)
    if inputs.anchors.has_labels and _overlap(inputs.anchors.paths, evaluated):
        warnings.append(
            "THE ANCHORS USE THE GROUND TRUTH OF THE EVALUATED PIXELS (--anchor-from with "
            "labelled evaluated stores): the reported metrics are optimistic."
        )
    return fit_statistics, anchor_statistics


def _choose_tau(calibrator, inputs: CalibrationInputs, options, warnings, progress):
    """(selection dict, evaluated-store sweep when it was needed for the choice, else None)."""
    evaluated, taus, held_out = inputs.evaluated, inputs.taus, inputs.held_out
    if held_out is not None:
        sweep = sweep_stores(calibrator, held_out, taus, progress, classes=inputs.averaged)
        results = sweep.compute()
        best = select_tau(results, options.selection_metric, taus)
        how = "held-out stores (--select-on)"
        if _overlap(held_out.paths, evaluated.paths):
            warnings.append(
                "TAU IS SELECTED ON STORES THAT ARE ALSO EVALUATED (--select-on overlaps the "
                "evaluated stores): the reported metrics are optimistic."
            )
            how = "--select-on stores, also evaluated (optimistic)"  # not held out
        prior = select_tau(results, options.selection_metric, taus, method="prior")
        return _selection(best, how, options.selection_metric, held_out, prior), None
    if len(taus) == 1:
        given = {"tau": taus[0], "how": "given (--tau with one value)", "metric": None}
        return {**given, "prior_tau": taus[0]}, None
    sweep = sweep_stores(calibrator, evaluated, taus, progress, classes=inputs.averaged)
    results = sweep.compute()
    best = select_tau(results, options.selection_metric, taus)
    prior = select_tau(results, options.selection_metric, taus, method="prior")
    warnings.append(
        "TAU IS SELECTED ON THE EVALUATED STORES THEMSELVES (no --select-on): the reported "
        "metrics at the chosen tau are optimistic."
    )
    how = "evaluated stores (optimistic)"
    return _selection(best, how, options.selection_metric, evaluated, prior), sweep


def _selection(best, how, metric, store, prior) -> dict:
    return {
        "tau": best.tau,
        "how": how,
        "metric": metric,
        "value_on_selection_stores": getattr(best.metrics, metric),
        "selection_stores": [str(path) for path in store.paths],
        "prior_tau": prior.tau,  # the prior-adjustment baseline's best tau, chosen alike
        "prior_value_on_selection_stores": getattr(prior.metrics, metric),
    }


def _describe_choice(result: CalibrationResult) -> None:
    """Plain notes: a tau of 0 (a calibrator that changes nothing), and whether BLDA or the
    prior-adjustment baseline at its own best tau does better on the evaluated stores."""
    selection = result.selection
    if len(result.unadjusted_cells) == len(result.classes) ** 2:
        result.notes.append(
            "No cell of the logit-set matrix has --min-samples logits, so no logit gets an "
            "offset: this calibrator changes nothing at any tau. Lower --min-samples, or fit "
            "on more data (--fit-on)."
        )
    elif result.chosen_tau == 0 and selection["how"].startswith("given"):
        result.notes.append(
            "tau = 0 was given: this calibrator changes nothing (its predictions are the "
            "argmax of the logits)."
        )
    elif result.chosen_tau == 0:
        result.notes.append(
            "tau = 0 was chosen: no tau of the sweep did better than the uncalibrated model on "
            f"the {selection['how']}, so this calibrator changes nothing (its predictions are "
            "the argmax of the logits). Try another --anchor, --fit-on data closer to the "
            "target, or a finer --tau range."
        )
    baseline, metric = result.prior_baseline, selection.get("metric") or "miou"
    if baseline is None or result.after is None:
        return
    names = {"miou": "mIoU", "macc": "mAcc"}
    # The points between the two figures as shown (to 0.1), so that the note adds up.
    difference = _shown_percent(result.after[metric]) - _shown_percent(baseline[metric])
    # At tau = 0 BLDA changes nothing: the comparison is with the uncalibrated model.
    ours = "BLDA" if result.chosen_tau > 0 else "the uncalibrated model (BLDA's tau = 0)"
    if abs(difference) < 0.05:
        verdict = f"{ours} and the prior-adjustment baseline do equally well on {names[metric]}"
    elif difference > 0:
        verdict = f"{ours} does better on {names[metric]} than the prior-adjustment baseline"
    else:
        verdict = f"the prior-adjustment baseline does better on {names[metric]} than {ours}"
    other = "macc" if metric == "miou" else "miou"
    # with one tau given nothing was chosen: the baseline runs at that tau too
    its_tau = "the same tau" if selection["how"].startswith("given") else "its own best tau"
    result.notes.append(
        f"On the evaluated stores {verdict}: {names[metric]} {result.after[metric]:.1%} at tau "
        f"= {result.chosen_tau:g} against {baseline[metric]:.1%} at {its_tau} = "
        f"{baseline['tau']:g} ({difference:+.1f} points); {names[other]} "
        f"{result.after[other]:.1%} against {baseline[other]:.1%}."
    )


def _shown_percent(fraction: float) -> float:
    """`fraction` in % as the notes print it (`:.1%`)."""
    return float(f"{fraction:.1%}".rstrip("%"))


def _before_after_statistics(calibrator, store, labelled: bool, grid, progress):
    """Logit-set statistics of the evaluated pixels before and after calibration (one pass),
    by their labels when some pixel is `labelled`, else by the uncalibrated argmax."""
    kernel = calibrator.kernel_tensors()
    C, tau = calibrator.num_classes, calibrator.tau
    made = [LogitSetStatistics(C, grid, store.ignore_index, store.class_names) for _ in range(2)]
    before, after = made
    for chunk in store.iter_chunks(rows=1 << 16, reuse_buffers=True):
        logits = chunk.logits
        labels = chunk.labels if labelled else logits.argmax(1)
        before.update(logits, labels)
        rows = labels.clamp(0, C - 1)  # ignored pixels are skipped by update anyway
        calibrated = torch.empty_like(logits)
        for start in range(0, logits.shape[0], 4096):
            part = logits[start : start + 4096]
            offsets = gather_offsets(part, *kernel)  # (n, l, c)
            row = rows[start : start + 4096].view(-1, 1, 1).expand(-1, C, 1)
            calibrated[start : start + 4096] = part + tau * offsets.gather(2, row).squeeze(2)
        after.update(calibrated, labels)
        if progress is not None:
            progress(logits.shape[0])
    return before, after


def _anchor_js(histogram, positive, negative) -> tuple[list[float], list[float]]:
    """Table 15: JS(cell [l, l], P_p) and the mean over c != l of JS(cell [c, l], P_n)."""
    C = histogram.shape[0]
    diagonal = np.eye(C, dtype=bool)
    js_positive = js_divergence(histogram[diagonal], positive)
    js_cells = js_divergence(histogram, negative)
    usable = (~diagonal) & (histogram.sum(2) > 0)
    count = usable.sum(0)
    total = np.where(usable, js_cells, 0.0).sum(0)
    js_negative = np.where(count > 0, total / np.maximum(count, 1), math.nan)
    return js_positive.tolist(), js_negative.tolist()


def _js_summary(before_after, anchors, has_labels) -> dict:
    before, after = before_after
    positive_before, negative_before = _anchor_js(before.histogram, *anchors)
    positive_after, negative_after = _anchor_js(after.histogram, *anchors)
    return {
        "rows": "ground truth" if has_labels else "pseudo-labels (uncalibrated argmax)",
        "positive_before": positive_before,
        "positive_after": positive_after,
        "negative_before": negative_before,
        "negative_after": negative_after,
    }


def _metrics_dict(scores: SegmentationMetrics) -> dict:
    return {
        "miou": scores.miou,
        "macc": scores.macc,
        "iou_std": scores.iou_std,
        "acc_std": scores.acc_std,
        "iou": list(scores.iou),
        "acc": list(scores.acc),
    }


def _add_metrics(result: CalibrationResult, evaluation: TauSweep) -> None:
    rows = evaluation.compute()
    result.sweep = [
        {"tau": row.tau, "method": row.method, **_metrics_dict(row.metrics)} for row in rows
    ]
    by_key = {(row.method, row.tau): row.metrics for row in rows}
    result.before = _metrics_dict(by_key[("blda", 0.0)])
    if ("blda", result.chosen_tau) in by_key:
        result.after = _metrics_dict(by_key[("blda", result.chosen_tau)])
        result.after["prior_at_same_tau"] = _metrics_dict(by_key[("prior", result.chosen_tau)])
    prior_tau = result.selection.get("prior_tau")
    if ("prior", prior_tau) in by_key:
        how = result.selection["how"]
        result.prior_baseline = {
            "tau": prior_tau,
            "how": how,
            **_metrics_dict(by_key[("prior", prior_tau)]),
        }


def _fit_summary(calibrator, inputs: CalibrationInputs, options) -> dict:
    return {
        "fit_on": [str(path) for path in as_paths(options.fit_on or inputs.evaluated.paths)],
        "fit_on_stores": inputs.fit.paths,
        "fit_labels": options.fit_labels,
        "anchor": options.anchor,
        "anchor_from": [str(p) for p in as_paths(options.anchor_from)]
        if inputs.anchors is not None
        else "fit-on statistics",
        "estimator": calibrator.estimator,
        "n_components": calibrator.n_components,
        "eps": calibrator.eps,
        "min_samples": calibrator.min_samples,
        "table_points": calibrator.table_points,
        "class_prior": calibrator.class_prior_.tolist(),
    }


def _write_outputs(result, calibrator, evaluation, fit_statistics, out_dir: Path, options):
    calibrator.save(out_dir / "calibrator.pt")
    result.files["calibrator"] = "calibrator.pt"
    if evaluation is not None:
        columns, table = sweep_table(evaluation.compute(), result.classes)
        with atomic_output(out_dir / "sweep.csv") as temporary:
            with open(temporary, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                writer.writerows([_csv_value(value) for value in row] for row in table)
        result.files["sweep"] = "sweep.csv"
    if options.plots:
        result.files.update(_draw_plots(result, calibrator, fit_statistics, out_dir))
    result.files["calibration"] = "calibration.json"
    write_json(out_dir / "calibration.json", result.to_json())


def _draw_plots(result, calibrator, fit_statistics, out_dir: Path) -> dict[str, str]:
    files = {}
    if result.sweep:
        sweeps = {}
        for method, label in (("blda", "BLDA"), ("prior", "prior adjustment")):
            rows = [row for row in result.sweep if row["method"] == method]
            sweeps[label] = tuple([row[key] for row in rows] for key in ("tau", "miou", "macc"))
        baseline = (result.before["miou"], result.before["macc"])
        files["tau_sweep"] = plots.plot_tau_sweep(
            sweeps, chosen_tau=result.chosen_tau, baseline=baseline, path=out_dir / "tau_sweep.png"
        )
        if result.after is not None:
            for key, name in (("iou", "IoU"), ("acc", "Accuracy")):
                files[f"per_class_{key}"] = plots.plot_per_class_change(
                    result.classes,
                    none_to_nan(result.before[key]),
                    none_to_nan(result.after[key]),
                    name,
                    path=out_dir / f"per_class_{key}.png",
                )
    if calibrator.cell_mixture_ is not None:
        gmm_plot = _plot_gmm_fits(result, calibrator, fit_statistics, out_dir)
        if gmm_plot is not None:
            files["gmm_fits"] = gmm_plot
    return {key: Path(path).name for key, path in files.items()}


def _plot_gmm_fits(result, calibrator, statistics, out_dir: Path):
    """Fig. 7: the fitted mixtures over the histograms of the most misaligned positive cells."""
    names = result.classes
    js = torch.tensor(none_to_nan(result.js["positive_before"]), dtype=torch.float64)
    order = [int(c) for c in torch.argsort(torch.nan_to_num(js, nan=-1.0), descending=True)]
    mixture = calibrator.cell_mixture_
    centers = torch.from_numpy(statistics.grid.centers)
    histograms, densities = {}, {}
    for c in [c for c in order if calibrator.adjusted_[c, c]][:GMM_PLOT_CELLS]:
        title = f"[{names[c]}, {names[c]}]"
        histograms[title] = statistics.histogram[c, c].astype(np.float64)
        parameters = [mixture[key][c, c].double() for key in ("weights", "means", "variances")]
        densities[title] = mixture_pdf(centers, *parameters).numpy()
    if not histograms:
        return None
    return plots.plot_gmm_fits(
        centers.numpy(), histograms, densities, path=out_dir / "gmm_fits.png"
    )


def _overlap(first: Sequence, second: Sequence) -> bool:
    return bool({Path(p).resolve() for p in first} & {Path(p).resolve() for p in second})


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value
