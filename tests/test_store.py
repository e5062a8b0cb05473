"""The HDF5 logit store: round trips, metadata, compression and chunking across shards.

Truths: the arrays given to the writer (cast to float16 with numpy where the store keeps
float16), numpy slicing for strided maps and concatenations for chunks, and the files as h5py
reads them.
"""

from __future__ import annotations

import datetime
import json
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from store_helpers import (
    CLASSES,
    as_float16,
    random_map,
    random_rows,
    read_all,
    small_store,
    write_images,
)

from blda_tools.errors import BLDAError
from blda_tools.store import LogitStore, LogitWriter

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
    [(255, 3, np.uint8), (-1, 3, np.int32), (300, 300, np.int32)],
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
    read_ahead=st.booleans(),
    data=st.data(),
)
def test_any_chunking_reproduces_the_concatenation(
    tmp_path_factory, sizes, rows, reuse_buffers, read_ahead, data
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
            for c in store.iter_chunks(
                rows, start, stop, reuse_buffers=reuse_buffers, read_ahead=read_ahead
            )
        ]
    assert [first for first, _, _ in pieces] == list(range(start, stop, rows))
    assert all(len(chunk_logits) == rows for _, chunk_logits, _ in pieces[:-1])
    stored = np.concatenate([p[1] for p in pieces]) if pieces else np.empty((0, 3))
    stored_labels = np.concatenate([p[2] for p in pieces]) if pieces else np.empty(0)
    np.testing.assert_array_equal(stored, logits[start:stop])
    np.testing.assert_array_equal(stored_labels, labels[start:stop])


def test_read_ahead_leaves_the_held_chunk_alone_and_stops_early(tmp_path):
    """While the caller holds a chunk the next one is read, into other buffers: the held chunk
    keeps its rows (checked after the read ahead has had time to finish). Closing the iterator
    early returns (the read in flight is waited for)."""
    paths, logits, labels = write_shards(tmp_path, [[7, 9], [8]])
    with LogitStore(paths) as store:
        chunks = store.iter_arrays(5, reuse_buffers=True, read_ahead=True)
        for chunk in chunks:
            first = chunk.first_row
            time.sleep(0.02)
            np.testing.assert_array_equal(chunk.logits, logits[first : first + 5])
            np.testing.assert_array_equal(chunk.labels, labels[first : first + 5])
        chunks = store.iter_arrays(5, reuse_buffers=True, read_ahead=True)
        assert next(chunks).first_row == 0
        chunks.close()
        assert [c.first_row for c in store.iter_arrays(5, start=24, read_ahead=True)] == []


def test_read_ahead_raises_a_bad_chunk_when_it_is_taken(tmp_path):
    """A NaN in the third chunk: the first two come out, taking the third raises."""
    path = small_store(tmp_path / "bad.h5")  # 10 rows
    with h5py.File(path, "r+") as file:  # corrupt the file behind the writer's back
        file["logits"][7, 1] = np.nan
    with LogitStore(path) as store:
        taken = []
        with pytest.raises(BLDAError, match="NaN"):
            for chunk in store.iter_arrays(3, read_ahead=True, reuse_buffers=True):
                taken.append(chunk.first_row)
        assert taken == [0, 3]


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


def test_images_prepared_in_threads_are_stored_in_the_order_appended(tmp_path):
    """`prepare` leaves the file and the writer alone; `append` decides the order."""
    images = [random_map(40 + i, 5, 6) for i in range(6)]
    path = tmp_path / "threads.h5"
    with LogitWriter(path, CLASSES, dtype="float32") as writer:
        with ThreadPoolExecutor(3) as pool:
            prepared = list(
                pool.map(
                    lambda item: writer.prepare(
                        torch.from_numpy(item[1][0]), item[1][1], f"i{item[0]}"
                    ),
                    enumerate(images),
                )
            )
        assert writer.num_images == 0 and writer.num_rows == 0
        for index in (4, 0, 5, 1, 3, 2):
            writer.append(prepared[index])
        with pytest.raises(BLDAError, match="'i4': an image with this name was already added"):
            writer.append(prepared[4])
    with LogitStore(path) as store:
        assert [record.name for record in store.images] == ["i4", "i0", "i5", "i1", "i3", "i2"]
        for position, index in enumerate((4, 0, 5, 1, 3, 2)):
            logits, labels = store.read_image(position)
            assert np.array_equal(logits.numpy(), images[index][0])
            assert np.array_equal(labels.numpy(), images[index][1])
