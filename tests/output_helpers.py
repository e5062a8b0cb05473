"""Shared by the output tests: small inputs for every command, each command's arguments for a
given output path, and the checks of a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

from test_calibration_job import GRID, _write_store

from blda_tools.calibrate import CalibrateOptions, calibrate
from blda_tools.statistics import LogitGrid


def make_inputs(folder: Path) -> dict[str, Path]:
    """A labelled store, a calibrator fitted on it and a run directory with a training log."""
    store = _write_store(folder / "eval.h5", 1)
    calibrate(
        store,
        folder / "fit",
        CalibrateOptions(
            taus="0.5", estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400),
            plots=False,
        ),
    )  # fmt: skip
    run = folder / "run"
    run.mkdir()
    records = [{"kind": "train", "iteration": i, "losses": {"ce": 1.0 / i}} for i in (1, 2, 3)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"store": store, "calibrator": folder / "fit" / "calibrator.pt", "run": run}


def command_lines(inputs, out: Path) -> dict[str, list[str]]:
    """Each command writing to `out` (a directory, or the file for single-file commands)."""
    store, calibrator = str(inputs["store"]), str(inputs["calibrator"])
    return {
        "diagnose": ["diagnose", store, "--out", str(out), "--grid", GRID],
        "calibrate": [
            "calibrate",
            store,
            "--out",
            str(out),
            "--tau",
            "0,1",
            "--grid",
            GRID,
            "--estimator",
            "empirical",
            "--min-samples",
            "20",
        ],  # fmt: skip
        "apply": ["calibrate", store, "--apply", calibrator, "--out", str(out)],
        "export": ["export", calibrator, "--out", str(out.with_suffix(".pt"))],
        "plot-log": ["plot-log", str(inputs["run"]), "--out", str(out.with_suffix(".png"))],
        "synthcity": ["synthcity", "make", "--out", str(out), "--images", "2", "--size", "32x64"],
        "demo": ["demo", "--out", str(out), "--quick"],
    }


def expect_one_line_error(result, *fragments) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    # nothing after it: a message that runs on over several lines (torch's advice) is not one line
    assert not result.output.split(lines[0], 1)[1].strip(), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
