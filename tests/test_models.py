"""Models: registry, key names of the released checkpoints, forward passes (checkpoint
loading and plugins: test_checkpoints.py).

Truths used: the key-and-shape manifests written from the public mmseg / mmcv / DAFormer code
(`blda_tools/models/manifests/*.json`, not produced by this package), closed-form output sizes,
hand-written attention and convolution formulas, and the weights of models we save ourselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blda_tools.errors import BLDAError
from blda_tools.models import (
    create_model,
    list_models,
    load_checkpoint,
    normalize,
)
from blda_tools.models.blocks import tokens_to_grid
from blda_tools.models.deeplabv2 import DLV2Head
from blda_tools.models.mit import EfficientSelfAttention

MANIFESTS = Path(__file__).resolve().parents[1] / "blda_tools" / "models" / "manifests"


def manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    assert manifest["sources"], "a manifest names the public files it was read from"
    return {key: tuple(shape) for key, shape in manifest["keys"].items()}


def state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def assert_same_keys_and_shapes(actual: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"missing {missing[:10]}, extra {extra[:10]}"
    wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert not wrong, f"shapes differ: {dict(list(wrong.items())[:10])}"


# --------------------------------------------------------------------------- registry, shapes


@pytest.fixture(scope="module")
def daformer_b5():
    torch.manual_seed(0)
    return create_model("daformer_mitb5", 19).eval()


def test_daformer_mitb5_state_dict_equals_released_manifest(daformer_b5):
    assert_same_keys_and_shapes(state_shapes(daformer_b5), manifest_shapes("daformer_mitb5"))


def test_daformer_mitb5_runs_and_outputs_quarter_resolution(daformer_b5):
    with torch.no_grad():
        logits, features = daformer_b5.forward_with_features(torch.randn(1, 3, 64, 96))
    assert logits.shape == (1, 19, 16, 24)
    assert features.shape == (1, daformer_b5.feature_channels, 16, 24) == (1, 256, 16, 24)
    assert torch.isfinite(logits).all()


def test_deeplabv2_r101_state_dict_equals_released_manifest():
    # Meta tensors: keys and shapes without allocating 43 M parameters.
    with torch.device("meta"):
        model = create_model("deeplabv2_r101", 19)
    assert_same_keys_and_shapes(state_shapes(model), manifest_shapes("deeplabv2_r101"))


def released_layout_checkpoint(path, manifest: str, part_values: dict[str, float], extra=()):
    """A UDA checkpoint with the manifest's keys and shapes under each part's prefix.

    Every tensor is one constant expanded to its shape, so the file stays tiny.
    """
    state = {}
    for part, value in part_values.items():
        for key, shape in {**manifest_shapes(manifest), **dict(extra)}.items():
            dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
            state[f"{part}.{key}"] = torch.full((), value, dtype=dtype).expand(shape)
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, path)


@pytest.mark.parametrize("arch", ["daformer_mitb5", "deeplabv2_r101"])
def test_released_layout_uda_checkpoint_loads_with_zero_missing_keys(tmp_path, arch):
    # BLDA's release adds a regression head to the DAFormer decode head.
    extra = {"decode_head.conv_reg.weight": (1, 256, 1, 1), "decode_head.conv_reg.bias": (1,)}
    path = tmp_path / "released.pth"
    released_layout_checkpoint(
        path,
        arch,
        {"model": 1.0, "ema_model": 2.0, "imnet_model": 3.0},
        extra if arch.startswith("daformer") else (),
    )
    model = empty_model(arch, 19)  # not initialised: the load must fill everything
    report = load_checkpoint(model, path, weights="teacher")
    assert report.missing == [] and report.unexpected == []
    assert report.dropped == (sorted(extra) if arch.startswith("daformer") else [])
    assert all(torch.all(p == 2.0) for p in model.parameters())


def test_blda_regression_head_adds_exactly_conv_reg():
    with torch.device("meta"):
        model = create_model("daformer_mitb0", 19, regression_head=True)
    reg = {k: v for k, v in state_shapes(model).items() if "conv_reg" in k}
    # Woof6/BLDA daformer_head.py: nn.Conv2d(self.channels, 1, kernel_size=1), channels 256.
    assert reg == {"decode_head.conv_reg.weight": (1, 256, 1, 1), "decode_head.conv_reg.bias": (1,)}


@pytest.mark.parametrize("arch", [a for a in list_models() if not a.startswith("resnet")])
def test_every_arch_gives_logits_at_its_output_stride(arch):
    with torch.device("meta"):
        model = create_model(arch, 7).eval()
        logits, features = model.forward_with_features(torch.empty(2, 3, 64, 96))
    stride = {"deeplabv2_r101": 8, "hrda_deeplabv2_r101": 8}.get(arch, 4)
    assert model.output_stride == stride
    assert logits.shape == (2, 7, 64 // stride, 96 // stride)
    assert features.shape == (2, model.feature_channels, 64 // stride, 96 // stride)
    assert isinstance(model.backbone, torch.nn.Module) and isinstance(
        model.decode_head, torch.nn.Module
    )


def empty_model(arch: str, num_classes: int, **options) -> torch.nn.Module:
    """A model with allocated but uninitialised weights (fast): only for strict-load targets."""
    with torch.device("meta"):
        model = create_model(arch, num_classes, **options)
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("arch", ["tiny", "daformer_mitb0", "segformer_mitb0"])
def test_real_forward_odd_size_and_classifier_on_features(arch):
    torch.manual_seed(0)
    model = create_model(arch, 5).eval()
    with torch.no_grad():
        logits, features = model.forward_with_features(torch.randn(1, 3, 50, 70))
        plain = model(torch.randn(1, 3, 50, 70))
    # Strided convs with padding k // 2 give ceil(size / 2) per halving.
    halvings = int(math.log2(model.output_stride))
    h, w = 50, 70
    for _ in range(halvings):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert logits.shape == plain.shape == (1, 5, h, w)
    classifier = getattr(model.decode_head, "conv_seg", None) or model.decode_head.linear_pred
    torch.testing.assert_close(logits, F.conv2d(features, classifier.weight, classifier.bias))


def test_deeplabv2_logits_are_the_sum_of_dilated_classifiers():
    torch.manual_seed(0)
    head = DLV2Head(2048, 3)
    features = torch.randn(1, 2048, 6, 7)
    expected = sum(
        F.conv2d(features, branch.conv.weight, branch.conv.bias, padding=d, dilation=d)
        for branch, d in zip(head.aspp_modules, (6, 12), strict=True)
    )
    torch.testing.assert_close(head([features]), expected)


def test_efficient_self_attention_matches_the_formula():
    torch.manual_seed(0)
    dim, heads, sr, height, width = 8, 2, 2, 4, 6
    attention = EfficientSelfAttention(dim, heads, sr).eval()
    x = torch.randn(1, height * width, dim)
    # softmax(Q K^T / sqrt(d_head)) V, with K, V from the spatially reduced, normalised sequence.
    grid = x.transpose(1, 2).reshape(1, dim, height, width)
    reduced = F.layer_norm(
        F.conv2d(grid, attention.sr.weight, attention.sr.bias, stride=sr)
        .flatten(2)
        .transpose(1, 2),
        (dim,),
        attention.norm.weight,
        attention.norm.bias,
    )
    q = x @ attention.q.weight.T + attention.q.bias
    k, v = (reduced @ attention.kv.weight.T + attention.kv.bias).split(dim, dim=-1)
    d = dim // heads
    outputs = []
    for h in range(heads):
        qh, kh, vh = (
            q[..., h * d : (h + 1) * d],
            k[..., h * d : (h + 1) * d],
            v[..., h * d : (h + 1) * d],
        )
        outputs.append(torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1) @ vh)
    expected = torch.cat(outputs, dim=-1) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(attention(x, height, width), expected)


@pytest.mark.parametrize("batch", [1, 3])
def test_token_grid_is_a_channels_last_view_that_resizing_keeps(batch):
    torch.manual_seed(0)
    height, width, channels = 3, 5, 4
    tokens = torch.randn(batch, height * width, channels)
    grid = tokens_to_grid(tokens, height, width)
    assert grid.shape == (batch, channels, height, width)
    assert grid.data_ptr() == tokens.data_ptr()  # a view, no copy
    for b, c, y, x in [(0, 0, 0, 0), (batch - 1, 3, 2, 4), (0, 2, 1, 3)]:
        assert grid[b, c, y, x] == tokens[b, y * width + x, c]  # row-major token order
    # Torch must take it for channels-last: otherwise resizing returns NCHW, made by the
    # strided copies that once took most of a SegFormer forward on CPU (batch 1 did).
    resized = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)
    assert resized.is_contiguous(memory_format=torch.channels_last)


def test_tiny_model_is_small():
    model = create_model("tiny", 19)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 500_000


def test_unknown_arch_and_option_are_refused_with_the_valid_ones():
    with pytest.raises(
        BLDAError, match="unknown architecture 'daformer_mitb9'.*daformer_mitb5.*tiny"
    ):
        create_model("daformer_mitb9", 19)
    with pytest.raises(BLDAError, match="unknown option.*colour.*valid: channels"):
        create_model("tiny", 19, colour=1)
    with pytest.raises(BLDAError, match="num_classes"):
        create_model("tiny", 0)


def test_normalize_uses_imagenet_statistics():
    image = torch.tensor([[[0, 255]], [[128, 64]], [[10, 200]]], dtype=torch.uint8)
    expected = torch.tensor(
        [
            [[(0 - 123.675) / 58.395, (255 - 123.675) / 58.395]],
            [[(128 - 116.28) / 57.12, (64 - 116.28) / 57.12]],
            [[(10 - 103.53) / 57.375, (200 - 103.53) / 57.375]],
        ]
    )
    torch.testing.assert_close(normalize(image), expected)
    assert normalize(image[None]).shape == (1, 3, 1, 2)
    with pytest.raises(BLDAError, match="3, H, W"):
        normalize(torch.zeros(4, 5, 5, dtype=torch.uint8))


@pytest.mark.parametrize("arch", list_models())
def test_every_builtin_layout_is_identified_as_itself(arch):
    """The key rules of `identify` against each registered constructor's own state dict."""
    from blda_tools.models.identify import likely_architecture

    with torch.device("meta"):
        model = create_model(arch, 19)
    assert likely_architecture(model.state_dict()) == arch


def test_a_tiny_checkpoint_given_as_hrda_tiny_names_tiny(tmp_path):
    torch.save(create_model("tiny", 19).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(BLDAError, match="keys are those of tiny"):
        load_checkpoint(create_model("hrda_tiny", 19), tmp_path / "tiny.pth")
    torch.save(create_model("hrda_tiny", 5).state_dict(), tmp_path / "five.pth")
    with pytest.raises(BLDAError, match="another number of classes") as caught:
        load_checkpoint(create_model("hrda_tiny", 19), tmp_path / "five.pth")
    assert "another architecture" not in str(caught.value)
