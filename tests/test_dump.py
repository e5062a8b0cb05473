"""`dump-logits` end to end on tiny Cityscapes-layout fixtures: stored logits and metrics against
a direct numpy evaluation (cityscapesscripts' label table), a process killed midway then
resumed against an uninterrupted run, subsampling and stratified sampling against hand-worked
expectations, and sharding (bad input: test_dump_errors.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cityscapesscripts.helpers.labels import id2label
from click.testing import CliRunner
from fixtures_datasets import random_image, write_gray, write_rgb
from PIL import Image

from blda_cli.dump_logits import dump_logits_command
from blda_tools.datasets import SegmentationSample
from blda_tools.diagnose import diagnose
from blda_tools.errors import BLDAError
from blda_tools.inference.dump import (
    CorruptImageWarning,
    PixelSampling,
    dump_logits,
    prepare_dump,
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


# ---------------------------------------------------------------- interruption and resume


def test_killed_dump_resumed_equals_uninterrupted_run(tmp_path, plugin):
    make_cityscapes(tmp_path / "data", count=6, size=(9, 11))
    arguments = [
        *("--model", plugin, "--dataset", "cityscapes", "--data-root", str(tmp_path / "data")),
        *("--mode", "whole", "--resize", "none", "--stride", "2", "--workers", "1"),
    ]
    killed = tmp_path / "killed.h5"
    # A short commit interval: the idle commit of the first three images comes ~0.05 s into the
    # plugin's 3 s wait before the kill, leaving a wide margin on a busy machine.
    script = (
        "import blda_tools.inference.dump; blda_tools.inference.dump.COMMIT_SECONDS = 0.05\n"
        "from blda_cli.dump_logits import dump_logits_command; dump_logits_command()"
    )
    # One stream, so that the 4th forward pass is the 4th image; the resumed and the whole run
    # use the default streams (two on a CPU with two threads).
    process = subprocess.run(
        [sys.executable, "-c", script, *arguments, "--streams", "1", "--out", str(killed)],
        env={**os.environ, "BLDA_TEST_KILL_AT": "4"},  # killed computing the 4th image
        capture_output=True,
        timeout=120,
    )
    assert process.returncode == -9, process.stderr.decode()[-2000:]
    assert not killed.exists()
    with h5py.File(tmp_path / "killed.h5.partial", "r") as file:
        assert file.attrs["committed_images"] == 3

    runner = CliRunner()
    resumed = runner.invoke(dump_logits_command, [*arguments, "--out", str(killed), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "3 of 6 images already stored, 3 to go" in resumed.output
    # Totals of the whole store: 6 images of 9 x 11 at stride 2 (5 x 6 = 30 rows each).
    assert "6 image(s), 180 rows (3 image(s), 90 rows this run)" in resumed.output
    # --resume with nothing to resume dumps every image, and says so
    whole_run = runner.invoke(
        dump_logits_command, [*arguments, "--out", str(tmp_path / "a.h5"), "--resume"]
    )
    assert whole_run.exit_code == 0, whole_run.output
    said = f"--resume: {tmp_path / 'a.h5'}.partial does not exist (nothing to resume)"
    assert said in whole_run.output

    resumed_arrays, resumed_attributes = read_all(killed)
    whole_arrays, whole_attributes = read_all(tmp_path / "a.h5")
    assert resumed_arrays.keys() == whole_arrays.keys() >= {"logits", "labels", "images/name"}
    for name, values in whole_arrays.items():
        assert np.array_equal(resumed_arrays[name], values), name
    assert resumed_attributes == whole_attributes


def test_resume_refuses_other_settings_and_existing_outputs(tmp_path, plugin):
    make_cityscapes(tmp_path / "data", count=2)
    options = dict(inference=WHOLE, workers=0)
    dump(plugin, tmp_path / "data", tmp_path / "o.h5", **options)
    # A store this command wrote is replaced by a new run; a file it did not write is refused.
    dump(plugin, tmp_path / "data", tmp_path / "o.h5", **options)
    foreign = tmp_path / "mine.h5"
    foreign.write_text("not a store")
    with pytest.raises(BLDAError, match="mine.h5: exists and was not written by `blda dump-logits"):
        dump(plugin, tmp_path / "data", foreign, **options)
    assert foreign.read_text() == "not a store"
    with pytest.raises(BLDAError, match="already complete"):
        dump(plugin, tmp_path / "data", tmp_path / "o.h5", resume=True)
    (tmp_path / "o.h5").rename(tmp_path / "p.h5.partial")
    with h5py.File(tmp_path / "p.h5.partial", "r+") as file:
        file.attrs["complete"] = False
    with pytest.raises(BLDAError, match=r"written with sampling=.*this run has"):
        dump(
            plugin,
            tmp_path / "data",
            tmp_path / "p.h5",
            resume=True,
            sampling=PixelSampling(stride=2),
            **options,
        )


def _unfinished(store: Path) -> Path:
    """`store`, complete, turned back into the unfinished store of its dump."""
    partial = store.with_name(store.name + ".partial")
    store.rename(partial)
    with h5py.File(partial, "r+") as file:
        file.attrs["complete"] = False
    return partial


def test_resume_refuses_other_data_images_and_layouts(tmp_path, plugin, monkeypatch):
    make_cityscapes(tmp_path / "data", count=3)
    shutil.copytree(tmp_path / "data", tmp_path / "copy")  # the same names, another dataset
    options = dict(inference=WHOLE, workers=0)
    refusals = [
        ({"data_root": tmp_path / "copy"}, r"written with data_root='.*data', this run has"),
        ({"max_images": 2}, r"holds 1 image\(s\) this run would not dump \(first: "),
        ({"compression": "gzip"}, r"holds compression=None, this run has compression='gzip'"),
        ({"dtype": "float32"}, r"holds dtype='float16', this run has dtype='float32'"),
    ]
    for changed, message in refusals:
        dump(plugin, tmp_path / "data", tmp_path / "o.h5", **options)
        _unfinished(tmp_path / "o.h5")
        arguments = {"data_root": tmp_path / "data", **options, **changed}
        with pytest.raises(BLDAError, match=message):
            dump(plugin, out=tmp_path / "o.h5", resume=True, **arguments)
        Path(f"{tmp_path / 'o.h5'}.partial").unlink()
    # The same data folder named another way (relative, through a link) is the same dump.
    dump(plugin, tmp_path / "data", tmp_path / "o.h5", **options)
    _unfinished(tmp_path / "o.h5")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    summary = dump(plugin, Path("link"), tmp_path / "o.h5", resume=True, **options)
    assert (summary.images_written, summary.images_in_store) == (0, 3)


def test_a_dump_started_beside_another_into_the_same_out_leaves_its_store_alone(tmp_path, plugin):
    make_cityscapes(tmp_path / "data", count=2)
    out = tmp_path / "o.h5"
    job = prepare_dump(plugin, None, "cityscapes", tmp_path / "data", "val", out,
                       inference=WHOLE, workers=0)  # fmt: skip
    # after this run's checks, another run creates the unfinished store and writes into it
    dump(plugin, tmp_path / "data", tmp_path / "other.h5", inference=WHOLE, workers=0)
    other = _unfinished(tmp_path / "other.h5").rename(f"{out}.partial")
    written = other.read_bytes()
    with pytest.raises(BLDAError, match=r"o.h5.partial: an unfinished store is already there"):
        job.run()
    assert other.read_bytes() == written and not out.exists()


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


def test_resume_refuses_a_checkpoint_rewritten_at_the_same_path(tmp_path):
    """training rewrites latest.pth in place: resuming a dump of it must not mix two models;
    the same bytes copied anew (another mtime) are the same checkpoint."""
    from blda_tools.demo import CHECKPOINT, DEFAULT_SAMPLE_DIR

    checkpoint = tmp_path / "latest.pth"
    shutil.copy(DEFAULT_SAMPLE_DIR / CHECKPOINT, checkpoint)
    data = DEFAULT_SAMPLE_DIR / "synthcity" / "target"
    options = dict(max_images=2, inference=InferenceSettings(), workers=0)
    out = tmp_path / "o.h5"
    dump_logits("tiny", checkpoint, "cityscapes", data, "val", out, **options)
    _unfinished(out)
    state = torch.load(checkpoint, weights_only=True)
    weights = state["state_dict"] if "state_dict" in state else state
    first = next(key for key, value in weights.items() if value.is_floating_point())
    weights[first] = weights[first] + 1.0
    torch.save(state, tmp_path / "next.pth")
    original = checkpoint.read_bytes()
    os.replace(tmp_path / "next.pth", checkpoint)
    with pytest.raises(BLDAError, match=r"--resume: .*o.h5.* another version of .*latest.pth"):
        dump_logits("tiny", checkpoint, "cityscapes", data, "val", out, resume=True, **options)
    checkpoint.write_bytes(original)  # the dumped weights again, a new file time
    summary = dump_logits(
        "tiny", checkpoint, "cityscapes", data, "val", out, resume=True, **options
    )
    assert summary.images_in_store == 2
