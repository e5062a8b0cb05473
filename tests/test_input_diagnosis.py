"""Bad input is diagnosed right, before the long work, naming the option it came from: a folder
given as a store, an unfinished store, class lists that differ (only the differing names), a
held-out store of another class set, a plugin factory that raises; `calibrate` reuses a
statistics file written by `diagnose` (checked against the grid, classes and rows); and an
error message that quotes a library's multi-line text is still printed on one line."""

from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner
from output_helpers import expect_one_line_error
from test_calibration_job import GRID, NAMES, _write_store
from test_dump import make_cityscapes

from blda_cli.main import _Group, _register_commands, cli
from blda_tools.calibrate import CalibrateOptions, calibrate
from blda_tools.calibration import inputs as calibrate_inputs
from blda_tools.diagnose import diagnose
from blda_tools.errors import BLDAError, class_difference
from blda_tools.statistics import LogitGrid

_register_commands()
FIT = dict(estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    return {
        "eval": _write_store(folder / "eval.h5", 1),
        "fit": _write_store(folder / "fit.h5", 2),
        "other": _write_store(folder / "other.h5", 3, names=["road", "car", "bus"]),
    }


def run(*arguments):
    return CliRunner().invoke(cli, [str(a) for a in arguments])


def test_a_folder_given_as_a_store(tmp_path):
    (tmp_path / "stores").mkdir()
    line = expect_one_line_error(run("diagnose", tmp_path / "stores", "--out", tmp_path / "o"))
    assert "is a directory; expected a logit store file" in line and "no such file" not in line


def test_an_unfinished_store_tells_how_to_continue_it(stores, tmp_path):
    partial = tmp_path / "val.h5.partial"
    partial.write_bytes(stores["eval"].read_bytes())
    for given in (partial, tmp_path / "val.h5"):  # the .partial itself, or its final name
        line = expect_one_line_error(run("diagnose", given, "--out", tmp_path / "o"))
        assert "blda dump-logits ... --out" in line and "--resume" in line and "val.h5" in line


def test_class_differences_name_only_what_differs():
    assert class_difference(["a", "b", "c"], ["a", "b", "c"]) is None
    assert (
        class_difference(["a", "b", "c"], ["a", "x", "c"])
        == "only in expected: b; only in found: x"
    )
    assert class_difference(["a", "b"], ["a", "b", "c"]) == (
        "2 classes (expected) vs 3 (found); only in found: c"
    )
    assert class_difference(["a", "b", "c"], ["a", "c", "b"]) == (
        "same classes in another order (position 1: b vs c; 2: c vs b)"
    )
    many = [f"class{i}" for i in range(19)]
    message = class_difference(many, many[:18] + ["bus"])
    assert message == "only in expected: class18; only in found: bus"


def test_a_held_out_store_of_another_class_set_is_refused_before_any_pass(
    stores, tmp_path, monkeypatch
):
    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the data started")

    monkeypatch.setattr(calibrate_inputs, "collect_statistics", no_pass)
    with pytest.raises(BLDAError) as caught:
        calibrate(
            stores["eval"],
            tmp_path / "o",
            CalibrateOptions(taus="0,1", select_on=stores["other"], **FIT),
        )
    assert str(caught.value) == (
        "--select-on: the class names differ: only in STORES: bike; only in --select-on: bus"
    )
    unlabelled = _write_store(tmp_path / "unlabelled.h5", 5, labels=False)
    with pytest.raises(BLDAError, match="--select-on .*unlabelled.h5: no ground-truth labels"):
        calibrate(
            stores["eval"],
            tmp_path / "o",
            CalibrateOptions(taus="0,1", select_on=unlabelled, **FIT),
        )
    with pytest.raises(BLDAError, match="--fit-on .*unlabelled.h5: --fit-labels gt, but"):
        calibrate(
            stores["eval"],
            tmp_path / "o",
            CalibrateOptions(fit_on=unlabelled, fit_labels="gt", **FIT),
        )
    assert not (tmp_path / "o").exists()


def test_calibrate_reuses_a_diagnose_statistics_file(stores, tmp_path, monkeypatch):
    diagnose(
        stores["fit"],
        tmp_path / "d",
        labels="gt",
        grid=LogitGrid(-20, 20, 400),
        plots_and_report=False,
    )
    saved = tmp_path / "d" / "statistics.h5"
    from_store = calibrate(
        stores["eval"],
        tmp_path / "a",
        CalibrateOptions(taus="0.5", fit_on=stores["fit"], fit_labels="gt", **FIT),
    )
    calls = []
    monkeypatch.setattr(calibrate_inputs, "collect_statistics", lambda *a, **k: calls.append(a))
    from_file = calibrate(
        stores["eval"], tmp_path / "b",
        CalibrateOptions(taus="0.5", fit_on=saved, fit_labels="gt", anchor_from=saved, **FIT),
    )  # fmt: skip
    assert calls == []  # both passes skipped
    first = torch.load(tmp_path / "a" / "calibrator.pt", weights_only=True)
    second = torch.load(tmp_path / "b" / "calibrator.pt", weights_only=True)
    assert torch.equal(first["offsets"], second["offsets"])
    assert from_file.js == from_store.js
    assert from_file.fit["fit_on_stores"] == [str(stores["fit"])]
    # listed twice (also by another name), its counts were added twice and changed the fit
    twice = CalibrateOptions(taus="0.5", fit_on=[saved, tmp_path / "d" / ".." / "d" / saved.name],
                             fit_labels="gt", **FIT)  # fmt: skip
    with pytest.raises(BLDAError, match="--fit-on: a statistics file is listed twice"):
        calibrate(stores["eval"], tmp_path / "c", twice)


def test_a_statistics_file_that_does_not_fit_is_refused(stores, tmp_path):
    diagnose(
        stores["fit"],
        tmp_path / "d",
        labels="gt",
        grid=LogitGrid(-20, 20, 400),
        plots_and_report=False,
    )
    saved = tmp_path / "d" / "statistics.h5"
    base = [
        "calibrate",
        stores["eval"],
        "--out",
        tmp_path / "o",
        "--tau",
        "0.5",
        "--estimator",
        "empirical",
    ]
    expect_one_line_error(run(*base, "--fit-on", saved, "--fit-labels", "gt"),
                          "grid -20:20:400", "--grid is -50:50:4000", "--grid -20:20:400")  # fmt: skip
    expect_one_line_error(run(*base, "--fit-on", saved, "--grid", GRID),
                          "rows are ground truth but --fit-labels is pseudo", "--fit-labels gt")  # fmt: skip
    expect_one_line_error(run(*base, "--fit-on", saved, "--fit-on", stores["fit"], "--grid", GRID, "--fit-labels", "gt"),
                          "not both")  # fmt: skip
    diagnose(
        stores["other"],
        tmp_path / "d2",
        labels="gt",
        grid=LogitGrid(-20, 20, 400),
        plots_and_report=False,
    )
    expect_one_line_error(
        run(*base, "--anchor-from", tmp_path / "d2" / "statistics.h5", "--grid", GRID),
        "--anchor-from",
        "only in STORES: bike; only in --anchor-from: bus",
    )
    assert not (tmp_path / "o").exists()


def test_a_plugin_factory_that_raises(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "raising_plugin.py").write_text(
        "def build(num_classes):\n    raise FileNotFoundError('weights.pth is missing')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    make_cityscapes(tmp_path / "data", count=1)
    line = expect_one_line_error(
        run("dump-logits", "--model", "raising_plugin:build", "--dataset", "cityscapes",
            "--data-root", tmp_path / "data", "--out", tmp_path / "o.h5", "--workers", "0"),
    )  # fmt: skip
    assert line == (
        "error: --model raising_plugin:build: the factory raising_plugin.build raised "
        "FileNotFoundError: weights.pth is missing"
    )
    assert not list(tmp_path.glob("o.h5*"))
    (folder / "broken_plugin.py").write_text("raise RuntimeError('no GPU here')\n")
    line = expect_one_line_error(
        run("dump-logits", "--model", "broken_plugin:build", "--dataset", "cityscapes",
            "--data-root", tmp_path / "data", "--out", tmp_path / "o.h5", "--workers", "0"),
    )  # fmt: skip
    assert line.endswith("importing module 'broken_plugin' raised RuntimeError: no GPU here")


def test_names_of_the_fixture_classes():
    assert NAMES == ["road", "car", "bike"]  # the differing names asserted above


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(anchor="class:bus"), "--anchor: unknown class 'bus'"),
        (dict(eps=0.7), "--eps: expected 0 < eps < 0.5"),
        (dict(taus="0:1:-1"), "--tau: step must be > 0"),
        # float() made True a tau of 1.0
        (dict(taus=[True, 0.5]), "taus: expected a number, got True"),
        (dict(taus=[]), "taus: 0 values; expected 1 to 1000"),
    ],
)
def test_calibrate_options_are_checked_before_any_pass(
    stores, tmp_path, monkeypatch, options, message
):
    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the data started")

    monkeypatch.setattr(calibrate_inputs, "collect_statistics", no_pass)
    settings = {**FIT, **options}
    with pytest.raises(BLDAError, match=message):
        calibrate(stores["eval"], tmp_path / "o", CalibrateOptions(**settings))
    assert not (tmp_path / "o").exists()


