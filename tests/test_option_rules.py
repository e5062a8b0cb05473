"""The command line refuses options that contradict each other or mean nothing, naming both,
and describes every option of every command."""

from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner
from output_helpers import expect_one_line_error, make_inputs
from test_calibration_job import GRID
from test_dump import install_plugin, make_cityscapes

from blda_cli.main import _register_commands, cli

_register_commands()


def all_commands(group: click.Group, prefix=("blda",)):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


def undescribed_options(group: click.Group) -> list[str]:
    return [
        f"{' '.join(path)} {max(param.opts, key=len)}"
        for path, command in [((group.name,), group), *all_commands(group, (group.name,))]
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]


def test_every_option_of_every_command_has_a_description():
    assert undescribed_options(cli) == []
    assert len(list(all_commands(cli))) >= 9  # the walk reaches the commands and sub-commands
    # The walk finds an undescribed option, also in a sub-command of a sub-group.
    inner = click.Group(
        "inner", commands=[click.Command("leaf", params=[click.Option(["--bare"])])]
    )
    assert undescribed_options(click.Group("outer", commands=[inner])) == [
        "outer inner leaf --bare"
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def refused(arguments, *fragments):
    result = CliRunner().invoke(cli, [str(a) for a in arguments])
    return expect_one_line_error(result, *fragments)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--fit-on", "X"], "--fit-on"),
        (["--fit-labels", "gt"], "--fit-labels"),
        (["--anchor-from", "X"], "--anchor-from"),
        (["--anchor", "class:car"], "--anchor"),
        (["--select-on", "X"], "--select-on"),
        (["--metric", "macc"], "--metric"),
        (["--estimator", "empirical"], "--estimator"),
        (["--components", "3"], "--components"),
        (["--eps", "0.1"], "--eps"),
        (["--min-samples", "5"], "--min-samples"),
        (["--table-points", "64"], "--table-points"),
        (["--grid", GRID], "--grid"),
        (["--no-plots"], "--no-plots"),
    ],
)
def test_fit_only_options_with_apply_are_refused(inputs, tmp_path, extra, named):
    line = refused(
        ["calibrate", inputs["store"], "--apply", inputs["calibrator"], "--out", tmp_path / "o",
         *extra], "--apply", named, "only applies when fitting",
    )  # fmt: skip
    assert not (tmp_path / "o").exists(), line


@pytest.mark.parametrize(
    "arguments",
    [
        ["calibrate", "STORE", "--out", "OUT", "--tau", ""],
        ["calibrate", "STORE", "--out", "", "--tau", "0.5"],
        ["diagnose", "STORE", "--out", "OUT", "--grid", " "],
        ["export", "CAL", "--out", ""],
        ["calibrate", "STORE", "--out", "OUT", "--fit-on", ""],
    ],
)
def test_empty_values_are_refused_not_taken_as_the_default(inputs, tmp_path, arguments):
    replace = {"STORE": inputs["store"], "OUT": tmp_path / "o", "CAL": inputs["calibrator"]}
    arguments = [replace.get(a, a) for a in arguments]
    position = next(i for i, a in enumerate(arguments) if isinstance(a, str) and not a.strip())
    refused(arguments, arguments[position - 1], "empty value")
    assert not (tmp_path / "o").exists()


def test_calibrate_options_that_mean_nothing_together(inputs, tmp_path):
    base = ["calibrate", inputs["store"], "--out", tmp_path / "o", "--grid", GRID]
    refused([*base, "--estimator", "empirical", "--components", "3"], "--components",
            "--estimator empirical")  # fmt: skip
    for one_tau in ("0.5", "0.5,0.5", "0.5:0.5:0.1", "0.5:0.55:0.1"):  # each spec of one value
        refused([*base, "--tau", one_tau, "--select-on", inputs["store"]], "--select-on",
                f"--tau {one_tau}", "nothing to choose")  # fmt: skip
        refused([*base, "--tau", one_tau, "--metric", "macc"], "--metric", f"--tau {one_tau}")
    assert not (tmp_path / "o").exists()


