"""Each family's test protocol by default, the options that override it, the >2x rescale
warning, and the mmcv-style uint8 resize.

Truths used: numbers typed in from the public configs (DAFormer
`uda_gta_to_cityscapes_512x512.py`: test img_scale (1024, 512), keep ratio, mode whole; MIC
`gtaHR2csHR_mic_hrda.py`: slide, crop 1024, stride 512, img_scale (2048, 1024)), mmcv's
`rescale_size` worked by hand, and OpenCV's `cv2.resize` itself.
"""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dump import make_cityscapes
from torch import nn

from blda_cli.dump_logits import dump_logits_command
from blda_tools.errors import BLDAError
from blda_tools.inference.dump import prepare_dump
from blda_tools.inference.predict import InferenceSettings, predict_images, predict_logits
from blda_tools.inference.protocols import PROTOCOLS, rescale_warning, resolve_inference
from blda_tools.inference.resize import rescaled_size, resize_uint8
from blda_tools.models import create_model
from blda_tools.models.loading import declared_family

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def test_protocols_are_the_public_configs():
    daformer, hrda = PROTOCOLS["daformer"], PROTOCOLS["hrda"]
    assert (daformer.mode, daformer.resize, daformer.keep_ratio) == ("whole", (512, 1024), True)
    assert (hrda.mode, hrda.crop, hrda.stride) == ("slide", (1024, 1024), (512, 512))
    assert (hrda.resize, hrda.keep_ratio) == ((1024, 2048), True)
    assert PROTOCOLS["native"] == InferenceSettings()


@pytest.mark.parametrize(
    ("arch", "protocol"),
    [
        ("daformer_mitb5", "daformer"),
        ("segformer_mitb5", "daformer"),
        ("deeplabv2_r101", "daformer"),
        ("hrda_mitb5", "hrda"),
        ("hrda_mitb0", "hrda"),
        ("tiny", None),
        ("resnet101", "classifier"),
    ],
)
def test_each_family_declares_its_protocol(arch, protocol):
    task = "classification" if arch.startswith("resnet") else "segmentation"
    assert declared_family(arch) == (protocol, task)


def test_mmcv_keep_ratio_sizes_hand_worked():
    # factor = min(long bound / long side, short bound / short side); side = int(side * f + .5)
    assert rescaled_size((1024, 2048), (512, 1024), True) == (512, 1024)
    assert rescaled_size((128, 256), (1024, 2048), True) == (1024, 2048)
    # GTA 1052 x 1914 within 1024 x 2048: f = 1024 / 1052, 1914 * f = 1863.06
    assert rescaled_size((1052, 1914), (1024, 2048), True) == (1024, 1863)
    # Portrait images use the same bounds (long side 1024, short side 512).
    assert rescaled_size((2048, 1024), (512, 1024), True) == (1024, 512)
    assert rescaled_size((1052, 1914), (512, 1024), False) == (512, 1024)


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 3000), st.integers(8, 3000), st.integers(16, 2048), st.integers(16, 2048))
def test_keep_ratio_fits_the_bounds_and_reaches_one(height, width, bound_a, bound_b):
    new_h, new_w = rescaled_size((height, width), (bound_a, bound_b), True)
    long_bound, short_bound = max(bound_a, bound_b), min(bound_a, bound_b)
    assert max(new_h, new_w) <= long_bound and min(new_h, new_w) <= short_bound
    assert max(new_h, new_w) == long_bound or min(new_h, new_w) == short_bound


def test_uint8_resize_is_opencv_bilinear_then_normalised():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    expected = cv2.resize(image, (80, 48), interpolation=cv2.INTER_LINEAR)  # (w, h)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    resized = resize_uint8(batch, (48, 80))[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(resized, expected)
    # The whole pipeline: an identity model returns the normalised resized image.
    identity = nn.Conv2d(3, 3, 1, bias=False)
    identity.weight.data = torch.eye(3)[:, :, None, None]
    settings_ = InferenceSettings(resize=(48, 80))
    logits = predict_images(identity, batch, settings_, output_size=(48, 80))[0]
    np.testing.assert_allclose(
        logits.permute(1, 2, 0).numpy(), (expected - MEAN) / STD, rtol=1e-5, atol=1e-5
    )
    # The older path (torch bilinear on normalised floats) is kept and differs.
    normalised = (batch.float() - torch.tensor(MEAN).view(3, 1, 1).float()) / torch.tensor(
        STD
    ).view(3, 1, 1).float()
    old = predict_logits(identity, normalised, resize=(48, 80), output_size=(48, 80))[0]
    assert not torch.allclose(old, logits, atol=1e-3)


