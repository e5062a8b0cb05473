"""`dump-logits` end to end on tiny Cityscapes-layout fixtures: stored logits and metrics against
a direct numpy evaluation (cityscapesscripts' label table), subsampling and stratified
sampling against hand-worked expectations, and sharding (bad input: test_dump_errors.py;
interruption and resume: test_dump_resume.py)."""

from __future__ import annotations

import os
import textwrap

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cityscapesscripts.helpers.labels import id2label
from fixtures_datasets import random_image, write_gray, write_rgb
from PIL import Image

from blda_tools.datasets import SegmentationSample, build_dataset
from blda_tools.diagnose import diagnose
from blda_tools.inference.dump import (
    CorruptImageWarning,
    PixelSampling,
    dump_logits,
)
from blda_tools.inference.dump_files import shard_path
from blda_tools.inference.loader import compact_label
from blda_tools.inference.predict import InferenceSettings
from blda_tools.inference.streams import default_streams
from blda_tools.models import create_model
from blda_tools.store import LogitStore

WHOLE = InferenceSettings(mode="whole")
# Typed in from mmseg's img_norm_cfg, not imported from the code under test.
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
# A per-pixel linear model (1 x 1 conv) with known weights, and a hook that SIGKILLs its own
# process at the N-th forward pass (BLDA_TEST_KILL_AT), to interrupt a dump deterministically.
PLUGIN_SOURCE = textwrap.dedent(
    """
    import itertools, os, signal, time
    import torch
    from torch import nn

    class PixelLinear(nn.Conv2d):
        calls = itertools.count(1)  # next() is atomic: streams call forward concurrently

        def forward(self, x):
            if next(PixelLinear.calls) == int(os.environ.get("BLDA_TEST_KILL_AT", "0")):
                time.sleep(3)  # the writer thread stores and commits the images before
                os.kill(os.getpid(), signal.SIGKILL)
            return super().forward(x)

    def weights(num_classes):
        weight = torch.arange(num_classes * 3, dtype=torch.float32).reshape(num_classes, 3)
        return torch.sin(weight), torch.linspace(-1, 1, num_classes)

    def build(num_classes):
        model = PixelLinear(3, num_classes, 1)
        weight, bias = weights(num_classes)
        model.weight.data = weight[:, :, None, None].clone()
        model.bias.data = bias.clone()
        return model

    def build_huge(num_classes):
        model = build(num_classes)
        model.bias.data += 1e6  # beyond float16
        return model
    """
)
NUM_CLASSES = 19


def make_cityscapes(root, count=4, size=(12, 16), split="val", labels=True, label_ids=None):
    """`count` images in the official layout; label ids random in 0..33 (ignored ids included)."""
    paths = []
    for index in range(count):
        city = ("aachen", "bochum")[index % 2]
        stem = f"{city}_000000_{index:06d}"
        paths.append(
            write_rgb(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                random_image(*size, seed=index),
            )
        )
        if labels:
            ids = np.random.default_rng(100 + index).integers(0, 34, size)
            ids = ids if label_ids is None else label_ids
            write_gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
    return paths


def train_ids_of(image_path):
    """The labelIds file of an image mapped through cityscapesscripts' table with numpy."""
    label_path = str(image_path).replace("leftImg8bit", "gtFine", 1)
    label_path = label_path.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    ids = np.array(Image.open(label_path))
    table = np.full(256, 255)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256 and 0 <= label.trainId < 255:
            table[label_id] = label.trainId
    return table[ids]


def normalised(image_path):
    pixels = np.array(Image.open(image_path).convert("RGB"), dtype=np.float64)
    return (pixels - MEAN) / STD  # (H, W, 3)


def plugin_logits(image_path, num_classes=NUM_CLASSES):
    """The plugin model's logits (C, H, W), worked out with numpy from its weights."""
    weight = np.sin(np.arange(num_classes * 3, dtype=np.float32).reshape(num_classes, 3))
    bias = np.linspace(-1, 1, num_classes, dtype=np.float32)
    return np.einsum("hwk,ck->chw", normalised(image_path), weight) + bias[:, None, None]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    return install_plugin(tmp_path, monkeypatch)


