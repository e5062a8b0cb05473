"""HRDA training in `blda train`: detail boxes, their alignment with the context, the fused and
detail losses, pseudo-label margins, bad input, exact resume of the shipped CPU config.

Truths: the box rule of HRDA's `get_crop_bbox` worked by hand; a pointwise model whose
logits at stride 4 are known at every pixel (so an aligned detail crop must reproduce them);
cross-entropy written out with log-softmax; masks written by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_training_loop import BandsDataset, normalize, small_config
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.models.hrda import HRDAHead, HRDASegmentor
from blda_tools.training import load_config, run_training
from blda_tools.training.batches import TrainingBatches, pseudo_margin_mask
from blda_tools.training.hrda_step import HRDAStep, detail_box
from blda_tools.training.loop import Trainer, TrainingComponents
from blda_tools.training.losses import WeightedCrossEntropy

CLASSES = ("road", "car", "sky")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PointwiseEncoder(nn.Module):
    """Features at stride 4: the 4 x 4 mean of the image (and a learnable scale)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return [F.avg_pool2d(x, 4) * self.scale]


class PointwiseHead(nn.Module):
    def __init__(self, classes: int, bias: float = 0.0):
        super().__init__()
        self.conv_seg = nn.Conv2d(3, classes, 1)
        nn.init.constant_(self.conv_seg.bias, bias)

    def forward_with_features(self, features):
        return self.conv_seg(features[-1]), features[-1]

    def forward(self, features):
        return self.forward_with_features(features)[0]


def pointwise_hrda(attention_bias: float = 0.0, detail=(16, 16)) -> HRDASegmentor:
    torch.manual_seed(0)
    head = HRDAHead(PointwiseHead(3), PointwiseHead(3, attention_bias), 3)
    return HRDASegmentor(PointwiseEncoder(), head, detail_crop=detail)


def hrda_config(*overrides: str):
    return small_config(
        "augment.crop_size=[24, 24]",
        "hrda.detail_crop_size=[16, 16]",
        "evaluation.crop_size=[24, 24]",
        "evaluation.stride=[8, 8]",
        "self_training.ignore_top_rows=0",
        "self_training.ignore_bottom_rows=0",
        *overrides,
    )


def hrda_parts(model=None) -> TrainingComponents:
    return TrainingComponents(
        model=pointwise_hrda() if model is None else model,
        source=BandsDataset(8),
        target=BandsDataset(8, shift=40, seed=1, labels=False),
        val=BandsDataset(3, shift=40, seed=2),
        class_names=CLASSES,
        loss=WeightedCrossEntropy(),
        normalize=normalize,
    )


# ----------------------------------------------------------------------------- detail boxes


def test_detail_box_offsets_are_the_multiples_of_8_get_crop_bbox_allows():
    # get_crop_bbox: randint(0, (margin + 1) // 8) * 8. Crop 32, detail 16: margin 16, two
    # choices {0, 8} (16 itself is never drawn); crop 1024, detail 512: {0, 8, ..., 504}.
    generator = torch.Generator().manual_seed(0)
    small = {detail_box((32, 40), (16, 16), 8, generator)[:2] for _ in range(400)}
    assert {top for top, _ in small} == {0, 8}
    assert {left for _, left in small} == {0, 8, 16}  # margin 24: (24 + 1) // 8 = 3 choices
    large = [detail_box((1024, 1024), (512, 512), 8, generator) for _ in range(3000)]
    tops = {box[0] for box in large}
    assert tops == set(range(0, 505, 8))
    assert all(box[2:] == (512, 512) for box in large)
    assert detail_box((16, 16), (16, 16), 8, generator) == (0, 0, 16, 16)  # no margin


def test_one_box_per_pass_a_new_one_for_each_pass_and_the_same_after_resume():
    step = HRDAStep((64, 64), (32, 32), 8, 0.1, seed=3)
    boxes = {domain: step.box(10, domain) for domain in ("source", "mixed", "masked")}
    again = HRDAStep((64, 64), (32, 32), 8, 0.1, seed=3)
    assert {domain: again.box(10, domain) for domain in boxes} == boxes
    draws = {step.box(index, "source") for index in range(0, 200, 2)}
    assert len(draws) > 10  # the box changes from micro-batch to micro-batch