def test_rescale_warning_names_the_options_and_stays_quiet_up_to_2x():
    message = rescale_warning(PROTOCOLS["hrda"], (128, 256))
    assert "upsamples 128 x 256 images 8.00x" in message
    for option in ("--mode", "--resize", "--crop", "--window-stride"):
        assert option in message
    assert rescale_warning(PROTOCOLS["daformer"], (1024, 2048)) is None  # 0.5x
    assert rescale_warning(PROTOCOLS["daformer"], (128, 256)) is not None  # 4x
    assert rescale_warning(PROTOCOLS["native"], (128, 256)) is None
    # a classifier takes no window options: only --resize is offered
    message = rescale_warning(PROTOCOLS["classifier"], (1024, 1024))
    assert "choose another with --resize (--resize HxW of at least its 224 x 224" in message
    assert "--mode" not in message and "--crop" not in message


def test_explicit_resize_is_an_exact_size_and_named_as_an_override():
    description, settings_ = resolve_inference("daformer", {"resize": (100, 300)})
    assert settings_.resize == (100, 300) and settings_.keep_ratio is False
    assert description == "daformer protocol, overridden: resize"
    assert resolve_inference(None, {})[1] == InferenceSettings()


def test_a_window_stride_larger_than_the_crop_is_refused():
    # windows at multiples of the stride, each crop wide: a stride beyond the crop leaves gaps
    with pytest.raises(BLDAError) as given:
        resolve_inference("hrda", {"crop": (512, 512), "stride": (256, 600)})
    assert str(given.value) == (
        "--window-stride 256x600 is larger than --crop 512x512: the pixels between windows "
        "would get no logits (mmseg's slide inference needs every pixel in a window); give "
        "--window-stride at most 512x512"
    )
    with pytest.raises(BLDAError, match="^the hrda protocol's stride 512x512 is larger than"):
        resolve_inference("hrda", {"crop": (256, 256)})
    assert resolve_inference("hrda", {"crop": (512, 512)})[1].stride == (512, 512)  # equal: no gap


def saved_weights(arch: str, path, num_classes: int = 19):
    """A checkpoint of random weights (dumps of random weights may need an explicit flag)."""
    torch.manual_seed(0)
    torch.save(create_model(arch, num_classes).state_dict(), path)
    return path


def test_hrda_default_protocol_in_the_job_and_store_metadata(tmp_path):
    make_cityscapes(tmp_path / "cs", count=1, size=(16, 32))
    weights = saved_weights("hrda_mitb0", tmp_path / "hrda.pth")
    job = prepare_dump(
        "hrda_mitb0", weights, "cityscapes", tmp_path / "cs", None, tmp_path / "h.h5", workers=0
    )
    assert job.inference == PROTOCOLS["hrda"]
    assert job.writer_options["inference"]["crop"] == [1024, 1024]
    assert job.writer_options["inference_protocol"] == "hrda protocol"
    assert any("upsamples 16 x 32 images 64.00x" in notice for notice in job.notices)


def test_daformer_default_and_cli_overrides_reach_the_store(tmp_path):
    make_cityscapes(tmp_path / "cs", count=1, size=(32, 64))
    runner = CliRunner()
    base = ["--model", "daformer_mitb0", "--dataset", "cityscapes", "--data-root"]
    base += [str(tmp_path / "cs"), "--workers", "0", "--checkpoint"]
    base += [str(saved_weights("daformer_mitb0", tmp_path / "daformer.pth"))]
    result = runner.invoke(dump_logits_command, [*base, "--out", str(tmp_path / "d.h5")])
    assert result.exit_code == 0, result.output
    assert "daformer protocol: whole image, resized within 512 x 1024" in result.output
    assert "upsamples 32 x 64 images 16.00x" in result.output
    metadata = read_metadata(tmp_path / "d.h5")
    assert metadata["inference"]["mode"] == "whole"
    assert metadata["inference"]["resize"] == [512, 1024]
    assert metadata["inference"]["keep_ratio"] is True
    overrides = ["--mode", "slide", "--crop", "32x32", "--window-stride", "16x16", "--resize"]
    result = runner.invoke(
        dump_logits_command, [*base, *overrides, "none", "--out", str(tmp_path / "o.h5")]
    )
    assert result.exit_code == 0, result.output
    assert "overridden: mode, resize, crop, stride" in result.output
    assert "upsamples" not in result.output
    metadata = read_metadata(tmp_path / "o.h5")
    assert metadata["inference"]["mode"] == "slide" and metadata["inference"]["resize"] is None
    assert metadata["inference"]["crop"] == [32, 32] and metadata["inference"]["stride"] == [16, 16]


def read_metadata(path) -> dict:
    with h5py.File(path, "r") as file:
        return json.loads(file.attrs["metadata"])


def test_png_decoding_equals_opencvs_as_mmcv_loads_it(tmp_path):
    # mmcv decodes with cv2 (BGR) and Normalize(to_rgb=True) swaps to RGB; the datasets decode
    # with Pillow, which for PNG (lossless) must give the same pixels.
    from blda_tools.datasets import build_dataset

    (path,) = make_cityscapes(tmp_path / "cs", count=1, size=(24, 40))
    sample = build_dataset("cityscapes", tmp_path / "cs", "val")[0]
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(sample.image.permute(1, 2, 0).numpy(), bgr[:, :, ::-1])
