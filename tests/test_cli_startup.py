"""`blda --help`, `--version` and `COMMAND --help` import no heavy library (issue 16, section 3).

Each case runs the real entry point in a fresh interpreter and reads `sys.modules` afterwards:
what was imported is the truth, not a timing (the wall time is measured by
benchmarks/bench_cli_startup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from blda_cli import commands

HEAVY = ("torch", "scipy", "matplotlib", "numba", "h5py", "sklearn", "cv2", "PIL")

_PROBE = """
import json, sys
from blda_cli.main import main
arguments, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["blda", *arguments]
try:
    main()
except SystemExit as stop:
    code = stop.code
else:
    code = 0
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(heavy))
sys.stderr.write("\\nPROBE " + json.dumps({"code": code, "loaded": loaded}) + "\\n")
"""


def _invocations() -> list[list[str]]:
    """`--help`, `--version`, and `--help` of every command and sub-command."""
    cases = [["--help"], ["--version"]]
    for command in commands.ALL:
        cases.append([command.name, "--help"])
        for sub in getattr(command, "commands", {}):
            cases.append([command.name, sub, "--help"])
    return cases


def _probe(arguments: list[str]) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(arguments), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = [row for row in completed.stderr.splitlines() if row.startswith("PROBE ")]
    assert line, completed.stderr
    return {**json.loads(line[-1][len("PROBE ") :]), "stdout": completed.stdout}


@pytest.mark.parametrize("arguments", _invocations(), ids=" ".join)
def test_help_imports_no_heavy_module(arguments):
    result = _probe(arguments)
    assert result["code"] == 0
    assert result["stdout"].strip(), "printed nothing"
    assert result["loaded"] == [], f"blda {' '.join(arguments)} imported {result['loaded']}"


def test_every_command_is_probed():
    # The probe list follows the registered commands, so a new command is checked too.
    names = {case[0] for case in _invocations() if len(case) > 1}
    assert {"demo", "dump-logits", "diagnose", "calibrate", "export", "train"} <= names
    assert {"plot-log", "synthcity"} <= names


def test_a_command_that_runs_does_import_the_library():
    # The probe can see an import: a real command (here with a missing store) loads the library.
    result = _probe(["diagnose", "/nonexistent/store.h5", "--out", "/nonexistent/out"])
    assert result["code"] == 2
    assert "h5py" in result["loaded"]


def test_diagnose_runs_without_torch(tmp_path):
    # torch's import is a second of `blda diagnose`'s few (performance issue): the statistics,
    # metrics, plots and report need numpy, numba and h5py only.
    from blda_tools.store import LogitWriter

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 5000)
    logits = rng.normal(size=(5000, 3)).astype(np.float32)
    logits[np.arange(5000), labels] += 2
    with LogitWriter(tmp_path / "store.h5", ["a", "b", "c"]) as writer:
        writer.add(logits, labels, name="image")
    result = _probe(["diagnose", str(tmp_path / "store.h5"), "--out", str(tmp_path / "out")])
    assert result["code"] == 0, result["stdout"]
    assert (tmp_path / "out" / "report.html").is_file()
    assert "torch" not in result["loaded"]
    assert "numba" in result["loaded"]


@pytest.mark.parametrize("package", ["blda_tools.datasets", "blda_tools.inference"])
def test_lazy_packages_resolve_every_public_name(package):
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_dataset_registry_names_real_classes():
    from blda_tools.datasets import DATASETS, dataset_class, list_datasets
    from blda_tools.datasets.base import SegmentationDataset
    from blda_tools.datasets.cityscapes import CityscapesDataset
    from blda_tools.datasets.classification import ImageFolderDataset

    assert list_datasets() == list(DATASETS)
    assert dataset_class("cityscapes") is CityscapesDataset
    assert dataset_class("image-folder") is ImageFolderDataset
    for name in list_datasets():
        assert issubclass(dataset_class(name), SegmentationDataset), name


def test_inference_modes_are_the_ones_predict_checks():
    from blda_tools.errors import BLDAError
    from blda_tools.inference import MODES
    from blda_tools.inference.predict import InferenceSettings

    for mode in MODES:
        assert InferenceSettings(mode=mode).mode == mode
    with pytest.raises(BLDAError, match="--mode"):
        InferenceSettings(mode="tiles")
