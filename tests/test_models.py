"""Models: registry, key names of the released checkpoints, checkpoint loading, plugins.

Truths used: the key-and-shape manifests written from the public mmseg / mmcv / DAFormer code
(`blda_tools/models/manifests/*.json`, not produced by this package), closed-form output sizes,
hand-written attention and convolution formulas, and the weights of models we save ourselves.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blda_tools.errors import BLDAError
from blda_tools.models import (
    create_model,
    list_models,
    load_checkpoint,
    load_model,
    load_pretrained_backbone,
    normalize,
)
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


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_gives_logits_at_its_output_stride(arch):
    with torch.device("meta"):
        model = create_model(arch, 7).eval()
        logits, features = model.forward_with_features(torch.empty(2, 3, 64, 96))
    stride = {"deeplabv2_r101": 8}.get(arch, 4)
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


# --------------------------------------------------------------------------- checkpoint loading


def tiny_pair():
    torch.manual_seed(1)
    student = create_model("tiny", 4)
    torch.manual_seed(2)
    teacher = create_model("tiny", 4)
    return student, teacher


def assert_weights_equal(model, reference):
    reference_state = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def save_uda_checkpoint(path, student, teacher, extra=None):
    state = {f"model.{k}": v for k, v in student.state_dict().items()}
    state.update({f"ema_model.{k}": v for k, v in teacher.state_dict().items()})
    state.update(extra or {})
    meta = {"CLASSES": ("road", "sidewalk", "building", "wall"), "iter": 40000}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {}}, path)


@pytest.mark.parametrize("weights", ["student", "teacher"])
def test_uda_checkpoint_round_trip_picks_student_or_teacher(tmp_path, weights):
    student, teacher = tiny_pair()
    assert not torch.equal(student.decode_head.conv_seg.weight, teacher.decode_head.conv_seg.weight)
    path = tmp_path / "uda.pth"
    save_uda_checkpoint(path, student, teacher)
    model = create_model("tiny", 4)
    report = load_checkpoint(model, path, weights=weights)
    assert report.missing == [] and report.unexpected == []
    assert report.source == (
        "state_dict[model.*]" if weights == "student" else "state_dict[ema_model.*]"
    )
    assert_weights_equal(model, student if weights == "student" else teacher)


def test_missing_part_and_single_model_weights_are_refused(tmp_path):
    student, teacher = tiny_pair()
    save_uda_checkpoint(tmp_path / "uda.pth", student, teacher)
    with pytest.raises(
        BLDAError, match=r"no imnet_model\.\* weights; it holds ema_model\.\*, model\.\*"
    ):
        load_checkpoint(create_model("tiny", 4), tmp_path / "uda.pth", weights="imnet")
    torch.save(student.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(BLDAError, match="single model"):
        load_checkpoint(create_model("tiny", 4), tmp_path / "plain.pth", weights="teacher")
    with pytest.raises(BLDAError, match="--weights: expected one of student, teacher, imnet"):
        load_checkpoint(create_model("tiny", 4), tmp_path / "plain.pth", weights="ema")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["raw", "state_dict", "model", "ddp-module-prefix"],
)
def test_plain_checkpoint_layouts_load(tmp_path, wrap):
    student, _ = tiny_pair()
    torch.save(wrap(student.state_dict()), tmp_path / "ckpt.pth")
    model = create_model("tiny", 4)
    load_checkpoint(model, tmp_path / "ckpt.pth")
    assert_weights_equal(model, student)


def test_plain_model_with_a_submodule_named_model_is_not_taken_for_uda(tmp_path):
    wrapper = torch.nn.Sequential()
    wrapper.model = torch.nn.Conv2d(3, 2, 1)
    torch.save(wrapper.state_dict(), tmp_path / "wrapper.pth")
    target = torch.nn.Sequential()
    target.model = torch.nn.Conv2d(3, 2, 1)
    load_checkpoint(target, tmp_path / "wrapper.pth")
    assert_weights_equal(target, wrapper)


def test_another_architecture_is_refused_with_sample_keys(tmp_path):
    # DeepLabV2 keys as in the released checkpoints (shapes do not matter for the key check).
    dlv2_keys = manifest_shapes("deeplabv2_r101")
    torch.save(
        {"state_dict": {f"model.{k}": torch.zeros(1) for k in dlv2_keys}}, tmp_path / "dlv2.pth"
    )
    with pytest.raises(BLDAError) as error:
        load_checkpoint(create_model("daformer_mitb0", 19), tmp_path / "dlv2.pth")
    message = str(error.value)
    assert "dlv2.pth" in message and "daformer_mitb0" in message
    assert "missing in the checkpoint: backbone.block1.0" in message
    assert "unexpected in the checkpoint: backbone.layer1.0" in message
    assert "another architecture" in message


def test_original_dacs_deeplab_keys_get_an_explanation(tmp_path):
    # Key names of vikolss/DACS model/deeplabv2.py (torchvision-like ResNet + layer5 classifier).
    keys = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer5.conv2d_list.0.weight"]
    torch.save({k: torch.zeros(1) for k in keys}, tmp_path / "dacs.pth")
    with pytest.raises(BLDAError, match="original DACS"):
        load_checkpoint(create_model("tiny", 19), tmp_path / "dacs.pth")


def test_other_number_of_classes_is_refused_with_shapes(tmp_path):
    torch.save(create_model("tiny", 4).state_dict(), tmp_path / "c4.pth")
    with pytest.raises(
        BLDAError,
        match=r"(?s)conv_seg.weight checkpoint \(4, 64, 1, 1\) vs model \(19, 64, 1, 1\).*number of classes",
    ):
        load_checkpoint(create_model("tiny", 19), tmp_path / "c4.pth")


def test_non_strict_load_reports_missing_and_unexpected_names(tmp_path):
    student, _ = tiny_pair()
    state = student.state_dict()
    del state["decode_head.conv_seg.bias"]
    state["decode_head.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(BLDAError, match="(?s)conv_seg.bias.*extra.weight"):
        load_checkpoint(create_model("tiny", 4), tmp_path / "partial.pth")
    model = create_model("tiny", 4)
    report = load_checkpoint(model, tmp_path / "partial.pth", strict=False)
    assert report.missing == ["decode_head.conv_seg.bias"]
    assert report.unexpected == ["decode_head.extra.weight"]
    assert torch.equal(model.decode_head.conv_seg.weight, student.decode_head.conv_seg.weight)


class NotAllowedObject:
    """A custom class: unpickling it needs full pickle (weights_only=False)."""

    def __init__(self):
        self.note = "custom"


def test_weights_only_refuses_pickled_objects_unless_trusted(tmp_path):
    student, _ = tiny_pair()
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": student.state_dict(), "meta": NotAllowedObject()}, path)
    with pytest.raises(BLDAError, match="pickled.pth.*--trust-checkpoint"):
        load_checkpoint(create_model("tiny", 4), path)
    model = create_model("tiny", 4)
    with pytest.warns(UserWarning, match="arbitrary code"):
        load_checkpoint(model, path, trust_checkpoint=True)
    assert_weights_equal(model, student)


def test_non_checkpoint_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(BLDAError, match="notes.txt: not a PyTorch checkpoint"):
        load_checkpoint(create_model("tiny", 4), tmp_path / "notes.txt")
    with pytest.raises(BLDAError, match="absent.pth: no such file"):
        load_checkpoint(create_model("tiny", 4), tmp_path / "absent.pth")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "ints.pth")
    with pytest.raises(BLDAError, match="non-tensor entries: a"):
        load_checkpoint(create_model("tiny", 4), tmp_path / "ints.pth")


def test_blda_regression_head_is_dropped_or_loaded(tmp_path):
    torch.manual_seed(3)
    source = create_model("daformer_mitb0", 3, regression_head=True)
    save_uda_checkpoint(tmp_path / "blda.pth", source, source)
    plain = empty_model("daformer_mitb0", 3)
    report = load_checkpoint(plain, tmp_path / "blda.pth")
    assert report.dropped == ["decode_head.conv_reg.bias", "decode_head.conv_reg.weight"]
    assert report.missing == [] and report.unexpected == []
    with_head = empty_model("daformer_mitb0", 3, regression_head=True)
    assert load_checkpoint(with_head, tmp_path / "blda.pth", weights="teacher").dropped == []
    assert_weights_equal(with_head, source)


def test_nvlabs_segformer_head_layout_is_converted(tmp_path):
    torch.manual_seed(4)
    source = create_model("segformer_mitb0", 3).eval()
    nvlabs = {}
    for key, value in source.state_dict().items():
        for stage in range(4):  # NVlabs names stages c1..c4
            key = key.replace(f"decode_head.linear_c.{stage}.", f"decode_head.linear_c{stage + 1}.")
        nvlabs[key] = value
    # NVlabs fuses torch.cat([_c4, _c3, _c2, _c1]): reverse the four input blocks of 256 channels.
    fuse = nvlabs["decode_head.linear_fuse.conv.weight"]
    nvlabs["decode_head.linear_fuse.conv.weight"] = torch.cat(fuse.split(256, dim=1)[::-1], dim=1)
    # mmseg's BaseDecodeHead builds an unused conv_seg (channels=128 in the released config).
    nvlabs["decode_head.conv_seg.weight"] = torch.zeros(3, 128, 1, 1)
    nvlabs["decode_head.conv_seg.bias"] = torch.zeros(3)
    torch.save({"state_dict": nvlabs}, tmp_path / "segformer.b0.pth")
    model = empty_model("segformer_mitb0", 3).eval()
    report = load_checkpoint(model, tmp_path / "segformer.b0.pth")
    assert report.dropped == ["decode_head.conv_seg.bias", "decode_head.conv_seg.weight"]
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images))


def test_mit_imagenet_weights_load_into_backbone_and_drop_head(tmp_path):
    torch.manual_seed(5)
    source = create_model("segformer_mitb0", 19)
    # mit_b0.pth layout: encoder keys without prefix, plus a 1000-class classification head.
    imagenet = dict(source.backbone.state_dict())
    imagenet["head.weight"] = torch.zeros(1000, 256)
    imagenet["head.bias"] = torch.zeros(1000)
    torch.save(imagenet, tmp_path / "mit_b0.pth")
    model = create_model("daformer_mitb0", 19)
    head_before = model.decode_head.conv_seg.weight.clone()
    report = load_pretrained_backbone(model, tmp_path / "mit_b0.pth")
    assert report.dropped == ["head.bias", "head.weight"]
    assert report.missing == [] and report.unexpected == []
    assert_weights_equal(model.backbone, source.backbone)
    assert torch.equal(model.decode_head.conv_seg.weight, head_before)
    del imagenet["norm4.weight"]
    torch.save(imagenet, tmp_path / "mit_b0_cut.pth")
    with pytest.raises(BLDAError, match="missing in the checkpoint: norm4.weight"):
        load_pretrained_backbone(create_model("daformer_mitb0", 19), tmp_path / "mit_b0_cut.pth")


# --------------------------------------------------------------------------- load_model


def test_load_model_builds_and_loads_registered_arch(tmp_path):
    student, teacher = tiny_pair()
    save_uda_checkpoint(tmp_path / "uda.pth", student, teacher)
    model = load_model("tiny", 4, checkpoint=tmp_path / "uda.pth", weights="teacher")
    assert_weights_equal(model, teacher)


def test_torchscript_model_loads_and_gives_the_same_logits(tmp_path):
    student, _ = tiny_pair()
    student.eval()
    images = torch.randn(1, 3, 32, 48)
    torch.jit.trace(student, images).save(str(tmp_path / "tiny.pt"))
    model = load_model("torchscript", 4, checkpoint=tmp_path / "tiny.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(images), student(images))
    torch.save(student.state_dict(), tmp_path / "state.pth")
    with pytest.raises(BLDAError, match="state.pth: not a TorchScript archive"):
        load_model("torchscript", 4, checkpoint=tmp_path / "state.pth")
    with pytest.raises(BLDAError, match="needs --checkpoint"):
        load_model("torchscript", 4)


PLUGIN_SOURCE = textwrap.dedent(
    """
    import torch

    def with_classes(num_classes):
        return torch.nn.Conv2d(3, num_classes, 1)

    def without_classes():
        return torch.nn.Conv2d(3, 2, 1)

    def not_a_model(num_classes):
        return "model"

    NOT_CALLABLE = 3
    """
)


def test_plugin_factories_and_their_errors(tmp_path, monkeypatch):
    (tmp_path / "blda_test_plugin.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("blda_test_plugin:with_classes", 6)
    assert isinstance(model, torch.nn.Conv2d) and model.out_channels == 6
    assert load_model("blda_test_plugin:without_classes", 6).out_channels == 2
    torch.manual_seed(6)
    reference = torch.nn.Conv2d(3, 6, 1)
    torch.save(reference.state_dict(), tmp_path / "plugin.pth")
    loaded = load_model("blda_test_plugin:with_classes", 6, checkpoint=tmp_path / "plugin.pth")
    assert_weights_equal(loaded, reference)
    with pytest.raises(BLDAError, match="cannot import module 'no_such_blda_module'"):
        load_model("no_such_blda_module:factory", 6)
    with pytest.raises(BLDAError, match="no callable 'NOT_CALLABLE'"):
        load_model("blda_test_plugin:NOT_CALLABLE", 6)
    with pytest.raises(BLDAError, match="no callable 'missing'"):
        load_model("blda_test_plugin:missing", 6)
    with pytest.raises(BLDAError, match="returned str, expected a torch nn.Module"):
        load_model("blda_test_plugin:not_a_model", 6)
