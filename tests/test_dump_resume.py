"""dump-logits interrupted and resumed: a killed dump resumed equals an uninterrupted run, and
--resume refuses another dump's settings, data, images, layout or a rewritten checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_dump import WHOLE, dump, install_plugin, make_cityscapes, read_all

from blda_cli.dump_logits import dump_logits_command
from blda_tools.errors import BLDAError
from blda_tools.inference.dump import PixelSampling, dump_logits, prepare_dump
from blda_tools.inference.predict import InferenceSettings


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    return install_plugin(tmp_path, monkeypatch)


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


def test_random_weights_are_the_same_in_every_run_and_resume_continues_them(tmp_path):
    # Unseeded, two runs differed by up to 0.19 and --resume mixed two models (helper's probe).
    make_cityscapes(tmp_path / "data", count=4, size=(16, 32))
    options = dict(random_weights=True, inference=WHOLE, workers=0, device="cpu")
    torch.manual_seed(1)
    dump("tiny", tmp_path / "data", tmp_path / "one.h5", **options)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    dump("tiny", tmp_path / "data", tmp_path / "two.h5", **options)
    first, second = read_all(tmp_path / "one.h5")[0], read_all(tmp_path / "two.h5")[0]
    assert first.keys() == second.keys() and "logits" in first
    for name, values in first.items():
        np.testing.assert_array_equal(values, second[name], err_msg=name)
    torch.manual_seed(1)
    dump("tiny", tmp_path / "data", tmp_path / "three.h5", **options)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched

    def stop_after_two(count, seen=[0]):  # noqa: B006 - a counter across calls
        seen[0] += count
        if seen[0] >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dump("tiny", tmp_path / "data", tmp_path / "resumed.h5", progress=stop_after_two, **options)
    dump("tiny", tmp_path / "data", tmp_path / "resumed.h5", resume=True, **options)
    resumed = read_all(tmp_path / "resumed.h5")[0]
    np.testing.assert_array_equal(resumed["logits"], first["logits"])
