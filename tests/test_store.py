"""The HDF5 logit store: round trips, chunking across shards, errors, atomic writes and resume.

Truths: the arrays given to the writer (cast to float16 with numpy where the store keeps
float16), numpy slicing for strided maps and concatenations for chunks, and the files as h5py
reads them.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_round_trip(tmp_path, dtype):
    logits, labels = random_rows(0, 50)
    path = tmp_path / "rows.h5"
    # torch float64 input for one add, numpy float32 for the other
    write_images(
        path,
        [(torch.from_numpy(logits[:20]).double(), torch.from_numpy(labels[:20]), "a", {})],
        dtype=dtype,
    )
    with LogitStore(path) as store:
        chunks, stored, stored_labels = read_all(store, rows=16)
    expected = as_float16(logits[:20]) if dtype == "float16" else logits[:20]
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(stored_labels, labels[:20])
    assert chunks[0].logits.dtype == torch.float32 and chunks[0].labels.dtype == torch.int64
    assert [c.first_row for c in chunks] == [0, 16]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_map_round_trip_and_strided_maps(tmp_path, dtype):
    logits, labels = random_map(1, 5, 7)
    path = tmp_path / "maps.h5"
    write_images(
        path,
        [
            (logits, labels, "full", {}),
            (torch.from_numpy(logits), labels, "strided", {"stride": 2}),
        ],
        dtype=dtype,
    )
    cast = as_float16 if dtype == "float16" else (lambda x: x)
    with LogitStore(path) as store:
        full_logits, full_labels = store.read_image(0)
        strided_logits, strided_labels = store.read_image(1)
        _, rows, row_labels = read_all(store)
        full, strided = store.images
    np.testing.assert_array_equal(full_logits.numpy(), cast(logits))
    np.testing.assert_array_equal(full_labels.numpy(), labels)
    # stride 2 on 5 x 7 keeps rows 0, 2, 4 and columns 0, 2, 4, 6
    np.testing.assert_array_equal(strided_logits.numpy(), cast(logits[:, ::2, ::2]))
    np.testing.assert_array_equal(strided_labels.numpy(), labels[::2, ::2])
    assert (full.offset, full.count, full.height, full.width, full.stride) == (0, 35, 5, 7, 1)
    assert (strided.offset, strided.count, strided.shape, strided.stride) == (35, 12, (3, 4), 2)
    assert full.kind == strided.kind == "map"
    # rows of a map are in row-major (h, w) order: row y * W + x holds pixel (y, x)
    np.testing.assert_array_equal(rows[3 * 7 + 4], cast(logits[:, 3, 4]))
    assert row_labels[3 * 7 + 4] == labels[3, 4]


@pytest.mark.parametrize(
    ("ignore_index", "num_classes", "expected"),
    [(255, 3, np.uint8), (-1, 3, np.int32), (255, 300, np.int32)],
)
def test_labels_dtype(tmp_path, ignore_index, num_classes, expected):
    names = [f"c{i}" for i in range(num_classes)]
    logits, labels = random_rows(2, 10, num_classes)
    labels[0] = ignore_index
    path = tmp_path / "labels.h5"
    with LogitWriter(path, names, ignore_index=ignore_index, dtype="float32") as writer:
        writer.add(logits, labels)
    with h5py.File(path) as file:
        assert file["labels"].dtype == expected
        assert file["logits"].dtype == np.float32
    with LogitStore(path) as store:
        np.testing.assert_array_equal(read_all(store)[2], labels)


def test_unlabelled_store(tmp_path):
    logits, _ = random_rows(3, 9)
    path = tmp_path / "unlabelled.h5"
    write_images(path, [(logits, None, "a", {})])
    with LogitStore(path) as store:
        chunks, stored, _ = read_all(store, rows=4)
        assert not store.has_labels and all(c.labels is None for c in chunks)
    np.testing.assert_array_equal(stored, as_float16(logits))
    with h5py.File(path) as file:
        assert "labels" not in file


def test_metadata_round_trip(tmp_path):
    logits, labels = random_rows(4, 5)
    path = tmp_path / "meta.h5"
    extra = {"checkpoint": "daformer.pth", "scales": [1.0, 0.5], "tta": {"flip": True}}
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    write_images(path, [(logits, labels, "a", {})], domain="cityscapes", producer="me", **extra)
    with LogitStore(path) as store:
        assert store.class_names == tuple(CLASSES) and store.num_classes == 3
        assert store.ignore_index == 255 and store.paths == (path,) and len(store) == 5
        created = datetime.datetime.fromisoformat(store.metadata.pop("created"))
        assert store.metadata == {"domain": "cityscapes", "producer": "me", **extra}
    assert created.tzinfo is not None and before <= created <= before + datetime.timedelta(
        minutes=1
    )
    with h5py.File(path) as file:  # the documented schema, read without blda
        assert file.attrs["format"] == "blda-logit-store" and file.attrs["format_version"] == 1
        assert json.loads(file.attrs["class_names"]) == CLASSES and bool(file.attrs["complete"])


def test_samples_with_pixel_index(tmp_path):
    logits, labels = random_rows(5, 4)
    positions = np.array([0, 8, 13, 34])
    map_logits, map_labels = random_map(6, 2, 3)
    path = tmp_path / "sampled.h5"
    write_images(
        path,
        [
            (map_logits, map_labels, "map", {}),
            (logits, labels, "sampled", {"pixel_index": positions, "image_size": (5, 7)}),
        ],
    )
    with LogitStore(path) as store:
        sampled = store.images[1]
        assert (sampled.kind, sampled.height, sampled.width, sampled.count) == ("samples", 5, 7, 4)
        np.testing.assert_array_equal(store.read_pixel_index(1).numpy(), positions)
        assert store.read_pixel_index(0) is None
        with pytest.raises(BLDAError, match="sampled.*not a map"):
            store.read_image(1)


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compression_round_trip(tmp_path, compression):
    logits, labels = random_rows(7, 300)
    path = tmp_path / "compressed.h5"
    write_images(path, [(logits, labels, "a", {})], compression=compression, chunk_rows=64)
    with h5py.File(path) as file:
        assert file["logits"].compression == compression and file["logits"].chunks == (64, 3)
    with LogitStore(path) as store:
        _, stored, stored_labels = read_all(store, rows=50)  # reads straddle the 64-row chunks
    np.testing.assert_array_equal(stored, as_float16(logits))
    np.testing.assert_array_equal(stored_labels, labels)


# --------------------------------------------------------------------------------------------
# Chunks across images and shards
# --------------------------------------------------------------------------------------------


def write_shards(tmp_path, sizes, dtypes=None):
    """One shard per entry of `sizes` (a list of per-image row counts); returns paths, truth."""
    paths, all_logits, all_labels = [], [], []
    for number, image_sizes in enumerate(sizes):
        path = tmp_path / f"shard{number}.h5"
        dtype = dtypes[number] if dtypes else "float16"
        with LogitWriter(path, CLASSES, dtype=dtype, chunk_rows=8) as writer:
            for image, count in enumerate(image_sizes):
                logits, labels = random_rows(100 * number + image, count)
                writer.add(logits, labels, name=f"s{number}i{image}")
                all_logits.append(as_float16(logits) if dtype == "float16" else logits)
                all_labels.append(labels)
        paths.append(path)
    return paths, np.concatenate(all_logits), np.concatenate(all_labels)


def test_chunks_cross_shard_and_image_boundaries(tmp_path):
    paths, logits, labels = write_shards(
        tmp_path, [[5, 6], [4], [0], [9, 1]], ["float16", "float32", "float16", "float16"]
    )
    with LogitStore(paths) as store:  # shard 2 holds one image without rows
        assert store.num_rows == 25
        assert [i.offset for i in store.images] == [0, 5, 11, 15, 15, 24]
        assert [i.shard for i in store.images] == [0, 0, 1, 2, 3, 3]
        chunks, stored, stored_labels = read_all(store, rows=7)
        assert [len(c.logits) for c in chunks] == [7, 7, 7, 4]
        assert [c.first_row for c in chunks] == [0, 7, 14, 21]
        np.testing.assert_array_equal(stored, logits)
        np.testing.assert_array_equal(stored_labels, labels)
        _, part, part_labels = read_all(store, rows=3, start=9, stop=17)
        np.testing.assert_array_equal(part, logits[9:17])
        np.testing.assert_array_equal(part_labels, labels[9:17])
        with pickle.loads(pickle.dumps(store)) as copy:  # as sent to a worker process
            np.testing.assert_array_equal(read_all(copy, start=20)[1], logits[20:])
        with pytest.raises(BLDAError, match=r"row range \[3, 30\)"):
            list(store.iter_chunks(start=3, stop=30))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=3), min_size=1, max_size=3),
    rows=st.integers(1, 20),
    reuse_buffers=st.booleans(),
    data=st.data(),
)
def test_any_chunking_reproduces_the_concatenation(
    tmp_path_factory, sizes, rows, reuse_buffers, data
):
    if sum(map(sum, sizes)) == 0:
        sizes[0][0] = 1
    paths, logits, labels = write_shards(tmp_path_factory.mktemp("shards"), sizes)
    start = data.draw(st.integers(0, len(logits)))
    stop = data.draw(st.integers(start, len(logits)))
    with LogitStore(paths) as store:
        # reused buffers are overwritten by the next chunk: copy each chunk as it comes
        pieces = [
            (c.first_row, c.logits.numpy().copy(), c.labels.numpy().copy())
            for c in store.iter_chunks(rows, start, stop, reuse_buffers=reuse_buffers)
        ]
    assert [first for first, _, _ in pieces] == list(range(start, stop, rows))
    assert all(len(chunk_logits) == rows for _, chunk_logits, _ in pieces[:-1])
    stored = np.concatenate([p[1] for p in pieces]) if pieces else np.empty((0, 3))
    stored_labels = np.concatenate([p[2] for p in pieces]) if pieces else np.empty(0)
    np.testing.assert_array_equal(stored, logits[start:stop])
    np.testing.assert_array_equal(stored_labels, labels[start:stop])


@pytest.mark.parametrize("reuse_buffers", [False, True])
def test_chunks_in_the_stored_dtype(tmp_path, reuse_buffers):
    """dtype=None yields float16 where every shard stores float16 (bit for bit what h5py reads),
    else float32; dtype=float16 converts like numpy's astype."""
    half_paths, half_logits, _ = write_shards(tmp_path / "half", [[5, 6], [4]])
    mixed_paths, mixed_logits, _ = write_shards(
        tmp_path / "mixed", [[5], [7]], ["float16", "float32"]
    )
    for paths, dtype, expected_dtype, truth in (
        (half_paths, None, torch.float16, half_logits.astype(np.float16)),
        (mixed_paths, None, torch.float32, mixed_logits),
        (mixed_paths, torch.float16, torch.float16, mixed_logits.astype(np.float16)),
        (half_paths, torch.float32, torch.float32, half_logits),
    ):
        with LogitStore(paths) as store:
            chunks = [
                (c.logits.dtype, c.logits.numpy().copy())
                for c in store.iter_chunks(4, dtype=dtype, reuse_buffers=reuse_buffers)
            ]
        assert {chunk_dtype for chunk_dtype, _ in chunks} == {expected_dtype}
        stored = np.concatenate([values for _, values in chunks])
        np.testing.assert_array_equal(stored.view(np.uint8), truth.view(np.uint8))
    with LogitStore(half_paths[0]) as store, h5py.File(half_paths[0]) as file:
        assert store.stored_dtype == torch.float16
        whole = next(store.iter_chunks(dtype=None)).logits.numpy()
        np.testing.assert_array_equal(whole.view(np.int16), file["logits"][()].view(np.int16))
        with pytest.raises(BLDAError, match="dtype must be float16, float32 or None"):
            list(store.iter_chunks(dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Bad input to the writer
# --------------------------------------------------------------------------------------------


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


def test_writer_rejects_bad_input(tmp_path):
    logits, labels = random_rows(8, 6)
    map_logits, map_labels = random_map(9, 4, 5)
    expect_add_error(tmp_path, "4 classes; the store has 3", logits=np.zeros((6, 4)))
    expect_add_error(
        tmp_path, r"labels have shape \(5,\); expected \(6,\)", logits=logits, labels=labels[:5]
    )
    expect_add_error(tmp_path, r"expected \(4, 5\)", logits=map_logits, labels=map_labels.T)
    expect_add_error(tmp_path, r"expected \(N, C\) rows or a \(C, H, W\) map", logits=np.zeros(3))
    for bad in (np.nan, np.inf, -np.inf):
        broken = logits.copy()
        broken[2, 1] = bad
        expect_add_error(tmp_path, "NaN or Inf.*row 2, class 1", logits=broken, labels=labels)
    expect_add_error(
        tmp_path, 'float16 range.*dtype="float32"', logits=logits * 0 + 7e4, labels=labels
    )
    expect_add_error(
        tmp_path, r"label 3 is not a class in \[0, 3\)", logits=logits, labels=labels * 0 + 3
    )
    expect_add_error(tmp_path, r"label -2 is not a class", logits=logits, labels=labels * 0 - 2)
    expect_add_error(
        tmp_path, "with labels; all adds must agree", first=(logits, labels), logits=logits
    )
    expect_add_error(
        tmp_path,
        "without labels; all adds must agree",
        first=(logits,),
        logits=logits,
        labels=labels,
    )
    expect_add_error(
        tmp_path, "must be floating point", logits=labels.reshape(2, 3), labels=labels[:2]
    )
    expect_add_error(tmp_path, "stride=2 applies to", logits=logits, labels=labels, stride=2)
    expect_add_error(tmp_path, r"pixel_index values must lie in \[0, 20\)",
                     logits=logits, pixel_index=np.arange(6) * 4, image_size=(4, 5))  # fmt: skip
    expect_add_error(tmp_path, "needs image_size", logits=logits, pixel_index=np.arange(6))
    expect_add_error(tmp_path, "labels must be integers", logits=logits, labels=labels * 1.0)


def test_float16_overflow_fits_float32_and_duplicate_names(tmp_path):
    logits, labels = random_rows(10, 4)
    path = tmp_path / "wide.h5"
    with LogitWriter(path, CLASSES, dtype="float32") as writer:
        writer.add(logits * 0 + 7e4, labels, name="x")
        with pytest.raises(BLDAError, match=r"wide.h5.*'x'.*already added"):
            writer.add(logits, labels, name="x")
    with LogitStore(path) as store:
        assert store.num_rows == 4
        np.testing.assert_array_equal(read_all(store)[1], logits * 0 + 7e4)


def test_writer_rejects_bad_options(tmp_path):
    path = tmp_path / "opts.h5"
    with pytest.raises(BLDAError, match="opts.h5.*dtype='float64'"):
        LogitWriter(path, CLASSES, dtype="float64")
    with pytest.raises(BLDAError, match="opts.h5.*compression='zstd'"):
        LogitWriter(path, CLASSES, compression="zstd")
    with pytest.raises(BLDAError, match="opts.h5.*distinct"):
        LogitWriter(path, ["a", "a"])
    with pytest.raises(BLDAError, match="opts.h5.*metadata model=.*JSON"):
        LogitWriter(path, CLASSES, model=object())


# --------------------------------------------------------------------------------------------
# Bad stores given to the reader
# --------------------------------------------------------------------------------------------


def small_store(path, class_names=CLASSES, ignore_index=255, with_labels=True, seed=11):
    logits, labels = random_rows(seed, 10, len(class_names))
    with LogitWriter(path, class_names, ignore_index=ignore_index) as writer:
        writer.add(logits, labels if with_labels else None, name=f"{path.stem}-image")
    return path


def expect_open_error(paths, *fragments):
    with pytest.raises(BLDAError) as caught:
        LogitStore(paths)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_reader_rejects_unusable_files(tmp_path):
    expect_open_error(tmp_path / "missing.h5", "missing.h5", "no such file")
    (tmp_path / "text.h5").write_text("not hdf5 at all")
    expect_open_error(tmp_path / "text.h5", "text.h5", "not an HDF5 file")
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["logits"] = np.zeros((3, 3))
    expect_open_error(tmp_path / "other.h5", "other.h5", "not a blda logit store")
    newer = small_store(tmp_path / "newer.h5")
    with h5py.File(newer, "r+") as file:
        file.attrs["format_version"] = 2
    expect_open_error(newer, "newer.h5", "format version 2 is not supported")
    truncated = small_store(tmp_path / "truncated.h5")
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    expect_open_error(truncated, "truncated.h5", "truncated or damaged")
    with LogitWriter(tmp_path / "empty.h5", CLASSES) as writer:
        writer.add(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), name="nothing")
    expect_open_error(tmp_path / "empty.h5", "empty.h5", "empty (zero rows)")
    with LogitWriter(tmp_path / "no-adds.h5", CLASSES):
        pass
    expect_open_error(tmp_path / "no-adds.h5", "no-adds.h5", "empty (zero rows)")


def test_reader_rejects_incomplete_stores(tmp_path):
    path = tmp_path / "killed.h5"
    with pytest.raises(RuntimeError), LogitWriter(path, CLASSES) as writer:
        writer.add(*random_rows(12, 4))
        raise RuntimeError("simulated crash")
    assert not path.exists() and (tmp_path / "killed.h5.partial").exists()
    expect_open_error(
        tmp_path / "killed.h5.partial", "killed.h5.partial", "not completed", "--resume"
    )
    os.replace(tmp_path / "killed.h5.partial", tmp_path / "renamed.h5")
    expect_open_error(tmp_path / "renamed.h5", "renamed.h5", "not completed", "--resume")


def test_reader_rejects_inconsistent_shards(tmp_path):
    base = small_store(tmp_path / "base.h5")
    other_names = small_store(tmp_path / "names.h5", class_names=["road", "car", "bus"])
    expect_open_error(
        [base, other_names],
        "base.h5",
        "names.h5",
        "['road', 'car', 'sky']",
        "['road', 'car', 'bus']",
    )
    other_ignore = small_store(tmp_path / "ignore.h5", ignore_index=254)
    expect_open_error([base, other_ignore], "ignore.h5", "ignore indices: 255 vs 254")
    unlabelled = small_store(tmp_path / "unlabelled.h5", with_labels=False)
    expect_open_error([unlabelled, base], "only", "base.h5 has labels")
    expect_open_error([base, base], "listed twice")
    copy = tmp_path / "copy.h5"
    copy.write_bytes(base.read_bytes())
    expect_open_error([base, copy], "base.h5", "copy.h5", "'base-image'")


@pytest.mark.parametrize(("column", "row", "value", "problem"), [
    ("logits", 3, np.nan, "NaN or Inf (first at row 13, image 'second-image')"),
    ("labels", 4, 7, "label 7 at row 14, image 'second-image' is not a class"),
])  # fmt: skip
def test_validation_names_file_and_rows(tmp_path, column, row, value, problem):
    first = small_store(tmp_path / "first.h5")
    second = small_store(tmp_path / "second.h5", seed=12)
    with h5py.File(second, "r+") as file:  # corrupt the file behind the writer's back
        file[column][row] = value
    with LogitStore([first, second]) as store:
        with pytest.raises(BLDAError) as caught:
            list(store.iter_chunks(rows=8))
        assert "second.h5: rows [" in str(caught.value) and problem in str(caught.value)
        with pytest.raises(BLDAError, match="second.h5"):
            store.validate()
        with pytest.raises(BLDAError, match="second.h5"):
            store.validate(rows=3, start=12, stop=16)
        store.validate(start=0, stop=12)  # the bad row lies outside this range
        unchecked = torch.cat([c.logits for c in store.iter_chunks(rows=8, validate=False)])
        assert unchecked.shape == (20, 3)


# --------------------------------------------------------------------------------------------
# Atomic writes and resume
# --------------------------------------------------------------------------------------------


def test_store_appears_only_when_closed(tmp_path):
    path = tmp_path / "atomic.h5"
    with LogitWriter(path, CLASSES) as writer:
        writer.add(*random_rows(13, 4), name="a")
        assert not path.exists() and writer.partial_path.exists()
    assert path.exists() and not writer.partial_path.exists()


def five_images():
    return [(*random_map(20 + i, 3, 4), f"frame{i}") for i in range(5)]


def assert_same_store(path_a, path_b):
    with h5py.File(path_a) as a, h5py.File(path_b) as b:
        assert set(a) == set(b) and set(a["images"]) == set(b["images"])
        for key in ["logits", "labels"] + [f"images/{c}" for c in b["images"]]:
            np.testing.assert_array_equal(a[key][:], b[key][:])
        for attr in ("class_names", "committed_rows", "committed_images", "complete"):
            assert a.attrs[attr] == b.attrs[attr]


CRASHING_WRITER = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_store import CLASSES, five_images
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
    with pytest.raises(BLDAError, match=r"resume.h5.partial.*classes \['road', 'car', 'sky'\]"):
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
