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


# The window options of segmentation inference, by their command-line names.
_WINDOW_OPTIONS = {"mode": "--mode", "crop": "--crop", "stride": "--window-stride"}


def check_classifier_inference(inference, classification: bool) -> None:
    """Refuse window options for a classifier: it scores the whole image (resized, then its
    centre crop), and the options were accepted, recorded in the store and ignored."""
    if not classification or not isinstance(inference, dict):
        return
    given = [option for key, option in _WINDOW_OPTIONS.items() if inference.get(key) is not None]
    if given:
        raise BLDAError(
            f"{', '.join(given)}: window options of segmentation inference; a classifier "
            "scores the whole image (resized, then its centre crop: --resize)"
        )
