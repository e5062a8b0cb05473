"""Classifiers (the paper's App. G): ResNets in torchvision's state-dict layout, dumps on
`--dataset image-folder` with one row per image, diagnose and calibrate on them, refusals.

Truths used: torchvision's ResNet layout written here as rules (keys and shapes; 320 keys for
ResNet-50, the count torchvision's resnet50 state dict has), a functional forward written
here with `F.conv2d` from the state dict, and OpenCV for the test-time resize.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from fixtures_datasets import random_image, write_rgb

from blda_cli.dump_logits import dump_logits_command
from blda_tools.calibrate import CalibrateOptions, calibrate
from blda_tools.datasets import build_dataset
from blda_tools.diagnose import diagnose
from blda_tools.errors import BLDAError
from blda_tools.inference.dump import dump_logits, prepare_dump
from blda_tools.models import create_model, load_checkpoint
from blda_tools.store import LogitStore, LogitWriter

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def torchvision_layout(depths, num_classes) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's ResNet (Bottleneck, expansion 4), from its rules."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (channels,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    in_channels = 64
    for stage, (planes, blocks) in enumerate(
        zip((64, 128, 256, 512), depths, strict=True), start=1
    ):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            keys[f"{p}.conv1.weight"] = (planes, in_channels, 1, 1)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if block == 0:  # stride 2 (stages 2-4) or 64 -> 256 channels (stage 1)
                keys[f"{p}.downsample.0.weight"] = (planes * 4, in_channels, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            in_channels = planes * 4
    keys["fc.weight"] = (num_classes, 2048)
    keys["fc.bias"] = (num_classes,)
    return keys


def random_state_dict(depths, num_classes, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_layout(depths, num_classes).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif ".bn" in key or "downsample.1" in key or key.startswith("bn1"):
            state[key] = torch.rand(shape, generator=generator) * 0.5 + 0.25
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=generator) / np.sqrt(fan_in)
    return state


def functional_resnet(state, x, depths):
    """torchvision's forward written with F.*: stride 2 in each stage's first conv2 (v1.5)."""

    def bn(prefix, y):
        return F.batch_norm(
            y,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            eps=1e-5,
        )

    x = F.relu(bn("bn1", F.conv2d(x, state["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage, blocks in enumerate(depths, start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            stride = 2 if block == 0 and stage > 1 else 1
            out = F.relu(bn(f"{p}.bn1", F.conv2d(x, state[f"{p}.conv1.weight"])))
            out = F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1)
            out = F.relu(bn(f"{p}.bn2", out))
            out = bn(f"{p}.bn3", F.conv2d(out, state[f"{p}.conv3.weight"]))
            shortcut = x
            if block == 0:
                shortcut = F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride)
                shortcut = bn(f"{p}.downsample.1", shortcut)
            x = F.relu(out + shortcut)
    return F.linear(x.mean((2, 3)), state["fc.weight"], state["fc.bias"])


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_resnet_keys_are_torchvisions(arch):
    with torch.device("meta"):
        model = create_model(arch, 12)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == torchvision_layout(DEPTHS[arch], 12)
    assert len(shapes) == {"resnet50": 320, "resnet101": 626}[arch]


def test_torchvision_layout_checkpoint_loads_and_gives_the_functional_forward(tmp_path):
    state = random_state_dict(DEPTHS["resnet50"], 5)
    torch.save(state, tmp_path / "resnet50.pth")
    model = create_model("resnet50", 5)
    report = load_checkpoint(model, tmp_path / "resnet50.pth")
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x), functional_resnet(state, x, DEPTHS["resnet50"]), rtol=1e-4, atol=1e-4
        )


def make_image_folder(root, classes=("bus", "car", "cat"), per_class=2, size=(40, 60)):
    paths = {}
    for index, name in enumerate(classes):
        for number in range(per_class):
            seed = 10 * index + number
            path = write_rgb(root / "val" / name / f"{number}.png", random_image(*size, seed))
            paths[path] = index
    return paths


def expected_scores(model, path) -> torch.Tensor:
    """MIC's val transform with OpenCV: 256 x 256, central 224 x 224, normalised."""
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]
    resized = cv2.resize(np.ascontiguousarray(rgb), (256, 256), interpolation=cv2.INTER_LINEAR)
    crop = (resized[16:240, 16:240] - MEAN) / STD
    with torch.no_grad():
        return model(torch.from_numpy(crop).permute(2, 0, 1)[None].float())[0]


