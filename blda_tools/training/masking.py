"""MIC, masked image consistency (Hoyer et al., MIC, CVPR 2023), as a pass of the loop.

Facts read from lhoyer/MIC `seg/mmseg/models/utils/masking_transforms.py`
(`BlockMaskGenerator`) and `seg/mmseg/models/uda/masking_consistency_module.py` (mode
`separatetrgaug`, `mask_alpha='same'`, `mask_pseudo_threshold='same'`):

- the masked image is the target crop itself with a fresh DACS strong augmentation (colour
  jitter, then blur; no ClassMix), masked after the augmentation;
- the mask has one cell per `mask_block_size` block, `round(H / b) x round(W / b)` per image;
  a cell is kept where U(0, 1) > `mask_ratio` (0.7 keeps 30 %), upsampled nearest to the crop;
  masked pixels are multiplied by 0 in normalised space (the ImageNet mean colour);
- the labels and pixel weights are the teacher's pseudo-labels of the unmasked target crop, as
  DACS uses them (same threshold, same scalar weight times the margin mask), not the mixed
  weights; the loss is the model family's full training loss, times `mic.loss_weight` (1).

Departure: the public code blurs the masked image half of the time whatever DACS's `blur`
flag says (its `'blur'` entry is always a uniform draw); blda follows that. Every draw comes
from a generator per sample (`STREAM_MASK`), so a resumed run masks the same blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blda_tools.errors import BLDAError
from blda_tools.training.augment import color_jitter, gaussian_blur
from blda_tools.training.batches import stream_generator
from blda_tools.training.config_schema import MICConfig, TrainingConfig

# The masked pass's random stream per sample (batches.py uses 0-2, hrda_step.py 10-12).
STREAM_MASK = 3


def block_mask(
    size: tuple[int, int], block_size: int, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """(H, W) float mask of one image: blocks of `block_size` pixels, each kept (1) where a
    uniform draw exceeds `ratio`, upsampled nearest (BlockMaskGenerator.generate_mask)."""
    height, width = size
    cells = (max(round(height / block_size), 1), max(round(width / block_size), 1))
    keep = (torch.rand(cells, generator=generator) > ratio).float()
    return F.interpolate(keep[None, None], size=(height, width), mode="nearest")[0, 0]


def masked_images(
    target_images: torch.Tensor,
    generators: Sequence[torch.Generator],
    settings: MICConfig,
    *,
    jitter_strength: float,
    jitter_probability: float,
    normalize,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked normalised images, masks (B, H, W)) of 0-255 target crops (B, 3, H, W): fresh
    colour jitter and blur per image, normalised, then multiplied by its block mask."""
    augmented, masks = [], []
    size = tuple(target_images.shape[-2:])
    for image, generator in zip(target_images, generators, strict=True):
        image = color_jitter(image, jitter_strength, jitter_probability, generator)
        augmented.append(gaussian_blur(image, generator))
        masks.append(block_mask(size, settings.mask_block_size, settings.mask_ratio, generator))
    mask = torch.stack(masks)
    return normalize(torch.stack(augmented)) * mask[:, None].to(target_images), mask


def check_mic_settings(settings: MICConfig) -> None:
    """The `[mic]` ranges, as BLDAErrors naming the key."""
    if not 0.0 <= settings.mask_ratio < 1.0:
        raise BLDAError(f"config: mic.mask_ratio must lie in [0, 1), got {settings.mask_ratio}")
    if settings.mask_block_size < 1:
        raise BLDAError(
            f"config: mic.mask_block_size must be >= 1 pixel, got {settings.mask_block_size}"
        )
    if settings.loss_weight < 0:
        raise BLDAError(f"config: mic.loss_weight must be >= 0, got {settings.loss_weight}")


@dataclass
class MaskedPass:
    """The MIC pass of `Trainer.micro_step` (built by `from_config`; None when off)."""

    settings: MICConfig
    seed: int
    jitter_strength: float
    jitter_probability: float

    @classmethod
    def from_config(cls, config: TrainingConfig) -> MaskedPass | None:
        settings = config.mic
        check_mic_settings(settings)
        if not settings.enabled:
            return None
        if not config.self_training.enabled:
            raise BLDAError(
                "config: mic.enabled needs self_training.enabled (MIC trains on the teacher's "
                "pseudo-labels)"
            )
        augment = config.augment
        return cls(settings, config.run.seed, augment.color_jitter_strength,
                   augment.color_jitter_probability)  # fmt: skip

    def inputs(self, target_images: torch.Tensor, sample_indices, normalize) -> torch.Tensor:
        """The masked, normalised target crops of one micro-batch."""
        generators = [stream_generator(self.seed, int(j), STREAM_MASK) for j in sample_indices]
        images, _ = masked_images(
            target_images,
            generators,
            self.settings,
            jitter_strength=self.jitter_strength,
            jitter_probability=self.jitter_probability,
            normalize=normalize,
        )
        return images
