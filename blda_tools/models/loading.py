"""`load_model`: what the CLI's `--model` / `--checkpoint` options resolve to.

`--model` is a registered architecture, `torchscript` (the checkpoint is a TorchScript archive)
or `package.module:factory`, a user's function returning an `nn.Module` (a plugin). A plugin
factory may declare the test protocol of its family with a `test_protocol` attribute
(`factory.test_protocol = "daformer"`, see `blda_tools.inference.protocols`) and
`factory.task = "classification"` for a whole-image classifier.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings

import torch
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.models.checkpoints import LoadReport, load_checkpoint
from blda_tools.models.registry import create_model
from blda_tools.torch_files import load_torchscript

TORCHSCRIPT = "torchscript"


def load_model(
    arch_or_spec: str,
    num_classes: int,
    checkpoint: str | os.PathLike | None = None,
    weights: str = "student",
    trust_checkpoint: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Build (or load) the model named by `arch_or_spec`, load `checkpoint` into it and
    return it in eval mode, ready for inference (training code calls `.train()` itself).

    With `strict=False`, keys that could not be loaded are reported in a warning.

        >>> import torch
        >>> from blda_tools.models import load_model, normalize
        >>> model = load_model("tiny", num_classes=19)  # add checkpoint="model.pth"
        >>> images = torch.zeros(1, 3, 64, 128, dtype=torch.uint8)
        >>> with torch.no_grad():
        ...     logits = model(normalize(images))
        >>> tuple(logits.shape), model.training
        ((1, 19, 16, 32), False)
    """
    if arch_or_spec == TORCHSCRIPT:
        return _load_torchscript(checkpoint).eval()
    if ":" in arch_or_spec:
        model = _build_plugin(arch_or_spec, num_classes)
    else:
        model = create_model(arch_or_spec, num_classes)
    if checkpoint is not None:
        report = load_checkpoint(model, checkpoint, weights, trust_checkpoint, strict=strict)
        _warn_partial(report, checkpoint)
    return model.eval()


def declared_family(arch_or_spec: str) -> tuple[str | None, str | None]:
    """`(test_protocol, task)` that `arch_or_spec`'s family declares, without building its
    weights (a registered architecture is built on the meta device; a plugin factory's
    `test_protocol` / `task` attributes are read). `task` is "segmentation" or
    "classification" (one score row per image); None where not known before running
    (TorchScript, a plugin that declares nothing)."""
    if arch_or_spec == TORCHSCRIPT:
        return None, None
    if ":" in arch_or_spec:
        factory = _plugin_factory(arch_or_spec)
        return getattr(factory, "test_protocol", None), getattr(factory, "task", None)
    with torch.device("meta"):
        model = create_model(arch_or_spec, 1)
    return getattr(model, "test_protocol", None), getattr(model, "task", "segmentation")


def _load_torchscript(checkpoint: str | os.PathLike | None) -> nn.Module:
    if checkpoint is None:
        raise BLDAError("--model torchscript: needs --checkpoint FILE (the TorchScript archive)")
    return load_torchscript(
        checkpoint,
        f"--checkpoint {checkpoint}",
        "save one with torch.jit.script(model).save(path), or pass the architecture name",
    )


def _build_plugin(spec: str, num_classes: int) -> nn.Module:
    factory = _plugin_factory(spec)
    module_name, _, factory_name = spec.partition(":")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_num_classes = "num_classes" in parameters or any(
        p.kind == p.VAR_KEYWORD for p in parameters.values()
    )
    try:
        model = factory(num_classes=num_classes) if takes_num_classes else factory()
    except BLDAError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is reported as one line
        raise BLDAError(
            f"--model {spec}: the factory {module_name}.{factory_name} raised {_one_line(error)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise BLDAError(
            f"--model {spec}: the factory returned {type(model).__name__}, expected a torch nn.Module"
        )
    return model


def _plugin_factory(spec: str):
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise BLDAError(f"--model {spec}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BLDAError(
            f"--model {spec}: cannot import module {module_name!r} ({error}); "
            "is it installed or on PYTHONPATH?"
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        raise BLDAError(
            f"--model {spec}: importing module {module_name!r} raised {_one_line(error)}"
        ) from None
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise BLDAError(f"--model {spec}: module {module_name} has no callable {factory_name!r}")
    return factory


def _one_line(error: BaseException) -> str:
    """`TypeName: first line of the message` of an exception from the user's code."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return type(error).__name__ + (f": {message}" if message else "")


def _warn_partial(report: LoadReport, checkpoint: str | os.PathLike) -> None:
    if report.missing or report.unexpected:
        warnings.warn(
            f"{checkpoint}: loaded partially; missing: {', '.join(report.missing) or 'none'}; "
            f"unexpected: {', '.join(report.unexpected) or 'none'}",
            UserWarning,
            stacklevel=3,
        )
