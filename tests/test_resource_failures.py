"""Resources that run out part-way through a job: memory (Python's MemoryError, numpy's and
torch's real allocation failures) and worker processes killed (as the out-of-memory killer
does, by SIGKILL). Each command must end with one line naming what ran out and what to try,
exit status 2 and no half-written output; a dump keeps what it stored for --resume, and a
worker pool neither waits forever for a dead worker nor leaves workers running."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import dying_tasks
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from output_helpers import command_lines, expect_one_line_error, leftovers, make_inputs
from test_dump import WHOLE, dump, install_plugin, make_cityscapes

from blda_cli.main import _register_commands, cli
from blda_tools.errors import BLDAError, WorkerDied, is_out_of_memory, out_of_memory_text
from blda_tools.fileio import partial_path
from blda_tools.runtime.process import worker_processes

_register_commands()
IMPOSSIBLE_BYTES = 1 << 60  # an exbibyte: no machine can allocate it


def within(seconds: float, work):
    """`work()`'s result or exception, failing the test (instead of hanging the suite) when it
    has not returned after `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(") ", 1)[1][0] != "Z"


# ---------------------------------------------------------------- what counts as running out


def test_real_allocation_failures_are_recognised_and_told_in_one_line():
    failures = []
    for allocate in (
        lambda: torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8),
        lambda: np.empty(IMPOSSIBLE_BYTES, dtype=np.uint8),
        lambda: bytearray(IMPOSSIBLE_BYTES),
    ):
        with pytest.raises((MemoryError, RuntimeError)) as caught:
            allocate()
        failures.append(caught.value)
    for error in failures:
        assert is_out_of_memory(error), error
        text = out_of_memory_text(error)
        assert text.startswith("out of memory") and "\n" not in text
    assert "DefaultCPUAllocator: can't allocate memory" in out_of_memory_text(failures[0])
    assert "enforce fail" not in out_of_memory_text(failures[0])
    assert "Unable to allocate" in out_of_memory_text(failures[1])
    # CUDA's message (typed in from torch's allocator) is cut after its first two sentences
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 "
        "GiB of which 1.05 GiB is free. Of the allocated memory 75.1 GiB is allocated by PyTorch"
    )
    assert is_out_of_memory(cuda)
    assert (
        out_of_memory_text(cuda) == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    for other in (RuntimeError("shapes cannot be multiplied"), ValueError("out of memory"), None):
        assert not is_out_of_memory(other)


# ---------------------------------------------------------------- worker pools


def test_a_killed_worker_fails_the_pool_instead_of_hanging_it():
    def work():
        with worker_processes(2, "the job") as pool:
            return [future.result() for future in [pool.submit(dying_tasks.killed)]]

    with pytest.raises(WorkerDied) as caught:
        within(60, work)
    message = str(caught.value)
    assert message.startswith("the job: a worker process ended unexpectedly")
    assert message.endswith("(killed; most often by the system, for lack of memory)")


def test_leaving_a_pool_by_an_error_stops_its_running_workers_at_once():
    pids = []

    def work():
        with worker_processes(2, "the job") as pool:
            pool.submit(dying_tasks.sleeping, 120)
            pool.submit(dying_tasks.sleeping, 120)
            time.sleep(1.0)  # both workers started, both sleeping
            pids.extend(process.pid for process in multiprocessing.active_children())
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        within(60, work)
    assert time.monotonic() - started < 30  # not the 120 s of the running tasks
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_diagnose_with_a_worker_killed_names_the_statistics_and_workers(tmp_path, monkeypatch):
    from blda_tools.statistics import collect

    inputs = make_inputs(tmp_path / "inputs")
    monkeypatch.setattr(collect, "_worker", dying_tasks.killed)  # pickled by name for workers
    # two chunks at least, so that the statistics go to worker processes
    monkeypatch.setattr(collect.collect_statistics, "__defaults__", ("auto", None, 1, 256, None))
    arguments = [*command_lines(inputs, tmp_path / "out")["diagnose"], "--workers", "2"]
    result = within(120, lambda: CliRunner().invoke(cli, arguments))
    expect_one_line_error(result, "statistics: a worker process ended unexpectedly", "--workers")
    assert not (tmp_path / "out").exists()


def test_a_killed_figure_worker_is_reported_by_diagnose(tmp_path, monkeypatch):
    from blda_tools.plots import workers

    inputs = make_inputs(tmp_path / "inputs")
    monkeypatch.setattr(workers, "draw", dying_tasks.killed)
    monkeypatch.setattr(workers, "DEFAULT_PROCESSES", 2)
    arguments = command_lines(inputs, tmp_path / "out")["diagnose"]
    result = within(120, lambda: CliRunner().invoke(cli, arguments))
    expect_one_line_error(result, "figures: a worker process ended unexpectedly", "--no-plots")
    assert not (tmp_path / "out").exists()


def test_synthcity_make_with_a_worker_killed_leaves_no_set(tmp_path, monkeypatch):
    from blda_tools.datasets.synthcity import generate

    monkeypatch.setattr(generate, "_write_image", dying_tasks.killed)
    arguments = ["synthcity", "make", "--out", str(tmp_path / "set"), "--images", "4",
                 "--size", "32x64", "--workers", "2"]  # fmt: skip
    result = within(120, lambda: CliRunner().invoke(cli, arguments))
    expect_one_line_error(result, "synthcity make: a worker process ended", "--workers")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- memory running out


def test_synthcity_make_out_of_memory(tmp_path, monkeypatch):
    from blda_tools.datasets.synthcity import generate

    def scene(*args):
        return np.empty(IMPOSSIBLE_BYTES, dtype=np.uint8)  # what a huge --size asks for

    monkeypatch.setattr(generate, "generate_scene", scene)
    arguments = ["synthcity", "make", "--out", str(tmp_path / "set"), "--images", "2",
                 "--size", "32x64"]  # fmt: skip
    result = CliRunner().invoke(cli, arguments)
    line = expect_one_line_error(result, "out of memory: Unable to allocate", "--size")
    assert "synthcity" not in line.split(";")[0]  # numpy's words, then the hint
    assert leftovers(tmp_path) == []


def test_a_bug_that_is_not_memory_keeps_its_traceback(tmp_path, monkeypatch):
    from blda_tools.datasets.synthcity import generate

    def scene(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(generate, "generate_scene", scene)
    arguments = ["synthcity", "make", "--out", str(tmp_path / "set"), "--images", "2"]
    result = CliRunner().invoke(cli, arguments)
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    return install_plugin(tmp_path, monkeypatch)


def _dump_arguments(plugin, data_root, out, *extra):
    return ["dump-logits", "--model", plugin, "--dataset", "cityscapes", "--data-root",
            str(data_root), "--mode", "whole", "--resize", "none", "--streams", "1", "--float32",
            "--out", str(out), *extra]  # fmt: skip


def _fail_forward(monkeypatch, at_call: int, failure):
    """The plugin model's forward pass calls `failure()` at its `at_call`-th call; returns a
    function that puts the plugin's own forward pass back."""
    import dump_test_plugin

    forward, calls = dump_test_plugin.PixelLinear.forward, []

    def failing_forward(self, x):
        calls.append(1)
        if len(calls) == at_call:
            failure()
        return forward(self, x)

    monkeypatch.setattr(dump_test_plugin.PixelLinear, "forward", failing_forward)
    return lambda: monkeypatch.setattr(dump_test_plugin.PixelLinear, "forward", forward)


def test_dump_out_of_memory_part_way_keeps_the_images_for_resume(tmp_path, plugin, monkeypatch):
    make_cityscapes(tmp_path / "data", count=4)
    # the third image: a real allocation failure of torch's CPU allocator
    restore = _fail_forward(
        monkeypatch, 3, lambda: torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8)
    )
    out = tmp_path / "o.h5"
    result = CliRunner().invoke(
        cli, _dump_arguments(plugin, tmp_path / "data", out, "--workers", "0")
    )
    line = expect_one_line_error(
        result,
        "out of memory: DefaultCPUAllocator: can't allocate memory",
        f"2 of 4 images kept in {out}.partial",
        "--resume",
        "--batch-size",  # the command's hint
    )
    assert not out.exists()
    with h5py.File(f"{out}.partial", "r") as file:
        assert file.attrs["committed_images"] == 2

    restore()
    resumed = CliRunner().invoke(
        cli, _dump_arguments(plugin, tmp_path / "data", out, "--workers", "0", "--resume")
    )
    assert resumed.exit_code == 0, resumed.output
    assert "2 of 4 images already stored, 2 to go" in resumed.output, line


def test_dump_with_a_loader_worker_killed_keeps_the_images_for_resume(
    tmp_path, plugin, monkeypatch
):
    from blda_tools.inference import loader

    make_cityscapes(tmp_path / "data", count=4)
    decode = loader.decode

    def decode_killed_at_third(dataset, index):
        if index == 2:  # loader workers are forked: they run this replacement
            time.sleep(2.0)  # meanwhile the dump stores image 0 and waits for image 2
            dying_tasks.killed()
        return decode(dataset, index)

    monkeypatch.setattr(loader, "decode", decode_killed_at_third)
    out = tmp_path / "o.h5"
    arguments = _dump_arguments(plugin, tmp_path / "data", out, "--workers", "1")
    result = within(120, lambda: CliRunner().invoke(cli, [*arguments, "--batch-size", "1"]))
    expect_one_line_error(
        result,
        "image loading: a worker process ended unexpectedly",
        "fewer --workers",
        # images 0 and 1 reached the dump; the loader failed when it was asked for image 2, with
        # image 1 still in its stream (one stream: a batch ahead), so image 0 was stored
        f"1 of 4 images kept in {out}.partial",
        "--resume",
    )
    monkeypatch.setattr(loader, "decode", decode)
    resumed = CliRunner().invoke(cli, [*arguments, "--resume"])
    assert resumed.exit_code == 0 and "1 of 4 images already stored" in resumed.output


def test_dump_out_of_memory_before_any_image_leaves_nothing_to_resume(
    tmp_path, plugin, monkeypatch
):
    make_cityscapes(tmp_path / "data", count=2)

    def python_out_of_memory():
        raise MemoryError  # Python's own, with no message

    _fail_forward(monkeypatch, 1, python_out_of_memory)
    out = tmp_path / "o.h5"
    result = CliRunner().invoke(
        cli, _dump_arguments(plugin, tmp_path / "data", out, "--workers", "0")
    )
    line = expect_one_line_error(result, "out of memory; try a smaller --batch-size")
    assert "kept" not in line and not out.exists()


def test_errors_that_are_not_resources_name_what_is_kept_and_both_ways_on(
    tmp_path, plugin, monkeypatch
):
    # The unfinished store was left without a word, and the next run refused it. Resuming
    # may stop at the same image again, so deleting it is offered too.
    make_cityscapes(tmp_path / "data", count=3)

    def refused():
        raise BLDAError("the model refused this image")

    _fail_forward(monkeypatch, 2, refused)
    result = CliRunner().invoke(
        cli, _dump_arguments(plugin, tmp_path / "data", tmp_path / "o.h5", "--workers", "0")
    )
    line = expect_one_line_error(result, "the model refused this image")
    assert line.endswith(
        f"1 of 3 images kept in {tmp_path / 'o.h5'}.partial: fix the cause and run the same "
        "dump-logits command with --resume, or delete it to start again"
    ), line


def test_dump_with_its_loader_worker_killed_at_once_is_told_in_one_line(
    tmp_path, plugin, monkeypatch
):
    from blda_tools.inference import loader

    make_cityscapes(tmp_path / "data", count=2)
    monkeypatch.setattr(loader, "decode", dying_tasks.killed)  # forked workers run it
    out = tmp_path / "o.h5"
    arguments = _dump_arguments(plugin, tmp_path / "data", out, "--workers", "1")
    result = within(120, lambda: CliRunner().invoke(cli, arguments))
    line = expect_one_line_error(
        result, "image loading: a worker process ended unexpectedly", "fewer --workers"
    )
    assert "kept" not in line and not out.exists()


def test_a_dump_stopped_before_its_first_image_leaves_no_unfinished_store(
    tmp_path, plugin, monkeypatch
):
    from blda_tools.errors import Interrupted

    make_cityscapes(tmp_path / "data", count=2)

    def ctrl_c():
        raise KeyboardInterrupt

    restore = _fail_forward(monkeypatch, 1, ctrl_c)
    out = tmp_path / "o.h5"
    with pytest.raises(Interrupted, match="^dump-logits interrupted before any image was stored$"):
        # one stream: the first forward pass is the first image (two streams race for it)
        dump("dump_test_plugin:build", tmp_path / "data", out, inference=WHOLE, workers=0,
             streams=1)  # fmt: skip
    # an unfinished store of no image would only make the next run ask for --resume
    assert not out.exists() and not partial_path(out).exists()
    restore()
    summary = dump("dump_test_plugin:build", tmp_path / "data", out, inference=WHOLE, workers=0)
    assert summary.images_written == 2


@pytest.mark.parametrize(
    "extra, advice, not_advised",
    [([], "fewer --workers or --grid bins or --no-plots", None),
     (["--no-plots"], "fewer --workers or --grid bins", "--no-plots")],
)  # fmt: skip
def test_the_memory_advice_leaves_out_a_flag_already_given(
    tmp_path, monkeypatch, extra, advice, not_advised
):
    import blda_tools.diagnose as diagnose

    def out_of_memory(*arguments, **keywords):
        raise MemoryError

    monkeypatch.setattr(diagnose, "collect_statistics", out_of_memory)
    inputs = make_inputs(tmp_path / "inputs")
    _register_commands()
    arguments = ["diagnose", str(inputs["store"]), "--out", str(tmp_path / "d"), *extra]
    line = expect_one_line_error(CliRunner().invoke(cli, arguments), f"try {advice}")
    assert not_advised is None or not_advised not in line.split("try ", 1)[1]


@pytest.mark.parametrize(
    "command, named",
    [(["diagnose", "STORE", "--grid", "-5:5:100000"], "--grid: 100,000 BINS"),
     (["diagnose", "STORE", "--grid", "-5:5:100000", "--workers", "2"], "3 sets of"),
     (["calibrate", "STORE", "--grid", "-5:5:100000"], "3 sets of"),
     (["calibrate", "STORE", "--grid", "-5:5:100000", "--anchor-from", "STORE"], "4 sets of"),
     (["calibrate", "STORE", "--table-points", "100000"], "--table-points: 100,000 points")],
)  # fmt: skip
def test_arrays_that_cannot_fit_in_memory_are_refused_before_any_work(
    tmp_path, monkeypatch, command, named
):
    """With 1 MB available, a (C, C, 100000) histogram or table (C = 3: 7.2 MB) cannot fit:
    refused at once, with nothing read and nothing written."""
    from blda_tools.runtime import memory
    from blda_tools.statistics import collect

    inputs = make_inputs(tmp_path / "inputs")
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    monkeypatch.setattr(collect, "_in_workers", lambda store, workers, rows: workers > 1)

    def no_pass(*arguments, **keywords):
        raise AssertionError("a pass over the data began")

    monkeypatch.setattr(collect, "_collect", no_pass)
    _register_commands()
    out = tmp_path / "out"
    arguments = [str(inputs["store"]) if a == "STORE" else a for a in command]
    line = expect_one_line_error(
        CliRunner().invoke(cli, [*arguments, "--out", str(out)]),
        named,
        "more than the 1.0 MB available",
    )
    assert "give fewer" in line and not out.exists()


def test_the_memory_available_is_read_and_no_more_than_the_machine_has():
    from blda_tools.runtime.memory import available_bytes

    available = available_bytes()
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    swap = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("SwapTotal:"):
                swap = int(line.split()[1]) * 1024
    assert isinstance(available, int) and 0 < available <= physical + swap
