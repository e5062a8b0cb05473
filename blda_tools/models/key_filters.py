"""State-dict key filters: small functions `state_dict -> state_dict`, composed into a pipeline.

As in timm's checkpoint filters, each filter does one thing (strip a prefix, rename, drop,
convert a foreign layout) so a loader is a readable list of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

StateDict = dict[str, torch.Tensor]
KeyFilter = Callable[[StateDict], StateDict]


def select_prefix(prefix: str) -> KeyFilter:
    """Keep only keys under `prefix` and remove the prefix from them."""

    def keep_and_strip(state_dict: StateDict) -> StateDict:
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    return keep_and_strip


def strip_prefix(prefix: str) -> KeyFilter:
    """Remove `prefix` from the keys that have it; leave the others unchanged."""

    def strip(state_dict: StateDict) -> StateDict:
        return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}

    return strip


def drop_prefixes(prefixes: Iterable[str]) -> KeyFilter:
    """Remove every key that starts with one of `prefixes`."""
    prefixes = tuple(prefixes)

    def drop(state_dict: StateDict) -> StateDict:
        return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}

    return drop


def rename_prefix(old: str, new: str) -> KeyFilter:
    """Replace the leading `old` by `new` in the keys that start with `old`."""

    def rename(state_dict: StateDict) -> StateDict:
        return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state_dict.items()}

    return rename


def apply_filters(
    state_dict: Mapping[str, torch.Tensor], filters: Iterable[KeyFilter]
) -> StateDict:
    """Run `filters` in order on a copy of `state_dict`."""
    result = dict(state_dict)
    for key_filter in filters:
        result = key_filter(result)
    return result


def nvlabs_segformer_head_to_daformer(state_dict: StateDict) -> StateDict:
    """Convert NVlabs SegFormer head keys (`linear_c1..c4`) to the DAFormer layout (`linear_c.0..3`).

    NVlabs concatenates the embedded stages as [c4, c3, c2, c1] before `linear_fuse`; the
    DAFormer re-implementation (and this package) uses [c1, c2, c3, c4], so the input-channel
    blocks of the fusion conv are reversed too. Other checkpoints pass through unchanged.
    """
    head = "decode_head."
    if head + "linear_c4.proj.weight" not in state_dict:
        return state_dict
    converted = dict(state_dict)
    for stage in range(1, 5):
        converted = rename_prefix(f"{head}linear_c{stage}.", f"{head}linear_c.{stage - 1}.")(
            converted
        )
    fuse_key = head + "linear_fuse.conv.weight"
    if fuse_key in converted:
        weight = converted[fuse_key]
        out_channels, in_channels = weight.shape[:2]
        blocks = weight.reshape(out_channels, 4, in_channels // 4, *weight.shape[2:])
        converted[fuse_key] = blocks.flip(1).reshape(weight.shape).contiguous()
    return converted
