"""Segmentation models behind a registry, and loading of their checkpoints.

    model = create_model("daformer_mitb5", num_classes=19)
    report = load_checkpoint(model, "gta2cs_daformer.pth", weights="teacher")
    logits = model(normalize(images_uint8))          # (B, 19, H / 4, W / 4)

State-dict keys equal those of the released mmsegmentation checkpoints of the DAFormer family,
HRDA and MIC (manifests in `blda_tools/models/manifests/`), so they load without conversion;
the ResNet classifiers use torchvision's keys.
"""

from __future__ import annotations

from blda_tools.models.checkpoints import (
    LoadReport,
    extract_state_dict,
    load_checkpoint,
    load_pretrained_backbone,
    read_checkpoint,
)
from blda_tools.models.loading import load_model
from blda_tools.models.registry import create_model, list_models, register_model
from blda_tools.models.segmentor import IMAGENET_MEAN, IMAGENET_STD, Segmentor, normalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadReport",
    "Segmentor",
    "create_model",
    "extract_state_dict",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_pretrained_backbone",
    "normalize",
    "read_checkpoint",
    "register_model",
]
