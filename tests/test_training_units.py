"""Building blocks of `blda train` against hand-worked cases, closed forms and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score, recall_score
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.training.augment import (
    blur_kernel_size,
    class_mix_mask,
    color_jitter,
    fit_size,
    gaussian_blur,
    weak_augment,
)
from blda_tools.training.checkpoint import capture_rng_state, restore_rng_state
from blda_tools.training.evaluate import (
    confusion_matrix,
    scores_from_confusion,
)
from blda_tools.training.feature_distance import ImageNetFeatureDistance, downscale_label_ratio
from blda_tools.training.optim import WarmupPolySchedule, parameter_groups, warmup_poly_factor
from blda_tools.training.sampling import RareClassSampler, rcs_class_probabilities
from blda_tools.training.self_training import (
    ema_alpha,
    make_teacher,
    mixed_batch,
    pseudo_labels,
    update_teacher,
)

# --------------------------------------------------------------------------- EMA teacher


def test_ema_alpha_follows_daformer_ramp():
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(3, 0.999) == 0.75
    assert ema_alpha(999, 0.999) == 0.999  # 1 - 1/1000 equals the cap
    assert ema_alpha(5000, 0.999) == 0.999


def test_update_teacher_hand_computed():
    student = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        teacher[0].weight.fill_(1.0)
        student[0].weight.fill_(3.0)
        teacher[1].running_mean.fill_(0.0)
        student[1].running_mean.fill_(4.0)
        student[1].num_batches_tracked.fill_(7)
    assert update_teacher(teacher, student, iteration=1, alpha=0.999) == 0.5
    assert torch.equal(teacher[0].weight, torch.full((1, 2), 2.0))  # 0.5 * 1 + 0.5 * 3
    assert torch.equal(teacher[1].running_mean, torch.full((1,), 2.0))
    assert teacher[1].num_batches_tracked.item() == 7  # integer buffers are copied
    update_teacher(teacher, student, iteration=3, alpha=0.999)  # alpha 0.75
    assert torch.allclose(teacher[0].weight, torch.full((1, 2), 0.75 * 2 + 0.25 * 3))


# --------------------------------------------------------------------------- pseudo-labels


def test_pseudo_label_weight_is_confident_fraction_with_row_crop():
    # Two classes; logit gap 5 gives p = 1 / (1 + e^-5) = 0.9933 >= 0.968, gap 1 gives 0.731.
    gap = torch.ones(2, 4, 4)
    gap[0].view(-1)[:6] = 5.0  # image 0: 6 of 16 pixels confident
    gap[1] = 5.0  # image 1: all confident
    gap[0, 0, 0] = -5.0  # confident class 1
    logits = torch.stack([gap, torch.zeros(2, 4, 4)], dim=1)
    crop = dict(ignore_top_rows=1, ignore_bottom_rows=1)
    labels, weights = pseudo_labels(logits, (4, 4), 0.968, pooling="image", **crop)
    expected_labels = torch.zeros(2, 4, 4, dtype=torch.long)
    expected_labels[0, 0, 0] = 1
    assert torch.equal(labels, expected_labels)
    assert torch.allclose(weights[0, 1:3], torch.full((2, 4), 6 / 16))
    assert torch.allclose(weights[1, 1:3], torch.ones(2, 4))
    assert torch.equal(weights[:, 0], torch.zeros(2, 4))
    assert torch.equal(weights[:, 3], torch.zeros(2, 4))
    # DAFormer's default: one weight for the whole batch, (6 + 16) of 32 pixels confident
    labels, pooled = pseudo_labels(logits, (4, 4), 0.968, **crop)
    assert torch.allclose(pooled[:, 1:3], torch.full((2, 2, 4), 22 / 32))
    assert torch.equal(pooled[:, 0], torch.zeros(2, 4))
    with pytest.raises(BLDAError, match="pooling"):
        pseudo_labels(logits, (4, 4), 0.968, pooling="pixel")


def test_pseudo_labels_upsample_teacher_logits():
    logits = torch.tensor([[[[10.0]], [[0.0]]]])  # one pixel, class 0 sure
    labels, weights = pseudo_labels(logits, (3, 5), 0.968)
    assert labels.shape == (1, 3, 5) and torch.equal(labels, torch.zeros(1, 3, 5, dtype=torch.long))
    assert torch.equal(weights, torch.ones(1, 3, 5))


# --------------------------------------------------------------------------- ClassMix


@pytest.mark.parametrize(
    ("classes", "expected_count"), [((0, 2, 5), 2), ((1, 3, 4, 7), 2), ((6,), 1), ((), 0)]
)
def test_class_mix_mask_pastes_ceil_half_of_the_classes(classes, expected_count):
    label = torch.full((6, 8), 255)
    for index, class_id in enumerate(classes):
        label[:, index * 2 : index * 2 + 2] = class_id
    for seed in range(20):
        mask = class_mix_mask(label, torch.Generator().manual_seed(seed))
        chosen = set(torch.unique(label[mask]).tolist())
        assert len(chosen) == expected_count and chosen <= set(classes)
        # A class is pasted whole or not at all; ignored pixels never.
        assert torch.equal(mask, torch.isin(label, torch.tensor(sorted(chosen), dtype=torch.long)))


def test_mixed_batch_labels_weights_and_images():
    source_labels = torch.tensor([[[0, 0, 1, 1]]])
    source_images = torch.full((1, 3, 1, 4), 200.0)
    target_images = torch.full((1, 3, 1, 4), 10.0)
    pseudo = torch.tensor([[[2, 2, 2, 2]]])
    pseudo_weight = torch.full((1, 1, 4), 0.3)
    generator = torch.Generator().manual_seed(0)
    # jitter probability 1.0: a uniform draw never exceeds it, so images stay as mixed
    images, labels, weights = mixed_batch(
        source_images, source_labels, target_images, pseudo, pseudo_weight, [generator],
        jitter_strength=0.2, jitter_probability=1.0, blur=False,
    )  # fmt: skip
    pasted = labels != 2
    assert pasted.sum() == 2  # one of the two classes, i.e. two pixels
    assert torch.equal(weights[pasted], torch.ones(2))
    assert torch.allclose(weights[~pasted], torch.full((2,), 0.3))
    row = images[0, :, 0]  # (3, 4)
    assert torch.equal(row[:, pasted[0, 0]], torch.full((3, 2), 200.0))
    assert torch.equal(row[:, ~pasted[0, 0]], torch.full((3, 2), 10.0))


def test_blur_kernel_size_matches_dacs_formula():
    # DACS: floor(ceil(0.1 n) - 0.5 + ceil(0.1 n) % 2)
    for n in (8, 64, 128, 500, 512, 1024):
        c = math.ceil(0.1 * n)
        assert blur_kernel_size(n) == math.floor(c - 0.5 + c % 2)


def test_blur_keeps_constant_images_and_jitter_keeps_gray_when_only_hue_saturation():
    image = torch.full((3, 32, 32), 90.0)
    for seed in range(6):
        assert torch.allclose(gaussian_blur(image, torch.Generator().manual_seed(seed)), image)
    # With strength 0 every factor is 1 and the hue turn 0: jitter is the identity.
    colourful = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255
    out = color_jitter(colourful, 0.0, 0.0, torch.Generator().manual_seed(2))
    assert torch.allclose(out, colourful, atol=1e-3)


# --------------------------------------------------------------------------- weak augmentation


def test_fit_size_is_mmseg_keep_ratio():
    # scale = min(720 / 1052, 1280 / 1914) = 0.668757; 1052 * 0.668757 = 703.53 -> 704 (rounded)
    assert fit_size(1052, 1914, [720, 1280]) == (704, 1280)
    assert fit_size(1024, 2048, [512, 1024]) == (512, 1024)


def test_weak_augment_keeps_image_and_label_aligned_and_pads():
    # Colour channel 0 encodes the label, so any misalignment would show.
    label = torch.randint(0, 4, (20, 30), generator=torch.Generator().manual_seed(0))
    image = torch.stack([label * 50, label * 0, label * 0]).to(torch.uint8)
    flips = 0
    for seed in range(10):
        # No rescale (bilinear images vs nearest labels differ at edges); crop taller than
        # the image, so rows are padded.
        image_crop, label_crop = weak_augment(
            image, label, torch.Generator().manual_seed(seed), base_size=[20, 30],
            scale_range=[1.0, 1.0], crop_size=[24, 16], flip=True,
        )  # fmt: skip
        assert image_crop.shape == (3, 24, 16) and label_crop.shape == (24, 16)
        valid = label_crop != 255
        assert valid[:20].all() and not valid[20:].any()
        assert torch.equal(image_crop[0][valid], (label_crop[valid] * 50).float())
        assert torch.all(image_crop[:, ~valid] == 0)  # padding
        # the crop is a window of the label, mirrored or not
        windows = label.unfold(1, 16, 1).permute(1, 0, 2)  # (15, 20, 16)
        direct = (windows == label_crop[:20]).flatten(1).all(1).any()
        mirrored = (windows == label_crop[:20].flip(-1)).flatten(1).all(1).any()
        assert direct or mirrored
        flips += int(mirrored and not direct)
    assert 0 < flips < 10
    rescaled, rescaled_label = weak_augment(
        image, label, torch.Generator().manual_seed(0), base_size=[20, 30],
        scale_range=[0.5, 2.0], crop_size=[16, 24], flip=True,
    )  # fmt: skip
    assert rescaled.shape == (3, 16, 24) and rescaled_label.shape == (16, 24)


# --------------------------------------------------------------------------- Rare Class Sampling


def test_rcs_probabilities_hand_computed():
    totals = torch.tensor([600, 0, 300, 100])
    classes, probabilities = rcs_class_probabilities(totals, temperature=0.1)
    assert classes.tolist() == [0, 2, 3]  # never-seen class 1 is not sampled
    logits = [(1 - 0.6) / 0.1, (1 - 0.3) / 0.1, (1 - 0.1) / 0.1]
    expected = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
    assert torch.allclose(probabilities, torch.tensor(expected, dtype=torch.float64))


def test_rare_class_sampler_eligibility_and_frequencies():
    counts = torch.tensor([[500, 0, 10], [100, 50, 0], [0, 5, 40]])
    sampler = RareClassSampler(counts, temperature=0.5, min_pixels=30, min_crop_ratio=0.5)
    assert sampler.images_with_class[0].tolist() == [0, 1]  # strictly more than 30 pixels
    assert sampler.images_with_class[1].tolist() == [1]
    assert sampler.images_with_class[2].tolist() == [2]
    assert sampler.min_crop_pixels == 15
    generator = torch.Generator().manual_seed(0)
    draws = [sampler.sample(generator) for _ in range(3000)]
    observed = np.bincount([c for c, _ in draws], minlength=3)
    assert chisquare(observed, sampler.probabilities.numpy() * len(draws)).pvalue > 1e-3
    assert all(i in sampler.images_with_class[c].tolist() for c, i in draws)


def test_rare_class_sampler_refuses_a_class_without_eligible_image():
    counts = torch.tensor([[500, 3], [100, 2]])
    with pytest.raises(BLDAError, match="rcs.min_pixels.*'b'"):
        RareClassSampler(
            counts, temperature=0.01, min_pixels=10, min_crop_ratio=0.5, class_names=("a", "b")
        )


# --------------------------------------------------------------------------- optimizer


class _ModelWithNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict(
            {"conv": nn.Conv2d(3, 4, 3), "bn1": nn.BatchNorm2d(4), "pos_block": nn.Conv2d(4, 4, 1)}
        )
        self.decode_head = nn.ModuleDict({"conv_seg": nn.Conv2d(4, 2, 1), "ln": nn.LayerNorm(4)})


def test_parameter_groups_head_lr_and_no_decay():
    model = _ModelWithNames()
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.01, head_lr_mult=10.0)
    by_param = {id(p): g for g in groups for p in g["params"]}
    expected = {  # name: (lr, weight decay)
        "backbone.conv.weight": (1e-4, 0.01),
        "backbone.conv.bias": (1e-4, 0.01),
        "backbone.bn1.weight": (1e-4, 0.0),  # a norm layer, though not named "norm"
        "backbone.bn1.bias": (1e-4, 0.0),
        "backbone.pos_block.weight": (1e-4, 0.0),
        "backbone.pos_block.bias": (1e-4, 0.0),
        "decode_head.conv_seg.weight": (1e-3, 0.01),
        "decode_head.conv_seg.bias": (1e-3, 0.01),
        "decode_head.ln.weight": (1e-3, 0.0),
        "decode_head.ln.bias": (1e-3, 0.0),
    }
    names = dict(model.named_parameters())
    assert set(names) == set(expected)
    for name, (lr, decay) in expected.items():
        group = by_param[id(names[name])]
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == decay, name


@settings(max_examples=40, deadline=None)
@given(
    iteration=st.integers(0, 999),
    warmup=st.integers(1, 500),
    ratio=st.floats(1e-6, 1.0),
    power=st.floats(0.5, 2.0),
)
def test_warmup_poly_closed_form(iteration, warmup, ratio, power):
    lr = warmup_poly_factor(
        iteration, 1000, warmup_iters=warmup, warmup_ratio=ratio, power=power, base_lr=6e-5
    )
    poly = 6e-5 * (1 - iteration / 1000) ** power
    if iteration < warmup:
        # linear from ratio * poly at 0 to poly at the end of the warm-up
        poly *= ratio + (1 - ratio) * iteration / warmup
    assert lr == pytest.approx(poly, rel=1e-9, abs=1e-18)


def test_schedule_sets_group_lrs_and_round_trips():
    class Settings:
        warmup_iters, warmup_ratio, poly_power, min_lr = 10, 1e-6, 1.0, 0.0

    model = _ModelWithNames()
    optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-4, weight_decay=0.01))
    schedule = WarmupPolySchedule(optimizer, 100, Settings)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 1e-6)
    for _ in range(10):
        schedule.step()
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert lrs == pytest.approx([1e-4 * 0.9, 1e-3 * 0.9])
    other = WarmupPolySchedule(optimizer, 100, Settings)
    other.load_state_dict(schedule.state_dict())
    assert other.iteration == 10


# --------------------------------------------------------------------------- evaluation


def test_scores_match_scikit_learn():
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 4, 500)
    predictions = np.where(generator.random(500) < 0.6, labels, generator.integers(0, 4, 500))
    labels[:20] = 255
    confusion = confusion_matrix(torch.from_numpy(predictions), torch.from_numpy(labels), 4)
    keep = labels != 255
    assert np.array_equal(
        confusion.numpy(), sk_confusion(labels[keep], predictions[keep], labels=range(4))
    )
    scores = scores_from_confusion(confusion, ("a", "b", "c", "d"))
    iou = 100 * jaccard_score(labels[keep], predictions[keep], average=None)
    recall = 100 * recall_score(labels[keep], predictions[keep], average=None)
    assert list(scores["per_class_iou"].values()) == pytest.approx(list(iou))
    assert scores["mIoU"] == pytest.approx(iou.mean())
    assert scores["iou_std"] == pytest.approx(iou.std())
    assert scores["mAcc"] == pytest.approx(recall.mean())
    subset = scores_from_confusion(confusion, ("a", "b", "c", "d"), classes=[0, 2])
    assert subset["mIoU"] == pytest.approx(iou[[0, 2]].mean())


# --------------------------------------------------------------------------- feature distance


def test_downscale_label_ratio_hand_case():
    labels = torch.tensor([[[1, 1, 2, 2], [1, 0, 2, 2], [255, 255, 3, 0], [255, 3, 3, 0]]])
    cells = downscale_label_ratio(labels, 2, min_ratio=0.75, num_classes=4)
    # top-left: 3/4 class 1 -> 1; top-right: all 2; bottom-left: 3/4 ignore -> 255;
    # bottom-right: 3 twice, 0 twice (1/2 < 0.75) -> 255
    assert cells.tolist() == [[[1, 2], [255, 255]]]


def test_feature_distance_hand_case():
    class ZeroEncoder(nn.Module):
        def forward(self, images):
            return [torch.zeros(images.shape[0], 2, 2, 2)]

    imagenet_model = nn.Module()
    imagenet_model.backbone = ZeroEncoder()
    distance = ImageNetFeatureDistance(
        imagenet_model, weight=0.5, classes=[1], scale_min_ratio=0.75, num_classes=3
    )
    student = torch.zeros(1, 2, 2, 2)
    student[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 on the thing cell
    student[0, :, 1, 1] = torch.tensor([30.0, 40.0])  # large, but a stuff cell: not counted
    labels = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, 0, 0], [2, 2, 0, 0]]])
    images = torch.zeros(1, 3, 4, 4)
    assert distance(student, images, labels).item() == pytest.approx(0.5 * 5.0)
    no_things = torch.zeros(1, 4, 4, dtype=torch.long)
    assert distance(student, images, no_things).item() == 0.0


# --------------------------------------------------------------------------- RNG states


def test_rng_state_round_trip():
    import random

    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected  # noqa: NPY002
