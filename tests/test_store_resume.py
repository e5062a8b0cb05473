"""Atomic writes and resume of the logit store, and torch tensors stored exactly as numpy
would cast them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from store_helpers import (
    CLASSES,
    assert_same_store,
    expect_add_error,
    five_images,
    random_map,
    random_rows,
    write_images,
)

from blda_tools.errors import BLDAError
from blda_tools.store import LogitWriter


def test_store_appears_only_when_closed(tmp_path):
    path = tmp_path / "atomic.h5"
    with LogitWriter(path, CLASSES) as writer:
        writer.add(*random_rows(13, 4), name="a")
        assert not path.exists() and writer.partial_path.exists()
    assert path.exists() and not writer.partial_path.exists()


CRASHING_WRITER = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from store_helpers import CLASSES, five_images
from blda_tools.store import LogitWriter
writer = LogitWriter({path!r}, CLASSES)
for logits, labels, name in five_images()[:3]:
    writer.add(logits, labels, name=name)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_sigkill_equals_uninterrupted_store(tmp_path):
    reference = tmp_path / "reference.h5"
    write_images(reference, [(lo, la, name, {}) for lo, la, name in five_images()])
    path = tmp_path / "resumed.h5"
    script = CRASHING_WRITER.format(tests=os.path.dirname(__file__), path=str(path))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert not path.exists()
    with LogitWriter(path, CLASSES, resume=True) as writer:
        assert writer.names == ["frame0", "frame1", "frame2"] and writer.num_rows == 36
        for logits, labels, name in five_images():
            if name not in writer.names:
                writer.add(logits, labels, name=name)
    assert_same_store(path, reference)


@pytest.mark.parametrize("added_after_resume", [3, 0])
def test_resume_drops_a_half_written_add(tmp_path, added_after_resume):
    reference = tmp_path / "reference.h5"
    images = five_images()[: 2 + added_after_resume]
    write_images(reference, [(lo, la, name, {}) for lo, la, name in images])
    path = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt), LogitWriter(path, CLASSES) as writer:
        for logits, labels, name in images[:2]:
            writer.add(logits, labels, name=name)
        raise KeyboardInterrupt
    with h5py.File(writer.partial_path, "r+") as file:
        # what an add killed before its commit leaves: rows and an index entry, counts unchanged
        for key, value in (("logits", 9.0), ("labels", 1), ("images/name", "ghost")):
            file[key].resize(file[key].shape[0] + 5, axis=0)
            file[key][-5:] = value
    with LogitWriter(path, CLASSES, resume=True) as writer:
        assert writer.names == ["frame0", "frame1"]
        for logits, labels, name in images[2:]:
            writer.add(logits, labels, name=name)
    assert_same_store(path, reference)


def test_resume_refuses_a_different_store(tmp_path):
    path = tmp_path / "resume.h5"
    with pytest.raises(RuntimeError), LogitWriter(path, CLASSES) as writer:
        writer.add(*random_rows(14, 4))
        raise RuntimeError
    with pytest.raises(
        BLDAError, match=r"resume.h5.partial.*only in the store: sky; only in this run: bus$"
    ):
        LogitWriter(path, ["road", "car", "bus"], resume=True)
    with pytest.raises(BLDAError, match="resume.h5.partial.*float16 logits, not dtype='float32'"):
        LogitWriter(path, CLASSES, dtype="float32", resume=True)
    (tmp_path / "resume.h5.partial").write_text("garbage")
    with pytest.raises(BLDAError, match="resume.h5.partial.*delete it and start again"):
        LogitWriter(path, CLASSES, resume=True)


# --------------------------------------------------------------------------------------------
# Torch tensors: checked and cast in torch, stored as numpy's cast would store them
# --------------------------------------------------------------------------------------------

# Float16 edge cases: subnormals, the smallest normal, ties to even, large values (65280
# is the largest bfloat16 below float16's maximum 65504, added for the other dtypes).
EDGE_VALUES = [0.0, -0.0, 1e-8, 3e-8, 5.96e-8, 6.1e-5, -6.1e-5, 1 + 2**-11, 1 + 3 * 2**-11,
               2049.0, 65280.0, -65280.0, 0.1, -3.3]  # fmt: skip


@pytest.mark.parametrize("tensor_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tensors_store_the_bytes_of_numpy_casts(tmp_path, tensor_dtype, dtype):
    map_logits, map_labels = random_map(20, 6, 7)
    map_logits.reshape(-1)[: len(EDGE_VALUES)] = EDGE_VALUES
    if tensor_dtype != torch.bfloat16:
        map_logits[2, 5, 6] = -65504.0
    map_tensor = torch.from_numpy(map_logits).to(tensor_dtype)
    rows_tensor = map_tensor[:, 1].T  # (W, C), not contiguous
    path = tmp_path / "tensors.h5"
    with LogitWriter(path, CLASSES, dtype=dtype) as writer:
        writer.add(map_tensor, map_labels, name="map")
        writer.add(map_tensor, map_labels, name="strided", stride=2)
        writer.add(rows_tensor, map_labels[1], name="rows")
    # Truth: numpy's row layout and cast of the same values (float32 holds every input exactly).
    exact = map_tensor.float().numpy()
    expected = np.concatenate(
        [
            exact.reshape(3, -1).T,
            exact[:, ::2, ::2].reshape(3, -1).T,
            exact[:, 1].T,
        ]
    ).astype(dtype)
    with h5py.File(path) as file:
        stored = file["logits"][()]
        labels = file["labels"][()]
    assert stored.dtype == np.dtype(dtype)
    assert stored.tobytes() == expected.tobytes()
    expected_labels = np.concatenate(
        [map_labels.reshape(-1), map_labels[::2, ::2].reshape(-1), map_labels[1]]
    )
    np.testing.assert_array_equal(labels, expected_labels)


@pytest.mark.parametrize("tensor_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensors_rejected_with_the_position_of_the_bad_value(tmp_path, tensor_dtype):
    logits, labels = random_rows(21, 6)
    for bad in (np.nan, np.inf, -np.inf):
        broken = torch.from_numpy(logits).to(tensor_dtype)
        broken[2, 1] = bad
        expect_add_error(tmp_path, "NaN or Inf.*row 2, class 1", logits=broken, labels=labels)
        # a (C, H, W) map: pixel (y=1, x=0) of a 2 x 3 map is row 3
        broken_map = torch.zeros(3, 2, 3, dtype=tensor_dtype)
        broken_map[1, 1, 0] = bad
        expect_add_error(tmp_path, "NaN or Inf.*row 3, class 1", logits=broken_map)
    if tensor_dtype != torch.float16:  # float16 cannot hold 7e4
        too_large = torch.full((6, 3), -7e4, dtype=tensor_dtype)
        expect_add_error(
            tmp_path, 'float16 range.*dtype="float32"', logits=too_large, labels=labels
        )


# Adds three images with commits only on demand (after the second), then is killed.
KILLED_BEFORE_COMMIT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from store_helpers import CLASSES, five_images
from blda_tools.store import LogitWriter
writer = LogitWriter({path!r}, CLASSES, commit_interval=3600)
for number, (logits, labels, name) in enumerate(five_images()[:3]):
    writer.add(logits, labels, name=name)
    if number == 1:
        writer.commit()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_commit_interval_resume_redoes_only_the_uncommitted_tail(tmp_path):
    reference = tmp_path / "reference.h5"
    write_images(reference, [(lo, la, name, {}) for lo, la, name in five_images()])
    path = tmp_path / "batched.h5"
    script = KILLED_BEFORE_COMMIT.format(tests=os.path.dirname(__file__), path=str(path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    with LogitWriter(path, CLASSES, resume=True, commit_interval=3600) as writer:
        assert writer.names == ["frame0", "frame1"]  # the third add was never committed
        for logits, labels, name in five_images()[2:]:
            writer.add(logits, labels, name=name)
        assert writer.uncommitted_images == 3
    assert_same_store(path, reference)


def test_commit_interval_exception_commits_completed_adds(tmp_path):
    images = [(lo, la, name, {}) for lo, la, name in five_images()]
    images[1] = (*images[1][:2], "straße/ünïcode", {})  # UTF-8 names in a batched commit
    write_images(tmp_path / "reference.h5", images)
    path = tmp_path / "batched.h5"
    with pytest.raises(KeyboardInterrupt), LogitWriter(path, CLASSES, commit_interval=3600) as w:
        for logits, labels, name, _ in images[:3]:
            w.add(logits, labels, name=name)
        raise KeyboardInterrupt
    with LogitWriter(path, CLASSES, resume=True) as writer:
        assert writer.names == ["frame0", "straße/ünïcode", "frame2"]
        for logits, labels, name, _ in images[3:]:
            writer.add(logits, labels, name=name)
    assert_same_store(path, tmp_path / "reference.h5")
    with pytest.raises(BLDAError, match="commit_interval must be a number of seconds >= 0"):
        LogitWriter(tmp_path / "bad.h5", CLASSES, commit_interval=-1)


@pytest.mark.parametrize("value", [65510.0, -65510.0, 65519.0, 7e4])
def test_tensor_logits_just_beyond_the_float16_range_are_refused(tmp_path, value):
    """Values above float16's maximum that its cast rounds down to the maximum (65504 up to
    65520) are refused as the larger ones are; the maximum itself is stored."""
    assert abs(value) > float(np.finfo(np.float16).max)
    logits = torch.zeros(6, 3)
    logits[4, 2] = value
    expect_add_error(tmp_path, 'float16 range.*dtype="float32"', logits=logits)
    logits[4, 2] = np.sign(value) * float(np.finfo(np.float16).max)
    path = tmp_path / "edge.h5"
    with LogitWriter(path, CLASSES) as writer:
        writer.add(logits, name="edge")
    with h5py.File(path) as file:
        assert file["logits"][4, 2] == np.float16(logits[4, 2].item())
