"""`dump-logits` on bad input: missing folders and empty splits named, images without labels,
corrupt images skipped and counted (fatal with --strict), float16 overflow, wrong checkpoints and
plugins, and the CLI's option errors (helpers from test_dump.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_dump import (
    NUM_CLASSES,
    WHOLE,
    dump,
    install_plugin,
    make_cityscapes,
    plugin_logits,
)
from test_pixel_sampling import round_robin_quota

from blda_cli.dump_logits import dump_logits_command
from blda_cli.main import _register_commands, cli
from blda_tools.errors import BLDAError
from blda_tools.inference.dump import (
    CorruptImageWarning,
    PixelSampling,
    dump_logits,
    prepare_dump,
)
from blda_tools.models import create_model
from blda_tools.store import LogitStore


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    return install_plugin(tmp_path, monkeypatch)


# ---------------------------------------------------------------- bad input


def test_missing_folder_and_empty_split_are_named(tmp_path, plugin):
    with pytest.raises(BLDAError, match=str(tmp_path / "nowhere")):
        dump(plugin, tmp_path / "nowhere", tmp_path / "o.h5")
    (tmp_path / "empty" / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(BLDAError, match=r"no images <city>/\*_leftImg8bit.png under"):
        dump(plugin, tmp_path / "empty", tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()


def test_images_without_labels_give_a_store_without_labels(tmp_path, plugin):
    images = make_cityscapes(tmp_path / "data", count=3, split="test", labels=False)
    summary = dump(
        plugin,
        tmp_path / "data",
        tmp_path / "t.h5",
        split="test",
        inference=WHOLE,
        workers=0,
        max_images=2,
        sampling=PixelSampling(pixels_per_image=40, stratified=True),
        dtype="float32",  # argmax compared with numpy's: no float16 near-ties
    )
    assert not summary.has_labels and "no labels" in summary.notes[0]
    with LogitStore(tmp_path / "t.h5") as store:
        assert not store.has_labels and store.num_rows == 80 and len(store.images) == 2
        logits = torch.cat([chunk.logits for chunk in store.iter_chunks()])
        for index, image_path in enumerate(sorted(images)[:2]):
            # Without labels the strata are the predicted classes (argmax, worked with numpy).
            predicted = plugin_logits(image_path).reshape(NUM_CLASSES, -1).argmax(0)
            quota = round_robin_quota(np.bincount(predicted, minlength=NUM_CLASSES), 40)
            rows = logits[40 * index : 40 * (index + 1)]
            assert np.bincount(rows.argmax(1).numpy(), minlength=NUM_CLASSES).tolist() == quota


def test_corrupt_image_is_skipped_and_counted_or_fatal_with_strict(tmp_path, plugin):
    images = make_cityscapes(tmp_path / "data", count=3)
    broken = sorted(images)[1]
    broken.write_bytes(b"not a png")
    with pytest.warns(CorruptImageWarning, match=str(broken)):
        summary = dump(plugin, tmp_path / "data", tmp_path / "c.h5", inference=WHOLE, workers=1)
    assert summary.images_written == 2 and len(summary.corrupt) == 1
    assert str(broken) in summary.corrupt[0]
    with LogitStore(tmp_path / "c.h5") as store:
        assert len(store.images) == 2
    with pytest.raises(BLDAError, match=f"{broken}.*--strict") as stopped:
        dump(plugin, tmp_path / "data", tmp_path / "d.h5", inference=WHOLE, workers=1, strict=True)
    assert not (tmp_path / "d.h5").exists()
    # the image before it is kept, and the message says so (the next run needs --resume)
    assert f"1 of 3 images kept in {tmp_path / 'd.h5'}.partial" in str(stopped.value)
    assert "--resume" in str(stopped.value)


def test_all_corrupt_or_float16_overflow_fail_without_leaving_a_store(tmp_path, plugin):
    images = make_cityscapes(tmp_path / "data", count=2)
    for image in images:
        image.write_bytes(b"broken")
    with (
        pytest.warns(CorruptImageWarning),
        pytest.raises(
            BLDAError, match=r"no image could be read \(2 corrupt; the first: .*cannot read image"
        ),
    ):
        dump(plugin, tmp_path / "data", tmp_path / "new" / "folder" / "o.h5", workers=0)
    assert not (tmp_path / "new").exists()  # nothing left, not even the folders it made
    make_cityscapes(tmp_path / "good", count=2)
    huge = plugin.replace(":build", ":build_huge")
    arguments = (huge, tmp_path / "good", tmp_path / "h.h5")
    with pytest.raises(BLDAError, match='beyond the float16 range.*dtype="float32"'):
        dump(*arguments, inference=WHOLE, workers=0)
    # it failed at the first image: no unfinished store of no image is left to block the rerun
    assert not (tmp_path / "h.h5").exists() and not (tmp_path / "h.h5.partial").exists()
    summary = dump(*arguments, inference=WHOLE, workers=0, dtype="float32")
    assert summary.images_written == 2
    # a re-run that reads no image fails and keeps the store of the run before it
    with pytest.warns(CorruptImageWarning), pytest.raises(BLDAError, match="no image could be"):
        dump(huge, tmp_path / "data", tmp_path / "h.h5", workers=0, dtype="float32")
    with LogitStore(tmp_path / "h.h5") as store:
        assert len(store.images) == 2
    assert not (tmp_path / "h.h5.partial").exists()


def test_a_record_that_is_not_a_file_stops_the_dump_before_any_image(tmp_path, plugin):
    make_cityscapes(tmp_path / "data", count=1)
    (tmp_path / "out" / ".blda-outputs.json").mkdir(parents=True)
    with pytest.raises(BLDAError, match=r"\.blda-outputs\.json: .*not a regular file"):
        dump(plugin, tmp_path / "data", tmp_path / "out" / "o.h5", inference=WHOLE, workers=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".blda-outputs.json"]


def test_wrong_checkpoint_and_plugin_errors(tmp_path, plugin):
    make_cityscapes(tmp_path / "data", count=1)
    torch.save(create_model("tiny", 7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(BLDAError, match="seven.pth"):
        dump("tiny", tmp_path / "data", tmp_path / "o.h5", checkpoint=tmp_path / "seven.pth")
    torch.save(torch.nn.Conv2d(3, NUM_CLASSES, 1).state_dict(), tmp_path / "conv.pth")
    with pytest.raises(BLDAError, match="conv.pth"):
        dump("tiny", tmp_path / "data", tmp_path / "o.h5", checkpoint=tmp_path / "conv.pth")
    with pytest.raises(BLDAError, match="cannot import module 'no_such_module_blda'"):
        dump("no_such_module_blda:build", tmp_path / "data", tmp_path / "o.h5")
    with pytest.raises(BLDAError, match="--stride and --pixels-per-image"):
        PixelSampling(stride=2, pixels_per_image=10)


def test_cli_reports_bad_options_clearly(tmp_path, plugin):
    make_cityscapes(tmp_path / "data", count=1)
    runner = CliRunner()
    base = ["--model", plugin, "--dataset", "cityscapes", "--data-root", str(tmp_path / "data")]
    result = runner.invoke(
        dump_logits_command, [*base, "--out", str(tmp_path / "o.h5"), "--resize", "big"]
    )
    assert (
        result.exit_code == 2 and "expected HEIGHTxWIDTH like 1024x2048, or none" in result.output
    )
    result = runner.invoke(
        dump_logits_command, [*base, "--out", str(tmp_path / "o.h5"), "--device", "tpu"]
    )
    assert isinstance(result.exception, BLDAError) and "--device" in str(result.exception)
    job = prepare_dump(plugin, None, "cityscapes", tmp_path / "data", "val", tmp_path / "x.h5")
    # A plugin that declares no test protocol runs whole images at native size.
    assert job.inference.resize is None and job.inference.mode == "whole"
    out = tmp_path / "cli.h5"
    options = ["--resize", "24x32", "--crop", "16", "--window-stride", "8x8", "--flip", "--no-amp"]
    options += ["--mode", "slide"]
    result = runner.invoke(dump_logits_command, [*base, "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    with LogitStore(out) as store:
        assert store.metadata["inference"] == {
            "mode": "slide",
            "crop": [16, 16],
            "stride": [8, 8],
            "resize": [24, 32],
            "keep_ratio": False,
            "center_crop": None,
            "flip": True,
            "amp": False,
        }
        assert store.metadata["sampling"] == {
            "stride": 1,
            "pixels_per_image": None,
            "stratified": False,
            "seed": 0,
        }


def test_a_store_another_dump_is_writing_is_named_not_offered_for_deletion(tmp_path, plugin):
    import subprocess
    import sys

    make_cityscapes(tmp_path / "data", count=1)
    out = tmp_path / "o.h5"
    # another process holds `out`'s unfinished store open for writing, as a running dump does
    script = (
        "import sys, h5py\n"
        f"file = h5py.File({str(out) + '.partial'!r}, 'w'); print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        for resume in (False, True):
            with pytest.raises(BLDAError) as caught:
                dump(plugin, tmp_path / "data", out, inference=WHOLE, workers=0, resume=resume)
            assert str(caught.value) == (
                f"--out {out}: another dump-logits is writing {out}.partial now; wait for it to "
                "finish (then --resume, if it was stopped), or choose another --out"
            )
    finally:
        writer.kill()
        writer.wait()
    with pytest.raises(BLDAError, match="an unfinished dump; pass --resume"):  # once it is gone
        dump(plugin, tmp_path / "data", out, inference=WHOLE, workers=0)


def test_split_and_rank_errors_name_their_option(tmp_path, plugin):
    from test_datasets import make_gta5

    make_gta5(tmp_path / "gta", mismatch=False)
    with pytest.raises(BLDAError, match=r"^--split nosuch\.txt: gta5 takes 'all' or"):
        dump_logits(plugin, None, "gta5", tmp_path / "gta", "nosuch.txt", tmp_path / "g.h5")
    make_cityscapes(tmp_path / "data", count=2)
    with pytest.raises(BLDAError, match=r"^--split: expected a split name or a list file, got 3"):
        dump(plugin, tmp_path / "data", tmp_path / "o.h5", split=3)
    with pytest.raises(BLDAError, match=r"rank=2, world_size=2: expected integers 0 <= rank"):
        dump(plugin, tmp_path / "data", tmp_path / "o.h5", rank=2, world_size=2)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_warnings_are_one_line_each_from_workers_too_and_when_the_dump_fails(
    tmp_path, plugin, workers
):
    from test_datasets import make_gta5

    make_gta5(tmp_path / "gta")  # image 00003 is larger than its label: resized, with a warning
    base = ["--model", plugin, "--dataset", "gta5", "--data-root", str(tmp_path / "gta"),
            "--mode", "whole", "--resize", "none", "--workers", workers]  # fmt: skip
    result = CliRunner().invoke(dump_logits_command, [*base, "--out", str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "00003.png is 10x7 but label" in warned[0], result.output
    # a failed dump still shows what it warned about: every image corrupt
    for image in (tmp_path / "gta" / "images").iterdir():
        image.write_bytes(b"broken")
    result = CliRunner().invoke(dump_logits_command, [*base, "--out", str(tmp_path / "b.h5")])
    assert result.exit_code != 0
    warned = [line for line in result.output.splitlines() if line.startswith("warning: skipped")]
    assert len(warned) == 4, result.output


@pytest.mark.parametrize(
    ("out", "expected"),
    [(".", "names a folder"), ("./", "names a folder"), ("/", "names a folder"),
     ("new/", "names a folder"), ("sub/..", "names a folder"),
     ("o.h5.partial", "a name blda keeps for itself"),
     (".blda-outputs.json", "a name blda keeps for itself")],
)  # fmt: skip
def test_an_out_that_names_no_store_file_is_refused_in_one_line(tmp_path, plugin, out, expected):
    # "." and "/" raised a ValueError from pathlib; "new/" wrote a store named "new"; a store
    # named *.partial was written and then refused by every reader as unfinished.
    make_cityscapes(tmp_path / "data", count=1)
    arguments = ["dump-logits", "--model", plugin, "--dataset", "cityscapes", "--data-root",
                 tmp_path / "data",
                 "--mode", "whole", "--workers", "0", "--out", out]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        _register_commands()
        result = CliRunner().invoke(cli, [str(a) for a in arguments])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "plugins"]


@pytest.mark.parametrize(
    "option", ["--stride", "--pixels-per-image", "--batch-size", "--max-images"]
)
def test_counts_beyond_what_c_takes_are_refused_in_one_line(tmp_path, plugin, option):
    # --stride 2**63 raised OverflowError when the store was committed; --batch-size 10**20 a
    # ValueError from islice
    make_cityscapes(tmp_path / "data", count=1)
    arguments = ["dump-logits", "--model", plugin, "--dataset", "cityscapes", "--data-root",
                 tmp_path / "data", "--workers", "0", option, 2**63, "--out", tmp_path / "o.h5"]  # fmt: skip
    _register_commands()
    result = CliRunner().invoke(cli, [str(a) for a in arguments])
    assert result.exit_code == 2, result.output
    assert f"{option}: expected an integer from 1 to 2147483647" in result.output
    assert not (tmp_path / "o.h5").exists()


def test_an_image_name_too_long_for_the_store_is_refused_before_any_image(tmp_path, plugin):
    # Found when that image came up: the dump stopped part-way, and every --resume again.
    from test_dump import random_image, write_rgb

    deep = tmp_path / "data" / "images" / ("a" * 200) / ("b" * 200) / ("c" * 200)
    for folder in (tmp_path / "data" / "images", deep):
        write_rgb(folder / "x.png", random_image(8, 8, seed=0))
    with pytest.raises(BLDAError, match="its name .* is longer than 512 bytes"):
        dump_logits(plugin, None, "folder", tmp_path / "data", None, tmp_path / "o.h5",
                    inference=WHOLE, workers=0)  # fmt: skip
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()
