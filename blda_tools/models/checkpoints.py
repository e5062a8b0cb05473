"""Loading released and self-trained checkpoints into the built-in models.

Accepted layouts (after `torch.load(..., weights_only=True)`):
  * a raw state dict, `{"state_dict": ...}` or `{"model": ...}`;
  * mmsegmentation UDA checkpoints of the DAFormer family, whose `state_dict` holds the student
    under `model.`, the EMA teacher under `ema_model.` and the frozen ImageNet model under
    `imnet_model.` (`weights=` picks one);
  * top-level `{"model": ..., "ema_model": ...}` dictionaries (the same parts, unprefixed);
  * the SegFormer ImageNet MiT weights (`mit_b5.pth`), through `load_pretrained_backbone`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.models.identify import likely_architecture
from blda_tools.models.key_filters import (
    StateDict,
    apply_filters,
    drop_prefixes,
    nvlabs_segformer_head_to_daformer,
    select_prefix,
    strip_prefix,
)
from blda_tools.torch_files import load_torch

# --weights choice -> part of a UDA checkpoint (key prefix without the dot).
WEIGHT_PARTS = {"student": "model", "teacher": "ema_model", "imnet": "imnet_model"}
SAMPLE_SIZE = 8


@dataclass
class LoadReport:
    """What a load did: keys the model lacked / the file had in excess, and where weights came from.

    `dropped` lists checkpoint keys removed on purpose (a classification head, a head the model
    does not use); `missing` and `unexpected` are empty after a strict load.
    """

    missing: list[str]
    unexpected: list[str]
    source: str
    dropped: list[str] = field(default_factory=list)


def read_checkpoint(
    path: str | os.PathLike, trust_checkpoint: bool = False, option: str = "--checkpoint"
) -> object:
    """`torch.load` on the CPU, tensors and plain containers only unless `trust_checkpoint`;
    errors name the file as `option` (the config key of a training run's weights)."""
    trust = "--trust-checkpoint" if option == "--checkpoint" else "model.trust_checkpoint=true"
    if trust_checkpoint:
        warnings.warn(
            f"{trust}: unpickling {path} with weights_only=False can run arbitrary code stored "
            "in the file; only do this for checkpoints from a source you trust",
            UserWarning,
            stacklevel=2,
        )
    return load_torch(
        path,
        f"{option} {path}",
        "a PyTorch checkpoint",
        trusted=trust_checkpoint,
        trust_option=f"{trust} (trust_checkpoint=True); otherwise re-save its state_dict",
        torchscript_advice="for a TorchScript export use --model torchscript",
    )


def extract_state_dict(
    checkpoint: object,
    weights: str,
    path: str | os.PathLike,
    model_keys: Collection[str] = (),
) -> tuple[StateDict, str]:
    """Pick the tensors of one model (student, teacher or ImageNet) out of a loaded checkpoint.

    `model_keys` (the target's state-dict keys) keep a plain model whose own keys start with
    `model.` from being mistaken for a UDA checkpoint.
    """
    if weights not in WEIGHT_PARTS:
        raise BLDAError(f"--weights: expected one of {', '.join(WEIGHT_PARTS)}, got {weights!r}")
    if isinstance(checkpoint, torch.jit.ScriptModule):
        raise BLDAError(
            f"--checkpoint {path}: a TorchScript archive; load it with --model torchscript"
        )
    if not isinstance(checkpoint, Mapping):
        raise BLDAError(
            f"--checkpoint {path}: expected a dictionary of tensors, got {type(checkpoint).__name__}"
        )
    state_dict, container = _unwrap_container(checkpoint, path)
    state_dict = strip_prefix("module.")(state_dict)
    wanted = WEIGHT_PARTS[weights]
    available = sorted(
        p for p in WEIGHT_PARTS.values() if any(k.startswith(p + ".") for k in state_dict)
    )
    if set(state_dict) == set(model_keys):
        available = []
    if available:
        if wanted not in available:
            raise BLDAError(
                f"--weights {weights}: {path} has no {wanted}.* weights; it holds "
                f"{', '.join(p + '.*' for p in available)} "
                f"(--weights {', '.join(w for w, p in WEIGHT_PARTS.items() if p in available)})"
            )
        state_dict = strip_prefix("module.")(select_prefix(wanted + ".")(state_dict))
        source = f"{container}[{wanted}.*]"
    elif weights != "student":
        raise BLDAError(
            f"--weights {weights}: {path} holds a single model, not a UDA checkpoint with "
            f"{wanted}.* weights; use --weights student"
        )
    else:
        source = container
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not state_dict:
        raise BLDAError(
            f"--checkpoint {path}: expected a state dict of tensors; "
            + (
                f"non-tensor entries: {', '.join(not_tensors[:SAMPLE_SIZE])}"
                if not_tensors
                else "it is empty"
            )
        )
    return state_dict, source


def _unwrap_container(checkpoint: Mapping, path: str | os.PathLike) -> tuple[StateDict, str]:
    if "state_dict" in checkpoint:
        if not isinstance(checkpoint["state_dict"], Mapping):
            raise BLDAError(f"--checkpoint {path}: 'state_dict' is not a dictionary")
        return dict(checkpoint["state_dict"]), "state_dict"
    parts = {
        p: checkpoint[p] for p in WEIGHT_PARTS.values() if isinstance(checkpoint.get(p), Mapping)
    }
    if parts:
        merged = {
            f"{part}.{key}": value for part, sub in parts.items() for key, value in sub.items()
        }
        return merged, "checkpoint"
    return dict(checkpoint), "raw state_dict"


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    weights: str = "student",
    trust_checkpoint: bool = False,
    strict: bool = True,
    option: str = "--checkpoint",
) -> LoadReport:
    """Load the `weights` part of the checkpoint at `path` into `model`.

    Refuses (BLDAError) a checkpoint whose tensors have other shapes than the model's (another
    architecture or number of classes) and, when `strict`, one with missing or unexpected keys;
    the message lists a sample of the offending keys. Keys the model declares optional
    (`model.optional_checkpoint_keys`) are dropped and reported.
    """
    checkpoint = read_checkpoint(path, trust_checkpoint, option)
    model_state = model.state_dict()
    state_dict, source = extract_state_dict(checkpoint, weights, path, model_keys=model_state)
    state_dict = nvlabs_segformer_head_to_daformer(state_dict)
    optional = [
        p for p in getattr(model, "optional_checkpoint_keys", ()) if not _has_prefix(model_state, p)
    ]
    dropped = sorted(k for k in state_dict if k.startswith(tuple(optional)))
    state_dict = apply_filters(state_dict, [drop_prefixes(optional)])
    return _load_matching(model, state_dict, path, source, dropped, strict, option)


