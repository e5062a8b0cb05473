"""The training batches: every sample is a pure function of (seed, global sample index).

Instead of a shuffling sampler whose state must be saved and replayed, sample j of the run draws
its images, RCS class, augmentations and mixing from generators seeded with (seed, j, stream).
Micro-batch k of rank r holds the samples j = (k * world_size + r) * batch_size + i. That gives
the distributed sampler (ranks draw different samples), deterministic DataLoader workers, an
exact `--resume` (the sampler state is just the next micro-batch index), and a global batch
whose content does not depend on how it is split over processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from blda_tools.runtime.process import torch_threads
from blda_tools.training.augment import weak_augment
from blda_tools.training.config import TrainingConfig
from blda_tools.training.sampling import RareClassSampler

# Independent random streams per micro-batch.
STREAM_SOURCE, STREAM_TARGET, STREAM_MIX = 0, 1, 2


def stream_generator(seed: int, sample_index: int, stream: int) -> torch.Generator:
    """A CPU generator for one (seed, sample, stream); different triples are independent."""
    state = np.random.SeedSequence([seed, sample_index, stream]).generate_state(2)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


@dataclass
class MicroBatch:
    """Source crops with labels, target crops (0-255 float images), RCS classes (-1 = off),
    the global indices of the samples (seeds of their mixing draws), and with
    `self_training.crop_pseudo_margins` the target crops' valid-pseudo-label masks (1 / 0)."""

    source_images: torch.Tensor
    source_labels: torch.Tensor
    target_images: torch.Tensor
    rcs_classes: torch.Tensor
    sample_indices: torch.Tensor
    target_valid: torch.Tensor | None = None

    def pin_memory(self) -> MicroBatch:
        """Called by DataLoader(pin_memory=True) for faster host-to-GPU copies."""
        valid = None if self.target_valid is None else self.target_valid.pin_memory()
        return MicroBatch(
            self.source_images.pin_memory(),
            self.source_labels.pin_memory(),
            self.target_images.pin_memory(),
            self.rcs_classes,
            self.sample_indices,
            valid,
        )

    def to(self, device: torch.device) -> MicroBatch:
        valid = self.target_valid
        return MicroBatch(
            self.source_images.to(device, non_blocking=True),
            self.source_labels.to(device, non_blocking=True),
            self.target_images.to(device, non_blocking=True),
            self.rcs_classes,
            self.sample_indices,
            None if valid is None else valid.to(device, non_blocking=True),
        )


def collate_single(batch: MicroBatch) -> MicroBatch:
    """DataLoader `collate_fn` for batch_size=None: the item is already a batch."""
    return batch


class TrainingBatches(Dataset):
    """Index `k` -> `MicroBatch` number k of this rank (length: every micro-batch of the run)."""

    def __init__(
        self,
        source,
        target,
        config: TrainingConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        with_target: bool = True,
        sampler: RareClassSampler | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.source, self.target, self.config = source, target, config
        self.rank, self.world_size, self.with_target = rank, world_size, with_target
        self.sampler, self.ignore_index = sampler, ignore_index
        self.length = config.run.iterations * config.run.accumulate

    def __len__(self) -> int:
        return self.length

    def _crop(self, image, label, base_size, generator, accept=None):
        augment = self.config.augment
        return weak_augment(
            image,
            label,
            generator,
            base_size=base_size,
            scale_range=augment.scale_range,
            crop_size=augment.crop_size,
            flip=augment.flip,
            cat_max_ratio=augment.cat_max_ratio,
            ignore_index=self.ignore_index,
            accept=accept,
        )

    def _source_crop(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        size = self.config.data.source_size
        if self.sampler is None:
            index = int(torch.randint(len(self.source), (), generator=generator))
            sample = self.source[index]
            return *self._crop(sample.image, sample.label, size, generator), -1
        class_id, index = self.sampler.sample(generator)
        min_pixels = self.sampler.min_crop_pixels

        def enough_of_class(label: torch.Tensor) -> bool:
            return (label == class_id).sum().item() > min_pixels

        sample = self.source[index]
        return *self._crop(sample.image, sample.label, size, generator, enough_of_class), class_id

    def sample_indices(self, micro_step: int) -> list[int]:
        """Global indices of the samples in micro-batch `micro_step` of this rank."""
        batch = self.config.run.batch_size
        first = (micro_step * self.world_size + self.rank) * batch
        return list(range(first, first + batch))

    def __getitem__(self, micro_step: int) -> MicroBatch:
        # One thread, as in a DataLoader worker: some augmentations reduce (the mean of a
        # contrast jitter), and a reduction's rounding depends on the threads that share it,
        # so that run.num_workers = 0 and >= 1 gave different batches (3e-5 apart).
        with torch_threads(1):
            return self._micro_batch(micro_step)

    def _micro_batch(self, micro_step: int) -> MicroBatch:
        seed = self.config.run.seed
        indices = self.sample_indices(micro_step)
        images, labels, classes, targets, valid = [], [], [], [], []
        for sample_index in indices:
            image, label, class_id = self._source_crop(
                stream_generator(seed, sample_index, STREAM_SOURCE)
            )
            images.append(image)
            labels.append(label)
            classes.append(class_id)
            if self.with_target:
                generator = stream_generator(seed, sample_index, STREAM_TARGET)
                index = int(torch.randint(len(self.target), (), generator=generator))
                # Target labels are never read: like DAFormer's Cityscapes pipeline (RandomCrop
                # without cat_max_ratio), the target crop is drawn without them.
                target_image, target_valid = self._target_crop(self.target[index].image, generator)
                targets.append(target_image)
                valid.append(target_valid)
        return MicroBatch(
            torch.stack(images),
            torch.stack(labels),
            torch.stack(targets) if targets else torch.empty(0),
            torch.tensor(classes),
            torch.tensor(indices),
            torch.stack(valid).float() if valid and valid[0] is not None else None,
        )

    def _target_crop(self, image: torch.Tensor, generator: torch.Generator):
        """The target crop, and with `crop_pseudo_margins` its valid-pseudo-label mask.

        The margins are zeroed on the full target frame, which is then resized (nearest),
        cropped and flipped with the image (HRDA's `cityscapes.py` pre_pipeline: the mask is a
        seg field), so only crops that reach the frame's border lose pixels. The mask takes
        the label's place; its crop draws are the same as without it (no cat_max_ratio on
        the target)."""
        margins = self.config.self_training.crop_pseudo_margins
        size = self.config.data.target_size
        if not margins:
            return self._crop(image, None, size, generator)[0], None
        mask = pseudo_margin_mask(image.shape[-2:], margins)
        augment = self.config.augment
        return weak_augment(
            image,
            mask,
            generator,
            base_size=size,
            scale_range=augment.scale_range,
            crop_size=augment.crop_size,
            flip=augment.flip,
            ignore_index=0,  # padding (a frame smaller than the crop) is not valid either
        )


def pseudo_margin_mask(size, margins) -> torch.Tensor:
    """(H, W) int64: 1, with 0 on the [top, bottom, left, right] margins of the frame."""
    top, bottom, left, right = (int(m) for m in margins)
    height, width = int(size[0]), int(size[1])
    mask = torch.ones(height, width, dtype=torch.long)
    mask[:top] = 0
    mask[height - bottom :] = 0
    mask[:, :left] = 0
    mask[:, width - right :] = 0
    return mask
