"""SynthCity: determinism, the official layouts, label ids, class coverage and the domain drift.

Truths: file bytes (sha256) across two runs; cityscapesscripts' label table, used here to decode
label PNGs independently of the generator; the real GTA5 and Cityscapes loaders; pixel counts and
mean colours measured on rendered images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label, labels
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from blda_cli.synthcity import synthcity
from blda_tools.datasets import build_dataset
from blda_tools.datasets.synthcity.generate import (
    CLASS_NAMES,
    SOURCE,
    TARGET,
    TARGET_DRIFT,
    LayoutParams,
    draw_layout,
    generate_scene,
    image_generator,
    make_synthcity,
    render_scene,
    split_counts,
)
from blda_tools.errors import BLDAError
from blda_tools.outputs import MANIFEST

SMALL = (64, 128)
# Classes the target's camera changes but that do not drift (paper Fig. 1: road, sky, car
# are barely hurt by the GTA5 -> Cityscapes shift).
STABLE = ("road", "sky", "car", "building", "vegetation", "person")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST  # blda's record of the files it wrote
    }


def _decode_train_ids(path: Path) -> np.ndarray:
    """Label PNG (Cityscapes label ids) -> train ids, with cityscapesscripts' table only."""
    ids = np.asarray(Image.open(path))
    lookup = np.full(256, -1, dtype=np.int64)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256:
            lookup[label_id] = label.trainId
    return lookup[ids]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthcity") / "set"
    make_synthcity(root, images=3, size=SMALL, seed=11, val_fraction=0.34)
    return root


def test_writes_the_official_layouts_and_counts(small_set):
    names = sorted(_hashes(small_set))
    frames = [f"synthcity_000000_00000{i}" for i in (1, 2)]
    expected = (
        [f"source/images/0000{i}.png" for i in (1, 2, 3)]
        + [f"source/labels/0000{i}.png" for i in (1, 2, 3)]
        + ["synthcity.json"]
        + [f"target/gtFine/train/synthcity/{f}_gtFine_labelIds.png" for f in frames]
        + ["target/gtFine/val/synthcity/synthcity_000001_000001_gtFine_labelIds.png"]
        + [f"target/leftImg8bit/train/synthcity/{f}_leftImg8bit.png" for f in frames]
        + ["target/leftImg8bit/val/synthcity/synthcity_000001_000001_leftImg8bit.png"]
    )
    assert names == sorted(expected)
    image = Image.open(small_set / "source/images/00001.png")
    assert (image.mode, image.size) == ("RGB", (SMALL[1], SMALL[0]))
    assert Image.open(small_set / "source/labels/00001.png").mode == "L"


def test_same_seed_gives_byte_identical_files(small_set, tmp_path):
    make_synthcity(tmp_path / "again", images=3, size=SMALL, seed=11, val_fraction=0.34)
    assert _hashes(tmp_path / "again") == _hashes(small_set)


def test_two_workers_write_the_same_bytes(small_set, tmp_path):
    make_synthcity(tmp_path / "pool", images=3, size=SMALL, seed=11, val_fraction=0.34, workers=2)
    assert _hashes(tmp_path / "pool") == _hashes(small_set)


def test_different_seed_gives_different_label_maps(small_set, tmp_path):
    make_synthcity(tmp_path / "other", images=3, size=SMALL, seed=12, val_fraction=0.34)
    for path in sorted(small_set.rglob("*labelIds.png")) + sorted(
        small_set.glob("source/labels/*")
    ):
        other = tmp_path / "other" / path.relative_to(small_set)
        assert not np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))


