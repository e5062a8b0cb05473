"""Every file blda reads with torch.load or torch.jit.load fails on bad input with one line that
names the file and what was expected: a text file, an HDF5 store, a truncated archive, a zip
that torch did not write, a TorchScript archive where a saved state belongs, a corrupt pickle,
a pickle of arbitrary Python objects (refused by weights_only=True, naming the class, and
offering --trust-checkpoint where there is one), a folder, a missing file; and a command given
such a file prints that line alone."""

from __future__ import annotations

import io
import sys
import zipfile

import pytest
import torch
from click.testing import CliRunner
from test_calibration_job import _write_store

from blda_cli.main import _register_commands, cli
from blda_tools.calibration.calibrator import Calibrator
from blda_tools.errors import BLDAError
from blda_tools.gmm.mixture import GaussianMixture1D
from blda_tools.models.checkpoints import read_checkpoint
from blda_tools.torch_files import load_torch, load_torchscript
from blda_tools.training.checkpoint import load_training_checkpoint

_register_commands()


class Arbitrary:
    """Unpickling it needs full pickle: weights_only=True refuses it."""


class RunsACommand:
    """A pickle that would run a shell command: torch blocks the module `os.system` lives in
    (posix), with a message of its own."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def _torch_bytes(content) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    archive = _torch_bytes({"weights": torch.zeros(64, 64)})
    contents = {
        "notes.txt": b"not a torch file\n",
        "store.h5": b"\x89HDF\r\n\x1a\n" + bytes(64),
        "truncated.pt": archive[: len(archive) // 2],
        "corrupt.pt": b"\x80\x02garbage that is no pickle",
        "objects.pt": _torch_bytes({"meta": Arbitrary()}),
        "command.pt": _torch_bytes({"meta": RunsACommand()}),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(folder / "script.pt"))
    with zipfile.ZipFile(folder / "other.zip", "w") as archive:  # a zip, but not torch's
        archive.writestr("notes/readme.txt", "hello")
    (folder / "folder.pt").mkdir()
    return folder


CASES = {
    "notes.txt": "expected a file written by torch.save",
    "store.h5": "expected a file written by torch.save",
    "truncated.pt": "a truncated or corrupt zip archive",
    "corrupt.pt": "a corrupt pickle",
    "script.pt": "a TorchScript archive, not",
    "other.zip": "cannot be read as",
    "objects.pt": "stores Python objects beyond tensors and plain containers",
    "command.pt": "stores Python objects beyond tensors and plain containers (posix.system)",
    "folder.pt": "is a directory",
    "absent.pt": "no such file",
}
LOADERS = {
    "calibrator": (Calibrator.load, "a blda calibrator file"),
    "mixture": (GaussianMixture1D.load, "a saved GaussianMixture1D"),
    "checkpoint": (read_checkpoint, "a PyTorch checkpoint"),
    "training checkpoint": (load_training_checkpoint, "a blda training checkpoint"),
}


def _assert_one_line(message: str, name: str, fragment: str) -> None:
    assert "\n" not in message, message
    assert message.split(": ")[0].endswith(name), message  # the file first, by name
    assert fragment in message, (fragment, message)
    # torch's advice to its own users (re-run with weights_only=False, file an issue) is not ours
    assert "weights_only" not in message and "file an issue" not in message, message


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_torch_files_fail_with_one_line(bad_files, loader, name):
    load, expected = LOADERS[loader]
    if loader == "training checkpoint" and name in ("folder.pt", "absent.pt"):
        fragment = "no checkpoint to resume from"  # its own hint for --resume
    else:
        fragment = CASES[name]
    with pytest.raises(BLDAError) as raised:
        load(bad_files / name)
    message = str(raised.value)
    _assert_one_line(message, name, fragment)
    if name in ("notes.txt", "store.h5", "truncated.pt", "corrupt.pt", "script.pt", "other.zip"):
        assert expected in message, message
    if name == "objects.pt":  # the class that would need full unpickling, by name
        assert "test_torch_files.Arbitrary" in message, message


def test_a_torchscript_checkpoint_points_to_the_torchscript_model(bad_files):
    with pytest.raises(BLDAError, match="a TorchScript archive.*--model torchscript"):
        read_checkpoint(bad_files / "script.pt")


def test_only_checkpoints_offer_to_trust_a_pickle(bad_files):
    with pytest.raises(BLDAError, match="--trust-checkpoint"):
        read_checkpoint(bad_files / "objects.pt")
    with pytest.raises(BLDAError) as raised:
        Calibrator.load(bad_files / "objects.pt")
    assert "trust" not in str(raised.value)


def test_a_plain_torch_file_still_loads(tmp_path):
    (tmp_path / "plain.pt").write_bytes(_torch_bytes({"a": torch.arange(3), "b": [1, "x"]}))
    loaded = load_torch(tmp_path / "plain.pt", "plain.pt", "a file")
    assert torch.equal(loaded["a"], torch.arange(3)) and loaded["b"] == [1, "x"]


@pytest.mark.parametrize("name", ["notes.txt", "objects.pt", "truncated.pt", "folder.pt"])
def test_bad_torchscript_files_fail_with_one_line(bad_files, name):
    with pytest.raises(BLDAError) as raised:
        load_torchscript(bad_files / name, f"--checkpoint {bad_files / name}")
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"--checkpoint {bad_files / name}: ")


@pytest.mark.parametrize("name", ["store.h5", "corrupt.pt", "objects.pt"])
def test_calibrate_apply_with_a_bad_calibrator_prints_one_line_and_no_progress(
    bad_files, tmp_path, name
):
    store = _write_store(tmp_path / "val.h5", 1)
    result = CliRunner().invoke(
        cli, ["calibrate", "--apply", str(bad_files / name), str(store), "--out",
              str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad_files / name}: "), lines
    assert not (tmp_path / "out").exists()


def test_a_trusted_pickle_whose_classes_cannot_be_imported_is_one_line(tmp_path, monkeypatch):
    # as an mmcv checkpoint's meta (an mmcv Config) where mmcv is not installed
    (tmp_path / "gone_package.py").write_text("class Config:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_package

    torch.save({"state_dict": {}, "meta": gone_package.Config()}, tmp_path / "ckpt.pth")
    monkeypatch.delitem(sys.modules, "gone_package")
    (tmp_path / "gone_package.py").unlink()
    with pytest.raises(BLDAError, match=r"--checkpoint ckpt.pth: unpickling needs a class .*"
                       "gone_package"):  # fmt: skip
        load_torch(tmp_path / "ckpt.pth", "--checkpoint ckpt.pth", "a checkpoint", trusted=True)
    # a class the saving script defined in its __main__
    (tmp_path / "gone_package.py").write_text("class Config:\n    pass\n")
    monkeypatch.setattr(gone_package.Config, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "Config", gone_package.Config, raising=False)
    torch.save({"meta": gone_package.Config()}, tmp_path / "main.pth")
    monkeypatch.delattr(sys.modules["__main__"], "Config")
    with pytest.raises(BLDAError, match="unpickling needs a class this Python cannot import"):
        load_torch(tmp_path / "main.pth", "--checkpoint", "a checkpoint", trusted=True)


def test_a_state_dict_written_by_pickle_dump_is_named_as_such(tmp_path):
    # "a corrupt pickle: Unsupported operand 149", after a stray torch warning on its protocol
    import pickle
    import warnings

    path = tmp_path / "pickled.pth"
    with open(path, "wb") as file:
        pickle.dump({"weights": torch.zeros(2)}, file, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the way
        with pytest.raises(BLDAError) as raised:
            read_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"--checkpoint {path}: a file written by pickle.dump, not "), message
    assert "corrupt" not in message and "--trust-checkpoint" in message
