"""A call's pixels as `BLDALoss` sees them, and the small tensor plumbing around its passes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from blda_tools.errors import BLDAError
from blda_tools.runtime.process import torch_threads


@dataclass
class Pixels:
    """A batch seen as (B, C, P) logits and (B, P) pixel fields; labels of invalid pixels are 0."""

    logits: Tensor
    labels: Tensor
    valid: Tensor
    in_target: Tensor
    weights: Tensor | None
    domain: str

    def members(self) -> tuple[Tensor, Tensor]:
        """Labelled pixels of the source and of the target (target: 0 < weight; in a mixed image
        weight 1 marks source pixels, so target pixels there have 0 < w < 1)."""
        source = self.valid & ~self.in_target
        target = self.valid & self.in_target
        if self.weights is not None:
            target = target & (self.weights > 0)
        return source, target


def small_op_threads(tensor: Tensor):
    """One torch thread on a CPU meanwhile: the statistics and tables are many small ops, which
    ran 3-7x slower with two OpenMP threads on a busy 2-core machine (bench_online_loss.py);
    the per-pixel work (lookup kernel, cross-entropy) keeps every thread."""
    return torch_threads(1) if tensor.device.type == "cpu" else contextlib.nullcontext()


class FixedGradient(torch.autograd.Function):
    """`loss` per pixel, a function of `logits` whose gradient was computed with it (the fused
    cross-entropy kernel): backward scales `gradient` (logits' shape) by the incoming
    per-pixel gradient. Once differentiable."""

    @staticmethod
    def forward(ctx, logits: Tensor, loss: Tensor, gradient: Tensor) -> Tensor:
        ctx.save_for_backward(gradient)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (gradient,) = ctx.saved_tensors
        # in place: no second (B, C, H, W) tensor. A second backward through the same graph
        # (retain_graph) is refused by autograd's version check on the saved tensor.
        return gradient.mul_(grad.unsqueeze(1)), None, None  # loss: logits' shape less dim 1


def to_logit_shape(offsets: Tensor, logits: Tensor) -> Tensor:
    """(B, C, P) back to the caller's layout: (N, C) or (B, C, *spatial)."""
    if logits.ndim == 2:
        return offsets[0].t()
    return offsets.reshape(logits.shape)


def regression_like(regression, labels: Tensor) -> Tensor:
    """The head's output as labels' shape: accepts that shape or a singleton channel in dim 1."""
    if not isinstance(regression, Tensor) or not regression.is_floating_point():
        raise BLDAError("regression: expected a float tensor (the CDF head's output)")
    if regression.shape == labels.shape:
        return regression
    squeezed = regression.shape[:1] + regression.shape[2:]
    if regression.ndim == labels.ndim + 1 and regression.shape[1] == 1 and squeezed == labels.shape:
        return regression.reshape(labels.shape)
    raise BLDAError(
        f"regression: expected shape {tuple(labels.shape)} or with a channel of 1 in dim 1, "
        f"got {tuple(regression.shape)}"
    )
