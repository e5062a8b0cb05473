"""`blda calibrate` / `blda export` end to end: outputs, honest tau selection and its warnings,
--apply against the exported TorchScript module (run without blda), and clear errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from blda_cli.calibrate import calibrate_command, export_command
from blda_cli.main import _Group
from blda_tools.calibrate import CalibrateOptions, calibrate
from blda_tools.calibration.apply import apply_calibrator
from blda_tools.calibration.calibrator import Calibrator
from blda_tools.diagnose import diagnose
from blda_tools.errors import BLDAError
from blda_tools.statistics import LogitGrid, LogitSetStatistics
from blda_tools.store import LogitStore, LogitWriter

NAMES = ["road", "car", "bike"]
GRID = "-20:20:400"


def _write_store(path: Path, seed: int, names=NAMES, images=3, size=24, stride=1, labels=True):
    """Maps of Gaussian class-conditional logits with class 0 favoured (over-predicted)."""
    generator = torch.Generator().manual_seed(seed)
    with LogitWriter(path, names) as writer:
        for index in range(images):
            label = torch.randint(0, len(names), (size, size), generator=generator)
            label[0, :3] = 255
            logits = torch.randn(len(names), size, size, generator=generator)
            logits += 2.0 * torch.nn.functional.one_hot(label.clamp(max=2), len(names)).permute(
                2, 0, 1
            )
            logits[0] += 1.0
            writer.add(logits, label if labels else None, name=f"city/image{index}", stride=stride)
    return path


def _cli():
    return _Group(name="blda", commands=[calibrate_command, export_command])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    return {
        "eval": _write_store(folder / "eval.h5", 1),
        "select": _write_store(folder / "select.h5", 2),
        "other": _write_store(folder / "other.h5", 3, names=["road", "car", "bus"]),
    }


def test_calibrate_with_held_out_selection_writes_every_output(stores, tmp_path):
    out = tmp_path / "out"
    arguments = ["calibrate", str(stores["eval"]), "--out", str(out), "--tau", "0:1:0.5"]
    arguments += ["--select-on", str(stores["select"]), "--components", "2"]
    arguments += ["--min-samples", "20", "--grid", GRID, "--metric", "macc"]
    result = CliRunner().invoke(_cli(), arguments)
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output  # held-out selection, pseudo-label fit: honest
    # the last line names every file written (it named calibration.json and calibrator.pt only)
    written = sorted(p.name for p in out.iterdir() if p.name != ".blda-outputs.json")
    assert f"wrote {', '.join(written)} in {out}" in " ".join(result.output.split())
    report = json.loads((out / "calibration.json").read_text())
    assert report["selection"]["how"].startswith("held-out")
    assert report["selection"]["selection_stores"] == [str(stores["select"])]
    for name in (
        "sweep.csv",
        "calibrator.pt",
        "tau_sweep.png",
        "per_class_iou.png",
        "gmm_fits.png",
    ):
        assert (out / name).is_file(), name
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected_columns = ["tau", "method", "miou", "macc", "iou_std", "acc_std"]
    expected_columns += [f"iou_{n}" for n in NAMES] + [f"acc_{n}" for n in NAMES]
    assert list(rows[0]) == expected_columns
    assert {(r["method"], float(r["tau"])) for r in rows} == {
        (m, t) for m in ("blda", "prior") for t in (0.0, 0.5, 1.0)
    }
    # tau = 0 is the uncalibrated model: its metrics from the stored arrays with numpy.
    with h5py.File(stores["eval"], "r") as file:
        logits, labels = file["logits"][()].astype(np.float32), file["labels"][()]
    kept = labels != 255
    confusion = np.zeros((3, 3), dtype=np.int64)
    np.add.at(confusion, (labels[kept], logits[kept].argmax(1)), 1)
    recall = np.diag(confusion) / confusion.sum(1)
    plain = next(r for r in rows if r["method"] == "blda" and float(r["tau"]) == 0.0)
    assert float(plain["macc"]) == pytest.approx(recall.mean(), abs=1e-12)
    chosen = next(
        r for r in rows if r["method"] == "blda" and float(r["tau"]) == report["chosen_tau"]
    )
    assert report["after"]["macc"] == pytest.approx(float(chosen["macc"]))
    assert len(report["js"]["positive_before"]) == 3 and len(report["js"]["negative_after"]) == 3


def test_selecting_on_the_evaluated_stores_and_fitting_on_their_labels_warn_loudly(
    stores, tmp_path
):
    options = CalibrateOptions(
        taus="0,1",
        fit_labels="gt",
        n_components=2,
        min_samples=20,
        grid=LogitGrid(-20, 20, 400),
        plots=False,
    )
    result = calibrate(stores["eval"], tmp_path, options)
    text = " ".join(result.warnings)
    assert "FITTING USES THE GROUND TRUTH OF THE EVALUATED PIXELS" in text
    assert "SELECTED ON THE EVALUATED STORES THEMSELVES" in text
    assert result.selection["how"] == "evaluated stores (optimistic)"
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["warnings"] == result.warnings
    # --select-on the evaluated store itself: warned, and not called held out
    again = dataclasses.replace(options, select_on=[stores["eval"]], fit_labels="pseudo")
    result = calibrate(stores["eval"], tmp_path / "again", again)
    assert "SELECTED ON STORES THAT ARE ALSO EVALUATED" in " ".join(result.warnings)
    assert result.selection["how"] == "--select-on stores, also evaluated (optimistic)"


def test_apply_matches_the_exported_module_run_without_blda(stores, tmp_path):
    fit = tmp_path / "fit"
    options = CalibrateOptions(
        taus="0.8", n_components=2, min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False
    )
    calibrate(stores["select"], fit, options)
    strided = _write_store(tmp_path / "strided.h5", 5, images=2, size=25, stride=2)
    result = CliRunner().invoke(
        _cli(),
        [
            "calibrate",
            str(strided),
            "--apply",
            str(fit / "calibrator.pt"),
            "--out",
            str(tmp_path / "pred"),
        ],
    )
    assert result.exit_code == 0, result.output
    png = np.array(Image.open(tmp_path / "pred" / "trainIds" / "city" / "image1.png"))
    assert png.shape == (25, 25)  # stride-2 map brought back to the full label size
    assert (tmp_path / "pred" / "color" / "city" / "image1.png").is_file()

    result = CliRunner().invoke(
        _cli(), ["export", str(fit / "calibrator.pt"), "--out", str(tmp_path / "module.pt")]
    )
    assert result.exit_code == 0, result.output
    with h5py.File(strided, "r") as file:  # image 1: rows 169..337 of a 13 x 13 raster
        raster = file["logits"][169:338].astype(np.float32).reshape(13, 13, 3)
    torch.save(torch.from_numpy(raster).permute(2, 0, 1)[None].contiguous(), tmp_path / "x.pt")
    script = (
        "import sys; sys.modules['blda_tools'] = None; sys.modules['blda_cli'] = None\n"
        "import torch\n"
        f"module = torch.jit.load({str(tmp_path / 'module.pt')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "scores = module(x)\n"
        "assert scores.shape == x.shape and bool((scores <= 0).all())\n"
        f"torch.save(scores.argmax(1)[0], {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    exported = torch.load(tmp_path / "y.pt", weights_only=True).numpy()
    upsampled = exported.repeat(2, 0).repeat(2, 1)[:25, :25]
    assert np.array_equal(png, upsampled)


def test_statistics_of_the_evaluated_stores_warn_from_any_working_folder(
    stores, tmp_path, monkeypatch
):
    """The statistics file names its stores; calibrate, run from another folder, still sees
    that they are the evaluated ones."""
    shutil.copy(stores["eval"], tmp_path / "eval.h5")
    monkeypatch.chdir(tmp_path)
    diagnose(["eval.h5"], "diagnosis", grid=LogitGrid(-20, 20, 400), plots_and_report=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    options = CalibrateOptions(
        taus="0,1", fit_on=["../diagnosis/statistics.h5"], fit_labels="gt", n_components=2,
        min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False, select_on=[stores["select"]],
    )  # fmt: skip
    result = calibrate("../eval.h5", "out", options)
    assert "FITTING USES THE GROUND TRUTH OF THE EVALUATED PIXELS" in " ".join(result.warnings)


@pytest.mark.parametrize(
    ("options", "message"),
    [  # the library refuses what the CLI does, before any pass
        (dict(metric="macc", taus=[0.2]), r"--metric macc and --tau \[0.2\]: one tau leaves"),
        (dict(metric="iou"), "--metric: expected one of miou, macc, got 'iou'"),
    ],
)
def test_a_metric_with_nothing_to_choose_or_unknown_is_refused(stores, tmp_path, options, message):
    from blda_tools.calibration.inputs import open_inputs

    with pytest.raises(BLDAError, match=message):
        open_inputs(stores["eval"], CalibrateOptions(**options))


def test_apply_with_a_tau_of_its_own_predicts_at_that_tau(stores, tmp_path):
    # --apply --tau 0.3 was refused ("expected a number, got '0.3'") for every value.
    options = CalibrateOptions(
        taus="0.8", n_components=2, min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False
    )
    calibrate(stores["select"], tmp_path / "fit", options)
    calibrator = Calibrator.load(tmp_path / "fit" / "calibrator.pt")
    arguments = [
        "calibrate",
        str(stores["eval"]),
        "--apply",
        str(tmp_path / "fit" / "calibrator.pt"),
    ]
    result = CliRunner().invoke(_cli(), [*arguments, "--tau", "0.3", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "tau = 0.3:" in result.output
    with h5py.File(stores["eval"], "r") as file:  # image 0: the first 24 x 24 rows
        logits = torch.from_numpy(file["logits"][: 24 * 24].astype(np.float32))
    png = np.array(Image.open(tmp_path / "p" / "trainIds" / "city" / "image0.png"))
    np.testing.assert_array_equal(png.reshape(-1), calibrator.predict(logits, 0.3).numpy())
    result = CliRunner().invoke(
        _cli(), [*arguments, "--tau", "0.3,0.4", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 2 and "applying takes one tau, got 2" in result.output


def test_apply_to_sampled_rows_writes_a_prediction_store(stores, tmp_path):
    calibrate(
        stores["select"],
        tmp_path,
        CalibrateOptions(
            taus="1",
            estimator="empirical",
            min_samples=20,
            grid=LogitGrid(-20, 20, 400),
            plots=False,
        ),
    )
    samples = tmp_path / "samples.h5"
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(50, 3, generator=generator) * 3
    with LogitWriter(samples, NAMES) as writer:
        writer.add(logits, torch.randint(0, 3, (50,), generator=generator), name="patch")
    result = apply_calibrator(tmp_path / "calibrator.pt", samples, tmp_path / "pred")
    with h5py.File(result.prediction_store, "r") as file:
        assert file.attrs["format"] == "blda-predictions"
        prediction = file["prediction"][()]
        assert list(file["images/count"][()]) == [50]
    expected = Calibrator.load(tmp_path / "calibrator.pt").predict(logits).numpy()
    assert np.array_equal(prediction, expected)


def test_bad_input_gives_clear_errors_and_exit_status_2(stores, tmp_path):
    calibrate(
        stores["select"],
        tmp_path / "fit",
        CalibrateOptions(
            taus="1",
            estimator="empirical",
            min_samples=20,
            grid=LogitGrid(-20, 20, 400),
            plots=False,
        ),
    )
    runner = CliRunner()
    cases = [
        (
            [
                "calibrate",
                str(stores["other"]),
                "--apply",
                str(tmp_path / "fit" / "calibrator.pt"),
                "--out",
                str(tmp_path / "x"),
            ],
            "class names differ: only in the calibrator: bike; only in the stores: bus",
        ),
        (
            ["calibrate", str(stores["eval"]), "--out", str(tmp_path / "y"), "--tau", "0:1:0"],
            "--tau: step must be > 0",
        ),
        (
            ["calibrate", str(stores["eval"]), "--out", str(tmp_path / "y"), "--tau", "-1"],
            "--tau: expected a finite tau >= 0",
        ),
        (  # beyond float32: a traceback after the fit's passes
            ["calibrate", str(stores["eval"]), "--out", str(tmp_path / "y"), "--tau", "1e39"],
            "--tau: expected a tau of at most 10000",
        ),
        (
            [
                "calibrate",
                str(stores["eval"]),
                "--out",
                str(tmp_path / "y"),
                "--anchor",
                "class:bus",
                "--grid",
                GRID,
            ],
            "unknown class 'bus'",
        ),
        (
            [
                "calibrate",
                str(stores["eval"]),
                "--out",
                str(tmp_path / "y"),
                "--fit-on",
                str(stores["other"]),
            ],
            "--fit-on",
        ),
    ]
    for arguments, message in cases:
        result = runner.invoke(_cli(), arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert message in result.output, (message, result.output)
        assert "Traceback" not in result.output
    unlabelled = _write_store(tmp_path / "unlabelled.h5", 4, labels=False)
    with pytest.raises(BLDAError, match="--select-on"):
        calibrate(
            unlabelled,
            tmp_path / "z",
            CalibrateOptions(
                taus="0,1", estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400)
            ),
        )


@pytest.mark.parametrize(
    ("names", "clash"),
    [
        (["x/y", "x//y"], "'x/y' and 'x//y' (#0 and #1): both would be written as x/y.png"),
        (["x/y", "x/./y"], "'x/y' and 'x/./y' (#0 and #1): both would be written as x/y.png"),
        (["", "image000000"], "'' and 'image000000' (#0 and #1): both would be written as"),
    ],
)
def test_apply_refuses_images_that_would_write_the_same_png(stores, tmp_path, names, clash):
    options = CalibrateOptions(
        taus="0.5", estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False
    )
    calibrate(stores["select"], tmp_path / "fit", options)
    with LogitWriter(tmp_path / "clash.h5", NAMES) as writer:
        for name in names:  # distinct names to the store
            writer.add(torch.randn(len(NAMES), 4, 4), name=name)
    with pytest.raises(BLDAError, match=re.escape(clash)):
        apply_calibrator(tmp_path / "fit" / "calibrator.pt", tmp_path / "clash.h5", tmp_path / "p")
    assert not (tmp_path / "p").exists()
    # distinct files are written under their names, spelled as paths
    with LogitWriter(tmp_path / "fine.h5", NAMES) as writer:
        for name in ("a//b", "c/./d", ""):
            writer.add(torch.randn(len(NAMES), 4, 4), name=name)
    apply_calibrator(tmp_path / "fit" / "calibrator.pt", tmp_path / "fine.h5", tmp_path / "q")
    written = sorted(
        path.relative_to(tmp_path / "q").as_posix() for path in (tmp_path / "q").rglob("*.png")
    )
    assert written == [f"{folder}/{name}.png" for folder in ("color", "trainIds")
                       for name in ("a/b", "c/d", "image000002")]  # fmt: skip


def test_calibrate_notes_logits_outside_the_grid_and_a_calibrator_with_no_offset(stores, tmp_path):
    narrow = LogitGrid(-1, 1, 100)  # the stores' Gaussian logits reach +-4
    options = CalibrateOptions(taus="0,1", n_components=2, min_samples=20, grid=narrow, plots=False)
    result = calibrate(stores["eval"], tmp_path / "narrow", options)
    with LogitStore(stores["eval"]) as store:
        outside = sum(
            int(((part.logits < -1) | (part.logits > 1)).sum()) for part in store.iter_arrays()
        )
    assert f"fitting data: {outside:,} logits fell outside the histogram grid [-1, 1]" in " ".join(
        result.notes
    )
    # diagnose's rows are the labelled pixels (ground truth), calibrate's fit every pixel
    with LogitStore(stores["eval"]) as store:
        labelled = sum(
            int(((part.logits < -1) | (part.logits > 1))[part.labels != 255].sum())
            for part in store.iter_arrays()
        )
    diagnosis = diagnose(stores["eval"], tmp_path / "d", grid=narrow, plots_and_report=False)
    assert f"{labelled:,} logits fell outside the histogram grid [-1, 1]" in " ".join(
        diagnosis.notes
    )
    options = CalibrateOptions(taus="0,1", n_components=2, min_samples=10**9, plots=False)
    result = calibrate(stores["eval"], tmp_path / "none", options)
    notes = " ".join(result.notes)
    assert "No cell of the logit-set matrix has --min-samples logits" in notes
    assert "Try another --anchor" not in notes


def test_fitting_on_ground_truth_that_is_all_ignored_names_the_store(tmp_path):
    from blda_tools.calibration.inputs import open_inputs
    from blda_tools.store import LogitWriter

    generator = np.random.default_rng(4)
    paths = {}
    for name, labels in (
        ("labelled", generator.integers(0, 3, 500)),
        ("ignored", np.full(500, 255)),
    ):
        paths[name] = tmp_path / f"{name}.h5"
        with LogitWriter(paths[name], ["a", "b", "c"]) as writer:
            writer.add(generator.standard_normal((500, 3)).astype(np.float32), labels, name="x")
    options = CalibrateOptions(fit_on=paths["ignored"], fit_labels="gt")
    with pytest.raises(
        BLDAError,
        match=r"--fit-on .*ignored.h5: --fit-labels gt, but every label is the ignore index 255",
    ):
        open_inputs(paths["labelled"], options)
    with pytest.raises(BLDAError, match=r"STORES have no labelled pixel \(all ignored\)"):
        open_inputs(paths["ignored"], CalibrateOptions(fit_labels="pseudo"))
    # One tau: no metrics to report, so no sweep.csv and no comparison note (it compared NaN
    # with NaN); the divergences use the argmax, as for a store without labels.
    options = CalibrateOptions(taus="0.2", min_samples=20, grid=LogitGrid(-20, 20, 400),
                               fit_labels="pseudo", plots=False)  # fmt: skip
    result = calibrate(paths["ignored"], tmp_path / "out", options)
    assert sorted(result.files) == ["calibration", "calibrator"]
    assert not (tmp_path / "out" / "sweep.csv").exists()
    assert not any("nan" in note for note in result.notes), result.notes
    assert result.js["rows"] == "pseudo-labels (uncalibrated argmax)"
    assert all(math.isfinite(value) for value in result.js["positive_before"])


def test_each_store_is_scored_with_its_own_ignore_index(stores, tmp_path):
    # The sweep took the calibrator's ignore index (255, of the fit-on store): a held-out store
    # marking ignored pixels with 7 failed part-way with "labels: values outside [0, 3)".
    from sklearn.metrics import confusion_matrix

    from blda_tools.calibration.sweep import sweep_stores

    generator = np.random.default_rng(5)
    labels = generator.integers(0, 3, 600)
    labels[:150] = 7
    logits = generator.standard_normal((600, 3)).astype(np.float32)
    held_out = tmp_path / "held_out.h5"
    with LogitWriter(held_out, NAMES, ignore_index=7) as writer:
        writer.add(logits, labels, name="x")
    options = CalibrateOptions(taus="0,1", select_on=held_out, min_samples=20,
                               grid=LogitGrid(-20, 20, 400), plots=False)  # fmt: skip
    calibrate(stores["eval"], tmp_path / "out", options)
    selection = json.loads((tmp_path / "out" / "calibration.json").read_text())["selection"]
    assert selection["how"] == "held-out stores (--select-on)"
    calibrator = Calibrator.load(tmp_path / "out" / "calibrator.pt")
    assert calibrator.ignore_index == 255
    with LogitStore(held_out) as store:
        sweep = sweep_stores(calibrator, store, [1.0])
    # at tau 0 the sweep counts the uncalibrated argmax of the 450 pixels not marked 7
    kept = labels != 7
    expected = confusion_matrix(labels[kept], logits[kept].argmax(1), labels=[0, 1, 2])
    assert sweep.confusion["blda"][0].view(3, 3).tolist() == expected.tolist()


def test_apply_beyond_255_classes_writes_a_prediction_store(tmp_path):
    # An 8-bit train-id PNG cannot hold class 280: the run failed at its first PNG, after the
    # work (helper's probe with a 300-class store).
    names = [f"class{c}" for c in range(300)]
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 8, 8, generator=generator)
    logits[280, :4] += 10.0
    store = tmp_path / "wide.h5"
    with LogitWriter(store, names, ignore_index=-1) as writer:
        writer.add(logits, logits.argmax(0), name="city/wide")
    statistics = LogitSetStatistics(300, LogitGrid(-20, 20, 20), -1, class_names=names)
    rows = logits.permute(1, 2, 0).reshape(-1, 300)
    statistics.update(rows, rows.argmax(1))
    Calibrator("empirical", min_samples=1, table_points=16).fit(statistics).save(tmp_path / "c.pt")
    result = apply_calibrator(tmp_path / "c.pt", store, tmp_path / "pred")
    assert result.files == ["predictions.h5"]
    with h5py.File(result.prediction_store, "r") as file:
        prediction = file["prediction"][()]
    expected = Calibrator.load(tmp_path / "c.pt").predict(rows).numpy()
    assert np.array_equal(prediction, expected) and (expected == 280).any()
    assert not (tmp_path / "pred" / "trainIds").exists()
