"""Datasets in their official layouts, checked pixel by pixel against hand-worked train ids,
cityscapesscripts' label table, Pillow, and an independent PNG encoder."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label, name2label
from fixtures_datasets import (
    random_image,
    write_gray,
    write_palette,
    write_rgb,
)
from PIL import Image

from blda_tools.datasets import (
    CITYSCAPES_CLASSES,
    CorruptSampleError,
    SizeMismatchWarning,
    build_dataset,
    default_palette,
    label_to_color,
    list_datasets,
    write_color_png,
    write_label_png,
)
from blda_tools.errors import BLDAError
from blda_tools.inference.dump_checks import open_dataset

H, W = 6, 8
# Cityscapes label ids (also GTA5's) and their train ids, worked out by hand from the
# Cityscapes label definitions: ignored ids (0-6, 9, 10, 14-16, 18, 29, 30), ids not in the
# table (34, 35, 100) and 255 all become 255.
CITYSCAPES_IDS = np.array(
    [
        [7, 7, 8, 8, 11, 12, 13, 17],
        [19, 20, 21, 22, 23, 24, 25, 26],
        [27, 28, 31, 32, 33, 0, 1, 2],
        [3, 4, 5, 6, 9, 10, 14, 15],
        [16, 18, 29, 30, 34, 35, 100, 255],
        [7, 26, 24, 0, 255, 33, 21, 23],
    ]
)
CITYSCAPES_TRAIN_IDS = np.array(
    [
        [0, 0, 1, 1, 2, 3, 4, 5],
        [6, 7, 8, 9, 10, 11, 12, 13],
        [14, 15, 16, 17, 18, 255, 255, 255],
        [255] * 8,
        [255] * 8,
        [0, 13, 11, 255, 255, 18, 8, 10],
    ]
)


def make_cityscapes(root, split="val", label_types=("labelIds",), cities=("aachen", "bochum")):
    images = {}
    for index, city in enumerate(cities):
        stem = f"{city}_000000_0000{index}9"
        images[city] = write_rgb(
            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            random_image(H, W, seed=index),
        )
        base = root / "gtFine" / split / city / stem
        if "labelIds" in label_types:
            write_gray(base.with_name(f"{stem}_gtFine_labelIds.png"), CITYSCAPES_IDS)
        if "labelTrainIds" in label_types:
            # Deliberately not the mapping of CITYSCAPES_IDS, to see which file was read.
            train_ids = np.full((H, W), 5)
            train_ids[0, :4] = [18, 19, 200, 255]
            write_gray(base.with_name(f"{stem}_gtFine_labelTrainIds.png"), train_ids)
    return images


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_map_to_hand_worked_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    dataset = build_dataset("cityscapes", tmp_path, "val")
    assert len(dataset) == 2 and dataset.has_labels and dataset.label_type == "labelIds"
    for index in range(2):
        sample = dataset[index]
        assert sample.label.dtype == torch.int64 and sample.label.shape == (H, W)
        np.testing.assert_array_equal(sample.label.numpy(), CITYSCAPES_TRAIN_IDS)
        np.testing.assert_array_equal(
            sample.image.permute(1, 2, 0).numpy(), random_image(H, W, seed=index)
        )
        assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, H, W)
    assert dataset.names == (
        "leftImg8bit/val/aachen/aachen_000000_000009_leftImg8bit",
        "leftImg8bit/val/bochum/bochum_000000_000019_leftImg8bit",
    )
    assert dataset[1].name == dataset.names[1]


def test_every_label_id_maps_as_cityscapesscripts_table_says(tmp_path):
    every_id = np.arange(256).reshape(16, 16)
    write_rgb(tmp_path / "leftImg8bit/val/c/c_0_0_leftImg8bit.png", random_image(16, 16, 0))
    write_gray(tmp_path / "gtFine/val/c/c_0_0_gtFine_labelIds.png", every_id)
    label = build_dataset("cityscapes", tmp_path)[0].label.numpy().ravel()
    for label_id in range(256):
        entry = id2label.get(label_id)
        expected = entry.trainId if entry is not None and 0 <= entry.trainId < 255 else 255
        assert label[label_id] == expected, label_id
    assert label[name2label["car"].id] == name2label["car"].trainId == 13
    assert label[name2label["license plate"].trainId % 256] == 255


def test_cityscapes_classes_and_palette_come_from_the_official_table(tmp_path):
    make_cityscapes(tmp_path)
    dataset = build_dataset("cityscapes", tmp_path)
    assert dataset.num_classes == 19 and dataset.ignore_index == 255
    for name in ("road", "traffic light", "car", "bicycle"):
        train_id = name2label[name].trainId
        assert dataset.class_names[train_id] == name
        assert dataset.palette[train_id] == name2label[name].color


def test_cityscapes_label_type_choice(tmp_path):
    make_cityscapes(tmp_path, label_types=("labelIds", "labelTrainIds"))
    auto = build_dataset("cityscapes", tmp_path, "val")
    assert auto.label_type == "labelIds"  # the official files win when both exist
    np.testing.assert_array_equal(auto[0].label.numpy(), CITYSCAPES_TRAIN_IDS)
    train = build_dataset("cityscapes", tmp_path, "val", label_type="labelTrainIds")
    expected = np.full((H, W), 5)
    expected[0, :4] = [18, 255, 255, 255]  # 19 and 200 are not train ids
    np.testing.assert_array_equal(train[0].label.numpy(), expected)

    only_train = tmp_path / "only"
    make_cityscapes(only_train, label_types=("labelTrainIds",))
    assert build_dataset("cityscapes", only_train).label_type == "labelTrainIds"
    with pytest.raises(BLDAError, match="_gtFine_labelIds.png"):
        build_dataset("cityscapes", only_train, label_type="labelIds")
    with pytest.raises(BLDAError, match="label_type 'ids'"):
        build_dataset("cityscapes", only_train, label_type="ids")


def test_cityscapes_without_labels(tmp_path):
    make_cityscapes(tmp_path, split="test", label_types=())
    dataset = build_dataset("cityscapes", tmp_path, "test")
    assert not dataset.has_labels and dataset[0].label is None


def test_cityscapes_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(BLDAError, match=str(tmp_path / "nowhere")):
        build_dataset("cityscapes", tmp_path / "nowhere")
    with pytest.raises(BLDAError, match="leftImg8bit"):
        build_dataset("cityscapes", tmp_path)
    make_cityscapes(tmp_path, split="train")
    with pytest.raises(BLDAError, match=r"leftImg8bit/val.*available splits: train"):
        build_dataset("cityscapes", tmp_path, "val")
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(BLDAError, match="no images"):
        build_dataset("cityscapes", tmp_path, "val")


def test_cityscapes_labels_without_images_and_partial_labels(tmp_path):
    images = make_cityscapes(tmp_path)
    images["aachen"].unlink()
    with pytest.raises(BLDAError, match="aachen_000000_000009_gtFine_labelIds.png has no matching"):
        build_dataset("cityscapes", tmp_path)
    write_rgb(images["aachen"], random_image(H, W, 0))
    (tmp_path / "gtFine/val/bochum/bochum_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(BLDAError, match="1 of 2 images have no label"):
        build_dataset("cityscapes", tmp_path)


def test_corrupt_and_truncated_images_raise_corrupt_sample_error(tmp_path):
    images = make_cityscapes(tmp_path)
    images["aachen"].write_bytes(b"not a png at all")
    whole = images["bochum"].read_bytes()
    images["bochum"].write_bytes(whole[: len(whole) // 2])
    dataset = build_dataset("cityscapes", tmp_path)
    assert len(dataset) == 2  # listing does not open files
    for index, city in enumerate(("aachen", "bochum")):
        with pytest.raises(CorruptSampleError, match=str(images[city])):
            dataset[index]
    assert issubclass(CorruptSampleError, BLDAError)


def test_colour_label_file_is_refused_with_its_name(tmp_path):
    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine/val/aachen/aachen_000000_000009_gtFine_labelIds.png"
    write_rgb(label, random_image(H, W, 3))
    with pytest.raises(CorruptSampleError, match=r"labelIds.png: label image has mode RGB"):
        build_dataset("cityscapes", tmp_path)[0]


# ---------------------------------------------------------------- GTA5


def make_gta5(root, mismatch=True):
    for index in range(3):
        write_rgb(root / "images" / f"{index:05d}.png", random_image(H, W, seed=index))
        write_palette(root / "labels" / f"{index:05d}.png", CITYSCAPES_IDS)
    if mismatch:  # a real GTA5 quirk: image and label sizes differ
        write_rgb(root / "images" / "00003.png", np.full((H + 1, W + 2, 3), (10, 200, 30)))
        write_palette(root / "labels" / "00003.png", CITYSCAPES_IDS)


def test_gta5_palette_labels_read_as_ids(tmp_path):
    make_gta5(tmp_path, mismatch=False)
    dataset = build_dataset("gta5", tmp_path)
    assert dataset.split == "all" and dataset.names == (
        "images/00000",
        "images/00001",
        "images/00002",
    )
    for index in range(3):
        sample = dataset[index]
        np.testing.assert_array_equal(sample.label.numpy(), CITYSCAPES_TRAIN_IDS)
        np.testing.assert_array_equal(
            sample.image.permute(1, 2, 0).numpy(), random_image(H, W, seed=index)
        )


def test_gta5_size_mismatch_resizes_the_image_and_warns(tmp_path):
    make_gta5(tmp_path)
    dataset = build_dataset("gta5", tmp_path)
    with pytest.warns(SizeMismatchWarning, match="00003.png is 10x7 but label .* is 8x6"):
        sample = dataset[3]
    assert sample.image.shape == (3, H, W)
    # A constant colour stays that colour under bilinear resizing; the label is untouched.
    assert (sample.image == torch.tensor([10, 200, 30])[:, None, None]).all()
    np.testing.assert_array_equal(sample.label.numpy(), CITYSCAPES_TRAIN_IDS)
    assert dataset.resized == {"images/00003": ((W + 2, H + 1), (W, H))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset[0]  # matching pairs do not warn


def test_gta5_size_mismatch_skip_and_error(tmp_path):
    make_gta5(tmp_path)
    skipping = build_dataset("gta5", tmp_path, size_mismatch="skip")
    assert len(skipping) == 3 and skipping.skipped == ["images/00003"]
    strict = build_dataset("gta5", tmp_path, size_mismatch="error")
    assert len(strict) == 4
    with pytest.raises(BLDAError, match="00003.png is 10x7") as raised:
        strict[3]
    assert not isinstance(raised.value, CorruptSampleError)
    with pytest.raises(BLDAError, match="size_mismatch 'crop' is not one of"):
        build_dataset("gta5", tmp_path, size_mismatch="crop")


def test_gta5_split_list_file(tmp_path):
    make_gta5(tmp_path)
    listing = tmp_path / "split.txt"
    listing.write_text("# comment\n00002\nimages/00000.png\n\n00001.png\n")
    dataset = build_dataset("gta5", tmp_path, str(listing))
    assert dataset.names == ("images/00002", "images/00000", "images/00001")
    listing.write_text("00002\n00009\n")
    with pytest.raises(BLDAError, match=r"split.txt:2: no image '00009'"):
        build_dataset("gta5", tmp_path, str(listing))
    with pytest.raises(BLDAError, match="--split train: gta5 takes 'all' or an existing list"):
        build_dataset("gta5", tmp_path, "train")
    listing.write_text("\ufeff00002\n00001\n", encoding="utf-8")  # as Windows Notepad saves it
    assert build_dataset("gta5", tmp_path, str(listing)).names == ("images/00002", "images/00001")
    # a folder was "no such file"; unreadable text was blamed on --data-root by dump-logits
    (tmp_path / "lists").mkdir()
    with pytest.raises(BLDAError, match=r"--split .*lists: gta5 takes .* list file .*; a folder$"):
        build_dataset("gta5", tmp_path, str(tmp_path / "lists"))
    listing.write_bytes(b"caf\xe9\n")
    with pytest.raises(BLDAError, match=r"^--split .*split.txt: .*UTF-8"):
        open_dataset("gta5", tmp_path, str(listing), None)


def test_gta5_missing_folders_and_orphan_labels(tmp_path):
    with pytest.raises(BLDAError, match=str(tmp_path / "images")):
        build_dataset("gta5", tmp_path)
    make_gta5(tmp_path, mismatch=False)
    write_palette(tmp_path / "labels" / "00042.png", CITYSCAPES_IDS)
    with pytest.raises(BLDAError, match=r"00042.png has no matching image"):
        build_dataset("gta5", tmp_path)


def test_gta5_converted_by_daformer_reads_the_original_labels(tmp_path):
    # DAFormer's "Setup Datasets" step writes NNNNN_labelTrainIds.png beside each label.
    make_gta5(tmp_path, mismatch=False)
    for index in range(3):  # zeros: a copy that were read would show
        write_gray(tmp_path / "labels" / f"{index:05d}_labelTrainIds.png", np.zeros((H, W)))
    dataset = build_dataset("gta5", tmp_path)
    assert dataset.names == ("images/00000", "images/00001", "images/00002")
    np.testing.assert_array_equal(dataset[2].label.numpy(), CITYSCAPES_TRAIN_IDS)
    # The copies alone are not a dataset without labels (it was read as one, silently).
    for index in range(3):
        (tmp_path / "labels" / f"{index:05d}.png").unlink()
    with pytest.raises(BLDAError, match=r"holds only converted \*_labelTrainIds.png copies \(3\)"):
        build_dataset("gta5", tmp_path)


# ---------------------------------------------------------------- generic folders


def test_folder_dataset_matches_by_stem_and_maps_unknown_ids(tmp_path):
    train_ids = np.arange(H * W).reshape(H, W) % 22  # 0..21: 19, 20 and 21 are not classes
    train_ids[0, 0] = 255
    write_rgb(tmp_path / "images/a.png", random_image(H, W, 0))
    write_rgb(tmp_path / "images/sub/b.jpg", random_image(H, W, 1))
    write_gray(tmp_path / "labels/a.png", train_ids)
    write_gray(tmp_path / "labels/sub/b.png", train_ids)
    dataset = build_dataset("folder", tmp_path)
    assert dataset.names == ("images/a", "images/sub/b")
    assert dataset.class_names == CITYSCAPES_CLASSES
    expected = np.where(train_ids < 19, train_ids, 255)
    for index in range(2):
        np.testing.assert_array_equal(dataset[index].label.numpy(), expected)
    assert dataset[1].image.shape == (3, H, W)

    names_file = tmp_path / "classes.txt"
    names_file.write_text("background\nthing\n\nstuff\n")
    three = build_dataset("folder", tmp_path, class_names=str(names_file))
    assert three.class_names == ("background", "thing", "stuff")
    assert three.palette == default_palette(3)
    np.testing.assert_array_equal(three[0].label.numpy(), np.where(train_ids < 3, train_ids, 255))


def test_folder_dataset_split_folders_and_errors(tmp_path):
    write_rgb(tmp_path / "images/val/x.png", random_image(H, W, 0))
    dataset = build_dataset("folder", tmp_path, "val")
    assert dataset.names == ("images/val/x",) and not dataset.has_labels
    write_rgb(tmp_path / "images/val/x.jpg", random_image(H, W, 0))
    with pytest.raises(BLDAError, match="same name as"):
        build_dataset("folder", tmp_path, "val")
    (tmp_path / "images/val/x.jpg").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(BLDAError, match=str(tmp_path / "empty" / "images")):
        build_dataset("folder", tmp_path / "empty")
    with pytest.raises(BLDAError, match="palette has 2 colours for 19 classes"):
        build_dataset("folder", tmp_path, "val", palette=[(0, 0, 0), (1, 1, 1)])


# ---------------------------------------------------------------- classification


def test_image_folder_classification(tmp_path):
    for split, classes in (("train", ("dog", "cat", "emu")), ("val", ("dog", "cat"))):
        for class_name in classes:
            for index in range(2):
                write_rgb(tmp_path / split / class_name / f"{index}.png", random_image(5, 4, index))
    dataset = build_dataset("image-folder", tmp_path, "val")
    # The union over splits, sorted: val indexes classes like train though it has no emu.
    assert dataset.class_names == ("cat", "dog", "emu") and dataset.has_labels
    assert dataset.names == ("val/cat/0", "val/cat/1", "val/dog/0", "val/dog/1")
    sample = dataset[2]
    assert sample.label.dtype == torch.int64 and sample.label.ndim == 0 and int(sample.label) == 1
    assert sample.image.shape == (3, 5, 4)
    assert [int(dataset[i].label) for i in range(4)] == [0, 0, 1, 1]

    explicit = build_dataset("image-folder", tmp_path, "val", class_names=["emu", "dog", "cat"])
    assert [int(explicit[i].label) for i in range(4)] == [2, 2, 1, 1]
    with pytest.raises(BLDAError, match=r"class folder .*dog is not in class_names"):
        build_dataset("image-folder", tmp_path, "val", class_names=["cat"])
    write_rgb(tmp_path / "val" / "stray.png", random_image(5, 4, 0))
    with pytest.raises(BLDAError, match="stray.png lies directly in the split folder"):
        build_dataset("image-folder", tmp_path, "val")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(BLDAError, match="no images under"):
        build_dataset("image-folder", tmp_path, "test")


# ---------------------------------------------------------------- registry, colours, writing


def test_registry_names_and_option_errors(tmp_path):
    assert list_datasets() == ["cityscapes", "gta5", "synthia", "folder", "image-folder"]
    with pytest.raises(BLDAError, match="valid datasets: cityscapes, gta5, synthia"):
        build_dataset("kitti", tmp_path, "val")
    with pytest.raises(
        BLDAError, match=r"option 'label_type' is not valid for gta5; valid options: size_mismatch"
    ):
        build_dataset("gta5", tmp_path, label_type="labelIds")


def test_datasets_pickle_for_worker_processes(tmp_path):
    make_gta5(tmp_path, mismatch=False)
    dataset = build_dataset("gta5", tmp_path)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.names == dataset.names
    assert torch.equal(copy[1].label, dataset[1].label)


def test_label_to_color_and_default_palette():
    palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    colors = label_to_color(torch.tensor([[0, 1], [255, 2], [3, 1]]), palette, (100, 101, 102))
    expected = [[(1, 2, 3), (4, 5, 6)], [(100, 101, 102), (7, 8, 9)], [(100, 101, 102), (4, 5, 6)]]
    assert colors.dtype == torch.uint8 and colors.tolist() == [
        [list(c) for c in row] for row in expected
    ]
    with pytest.raises(BLDAError, match="negative"):
        label_to_color(torch.tensor([[-1]]), palette)
    # The PASCAL VOC colour map's first entries, as published with the VOC devkit.
    assert default_palette(6) == [
        (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)
    ]  # fmt: skip
    assert len(set(default_palette(255))) == 255


def test_write_label_and_color_pngs(tmp_path):
    train_ids = torch.tensor(CITYSCAPES_TRAIN_IDS)
    write_label_png(tmp_path / "out/label.png", train_ids)
    write_color_png(tmp_path / "out/color.png", train_ids, [(i, 2 * i, 3 * i) for i in range(19)])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["color.png", "label.png"]
    with Image.open(tmp_path / "out/label.png") as written:
        assert written.mode == "L"
        np.testing.assert_array_equal(np.array(written), CITYSCAPES_TRAIN_IDS)
    with Image.open(tmp_path / "out/color.png") as written:
        colors = np.array(written)
    ids = CITYSCAPES_TRAIN_IDS
    expected = np.where((ids < 19)[..., None], np.stack([ids, 2 * ids, 3 * ids], -1), 0)
    np.testing.assert_array_equal(colors, expected)
    with pytest.raises(BLDAError, match="0..255"):
        write_label_png(tmp_path / "bad.png", torch.tensor([[256]]))
    assert not (tmp_path / "bad.png").exists()