def test_calibrate_from_python_refuses_what_means_nothing_together(inputs, tmp_path):
    from blda_tools.calibrate import CalibrateOptions, calibrate
    from blda_tools.errors import BLDAError

    for options, message in [
        (CalibrateOptions(taus="0.5,0.5", select_on=[inputs["store"]]), "one tau leaves nothing"),
        (CalibrateOptions(taus=[0.5], select_on=[inputs["store"]]), "one tau leaves nothing"),
        (CalibrateOptions(estimator="empirical", n_components=3), "components are those of"),
        (CalibrateOptions(taus=0.5, select_on=[inputs["store"]]), "one tau leaves nothing"),
        (CalibrateOptions(taus=object()), "taus: expected a spec"),
    ]:
        with pytest.raises(BLDAError, match=message):
            calibrate(inputs["store"], tmp_path / "o", options)
    assert not (tmp_path / "o").exists()


def test_dump_logits_options_that_mean_nothing(tmp_path, monkeypatch):
    plugin = install_plugin(tmp_path, monkeypatch)
    make_cityscapes(tmp_path / "data", count=1)
    base = ["dump-logits", "--dataset", "cityscapes", "--data-root", tmp_path / "data",
            "--out", tmp_path / "o.h5"]  # fmt: skip
    refused([*base, "--model", plugin, "--seed", "3"], "--seed without --pixels-per-image")
    refused([*base, "--model", plugin, "--weights", "teacher"], "--weights without --checkpoint")
    refused([*base, "--model", plugin, "--trust-checkpoint"], "--trust-checkpoint without")
    refused([*base, "--model", plugin, "--mode", "whole", "--crop", "8"], "--crop and --mode whole")
    folder = ["dump-logits", "--dataset", "folder", "--data-root", tmp_path / "data",
              "--out", tmp_path / "o.h5", "--model", plugin]  # fmt: skip
    refused(
        [*folder, "--window-stride", "8"], "--window-stride and the native protocol", "--mode slide"
    )
    archive = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Conv2d(3, 19, 1)).save(str(archive))
    scripted = [*base, "--model", "torchscript", "--checkpoint", archive]
    refused([*scripted, "--weights", "teacher"], "--weights teacher and --model torchscript")
    refused([*scripted, "--trust-checkpoint"], "--trust-checkpoint and --model torchscript")
    # A built-in architecture without weights runs only when asked to.
    refused([*base, "--model", "tiny"], "--model tiny: no --checkpoint", "--random-weights")
    refused([*base, "--model", "tiny", "--random-weights", "--checkpoint", tmp_path / "c.pth"],
            "--random-weights and --checkpoint")  # fmt: skip
    # a plugin or TorchScript model brings its own weights: the flag had no effect
    refused([*base, "--model", "some_module:factory", "--random-weights"],
            "--random-weights: only for the built-in architectures")  # fmt: skip
    assert not (tmp_path / "o.h5").exists()
    result = CliRunner().invoke(cli, [str(a) for a in [*base, "--model", "tiny", "--random-weights",
                                                      "--workers", "0", "--resize", "none"]])  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["calibrate", "S.h5", "--out", "o", "--metric", "best"], "'best' is not one of"),
        (["calibrate", "S.h5"], "Missing option '--out'"),
        (["diagnose", "S.h5", "--out", "o", "--workers", "0"], "0 is not in the range"),
        (["no-such-command"], "No such command"),
    ],
)
def test_click_usage_errors_are_one_line_too(arguments, fragment):
    line = refused(arguments, fragment)
    assert "--help" in line


