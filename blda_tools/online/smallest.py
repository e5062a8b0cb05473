"""The per-group smallest keys of the sampling (Algorithm 1, lines 6-26) in one compiled pass.

`sampling._smallest_keys` draws, for every group (class), the members with the smallest random
keys. In torch that is a candidate pass, a dozen gathers and an argsort of the candidates'
(group, key) pairs; on one CPU process this module does the same in numba: the candidates of
each group are collected in pixel order (a counting sort by group), then each group's are
sorted by key with a stable least-significant-digit radix sort, so equal keys keep pixel order,
exactly as the stable argsort does.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from blda_tools.runtime.jit import kernel

# The radix sort's digit: 8 bits, so a pass's histogram (256 counts) stays in L1 and a group of
# a few hundred candidates does not pay for a large one.
DIGIT_BITS = 8


@numba.njit(inline="always")
def _radix_sort_pairs(keys, positions, spare_keys, spare_positions, key_bits):
    """Sorts (keys, positions) by key, stably, in place; the spares are scratch of equal size."""
    buckets = 1 << DIGIT_BITS
    counts = np.empty(buckets, dtype=np.int64)
    source_keys, source_positions = keys, positions
    target_keys, target_positions = spare_keys, spare_positions
    passes = (key_bits + DIGIT_BITS - 1) // DIGIT_BITS
    for digit in range(passes):
        shift = digit * DIGIT_BITS
        counts[:] = 0
        for i in range(source_keys.size):
            counts[(source_keys[i] >> shift) & (buckets - 1)] += 1
        total = 0
        for b in range(buckets):  # exclusive prefix sum: where each bucket starts
            total, counts[b] = total + counts[b], total
        for i in range(source_keys.size):
            b = (source_keys[i] >> shift) & (buckets - 1)
            target_keys[counts[b]] = source_keys[i]
            target_positions[counts[b]] = source_positions[i]
            counts[b] += 1
        source_keys, target_keys = target_keys, source_keys
        source_positions, target_positions = target_positions, source_positions
    if passes % 2 == 1:  # the sorted run ended in the spares
        keys[:] = source_keys
        positions[:] = source_positions


@kernel
def _smallest_below_threshold(
    key, group, member, threshold, quota, key_bits
):  # pragma: no cover - numba
    groups = threshold.size
    found = np.zeros(groups, dtype=np.int64)
    single = groups == 1  # then `group` is not read (the anchors pass one element)
    for i in range(key.size):  # candidates: members below their group's threshold
        g = 0 if single else group[i]
        if member[i] and key[i] < threshold[g]:
            found[g] += 1
    start = np.zeros(groups + 1, dtype=np.int64)
    for g in range(groups):
        start[g + 1] = start[g] + found[g]
    fill = start[:-1].copy()
    keys = np.empty(start[groups], dtype=np.int64)
    positions = np.empty(start[groups], dtype=np.int64)
    for i in range(key.size):  # grouped, in pixel order within each group
        g = 0 if single else group[i]
        if member[i] and key[i] < threshold[g]:
            keys[fill[g]], positions[fill[g]] = key[i], i
            fill[g] += 1
    spare_keys, spare_positions = np.empty_like(keys), np.empty_like(positions)
    taken = 0
    for g in range(groups):
        part = slice(start[g], start[g + 1])
        _radix_sort_pairs(keys[part], positions[part], spare_keys[part], spare_positions[part],
                          key_bits)  # fmt: skip
        # the group's smallest: the head of its sorted run, moved down (taken <= start[g], so
        # a forward copy never overwrites what it still reads)
        for j in range(start[g], start[g] + min(found[g], quota)):
            keys[taken], positions[taken] = keys[j], positions[j]
            taken += 1
    # the chosen pixels in ascending order too, with where each goes in the result: gathering
    # their logits in memory order is several times faster than in key order
    ascending, slots = positions[:taken].copy(), np.arange(taken)
    bits = max(1, int(np.ceil(np.log2(max(key.size, 2)))))
    _radix_sort_pairs(ascending, slots, np.empty_like(ascending), np.empty_like(slots), bits)
    return keys[:taken].copy(), ascending, slots, found


def smallest_below_threshold(
    key: Tensor, group: Tensor, member: Tensor, threshold: Tensor, quota: int, key_bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of the member pixels whose key is below their group's threshold, the `quota` smallest
    keys of every group (all of a group with fewer): their keys grouped by group, ascending,
    equal keys in pixel order; the same pixels' flat positions in ascending order and each
    one's slot in the keys' order (int64); and each group's candidate count ``(groups,)``.
    key (< 2^key_bits), group, member flat ``(N,)`` (with one group, `group` is not read
    and may be an expanded zero); threshold ``(groups,)``."""
    group = group[:1] if threshold.numel() == 1 else group  # not read: nothing to copy
    arrays = [t.contiguous().numpy() for t in (key, group, member, threshold)]
    results = _smallest_below_threshold(*arrays, int(quota), int(key_bits))
    return tuple(torch.from_numpy(result) for result in results)


def in_key_order(rows: Tensor, slots: Tensor) -> Tensor:
    """Rows gathered for the ascending positions of `smallest_below_threshold`, moved to the
    order of its keys (row i to slot `slots[i]`)."""
    return torch.empty_like(rows).index_copy_(0, slots, rows)