def load_pretrained_backbone(
    model: nn.Module,
    path: str | os.PathLike,
    trust_checkpoint: bool = False,
    option: str = "--checkpoint",
) -> LoadReport:
    """Load ImageNet encoder weights (e.g. SegFormer's `mit_b5.pth`) into `model.backbone`.

    The classification head (`head.*`) is dropped; a `backbone.` prefix, if present, is removed.
    Every backbone parameter must be present with the right shape.
    """
    if not isinstance(getattr(model, "backbone", None), nn.Module):
        raise BLDAError(f"model {_model_name(model)}: has no `backbone` to load {path} into")
    checkpoint = read_checkpoint(path, trust_checkpoint, option)
    state_dict, source = extract_state_dict(checkpoint, "student", path)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = select_prefix("backbone.")(state_dict)
    dropped = sorted(k for k in state_dict if k.startswith("head."))
    state_dict = drop_prefixes(["head."])(state_dict)
    return _load_matching(model.backbone, state_dict, path, source, dropped, True, option)


def _load_matching(
    model: nn.Module,
    state_dict: StateDict,
    path,
    source: str,
    dropped: list[str],
    strict: bool,
    option: str = "--checkpoint",
) -> LoadReport:
    model_state = model.state_dict()
    missing = sorted(set(model_state) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_state))
    mismatched = sorted(
        k for k in set(model_state) & set(state_dict) if model_state[k].shape != state_dict[k].shape
    )
    matched = len(model_state) - len(missing) - len(mismatched)
    if mismatched or (strict and (missing or unexpected)) or matched == 0:
        found = (missing, unexpected, mismatched)
        raise BLDAError(_mismatch_message(model, path, option, model_state, state_dict, *found))
    model.load_state_dict(state_dict, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected, source=source, dropped=dropped)


def _mismatch_message(
    model, path, option, model_state, state_dict, missing, unexpected, mismatched
) -> str:
    """`option`: how the user named the file (--checkpoint, or a training config key)."""
    lines = [
        f"{option} {path}: does not fit model {_model_name(model)} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} with another shape)"
    ]
    if missing:
        lines.append(f"  missing in the checkpoint: {_sample(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint: {_sample(unexpected)}")
    if mismatched:
        shapes = [
            f"{k} checkpoint {tuple(state_dict[k].shape)} vs model {tuple(model_state[k].shape)}"
            for k in mismatched[:SAMPLE_SIZE]
        ]
        lines.append("  shape mismatches: " + "; ".join(shapes))
    only_outputs_differ = (
        not missing
        and not unexpected
        and all(state_dict[k].shape[1:] == model_state[k].shape[1:] for k in mismatched)
    )
    likely = likely_architecture(state_dict)
    if likely is not None and likely != _model_name(model):
        lines.append(
            f"  A checkpoint of another architecture: its keys are those of "
            f"{_architecture_hint(likely)}."
        )
    elif any(".conv2d_list." in k for k in state_dict):
        lines.append(
            "  Its keys (layer5.conv2d_list) are those of the original DACS/AdaptSegNet DeepLabV2 "
            "(7 x 7 stem, stride in the 1 x 1 convs): another network than the mmseg ResNet-101 "
            "V1c DeepLabV2 of the DAFormer-family trainers (--model deeplabv2_r101), not supported."
        )
    elif only_outputs_differ:
        lines.append("  Only output sizes differ: was it trained with another number of classes?")
    else:
        other_part = ", or --weights of another part" if option == "--checkpoint" else ""
        lines.append(f"  Is it a checkpoint of another architecture{other_part}?")
    return "\n".join(lines)


def _architecture_hint(likely: str) -> str:
    if likely.startswith(("resnet", "a ResNet")):
        return (
            f"a classifier ({likely}, torchvision layout): pass --model {likely} with a "
            "classification dataset (--dataset image-folder)"
            if likely.startswith("resnet")
            else f"{likely}: a classification model, for --dataset image-folder"
        )
    if " " in likely or "<" in likely:
        return likely
    return f"{likely}: pass --model {likely}"


def _sample(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - SAMPLE_SIZE} more)" if len(keys) > SAMPLE_SIZE else ""
    return ", ".join(keys[:SAMPLE_SIZE]) + more


def _has_prefix(state: Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def _model_name(model: nn.Module) -> str:
    return getattr(model, "arch", type(model).__name__)