def install_plugin(tmp_path, monkeypatch) -> str:
    """Module spec of the per-pixel plugin model, importable here and in subprocesses."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "dump_test_plugin.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return "dump_test_plugin:build"


def dump(model, data_root, out, checkpoint=None, split="val", **options):
    """`dump_logits` on a Cityscapes-layout fixture."""
    return dump_logits(model, checkpoint, "cityscapes", data_root, split, out, **options)


def read_all(path):
    """Every dataset of an HDF5 store as numpy arrays, and its metadata without `created`."""
    arrays = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
        attributes = {k: v for k, v in file.attrs.items() if k != "created"}
    return arrays, attributes


def rows_by_image(store):
    """{name: (logits (n, C), labels (n,), pixel_index or None)} of a (sharded) store."""
    logits = torch.cat([chunk.logits for chunk in store.iter_chunks()])
    labels = torch.cat([chunk.labels for chunk in store.iter_chunks()])
    return {
        record.name: (
            logits[record.offset : record.offset + record.count],
            labels[record.offset : record.offset + record.count],
            store.read_pixel_index(index),
        )
        for index, record in enumerate(store.images)
    }


# ---------------------------------------------------------------- against direct evaluation


# (loader processes, inference streams): decoded by a worker for one stream; decoded by each
# of two streams (the CPU default).
@pytest.mark.parametrize("workers, streams", [(1, 1), (0, 2)])
def test_dump_then_diagnose_equals_direct_evaluation(tmp_path, workers, streams):
    images = make_cityscapes(tmp_path / "data", count=5, size=(20, 28))
    torch.manual_seed(0)
    model = create_model("tiny", NUM_CLASSES).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    summary = dump(
        "tiny",
        tmp_path / "data",
        tmp_path / "val.h5",
        checkpoint=tmp_path / "tiny.pth",
        inference=WHOLE,
        workers=workers,
        streams=streams,
        batch_size=2,
        dtype="float32",
    )
    assert (summary.images_written, summary.rows_written) == (5, 5 * 20 * 28)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    with LogitStore(tmp_path / "val.h5") as store:
        assert store.metadata["producer"] == "blda dump-logits 0.1.0"
        assert store.metadata["inference"]["mode"] == "whole"
        assert store.metadata["checkpoint"] == str(tmp_path / "tiny.pth")
        for index, image_path in enumerate(sorted(images)):
            x = torch.from_numpy(normalised(image_path)).permute(2, 0, 1)[None].float()
            with torch.no_grad():
                direct = F.interpolate(
                    model(x), size=(20, 28), mode="bilinear", align_corners=False
                )[0]
            stored, stored_labels = store.read_image(index)
            torch.testing.assert_close(stored, direct, atol=1e-5, rtol=1e-5)
            truth = train_ids_of(image_path)
            assert np.array_equal(stored_labels.numpy(), truth)
            kept = truth != 255
            np.add.at(confusion, (truth[kept], direct.argmax(0).numpy()[kept]), 1)
    result = diagnose(tmp_path / "val.h5", tmp_path / "diag", plots_and_report=False)
    assert np.array_equal(np.array(result.confusion), confusion)
    hits = np.diag(confusion).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = hits / (confusion.sum(0) + confusion.sum(1) - hits)
    np.testing.assert_allclose(np.array(result.iou, dtype=float), iou, equal_nan=True)
    assert result.miou == pytest.approx(np.nanmean(iou))


@pytest.mark.parametrize("workers", [0, 1])
def test_streams_store_images_in_dataset_order_across_sizes_and_corrupt_files(
    tmp_path, plugin, workers
):
    """Three streams finish out of order; the store still lists the images in dataset order,
    each with its own logits (worked out with numpy), batches split where the size changes."""
    root = tmp_path / "data"
    paths = []
    for index, size in enumerate([(6, 8), (6, 8), (5, 7), (6, 8), (4, 9), (4, 9), (6, 8)]):
        stem = f"aachen_000000_{index:06d}"
        paths.append(
            write_rgb(
                root / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png",
                random_image(*size, seed=index),
            )
        )
        ids = np.random.default_rng(50 + index).integers(0, 34, size)
        write_gray(root / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelIds.png", ids)
    paths[3].write_bytes(b"not a png")
    with pytest.warns(CorruptImageWarning, match=str(paths[3])):
        summary = dump(
            plugin,
            root,
            tmp_path / "o.h5",
            inference=WHOLE,
            workers=workers,
            streams=3,
            batch_size=3,
            dtype="float32",
        )
    assert (summary.images_written, len(summary.corrupt)) == (6, 1)
    kept = [path for index, path in enumerate(paths) if index != 3]
    with LogitStore(tmp_path / "o.h5") as store:
        assert [record.name for record in store.images] == [
            f"leftImg8bit/val/aachen/aachen_000000_{index:06d}_leftImg8bit"
            for index in (0, 1, 2, 4, 5, 6)
        ]
        for index, path in enumerate(kept):
            logits, labels = store.read_image(index)
            np.testing.assert_allclose(logits.numpy(), plugin_logits(path), atol=1e-4)
            assert np.array_equal(labels.numpy(), train_ids_of(path))


def test_default_streams_share_the_cpu_threads():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert default_streams(torch.device("cpu")) == (2, 2)
        assert default_streams(torch.device("cuda")) == (1, 4)
        torch.set_num_threads(1)
        assert default_streams(torch.device("cpu")) == (1, 1)
    finally:
        torch.set_num_threads(previous)


def test_more_workers_than_cpus_is_said_once_and_than_images_not_started(tmp_path, monkeypatch):
    # torch warned twice, after the progress bar; 8 workers were started for 2 images.
    import warnings

    from blda_tools.inference import loader

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1})
    assert loader.cpu_warning(8, 6) == (
        "warning: --workers 8 (6 started, one per image): more decoding processes than the 2 "
        "CPUs here; they compete with the model for them"
    )
    assert loader.cpu_warning(2, 10) is None and loader.cpu_warning(8, 2) is None
    make_cityscapes(tmp_path / "data", count=3, size=(9, 11))
    data = build_dataset("cityscapes", tmp_path / "data", "val")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = loader.start_loader(data, [0, 1, 2], workers=8, batch_size=1)
        assert batches._num_workers == 3
        assert len(list(batches)) == 3
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]


def test_labels_sent_from_workers_as_uint8_only_when_they_fit():
    fits = SegmentationSample(
        torch.zeros(3, 2, 2, dtype=torch.uint8), torch.tensor([[0, 18], [255, 7]]), "a"
    )
    compact = compact_label(fits)
    assert compact.label.dtype == torch.uint8
    assert compact.label.tolist() == [[0, 18], [255, 7]]
    too_large = SegmentationSample(fits.image, torch.tensor([[0, 300], [255, 7]]), "b")
    assert compact_label(too_large).label.dtype == torch.int64
    assert compact_label(too_large).label.tolist() == [[0, 300], [255, 7]]


# ---------------------------------------------------------------- subsampling and sampling


def test_stride_keeps_every_sth_pixel_as_computed_by_hand(tmp_path, plugin):
    images = make_cityscapes(tmp_path / "data", count=2, size=(7, 9))
    dump(
        plugin,
        tmp_path / "data",
        tmp_path / "s.h5",
        inference=WHOLE,
        sampling=PixelSampling(stride=2),
        workers=0,
        dtype="float32",
    )
    with LogitStore(tmp_path / "s.h5") as store:
        assert store.num_rows == 2 * 4 * 5  # ceil(7 / 2) * ceil(9 / 2) per image
        for index, image_path in enumerate(sorted(images)):
            logits, labels = store.read_image(index)
            expected = plugin_logits(image_path)[:, ::2, ::2]
            np.testing.assert_allclose(logits.numpy(), expected, atol=1e-4)
            assert np.array_equal(labels.numpy(), train_ids_of(image_path)[::2, ::2])


def test_pixels_per_image_stratified_matches_hand_worked_counts(tmp_path, plugin):
    # 3 x 6 labels: road (id 7) 10 pixels, sidewalk (8) 3, building (11) 1, the rest
    # unlabelled (id 0). N = 9: 3 each; building gives 2 back, sidewalk then needs all of its
    # 3, road takes the remaining 5.
    ids = np.array([[7, 7, 7, 7, 7, 7], [7, 7, 7, 7, 8, 8], [8, 11, 0, 0, 0, 0]])
    images = make_cityscapes(tmp_path / "data", count=2, size=(3, 6), label_ids=ids)
    common = dict(inference=WHOLE, workers=0, dtype="float32")
    for name, sampling, expected_counts in [
        ("strat.h5", PixelSampling(pixels_per_image=9, stratified=True), [5, 3, 1]),
        ("random.h5", PixelSampling(pixels_per_image=9), None),
        ("all.h5", PixelSampling(pixels_per_image=100), [10, 3, 1]),
    ]:
        data = tmp_path / "data"
        dump(plugin, data, tmp_path / name, sampling=sampling, **common)
        with LogitStore(tmp_path / name) as store:
            for index, image_path in enumerate(sorted(images)):
                record = store.images[index]
                assert record.kind == "samples" and (record.height, record.width) == (3, 6)
                logits, labels, positions = rows_by_image(store)[record.name]
                positions = positions.numpy()
                assert np.array_equal(positions, np.unique(positions))
                truth = train_ids_of(image_path).ravel()
                assert np.array_equal(labels.numpy(), truth[positions])
                assert (labels != 255).all()
                expected_rows = plugin_logits(image_path).reshape(NUM_CLASSES, -1)[:, positions].T
                np.testing.assert_allclose(logits.numpy(), expected_rows, atol=1e-4)
                if expected_counts is not None:
                    assert np.bincount(labels.numpy(), minlength=3)[:3].tolist() == expected_counts
                else:
                    assert len(positions) == 9
    with LogitStore(tmp_path / "strat.h5") as first:
        # Both images have the same labels, but each image name seeds its own draw.
        drawn = [positions for _, _, positions in rows_by_image(first).values()]
        assert not torch.equal(drawn[0], drawn[1])
        again = tmp_path / "again.h5"
        dump(
            plugin,
            tmp_path / "data",
            again,
            sampling=PixelSampling(pixels_per_image=9, stratified=True),
            **common,
        )
        with LogitStore(again) as second:
            for name, (_, _, positions) in rows_by_image(first).items():
                assert torch.equal(rows_by_image(second)[name][2], positions)


def test_shards_read_together_equal_a_single_run(tmp_path, plugin):
    make_cityscapes(tmp_path / "data", count=5, size=(6, 8))
    common = dict(
        inference=WHOLE,
        workers=0,
        sampling=PixelSampling(pixels_per_image=20, stratified=True),
        dtype="float32",
    )
    data = tmp_path / "data"
    single = dump(plugin, data, tmp_path / "one.h5", **common)
    shards = [
        dump(plugin, data, tmp_path / "s.h5", rank=rank, world_size=2, **common).out
        for rank in (0, 1)
    ]
    assert shards == [tmp_path / "s.rank0-of-2.h5", tmp_path / "s.rank1-of-2.h5"]
    assert shard_path(tmp_path / "s.h5", 1, 2) == shards[1]
    with LogitStore(single.out) as one, LogitStore(shards) as both:
        assert [len(LogitStore(s).images) for s in shards] == [3, 2]  # images 0, 2, 4 and 1, 3
        expected, actual = rows_by_image(one), rows_by_image(both)
        assert expected.keys() == actual.keys()
        for name, (logits, labels, positions) in expected.items():
            assert torch.equal(actual[name][0], logits)
            assert torch.equal(actual[name][1], labels)
            assert torch.equal(actual[name][2], positions)
