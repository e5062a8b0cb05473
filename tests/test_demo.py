"""`blda demo --quick` run in-process on the shipped sample, and its bad-input errors.

Truths: the reported uncalibrated metrics and Eq. 4 bias recomputed with numpy from the raw
HDF5 arrays of the store the demo wrote; the rank correlation recomputed with scipy; the
sample directory's files compared before and after the run.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import spearmanr

from blda_cli.demo import demo_command
from blda_tools.calibration.sweep import parse_tau_spec
from blda_tools.demo import DEFAULT_SAMPLE_DIR, DemoSettings, run_demo
from blda_tools.errors import BLDAError

NUM_CLASSES = 19
IGNORE = 255


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo through the CLI; yields (output directory, CLI result, sample before)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    before = snapshot(DEFAULT_SAMPLE_DIR)
    result = CliRunner().invoke(demo_command, ["--out", str(out), "--quick", "--threads", "1"])
    return out, result, before


def numpy_confusion(store: Path) -> np.ndarray:
    with h5py.File(store, "r") as file:
        logits, labels = file["logits"][()].astype(np.float32), file["labels"][()].astype(int)
    kept = labels != IGNORE
    pairs = labels[kept] * NUM_CLASSES + logits[kept].argmax(1)
    return np.bincount(pairs, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def test_demo_completes_and_prints_the_results(demo_run):
    _, result, _ = demo_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    for text in ("sidewalk", "before: mIoU", "after (tau", "Spearman(Eq. 4, Eq. 5)"):
        assert text in result.output


def test_demo_writes_everything_under_out_and_nothing_in_the_sample(demo_run):
    out, _, sample_before = demo_run
    for relative in ("report.html", "demo.json", "diagnosis/report.html",
                     "diagnosis/diagnosis.json", "calibration/calibration.json",
                     "calibration/sweep.csv", "stores/source.h5", "stores/target_train.h5",
                     "stores/target_val.h5"):  # fmt: skip
        assert (out / relative).is_file(), relative
    page = (out / "report.html").read_text()
    assert "Before and after calibration" in page and "data:image/png;base64," in page
    assert snapshot(DEFAULT_SAMPLE_DIR) == sample_before


def test_reported_uncalibrated_metrics_match_numpy(demo_run):
    out, _, _ = demo_run
    summary = json.loads((out / "demo.json").read_text())
    confusion = numpy_confusion(out / "stores" / "target_val.h5")
    true_positive = np.diag(confusion).astype(float)
    pixels, predicted = confusion.sum(1), confusion.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(
            pixels + predicted > 0, true_positive / (pixels + predicted - true_positive), np.nan
        )
        acc = np.where(pixels > 0, true_positive / pixels, np.nan)
    assert summary["before"]["miou"] == pytest.approx(np.nanmean(iou), abs=1e-9)
    assert summary["before"]["macc"] == pytest.approx(np.nanmean(acc), abs=1e-9)
    assert summary["before"]["iou_std"] == pytest.approx(np.nanstd(iou), abs=1e-9)
    present = pixels > 0
    bias = (confusion[present] / pixels[present, None]).mean(0) - 1 / NUM_CLASSES  # Eq. 4
    np.testing.assert_allclose(summary["bias"], bias, atol=1e-9)
    pairs = [
        (b, e)
        for b, e in zip(summary["bias"], summary["bias_estimated"], strict=True)
        if e is not None
    ]  # a class absent from val has no Eq. 5 estimate
    expected_rho = spearmanr(*zip(*pairs, strict=True)).statistic
    assert summary["bias_rank_correlation"] == pytest.approx(expected_rho, abs=1e-9)


def test_tau_is_chosen_on_target_train_not_on_val(demo_run):
    out, _, _ = demo_run
    summary = json.loads((out / "demo.json").read_text())
    selection = summary["tau_selection"]
    assert [Path(p).name for p in selection["selection_stores"]] == ["target_train.h5"]
    assert summary["chosen_tau"] in parse_tau_spec(DemoSettings.quick().taus)
    assert summary["warnings"] == []  # no overlap between fitting, selection and evaluation
    calibration = json.loads((out / "calibration" / "calibration.json").read_text())
    assert calibration["fit"]["fit_labels"] == "pseudo"
    assert [Path(p).name for p in calibration["fit"]["fit_on"]] == ["target_train.h5"]
    assert [Path(p).name for p in calibration["fit"]["anchor_from"]] == ["source.h5"]


def test_quick_run_reads_eight_images_per_split_at_stride_4(demo_run):
    out, _, _ = demo_run
    for name in ("source", "target_train", "target_val"):
        with h5py.File(out / "stores" / f"{name}.h5", "r") as file:
            assert file["images"]["stride"][()].tolist() == [4] * 8


def test_out_inside_the_sample_is_refused(tmp_path):
    with pytest.raises(BLDAError, match="--out .*inside the sample directory"):
        run_demo(DEFAULT_SAMPLE_DIR / "demo_out", settings=DemoSettings.quick())


def test_a_directory_without_a_sample_is_refused(tmp_path):
    with pytest.raises(BLDAError, match="--sample-dir .*tiny_source.pth"):
        run_demo(tmp_path / "out", sample_dir=tmp_path)


def test_demo_report_compares_the_prior_baseline_at_its_own_tau_and_says_what_next(demo_run):
    out, _, _ = demo_run
    page = html.unescape((out / "report.html").read_text())
    summary = json.loads((out / "demo.json").read_text())
    baseline = summary["prior_baseline"]
    # Its tau is the prior's own best on target train, read back from the selection sweep.
    assert baseline["tau"] == summary["tau_selection"]["prior_tau"]
    assert f"prior adjustment at its own best tau = {baseline['tau']:g}" in page
    assert "every 4th pixel" in page  # --quick keeps every 4th pixel
    assert "What this means, what to try next" in page
    assert f"blda export {out / 'calibration' / 'calibrator.pt'}" in page
    for column in ("dIoU", "Acc after", "Bias est. (Eq. 5)", "IoU std"):
        assert f"<dt>{column}</dt>" in page, column
    assert re.findall(r"[+-]0\.0%", page) == []  # a change that rounds to zero has no sign


def test_a_demo_that_fails_in_its_last_stage_leaves_nothing_of_it(demo_run, monkeypatch):
    """A failed run leaves no stores or diagnosis beside an earlier run's report (the earlier
    complete run in `demo_run` is replaced, so it goes too); a file of the user's stays."""
    import shutil

    import blda_tools.demo as demo

    earlier, _, _ = demo_run
    out = earlier.parent / "failing_demo"
    shutil.copytree(earlier, out)
    (out / "notes.txt").write_text("mine")

    def broken_calibrate(*arguments):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(demo, "_calibrate", broken_calibrate)
    with pytest.raises(RuntimeError, match="calibration failed"):
        run_demo(out, settings=DemoSettings.quick())
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["notes.txt"]


