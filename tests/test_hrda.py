"""HRDA / MIC models: keys of the released checkpoints, and the multi-resolution inference
against a direct computation of the published formulas (lhoyer/MIC hrda_encoder_decoder.py
`encode_decode` / `extract_slide_feat`, hrda_head.py `forward` / `decode_hr`), written here
crop by crop with offsets worked out by hand.

Truths used: the manifest `hrda_mitb5.json` (written from the public code), hand-listed detail
crop offsets, the fusion formula fused = up(att) * hr + up((1 - att) * lr).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models import (
    assert_same_keys_and_shapes,
    empty_model,
    manifest_shapes,
    released_layout_checkpoint,
    state_shapes,
)

from blda_tools.errors import BLDAError
from blda_tools.inference.predict import predict_logits
from blda_tools.models import create_model, load_checkpoint


def test_hrda_mitb5_state_dict_equals_released_manifest():
    with torch.device("meta"):
        model = create_model("hrda_mitb5", 19)
    assert_same_keys_and_shapes(state_shapes(model), manifest_shapes("hrda_mitb5"))


def test_hrda_manifest_is_daformers_with_the_head_moved_and_an_attention_head():
    hrda, daformer = manifest_shapes("hrda_mitb5"), manifest_shapes("daformer_mitb5")
    moved = {k.replace("decode_head.", "decode_head.head.", 1): v for k, v in daformer.items()}
    attention = {k: v for k, v in hrda.items() if k.startswith("decode_head.scale_attention.")}
    assert {k: v for k, v in hrda.items() if k not in attention} == moved
    assert attention["decode_head.scale_attention.conv_seg.weight"] == (19, 256, 1, 1)
    assert attention["decode_head.scale_attention.fuse_layer.conv.weight"] == (256, 1024, 1, 1)
    assert len(attention) == 16 and len(hrda) == 1126


@pytest.mark.parametrize(
    ("arch", "weights"),
    [("hrda_mitb5", "student"), ("hrda_mitb5", "imnet"), ("daformer_mitb5", "student")],
)
def test_released_layout_mic_checkpoint_loads_with_zero_missing_keys(tmp_path, arch, weights):
    path = tmp_path / "mic.pth"
    released_layout_checkpoint(path, arch, {"model": 1.0, "ema_model": 2.0, "imnet_model": 3.0})
    model = empty_model(arch, 19)
    report = load_checkpoint(model, path, weights=weights)
    assert report.missing == [] and report.unexpected == [] and report.dropped == []
    value = {"student": 1.0, "teacher": 2.0, "imnet": 3.0}[weights]
    assert all(torch.all(p == value) for p in model.parameters())


@pytest.mark.parametrize(
    ("saved", "asked", "hint"),
    [
        ("hrda_mitb5", "daformer_mitb5", "--model hrda_mitb5"),
        ("daformer_mitb5", "hrda_mitb5", "--model daformer_mitb5"),
    ],
)
def test_checkpoint_of_the_other_family_names_the_likely_architecture(tmp_path, saved, asked, hint):
    path = tmp_path / "other.pth"
    released_layout_checkpoint(path, saved, {"model": 0.5})
    with pytest.raises(BLDAError, match=hint):
        load_checkpoint(empty_model(asked, 19), path)


# ------------------------------------------------------------------ multi-resolution inference


# The released detail crop is 512 x 512 (hr_crop_size in gtaHR2csHR_mic_hrda.py); the tests
# use 64 x 64 crops (stride 32) so that windows with overlapping crops stay small and fast.
CROP = 64


def test_released_detail_crop_is_512_at_stride_256():
    with torch.device("meta"):
        model = create_model("hrda_mitb5", 19)
    assert model.detail_crop == (512, 512)
    assert model.output_stride == 4 and model.test_protocol == "hrda"


@pytest.fixture(scope="module")
def hrda_b0():
    torch.manual_seed(0)
    model = create_model("hrda_mitb0", 5, detail_crop=(CROP, CROP)).eval()
    with torch.no_grad():  # a spread-out attention, so both branches matter
        model.decode_head.scale_attention.conv_seg.weight.normal_(0, 1.0)
        model.decode_head.head.conv_seg.weight.normal_(0, 0.3)
    return model


def direct_hrda(model, window, offsets: list[tuple[int, int]], os: int = 4) -> torch.Tensor:
    """The published computation for one window (1, 3, H, W), one detail crop at a time;
    `os` is the heads' output stride (hrda_head.py: 4 DAFormer, 8 DeepLabV2)."""
    backbone, head, attention_head = (
        model.backbone,
        model.decode_head.head,
        model.decode_head.scale_attention,
    )
    context = F.interpolate(window, scale_factor=0.5, mode="bilinear", align_corners=False)
    context_features = backbone(context)
    lr = head(context_features)
    att = torch.sigmoid(attention_head(context_features))
    height, width = window.shape[2:]
    hr = torch.zeros(1, lr.shape[1], height // os, width // os)
    count = torch.zeros(1, 1, height // os, width // os)
    side = CROP // os
    for top, left in offsets:
        crop = window[:, :, top : top + CROP, left : left + CROP]
        rows, columns = slice(top // os, top // os + side), slice(left // os, left // os + side)
        hr[:, :, rows, columns] += head(backbone(crop))
        count[:, :, rows, columns] += 1
    assert count.min() >= 1
    hr = hr / count

    def up(x):
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    return up(att) * hr + up((1 - att) * lr)


def test_window_prediction_equals_the_published_formulas_non_square_with_border_crops(hrda_b0):
    # 96 x 80 window, 64 crops at stride 32: rows start at 0, 32 (96 - 64); columns at 0 and
    # 16 (the second crop flush with the right border, 80 - 64).
    offsets = [(0, 0), (0, 16), (32, 0), (32, 16)]
    generator = torch.Generator().manual_seed(1)
    windows = torch.randn(2, 3, 96, 80, generator=generator)
    with torch.no_grad():
        batched = hrda_b0(windows)  # both windows and all their crops in one pass
        expected = torch.cat([direct_hrda(hrda_b0, w[None], offsets) for w in windows])
    assert batched.shape == (2, 5, 24, 20)
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-4)
    hrda_b0.crops_per_batch = 1
    try:
        with torch.no_grad():
            one_at_a_time = hrda_b0(windows)
    finally:
        hrda_b0.crops_per_batch = None
    torch.testing.assert_close(one_at_a_time, expected, rtol=1e-4, atol=1e-4)


def test_small_window_is_its_own_detail_crop(hrda_b0):
    # A window no larger than the detail crop is one crop: the whole window, full resolution.
    window = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        backbone, head = hrda_b0.backbone, hrda_b0.decode_head.head
        context = F.interpolate(window, scale_factor=0.5, mode="bilinear", align_corners=False)
        features = backbone(context)
        att = torch.sigmoid(hrda_b0.decode_head.scale_attention(features))

        def up(x):
            return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

        detail_logits, detail_features = head.forward_with_features(backbone(window))
        expected = up(att) * detail_logits + up((1 - att) * head(features))
        torch.testing.assert_close(hrda_b0(window), expected, rtol=1e-4, atol=1e-4)
        logits, returned_features = hrda_b0.forward_with_features(window)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(returned_features, detail_features, rtol=1e-4, atol=1e-4)


def test_outer_sliding_windows_average_hrda_windows(hrda_b0):
    # predict_logits' slide over HRDA windows: two 64 x 64 windows of a 64 x 96 image at
    # stride 32 (offsets 0 and 32), each window's fused logits resized to the window, averaged.
    # (Each window is one detail crop here; the crops inside a window are tested above.)
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = predict_logits(hrda_b0, image, "slide", crop=(64, 64), stride=(32, 32))

        def window(left):
            fused = hrda_b0(image[:, :, :, left : left + 64])
            return F.interpolate(fused, size=(64, 64), mode="bilinear", align_corners=False)

        total = torch.zeros(1, 5, 64, 96)
        count = torch.zeros(1, 1, 64, 96)
        for left in (0, 32):
            total[:, :, :, left : left + 64] += window(left)
            count[:, :, :, left : left + 64] += 1
    torch.testing.assert_close(logits, total / count, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(60, 92), (1, 64), (64, 1)])
def test_window_sides_that_do_not_align_are_refused(hrda_b0, size):
    # a side of 1 made the context at 0.5 empty: torch's interpolate raised first
    with torch.no_grad(), pytest.raises(BLDAError, match="divisible by 8"):
        hrda_b0(torch.zeros(1, 3, *size))


def test_hrda_window_prediction_needs_eval_mode(hrda_b0):
    # In train mode HRDA predicts a crop with one detail box (forward_train, blda train).
    hrda_b0.train()
    try:
        with pytest.raises(BLDAError, match="forward_train"):
            hrda_b0(torch.zeros(1, 3, 64, 64))
    finally:
        hrda_b0.eval()
    assert hrda_b0.supports_training is True


def test_training_evaluation_runs_hrda_windows(hrda_b0):
    # evaluate() slides windows over the image and argmaxes the fused logits at label size.
    from blda_tools.datasets import SegmentationSample
    from blda_tools.models import normalize
    from blda_tools.training.evaluate import confusion_matrix, evaluate

    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    label = torch.randint(0, 5, (64, 96))
    dataset = [SegmentationSample(image, label, "a")]
    scores = evaluate(
        hrda_b0,
        dataset,
        num_classes=5,
        class_names=list("abcde"),
        normalize=normalize,
        device=torch.device("cpu"),
        resize=(),
        crop_size=(64, 64),
        stride=(32, 32),
    )
    with torch.no_grad():
        logits = predict_logits(hrda_b0, normalize(image)[None], "slide", (64, 64), (32, 32))
    confusion = confusion_matrix(logits[0].argmax(0), label, 5).double()
    assert scores["aAcc"] == pytest.approx(100 * (confusion.diag().sum() / confusion.sum()).item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hrda_on_cuda_equals_cpu(hrda_b0):
    windows = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cpu = hrda_b0(windows)
        cuda = hrda_b0.to("cuda")(windows.cuda()).cpu()
    hrda_b0.to("cpu")
    torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-3)


def test_hrda_dump_then_diagnose(tmp_path):
    from click.testing import CliRunner
    from test_dump import make_cityscapes

    from blda_cli.dump_logits import dump_logits_command
    from blda_tools.diagnose import diagnose

    make_cityscapes(tmp_path / "cs", count=2, size=(64, 96))
    torch.manual_seed(0)
    torch.save(create_model("hrda_mitb0", 19).state_dict(), tmp_path / "hrda.pth")
    arguments = ["--model", "hrda_mitb0", "--checkpoint", str(tmp_path / "hrda.pth")]
    arguments += ["--dataset", "cityscapes", "--data-root", str(tmp_path / "cs")]
    arguments += ["--resize", "none", "--crop", "64x64", "--window-stride", "32x32"]
    arguments += ["--workers", "0", "--out", str(tmp_path / "hrda.h5")]
    result = CliRunner().invoke(dump_logits_command, arguments)
    assert result.exit_code == 0, result.output
    assert "hrda protocol, overridden: mode, resize, crop, stride" not in result.output
    assert "hrda protocol, overridden: resize, crop" in result.output
    from blda_tools.store import LogitStore

    assert LogitStore(tmp_path / "hrda.h5").num_rows == 2 * 64 * 96
    diagnosis = diagnose(tmp_path / "hrda.h5", tmp_path / "diagnosis", plots_and_report=False)
    assert diagnosis.miou is not None and len(diagnosis.classes) == 19


# ------------------------------------------------------------------ HRDA over DeepLabV2


def test_hrda_deeplabv2_keys_follow_the_dlv2_manifest():
    # hrda_head.py DLV2Head branch: head and scale_attention are both the DLV2 head config.
    dlv2 = manifest_shapes("deeplabv2_r101")
    expected = {k: v for k, v in dlv2.items() if k.startswith("backbone.")}
    for key, shape in dlv2.items():
        if key.startswith("decode_head."):
            rest = key[len("decode_head.") :]
            expected[f"decode_head.head.{rest}"] = shape
            expected[f"decode_head.scale_attention.{rest}"] = shape
    with torch.device("meta"):
        model = create_model("hrda_deeplabv2_r101", 19)
    assert_same_keys_and_shapes(state_shapes(model), expected)
    assert model.output_stride == 8 and model.test_protocol == "hrda"


def test_hrda_deeplabv2_window_equals_the_published_formulas():
    torch.manual_seed(0)
    model = create_model("hrda_deeplabv2_r101", 4, detail_crop=(CROP, CROP)).eval()
    window = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = direct_hrda(model, window, [(0, 0), (0, 16), (32, 0), (32, 16)], os=8)
        # Logits of a randomly initialised ResNet are large: float32 sums of batched and
        # single convolutions differ at 1e-4 of their scale.
        scale = expected.abs().max().item()
        torch.testing.assert_close(model(window), expected, rtol=1e-3, atol=1e-4 * scale)