def test_detail_logits_align_with_the_context_and_the_attention_is_masked_to_the_box():
    # A pointwise model: the logits at stride 4 of any crop are those of the whole image at
    # the same places. With the attention forced to 1 inside the box, the fused logits in the
    # box's interior are the detail logits of the full-resolution image; far from the box the
    # attention is 0 and the fused logits are the upsampled context logits.
    model = pointwise_hrda(attention_bias=40.0).train()
    images = torch.randn(2, 3, 48, 64)
    box = (16, 24, 16, 16)  # top, left, height, width
    fused, detail, _, _, encoder = model.forward_train(images, box)
    head = model.decode_head.head
    full = head(model.backbone(images))  # (2, 3, 12, 16) at stride 4
    torch.testing.assert_close(detail, full[:, :, 4:8, 6:10])
    assert fused.shape == (2, 3, 12, 16)
    # box / 8 on the context: rows 2-3, columns 3-4; the upsampled attention is exactly 1 in
    # the fused cells whose bilinear taps all fall inside: rows 5-6, columns 7-8.
    torch.testing.assert_close(fused[:, :, 5:7, 7:9], full[:, :, 5:7, 7:9])
    context = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    low = F.interpolate(
        head(model.backbone(context)), scale_factor=2.0, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(fused[:, :, :2], low[:, :, :2])
    torch.testing.assert_close(fused[:, :, :, 12:], low[:, :, :, 12:])
    assert encoder.shape == (2, 3, 6, 8)  # the context's features: feature distance at 0.5


def test_fused_and_detail_losses_equal_a_direct_computation(tmp_path):
    config = hrda_config("augment.crop_size=[32, 32]")
    trainer = Trainer(config, tmp_path, hrda_parts(), device=torch.device("cpu"))
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32))
    labels[0, :3] = 255
    weights = torch.rand(2, 32, 32)
    # A micro-batch whose box is not at the origin (offsets 0 or 8 per axis here).
    first = next(i for i in range(0, 100, 2) if min(trainer.hrda.box(i, "mixed")[:2]) == 8)
    trainer._first_sample = first
    loss, encoder = trainer._segmentation_loss(images, labels, weights, "mixed")
    top, left, height, width = trainer.hrda.box(first, "mixed")
    assert (height, width) == (16, 16) and (top, left) == (8, 8)
    fused, detail, *_ = trainer.model.forward_train(images, (top, left, height, width))

    def cross_entropy(logits, target, pixel_weights):
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        log_p = torch.log_softmax(logits, dim=1)
        valid = target != 255
        picked = log_p.gather(1, target.clamp(max=2)[:, None])[:, 0]
        return (-(picked * valid) * pixel_weights).sum() / target.numel()  # mmseg: all pixels

    rows, columns = slice(top, top + height), slice(left, left + width)
    expected = 0.9 * cross_entropy(fused, labels, weights) + 0.1 * cross_entropy(
        detail, labels[:, rows, columns], weights[:, rows, columns]
    )
    torch.testing.assert_close(loss, expected)
    assert encoder.shape == (2, 3, 4, 4)


def test_blda_statistics_are_updated_once_per_pass_from_the_fused_logits(tmp_path):
    from blda_tools.training import build_loss

    config = hrda_config("loss.name=blda", "loss.blda_min_samples=5", "loss.blda_mode=ola")
    parts = hrda_parts()
    parts.loss = build_loss("blda", num_classes=3, ignore_index=255, config=config)
    trainer = Trainer(config, tmp_path, parts, device=torch.device("cpu"))
    labels = torch.randint(0, 3, (2, 24, 24))
    trainer._segmentation_loss(torch.randn(2, 3, 24, 24), labels, None, "source")
    assert int(trainer.loss.blda.iteration) == 1  # the detail term read, did not update


# ----------------------------------------------------------------------------- margins


def test_pseudo_margin_mask_by_hand():
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(pseudo_margin_mask((6, 8), [1, 2, 1, 3]), expected)
    assert torch.equal(pseudo_margin_mask((3, 4), [0, 0, 0, 0]), torch.ones(3, 4).long())


class PositionDataset(BandsDataset):
    """Target frames whose red channel is the row and green channel the column index."""

    def __init__(self, count):
        super().__init__(count, labels=False)
        rows = torch.arange(24).view(24, 1).expand(24, 32)
        columns = torch.arange(32).view(1, 32).expand(24, 32)
        image = torch.stack([rows, columns, torch.zeros_like(rows)]).to(torch.uint8)
        self.samples = [type(s)(image, None, s.name) for s in self.samples]


def test_margins_are_masked_on_the_full_frame_and_cropped_and_flipped_with_the_image():
    margins = "self_training.crop_pseudo_margins=[3, 5, 2, 4]"
    overrides = ["augment.scale_range=[1.0, 1.0]", "augment.crop_size=[16, 16]"]
    with_margins = small_config(margins, *overrides)
    batches = TrainingBatches(BandsDataset(4), PositionDataset(4), with_margins)
    plain = TrainingBatches(BandsDataset(4), PositionDataset(4), small_config(*overrides))
    seen_flip = False
    for step in range(12):
        batch = batches[step]
        # The mask does not change the crops.
        assert torch.equal(batch.target_images, plain[step].target_images)
        rows, columns = batch.target_images[:, 0], batch.target_images[:, 1]
        inside = (rows >= 3) & (rows < 24 - 5) & (columns >= 2) & (columns < 32 - 4)
        assert torch.equal(batch.target_valid, inside.float())
        seen_flip |= bool((columns[:, 0, 0] > columns[:, 0, -1]).any())
    assert seen_flip
    assert plain[0].target_valid is None


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["augment.crop_size=[20, 24]"], "augment.crop_size"),
        (["hrda.detail_crop_size=[32, 16]"], "hrda.detail_crop_size"),
        (["hrda.detail_crop_size=[14, 16]"], "hrda.detail_crop_size"),
        (["hrda.crop_coord_divisible=6"], "hrda.crop_coord_divisible"),
    ],
)
def test_crops_hrda_cannot_align_are_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(BLDAError, match=key.replace(".", r"\.")):
        Trainer(hrda_config(*overrides), tmp_path, hrda_parts(), device=torch.device("cpu"))