def test_label_pngs_hold_cityscapes_label_ids_of_the_intended_classes(small_set):
    evaluated = {label.id for label in labels if 0 <= label.trainId < 19}
    for split, label_dir in (("source", "source/labels"), ("target/val", "target/gtFine/val")):
        paths = sorted((small_set / label_dir).rglob("*.png"))
        for index, path in enumerate(paths):
            ids = set(np.unique(np.asarray(Image.open(path))).tolist())
            assert ids <= evaluated | {0}, f"{path}: unexpected label ids {ids - evaluated}"
            _, intended = generate_scene(
                SOURCE if split == "source" else TARGET, SMALL, image_generator(11, split, index)
            )
            decoded = _decode_train_ids(path)
            np.testing.assert_array_equal(decoded, intended.astype(np.int64))


def test_target_has_an_ignored_ego_vehicle_strip_and_source_has_none(small_set):
    target = np.asarray(Image.open(next((small_set / "target/gtFine/train").rglob("*.png"))))
    source = np.asarray(Image.open(small_set / "source/labels/00001.png"))
    assert (target[-1] == 0).all(), "bottom row of a target label map should be void (id 0)"
    assert (target[: SMALL[0] // 2] != 0).all()
    assert (source != 0).all()


def test_the_real_loaders_read_both_domains(small_set):
    gta5 = build_dataset("gta5", small_set / "source")
    cityscapes = build_dataset("cityscapes", small_set / "target", "val")
    assert (len(gta5), len(cityscapes)) == (3, 1)
    _, intended = generate_scene(TARGET, SMALL, image_generator(11, "target/val", 0))
    sample = cityscapes[0]
    assert tuple(sample.image.shape) == (3, *SMALL)
    np.testing.assert_array_equal(sample.label.numpy(), intended.astype(np.int64))
    _, intended = generate_scene(SOURCE, SMALL, image_generator(11, "source", 2))
    np.testing.assert_array_equal(gta5[2].label.numpy(), intended.astype(np.int64))


@pytest.mark.parametrize("domain, split", [(SOURCE, "source"), (TARGET, "target/train")])
def test_every_class_appears_and_frequencies_are_long_tailed(domain, split):
    pixels = np.zeros(256, dtype=np.int64)
    for index in range(40):
        layout = draw_layout(image_generator(0, split, index), (128, 256), domain.layout)
        pixels += np.bincount(layout.labels.ravel(), minlength=256)
    per_class = pixels[: len(CLASS_NAMES)]
    missing = [CLASS_NAMES[c] for c in np.flatnonzero(per_class == 0)]
    assert not missing, f"classes never drawn in 40 {split} scenes: {missing}"
    assert per_class.max() > 20 * per_class.min()
    common = {CLASS_NAMES[c] for c in np.argsort(per_class)[-4:]}
    assert common <= {"road", "building", "sky", "vegetation", "sidewalk"}
    rare = {CLASS_NAMES[c] for c in np.argsort(per_class)[:6]}
    assert {"train", "motorcycle", "rider"} & rare


def test_domains_have_different_class_frequencies():
    def shares(domain, split):
        pixels = np.zeros(256, dtype=np.int64)
        for index in range(150):
            layout = draw_layout(image_generator(1, split, index), SMALL, domain.layout)
            pixels += np.bincount(layout.labels.ravel(), minlength=256)
        return pixels[:19] / pixels[:19].sum()

    source, target = shares(SOURCE, "source"), shares(TARGET, "target/train")
    person, truck, trees = (CLASS_NAMES.index(name) for name in ("person", "truck", "vegetation"))
    assert target[person] > 1.5 * source[person]  # the camera domain has more pedestrians,
    assert target[trees] > 1.1 * source[trees]  # more trees
    assert target[truck] < source[truck]  # and fewer trucks


def _mean_colours(images: list[np.ndarray], label_maps: list[np.ndarray]) -> np.ndarray:
    """Mean RGB of each class over the interiors of its regions (edges are blurred)."""
    sums, counts = np.zeros((19, 3)), np.zeros(19)
    for image, label_map in zip(images, label_maps, strict=True):
        for c in range(19):
            interior = ndimage.binary_erosion(label_map == c)
            sums[c] += image[interior].astype(np.float64).sum(axis=0)
            counts[c] += interior.sum()
    return sums / np.maximum(counts, 1)[:, None]


def test_drifting_classes_change_more_than_stable_ones():
    source_images, target_images, label_maps = [], [], []
    for index in range(12):
        layout = draw_layout(image_generator(5, "target/train", index), (128, 256), TARGET.layout)
        # The same appearance seed for both renderings: only the domain differs.
        source_images.append(render_scene(layout, SOURCE, np.random.default_rng(index)))
        target_images.append(render_scene(layout, TARGET, np.random.default_rng(index)))
        label_maps.append(layout.labels)
    source = _mean_colours(source_images, label_maps)
    target = _mean_colours(target_images, label_maps)
    change = np.linalg.norm(target - source, axis=1)
    drifting = sorted(TARGET_DRIFT)
    stable = [CLASS_NAMES.index(name) for name in STABLE]
    report = {CLASS_NAMES[c]: round(float(change[c]), 1) for c in range(19)}
    assert change[drifting].min() > change[stable].max(), report
    assert change[drifting].mean() > 2 * change[stable].mean(), report
    # ... and each drifting class moves towards the class it drifts to.
    for c, (towards, _) in TARGET_DRIFT.items():
        before = np.linalg.norm(source[c] - source[towards])
        after = np.linalg.norm(target[c] - source[towards])
        assert after < before, (CLASS_NAMES[c], before, after)


def test_split_counts_maps_images_to_three_splits():
    assert split_counts(10, 0.25) == {"source": 10, "target/train": 8, "target/val": 2}
    assert split_counts(2, 0.1) == {"source": 2, "target/train": 1, "target/val": 1}
    assert split_counts(1, 0.25) == {"source": 1, "target/train": 1, "target/val": 0}
    assert split_counts(4, 0.0) == {"source": 4, "target/train": 4, "target/val": 0}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"images": 0}, "--images"),
        ({"images": 10**20}, "--images: expected an integer from 1 to 2147483647"),
        ({"size": (16, 64)}, "--size"),
        ({"seed": -1}, "--seed"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"workers": 0}, "--workers"),
    ],
)
def test_bad_options_raise_blda_error(tmp_path, options, message):
    arguments = {"images": 1, "size": SMALL} | options
    with pytest.raises(BLDAError, match=message):
        make_synthcity(tmp_path / "out", **arguments)