@pytest.mark.parametrize(
    "foreign", ["stores/target_val.h5", "diagnosis/report.html", "calibration/sweep.csv"]
)
def test_a_foreign_file_where_a_later_stage_writes_is_refused_before_any_stage(
    tmp_path, monkeypatch, foreign
):
    import blda_tools.demo as demo

    def no_stage_may_run(*arguments, **keywords):
        raise AssertionError("a stage ran before the foreign file was refused")

    monkeypatch.setattr(demo, "prepare_dump", no_stage_may_run)
    out = tmp_path / "out"
    (out / foreign).parent.mkdir(parents=True)
    (out / foreign).write_text("mine")
    with pytest.raises(BLDAError, match=f"{foreign}: exists and was not written by"):
        run_demo(out, settings=DemoSettings.quick())
    assert (out / foreign).read_text() == "mine"


@pytest.mark.parametrize("damage", ["checkpoint", "val split"])
def test_an_unreadable_sample_is_refused_before_an_earlier_demo_is_touched(
    demo_run, tmp_path, damage
):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(demo_run[0], out)  # a complete earlier demo
    sample = tmp_path / "sample"
    shutil.copytree(DEFAULT_SAMPLE_DIR, sample)
    if damage == "checkpoint":
        checkpoint = sample / "model" / "tiny_source.pth"
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
        expected = "tiny_source.pth"
    else:
        shutil.rmtree(sample / "synthcity" / "target" / "leftImg8bit" / "val")
        expected = "val"
    before = snapshot(out)
    with pytest.raises(BLDAError, match=f"--sample-dir {sample}: .*{expected}"):
        run_demo(out, sample_dir=sample, settings=DemoSettings.quick())
    assert snapshot(out) == before  # the earlier demo is all there


@pytest.mark.parametrize("existed", [True, False])
def test_a_failed_demo_keeps_an_output_folder_it_did_not_make(tmp_path, monkeypatch, existed):
    # An interrupted (or failed) demo removed the user's empty --out folder as its own
    import blda_tools.demo as demo

    def failed(*arguments):
        raise RuntimeError("the first stage failed")

    monkeypatch.setattr(demo, "_dump_stores", failed)
    out = tmp_path / "out"
    if existed:
        out.mkdir()
    with pytest.raises(RuntimeError, match="the first stage failed"):
        run_demo(out, settings=DemoSettings.quick())
    assert out.is_dir() == existed
    assert not existed or list(out.iterdir()) == []
