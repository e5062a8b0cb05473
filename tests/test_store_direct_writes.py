"""The writer's whole-chunk writes and its entry for rows laid out by the caller, against
h5py's plain slice assignment and `LogitWriter.prepare` as truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from blda_tools.errors import BLDAError
from blda_tools.store import LogitStore, LogitWriter
from blda_tools.store.file_io import write_rows

CLASSES = ["a", "b", "c"]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("columns", [(), (3,)])
def test_chunked_writes_equal_slice_assignment(tmp_path, direct, columns):
    # Starts and lengths on, before and across chunk boundaries (chunks of 8 rows).
    pieces = [8, 5, 3, 16, 1, 20, 7, 8, 0, 9]
    rng = np.random.default_rng(0)
    values = rng.standard_normal((sum(pieces), *columns)).astype(np.float16)
    with h5py.File(tmp_path / "t.h5", "w", rdcc_nbytes=0) as file:
        options = dict(shape=(0, *columns), maxshape=(None, *columns), chunks=(8, *columns))
        fast = file.create_dataset("fast", dtype="float16", **options)
        plain = file.create_dataset("plain", dtype="float16", **options)
        start = 0
        for length in pieces:
            part = values[start : start + length]
            for dataset in (fast, plain):
                dataset.resize(start + length, axis=0)
            if length:
                write_rows(fast, start, part, direct=direct)
                plain[start : start + length] = part
            start += length
        assert np.array_equal(fast[()], plain[()]) and np.array_equal(fast[()], values)


def test_non_contiguous_or_converted_values_take_the_plain_write(tmp_path):
    values = np.arange(48, dtype=np.float32).reshape(16, 3)
    with h5py.File(tmp_path / "t.h5", "w") as file:
        dataset = file.create_dataset("x", shape=(16, 3), dtype="float16", chunks=(8, 3))
        write_rows(dataset, 0, values, direct=True)  # float32 into float16: HDF5 converts
        assert np.array_equal(dataset[()], values.astype(np.float16))
        write_rows(dataset, 0, values[::-1].astype(np.float16), direct=True)
        assert np.array_equal(dataset[()], values[::-1].astype(np.float16))


def map_and_rows(stride):
    logits = torch.randn(3, 5, 7) * 4
    rows = np.ascontiguousarray(
        logits[:, ::stride, ::stride].permute(1, 2, 0).reshape(-1, 3).half()
    )
    labels = np.random.default_rng(1).integers(0, 3, (5, 7)).astype(np.uint8)
    labels[0, 0] = 255
    return logits, rows, labels


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_laid_out_rows_store_what_prepare_stores(tmp_path, stride):
    logits, rows, labels = map_and_rows(stride)
    largest = float(logits[:, ::stride, ::stride].abs().max())
    for name in ("prepare", "laid_out"):
        with LogitWriter(tmp_path / f"{name}.h5", CLASSES) as writer:
            if name == "prepare":
                writer.add(logits, labels, "img", stride=stride)
            else:
                prepared = writer.prepare_map_rows(
                    rows, labels, "img", (5, 7), stride, largest=largest
                )
                writer.append(prepared)
    expected, stored = LogitStore(tmp_path / "prepare.h5"), LogitStore(tmp_path / "laid_out.h5")
    assert stored.images == expected.images
    for a, b in zip(expected.iter_arrays(dtype=None), stored.iter_arrays(dtype=None), strict=True):
        assert np.array_equal(a.logits, b.logits) and np.array_equal(a.labels, b.labels)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"largest": float("nan")}, "NaN or Inf"),
        ({"largest": 70000.0}, "beyond the float16 range"),
        ({"rows": "float32"}, "laid-out rows must be"),
        ({"rows": "short"}, "laid-out rows must be"),
        ({"rows": "classes"}, "logits have 2 classes; the store has 3"),
        ({"labels": "wrong"}, "labels have shape"),
        ({"labels": "bad"}, "is not a class"),
    ],
)
def test_laid_out_rows_are_checked(tmp_path, change, message):
    _, rows, labels = map_and_rows(1)
    largest = change.get("largest", 1.0)
    rows = {
        "float32": rows.astype(np.float32),
        "short": rows[:-1],
        "classes": rows[:, :2].copy(),
    }.get(change.get("rows"), rows)
    bad_labels = labels.copy()
    bad_labels[1, 1] = 7
    labels = {"wrong": labels[:, :-1], "bad": bad_labels}.get(change.get("labels"), labels)
    with LogitWriter(tmp_path / "s.h5", CLASSES) as writer:
        with pytest.raises(BLDAError, match=message):
            writer.prepare_map_rows(rows, labels, "img", (5, 7), largest=largest)
        writer.add(torch.zeros(3, 1, 1), name="other")  # leaves a readable store