def test_hrda_keys_on_a_model_that_is_not_hrda_are_refused(tmp_path):
    from test_training_loop import components

    config = small_config("hrda.detail_crop_size=[8, 8]")
    with pytest.raises(BLDAError, match=r"hrda\.detail_crop_size set but model\.arch"):
        Trainer(config, tmp_path, components(), device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("self_training.crop_pseudo_margins=[30, 240, 30]", "self_training.crop_pseudo_margins"),
        ("self_training.crop_pseudo_margins=[1, 1, -1, 1]", "self_training.crop_pseudo_margins"),
        ("hrda.detail_loss_weight=1.0", "hrda.detail_loss_weight"),
        ("hrda.crop_coord_divisible=0", "hrda.crop_coord_divisible"),
        ("hrda.detail_crop_size=[0, 16]", "hrda.detail_crop_size"),
    ],
)
def test_hrda_values_out_of_range_are_refused(override, key):
    with pytest.raises(BLDAError, match=key.replace(".", r"\.")):
        load_config(None, [override])


# ----------------------------------------------------------------------------- end to end


def _synthcity_overrides(root):
    return [
        f'data.root="{root}"', "run.iterations=6", "run.num_workers=0", "run.live=false",
        "run.checkpoint_interval=100", "augment.crop_size=[64, 64]",
        "hrda.detail_crop_size=[32, 32]", "data.source_size=[64, 128]",
        "data.target_size=[64, 128]", "rcs.min_pixels=0", "evaluation.crop_size=[64, 64]",
        "evaluation.stride=[32, 32]", "evaluation.interval=0", "evaluation.max_images=2",
        "loss.blda_plot_interval=0",
    ]  # fmt: skip


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_synthcity_tiny_mic_hrda_blda_resumes_exactly(tmp_path):
    from blda_tools.datasets.synthcity.generate import make_synthcity
    from blda_tools.models import create_model, load_checkpoint
    from blda_tools.training import train

    make_synthcity(tmp_path / "synthcity", images=6, size=(64, 128), seed=0)
    overrides = _synthcity_overrides(tmp_path / "synthcity")
    config = "synthcity_tiny_mic_hrda_blda"
    train(config, tmp_path / "whole", overrides)
    train(config, tmp_path / "split", overrides, stop_at=3)
    train(config, tmp_path / "split", overrides, resume=True)
    whole, split = (
        torch.load(tmp_path / name / "checkpoints" / "latest.pth", weights_only=True)
        for name in ("whole", "split")
    )
    assert whole["meta"]["iteration"] == split["meta"]["iteration"] == 6
    assert whole["meta"]["arch"] == "hrda_tiny"
    assert whole["state_dict"].keys() == split["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key
    assert _same(whole["loss"], split["loss"])  # the GMMs, anchors and counters
    assert any(k.startswith("regression_head.") for k in whole["state_dict"])
    # The student and the teacher load as the registered architecture.
    for part in ("student", "teacher"):
        model = create_model("hrda_tiny", 19)
        load_checkpoint(model, tmp_path / "whole" / "checkpoints" / "latest.pth", weights=part)


def test_hrda_run_fits_run_training_with_cross_entropy(tmp_path):
    # The shipped HRDA config without BLDA trains through run_training on the bands data.
    config = hrda_config("run.iterations=2")
    summary = run_training(config, tmp_path, hrda_parts())
    assert summary["iteration"] == 2 and summary["last_scores"] is not None


def test_the_mixed_pass_trains_with_zero_weight_on_the_margins(tmp_path):
    from test_training_loop import components

    class RecordingLoss(WeightedCrossEntropy):
        def __call__(self, logits, labels, weights, domain, features=None):
            if domain == "mixed":
                self.weights = weights
            return super().__call__(logits, labels, weights, domain, features)

    config = small_config(
        "self_training.crop_pseudo_margins=[4, 6, 3, 5]",
        "self_training.mix=none",
        "self_training.ignore_top_rows=0",
        "self_training.ignore_bottom_rows=0",
        "self_training.pseudo_threshold=0.0",  # every pixel confident: quality weight 1
        "augment.scale_range=[1.0, 1.0]",  # no resize: the position colours stay exact
    )
    parts = components(loss=RecordingLoss())
    parts.target = PositionDataset(4)
    trainer = Trainer(config, tmp_path, parts, device=torch.device("cpu"))
    batch = trainer.batches[0]
    trainer.micro_step(batch)
    rows, columns = batch.target_images[:, 0], batch.target_images[:, 1]
    inside = (rows >= 4) & (rows < 24 - 6) & (columns >= 3) & (columns < 32 - 5)
    assert torch.equal(trainer.loss.weights, inside.float())
