"""`blda diagnose` end to end: outputs, metrics against an independent numpy computation, and
clear errors for bad input (exit status 2, the file and the problem named, no traceback)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from blda_cli.main import _register_commands, cli
from blda_tools.diagnose import diagnose
from blda_tools.store import LogitWriter

NAMES = ["road", "wall", "fence", "pole"]
IGNORE = 255


def _biased_maps(seed: int, images: int = 3, size: int = 24):
    """Logit maps where class 0 is favoured by a constant offset (so it is over-predicted)."""
    generator = torch.Generator().manual_seed(seed)
    for index in range(images):
        labels = torch.randint(0, len(NAMES), (size, size), generator=generator)
        labels[:2] = IGNORE
        logits = torch.randn(len(NAMES), size, size, generator=generator)
        logits += 2.0 * torch.nn.functional.one_hot(
            labels.clamp(max=len(NAMES) - 1), len(NAMES)
        ).permute(2, 0, 1)
        logits[0] += 1.0
        yield f"seed{seed}-image{index}", logits, labels


def _write_store(path: Path, seed: int = 0, labels: bool = True) -> Path:
    with LogitWriter(path, NAMES, ignore_index=IGNORE, domain="test") as writer:
        for name, logits, label_map in _biased_maps(seed):
            writer.add(logits, label_map if labels else None, name=name)
    return path


def _numpy_metrics(paths):
    """Confusion and metrics computed directly from the stored arrays with numpy."""
    confusion = np.zeros((len(NAMES), len(NAMES)), dtype=np.int64)
    for path in paths:
        with h5py.File(path, "r") as file:
            logits = file["logits"][()].astype(np.float32)
            labels = file["labels"][()].astype(np.int64)
        kept = labels != IGNORE
        np.add.at(confusion, (labels[kept], logits[kept].argmax(1)), 1)
    true_positive = np.diag(confusion).astype(float)
    iou = true_positive / (confusion.sum(0) + confusion.sum(1) - true_positive)
    acc = true_positive / confusion.sum(1)
    # Eq. 4 worked directly: mean over true classes of P(pred = l | c), minus 1/C.
    bias = (confusion / confusion.sum(1, keepdims=True)).mean(0) - 1 / len(NAMES)
    return confusion, iou, acc, bias


def _run(*args):
    _register_commands()
    return CliRunner().invoke(cli, list(map(str, args)))


def test_diagnose_writes_every_output_and_metrics_match_numpy(tmp_path):
    store = _write_store(tmp_path / "val.h5")
    result = _run("diagnose", store, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in [
        "diagnosis.json",
        "statistics.h5",
        "report.html",
        "bias.png",
        "logit_densities.png",
        "confusion.png",
        "frequency_vs_accuracy.png",
    ]:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.partial"))
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report and 'src="http' not in report

    content = json.loads((out / "diagnosis.json").read_text())
    confusion, iou, acc, bias = _numpy_metrics([store])
    assert content["classes"] == NAMES
    np.testing.assert_allclose(content["iou"], iou, atol=1e-12)
    np.testing.assert_allclose(content["acc"], acc, atol=1e-12)
    np.testing.assert_allclose(content["bias"], bias, atol=1e-12)
    assert content["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert content["macc"] == pytest.approx(acc.mean(), abs=1e-12)
    assert content["iou_std"] == pytest.approx(iou.std(), abs=1e-12)
    assert content["num_pixels"] == confusion.sum()
    assert content["class_pixels"] == confusion.sum(1).tolist()
    # The favoured class is over-predicted, and Eq. 5 sees it from the logits alone.
    assert content["bias"][0] > 0 and content["bias_estimated"][0] > 0
    assert content["groups"]["over"]["classes"] == ["road"]
    for key in ["js_positive", "js_negative", "bias_rank_correlation"]:
        assert key in content


def test_shards_diagnose_like_one_store(tmp_path):
    first = _write_store(tmp_path / "a.h5", seed=1)
    second = _write_store(tmp_path / "b.h5", seed=2)
    together = diagnose([first, second], tmp_path / "out", plots_and_report=False)
    _, iou, _, bias = _numpy_metrics([first, second])
    np.testing.assert_allclose(together.iou, iou, atol=1e-12)
    np.testing.assert_allclose(together.bias, bias, atol=1e-12)


def test_store_without_labels_uses_pseudo_labels_and_says_so(tmp_path):
    store = _write_store(tmp_path / "unlabelled.h5", labels=False)
    result = diagnose(store, tmp_path / "out", plots_and_report=False)
    assert result.label_source == "pseudo"
    assert result.iou is None and result.bias is None
    assert any("no ground-truth labels" in note for note in result.notes)
    content = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert content["miou"] is None and len(content["bias_estimated"]) == len(NAMES)


def test_pseudo_rows_keep_ground_truth_metrics(tmp_path):
    store = _write_store(tmp_path / "val.h5")
    with_gt = diagnose(store, tmp_path / "gt", plots_and_report=False)
    with_pseudo = diagnose(store, tmp_path / "pseudo", labels="pseudo", plots_and_report=False)
    assert with_pseudo.label_source == "pseudo"
    assert with_pseudo.iou == with_gt.iou and with_pseudo.bias == with_gt.bias
    assert with_pseudo.bias_estimated != with_gt.bias_estimated


def _corrupt_values(path: Path, field: str, index, value) -> Path:
    with h5py.File(path, "r+") as file:
        data = file[field][()]
        data[index] = value
        file[field][...] = data
    return path


@pytest.mark.parametrize(
    "make_bad, expected",
    [
        (lambda p: _corrupt_values(_write_store(p), "logits", (5, 1), np.nan), "nan or inf"),
        (lambda p: _corrupt_values(_write_store(p), "logits", (7, 0), np.inf), "nan or inf"),
        (lambda p: _corrupt_values(_write_store(p), "labels", 100, 9), "label"),
        (lambda p: p.write_bytes(b"not an hdf5 file at all"), "HDF5"),
        (lambda p: h5py.File(p, "w").close(), "blda"),
    ],
    ids=["nan", "inf", "label-out-of-range", "not-hdf5", "not-blda"],
)
def test_bad_store_gives_clear_error(tmp_path, make_bad, expected):
    store = tmp_path / "bad.h5"
    make_bad(store)
    result = _run("diagnose", store, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert str(store) in result.output or store.name in result.output
    assert expected.lower() in result.output.lower()


def test_truncated_store_gives_clear_error(tmp_path):
    store = _write_store(tmp_path / "whole.h5")
    data = store.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    result = _run("diagnose", truncated, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "truncated.h5" in result.output


def test_shards_with_different_class_names_are_refused(tmp_path):
    first = _write_store(tmp_path / "a.h5")
    other = tmp_path / "b.h5"
    with LogitWriter(other, ["road", "wall", "fence", "sky"]) as writer:
        writer.add(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    result = _run("diagnose", first, other, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "class names" in result.output and "b.h5" in result.output


def test_empty_store_is_refused(tmp_path):
    empty = tmp_path / "empty.h5"
    with LogitWriter(empty, NAMES):
        pass
    result = _run("diagnose", empty, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "empty.h5" in result.output and "empty" in result.output.lower()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_unwritable_output_directory_is_refused(tmp_path):
    store = _write_store(tmp_path / "val.h5")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result = _run("diagnose", store, "--out", locked / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "locked" in result.output


def test_output_directory_that_cannot_be_created_is_refused(tmp_path):
    # /proc refuses new directories even to root, so this runs in CI too.
    store = _write_store(tmp_path / "val.h5")
    result = _run("diagnose", store, "--out", "/proc/blda-diagnose-out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "/proc/blda-diagnose-out" in result.output


def test_output_path_that_is_a_file_is_refused(tmp_path):
    store = _write_store(tmp_path / "val.h5")
    occupied = tmp_path / "occupied"
    occupied.write_text("a file, not a directory")
    result = _run("diagnose", store, "--out", occupied)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "occupied" in result.output


def test_missing_store_is_named(tmp_path):
    result = _run("diagnose", tmp_path / "nowhere.h5", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "nowhere.h5" in result.output


def test_a_class_without_pixels_or_predictions_is_nan_in_metrics_and_under_predicted(tmp_path):
    """Class 3 ("pole") never appears and is never predicted: IoU and accuracy NaN and out of
    the means, Bias (Eq. 4 worked by hand: mean_c P(3 | c) - 1/C = 0 - 1/4) = -0.25, so it is
    in the under-predicted group, and the note says so."""
    generator = torch.Generator().manual_seed(3)
    path = tmp_path / "three.h5"
    with LogitWriter(path, NAMES, ignore_index=IGNORE, domain="test") as writer:
        labels = torch.randint(0, 3, (16, 16), generator=generator)
        logits = torch.randn(len(NAMES), 16, 16, generator=generator)
        logits[3] = -50.0  # never the argmax
        writer.add(logits, labels, name="image")
    diagnosis = diagnose(path, tmp_path / "out", plots_and_report=False)
    assert np.isnan(diagnosis.iou[3]) and np.isnan(diagnosis.acc[3])
    assert diagnosis.miou == pytest.approx(np.nanmean(diagnosis.iou[:3]))
    assert diagnosis.bias[3] == pytest.approx(-0.25)
    assert "pole" in diagnosis.groups["under"]["classes"]
    (note,) = [note for note in diagnosis.notes if "no pixels and no predictions" in note]
    assert "Bias (Eq. 4) is -1/C" in note and "under-predicted: pole" in note


def _all_ignored_store(path: Path) -> Path:
    generator = torch.Generator().manual_seed(5)
    with LogitWriter(path, NAMES, ignore_index=IGNORE, domain="test") as writer:
        writer.add(torch.randn(len(NAMES), 8, 8, generator=generator), torch.full((8, 8), IGNORE))
    return path


def test_a_store_whose_labels_are_all_ignored_is_diagnosed_from_its_logits(tmp_path):
    """No ground truth: --labels gt names the store and the cause; auto and pseudo give the
    logit-only diagnosis (Eq. 5), as for a store without labels, with no metrics."""
    store = _all_ignored_store(tmp_path / "ignored.h5")
    result = _run("diagnose", store, "--out", tmp_path / "gt", "--labels", "gt", "--no-plots")
    assert result.exit_code == 2
    assert "ignored.h5: every label is the ignore index 255" in result.output
    for labels in ("auto", "pseudo"):
        diagnosis = diagnose(store, tmp_path / labels, labels=labels, plots_and_report=False)
        assert diagnosis.miou is None and diagnosis.bias is None
        assert len(diagnosis.bias_estimated) == len(NAMES)
        assert any("every label of the store is the ignore index" in n for n in diagnosis.notes)


def test_the_pseudo_label_progress_total_counts_the_ground_truth_pass(tmp_path):
    from blda_tools.diagnose import diagnosis_passes

    store = _write_store(tmp_path / "val.h5")
    rows = 3 * 24 * 24
    assert diagnosis_passes(store, "pseudo") == 2 * rows
    assert diagnosis_passes(store, "auto") == diagnosis_passes(store, "gt") == rows
    assert diagnosis_passes(_all_ignored_store(tmp_path / "ignored.h5"), "pseudo") == 64


def test_class_names_and_paths_are_printed_as_they_are_not_as_console_markup(tmp_path):
    names = ["[bold]x[/bold]", "b", "c", "d"]
    path = tmp_path / "marked.h5"
    generator = torch.Generator().manual_seed(6)
    with LogitWriter(path, names, ignore_index=IGNORE, domain="test") as writer:
        writer.add(torch.randn(4, 8, 8, generator=generator), torch.randint(0, 4, (8, 8)))
    out = tmp_path / "out[1]"
    result = _run("diagnose", path, "--out", out, "--no-plots")
    assert result.exit_code == 0, result.output
    assert "[bold]x[/bold]" in result.output
    # every file written, named (statistics.h5 was left out)
    assert f"wrote diagnosis.json, statistics.h5 in {out}" in " ".join(result.output.split())
