"""`blda export`: a calibrator as a self-contained TorchScript module.

The module maps logits ``(B, C, H, W)`` (segmentation) or ``(B, C)`` (classification) to the
log scores of Eq. 7 ("balanced logits") of the same shape, whose argmax over C is the calibrated
prediction; with a TorchScript model first it maps images to balanced logits instead. It scripts the very functions `blda calibrate --apply` runs
(`blda_tools.calibration.balanced_log_scores_blocks`), with the offset table as
buffers, so it loads with ``torch.jit.load`` alone, without blda installed.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from blda_tools.calibration.calibrator import (
    BLOCK_PIXELS,
    Calibrator,
    balanced_log_scores_blocks,
    check_tau,
)
from blda_tools.errors import BLDAError
from blda_tools.fileio import save_torchscript
from blda_tools.outputs import output_file
from blda_tools.torch_files import load_torchscript


class BalancedLogits(torch.nn.Module):
    """Logits ``(B, C, H, W)`` or ``(B, C)`` -> Eq. 7 log scores of that shape (float32, no
    gradient)."""

    def __init__(self, calibrator: Calibrator, tau: float) -> None:
        super().__init__()
        rows, low, inv_step, high, adjusted_lc = calibrator.kernel_tensors()
        self.register_buffer("rows", rows.clone())
        self.register_buffer("low", low.clone())
        self.register_buffer("inv_step", inv_step.clone())
        self.register_buffer("high", high.clone())
        self.register_buffer("adjusted_lc", adjusted_lc.clone())
        self.tau = float(tau)
        self.block = BLOCK_PIXELS
        self.class_names = list(calibrator.class_names)

    def forward(self, logits: Tensor) -> Tensor:
        classes = len(self.class_names)
        if logits.dim() not in (2, 4) or logits.shape[1] != classes:
            raise RuntimeError(
                "expected logits of shape (B, " + str(classes) + ", H, W) or (B, "
                + str(classes) + "), got " + str(list(logits.shape))
            )  # fmt: skip
        # Post-hoc: no gradient flows. detach() alone is not enough once TorchScript's profiling
        # executor has seen a model's output (a tensor with a grad_fn): every later call failed
        # in the in-place scratch arithmetic ("functions with out=... arguments don't support
        # automatic differentiation").
        with torch.no_grad():
            flat = logits.detach().to(torch.float32)
            if logits.dim() == 4:
                flat = flat.permute(0, 2, 3, 1).reshape(-1, classes)
            flat = flat.contiguous()
            if not bool(torch.isfinite(flat).all()):
                raise RuntimeError("logits contain NaN or infinite values")
            scores = balanced_log_scores_blocks(
                flat,
                self.rows,
                self.low,
                self.inv_step,
                self.high,
                self.adjusted_lc,
                self.tau,
                self.block,
            )
        if logits.dim() == 2:
            return scores
        batch, height, width = logits.shape[0], logits.shape[2], logits.shape[3]
        return scores.view(batch, height, width, classes).permute(0, 3, 1, 2).contiguous()


class BalancedModel(torch.nn.Module):
    """A TorchScript segmentation model followed by `BalancedLogits` (images -> balanced logits)."""

    def __init__(self, model: torch.nn.Module, balancer: BalancedLogits) -> None:
        super().__init__()
        self.model = model
        self.balancer = balancer

    def forward(self, images: Tensor) -> Tensor:
        return self.balancer(self.model(images))


class BalancedOutModel(BalancedModel):
    """`BalancedModel` for a model that returns a dict of maps whose logits are "out"
    (torchvision's segmentation models; `dump-logits` reads them the same way)."""

    def forward(self, images: Tensor) -> Tensor:
        return self.balancer(self.model(images)["out"])


def _model_wrapper(model, where: str) -> type[BalancedModel]:
    """The wrapper of TorchScript `model`: its forward must take one image tensor (further
    arguments with defaults) and return a logits tensor, or a dict of them with "out"."""
    schema = model.forward.schema
    required = [argument for argument in schema.arguments[1:] if not argument.has_default_value()]
    returns = [str(value.type) for value in schema.returns]
    takes_images = len(required) == 1 and str(required[0].type) == "Tensor"
    if takes_images and returns == ["Tensor"]:
        return BalancedModel
    if takes_images and returns == ["Dict[str, Tensor]"]:
        return BalancedOutModel
    raise BLDAError(
        f"{where}: expected a model whose forward takes an image tensor and returns a logits "
        f"tensor (or a dict with them as 'out'); its forward is {schema}"
    )


# The image a model's class count is read from at export (a model that cannot take it is
# exported unchecked: the exported module still checks its logits' shape when it runs).
PROBE_IMAGE = (1, 3, 64, 64)


def _check_model_classes(model, num_classes: int, where: str) -> None:
    """Refuse a model whose logits have another class count than the calibrator's, now
    rather than when the exported module first runs."""
    try:
        with torch.no_grad():
            output = model(torch.zeros(PROBE_IMAGE))
    except Exception:  # noqa: BLE001 (a model that needs other input: unchecked, see above)
        return
    logits = output.get("out") if isinstance(output, dict) else output
    if isinstance(logits, Tensor) and logits.dim() in (2, 4) and logits.shape[1] != num_classes:
        raise BLDAError(
            f"{where}: gives logits of {logits.shape[1]} classes, the calibrator has "
            f"{num_classes}; export the model that made the calibrated stores"
        )


def export_torchscript(
    calibrator_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    tau: float | None = None,
) -> torch.jit.ScriptModule:
    """Script the calibrator (optionally after a TorchScript model) and save it to `out_path`
    (a file `blda export` owns, `outputs.output_file`)."""
    calibrator = Calibrator.load(calibrator_path)
    tau = calibrator.tau if tau is None else check_tau(tau, "--tau")
    module: torch.nn.Module = BalancedLogits(calibrator, tau)
    if model_path is not None:
        where = f"--model {model_path}"
        model = load_torchscript(model_path, where)
        _check_model_classes(model, calibrator.num_classes, where)
        module = _model_wrapper(model, where)(model, module)
    scripted = torch.jit.script(module)
    with output_file(out_path, "export") as target:
        save_torchscript(scripted, target)
    return scripted
