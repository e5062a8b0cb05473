"""The shipped sample: its size, its consistency, and the class bias it is shipped to show.

Truths: confusion matrices, IoU and Eq. 4 computed here with numpy from the store's raw HDF5
arrays (read with h5py, not blda); labels decoded from the PNGs with cityscapesscripts' table;
logits recomputed with a plain forward pass of the shipped checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from PIL import Image

from blda_tools.models import create_model, load_checkpoint, normalize
from blda_tools.statistics import metrics
from blda_tools.store import LogitStore

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
TARGET_VAL = SAMPLE / "stores" / "target_val.h5"
VAL_IMAGES = SAMPLE / "synthcity" / "target" / "leftImg8bit" / "val" / "synthcity"
VAL_LABELS = SAMPLE / "synthcity" / "target" / "gtFine" / "val" / "synthcity"
NUM_CLASSES = 19
IGNORE = 255
BUDGET_BYTES = 25 * 1024 * 1024


def raw_store(path: Path) -> tuple[np.ndarray, np.ndarray, h5py.Group]:
    """Logits (P, C) float32 and labels (P,) straight from the HDF5 file."""
    with h5py.File(path, "r") as file:
        index = {key: file["images"][key][()] for key in ("name", "offset", "count", "stride")}
        return file["logits"][()].astype(np.float32), file["labels"][()].astype(np.int64), index


def numpy_confusion(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    kept = labels != IGNORE
    pairs = labels[kept] * NUM_CLASSES + logits[kept].argmax(1)
    return np.bincount(pairs, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def numpy_iou(confusion: np.ndarray) -> np.ndarray:
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def numpy_bias(confusion: np.ndarray) -> np.ndarray:
    """Eq. 4: mean over the classes present of P(argmax = l | y = c), minus 1 / C."""
    rows = confusion.sum(1)
    conditional = confusion[rows > 0] / rows[rows > 0, None]
    return conditional.mean(0) - 1.0 / NUM_CLASSES


def label_id_to_train_id() -> np.ndarray:
    table = np.full(256, IGNORE, dtype=np.int64)
    for label in cityscapes_labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < NUM_CLASSES:
            table[label.id] = label.trainId
    return table


@pytest.fixture(scope="module")
def target_val():
    return raw_store(TARGET_VAL)


def test_sample_fits_the_size_budget():
    total = sum(path.stat().st_size for path in SAMPLE.rglob("*") if path.is_file())
    assert total <= BUDGET_BYTES, f"sample_data holds {total / 2**20:.1f} MiB"


def test_sample_holds_the_documented_splits():
    manifest = json.loads((SAMPLE / "synthcity" / "synthcity.json").read_text())
    assert manifest["size"] == {"height": 128, "width": 256}
    assert manifest["counts"] == {"source": 80, "target/train": 40, "target/val": 40}
    assert len(list(VAL_IMAGES.glob("*_leftImg8bit.png"))) == 40
    for name in ("source", "target_train", "target_val"):
        assert LogitStore(SAMPLE / "stores" / f"{name}.h5").has_labels


def test_model_shows_class_dependent_bias_on_target_val(target_val):
    logits, labels, _ = target_val
    confusion = numpy_confusion(logits, labels)
    iou = numpy_iou(confusion)
    assert np.nanstd(iou) >= 0.10  # std of class IoU >= 10 points
    bias = numpy_bias(confusion)
    assert np.isclose(bias.sum(), 0.0, atol=1e-12)  # Eq. 4 biases sum to zero
    assert (bias < 0).sum() >= 3


def test_library_metrics_agree_with_numpy_on_the_store(target_val):
    logits, labels, _ = target_val
    confusion = numpy_confusion(logits, labels)
    store = LogitStore(TARGET_VAL)
    streamed = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for chunk in store.iter_chunks(rows=50_000):
        kept = chunk.labels != IGNORE
        pairs = chunk.labels[kept] * NUM_CLASSES + chunk.logits[kept].argmax(1)
        streamed += torch.bincount(pairs, minlength=NUM_CLASSES**2).view(NUM_CLASSES, -1)
    np.testing.assert_array_equal(streamed.numpy(), confusion)
    scores = metrics.SegmentationMetrics.from_confusion(torch.from_numpy(confusion))
    np.testing.assert_allclose(scores.iou, numpy_iou(confusion), atol=1e-12)
    np.testing.assert_allclose(
        metrics.bias_from_confusion(torch.from_numpy(confusion)),
        numpy_bias(confusion),
        atol=1e-12,
    )


def test_store_labels_are_the_val_pngs_at_stride_4(target_val):
    _, labels, index = target_val
    to_train_id = label_id_to_train_id()
    assert set(index["stride"].tolist()) == {4}
    for name, offset, count in zip(index["name"], index["offset"], index["count"], strict=True):
        stem = Path(name.decode()).name.removesuffix("_leftImg8bit")
        label_ids = np.asarray(Image.open(VAL_LABELS / f"{stem}_gtFine_labelIds.png"))
        expected = to_train_id[label_ids][::4, ::4].reshape(-1)
        np.testing.assert_array_equal(labels[offset : offset + count], expected)


def test_store_logits_come_from_the_shipped_checkpoint(target_val):
    logits, _, index = target_val
    model = create_model("tiny", NUM_CLASSES)
    load_checkpoint(model, SAMPLE / "model" / "tiny_source.pth")  # strict, weights only
    model.eval()
    name, offset, count = index["name"][0].decode(), index["offset"][0], index["count"][0]
    image = np.asarray(Image.open(VAL_IMAGES / f"{Path(name).name}.png").convert("RGB"))
    batch = torch.from_numpy(image.copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        full = F.interpolate(
            model(normalize(batch)), size=image.shape[:2], mode="bilinear", align_corners=False
        )[0]
    expected = full[:, ::4, ::4].reshape(NUM_CLASSES, -1).T.numpy()
    stored = logits[offset : offset + count]
    # float16 storage: relative precision ~5e-4 of the logit's size.
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-2)
