"""Training checkpoints: atomic writes, tensors and primitive types only, exact resume.

Layout (the weights part is mmseg-like, so `blda_tools.models.load_checkpoint` reads ours as it
reads DAFormer's):
    {"state_dict": {"model.<key>": tensor, "ema_model.<key>": tensor},
     "meta": {"iteration", "config" (resolved TOML text), "arch", "class_names", "best_miou", ...},
     "optimizer", "scheduler", "scaler", "loss": state dicts,
     "rng": {"python", "numpy", "torch", "cuda"}, "sampler": {"seed", "next_micro_step"}}
Everything loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.fileio import save_torch
from blda_tools.torch_files import load_torch


def weights_state_dict(student: nn.Module, teacher: nn.Module | None) -> dict[str, torch.Tensor]:
    """`model.<key>` for the student and `ema_model.<key>` for the teacher, as in mmseg UDA."""
    state = {f"model.{k}": v.detach().clone() for k, v in student.state_dict().items()}
    if teacher is not None:
        state.update(
            {f"ema_model.{k}": v.detach().clone() for k, v in teacher.state_dict().items()}
        )
    return state


def split_weights(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def capture_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) global generator states as tensors / primitives."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global state is what others use)
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _rng_parts(state: dict) -> tuple[tuple, tuple, torch.Tensor]:
    """The Python, numpy and torch states of a `capture_rng_state` dict, as their setters
    take them."""
    version, python_state, gauss = state["python"]
    name, keys, position, has_gauss, cached = state["numpy"]
    numpy_state = (name, keys.numpy().astype(np.uint32), position, has_gauss, cached)
    return (version, tuple(python_state), gauss), numpy_state, state["torch"]


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    python_state, numpy_state, torch_state = _rng_parts(state)
    random.setstate(python_state)
    np.random.set_state(numpy_state)  # noqa: NPY002
    torch.set_rng_state(torch_state)
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Write `checkpoint` atomically (a partial file never carries the final name)."""
    save_torch(checkpoint, path)


def load_training_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`, safely (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise BLDAError(f"{path}: no checkpoint to resume from (expected a file)")
    checkpoint = load_torch(path, str(path), "a blda training checkpoint")
    if not isinstance(checkpoint, dict):
        raise BLDAError(f"{path}: not a blda training checkpoint (expected a dict)")
    missing = {"state_dict", "meta", "optimizer", "rng", "sampler"} - set(checkpoint)
    if missing:
        raise BLDAError(
            f"{path}: not a blda training checkpoint (missing {', '.join(sorted(missing))})"
        )
    return checkpoint


# What parts of a checkpoint that do not fit the run raise in `load_state_dict`, the
# optimiser's and scheduler's loaders and the generators' setters.
_MISFIT = (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError)


def resume_into(trainer, path: str | Path, iterations: int) -> dict:
    """Load the training checkpoint `path` into `trainer` (`Trainer.load`); returns its RNG
    state, checked here and restored later (`run_loop`). A checkpoint of another run (another
    architecture, loss or optimiser) or one damaged inside gets one line naming it, not the
    loaders' exceptions."""
    checkpoint = load_training_checkpoint(path)
    try:
        trainer.load(checkpoint)
        _check_rng_state(checkpoint["rng"])
    except _MISFIT as error:
        lines = str(error).strip().splitlines()
        cause = lines[0][:300] if lines else type(error).__name__
        raise BLDAError(
            f"{path}: does not fit this run ({cause}); it was written by another configuration "
            "or is damaged: resume with the run it belongs to, or train into a new --work-dir"
        ) from None
    if not 0 <= trainer.iteration <= iterations:
        raise BLDAError(
            f"{path}: records iteration {trainer.iteration}, outside this run's 0 to "
            f"{iterations} (run.iterations): not this run's checkpoint, or damaged"
        )
    return checkpoint["rng"]


def _check_rng_state(state: dict) -> None:
    """Raise as `restore_rng_state` would, on fresh generators (the global ones untouched)."""
    python_state, numpy_state, torch_state = _rng_parts(state)
    random.Random().setstate(python_state)
    np.random.RandomState().set_state(numpy_state)
    torch.Generator().set_state(torch_state)
