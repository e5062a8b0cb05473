"""Target-val evaluation during training: sliding-window logits (`blda_tools.inference.predict`),
confusion matrices summed over processes, IoU / accuracy (`blda_tools.statistics.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.inference.predict import predict_logits
from blda_tools.statistics.metrics import SegmentationMetrics


def confusion_matrix(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted; ignored pixels skipped."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    index = labels[valid] * num_classes + predictions[valid]
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def scores_from_confusion(
    confusion: torch.Tensor, class_names: Sequence[str], classes: Sequence[int] = ()
) -> dict:
    """mIoU, mAcc, their std over classes, and per-class IoU / accuracy, in %.

    Per-class values come from `blda_tools.metrics.SegmentationMetrics` (NaN for a class absent
    from labels and predictions). Means and population stds are over `classes` (all if empty,
    e.g. the 16 SYNTHIA classes), skipping NaN as mmseg's nanmean does.
    """
    metrics = SegmentationMetrics.from_confusion(confusion, classes)
    miou, iou_std = 100 * metrics.miou, 100 * metrics.iou_std
    macc, acc_std = 100 * metrics.macc, 100 * metrics.acc_std
    confusion = confusion.double()
    return {
        "mIoU": miou,
        "mAcc": macc,
        "iou_std": iou_std,
        "acc_std": acc_std,
        "aAcc": 100 * (confusion.diag().sum() / confusion.sum()).item(),
        "per_class_iou": {n: 100 * v for n, v in zip(class_names, metrics.iou, strict=True)},
        "per_class_acc": {n: 100 * v for n, v in zip(class_names, metrics.acc, strict=True)},
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    num_classes: int,
    class_names: Sequence[str],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    resize: Sequence[int],
    crop_size: Sequence[int],
    stride: Sequence[int],
    max_images: int = 0,
    classes: Sequence[int] = (),
    amp: bool = False,
    ignore_index: int = 255,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Scores of `model` on `dataset` (labelled); images are shared out over the ranks.

    Each image is resized to `resize` (if given), predicted with sliding windows, and its
    logits resized back to the label's size before the argmax. `amp` autocasts on CUDA.
    """
    was_training = model.training
    model.eval()
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for index in range(rank, count, world_size):
        sample = dataset[index]
        label = sample.label.to(device)
        logits = predict_logits(
            model,
            normalize(sample.image.to(device))[None],
            mode="slide",
            crop=crop_size,
            stride=stride,
            resize=resize or None,
            amp=amp,
            output_size=label.shape,
        )[0]
        confusion += confusion_matrix(logits.argmax(dim=0), label, num_classes, ignore_index)
    if world_size > 1:
        dist.all_reduce(confusion)
    model.train(was_training)
    return scores_from_confusion(confusion.cpu(), class_names, classes)


def check_evaluation(run_probe: Callable[[], object], device: torch.device) -> None:
    """Evaluate the first val image before the first iteration (`run_probe`), so that
    evaluation settings the model cannot run fail at once, not after the training they would
    end. The random state is left as it was: a probed run trains as an unprobed one."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            run_probe()
        except BLDAError as error:
            raise BLDAError(
                f"config: evaluation.resize / crop_size / stride (tried on the first val image): "
                f"{error}"
            ) from None
