"""OS failures while writing outputs, in every command: a name the file system refuses (too
long), a virtual file system (/proc, /sys), a full disk and a read-only file system (tiny tmpfs
mounts, skipped where the test cannot mount). Each must end in exit status 2 with one line that
names the path and the cause, and leave no temporary file behind."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from output_helpers import command_lines, expect_one_line_error, leftovers, make_inputs
from test_dump import install_plugin, make_cityscapes

from blda_cli.main import _register_commands, cli

_register_commands()
LONG_NAME = "n" * 300  # over the 255 bytes of ext4 / tmpfs / overlayfs names


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


COMMANDS = ["diagnose", "calibrate", "apply", "export", "plot-log", "synthcity", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("where", "cause"),
    [("/proc/blda-test", "No such file or directory"), ("/sys/blda-test", "not permitted")],
)
def test_virtual_file_systems(inputs, command, where, cause):
    out = Path(where) / "out"
    result = CliRunner().invoke(cli, command_lines(inputs, out)[command])
    expect_one_line_error(result, where, cause)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_name_too_long_for_the_file_system(inputs, tmp_path, command):
    folder = tmp_path / "outputs"
    folder.mkdir()
    result = CliRunner().invoke(cli, command_lines(inputs, folder / LONG_NAME)[command])
    expect_one_line_error(result, LONG_NAME[:50], "File name too long")
    assert leftovers(folder) == []


def test_a_name_that_fits_only_without_the_partial_suffix_is_written(inputs, tmp_path):
    # 250 bytes: legal, but "<name>.partial" is not; the temporary name is shortened instead.
    out = tmp_path / ("e" * 247 + ".pt")
    result = CliRunner().invoke(cli, command_lines(inputs, out)["export"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, ".blda-outputs.json"])


def _tmpfs(target: Path, options: str):
    """A tmpfs mounted at `target` for one test (skipped where the test cannot mount)."""
    target.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield target
    subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def full_disk(tmp_path):
    yield from _tmpfs(tmp_path / "full", "size=16k")


@pytest.fixture
def small_disk(tmp_path):
    """Room for three images of `test_dump_logits_filling_the_disk_before_its_first_commit`."""
    yield from _tmpfs(tmp_path / "small", "size=8m")


@pytest.fixture
def read_only(tmp_path):
    yield from _tmpfs(tmp_path / "readonly", "ro,size=16k")


@pytest.mark.parametrize("command", ["diagnose", "calibrate", "apply", "export", "plot-log"])
def test_a_full_disk(inputs, full_disk, command):
    result = CliRunner().invoke(cli, command_lines(inputs, full_disk / "out")[command])
    expect_one_line_error(result, str(full_disk / "out"), "No space left on device")
    assert leftovers(full_disk) == []  # no temporary files, no empty output folder


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_file_system(inputs, read_only, command):
    result = CliRunner().invoke(cli, command_lines(inputs, read_only / "out")[command])
    expect_one_line_error(result, str(read_only), "Read-only file system")


def test_dump_logits_on_a_full_disk_keeps_the_resumable_part(tmp_path, monkeypatch, full_disk):
    plugin = install_plugin(tmp_path, monkeypatch)
    make_cityscapes(tmp_path / "data", count=3, size=(48, 64))
    arguments = ["dump-logits", "--model", plugin, "--dataset", "cityscapes", "--data-root",
                 str(tmp_path / "data"), "--mode", "whole", "--resize", "none", "--workers", "0",
                 "--float32", "--out", str(full_disk / "o.h5")]  # fmt: skip
    result = CliRunner().invoke(cli, arguments)
    line = expect_one_line_error(result, str(full_disk), "No space left on device")
    assert "o.h5" in line


def test_dump_logits_filling_the_disk_after_a_commit_says_what_is_kept(
    tmp_path, monkeypatch, small_disk
):
    # Every image committed as it comes: the disk fills with images kept. The line said "the
    # images committed so far are kept: continue with --resume", not docs/outputs.md's form.
    monkeypatch.setattr("blda_tools.inference.dump.COMMIT_SECONDS", 0.0)
    result = _dump_six_images_onto(small_disk, tmp_path, monkeypatch)
    line = expect_one_line_error(result, str(small_disk / "o.h5.partial"), "No space left")
    assert re.search(r"; [1-5] of 6 images kept in .*o\.h5\.partial; run the same dump-logits "
                     r"command with --resume to continue$", line), line  # fmt: skip
    assert line.count("--resume") == 1, line  # one piece of advice, not the writer's as well


def test_dump_logits_filling_the_disk_before_its_first_commit(tmp_path, monkeypatch, small_disk):
    # The first add's rows do not fit: HDF5's close, flushing them, failed too and its
    # RuntimeError replaced the write error with a traceback (helper's probe, 12 MB tmpfs).
    result = _dump_six_images_onto(small_disk, tmp_path, monkeypatch)
    line = expect_one_line_error(result, str(small_disk / "o.h5"), "No space left on device")
    assert "continue with --resume" not in line  # no image was committed


def _dump_six_images_onto(disk: Path, tmp_path: Path, monkeypatch):
    """dump-logits of six 128 x 256 images (2.5 MB of float32 logits each) into disk/o.h5."""
    plugin = install_plugin(tmp_path, monkeypatch)
    make_cityscapes(tmp_path / "data", count=6, size=(128, 256))
    arguments = ["dump-logits", "--model", plugin, "--dataset", "cityscapes", "--data-root",
                 str(tmp_path / "data"), "--mode", "whole", "--resize", "none", "--workers", "0",
                 "--float32", "--out", str(disk / "o.h5")]  # fmt: skip
    return CliRunner().invoke(cli, arguments)


@pytest.mark.parametrize(
    ("where", "named"),
    [("/proc/blda-test/o.h5", "/proc/blda-test"), ("/sys/blda-test.h5", "/sys/"),
     (LONG_NAME, LONG_NAME[:50])],
)  # fmt: skip
def test_dump_logits_on_an_unwritable_path(tmp_path, monkeypatch, where, named):
    plugin = install_plugin(tmp_path, monkeypatch)
    make_cityscapes(tmp_path / "data", count=1)
    out = where if where.startswith("/") else str(tmp_path / where)
    arguments = ["dump-logits", "--model", plugin, "--dataset", "cityscapes", "--data-root",
                 str(tmp_path / "data"), "--workers", "0", "--out", out]  # fmt: skip
    result = CliRunner().invoke(cli, arguments)
    expect_one_line_error(result, named)


@pytest.fixture(scope="module")
def synthcity_root(tmp_path_factory):
    from blda_tools.datasets.synthcity.generate import make_synthcity

    root = tmp_path_factory.mktemp("synthcity") / "set"
    make_synthcity(root, images=2, size=(64, 128), seed=0)
    return root


@pytest.mark.parametrize(
    ("where", "cause"),
    [("/proc/blda-test/run", "No such file or directory"), ("/sys/blda-test-run", "not permitted"),
     (LONG_NAME, "File name too long")],
)  # fmt: skip
def test_train_into_an_unwritable_work_dir(synthcity_root, tmp_path, where, cause):
    work_dir = where if where.startswith("/") else str(tmp_path / where)
    arguments = ["train", "--config", "synthcity_tiny", "--work-dir", work_dir,
                 "--set", f'data.root="{synthcity_root}"', "--set", "run.num_workers=0"]  # fmt: skip
    expect_one_line_error(CliRunner().invoke(cli, arguments), work_dir[:40], cause)
    assert where.startswith("/") or leftovers(tmp_path) == []  # nothing made in tmp_path
