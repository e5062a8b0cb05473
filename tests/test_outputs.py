"""Nothing partial, nothing stale (docs/outputs.md): a command's files are written as one set, a
re-run replaces or removes the files of the earlier run, a file a command did not write is never
touched (the same rule in every command), and a failed run leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from output_helpers import command_lines, expect_one_line_error, leftovers, make_inputs
from test_calibration_job import GRID

from blda_cli.main import _register_commands, cli
from blda_tools import outputs
from blda_tools.calibrate import CalibrateOptions, calibrate
from blda_tools.errors import BLDAError
from blda_tools.statistics import LogitGrid

_register_commands()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def run(*arguments):
    return CliRunner().invoke(cli, [str(a) for a in arguments])


def test_a_rerun_without_plots_removes_the_earlier_report_and_keeps_foreign_files(inputs, tmp_path):
    out = tmp_path / "diagnosis"
    assert run("diagnose", inputs["store"], "--out", out, "--grid", GRID).exit_code == 0
    assert (out / "report.html").is_file() and (out / "bias.png").is_file()
    (out / "my-notes.txt").write_text("mine")
    result = run("diagnose", inputs["store"], "--out", out, "--grid", GRID, "--no-plots")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".blda-outputs.json", "diagnosis.json", "my-notes.txt", "statistics.h5",
    ]  # fmt: skip
    assert (out / "my-notes.txt").read_text() == "mine"
    recorded = json.loads((out / ".blda-outputs.json").read_text())["sets"]
    assert recorded == {"diagnose": ["diagnosis.json", "statistics.h5"]}


def _record_also(out: Path, name: str) -> None:
    path = out / ".blda-outputs.json"
    record = json.loads(path.read_text())
    record["sets"]["diagnose"].append(name)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("entry", ["../victim.txt", "ABSOLUTE", "plots/../../victim.txt"])
def test_a_record_naming_a_file_outside_the_folder_is_refused_and_the_file_kept(
    inputs, tmp_path, entry
):
    # The record may come with a folder from anyone: a re-run removed what it listed.
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("mine")
    assert (
        run("diagnose", inputs["store"], "--out", out, "--grid", GRID, "--no-plots").exit_code == 0
    )
    _record_also(out, str(victim) if entry == "ABSOLUTE" else entry)
    result = run("diagnose", inputs["store"], "--out", out, "--grid", GRID, "--no-plots")
    line = expect_one_line_error(result, str(out / ".blda-outputs.json"), "damaged record")
    assert "not a file inside" in line
    assert victim.read_text() == "mine"


def test_a_record_reaching_outside_through_a_link_or_naming_a_folder_is_refused(inputs, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("mine")
    assert run("diagnose", inputs["store"], "--out", out, "--grid", GRID).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    _record_also(out, "linked/victim.txt")
    result = run("diagnose", inputs["store"], "--out", out, "--grid", GRID, "--no-plots")
    expect_one_line_error(result, "'linked/victim.txt', which lies outside the directory", "")
    assert (elsewhere / "victim.txt").read_text() == "mine"
    # refused when the record was read, before the pass: the earlier report and PNGs stay
    assert sorted(p.name for p in out.iterdir() if p.name != "linked") == before
    assert "diagnose:" not in result.output  # no progress line: no statistics pass ran
    _record_also(out, "folder")
    (out / "folder").mkdir()
    record = json.loads((out / ".blda-outputs.json").read_text())
    record["sets"]["diagnose"].remove("linked/victim.txt")
    (out / ".blda-outputs.json").write_text(json.dumps(record))
    result = run("diagnose", inputs["store"], "--out", out, "--grid", GRID, "--no-plots")
    expect_one_line_error(result, "'folder', which is a folder", "")
    assert (out / "folder").is_dir()


def test_a_folder_linked_out_of_the_output_is_not_written_through(inputs, tmp_path):
    # apply writes color/<name>.png: with color/ a link elsewhere, a re-run wrote (and
    # replaced) files there (regression helper).
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert run(*command_lines(inputs, out)["apply"]).exit_code == 0
    written = sorted(p.relative_to(out / "color") for p in (out / "color").rglob("*.png"))
    shutil.rmtree(out / "color")
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("mine")
    (out / "color").symlink_to(elsewhere, target_is_directory=True)
    result = run(*command_lines(inputs, out)["apply"])  # its record lists color/...
    expect_one_line_error(result, "damaged record", "which lies outside the directory")
    fresh = tmp_path / "fresh"  # no record: the files' folder is checked when they are moved
    fresh.mkdir()
    (fresh / "color").symlink_to(elsewhere, target_is_directory=True)
    result = run(*command_lines(inputs, fresh)["apply"])
    expect_one_line_error(result, "its folder leads out of", "a symbolic link")
    assert written and sorted(p.name for p in elsewhere.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("command", ["diagnose", "calibrate", "apply", "demo"])
def test_a_file_the_command_did_not_write_is_refused_before_any_work(inputs, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    foreign = {"diagnose": "report.html", "calibrate": "calibration.json",
               "apply": "trainIds/city/image0.png", "demo": "report.html"}[command]  # fmt: skip
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("someone else's")
    result = CliRunner().invoke(cli, command_lines(inputs, out)[command])
    expect_one_line_error(result, str(out / foreign), "was not written by `blda")
    assert (out / foreign).read_text() == "someone else's"
    assert leftovers(out) == sorted([foreign, *[str(p) for p in Path(foreign).parents][:-1]])


@pytest.mark.parametrize("command", ["export", "plot-log"])
def test_single_file_commands_replace_their_own_file_and_refuse_others(inputs, tmp_path, command):
    target = tmp_path / "out"
    lines = command_lines(inputs, target)[command]
    written = Path(lines[lines.index("--out") + 1])
    assert CliRunner().invoke(cli, lines).exit_code == 0
    first = written.stat().st_mtime_ns
    assert CliRunner().invoke(cli, lines).exit_code == 0  # its own file: replaced
    assert written.stat().st_mtime_ns >= first
    other = written.with_name("unrelated" + written.suffix)
    other.write_bytes(b"user data")
    lines[lines.index("--out") + 1] = str(other)
    expect_one_line_error(CliRunner().invoke(cli, lines), str(other), "not written by")
    assert other.read_bytes() == b"user data"
    # Another command's output is not this command's either.
    lines[lines.index("--out") + 1] = str(inputs["calibrator"])
    expect_one_line_error(CliRunner().invoke(cli, lines), "written by `blda calibrate`")


def test_a_killed_run_leaves_only_its_marked_staging_folder_which_the_next_run_removes(
    inputs, tmp_path
):
    out = tmp_path / "d"
    staging = outputs.staging_dir(out, "diagnose")
    staging.mkdir(parents=True)
    (staging / "bias.png.partial").write_bytes(b"half a png")  # as a SIGKILL leaves it
    assert run("diagnose", inputs["store"], "--out", out, "--grid", GRID).exit_code == 0
    assert not staging.exists()
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def _fail_after(monkeypatch, module, name, calls):
    original = getattr(module, name)
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise BLDAError("simulated failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def test_a_failed_apply_leaves_no_png_and_no_folder(inputs, tmp_path, monkeypatch):
    from blda_tools.calibration import apply

    _fail_after(monkeypatch, apply, "write_color_png", 2)  # fails on the third image
    out = tmp_path / "a" / "b"
    result = run("calibrate", inputs["store"], "--apply", inputs["calibrator"], "--out", out)
    expect_one_line_error(result, "simulated failure")
    assert not (tmp_path / "a").exists()


def test_a_failed_apply_rerun_keeps_the_complete_earlier_set(inputs, tmp_path, monkeypatch):
    from blda_tools.calibration import apply

    out = tmp_path / "pred"
    assert (
        run("calibrate", inputs["store"], "--apply", inputs["calibrator"], "--out", out).exit_code
        == 0
    )
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    _fail_after(monkeypatch, apply, "write_color_png", 1)
    result = run("calibrate", inputs["store"], "--apply", inputs["calibrator"], "--out", out)
    assert result.exit_code == 2
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before
    assert not list(out.glob(".blda-partial-*"))


def test_a_failed_calibrate_leaves_no_empty_output_folder(inputs, tmp_path, monkeypatch):
    from blda_tools import calibrate as job

    _fail_after(monkeypatch, job, "write_json", 0)
    with pytest.raises(BLDAError, match="simulated"):
        calibrate(
            inputs["store"],
            tmp_path / "new" / "cal",
            CalibrateOptions(taus="0.5", estimator="empirical", min_samples=20,
                             grid=LogitGrid(-20, 20, 400)),
        )  # fmt: skip
    assert not (tmp_path / "new").exists()


def test_diagnose_killed_by_a_plot_error_leaves_nothing(inputs, tmp_path, monkeypatch):
    from blda_tools import plots
    from blda_tools.plots import workers

    # Drawn in this process, so that the failing figure below is the one drawn (the figure
    # workers' errors reaching the caller: tests/test_plots_report.py).
    monkeypatch.setattr(workers, "DEFAULT_PROCESSES", 0)
    monkeypatch.setattr(
        plots,
        "plot_confusion",
        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")),
    )
    result = run("diagnose", inputs["store"], "--out", tmp_path / "d", "--grid", GRID)
    expect_one_line_error(result, str(tmp_path / "d"), "No space left on device")
    assert not (tmp_path / "d").exists()


def test_train_with_a_device_error_leaves_no_run_directory(tmp_path):
    from test_training_loop import components, small_config

    from blda_tools.training.runner import run_training

    with pytest.raises(BLDAError, match="run.device"):
        run_training(small_config("run.device='cuda:0'"), tmp_path / "runs" / "r", components())
    assert not (tmp_path / "runs").exists()


def test_train_failing_before_its_first_checkpoint_removes_what_it_wrote(tmp_path, monkeypatch):
    from test_training_loop import components, small_config

    from blda_tools.training import runner

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(runner, "Trainer", broken)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "readme.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="CUDA error"):
        runner.run_training(small_config(), tmp_path / "r", components())
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["readme.txt"]


def test_train_refuses_a_config_toml_it_did_not_write(tmp_path):
    from test_training_loop import components, small_config

    from blda_tools.training.runner import run_training

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.toml").write_text("# my own\n")
    with pytest.raises(BLDAError, match="config.toml: exists and was not written by `blda train`"):
        run_training(small_config(), tmp_path / "r", components())
    assert (tmp_path / "r" / "config.toml").read_text() == "# my own\n"


def test_the_manifest_of_two_single_file_sets_in_one_folder(tmp_path):
    for name in ("a.bin", "b.bin"):
        with outputs.output_file(tmp_path / name, "export") as target:
            target.write_bytes(name.encode())
    sets = json.loads((tmp_path / outputs.MANIFEST).read_text())["sets"]
    assert sets == {"export a.bin": ["a.bin"], "export b.bin": ["b.bin"]}
    with outputs.output_file(tmp_path / "a.bin", "export") as target:
        target.write_bytes(b"again")
    assert (tmp_path / "b.bin").read_bytes() == b"b.bin"  # the other set is untouched


def test_a_dump_rerun_with_another_number_of_ranks_removes_the_earlier_shards(
    tmp_path, monkeypatch
):
    from test_dump import WHOLE, install_plugin, make_cityscapes

    from blda_tools.inference.dump import dump_logits

    plugin = install_plugin(tmp_path, monkeypatch)
    make_cityscapes(tmp_path / "data", count=2)
    out = tmp_path / "stores" / "val.h5"
    for rank in (0, 1):
        dump_logits(plugin, None, "cityscapes", tmp_path / "data", "val", out,
                    inference=WHOLE, workers=0, rank=rank, world_size=2)  # fmt: skip
    mine = out.with_name("val.rank0-of-3.h5")  # not written by dump-logits: stays
    mine.write_text("mine")
    assert {p.name for p in out.parent.glob("val*")} == {
        "val.rank0-of-2.h5", "val.rank1-of-2.h5", "val.rank0-of-3.h5",
    }  # fmt: skip
    dump_logits(plugin, None, "cityscapes", tmp_path / "data", "val", out,
                inference=WHOLE, workers=0, rank=0, world_size=1)  # fmt: skip
    assert {p.name for p in out.parent.glob("val*")} == {"val.h5", "val.rank0-of-3.h5"}
    assert json.loads((out.parent / outputs.MANIFEST).read_text())["sets"] == {
        "dump-logits val.h5": ["val.h5"]
    }


def test_a_second_run_into_the_same_output_refuses_while_the_first_runs(tmp_path):
    directory = tmp_path / "d"
    with outputs.output_set(directory, "diagnose", ["a.txt"]) as first:
        first.path("a.txt").write_text("first")
        with pytest.raises(BLDAError) as refused:
            with outputs.output_set(directory, "diagnose", ["a.txt"]):
                pytest.fail("the second run started")
        assert str(refused.value) == (
            f"{directory}: another `blda diagnose` is writing there now; wait for it to finish "
            "or choose another --out"
        )
        # another command, or another single-file set, in the same folder is not blocked
        with outputs.output_set(directory, "calibrate", ["b.txt"]) as other:
            other.path("b.txt").write_text("other")
    assert (directory / "a.txt").read_text() == "first"  # the refused run removed nothing
    assert sorted(outputs.read_manifest(directory)) == ["calibrate", "diagnose"]
    with outputs.output_set(directory, "diagnose", ["a.txt"]) as again:  # once it is done
        again.path("a.txt").write_text("again")
    assert (directory / "a.txt").read_text() == "again"
    assert leftovers(directory) == [".blda-outputs.json", "a.txt", "b.txt"]


def test_a_run_in_another_process_holds_its_output(tmp_path):
    import subprocess
    import sys

    directory = tmp_path / "d"
    # another process runs `output_set` for the same set and waits, its staging folder locked
    script = (
        "import sys, time; from blda_tools import outputs\n"
        f"with outputs.output_set({str(directory)!r}, 'diagnose', ['a.txt']) as o:\n"
        "    o.path('a.txt').write_text('other process'); print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "ready"
        with pytest.raises(BLDAError, match="another `blda diagnose` is writing there now"):
            with outputs.output_set(directory, "diagnose", ["a.txt"]):
                pass
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(timeout=60) == 0
    finally:
        other.kill()
    assert (directory / "a.txt").read_text() == "other process"


def test_a_second_train_in_a_running_run_directory_is_refused(tmp_path, monkeypatch):
    from test_training_loop import components, small_config

    from blda_tools.training import runner

    config, run_dir = small_config("run.iterations=2"), tmp_path / "run"
    runner.run_training(config, run_dir, components(), stop_at=1)  # a checkpoint to resume
    original_train, refusals = runner._train, []

    def train_and_meanwhile_start_another(*args):
        for resume in (True, False):  # as a second `blda train` started now would
            with pytest.raises(BLDAError) as refused:
                runner.run_training(config, run_dir, components(), resume=resume)
            refusals.append(str(refused.value))
        return original_train(*args)

    monkeypatch.setattr(runner, "_train", train_and_meanwhile_start_another)
    runner.run_training(config, run_dir, components(), resume=True)
    assert refusals == 2 * [
        f"--work-dir {run_dir}: another `blda train` is running in it now; wait for it to finish "
        "(then --resume, if it was stopped) or choose another directory"
    ]
    # the refused runs removed nothing; the lock is gone with the run that held it
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".blda-outputs.json", "checkpoints", "config.toml", "log.jsonl", "rcs_class_pixels.pt"
    ]  # fmt: skip
    monkeypatch.setattr(runner, "_train", original_train)
    with pytest.raises(BLDAError, match="already holds a run"):  # no longer "running"
        runner.run_training(config, run_dir, components())


def test_a_record_that_is_not_a_file_is_refused_before_any_work(inputs, tmp_path):
    # Found only when the run recorded its files, it left them unrecorded (refused by every
    # re-run as not blda's).
    out = tmp_path / "out"
    (out / ".blda-outputs.json").mkdir(parents=True)
    result = run("diagnose", inputs["store"], "--out", out, "--grid", GRID, "--no-plots")
    expect_one_line_error(result, str(out / ".blda-outputs.json"), "not a regular file")
    assert sorted(p.name for p in out.iterdir()) == [".blda-outputs.json"]
    assert "diagnose:" not in result.output  # refused before the statistics pass


def test_a_folder_a_set_owns_is_recorded_with_a_slash_and_removed_whole(tmp_path):
    from blda_tools.outputs import read_manifest, record_set, remove_sets

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"x")
    (tmp_path / "mine.txt").write_text("mine")
    record_set(tmp_path, "train", ["plots/", "log.jsonl"])
    assert read_manifest(tmp_path) == {"train": ["log.jsonl", "plots/"]}
    remove_sets(tmp_path, ["train"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    # an owned folder that became a link elsewhere is refused, not removed through
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"x")
    (tmp_path / "plots").symlink_to(elsewhere, target_is_directory=True)
    record_set(tmp_path, "train", ["plots/"])
    with pytest.raises(BLDAError, match="it lists 'plots/', which is a symbolic link"):
        read_manifest(tmp_path)
    assert (elsewhere / "keep.png").exists()


@pytest.mark.parametrize("name", [".blda-outputs.json", ".blda-partial-diagnose", "x.partial"])
def test_names_blda_keeps_for_itself_are_refused_as_outputs(inputs, tmp_path, name):
    # export and plot-log said "wrote x.partial" and left nothing; a diagnose into
    # .blda-partial-diagnose was removed by the next run into its parent as a staging folder
    out = tmp_path / name
    for arguments in (["diagnose", inputs["store"], "--out", out, "--grid", GRID, "--no-plots"],
                      ["export", inputs["calibrator"], "--out", out]):  # fmt: skip
        result = run(*arguments)
        expect_one_line_error(result, "a name blda keeps for itself")
    assert not out.exists()
