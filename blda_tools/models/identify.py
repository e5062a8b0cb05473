"""Which built-in architecture a state dict was saved from, from its key names and shapes.

Used to say what to pass instead when a checkpoint does not fit the `--model` asked for (an
HRDA checkpoint given as `daformer_mitb5`, a classifier given to a segmentation model, ...).
Rules, from the released layouts (`manifests/`): HRDA keeps its DAFormer head under
`decode_head.head.` beside `decode_head.scale_attention.`; DAFormer has `decode_head.embed_layers`
and `decode_head.fuse_layer`; SegFormer `decode_head.linear_c`; DeepLabV2
`decode_head.aspp_modules` over `backbone.layer4`; a torchvision ResNet classifier `fc` over
`layer4`; blda's `tiny` CNN `decode_head.lateral` and `decode_head.refine` over
`backbone.stage1` (under `decode_head.head.` for `hrda_tiny`). The MiT variant follows from the first stage's width (32: B0) and the number of
blocks of stage 3 (2: B1, 6: B2, 18: B3, 27: B4, 40: B5).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Blocks of MiT stage 3 -> variant (MiT-B0 is told apart by its 32-channel first stage).
_MIT_STAGE3_DEPTH = {2: "b1", 6: "b2", 18: "b3", 27: "b4", 40: "b5"}
# torchvision ResNet: blocks of layer3 -> depth.
_RESNET_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101"}


def likely_architecture(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The built-in architecture name `state_dict` most likely belongs to, or None."""
    keys = set(state_dict)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has("decode_head.scale_attention."):
        if has("decode_head.head.aspp_modules."):
            return "hrda_deeplabv2_r101"
        if has("decode_head.head.lateral.") and has("backbone.stage1."):
            return "hrda_tiny"
        return _mit("hrda", state_dict) if has("backbone.patch_embed1.") else None
    if has("decode_head.lateral.") and has("decode_head.refine.") and has("backbone.stage1."):
        return "tiny"
    if has("decode_head.embed_layers.") and has("decode_head.fuse_layer."):
        return _mit("daformer", state_dict)
    if has("decode_head.linear_c") and has("decode_head.linear_fuse."):
        return _mit("segformer", state_dict)
    if has("decode_head.aspp_modules.") and has("backbone.layer4."):
        return "deeplabv2_r101"
    if "fc.weight" in keys and has("layer4."):
        blocks = {key.split(".")[1] for key in keys if key.startswith("layer3.")}
        return _RESNET_LAYER3_BLOCKS.get(len(blocks), "a ResNet classifier")
    return None


def is_classifier(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a whole-image classifier (torchvision layout: `fc` on top, no decode head)."""
    return "fc.weight" in state_dict and not any(k.startswith("decode_head.") for k in state_dict)


def _mit(family: str, state_dict: Mapping[str, torch.Tensor]) -> str:
    first = state_dict.get("backbone.patch_embed1.proj.weight")
    if first is not None and first.shape[0] == 32:
        return f"{family}_mitb0"
    blocks = {key.split(".")[2] for key in state_dict if key.startswith("backbone.block3.")}
    variant = _MIT_STAGE3_DEPTH.get(len(blocks))
    return f"{family}_mit{variant}" if variant else f"{family}_mit<variant>"
