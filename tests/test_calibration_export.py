"""`blda export`: the TorchScript module that carries Eq. 7, wrapping a model (TorchScript,
dict outputs, classifiers, outputs with gradients) or standing alone, and its refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from test_calibration_job import _cli, _write_store

from blda_tools.calibrate import CalibrateOptions, calibrate
from blda_tools.calibration.calibrator import Calibrator
from blda_tools.calibration.export import export_torchscript
from blda_tools.errors import BLDAError
from blda_tools.statistics import LogitGrid


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return {"select": _write_store(tmp_path_factory.mktemp("stores") / "select.h5", 2)}


def test_export_wraps_a_torchscript_model(stores, tmp_path):
    options = CalibrateOptions(
        taus="0.5", estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False
    )
    calibrate(stores["select"], tmp_path, options)
    model = torch.jit.script(torch.nn.Conv2d(3, 3, 1))
    model.save(str(tmp_path / "model.pt"))
    wrapped = export_torchscript(
        tmp_path / "calibrator.pt", tmp_path / "w.pt", tmp_path / "model.pt"
    )
    alone = export_torchscript(tmp_path / "calibrator.pt", tmp_path / "a.pt")
    images = torch.randn(2, 3, 5, 7)
    assert torch.equal(wrapped(images), alone(model(images)))
    with pytest.raises(torch.jit.Error, match="NaN"):
        alone(torch.full((1, 3, 2, 2), float("nan")))


class DictOutput(torch.nn.Module):
    """torchvision's segmentation models return their logits as "out" of a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, 3, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(images)
        return {"out": logits, "aux": logits.flip(1)}


class TwoInputs(torch.nn.Module):
    def forward(self, images: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        return images + depth


def test_export_wraps_a_model_with_dict_output_and_refuses_other_signatures(stores, tmp_path):
    options = CalibrateOptions(
        taus="0.5", estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False
    )
    calibrate(stores["select"], tmp_path, options)
    model = torch.jit.script(DictOutput())
    model.save(str(tmp_path / "dict.pt"))
    wrapped = export_torchscript(
        tmp_path / "calibrator.pt", tmp_path / "w.pt", tmp_path / "dict.pt"
    )
    alone = export_torchscript(tmp_path / "calibrator.pt", tmp_path / "a.pt")
    images = torch.randn(2, 3, 5, 7)
    assert torch.equal(wrapped(images), alone(model(images)["out"]))
    torch.jit.script(TwoInputs()).save(str(tmp_path / "two.pt"))
    result = CliRunner().invoke(
        _cli(), ["export", str(tmp_path / "calibrator.pt"), "--out", str(tmp_path / "t.pt"),
              "--model", str(tmp_path / "two.pt")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --model {tmp_path / 'two.pt'}: expected a model")
    assert "Tensor depth" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "t.pt").exists()


def test_the_exported_module_takes_classifier_logits_too(stores, tmp_path):
    options = CalibrateOptions(
        taus="0.7", n_components=2, min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False
    )
    calibrate(stores["select"], tmp_path, options)
    module = export_torchscript(tmp_path / "calibrator.pt", tmp_path / "m.pt")
    logits = 3 * torch.randn(500, 3, generator=torch.Generator().manual_seed(4))
    scores = module(logits)  # (B, C): one row of class scores per image
    assert scores.shape == (500, 3)
    # the same values as pixels of a (B, C, 1, 1) map, and the certified predictions of
    # `Calibrator.predict` (another implementation: bounds, then exact scores where undecided)
    assert torch.equal(scores, module(logits[:, :, None, None])[:, :, 0, 0])
    predicted = Calibrator.load(tmp_path / "calibrator.pt").predict(logits, tau=0.7)
    assert torch.equal(scores.argmax(1), predicted)
    with pytest.raises(torch.jit.Error, match=r"\(B, 3, H, W\) or \(B, 3\), got \[2, 4\]"):
        module(torch.zeros(2, 4))


def test_the_exported_module_keeps_working_after_a_model_output_with_gradients(stores, tmp_path):
    calibrate(stores["select"], tmp_path, CalibrateOptions(
        taus="0.5", estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400),
        plots=False,
    ))  # fmt: skip
    export_torchscript(tmp_path / "calibrator.pt", tmp_path / "m.pt")
    # a fresh process: TorchScript's profiling state is per process, and users call the module
    # on their model's output (which has a grad_fn) before anything else
    script = (
        "import torch\n"
        f"module = torch.jit.load({str(tmp_path / 'm.pt')!r})\n"
        "model = torch.nn.Conv2d(3, 3, 1)\n"
        "images, maps, rows = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 4, 4), torch.randn(9, 3)\n"
        "before = module(maps)\n"
        "module(model(images))\n"
        "module(model(images))\n"
        "assert torch.equal(module(maps), before)\n"
        "assert torch.equal(module(rows), module(rows[:, :, None, None])[:, :, 0, 0])\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)


def test_export_refuses_a_model_with_another_class_count_before_writing(stores, tmp_path):
    options = CalibrateOptions(
        taus="0.5", estimator="empirical", min_samples=20, grid=LogitGrid(-20, 20, 400), plots=False
    )
    calibrate(stores["select"], tmp_path, options)  # three classes
    torch.jit.script(torch.nn.Conv2d(3, 5, 1)).save(str(tmp_path / "five.pt"))
    with pytest.raises(BLDAError, match="five.pt: gives logits of 5 classes, the calibrator has 3"):
        export_torchscript(tmp_path / "calibrator.pt", tmp_path / "e.pt", tmp_path / "five.pt")
    assert not (tmp_path / "e.pt").exists()