def test_replaces_its_own_set_and_never_touches_foreign_files(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    make_synthcity(tmp_path / "foreign", images=1, size=SMALL)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"
    clash = tmp_path / "clash" / "source" / "images" / "00001.png"
    clash.parent.mkdir(parents=True)
    clash.write_bytes(b"my image")
    with pytest.raises(BLDAError, match="00001.png: exists and was not written by"):
        make_synthcity(tmp_path / "clash", images=1, size=SMALL)
    assert clash.read_bytes() == b"my image"
    make_synthcity(tmp_path / "set", images=3, size=SMALL)
    make_synthcity(tmp_path / "set", images=2, size=SMALL)  # the earlier, larger set goes
    assert sorted(p.name for p in (tmp_path / "set/source/images").iterdir()) == [
        "00001.png",
        "00002.png",
    ]
    # A set generated before blda recorded its outputs is known by its synthcity.json.
    (tmp_path / "set" / ".blda-outputs.json").unlink()
    # Only the files its counts name are the set's: PNGs put beside them stay (`cp -r A/* B`
    # copies no record, and the user's own images were removed too).
    for mine in ("source/images/my_extra.png", "target/leftImg8bit/train/synthcity/mine.png"):
        (tmp_path / "set" / mine).write_bytes(b"mine")
    make_synthcity(tmp_path / "set", images=1, size=SMALL)
    assert sorted(p.name for p in (tmp_path / "set/source/images").iterdir()) == [
        "00001.png",
        "my_extra.png",
    ]
    assert (tmp_path / "set/target/leftImg8bit/train/synthcity/mine.png").read_bytes() == b"mine"


def test_cli_make_writes_the_layout_and_a_summary(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        synthcity, ["make", "--out", str(out), "--images", "2", "--size", "64x128", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "source/images/00002.png").is_file()
    assert (out / "target/leftImg8bit/val/synthcity").is_dir()
    assert (out / "synthcity.json").is_file()
    assert "target/val" in result.output


def test_cli_size_error_is_clear(tmp_path):
    result = CliRunner().invoke(synthcity, ["make", "--out", str(tmp_path), "--size", "64by128"])
    assert isinstance(result.exception, BLDAError)
    assert str(result.exception) == "--size: expected HxW like 256x512, got '64by128'"


@settings(max_examples=40, deadline=None)
@given(images=st.integers(1, 500), val_fraction=st.floats(0.0, 0.99))
def test_split_counts_properties(images, val_fraction):
    counts = split_counts(images, val_fraction)
    assert counts["source"] == images
    assert counts["target/train"] + counts["target/val"] == images
    assert abs(counts["target/val"] - images * val_fraction) <= 1
    if images >= 2 and val_fraction > 0:
        assert counts["target/train"] >= 1 and counts["target/val"] >= 1


def test_road_follows_the_pinhole_perspective():
    """On a flat road of width w seen from height h, a row d pixels below the horizon shows
    w / h * d road pixels (pinhole camera: x = f X / Z, y - horizon = f h / Z)."""
    empty_street = LayoutParams(
        cars=0, trucks=0, buses=0, train_probability=0, persons=0, cyclists=0, motorcyclists=0,
        parked_bicycles=0, poles=0, trees=0, wall_probability=0, fence_probability=0, planters=0,
    )  # fmt: skip
    for index in range(5):
        layout = draw_layout(image_generator(9, "source", index), (128, 256), empty_street)
        road = layout.labels == CLASS_NAMES.index("road")
        rows = np.arange(layout.horizon + 1, 128)
        counts = road[rows].sum(axis=1)
        inside = ~road[rows][:, 0] & ~road[rows][:, -1]  # rows where the road is not cut off
        below = rows[inside] + 0.5 - layout.horizon
        slope = np.median(counts[inside] / below)
        assert slope > 0
        np.testing.assert_allclose(counts[inside], slope * below, atol=2.0)


def test_cli_summary_of_an_empty_split_names_no_class(tmp_path):
    arguments = ["make", "--out", str(tmp_path / "set"), "--images", "2", "--size", "32x64"]
    result = CliRunner().invoke(synthcity, [*arguments, "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "target/val" in line)
    # no pixels: neither a commonest nor a rarest class (not "0.00%" of nothing)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][1:] == [
        "0",
        "Cityscapes",
        "-",
        "-",
    ]


def test_cli_summary_names_the_rarest_class_present_and_counts_the_absent(tmp_path):
    """Truth: the source label PNGs (Cityscapes label ids, GTA5 layout) counted here with the
    official id -> train id table."""
    out = tmp_path / "set"
    arguments = ["make", "--out", str(out), "--images", "2", "--size", "32x32"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(synthcity, arguments)
    assert result.exit_code == 0, result.output
    pixels = [0] * len(CLASS_NAMES)
    for path in sorted((out / "source" / "labels").glob("*.png")):
        ids, counts = np.unique(np.asarray(Image.open(path)), return_counts=True)
        for label_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
            train_id = id2label[label_id].trainId
            if 0 <= train_id < len(CLASS_NAMES):
                pixels[train_id] += count
    present = [c for c, value in enumerate(pixels) if value]
    assert len(present) < len(pixels)  # a tiny set lacks classes: the case under test
    rarest = min(present, key=lambda c: pixels[c])
    row = next(line for line in result.output.splitlines() if "source" in line)
    absent = len(pixels) - len(present)
    assert f"{CLASS_NAMES[rarest]} (" in row and f"{absent} classes absent" in row
