"""The compiled per-group smallest keys of the online sampling against numpy's lexsort of the
same rule, and the sampling's compiled path against its torch path (the one DDP runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blda_tools.online import sampling
from blda_tools.online.smallest import in_key_order, smallest_below_threshold
from blda_tools.online.sync import RankSync


def lexsort_smallest(key, group, member, threshold, quota):
    """The rule written out with numpy: members below their group's threshold, ordered by
    (group, key, position), the first `quota` of every group."""
    key, group, member, threshold = (t.numpy() for t in (key, group, member, threshold))
    candidate = np.flatnonzero(member & (key < threshold[np.where(member, group, 0)]))
    order = candidate[np.lexsort((candidate, key[candidate], group[candidate]))]
    found = np.bincount(group[candidate], minlength=threshold.size)
    start = np.cumsum(found) - found
    rank = np.arange(order.size) - start[group[order]]
    chosen = order[rank < quota]
    return key[chosen], chosen, found


def random_case(seed, pixels, groups, key_range, member_share=0.8):
    generator = torch.Generator().manual_seed(seed)
    key = torch.randint(0, key_range, (pixels,), generator=generator)
    group = torch.randint(0, groups, (pixels,), generator=generator)
    member = torch.rand(pixels, generator=generator) < member_share
    threshold = torch.randint(0, key_range + 1, (groups,), generator=generator)
    return key, group, member, threshold


@pytest.mark.parametrize(
    ("seed", "pixels", "groups", "key_range", "quota"),
    [
        (0, 5000, 19, 1 << 40, 100),  # the sampling's 40-bit keys
        (1, 5000, 3, 16, 50),  # many equal keys: ties keep pixel order
        (2, 3000, 7, 1 << 20, 10_000),  # quota above every group's candidates
        (3, 2000, 1, 1 << 40, 300),  # one group (the anchors)
        (4, 40, 50, 1 << 12, 2),  # more groups than pixels: empty groups
        (5, 0, 4, 1 << 40, 5),  # no pixel at all
        (6, 4000, 5, 2, 1),  # keys 0 and 1 only
        (7, 200_000, 2, 1 << 40, 40_000),  # long runs
        (8, 100_000, 1, 1 << 16, 30_000),  # long runs of equal keys
    ],
)
def test_smallest_below_threshold_matches_lexsort(seed, pixels, groups, key_range, quota):
    key, group, member, threshold = random_case(seed, pixels, groups, key_range)
    key_bits = max(1, (key_range - 1).bit_length())
    keys, ascending, slots, found = smallest_below_threshold(
        key, group, member, threshold, quota, key_bits
    )
    expected_keys, expected_pixels, expected_found = lexsort_smallest(
        key, group, member, threshold, quota
    )
    assert keys.tolist() == expected_keys.tolist()
    assert found.tolist() == expected_found.tolist()
    assert ascending.tolist() == sorted(expected_pixels.tolist())
    # the slots put the ascending pixels back in the keys' order
    assert in_key_order(ascending[:, None], slots)[:, 0].tolist() == expected_pixels.tolist()


def test_no_member_and_zero_thresholds_choose_nothing():
    key, group, _, threshold = random_case(7, 1000, 6, 1 << 40)
    nobody = torch.zeros(1000, dtype=torch.bool)
    keys, ascending, slots, found = smallest_below_threshold(key, group, nobody, threshold, 5, 40)
    assert keys.numel() == ascending.numel() == slots.numel() == 0
    assert found.tolist() == [0] * 6
    everybody = torch.ones(1000, dtype=torch.bool)
    closed = torch.zeros(6, dtype=torch.int64)
    assert smallest_below_threshold(key, group, everybody, closed, 5, 40)[0].numel() == 0


class _OneRankAsDistributed(RankSync):
    """One process that takes the distributed (torch, gather-then-sort) path."""

    def __init__(self) -> None:
        super().__init__()
        self.active = True

    def sum(self, tensor):
        return tensor.clone()

    def gather(self, rows):
        return rows


@pytest.mark.parametrize(
    ("classes", "pixels", "quota"), [(19, 3000, 40), (4, 500, 100), (2, 64, 7)]
)
def test_compiled_smallest_keys_equal_the_torch_path(classes, pixels, quota):
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(2, classes, pixels, generator=generator)
    labels = torch.randint(0, classes, (2, pixels), generator=generator)
    member = torch.rand(2, pixels, generator=generator) < 0.9
    keys = sampling.pixel_keys(member.shape, generator, RankSync())
    keys[:, ::3] = keys[:, :1]  # equal keys across pixels
    drawn = []
    for sync in (RankSync(), _OneRankAsDistributed()):
        cells = sampling.draw_cell_samples(logits, labels, member, keys, 5, quota, sync)
        anchors = sampling.draw_anchor_samples(logits, labels, member, keys, 5, quota, sync)
        drawn.append((cells.cells, cells.mask, cells.keys, anchors))
    for compiled, gathered in zip(*drawn, strict=True):
        assert torch.equal(compiled, gathered)
