"""Shared builders for the logit-store tests: small random rows and maps, stores, comparisons."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from blda_tools.errors import BLDAError
from blda_tools.store import LogitStore, LogitWriter

CLASSES = ["road", "car", "sky"]


def random_rows(seed: int, count: int, num_classes: int = 3, scale: float = 5.0):
    generator = np.random.default_rng(seed)
    logits = (scale * generator.standard_normal((count, num_classes))).astype(np.float32)
    labels = generator.integers(0, num_classes, count)
    return logits, labels


def random_map(seed: int, height: int, width: int, num_classes: int = 3):
    generator = np.random.default_rng(seed)
    logits = (5 * generator.standard_normal((num_classes, height, width))).astype(np.float32)
    labels = generator.integers(0, num_classes, (height, width))
    labels[0, 0] = 255  # an ignored pixel survives the round trip
    return logits, labels


def as_float16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def read_all(store: LogitStore, **options):
    chunks = list(store.iter_chunks(**options))
    logits = torch.cat([c.logits for c in chunks]).numpy()
    labels = torch.cat([c.labels for c in chunks]).numpy() if store.has_labels else None
    return chunks, logits, labels


def write_images(path, images, **options):
    """images: list of (logits, labels, name, add_options)."""
    with LogitWriter(path, CLASSES, **options) as writer:
        for logits, labels, name, add_options in images:
            writer.add(logits, labels, name=name, **add_options)


def small_store(path, class_names=CLASSES, ignore_index=255, with_labels=True, seed=11):
    logits, labels = random_rows(seed, 10, len(class_names))
    with LogitWriter(path, class_names, ignore_index=ignore_index) as writer:
        writer.add(logits, labels if with_labels else None, name=f"{path.stem}-image")
    return path


def five_images():
    return [(*random_map(20 + i, 3, 4), f"frame{i}") for i in range(5)]


def assert_same_store(path_a, path_b):
    with h5py.File(path_a) as a, h5py.File(path_b) as b:
        assert set(a) == set(b) and set(a["images"]) == set(b["images"])
        for key in ["logits", "labels"] + [f"images/{c}" for c in b["images"]]:
            np.testing.assert_array_equal(a[key][:], b[key][:])
        for attr in ("class_names", "committed_rows", "committed_images", "complete"):
            assert a.attrs[attr] == b.attrs[attr]


def expect_add_error(tmp_path, match, first=None, **add):
    path = tmp_path / "bad.h5"
    with pytest.raises(BLDAError) as caught, LogitWriter(path, CLASSES) as writer:
        if first is not None:
            writer.add(*first, name="first")
        writer.add(name="img7", **add)
    message = str(caught.value)
    assert "bad.h5" in message and "img7" in message, message
    assert caught.match(match)
    assert not path.exists()
