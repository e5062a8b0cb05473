"""Output that is not a terminal (a log file, CI): plain progress lines, no control codes, tables
that keep class names whole at any width, notes on one line (issue 16, section 3).

The commands run as subprocesses with stdout and stderr on pipes (not terminals) and COLUMNS
unset, as in a CI job; progress lines every 0 s so even a short run prints several."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blda_tools.runtime.progress import PlainProgress, clock, human_count

REPO = Path(__file__).resolve().parents[1]
STORES = REPO / "sample_data" / "stores"
needs_sample = pytest.mark.skipif(not STORES.is_dir(), reason="needs sample_data/")


def _blda(*arguments) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    environment["BLDA_PROGRESS_INTERVAL"] = "0"
    completed = subprocess.run(
        [sys.executable, "-c", "from blda_cli.main import main; main()", *map(str, arguments)],
        capture_output=True, text=True, env=environment, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _assert_plain(text: str) -> None:
    assert "\r" not in text and "\x1b" not in text, "terminal control codes in a log"


def _table_rows(text: str) -> dict[str, str]:
    """First cell -> whole line, for every table row."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            rows[line.split("│")[1].strip()] = line
    return rows


def test_plain_progress_lines_count_rate_and_end_once():
    stream = io.StringIO()
    progress = PlainProgress("job", 200, "px", interval=0.0, stream=stream)
    progress.advance(50)
    progress.advance(150)
    progress.close()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # one per advance; the end adds none (nothing new since)
    assert re.fullmatch(r"job: 50/200 px \(25%\), \S+ px/s, 0:00:00 elapsed, ETA \S+", lines[0])
    assert re.fullmatch(r"job: 200/200 px \(100%\), \S+ px/s, 0:00:00 elapsed", lines[1])
    assert human_count(12345.6) == "12.3k" and human_count(2.5e6) == "2.5M"
    assert human_count(7.25) == "7.2" and human_count(42.0) == "42"
    assert clock(3725) == "1:02:05"


def test_plain_progress_without_a_total_and_a_quiet_interval():
    stream = io.StringIO()
    progress = PlainProgress("scan", None, "rows", interval=3600.0, stream=stream)
    progress.advance(7)
    assert stream.getvalue() == ""  # within the interval: nothing yet
    progress.close()
    assert re.fullmatch(r"scan: 7 rows, \S+ rows/s, 0:00:00 elapsed\n", stream.getvalue())


def test_plain_progress_of_a_job_that_counted_nothing_ends_silently():
    # e.g. a job that fails on its input: its error is the only line
    stream = io.StringIO()
    progress = PlainProgress("apply", 81920, "px", interval=0.0, stream=stream)
    progress.close()
    assert stream.getvalue() == ""
    resumed = PlainProgress("dump", 10, "images", completed=4, interval=3600.0, stream=stream)
    resumed.close()
    assert stream.getvalue() == ""
    resumed = PlainProgress("dump", 10, "images", completed=4, interval=3600.0, stream=stream)
    resumed.advance(1)
    resumed.close()
    assert re.fullmatch(r"dump: 5/10 images \(50%\), .*\n", stream.getvalue())


@needs_sample
def test_diagnose_in_a_log(tmp_path):
    completed = _blda("diagnose", STORES / "target_val.h5", "--out", tmp_path / "d", "--no-plots")
    err = completed.stderr
    _assert_plain(err + completed.stdout)
    assert re.search(r"^diagnose: [\d,]+/81,920 px \(\d+%\)", err, re.MULTILINE)
    assert re.search(r"^diagnose: 81,920/81,920 px \(100%\)", err, re.MULTILINE)
    rows = _table_rows(err)
    # 19 classes, each on one line, two-word names whole, every column there (8 cells).
    assert len(rows) == 19 and "traffic light" in rows and "traffic sign" in rows
    assert all(line.count("│") == 9 for line in rows.values())
    assert f"blda calibrate {STORES / 'target_val.h5'} --out {tmp_path / 'calibration'}" in err


@needs_sample
def test_calibrate_in_a_log(tmp_path):
    val, train = STORES / "target_val.h5", STORES / "target_train.h5"
    out = tmp_path / "c"
    completed = _blda(
        "calibrate", val, "--fit-on", train, "--select-on", train, "--estimator", "empirical",
        "--tau", "0:1:0.5", "--no-plots", "--out", out,
    )  # fmt: skip
    err = completed.stderr
    _assert_plain(err + completed.stdout)
    assert re.search(r"^calibrate \(all passes\): [\d,]+/[\d,]+ px \(\d+%\)", err, re.MULTILINE)
    rows = _table_rows(err)
    assert "traffic light" in rows and "mean" in rows
    assert all(line.count("│") == 6 for line in rows.values())
    # Every note is one line, however long.
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes and all(line.endswith((".", ")")) for line in notes), notes
    assert f"blda calibrate --apply {out / 'calibrator.pt'} {val} --out" in err
    assert f"blda export {out / 'calibrator.pt'} --out {tmp_path / 'balanced.pt'}" in err


def test_synthcity_make_in_a_log(tmp_path):
    completed = _blda("synthcity", "make", "--out", tmp_path / "s", "--images", "4",
                      "--size", "32x64")  # fmt: skip
    _assert_plain(completed.stderr + completed.stdout)
    assert re.search(r"^synthcity: 8/8 images \(100%\)", completed.stderr, re.MULTILINE)
    rows = _table_rows(completed.stdout)
    assert {"source", "target/train", "target/val"} <= set(rows)
    assert all(line.count("│") == 6 for line in rows.values())


def test_library_warnings_reach_the_terminal_as_one_line_each():
    # train's model.trust_checkpoint warning came with the library's file, line and source
    code = (
        "import sys, warnings; from blda_cli import main as m; m._register_commands = lambda: 0;"
        " m.show_library_notices = lambda: 0; m.cli = lambda: warnings.warn('careful', "
        "UserWarning); m.main()"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=120)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == "warning: careful\n"


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_progress_interval_that_is_not_seconds_is_said_and_the_default_used(monkeypatch, value):
    # it was ignored without a word
    from blda_tools.runtime.progress import plain_interval

    monkeypatch.setenv("BLDA_PROGRESS_INTERVAL", value)
    with pytest.warns(UserWarning, match=f"BLDA_PROGRESS_INTERVAL='{value}': expected seconds"):
        assert plain_interval() == 10.0
    monkeypatch.setenv("BLDA_PROGRESS_INTERVAL", "2.5")
    assert plain_interval() == 2.5
