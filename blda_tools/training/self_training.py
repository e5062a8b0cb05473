"""DACS self-training pieces: the EMA teacher, pseudo-labels with their quality weight, the mixed batch.

Facts read from DAFormer's `mmseg/models/uda/dacs.py` (lhoyer/DAFormer): the teacher starts as
a copy of the student at iteration 0 and is then updated at every later iteration with
alpha_t = min(1 - 1 / (t + 1), alpha); the pseudo-label weight is the share of the per-GPU
batch's pixels whose teacher confidence is >= the threshold, zeroed on the top / bottom rows of
the crop; pasted source pixels get weight 1.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.training.augment import class_mix_mask, color_jitter, gaussian_blur, mix


def ema_alpha(iteration: int, alpha: float) -> float:
    """Momentum at `iteration` (>= 1): min(1 - 1 / (iteration + 1), alpha), DAFormer's ramp."""
    return min(1.0 - 1.0 / (iteration + 1), alpha)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student, in eval mode (no dropout / drop-path, running norm stats)."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, iteration: int, alpha: float) -> float:
    """teacher <- a * teacher + (1 - a) * student, with a = `ema_alpha(iteration, alpha)`.

    Parameters and floating-point buffers (norm running statistics) are averaged; integer
    buffers (batch counters) are copied. DAFormer averages parameters only and runs its teacher
    with batch statistics; we run the teacher in eval mode, which needs averaged statistics.
    Returns the momentum used.
    """
    momentum = ema_alpha(iteration, alpha)
    teacher_floats = list(teacher.parameters())
    student_floats = [p.detach() for p in student.parameters()]
    student_buffers = dict(student.named_buffers())
    for name, teacher_buffer in teacher.named_buffers():
        student_buffer = student_buffers[name]
        if teacher_buffer.is_floating_point():
            teacher_floats.append(teacher_buffer)
            student_floats.append(student_buffer)
        else:
            teacher_buffer.copy_(student_buffer)
    for teacher_tensor, student_tensor in zip(teacher_floats, student_floats, strict=True):
        teacher_tensor.mul_(momentum).add_(student_tensor, alpha=1.0 - momentum)
    return momentum


@torch.no_grad()
def pseudo_labels(
    teacher_logits: torch.Tensor,
    size: tuple[int, int],
    threshold: float,
    *,
    ignore_top_rows: int = 0,
    ignore_bottom_rows: int = 0,
    pooling: str = "batch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels (B, H, W) and their weights (B, H, W) from teacher logits (B, C, h, w).

    The weight is DACS's quality estimate, the fraction of pixels whose softmax confidence is
    >= `threshold`: with `pooling="batch"` one value over all B images of this process's batch
    (DAFormer's `dacs.py`: the per-GPU batch), with "image" one value per image; it is then
    zeroed on the top / bottom rows (rectification artefacts of Cityscapes).
    """
    logits = F.interpolate(teacher_logits.float(), size=size, mode="bilinear", align_corners=False)
    confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
    confident = (confidence >= threshold).float()
    if pooling == "batch":
        quality = confident.mean().expand(confidence.shape[0])
    elif pooling == "image":
        quality = confident.mean(dim=(1, 2))
    else:
        raise BLDAError(f"pooling: expected 'batch' or 'image', got {pooling!r}")
    weights = quality[:, None, None].expand_as(confidence).clone()
    if ignore_top_rows > 0:
        weights[:, :ignore_top_rows] = 0.0
    if ignore_bottom_rows > 0:
        weights[:, -ignore_bottom_rows:] = 0.0
    return labels, weights


def mixed_batch(
    source_images: torch.Tensor,
    source_labels: torch.Tensor,
    target_images: torch.Tensor,
    target_labels: torch.Tensor,
    target_weights: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    jitter_strength: float,
    jitter_probability: float,
    blur: bool,
    class_mix: bool = True,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix source into target, then DACS strong augmentation of the mixed images.

    One generator per image, so an image's draws do not depend on the rest of the batch.
    Returns (images 0-255, labels, weights): pasted source pixels keep their label and weight 1,
    the rest carries the pseudo-label and its weight.
    """
    images, labels, weights = target_images, target_labels, target_weights
    if class_mix:
        masks = torch.stack(
            [
                class_mix_mask(label, generator, ignore_index)
                for label, generator in zip(source_labels, generators, strict=True)
            ]
        )
        images = mix(masks, source_images, target_images)
        labels = mix(masks, source_labels, target_labels)
        weights = mix(masks, torch.ones_like(target_weights), target_weights)
    strong = []
    for image, generator in zip(images, generators, strict=True):
        image = color_jitter(image, jitter_strength, jitter_probability, generator)
        strong.append(gaussian_blur(image, generator) if blur else image)
    return torch.stack(strong), labels, weights
