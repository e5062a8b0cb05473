"""Which pixels of a logit map `blda dump-logits` stores when it samples them (`PixelSampling`):
a seeded random sample per image, optionally stratified by class."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from blda_tools.errors import BLDAError, check_counts

# Seeds whose image generators' 64-bit seeds (`image_generator`) torch accepts.
SEED_RANGE = (-(2**31), 2**32 - 1)


@dataclass(frozen=True)
class PixelSampling:
    """Which pixels of each logit map are stored.

    `stride` keeps every stride-th pixel in both axes (a raster). `pixels_per_image` N keeps N
    random labelled pixels (all pixels for unlabelled images) with their positions; with
    `stratified`, N is shared equally among the classes present (pseudo-labels for unlabelled
    images), a class with fewer pixels giving all of them and its remainder going to the
    others. Sampling is seeded by `seed` and the image name, so it does not depend on order.
    """

    stride: int = 1
    pixels_per_image: int | None = None
    stratified: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(stride=self.stride, pixels_per_image=self.pixels_per_image)
        # the seed of an image's generator is (seed << 32) + crc32(name), a 64-bit seed
        if not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise BLDAError(
                f"--seed: expected an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, "
                f"got {self.seed!r}"
            )
        if self.pixels_per_image is not None and self.stride != 1:
            raise BLDAError("--stride and --pixels-per-image: choose one way of subsampling")
        if self.stratified and self.pixels_per_image is None:
            raise BLDAError("--stratified: only applies with --pixels-per-image N")


def stratified_quota(class_counts: torch.Tensor, total: int) -> torch.Tensor:
    """Pixels to take per class: `total` shared as equally as the class counts allow.

    Water-filling: every class gets `min(count, level)` for the largest level whose sum stays
    within `total`; the few pixels left go one each to the lowest-numbered classes that still
    have pixels. Takes everything when `total >= class_counts.sum()`.
    """
    counts = class_counts.long()
    if total >= int(counts.sum()):
        return counts.clone()
    low, high = 0, int(counts.max())  # invariant: sum(min(counts, low)) <= total < ... high
    while high - low > 1:
        middle = (low + high) // 2
        if int(counts.clamp(max=middle).sum()) <= total:
            low = middle
        else:
            high = middle
    quota = counts.clamp(max=low)
    has_room = counts > low
    extra = has_room & (has_room.cumsum(0) <= total - int(quota.sum()))
    return quota + extra.long()


def sample_pixels(
    strata: torch.Tensor, eligible: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Sorted flat indices of `count` random eligible pixels, split over `strata` by
    `stratified_quota` (a single stratum: a plain random sample). Inputs are `(P,)` on the CPU."""
    keys = torch.rand(strata.shape, generator=generator)
    candidates = torch.nonzero(eligible).squeeze(1)
    # Random order, then grouped by stratum (stable): each stratum's first `quota` are kept.
    candidates = candidates[keys[candidates].argsort(stable=True)]
    candidate_strata = strata[candidates]
    candidates = candidates[candidate_strata.argsort(stable=True)]
    candidate_strata = strata[candidates]
    counts = torch.bincount(candidate_strata, minlength=1)
    quota = stratified_quota(counts, count)
    first_of_stratum = counts.cumsum(0) - counts
    rank_in_stratum = torch.arange(len(candidates)) - first_of_stratum[candidate_strata]
    kept = candidates[rank_in_stratum < quota[candidate_strata]]
    return kept.sort().values


def image_generator(seed: int, name: str) -> torch.Generator:
    """The generator of image `name`'s draws: seeded by the name, not the position, so resumed
    and sharded runs draw the same pixels."""
    return torch.Generator().manual_seed((seed << 32) + zlib.crc32(name.encode()))


def sampled_positions(
    sampling: PixelSampling,
    pixel_logits: torch.Tensor,
    label: torch.Tensor | None,
    ignore_index: int,
    name: str,
) -> torch.Tensor:
    """Sorted flat positions of image `name`'s `sampling.pixels_per_image` pixels, from its
    `(H * W, C)` logits and `(H, W)` label (None: every pixel is a candidate and the predicted
    classes are the strata)."""
    if label is not None:
        strata = label.reshape(-1).long()
        eligible = strata != ignore_index
    else:
        strata = pixel_logits.argmax(1).cpu()
        eligible = torch.ones_like(strata, dtype=torch.bool)
    if not sampling.stratified:
        strata = torch.zeros_like(strata)
    generator = image_generator(sampling.seed, name)
    return sample_pixels(strata, eligible, sampling.pixels_per_image, generator)
