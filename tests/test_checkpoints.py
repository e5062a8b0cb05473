"""Checkpoint loading: UDA and plain layouts, refusals with named keys, weights_only,
foreign layouts (NVlabs SegFormer, MiT ImageNet weights), TorchScript files and plugins.

Truths used: the weights of models we save ourselves and the key names of the released
checkpoints (see test_models.py).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_models import empty_model, manifest_shapes

from blda_tools.errors import BLDAError
from blda_tools.models import (
    create_model,
    load_checkpoint,
    load_model,
    load_pretrained_backbone,
)

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


def test_a_training_weight_file_that_does_not_fit_is_named_by_its_config_key(tmp_path):
    # train's model.pretrained / model.backbone_weights were named "--checkpoint", with advice
    # about dump-logits' --weights, which train does not have
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    for load, option in ((load_checkpoint, "model.pretrained"),
                         (load_pretrained_backbone, "model.backbone_weights")):  # fmt: skip
        with pytest.raises(BLDAError) as error:
            load(create_model("daformer_mitb0", 19), tmp_path / "other.pth", option=option)
        message = str(error.value)
        assert message.startswith(f"{option} {tmp_path / 'other.pth'}: does not fit"), message
        assert "--weights" not in message and "--checkpoint" not in message


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


def test_load_model_returns_eval_mode_and_its_docstring_example_runs(tmp_path):
    import doctest

    from blda_tools.models import loading

    student, teacher = tiny_pair()
    save_uda_checkpoint(tmp_path / "uda.pth", student, teacher)
    loaded = load_model("tiny", 4, checkpoint=tmp_path / "uda.pth")
    assert not any(module.training for module in loaded.modules())
    finder = doctest.DocTestFinder()
    (example,) = [test for test in finder.find(loading) if test.name.endswith(".load_model")]
    assert example.examples, "load_model's docstring has an example"
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(example)
    assert result.failed == 0 and result.attempted == len(example.examples)


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


def test_a_training_run_s_weight_file_is_named_by_its_config_key(tmp_path):
    from blda_tools.models import create_model
    from blda_tools.models.checkpoints import load_checkpoint, load_pretrained_backbone

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    model = create_model("tiny", 3)
    with pytest.raises(BLDAError, match=rf"^model\.pretrained {text}: "):
        load_checkpoint(model, text, option="model.pretrained")
    with pytest.raises(BLDAError, match=rf"^model\.backbone_weights {text}: "):
        load_pretrained_backbone(model, text, option="model.backbone_weights")
    with pytest.raises(BLDAError, match=rf"^--checkpoint {text}: "):
        load_checkpoint(model, text)
