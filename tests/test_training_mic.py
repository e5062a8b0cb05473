"""MIC in `blda train`: block masks (shape, block size, ratio, seeding), masked pixels, the
masked pass's loss and labels, BLDA statistics untouched by it, bad input.

Truths: the mask rule of MIC's BlockMaskGenerator written out by hand; binomial bounds on
the kept share; cross-entropy written with log-softmax; image x mask computed in the test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_training_loop import components, normalize, small_config

from blda_tools.errors import BLDAError
from blda_tools.training import build_loss, load_config
from blda_tools.training.config_schema import MICConfig
from blda_tools.training.loop import Trainer
from blda_tools.training.losses import WeightedCrossEntropy
from blda_tools.training.masking import STREAM_MASK, block_mask, masked_images


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_block_mask_is_constant_on_each_block_and_matches_the_hand_rule():
    mask = block_mask((128, 192), 64, 0.7, generator(3))
    # BlockMaskGenerator: one uniform per block, kept where it exceeds the ratio.
    draws = torch.rand((2, 3), generator=generator(3))
    expected = (draws > 0.7).float().repeat_interleave(64, 0).repeat_interleave(64, 1)
    assert torch.equal(mask, expected)


def test_block_mask_cells_are_rounded_as_mic_does():
    # round(100 / 64) = 2 rows of cells, round(90 / 64) = 1 column: nearest upsampling.
    mask = block_mask((100, 90), 64, 0.5, generator(0))
    draws = (torch.rand((2, 1), generator=generator(0)) > 0.5).float()
    rows = torch.floor(torch.arange(100) * (2 / 100)).long()
    assert torch.equal(mask, draws[rows][:, [0] * 90])


def test_the_kept_share_follows_the_ratio_within_binomial_bounds():
    cells = 200 * 200
    mask = block_mask((200, 200), 1, 0.7, generator(5))
    kept = mask.sum().item()
    # Kept with probability 0.3; 5 standard deviations of Binomial(n, 0.3).
    assert abs(kept - 0.3 * cells) < 5 * math.sqrt(cells * 0.3 * 0.7)


def test_same_stream_same_mask_other_samples_other_masks():
    from blda_tools.training.batches import stream_generator

    def mask_of(sample: int) -> torch.Tensor:
        return block_mask((256, 256), 16, 0.7, stream_generator(0, sample, STREAM_MASK))

    assert torch.equal(mask_of(4), mask_of(4))
    assert not torch.equal(mask_of(4), mask_of(5))


def test_masked_pixels_are_zero_after_normalising_and_the_rest_untouched():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64) * 255
    settings = MICConfig(enabled=True, mask_block_size=16, mask_ratio=0.7)
    # No jitter (probability 1 is never exceeded); blur is MIC's own half-time draw.
    out, masks = masked_images(
        images, [generator(1), generator(2)], settings,
        jitter_strength=0.2, jitter_probability=1.0, normalize=normalize,
    )  # fmt: skip
    from blda_tools.training.augment import gaussian_blur, uniform

    for index, seed in enumerate((1, 2)):
        replay = generator(seed)
        uniform(replay)  # the jitter's draw (not applied at probability 1)
        blurred = gaussian_blur(images[index], replay)
        expected_mask = block_mask((64, 64), 16, 0.7, replay)
        assert torch.equal(masks[index], expected_mask)
        expected = normalize(blurred[None])[0] * expected_mask
        torch.testing.assert_close(out[index], expected)
        assert torch.all(out[index][:, expected_mask == 0] == 0)
        assert 0 < expected_mask.mean() < 1


class RecordingLoss(WeightedCrossEntropy):
    def __call__(self, logits, labels, weights, domain, features=None):
        self.calls = getattr(self, "calls", []) + [(domain, logits, labels, weights)]
        return super().__call__(logits, labels, weights, domain, features)


def test_masked_pass_trains_on_the_unmasked_pseudo_labels_and_weights(tmp_path):
    config = small_config("mic.enabled=true", "mic.mask_block_size=4", "mic.loss_weight=0.5")
    parts = components(loss=RecordingLoss())
    trainer = Trainer(config, tmp_path, parts, device=torch.device("cpu"))
    batch = trainer.batches[0]
    labels, weights = trainer._pseudo_labels(batch)
    images = trainer.masked_pass.inputs(batch.target_images, batch.sample_indices, normalize)
    trainer.loss.calls = []
    loss = trainer._masked_loss(batch, labels, weights)
    ((domain, _, seen_labels, seen_weights),) = trainer.loss.calls
    assert domain == "target" and torch.equal(seen_labels, labels)
    assert torch.equal(seen_weights, weights)
    # Direct: 0.5 x mean over all pixels of -w log softmax(f(masked image))[pseudo-label].
    with torch.no_grad():
        logits = trainer.model(images)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    picked = torch.log_softmax(logits, 1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
    expected = 0.5 * (-(picked * (labels != 255)) * weights).sum() / labels.numel()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_micro_step_runs_the_masked_pass_after_the_mixed_one(tmp_path):
    config = small_config("mic.enabled=true", "mic.mask_block_size=4")
    parts = components(loss=RecordingLoss())
    trainer = Trainer(config, tmp_path, parts, device=torch.device("cpu"))
    trainer.loss.calls = []
    losses = trainer.micro_step(trainer.batches[0])
    assert [call[0] for call in trainer.loss.calls] == ["source", "mixed", "target"]
    assert math.isfinite(losses["masked"])


def test_the_masked_pass_reads_the_blda_statistics_and_never_updates_them(tmp_path):
    config = small_config(
        "mic.enabled=true", "mic.mask_block_size=4", "loss.name=blda",
        "loss.blda_mode=ola", "loss.blda_min_samples=5",
    )  # fmt: skip
    parts = components()
    parts.loss = build_loss("blda", num_classes=3, ignore_index=255, config=config)
    trainer = Trainer(config, tmp_path, parts, device=torch.device("cpu"))
    batch = trainer.batches[0]
    trainer.micro_step(batch)
    assert int(trainer.loss.blda.iteration) >= 1  # the source and mixed passes updated
    before = copy.deepcopy(trainer.loss.state_dict())
    labels, weights = trainer._pseudo_labels(batch)
    trainer._masked_loss(batch, labels, weights)
    assert same_state(before, trainer.loss.state_dict())


def same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("mic.mask_ratio=1.0", "mic.mask_ratio"),
        ("mic.mask_ratio=-0.1", "mic.mask_ratio"),
        ("mic.mask_block_size=0", "mic.mask_block_size"),
        ("mic.loss_weight=-1", "mic.loss_weight"),
    ],
)
def test_mic_values_out_of_range_are_refused_naming_the_key(override, key):
    with pytest.raises(BLDAError, match=key.replace(".", r"\.")):
        load_config(None, ["model.arch=test", override])


def test_mic_without_self_training_is_refused(tmp_path):
    config = small_config("mic.enabled=true", "self_training.enabled=false")
    with pytest.raises(BLDAError, match=r"mic\.enabled"):
        Trainer(config, tmp_path, components(), device=torch.device("cpu"))
