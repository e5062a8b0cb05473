"""The logit store refuses bad input to the writer and unusable files in the reader, naming
the file and the problem."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from store_helpers import (
    CLASSES,
    expect_add_error,
    random_map,
    random_rows,
    read_all,
    small_store,
)

from blda_tools.errors import BLDAError
from blda_tools.store import LogitStore, LogitWriter

# --------------------------------------------------------------------------------------------
# Bad input to the writer
# --------------------------------------------------------------------------------------------


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
    # A damaged global heap (where HDF5 keeps the string attributes): its OSError named no file
    heap = small_store(tmp_path / "heap.h5")
    content = heap.read_bytes()
    assert content.count(b"GCOL") >= 1
    heap.write_bytes(content.replace(b"GCOL", b"XXXX"))
    expect_open_error(heap, "heap.h5", "the file is damaged")
    # a zeroed block where the objects are: h5py's KeyError ("unable to determine object type")
    zeroed = small_store(tmp_path / "zeroed.h5")
    content = bytearray(zeroed.read_bytes())
    content[200:4296] = bytes(4096)
    zeroed.write_bytes(bytes(content))
    expect_open_error(zeroed, "zeroed.h5", "")
    with LogitWriter(tmp_path / "empty.h5", CLASSES) as writer:
        writer.add(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), name="nothing")
    expect_open_error(tmp_path / "empty.h5", "empty.h5", "empty (zero rows)")
    with LogitWriter(tmp_path / "no-adds.h5", CLASSES):
        pass
    expect_open_error(tmp_path / "no-adds.h5", "no-adds.h5", "empty (zero rows)")


def _set_attribute(name, value):
    def damage(file):
        file.attrs[name] = value

    return damage


def _replace(name, make):
    def damage(file):
        del file[name]
        make(file, name)

    return damage


def _two_image_store(path):
    with LogitWriter(path, CLASSES) as writer:
        writer.add(*random_rows(1, 4), name="first")
        writer.add(*random_rows(2, 6), name="second")
    return path


@pytest.mark.parametrize(
    ("damage", "problem"),
    [(_set_attribute("class_names", "[1, 2, 3]"), "class_names must be a list of strings"),
     (_set_attribute("class_names", '"abc"'), "class_names holds str 'abc'; expected a JSON list"),
     (_set_attribute("class_names", '{"a": 1, "b": 2, "c": 3}'), "expected a JSON list"),
     (_set_attribute("class_names", '["a", "a", "b"]'), "non-empty and distinct"),
     (_set_attribute("class_names", "[]"), "non-empty and distinct"),
     (_set_attribute("class_names", "road, car"), "class_names is not JSON text"),
     (_set_attribute("metadata", "[1, 2]"), "metadata holds list [1, 2]; expected a JSON object"),
     (_set_attribute("format_version", "x"), "format version 'x' is not supported"),
     (_set_attribute("complete", "false"), "complete is 'false', not a boolean"),
     (_set_attribute("ignore_index", 1), "ignore_index 1 is a class id (the classes are 0..2)"),
     (_set_attribute("num_classes", 4), "num_classes is 4 but it holds 3 class names"),
     (_set_attribute("committed_rows", 7), "committed_rows is 7 but it holds 10 logit rows"),
     (_replace("logits", lambda f, n: f.create_group(n)), "logits is not a dataset"),
     (_replace("images/name", lambda f, n: f.create_dataset(n, data=np.array([b"\xff\xfe", b"b"]))),
      "images/name is not UTF-8 text"),
     (_replace("images/name", lambda f, n: f.create_dataset(n, data=np.array([b"x", b"x"]))),
      "holds image 'x' twice"),
     (_replace("images/count", lambda f, n: f.create_dataset(n, data=np.array([14, -4]))),
      "negative images/count"),
     (_replace("images/stride", lambda f, n: f.create_dataset(n, data=np.array([0, 1]))),
      "images/stride below 1")],
)  # fmt: skip
def test_reader_names_each_damaged_header_field(tmp_path, damage, problem):
    path = _two_image_store(tmp_path / "damaged.h5")
    with h5py.File(path, "r+") as file:
        damage(file)
    expect_open_error(path, "damaged.h5", problem)


def test_writer_refuses_an_ignore_index_that_is_a_class(tmp_path):
    with pytest.raises(BLDAError, match="ignore_index 1 is a class id"):
        LogitWriter(tmp_path / "x.h5", CLASSES, ignore_index=1)
    assert not any(tmp_path.iterdir())


def test_reader_rejects_incomplete_stores(tmp_path):
    path = tmp_path / "killed.h5"
    with pytest.raises(RuntimeError), LogitWriter(path, CLASSES) as writer:
        writer.add(*random_rows(12, 4))
        raise RuntimeError("simulated crash")
    assert not path.exists() and (tmp_path / "killed.h5.partial").exists()
    # The command to continue it names the store where it is, not in the current folder.
    expect_open_error(
        tmp_path / "killed.h5.partial", "killed.h5.partial", "not completed",
        f"--out {tmp_path / 'killed.h5'} --resume",
    )  # fmt: skip
    expect_open_error(tmp_path / "absent.h5.partial", "absent.h5.partial: no such file")
    os.replace(tmp_path / "killed.h5.partial", tmp_path / "renamed.h5")
    expect_open_error(tmp_path / "renamed.h5", "renamed.h5", "not completed", "--resume")


def test_reader_rejects_inconsistent_shards(tmp_path):
    base = small_store(tmp_path / "base.h5")
    other_names = small_store(tmp_path / "names.h5", class_names=["road", "car", "bus"])
    expect_open_error(
        [base, other_names],
        "base.h5",
        "names.h5",
        "only in base.h5: sky; only in names.h5: bus",
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


def test_an_older_image_folder_store_of_256_classes_reads_255_as_a_class(tmp_path):
    """blda before 2026-12-07 wrote image-folder stores with ignore_index 255 whatever the
    class count; every image there has a class, so the reader takes C as their ignore value
    and class 255's rows count. Another store with a class-id ignore_index is refused."""
    names = [f"c{index}" for index in range(300)]
    path = tmp_path / "imagenet.h5"
    labels = np.array([0, 255, 299])
    with LogitWriter(path, names, ignore_index=300, dataset="image-folder") as writer:
        writer.add(np.zeros((3, 300), np.float32), labels, name="x")
    with h5py.File(path, "r+") as file:
        file.attrs["ignore_index"] = 255  # as the older writer left it
    with LogitStore(path) as store:
        assert store.ignore_index == 300
        assert read_all(store)[2].tolist() == [0, 255, 299]
    with h5py.File(path, "r+") as file:
        metadata = json.loads(file.attrs["metadata"])
        file.attrs["metadata"] = json.dumps({**metadata, "dataset": "cityscapes"})
    expect_open_error(path, "ignore_index 255 is a class id", "such as 300 or -1")


def test_a_rank_without_images_is_refused_before_the_dump(tmp_path):
    from blda_tools.demo import CHECKPOINT, DEFAULT_SAMPLE_DIR
    from blda_tools.inference.dump import prepare_dump

    with pytest.raises(BLDAError, match="rank 2 of 3: no image to dump .*run at most 2 processes"):
        prepare_dump("tiny", DEFAULT_SAMPLE_DIR / CHECKPOINT, "cityscapes",
                     DEFAULT_SAMPLE_DIR / "synthcity" / "target", "val", tmp_path / "s.h5",
                     rank=2, world_size=3, max_images=2, workers=0, device="cpu")  # fmt: skip
    assert not any(tmp_path.iterdir())
