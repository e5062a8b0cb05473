"""The `blda demo` job: the whole pipeline on the shipped SynthCity sample, in a few minutes.

1. dump-logits: the shipped source-only `tiny` model (`sample_data/model/tiny_source.pth`) on
   the shipped images: SynthCity source, target train and target val -> `OUT/stores/*.h5`;
2. diagnose target val -> `OUT/diagnosis/` (bias table, Eq. 4 / Eq. 5, plots, report);
3. calibrate target val -> `OUT/calibration/`: class-wise distributions fitted with
   pseudo-labels on target train (no target label is used for fitting), anchors from the
   labelled source, tau chosen by `metric` on target train's ground truth (a labelled target
   split held out from val: val's labels are only used for the reported numbers);
4. `OUT/report.html` (the diagnosis, the before / after comparison and every figure, images
   embedded) and `OUT/demo.json` (the headline numbers).

Everything is written under `OUT`; the sample is only read.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from blda_tools import calibrate as calibrate_stage
from blda_tools import diagnose as diagnose_stage
from blda_tools.calibrate import CalibrateOptions, CalibrationResult, calibrate, calibration_passes
from blda_tools.diagnose import Diagnosis, diagnose
from blda_tools.errors import BLDAError, Interrupted, check_number
from blda_tools.fileio import (
    created_directories,
    partial_path,
    remove_empty_directories,
    write_json,
)
from blda_tools.inference.dump import PixelSampling, prepare_dump
from blda_tools.inference.predict import InferenceSettings
from blda_tools.outputs import check_set, claim_file, output_set, remove_sets, set_name
from blda_tools.report import explain
from blda_tools.report.html import Report, ordinal
from blda_tools.store import LogitStore

# The repository's sample_data/ (the Quickstart installs the checkout in editable mode).
DEFAULT_SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
CHECKPOINT = Path("model") / "tiny_source.pth"
# The files `demo` itself writes in OUT (its stages: stores/, diagnosis/, calibration/).
DEMO_FILES = ("report.html", "demo.json")
# store name -> (dataset, root under synthcity/, split)
SPLITS = {
    "source": ("gta5", "source", "all"),
    "target_train": ("cityscapes", "target", "train"),
    "target_val": ("cityscapes", "target", "val"),
}

# progress(description, total, unit) -> a context manager yielding advance(n); the CLI passes
# its rich `progress_bar`.
ProgressFactory = Callable[[str, int, str], AbstractContextManager[Callable[[int], None]]]


@dataclass(frozen=True)
class DemoSettings:
    """How much of the sample the demo uses. `quick()` is the reduced run CI uses."""

    stride: int = 2  # every stride-th pixel in both axes of the 128 x 256 maps
    max_images: int | None = None  # per split; None = all
    taus: str = "0:1:0.1"
    metric: str = "miou"  # what the held-out tau selection maximises

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(stride=4, max_images=8, taus="0:1:0.25")


@dataclass
class DemoResult:
    """What the demo produced: the diagnosis, the calibration and where everything is."""

    out_dir: Path
    stores: dict[str, Path]
    diagnosis: Diagnosis
    calibration: CalibrationResult
    settings: DemoSettings
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None

    def summary(self) -> dict:
        """The headline numbers on target val (the content of demo.json)."""
        calibration = self.calibration
        before, after = calibration.before, calibration.after
        return {
            "classes": calibration.classes,
            "evaluated_on": "target val",
            "before": _headline(before),
            "after": _headline(after),
            "chosen_tau": calibration.chosen_tau,
            "tau_selection": calibration.selection,
            # The prior-adjustment baseline at its own best tau, chosen the same way.
            "prior_baseline": None
            if calibration.prior_baseline is None
            else {
                "tau": calibration.prior_baseline["tau"],
                **_headline(calibration.prior_baseline),
            },
            "notes": calibration.notes,
            "iou_change": _differences(after["iou"], before["iou"]),
            "acc_change": _differences(after["acc"], before["acc"]),
            "bias": self.diagnosis.bias,
            "bias_estimated": self.diagnosis.bias_estimated,
            "bias_rank_correlation": self.diagnosis.bias_rank_correlation,
            "settings": asdict(self.settings),
            "stores": {name: str(path) for name, path in self.stores.items()},
            "seconds": self.seconds,
            "warnings": calibration.warnings,
        }


def run_demo(
    out_dir: str | os.PathLike,
    sample_dir: str | os.PathLike = DEFAULT_SAMPLE_DIR,
    *,
    settings: DemoSettings | None = None,
    threads: int | None = 1,
    progress: ProgressFactory | None = None,
) -> DemoResult:
    """Run dump-logits -> diagnose -> calibrate on the sample and write everything to `out_dir`.

    `threads` sets torch's CPU threads for the run (restored afterwards; None keeps torch's
    choice). One by default: the work is small, and on a machine whose cores are busy two
    threads ran the demo 6x slower than one. `progress` draws one bar per stage (see
    `ProgressFactory`).
    """
    settings = settings or DemoSettings()
    sample = _checked_sample_dir(sample_dir)
    out = _checked_out_dir(out_dir, sample)
    _check_stage_outputs(out)
    _check_sample_inputs(sample)
    progress = progress or _no_progress
    check_number(threads, "threads", integer=True, optional=True)
    if threads is not None and threads < 1:
        raise BLDAError(f"threads: expected None or an integer >= 1, got {threads!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started, created = False, created_directories(out)  # `out` stays if it was there before
    try:
        with output_set(out, "demo", DEMO_FILES) as outputs:
            started = True
            seconds: dict[str, float] = {}
            with _timed(seconds, "dump-logits"):
                stores = _dump_stores(sample, out / "stores", settings, progress)
            with _timed(seconds, "diagnose"):
                diagnosis = _diagnose(stores["target_val"], out / "diagnosis", progress)
            with _timed(seconds, "calibrate"):
                calibration = _calibrate(stores, out / "calibration", settings, progress)
            result = DemoResult(out, stores, diagnosis, calibration, settings, seconds)
            write_demo_report(result, outputs.staging / "report.html")
            write_json(outputs.staging / "demo.json", result.summary())
    except BaseException as error:
        if started:  # the stages' outputs would describe a run without a report
            _remove_demo_outputs(out)
        remove_empty_directories(created)
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(
                "demo interrupted: nothing is kept (its stores take seconds); run the same demo "
                "command again"
            ) from None
        raise
    finally:
        torch.set_num_threads(previous_threads)
    result.report = out / "report.html"
    return result


def _remove_demo_outputs(out: Path) -> None:
    """After a failed demo: every file the demo and its stages own in `out` (this run's and
    the earlier run's, which the stages had begun to replace), so nothing stale or partial is
    left; files the demo does not own stay."""
    stores = out / "stores"
    for name in SPLITS:
        partial_path(stores / f"{name}.h5").unlink(missing_ok=True)
    remove_sets(stores, [set_name("dump-logits", f"{name}.h5") for name in SPLITS])
    remove_sets(out / "diagnosis", ["diagnose"])
    remove_sets(out / "calibration", ["calibrate"])
    remove_sets(out, ["demo"], keep_directory=True)  # `run_demo` removes it if it made it


def _check_stage_outputs(out: Path) -> None:
    """Refuse files of other owners where any stage would write, before the first stage runs
    (each stage checks its own outputs only when it starts)."""
    for name in SPLITS:
        claim_file(out / "stores" / f"{name}.h5", "dump-logits")
    check_set(out / "diagnosis", "diagnose", diagnose_stage.OUTPUT_FILES)
    check_set(out / "calibration", "calibrate", calibrate_stage.OUTPUT_FILES)
    check_set(out, "demo", DEMO_FILES)


def _checked_sample_dir(sample_dir: str | os.PathLike) -> Path:
    sample = Path(sample_dir)
    needed = [sample / CHECKPOINT, sample / "synthcity" / "synthcity.json"]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise BLDAError(
            f"--sample-dir {sample}: not a blda sample (missing {', '.join(missing)}); expected "
            "the repository's sample_data/ or a directory built by scripts/make_sample_data.py"
        )
    return sample


def _check_sample_inputs(sample: Path) -> None:
    """What the stages read, before the first one begins: a failed demo removes the stages'
    outputs, the earlier run's included, so a checkpoint or dataset it cannot read must not
    get that far."""
    from blda_tools.datasets import build_dataset
    from blda_tools.models.checkpoints import read_checkpoint

    try:
        read_checkpoint(sample / CHECKPOINT)
        for dataset, root, split in SPLITS.values():
            build_dataset(dataset, sample / "synthcity" / root, split)
    except BLDAError as error:
        raise BLDAError(f"--sample-dir {sample}: {error}") from None


def _checked_out_dir(out_dir: str | os.PathLike, sample: Path) -> Path:
    out = Path(out_dir)
    resolved, sample_resolved = out.resolve(), sample.resolve()
    if resolved == sample_resolved or sample_resolved in resolved.parents:
        raise BLDAError(f"--out {out}: inside the sample directory {sample}; choose another one")
    return out


@contextlib.contextmanager
def _no_progress(description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    yield lambda count: None


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - started, 2)


def _dump_stores(
    sample: Path, store_dir: Path, settings: DemoSettings, progress: ProgressFactory
) -> dict[str, Path]:
    """The shipped model's logits on the three splits, whole images at native size."""
    stores = {}
    for name, (dataset, root, split) in SPLITS.items():
        path = store_dir / f"{name}.h5"
        # A rerun replaces the stores it wrote (`outputs`); an earlier demo killed during the
        # dump left an unfinished store that is not resumed.
        partial_path(path).unlink(missing_ok=True)
        job = prepare_dump(
            "tiny",
            sample / CHECKPOINT,
            dataset,
            sample / "synthcity" / root,
            split,
            path,
            inference=InferenceSettings(),  # not Cityscapes' 1024 x 2048 sliding windows
            sampling=PixelSampling(stride=settings.stride),
            max_images=settings.max_images,
            workers=0,  # small PNGs: decoding in this process is cheaper than worker processes
            device="cpu",
        )
        with progress(f"dump-logits {name}", job.total, "images") as advance:
            job.run(advance)
        stores[name] = path
    return stores


def _diagnose(store: Path, out: Path, progress: ProgressFactory) -> Diagnosis:
    with progress("diagnose target_val", LogitStore(store).num_rows, "px") as advance:
        return diagnose(store, out, labels="gt", progress=advance)


def _calibrate(
    stores: dict[str, Path], out: Path, settings: DemoSettings, progress: ProgressFactory
) -> CalibrationResult:
    options = CalibrateOptions(
        taus=settings.taus,
        fit_on=stores["target_train"],
        fit_labels="pseudo",  # Eq. 6 class distributions from pseudo-labels: no target label
        anchor_from=stores["source"],  # the global anchors from the labelled source
        select_on=stores["target_train"],  # tau chosen on a labelled split held out from val
        metric=settings.metric,
    )
    total = calibration_passes(stores["target_val"], options)
    with progress("calibrate (all passes)", total, "px") as advance:
        return calibrate(stores["target_val"], out, options, progress=advance)


def write_demo_report(result: DemoResult, path: Path | None = None) -> Path:
    """`OUT/report.html`: the diagnosis of target val, calibration before / after, all figures."""
    diagnosis, calibration = result.diagnosis, result.calibration
    report = Report("blda demo: a source-only model on SynthCity target val")
    report.paragraph(
        "The shipped tiny model was trained on the SynthCity source only. Its logits on target "
        f"val ({diagnosis.num_pixels:,} labelled pixels, every {_every(result.settings.stride)} "
        "in both axes) are diagnosed, then calibrated post hoc (Eq. 6-7): class distributions "
        "fitted with pseudo-labels on target train, anchors from the source, tau chosen on "
        f"target train's ground truth ({calibration.selection.get('metric')}), a split held "
        "out from val. Every number below is measured on target val."
    )
    for warning in calibration.warnings:
        report.note(warning, kind="warning")
    report.heading("Before and after calibration")
    rows = [["uncalibrated (tau = 0)", *_headline_row(calibration.before)]]
    rows.append(
        [f"BLDA post-hoc, tau = {calibration.chosen_tau:g}", *_headline_row(calibration.after)]
    )
    baseline = calibration.prior_baseline
    if baseline is not None:
        rows.append(
            [
                f"prior adjustment at its own best tau = {baseline['tau']:g}",
                *_headline_row(baseline),
            ]
        )
    columns = ["predictions", "mIoU", "mAcc", "IoU std", "Acc std"]
    report.table(columns, rows, number_format=".1%")
    report.definitions(explain.columns_explained(columns, explain.SUMMARY_COLUMNS))
    report.paragraph(
        "Both taus are chosen the same way, on target train; the prior-adjustment baseline "
        "(f - tau log p(c), Appendix A) is the simpler alternative BLDA should beat."
    )
    for note in calibration.notes:
        report.note(note)
    report.paragraph(
        "Spearman rank correlation between the Bias estimated from logits alone (Eq. 5) and "
        f"the Bias from the confusion matrix (Eq. 4): {diagnosis.bias_rank_correlation:.3f}."
    )
    report.heading("Per class")
    columns, rows = _class_rows(result)
    report.table(columns, rows, number_format=CLASS_COLUMN_FORMATS, signed_columns=["dIoU", "dAcc"])
    report.definitions(explain.columns_explained(columns, explain.CHANGE_COLUMNS))
    _what_next(report, result)
    report.heading("Figures")
    for directory, files in (("diagnosis", diagnosis.files), ("calibration", calibration.files)):
        for key, name in files.items():
            if name.endswith(".png"):
                caption = FIGURE_CAPTIONS.get(key, key)
                report.image(result.out_dir / directory / name, f"{caption} ({directory}/{name})")
    report.paragraph(
        "Details: diagnosis/report.html, diagnosis/diagnosis.json, calibration/calibration.json, "
        "calibration/sweep.csv (every tau, BLDA and prior adjustment), demo.json."
    )
    return report.save(path if path is not None else result.out_dir / "report.html")


def _every(stride: int) -> str:
    return "pixel" if stride == 1 else f"{ordinal(stride)} pixel"


def _what_next(report: Report, result: DemoResult) -> None:
    """What the demo shows and the commands that do the same on the user's own model."""
    diagnosis = result.diagnosis
    report.heading("What this means, what to try next")
    findings = explain.bias_findings(
        diagnosis.classes, diagnosis.bias, diagnosis.balanced_tolerance, "Eq. 4, target val"
    )
    agreement = explain.rank_agreement(diagnosis.bias_rank_correlation)
    for sentence in [*findings, *([agreement] if agreement else [])]:
        report.paragraph(sentence)
    report.paragraph(explain.tolerance_sentence(len(diagnosis.classes)))
    report.paragraph("Apply this calibration to the val store, or export it as TorchScript:")
    stores = [str(result.stores["target_val"])]
    for line in explain.after_calibrate(stores, result.out_dir / "calibration"):
        report.command(line)


FIGURE_CAPTIONS = {
    "bias": "Bias per class (Eq. 4 bars; Eq. 5 estimate from logits as markers)",
    "densities": "Positive and negative logit densities per class against the global anchors",
    "confusion": "Row-normalised confusion matrix, before calibration",
    "frequency": "Class frequency against accuracy",
    "tau_sweep": "mIoU and mAcc on target val against tau, BLDA and prior adjustment (Fig. 5)",
    "per_class_iou": "Per-class IoU before and after calibration at the chosen tau",
    "per_class_acc": "Per-class accuracy before and after calibration at the chosen tau",
    "gmm_fits": "Fitted mixtures over the target-train histograms of the least aligned classes",
}

CLASS_COLUMN_FORMATS = {
    "pixels": ",d",
    "IoU": ".1%",
    "IoU after": ".1%",
    "dIoU": "+.1%",
    "Acc": ".1%",
    "Acc after": ".1%",
    "dAcc": "+.1%",
    "Bias (Eq. 4)": "+.4f",
    "Bias est. (Eq. 5)": "+.4f",
}


def _class_rows(result: DemoResult) -> tuple[list[str], list[list]]:
    """Per-class columns: pixels, IoU and accuracy before / after, Bias by Eq. 4 and Eq. 5."""
    diagnosis, calibration = result.diagnosis, result.calibration
    before, after = calibration.before, calibration.after
    columns = list(CLASS_COLUMN_FORMATS)
    values = zip(
        diagnosis.classes,
        diagnosis.class_pixels,
        before["iou"],
        after["iou"],
        _differences(after["iou"], before["iou"]),
        before["acc"],
        after["acc"],
        _differences(after["acc"], before["acc"]),
        diagnosis.bias,
        diagnosis.bias_estimated,
        strict=True,
    )
    return ["class", *columns], [list(row) for row in values]


def _headline_row(metrics: dict | None) -> list:
    if metrics is None:
        return [None] * 4
    return [metrics[key] for key in ("miou", "macc", "iou_std", "acc_std")]


def _headline(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {key: metrics[key] for key in ("miou", "macc", "iou_std", "acc_std")}


def _differences(after: list[float], before: list[float]) -> list[float]:
    return (
        torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    ).tolist()
