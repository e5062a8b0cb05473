"""The `blda diagnose` job: logit-set statistics, bias, metrics, plots and a report.

`diagnose(stores, out_dir)` streams one or more logit stores (shards read as one) into
`LogitSetStatistics` (the logit-set matrix M of Eq. 3 as histograms), then derives:
- per-class IoU and accuracy from the ground-truth confusion matrix, when the store has labels;
- Bias(l) from the confusion matrix (Eq. 4) and estimated from the logit distributions alone
  (Eq. 5), with their Spearman rank correlation;
- over- and under-predicted groups (Table 18) and JS divergences to the anchors (Table 15).
It writes `diagnosis.json`, `statistics.h5` (reusable by `blda calibrate`), PNG plots and a
self-contained `report.html`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from blda_tools import __version__
from blda_tools.errors import BLDAError
from blda_tools.fileio import json_ready, none_to_nan, write_json
from blda_tools.outputs import output_set
from blda_tools.plots import workers as figure_workers
from blda_tools.plots.workers import FigureWorkers
from blda_tools.report import explain
from blda_tools.report.html import Report
from blda_tools.statistics import (
    LogitGrid,
    LogitSetStatistics,
    as_grid,
    collect_statistics,
    first_argmax,
    metrics,
    resolve_label_source,
)
from blda_tools.statistics.evaluation_classes import (
    UNUSED_EVAL_CLASSES,
    averaging_note,
    evaluation_classes,
)
from blda_tools.store import LogitStore

PLOT_FILES = {
    "bias": "bias.png",
    "densities": "logit_densities.png",
    "confusion": "confusion.png",
    "frequency": "frequency_vs_accuracy.png",
}
# Every file `diagnose` may write in its output directory (replaced or removed on a re-run).
OUTPUT_FILES = ("diagnosis.json", "statistics.h5", "report.html", *PLOT_FILES.values())


@dataclass
class Diagnosis:
    """Everything `diagnose` measured; `to_json()` is the content of `diagnosis.json`.

    Metrics are fractions in [0, 1]. Fields that need ground truth (IoU, accuracy, Bias from
    Eq. 4) are None when the store has no labels. A class with no pixels and no predictions has
    NaN IoU and accuracy (null in JSON), is listed in `excluded_classes`, and has Bias -1/C.
    """

    classes: list[str]
    label_source: str
    num_pixels: int
    class_pixels: list[int] | None
    iou: list[float] | None
    acc: list[float] | None
    miou: float | None
    macc: float | None
    iou_std: float | None
    acc_std: float | None
    bias: list[float] | None
    bias_estimated: list[float]
    bias_rank_correlation: float | None
    groups: dict | None
    confusion: list[list[int]] | None
    js_positive: list[float]
    js_negative: list[float]
    excluded_classes: list[str]
    stores: list[str]
    clipped_logits: int
    # |Bias| at or below it: "balanced" (`explain.balanced_tolerance`), the third group.
    balanced_tolerance: float = 0.0
    # The classes mIoU / mAcc and their stds average over (`eval_classes`); None: all.
    eval_classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        content = asdict(self)
        content["producer"] = f"blda diagnose {__version__}"
        return json_ready(content)


def diagnose(
    stores: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    labels: str = "auto",
    workers: int = 1,
    grid: LogitGrid | None = None,
    plots_and_report: bool = True,
    progress: Callable[[int], None] | None = None,
    figures: FigureWorkers | None = None,
    eval_classes: str | Sequence[str] | None = "all",
) -> Diagnosis:
    """Diagnose class bias from logit stores and write the results to `out_dir`.

    `labels` chooses the rows of the logit-set matrix: "gt" (ground truth), "pseudo" (argmax of
    the logits) or "auto" (ground truth when the stores have it, else pseudo-labels). Metrics and
    Eq. 4 always use the ground truth when it exists. `workers` processes share the streaming.
    `progress(rows)` is called as rows are processed (the CLI draws a bar with it).
    `figures`: the processes that draw the figures, when the caller started them earlier (the
    CLI does, before importing torch); otherwise `figure_workers.DEFAULT_PROCESSES` are started
    here, before the statistics pass, so that their start-up hides behind it. `eval_classes`:
    the classes mIoU and mAcc average over, "all", "synthia16", "synthia13" or class names
    (`statistics.evaluation_classes`); per-class figures and the bias cover every class.
    """
    store, grid = LogitStore(stores), as_grid(grid)
    averaged = evaluation_classes(eval_classes, store.class_names)
    if figures is None:
        figures = FigureWorkers(figure_workers.DEFAULT_PROCESSES if plots_and_report else 0)
    # Stopped (at once on an error) before the output set is removed or moved into place, so
    # that no worker still writes into it; the caller's workers too.
    with output_set(out_dir, "diagnose", OUTPUT_FILES) as outputs, figures:
        return _diagnose(store, outputs.staging, labels, workers, grid, plots_and_report, progress,
                         named_dir=Path(out_dir), figures=figures, averaged=averaged)  # fmt: skip


def _diagnose(
    store, out_dir, labels, workers, grid, plots_and_report, progress, named_dir, figures,
    averaged,
) -> Diagnosis:  # fmt: skip
    """The work of `diagnose`, writing into `out_dir` (the staging folder of `named_dir`)."""
    ground_truth = _has_ground_truth(store, labels)
    source = resolve_label_source(labels, ground_truth, where=", ".join(map(str, store.paths)))
    notes = []
    if source == "pseudo":
        notes.append(
            "Rows of the logit-set matrix are pseudo-labels (argmax of the logits): "
            + ("as asked." if ground_truth else _no_ground_truth(store))
        )
    statistics = collect_statistics(
        store, labels=source, grid=grid, workers=workers, progress=progress
    )
    confusion = statistics.confusion if source == "gt" else None
    if source == "pseudo" and ground_truth:
        # Metrics and Eq. 4 still come from the ground truth: a second, cheap pass.
        confusion = _ground_truth_confusion(store, progress)
    diagnosis = _measure(store, statistics, confusion, source, notes, averaged)
    if plots_and_report:
        drawn = _draw_plots(figures, diagnosis, statistics, out_dir)
    statistics.save(out_dir / "statistics.h5")  # while the figures are drawn
    diagnosis.files["statistics"] = "statistics.h5"
    if plots_and_report:
        diagnosis.files.update({key: Path(f.result()).name for key, f in drawn.items()})
        diagnosis.files["report"] = "report.html"
        write_report(diagnosis, out_dir, named_dir=named_dir)
    diagnosis.files["diagnosis"] = "diagnosis.json"
    write_json(out_dir / "diagnosis.json", diagnosis.to_json())
    return diagnosis


def _has_ground_truth(store: LogitStore, labels: str) -> bool:
    """Whether the store has a labelled pixel; refuses --labels gt where every label is the
    ignore index (a store of unlabelled pixels, which pseudo-labels can still diagnose)."""
    if not store.has_labels or store.has_labelled_pixel():
        return store.has_labels
    if labels == "gt":
        raise BLDAError(
            f"{', '.join(map(str, store.paths))}: every label is the ignore index "
            f"{store.ignore_index}, so there is no ground truth for --labels gt; give --labels "
            "pseudo (or auto) for the diagnosis from the logits alone"
        )
    return False


def _no_ground_truth(store: LogitStore) -> str:
    if store.has_labels:
        return (
            f"every label of the store is the ignore index {store.ignore_index} (no ground "
            "truth: no metrics and no Eq. 4)."
        )
    return "the store has no ground-truth labels."


def diagnosis_passes(stores, labels: str = "auto") -> int:
    """Rows `diagnose` will stream in all (for a progress bar's total): twice the store's when
    pseudo-labels are asked for on labelled data (the ground-truth metrics take a second pass)."""
    store = LogitStore(stores)
    twice = labels == "pseudo" and store.has_labelled_pixel()  # False without labels
    return store.num_rows * (2 if twice else 1)


def _ground_truth_confusion(store: LogitStore, progress) -> np.ndarray:
    """The ground-truth confusion matrix (rows true class, columns argmax), ``(C, C)`` int64."""
    num_classes = store.num_classes
    confusion = np.zeros(num_classes * num_classes, dtype=np.int64)
    for chunk in store.iter_arrays(reuse_buffers=True, read_ahead=True):
        kept = chunk.labels != store.ignore_index
        pairs = chunk.labels[kept].astype(np.int64) * num_classes
        pairs += first_argmax(chunk.logits[kept])
        confusion += np.bincount(pairs, minlength=num_classes * num_classes)
        if progress is not None:
            progress(chunk.logits.shape[0])
    return confusion.reshape(num_classes, num_classes)


def _measure(store, statistics, confusion, source, notes, averaged=()) -> Diagnosis:
    names = list(store.class_names)
    bias_estimated = metrics.bias_from_histograms(statistics.histogram)  # Eq. 5
    js_positive, js_negative = metrics.anchor_divergences(statistics.histogram)  # Table 15
    clipped = int(statistics.clipped.sum())
    if clipped:
        notes.append(statistics.outside_grid_note())
    diagnosis = Diagnosis(
        classes=names,
        label_source=source,
        num_pixels=int(statistics.confusion.sum()),
        class_pixels=None,
        iou=None,
        acc=None,
        miou=None,
        macc=None,
        iou_std=None,
        acc_std=None,
        bias=None,
        bias_estimated=bias_estimated.tolist(),
        bias_rank_correlation=None,
        groups=None,
        confusion=None,
        js_positive=js_positive.tolist(),
        js_negative=js_negative.tolist(),
        excluded_classes=[],
        stores=[str(path) for path in store.paths],
        clipped_logits=clipped,
        balanced_tolerance=explain.balanced_tolerance(len(names)),
        notes=notes,
    )
    if confusion is None:
        notes.append("No ground truth: IoU, accuracy and Bias from Eq. 4 are not available.")
        if averaged:  # accepted, and nothing to apply it to
            notes.append(UNUSED_EVAL_CLASSES)
    else:
        _add_label_metrics(diagnosis, confusion, bias_estimated, averaged)
    return diagnosis


def _add_label_metrics(diagnosis: Diagnosis, confusion, bias_estimated, averaged) -> None:
    """The fields of `diagnosis` that need ground truth, from the `confusion` matrix; its
    means over the classes `averaged` (all when empty)."""
    names, notes = diagnosis.classes, diagnosis.notes
    scores = metrics.SegmentationMetrics.from_confusion(confusion, averaged)
    if averaged:
        diagnosis.eval_classes = [names[c] for c in averaged]
        notes.append(averaging_note(averaged, names))
    bias = metrics.bias_from_confusion(confusion)  # Eq. 4
    groups = metrics.prediction_groups(  # Table 18, with the balanced classes apart
        bias, scores.iou, scores.acc, tolerance=diagnosis.balanced_tolerance
    )
    diagnosis.num_pixels = int(confusion.sum())
    diagnosis.class_pixels = list(scores.class_pixels)
    diagnosis.iou, diagnosis.acc = list(scores.iou), list(scores.acc)
    diagnosis.miou, diagnosis.macc = scores.miou, scores.macc
    diagnosis.iou_std, diagnosis.acc_std = scores.iou_std, scores.acc_std
    diagnosis.bias = bias.tolist()
    diagnosis.confusion = confusion.tolist()
    diagnosis.bias_rank_correlation = metrics.spearman(bias, bias_estimated)
    diagnosis.groups = {
        name: {**asdict(group), "classes": [names[c] for c in group.classes]}
        for name, group in groups.items()
    }
    diagnosis.excluded_classes = [names[c] for c in scores.excluded]
    if scores.excluded:
        notes.append(
            "Classes with no pixels and no predictions have NaN IoU and accuracy, left out of "
            "every mean (mIoU, mAcc and the groups'); their Bias (Eq. 4) is -1/C, as for any "
            "class never predicted, so they are listed as under-predicted: "
            + ", ".join(diagnosis.excluded_classes)
        )


def _draw_plots(
    figures: FigureWorkers, diagnosis: Diagnosis, statistics: LogitSetStatistics, out_dir: Path
) -> dict:
    """The figures handed to `figures`, the slowest first: key -> `plots.workers.Figure`."""
    names = diagnosis.classes
    num_classes = len(names)
    width = statistics.grid.width
    diagonal = np.eye(num_classes, dtype=bool)
    with np.errstate(invalid="ignore"):  # an empty cell [l, l] is NaN, as `density()`
        positive = statistics.histogram[diagonal] / (statistics.count[diagonal][:, None] * width)
    # A class's negative set pools M_cl over c != l (Eq. 3), weighted by the cells' counts.
    negative = statistics.histogram.sum(0, dtype=np.float64) - statistics.histogram[diagonal]
    negative /= np.maximum(negative.sum(1, keepdims=True), 1) * width
    positive_anchor = statistics.positive_anchor_histogram().astype(np.float64)
    negative_anchor = statistics.negative_anchor_histogram().astype(np.float64)
    files = {}
    files["densities"] = figures.submit(
        "plot_logit_densities",
        names,
        statistics.grid.centers,
        positive,
        negative,
        positive_anchor / max(positive_anchor.sum(), 1) / width,
        negative_anchor / max(negative_anchor.sum(), 1) / width,
        path=out_dir / PLOT_FILES["densities"],
    )
    if diagnosis.bias is None:
        files["bias"] = figures.submit(
            "plot_bias",
            names,
            none_to_nan(diagnosis.bias_estimated),
            path=out_dir / PLOT_FILES["bias"],
        )
        return files
    files["confusion"] = figures.submit(
        "plot_confusion",
        names,
        np.array(diagnosis.confusion),
        path=out_dir / PLOT_FILES["confusion"],
    )
    files["bias"] = figures.submit(
        "plot_bias",
        names,
        none_to_nan(diagnosis.bias),
        none_to_nan(diagnosis.bias_estimated),
        path=out_dir / PLOT_FILES["bias"],
        rank_correlation=diagnosis.bias_rank_correlation,  # metrics.spearman, as scipy's
    )
    files["frequency"] = figures.submit(
        "plot_frequency_vs_accuracy",
        names,
        diagnosis.class_pixels,
        none_to_nan(diagnosis.acc),
        path=out_dir / PLOT_FILES["frequency"],
    )
    return files


def write_report(diagnosis: Diagnosis, out_dir: Path, *, named_dir: Path | None = None) -> Path:
    """The self-contained HTML report of a diagnosis (images embedded), written in `out_dir`;
    its next commands name `named_dir` (default `out_dir`): the folder the user gave, which
    `out_dir` is staged for."""
    report = Report("blda diagnosis")
    report.paragraph(
        f"{diagnosis.num_pixels:,} labelled pixels from {len(diagnosis.stores)} store(s): "
        + ", ".join(diagnosis.stores)
        + f". Rows of the logit-set matrix: {diagnosis.label_source}."
    )
    for note in diagnosis.notes:
        report.note(note, kind="warning" if "outside" in note else "info")
    if diagnosis.miou is not None:
        report.heading("Summary")
        report.table(
            ["mIoU", "mAcc", "IoU std", "Acc std", "Spearman(Eq. 4, Eq. 5)"],
            [
                [
                    diagnosis.miou,
                    diagnosis.macc,
                    diagnosis.iou_std,
                    diagnosis.acc_std,
                    diagnosis.bias_rank_correlation,
                ]
            ],
            number_format={
                "mIoU": ".1%",
                "mAcc": ".1%",
                "IoU std": ".1%",
                "Acc std": ".1%",
                "Spearman(Eq. 4, Eq. 5)": ".3f",
            },
        )
        columns = list(explain.SUMMARY_COLUMNS)[1:]
        report.definitions(explain.columns_explained(columns, explain.SUMMARY_COLUMNS))
    _what_next(report, diagnosis, out_dir if named_dir is None else named_dir)
    if diagnosis.groups is not None:
        _group_table(report, diagnosis)
    report.heading("Per class")
    columns, rows = class_table(diagnosis)
    report.table(columns, rows, number_format=CLASS_TABLE_FORMATS)
    report.definitions(explain.columns_explained(columns))
    captions = {
        "bias": "Bias per class (Eq. 4 bars; Eq. 5 estimate from logits as markers).",
        "densities": "Positive and negative logit densities per class against the global anchors.",
        "confusion": "Row-normalised confusion matrix.",
        "frequency": "Class frequency against accuracy.",
    }
    report.heading("Figures")
    for key, caption in captions.items():
        if key in diagnosis.files:
            report.image(out_dir / diagnosis.files[key], caption)
    return report.save(out_dir / "report.html")


def _group_table(report: Report, diagnosis: Diagnosis) -> None:
    """Table 18: the over- and under-predicted groups, and the balanced classes apart."""
    report.heading("Over- and under-predicted classes (Table 18)")
    report.paragraph(explain.tolerance_sentence(len(diagnosis.classes)))
    report.table(
        list(explain.GROUP_COLUMNS),
        [
            [
                name,
                ", ".join(group["classes"]),
                group["iou_mean"],
                group["iou_std"],
                group["acc_mean"],
                group["acc_std"],
            ]
            for name, group in diagnosis.groups.items()
        ],
        number_format=".1%",
    )
    report.definitions(
        explain.columns_explained(list(explain.GROUP_COLUMNS), explain.GROUP_COLUMNS)
    )


def _what_next(report: Report, diagnosis: Diagnosis, out_dir: Path) -> None:
    """The "what this means / what to try next" section, with the user's own paths."""
    report.heading("What this means, what to try next")
    if diagnosis.bias is not None:
        source, bias = "Eq. 4, from the ground truth", diagnosis.bias
    else:
        source, bias = "Eq. 5, estimated from the logits", diagnosis.bias_estimated
    findings = explain.bias_findings(diagnosis.classes, bias, diagnosis.balanced_tolerance, source)
    agreement = explain.rank_agreement(diagnosis.bias_rank_correlation)
    for sentence in [*findings, *([agreement] if agreement else [])]:
        report.paragraph(sentence)
    report.paragraph(
        "Post-hoc calibration (CDF alignment, Eq. 6-7) re-balances the predictions without "
        "retraining. Next, with these stores (the second form fits on the target's own "
        "unlabelled train split and chooses tau on a labelled store not used for reporting):"
    )
    for line in explain.after_diagnose(diagnosis.stores, out_dir, diagnosis.bias is not None):
        report.command(line)


CLASS_TABLE_FORMATS = {
    "pixels": ",d",
    "IoU": ".1%",
    "Acc": ".1%",
    "Bias (Eq. 4)": "+.4f",
    "Bias est. (Eq. 5)": "+.4f",
    "JS pos": ".3f",
    "JS neg": ".3f",
}


def class_table(diagnosis: Diagnosis) -> tuple[list[str], list[list]]:
    """Columns and rows of the per-class table shared by the report and the terminal."""
    columns = [
        "class",
        "pixels",
        "IoU",
        "Acc",
        "Bias (Eq. 4)",
        "Bias est. (Eq. 5)",
        "JS pos",
        "JS neg",
    ]
    count = len(diagnosis.classes)
    missing = [None] * count
    rows = [
        list(values)
        for values in zip(
            diagnosis.classes,
            diagnosis.class_pixels or missing,
            diagnosis.iou or missing,
            diagnosis.acc or missing,
            diagnosis.bias or missing,
            diagnosis.bias_estimated,
            diagnosis.js_positive,
            diagnosis.js_negative,
            strict=True,
        )
    ]
    return columns, rows
