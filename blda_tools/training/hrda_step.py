"""HRDA training (Hoyer et al., HRDA, ECCV 2022) as a model-family option of the loop.

Facts read from lhoyer/MIC `seg/mmseg/models/segmentors/hrda_encoder_decoder.py`
(`get_crop_bbox`, `_forward_train_features`) and `seg/mmseg/models/decode_heads/hrda_head.py`
(`forward` with a crop box, `losses`); the same files in lhoyer/HRDA:

- every training forward (source, mixed, masked pass) draws ONE detail box for the whole batch:
  offsets `randint(0, (margin + 1) // d) * d` per axis, margin = crop - detail, d =
  `hrda.crop_coord_divisible` (8: offsets 0, 8, ..., 504 for 512 in 1024);
- the context is the crop at 0.5 (bilinear, align_corners False), the detail the box at full
  resolution (`HRDASegmentor.forward_train`);
- loss = (1 - w) x loss(fused logits resized to the label) + w x loss(detail logits resized to
  the box, on the full-resolution label and pixel weights cropped to the box), w =
  `hrda.detail_loss_weight` (0.1); each term is the configured per-pixel loss (mmseg's mean
  over all pixels, ignored ones counting 0);
- the feature distance uses the context's deepest encoder features (feature_scale 0.5), and
  the ImageNet model sees the same context image.

With a loss that keeps statistics (online BLDA), the fused call updates them and the detail
call only reads them (`update=False`): one update per pass, from the fused logits (see the
departures table of docs/training.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.models.hrda import CONTEXT_SCALE, HRDASegmentor
from blda_tools.training.batches import stream_generator
from blda_tools.training.config_schema import HRDAConfig, TrainingConfig

# Streams of the detail-box draws, one per pass (batches.py uses 0-2 for the data streams).
DETAIL_BOX_STREAMS = {"source": 10, "mixed": 11, "masked": 12}


def detail_box(
    crop_size: tuple[int, int],
    detail_size: tuple[int, int],
    divisible: int,
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a detail crop inside a training crop (get_crop_bbox):
    per axis an offset `randint(0, (margin + 1) // divisible) * divisible`, margin = crop -
    detail. A detail crop as large as the crop sits at 0 (as released); so does one whose
    margin is below `divisible` (the release's randint(0, 0) would fail)."""
    offsets = []
    for crop, detail in zip(crop_size, detail_size, strict=True):
        choices = max((crop - detail + 1) // divisible, 1)
        offsets.append(int(torch.randint(choices, (), generator=generator)) * divisible)
    return offsets[0], offsets[1], int(detail_size[0]), int(detail_size[1])


def context_images(images: torch.Tensor) -> torch.Tensor:
    """The context input of HRDA: the crop at 0.5, bilinear, align_corners False."""
    return F.interpolate(images, scale_factor=CONTEXT_SCALE, mode="bilinear", align_corners=False)


def crop_box(values: torch.Tensor | None, box: tuple[int, int, int, int]):
    """`values` (B, H, W) or (B, C, H, W) cut to the box (None stays None)."""
    if values is None:
        return None
    top, left, height, width = box
    return values[..., top : top + height, left : left + width]


def _changed_keys(settings: HRDAConfig) -> list[str]:
    defaults = HRDAConfig()
    return [
        f"hrda.{f.name}"
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(defaults, f.name)
    ]


@dataclass
class HRDAStep:
    """The HRDA branch of `Trainer._segmentation_loss` (built by `from_config`)."""

    crop_size: tuple[int, int]
    detail_size: tuple[int, int]
    divisible: int
    detail_weight: float
    seed: int

    @classmethod
    def from_config(cls, config: TrainingConfig, model: nn.Module) -> HRDAStep | None:
        """The step for an HRDA model, None for another family; `[hrda]` keys set for a model
        that is not HRDA, or crop sizes HRDA cannot align, are BLDAErrors naming the key."""
        settings = config.hrda
        if not isinstance(model, HRDASegmentor):
            changed = _changed_keys(settings)
            if changed:
                raise BLDAError(
                    f"config: {', '.join(changed)} set but model.arch {config.model.arch!r} is "
                    "not an HRDA model; the hrda.* keys apply to hrda_* architectures"
                )
            return None
        crop = tuple(int(v) for v in config.augment.crop_size)
        detail = tuple(int(v) for v in settings.detail_crop_size)
        stride = int(model.output_stride)
        context_stride = int(stride / CONTEXT_SCALE)
        if any(side % context_stride for side in crop):
            raise BLDAError(
                f"config: augment.crop_size {list(crop)}: HRDA needs crop sides divisible by "
                f"{context_stride} (the context at 0.5 gives logits at 1/{context_stride})"
            )
        if any(d > c for d, c in zip(detail, crop, strict=True)):
            raise BLDAError(
                f"config: hrda.detail_crop_size {list(detail)} is larger than the training "
                f"crop augment.crop_size {list(crop)}; the detail crop lies inside it"
            )
        if any(side % stride for side in detail):
            raise BLDAError(
                f"config: hrda.detail_crop_size {list(detail)}: HRDA needs detail sides "
                f"divisible by {stride} (the head's output stride)"
            )
        if settings.crop_coord_divisible % stride:
            raise BLDAError(
                f"config: hrda.crop_coord_divisible {settings.crop_coord_divisible} must be a "
                f"multiple of {stride}, the head's output stride, so detail logits align"
            )
        # One attribute for the training detail crop and the inference detail slide, as
        # HRDA's `crop_size` (hr_crop_size); the teacher copies it.
        model.detail_crop = detail
        return cls(crop, detail, settings.crop_coord_divisible, settings.detail_loss_weight,
                   config.run.seed)  # fmt: skip

    def box(self, first_sample: int, domain: str) -> tuple[int, int, int, int]:
        """The detail box of one pass: a pure function of (seed, first sample index, pass),
        so a resumed run draws the same boxes."""
        generator = stream_generator(self.seed, first_sample, DETAIL_BOX_STREAMS[domain])
        return detail_box(self.crop_size, self.detail_size, self.divisible, generator)

    def loss(
        self,
        forward: Callable,
        loss: Callable,
        images: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None,
        domain: str,
        box: tuple[int, int, int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - w) x fused loss + w x detail loss, and the context's deepest encoder features.

        `forward(images, box)` is the (DDP-wrapped) network's training forward; `loss` the
        Trainer's per-pixel call `loss(logits, regression, labels, weights, domain, features,
        update)` on logits resized to the labels.
        """
        fused, detail, context_features, detail_features, encoder, regression = forward(images, box)
        context_regression, detail_regression = regression
        fused_loss = loss(fused, context_regression, labels, weights, domain, context_features,
                          True)  # fmt: skip
        if self.detail_weight == 0:
            return fused_loss, encoder
        detail_loss = loss(
            detail,
            detail_regression,
            crop_box(labels, box),
            crop_box(weights, box),
            domain,
            detail_features,
            False,
        )
        total = (1.0 - self.detail_weight) * fused_loss + self.detail_weight * detail_loss
        return total, encoder
