"""The samples one call feeds to the online mixtures (Algorithm 1, lines 6-26; Appendix D).

Every pixel of the global batch (all processes' batches, in rank order) gets a random 40-bit key
from one generator seeded by (seed, call), so a draw is "the pixels with the smallest keys" and
depends on the global batch only, not on how it is split over processes (`RankSync`):

- `draw_cell_samples`: the classes with at least N_min member pixels qualify; n is the smallest
  of their counts (capped for speed); every cell (c, l) of a qualifying row c gets column l of
  the SAME n pixels of class c, drawn uniformly without replacement (Appendix D, as released);
- `draw_anchor_samples`: the global source distributions of the anchors, pixel-weighted: the
  positive anchor on f[y] of every labelled pixel (or a uniform subsample of pixels, never by
  class), the negative one on f[l] of the same pixels for one uniformly drawn l != y each;
- `class_balanced_anchors`: the same two rows from the per-cell samples instead (n pixels per
  qualifying class): blda's earlier choice, kept as `anchor_sampling="class_balanced"`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from blda_tools.online.kernel import (
    below_threshold,
    member_counts,
    pixel_class_logits,
    pixel_logits,
)
from blda_tools.online.smallest import in_key_order, smallest_below_threshold
from blda_tools.online.sync import RankSync

KEY_BITS = 40
KEY_RANGE = 1 << KEY_BITS


@dataclass
class CellSamples:
    """Samples of the C x C logit sets of one domain.

    `cells` ``(C, C, n)`` with `mask` (rows of classes below the minimum are all False); `rows`
    the sampled classes; `values` ``(q n, C)`` the logits of the sampled pixels grouped by class
    and `keys` their keys (for `class_balanced_anchors`).
    """

    cells: Tensor
    mask: Tensor
    rows: Tensor
    per_cell: int
    values: Tensor
    keys: Tensor


def pixel_keys(shape: torch.Size, generator: torch.Generator, sync: RankSync) -> Tensor:
    """Keys (int64 in [0, 2^40)) of this process's pixels ``shape``: its slice of one draw over
    the global batch, so they do not depend on the split."""
    count = math.prod(shape)
    device = generator.device
    sizes = sync.sizes(count, device)
    start = sum(sizes[: sync.rank])
    keys = torch.randint(0, KEY_RANGE, (sum(sizes),), generator=generator, device=device)
    return keys[start : start + count].reshape(shape)


def _other_class(own: Tensor, keys: Tensor, classes: int) -> Tensor:
    """A uniform class l != own per sample, from the low bits of its key (independent of the
    key order that selected it, up to 2^-40)."""
    return (own + 1 + keys % (classes - 1)) % classes


def _smallest_keys(
    key: Tensor,
    group: Tensor,
    member: Tensor,
    totals: Tensor,
    quota: int,
    payload: Callable[[Tensor], Tensor],
    sync: RankSync,
) -> tuple[Tensor, Tensor]:
    """For every group g with totals[g] >= quota (global counts), the `quota` members with the
    smallest keys, over all processes: (their keys, payload rows of their flat pixel indices),
    grouped by g, keys ascending. key, group, member: flat ``(pixels,)``; `payload` maps pixel
    indices to rows one by one (so it may be applied before or after the selection).

    Only members below a per-group key threshold (expected quota + 8 sqrt(quota) + 32 of them)
    are sorted and gathered; a group that falls short is redone with all its members, so the
    result is exact, just slower in that rare case.
    """
    eligible = totals >= quota
    margin = quota + 8.0 * math.sqrt(quota) + 32.0
    share = (margin / totals.clamp_min(1).double()).clamp_max(1.0)
    threshold = torch.where(share >= 1.0, KEY_RANGE, (share * KEY_RANGE).long())
    threshold = torch.where(eligible, threshold, 0)  # a group below the quota keeps nothing
    compiled = key.device.type == "cpu" and not sync.active  # one process: the same result
    while True:
        if compiled:
            chosen, pixel, slots, found = smallest_below_threshold(
                key, group, member, threshold, quota, KEY_BITS
            )
        else:
            chosen, rows, found = _smallest_gathered(
                key, group, member, threshold, quota, payload, sync
            )
        short = eligible & (found < quota)
        if not bool(short.any()):
            break
        threshold = torch.where(short, KEY_RANGE, threshold)
    return (chosen, in_key_order(payload(pixel), slots)) if compiled else (chosen, rows)


def _smallest_gathered(key, group, member, threshold, quota, payload, sync: RankSync):
    """`_smallest_keys` for one threshold in torch over all processes: the candidates' keys and
    payload rows gathered in rank order, sorted by (group, key) with a stable argsort; returns
    (keys, rows, candidates per group)."""
    if key.device.type == "cpu":  # one compiled pass instead of four over every pixel
        keep = below_threshold(key, group, member, threshold)
    else:
        keep = (member & (key < threshold.index_select(0, group))).nonzero()[:, 0]
    kept_group = group.index_select(0, keep)
    sort_key = sync.gather(kept_group * KEY_RANGE + key.index_select(0, keep))
    rows = sync.gather(payload(keep))
    order = sort_key.argsort(stable=True)
    sort_key, rows = sort_key[order], rows[order]
    member_group = torch.div(sort_key, KEY_RANGE, rounding_mode="floor")
    found = torch.bincount(member_group, minlength=threshold.numel())
    start = found.cumsum(0) - found
    rank = torch.arange(sort_key.numel(), device=sort_key.device) - start[member_group]
    chosen = rank < quota
    return sort_key[chosen] % KEY_RANGE, rows[chosen], found


def draw_cell_samples(
    logits: Tensor,
    labels: Tensor,
    member: Tensor,
    keys: Tensor,
    min_samples: int,
    max_samples: int | None,
    sync: RankSync,
) -> CellSamples | None:
    """Per-cell samples of one domain, or None if no class qualifies (over all processes).

    logits ``(B, C, P)``, labels ``(B, P)`` (valid classes wherever `member` is True), member
    ``(B, P)`` bool, keys ``(B, P)`` from `pixel_keys`.
    """
    classes, size = logits.shape[1], logits.shape[2]
    label, member = labels.reshape(-1), member.reshape(-1)
    if label.device.type == "cpu":
        counts = member_counts(label, member, classes)
    else:
        counts = torch.bincount(label, weights=member.to(logits.dtype), minlength=classes)
        counts = counts.round().long()
    counts = sync.sum(counts)
    qualifying = counts >= min_samples
    if not bool(qualifying.any()):
        return None
    per_cell = int(counts[qualifying].min())
    if max_samples is not None:
        per_cell = min(per_cell, int(max_samples))
    totals = torch.where(qualifying, counts, 0)

    flat_logits = logits.reshape(-1)
    columns = torch.arange(classes, device=logits.device) * size

    def pixel_rows(pixel: Tensor) -> Tensor:  # (m, C); flat gathers beat advanced indexing
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            return pixel_logits(logits, pixel)
        start = (pixel // size) * (classes * size) + pixel % size
        return (
            flat_logits.index_select(0, (start[:, None] + columns).reshape(-1))
            .view(-1, classes)
            .float()
        )

    chosen_keys, values = _smallest_keys(
        keys.reshape(-1), label, member, totals, per_cell, pixel_rows, sync
    )
    rows = qualifying.nonzero()[:, 0]
    cells = torch.zeros(classes, classes, per_cell, dtype=values.dtype, device=values.device)
    mask = torch.zeros(cells.shape, dtype=torch.bool, device=values.device)
    cells[rows] = values.reshape(rows.numel(), per_cell, classes).permute(0, 2, 1)
    mask[rows] = True
    return CellSamples(cells, mask, rows, per_cell, values, chosen_keys)


def class_balanced_anchors(samples: CellSamples) -> Tensor:
    """(2, q n) anchor samples from the per-cell samples: f[c] of every sampled pixel and f[l]
    for one uniform l != c per pixel (each qualifying class weighs the same)."""
    classes = samples.cells.shape[0]
    own = samples.rows.repeat_interleave(samples.per_cell)
    other = _other_class(own, samples.keys, classes)
    positive = samples.values.gather(1, own[:, None])[:, 0]
    negative = samples.values.gather(1, other[:, None])[:, 0]
    return torch.stack((positive, negative))


def draw_anchor_samples(
    logits: Tensor,
    labels: Tensor,
    member: Tensor,
    keys: Tensor,
    min_samples: int,
    max_samples: int | None,
    sync: RankSync,
) -> Tensor | None:
    """(2, n) pixel-weighted anchor samples of the member pixels (over all processes): row 0 the
    positive logits f[y], row 1 one negative f[l], l != y uniform, of the same pixels; all
    member pixels, or the `max_samples` with the smallest keys (a uniform subsample). None if
    fewer than `min_samples` pixels."""
    classes, size = logits.shape[1], logits.shape[2]
    label, key, member = labels.reshape(-1), keys.reshape(-1), member.reshape(-1)
    total = int(sync.sum(member.sum().reshape(1))[0])
    if total < min_samples:
        return None

    flat_logits = logits.reshape(-1)

    def positive_negative(pixel: Tensor) -> Tensor:
        own = label.index_select(0, pixel)
        other = _other_class(own, key.index_select(0, pixel), classes)
        pairs = torch.stack((own, other), dim=1)  # (m, 2) classes
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            return pixel_class_logits(logits, pixel, pairs)
        start = (pixel // size) * (classes * size) + pixel % size
        index = (start[:, None] + pairs * size).reshape(-1)
        return flat_logits.index_select(0, index).view(-1, 2).float()

    if max_samples is None or total <= max_samples:  # every pixel, in global position order
        return sync.gather(positive_negative(member.nonzero()[:, 0])).t().contiguous()
    group = torch.zeros((), dtype=label.dtype, device=label.device).expand_as(label)  # one
    totals = torch.tensor([total], device=label.device)
    _, rows = _smallest_keys(key, group, member, totals, int(max_samples), positive_negative, sync)
    return rows.t().contiguous()