def test_classifier_dump_writes_one_row_per_image_and_diagnose_calibrate_run(tmp_path):
    paths = make_image_folder(tmp_path / "folder")
    torch.save(random_state_dict(DEPTHS["resnet50"], 3), tmp_path / "cls.pth")
    out = tmp_path / "cls.h5"
    result = CliRunner().invoke(
        dump_logits_command,
        [
            *("--model", "resnet50", "--checkpoint", str(tmp_path / "cls.pth")),
            *("--dataset", "image-folder", "--data-root", str(tmp_path / "folder")),
            *("--out", str(out), "--workers", "0"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "classifier protocol" in result.output
    store = LogitStore(out)
    assert store.num_rows == len(paths) == 6 and store.num_classes == 3
    chunk = next(store.iter_chunks())
    assert chunk.labels.tolist() == sorted(paths.values())
    model = create_model("resnet50", 3)
    load_checkpoint(model, tmp_path / "cls.pth")
    model.eval()
    expected = torch.stack([expected_scores(model, p) for p in sorted(paths)])
    # float16 store: a relative tolerance of its precision
    torch.testing.assert_close(chunk.logits, expected, rtol=2e-3, atol=2e-3)
    diagnosis = diagnose(out, tmp_path / "diagnosis", plots_and_report=False)
    argmax = expected.argmax(1)
    labels = torch.tensor(sorted(paths.values()))
    assert diagnosis.num_pixels == 6
    assert np.trace(np.array(diagnosis.confusion)) == int((argmax == labels).sum())
    calibrated = calibrate(out, tmp_path / "calibration", CalibrateOptions(plots=False))
    assert (tmp_path / "calibration").is_dir() and calibrated is not None


def test_classifier_on_a_segmentation_dataset_and_the_reverse_are_refused(tmp_path):
    from test_dump import make_cityscapes

    make_cityscapes(tmp_path / "cs", count=1)
    make_image_folder(tmp_path / "folder")
    with pytest.raises(BLDAError, match="resnet101: a whole-image classifier.*image-folder"):
        prepare_dump(
            "resnet101", None, "cityscapes", tmp_path / "cs", None, tmp_path / "a.h5",
            random_weights=True,
        )  # fmt: skip
    with pytest.raises(BLDAError, match="daformer_mitb0: a segmentation model.*classifier"):
        prepare_dump(
            "daformer_mitb0", None, "image-folder", tmp_path / "folder", None, tmp_path / "b.h5",
            random_weights=True,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "named"),
    [({"mode": "slide"}, "--mode"), ({"crop": (100, 100), "stride": (50, 50)},
                                     "--crop, --window-stride")],
)  # fmt: skip
def test_window_options_for_a_classifier_are_refused(tmp_path, changes, named):
    # accepted, printed and recorded as the inference, and without effect on the scores
    make_image_folder(tmp_path / "folder")
    with pytest.raises(BLDAError, match=f"^{named}: window options .* a classifier"):
        prepare_dump(
            "resnet50", None, "image-folder", tmp_path / "folder", None, tmp_path / "a.h5",
            random_weights=True, inference=changes,
        )  # fmt: skip


def test_classification_checkpoint_given_to_a_segmentation_model_says_so(tmp_path):
    torch.save(random_state_dict(DEPTHS["resnet101"], 12), tmp_path / "cls.pth")
    with torch.device("meta"):
        model = create_model("deeplabv2_r101", 12)
    model = model.to_empty(device="cpu")
    with pytest.raises(BLDAError, match=r"a classifier \(resnet101, torchvision layout\)"):
        load_checkpoint(model, tmp_path / "cls.pth")


def test_with_256_classes_or_more_class_255_is_a_label_not_the_ignore_value(tmp_path):
    """ImageNet-sized class lists: class 255's images keep their label (the ignore value moves
    past the classes), and the store takes that label as a class."""
    names = [f"class{index:03d}" for index in range(300)]
    make_image_folder(tmp_path / "folder", classes=names[254:257], per_class=1, size=(8, 8))
    dataset = build_dataset("image-folder", tmp_path / "folder", "val", class_names=names)
    assert dataset.ignore_index == 300
    assert [int(dataset.read_sample(i).label) for i in range(3)] == [254, 255, 256]
    with LogitWriter(tmp_path / "s.h5", names, ignore_index=dataset.ignore_index) as writer:
        writer.add(np.zeros((1, 300), np.float32), np.array([255]), name="x")
    assert LogitStore(tmp_path / "s.h5").has_labelled_pixel()


def test_an_image_smaller_than_the_centre_crop_is_named_and_the_images_before_it_kept(tmp_path):
    # "center_crop: 224 x 224 is larger than 40 x 40" named neither the image nor --resize,
    # and the unfinished store it left was not mentioned.
    write_rgb(tmp_path / "folder" / "val" / "bus" / "0.png", random_image(224, 224, 0))
    write_rgb(tmp_path / "folder" / "val" / "car" / "0.png", random_image(40, 40, 1))
    out = tmp_path / "o.h5"
    with pytest.raises(BLDAError) as caught:
        dump_logits("resnet50", None, "image-folder", tmp_path / "folder", "val", out,
                    random_weights=True, inference={"resize": None}, workers=0)  # fmt: skip
    message = str(caught.value)
    assert message.startswith("image 'val/car/0': the 40 x 40 image (after --resize) is smaller"), (
        message
    )
    assert "give --resize HxW of at least 224 x 224" in message
    assert f"1 of 2 images kept in {out}.partial" in message
    # an exact --resize below the crop fails on every image: refused before the model loads
    with pytest.raises(BLDAError, match=r"^--resize 100x300: smaller than the 224 x 224 centre"):
        prepare_dump("resnet50", None, "image-folder", tmp_path / "folder", "val",
                     tmp_path / "p.h5", random_weights=True, inference={"resize": (100, 300)})  # fmt: skip
