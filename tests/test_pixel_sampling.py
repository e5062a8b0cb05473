"""Pixel sampling of `dump-logits`: the stratified quota against hand-worked cases and against
handing pixels out one at a time, and the seeded per-stratum draw."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blda_tools.errors import BLDAError
from blda_tools.inference.pixel_sampling import (
    PixelSampling,
    image_generator,
    sample_pixels,
    stratified_quota,
)


@pytest.mark.parametrize(
    ("counts", "total", "expected"),
    [
        ([10, 3, 1], 9, [5, 3, 1]),  # 3 each; class 2 gives 2 back, then class 1 gives 1 back
        ([10, 3, 1], 10, [6, 3, 1]),
        ([5, 5, 5], 7, [3, 2, 2]),  # 2 each, the one left goes to the lowest class
        ([0, 4, 0, 4], 5, [0, 3, 0, 2]),  # absent classes get nothing
        ([2, 1], 50, [2, 1]),  # fewer pixels than asked: all of them
    ],
)
def test_stratified_quota_hand_worked(counts, total, expected):
    assert stratified_quota(torch.tensor(counts), total).tolist() == expected


def round_robin_quota(counts, total):
    """Hand out pixels one at a time, classes in turn (lowest first), skipping exhausted ones."""
    quota = [0] * len(counts)
    while sum(quota) < min(total, sum(counts)):
        for index, count in enumerate(counts):
            if quota[index] < count and sum(quota) < total:
                quota[index] += 1
    return quota


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=8), total=st.integers(0, 300))
def test_stratified_quota_equals_handing_out_in_turn(counts, total):
    quota = stratified_quota(torch.tensor(counts), total).tolist()
    assert quota == round_robin_quota(counts, total)


def test_sample_pixels_draws_the_quota_from_each_stratum_deterministically():
    strata = torch.tensor([0] * 10 + [1] * 3 + [2] * 1 + [7] * 6)
    eligible = strata != 7
    first = sample_pixels(strata, eligible, 9, torch.Generator().manual_seed(5))
    again = sample_pixels(strata, eligible, 9, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert torch.equal(first, first.unique())  # sorted, no repeats
    assert torch.bincount(strata[first], minlength=8).tolist() == [5, 3, 1, 0, 0, 0, 0, 0]
    other = sample_pixels(strata, eligible, 9, torch.Generator().manual_seed(6))
    assert not torch.equal(first, other)  # another seed, another sample (fixed seeds)


@pytest.mark.parametrize("seed", [-(2**31), 0, 2**32 - 1])
def test_every_accepted_seed_seeds_a_generator(seed):
    assert PixelSampling(seed=seed).seed == seed
    for name in ("some/image", "x" * 100):  # torch takes the image's 64-bit seed
        assert 0 <= float(torch.rand(1, generator=image_generator(seed, name))) < 1


@pytest.mark.parametrize("seed", [-(2**31) - 1, 2**32, 1.5, "3"])
def test_seeds_torch_cannot_take_are_refused_naming_the_option(seed):
    with pytest.raises(
        BLDAError, match=r"--seed: expected an integer from -2147483648 to 4294967295"
    ):
        PixelSampling(seed=seed)
