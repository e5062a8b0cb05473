"""--eval-classes: mIoU and mAcc over a subset (SYNTHIA's 16 and 13 classes, or names), each
class's IoU from the whole confusion matrix, as DAFormer reports SYNTHIA -> Cityscapes.

Truths: the subsets typed in from the SYNTHIA protocol (no terrain, truck, train; then no
wall, fence, pole), and IoU / accuracy computed with numpy from the store's raw arrays."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from blda_tools.calibrate import CalibrateOptions, calibrate
from blda_tools.diagnose import diagnose
from blda_tools.errors import BLDAError
from blda_tools.statistics.evaluation_classes import evaluation_classes
from blda_tools.statistics.metrics import SegmentationMetrics

REPO = Path(__file__).resolve().parents[1]
STORES = REPO / "sample_data" / "stores"
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
              "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
              "truck", "bus", "train", "motorcycle", "bicycle"]  # fmt: skip
WITHOUT_16 = {"terrain", "truck", "train"}
WITHOUT_13 = WITHOUT_16 | {"wall", "fence", "pole"}


def test_the_named_subsets_and_class_lists():
    assert evaluation_classes("all", CITYSCAPES) == evaluation_classes(None, CITYSCAPES) == ()
    sixteen = evaluation_classes("synthia16", CITYSCAPES)
    assert [CITYSCAPES[c] for c in sixteen] == [n for n in CITYSCAPES if n not in WITHOUT_16]
    thirteen = evaluation_classes("synthia13", CITYSCAPES)
    assert [CITYSCAPES[c] for c in thirteen] == [n for n in CITYSCAPES if n not in WITHOUT_13]
    assert evaluation_classes("car, road", CITYSCAPES) == (0, 13)
    assert evaluation_classes(["bus"], CITYSCAPES) == (15,)
    # the keywords in any case and with spaces; every class named is all of them
    assert evaluation_classes(" ALL", CITYSCAPES) == ()
    assert evaluation_classes("Synthia16 ", CITYSCAPES) == sixteen
    assert evaluation_classes(",".join(CITYSCAPES), CITYSCAPES) == ()


@pytest.mark.parametrize(
    ("spec", "names", "message"),
    [
        ("synthia16", ["a", "b"], "the SYNTHIA subsets are of the 19 Cityscapes classes"),
        ("road,lorry", CITYSCAPES, "unknown class 'lorry'; expected all, synthia16"),
        (",", CITYSCAPES, "no class given"),
        ("road,road", CITYSCAPES, "a class is named twice"),
    ],
)
def test_bad_specs_are_named(spec, names, message):
    with pytest.raises(BLDAError, match=f"--eval-classes.*{message}"):
        evaluation_classes(spec, names)


def _numpy_scores(confusion: np.ndarray, classes) -> tuple[float, float]:
    true_positive = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)
    pixels = confusion.sum(1)
    acc = np.where(pixels > 0, true_positive / np.maximum(pixels, 1), np.nan)
    return float(np.nanmean(iou[list(classes)])), float(np.nanmean(acc[list(classes)]))


def test_the_means_run_over_the_subset_of_ious_from_the_whole_matrix():
    rng = np.random.default_rng(3)
    confusion = rng.integers(0, 50, (5, 5)) + np.diag(rng.integers(100, 400, 5))
    confusion[4] = 0  # a class without pixels: NaN accuracy, left out of the mean
    scores = SegmentationMetrics.from_confusion(confusion, (0, 2, 4))
    assert (scores.miou, scores.macc) == pytest.approx(_numpy_scores(confusion, (0, 2, 4)))
    whole = SegmentationMetrics.from_confusion(confusion)
    assert scores.iou == whole.iou  # per-class values do not change


@pytest.fixture(scope="module")
def store_confusion():
    with h5py.File(STORES / "target_val.h5", "r") as file:
        logits, labels = file["logits"][()].astype(np.float32), file["labels"][()].astype(int)
    kept = labels != 255
    pairs = labels[kept] * 19 + logits[kept].argmax(1)
    return np.bincount(pairs, minlength=19 * 19).reshape(19, 19)


@pytest.mark.skipif(not STORES.is_dir(), reason="needs sample_data/")
@pytest.mark.parametrize("subset", ["synthia16", "synthia13"])
def test_diagnose_and_the_calibrate_sweep_report_the_subset_means(
    tmp_path, store_confusion, subset
):
    classes = evaluation_classes(subset, CITYSCAPES)
    expected = _numpy_scores(store_confusion, classes)
    diagnosis = diagnose(STORES / "target_val.h5", tmp_path / "d", plots_and_report=False,
                         eval_classes=subset)  # fmt: skip
    assert (diagnosis.miou, diagnosis.macc) == pytest.approx(expected)
    assert diagnosis.eval_classes == [CITYSCAPES[c] for c in classes]
    options = CalibrateOptions(taus="0.5", eval_classes=subset, plots=False,
                               fit_on=STORES / "target_train.h5")  # fmt: skip
    result = calibrate(STORES / "target_val.h5", tmp_path / "c", options)
    with open(tmp_path / "c" / "sweep.csv", newline="") as handle:
        uncalibrated = next(r for r in csv.DictReader(handle) if float(r["tau"]) == 0.0)
    assert (float(uncalibrated["miou"]), float(uncalibrated["macc"])) == pytest.approx(expected)
    assert result.eval_classes == diagnosis.eval_classes


def test_eval_classes_on_stores_without_labels_are_noted(tmp_path):
    # accepted without a word, and nothing was averaged
    from blda_tools.statistics import LogitGrid
    from blda_tools.store import LogitWriter

    store = tmp_path / "unlabelled.h5"
    generator = np.random.default_rng(0)
    with LogitWriter(store, ["a", "b", "c"]) as writer:
        writer.add(generator.standard_normal((400, 3)).astype(np.float32), None, name="x")
    grid = LogitGrid(-10, 10, 100)
    diagnosis = diagnose(store, tmp_path / "d", plots_and_report=False, eval_classes=["a", "b"],
                         grid=grid)  # fmt: skip
    assert any(
        note.startswith("--eval-classes: the stores have no labelled pixel")
        for note in diagnosis.notes
    )
    options = CalibrateOptions(taus="0.5", eval_classes=["a", "b"], plots=False, grid=grid,
                               min_samples=20)  # fmt: skip
    result = calibrate(store, tmp_path / "c", options)
    assert any(
        note.startswith("--eval-classes: the stores have no labelled pixel")
        for note in result.notes
    )