def test_grids_and_foreign_files_are_named_as_the_user_wrote_them(inputs, tmp_path):
    base = ["calibrate", inputs["store"], "--out", tmp_path / "o"]
    refused([*base, "--grid=1:0:10"], "--grid: expected finite LOW < HIGH")
    refused(["diagnose", inputs["store"], "--out", tmp_path / "d", "--grid=-1:1:0"],
            "--grid: BINS must be a positive integer")  # fmt: skip
    # beyond float32 the grid's widths were infinite: zero estimates and a matplotlib traceback
    refused(["diagnose", inputs["store"], "--out", tmp_path / "d", "--grid=-1e308:1e308:10"],
            "--grid: expected HIGH - LOW of at most 3.403e+38")  # fmt: skip
    (tmp_path / "p" / "trainIds" / "city").mkdir(parents=True)
    (tmp_path / "p" / "trainIds" / "city" / "image0.png").write_bytes(b"mine")
    refused(["calibrate", "--apply", inputs["calibrator"], inputs["store"], "--out", tmp_path / "p"],
            "exists and was not written by `blda calibrate --apply`")  # fmt: skip


def test_a_grid_may_be_given_as_low_high_bins_from_python(inputs, tmp_path):
    from blda_tools.calibrate import CalibrateOptions
    from blda_tools.diagnose import diagnose
    from blda_tools.errors import BLDAError
    from blda_tools.statistics import LogitGrid

    assert CalibrateOptions(grid=(-10, 10, 100)).grid == LogitGrid(-10.0, 10.0, 100)
    result = diagnose(inputs["store"], tmp_path / "d", grid=(-20, 20, 400), plots_and_report=False)
    assert result.num_pixels > 0
    with pytest.raises(BLDAError, match=r"--grid: expected a LogitGrid or \(low, high, bins\)"):
        CalibrateOptions(grid="-10:10:100")


def test_a_held_out_store_whose_every_label_is_ignored_is_refused_before_any_pass(tmp_path):
    import numpy as np

    from blda_tools.calibrate import CalibrateOptions, calibrate
    from blda_tools.errors import BLDAError
    from blda_tools.store import LogitStore, LogitWriter

    names = ["road", "car", "bike"]
    rng = np.random.default_rng(0)
    for name, labels in (("ignored", np.full(50, 255)), ("one", np.r_[np.full(49, 255), 2])):
        with LogitWriter(tmp_path / f"{name}.h5", names) as writer:
            writer.add(rng.normal(size=(50, 3)).astype(np.float32), labels.astype(np.uint8))
    with LogitStore(tmp_path / "one.h5") as store:
        assert store.has_labelled_pixel(rows=7)  # found in the last read
    with LogitStore(tmp_path / "ignored.h5") as store:
        assert not store.has_labelled_pixel(rows=7)
    options = CalibrateOptions(select_on=[tmp_path / "ignored.h5"], min_samples=5, plots=False)
    with pytest.raises(BLDAError, match=r"--select-on .*ignored.h5: no ground-truth labels"):
        calibrate(tmp_path / "one.h5", tmp_path / "o", options)
    assert not (tmp_path / "o").exists()


def test_a_no_plots_run_leaves_a_foreign_plot_alone(inputs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "tau_sweep.png").write_bytes(b"my own figure")
    arguments = ["calibrate", inputs["store"], "--out", out, "--grid", GRID, "--tau", "0,1",
                 "--components", "2", "--min-samples", "20", "--no-plots"]  # fmt: skip
    result = CliRunner().invoke(cli, [str(a) for a in arguments])
    assert result.exit_code == 0, result.output
    assert (out / "tau_sweep.png").read_bytes() == b"my own figure"
    assert (out / "calibration.json").exists()
    refused([a for a in arguments if a != "--no-plots"], "tau_sweep.png", "not written by")


@pytest.mark.parametrize(
    "calibrator, says", [("missing.pt", "no such file"), (".", "is a directory")]
)
def test_an_apply_calibrator_that_is_not_a_file_names_apply(inputs, tmp_path, calibrator, says):
    path = tmp_path / calibrator
    refused(["calibrate", inputs["store"], "--apply", path, "--out", tmp_path / "o"],
            f"--apply {path}", says)  # fmt: skip
    assert not (tmp_path / "o").exists()
