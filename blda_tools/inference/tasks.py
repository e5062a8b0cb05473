"""Segmentation or classification: a dump stores per-pixel rows of a segmentation model or
one row of class scores per image of a classifier (`--dataset image-folder`); a model of one
kind on a dataset of the other is refused before any work."""

from __future__ import annotations

from blda_tools.errors import BLDAError


def check_task(model_spec: str, task: str | None, dataset: str, classification: bool) -> bool:
    """Refuse a classifier on a segmentation dataset and the reverse; True for image-folder."""
    if task == "classification" and not classification:
        raise BLDAError(
            f"--model {model_spec}: a whole-image classifier, but --dataset {dataset} is a "
            "segmentation dataset; classifiers run on --dataset image-folder"
        )
    if task == "segmentation" and classification:
        raise BLDAError(
            f"--model {model_spec}: a segmentation model, but --dataset {dataset} is a "
            "classification dataset (one label per image); use a classifier (resnet50, "
            "resnet101, or a plugin returning (B, C) scores)"
        )
    return classification