def test_a_folder_given_as_any_input_file(stores, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    make_cityscapes(tmp_path / "data", count=1)
    calibrate(stores["eval"], tmp_path / "cal", CalibrateOptions(taus="0.5", **FIT))
    cases = [
        (["dump-logits", "--model", "tiny", "--checkpoint", folder, "--dataset", "cityscapes",
          "--data-root", tmp_path / "data", "--out", tmp_path / "o.h5"], "a checkpoint file"),
        (["export", folder, "--out", tmp_path / "e.pt"], "a blda calibrator file"),
        (["export", tmp_path / "cal" / "calibrator.pt", "--model", folder, "--out",
          tmp_path / "e.pt"], "a TorchScript archive"),
        (["calibrate", stores["eval"], "--apply", folder, "--out", tmp_path / "p"], "a blda calibrator file"),
        (["calibrate", stores["eval"], "--fit-on", folder, "--out", tmp_path / "p"], "a logit store file"),
    ]  # fmt: skip
    for arguments, expected in cases:
        line = expect_one_line_error(
            run(*arguments), f"{folder}: is a directory; expected {expected}"
        )
        assert "no such file" not in line
    assert not (tmp_path / "p").exists() and not (tmp_path / "e.pt").exists()


def test_any_multi_line_error_is_printed_on_one_line():
    # a library's text quoted in a BLDAError (OpenCV, h5py, torch) may span several lines
    @click.command("fails")
    def fails():
        raise BLDAError("model.pth: cannot read it (first line\n\tsecond:\n\nthird)")

    result = CliRunner().invoke(_Group(name="blda", commands=[fails]), ["fails"])
    assert result.exit_code == 2
    assert result.output == "error: model.pth: cannot read it (first line; second: third)\n"
