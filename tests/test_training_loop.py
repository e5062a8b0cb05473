"""The `blda train` loop: exact resume, DDP gradients, run-directory rules, end to end on SynthCity.

Small in-memory data (horizontal class bands with a colour shift between domains) and a
two-layer conv net keep these tests independent of the real datasets and models, except the
last one, which runs the shipped `synthcity_tiny` config on a generated SynthCity set.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.training import load_config, run_training, train
from blda_tools.training.loop import Trainer, TrainingComponents
from blda_tools.training.losses import WeightedCrossEntropy
from blda_tools.training.run_log import JsonlLog, read_log
from blda_tools.training.runner import check_same_classes

CLASSES = ("road", "car", "sky")
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() - MEAN) / STD


@dataclass(frozen=True)
class Sample:
    image: torch.Tensor
    label: torch.Tensor | None
    name: str


class BandsDataset:
    """Images made of one horizontal band per class; colour per class, plus a domain shift."""

    ignore_index = 255

    def __init__(self, count, *, shift=0.0, seed=0, labels=True, class_names=CLASSES):
        self.class_names = tuple(class_names)
        self.has_labels = labels
        generator = torch.Generator().manual_seed(seed)
        colours = torch.tensor([[200.0, 40, 40], [40, 200, 40], [40, 40, 200]])
        self.samples = []
        for index in range(count):
            cuts = sorted(torch.randint(3, 21, (2,), generator=generator).tolist())
            order = torch.randperm(3, generator=generator)
            label = torch.zeros(24, 32, dtype=torch.long)
            for band, (top, bottom) in enumerate(zip([0, *cuts], [*cuts, 24], strict=True)):
                label[top:bottom] = order[band]
            label[0, :4] = 255
            image = colours[label.clamp(max=2)].permute(2, 0, 1) + shift
            image = image + 20 * torch.randn(3, 24, 32, generator=generator)
            self.samples.append(
                Sample(image.clamp(0, 255).to(torch.uint8), label if labels else None, str(index))
            )

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        first = F.relu(self.norm(self.conv1(x)))
        return [first, F.relu(self.conv2(first))]


class Head(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.fuse = nn.Conv2d(8, 8, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(8, 3, 1)

    def forward_with_features(self, features):
        fused = F.relu(self.fuse(features[-1]))
        return self.conv_seg(self.dropout(fused)), fused


class TwoLayerNet(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.backbone, self.decode_head = Encoder(), Head(dropout)

    def forward_with_features(self, x):
        return self.decode_head.forward_with_features(self.backbone(x))

    def forward(self, x):
        return self.forward_with_features(x)[0]


class CountingCrossEntropy(nn.Module):
    """A loss with state: counts its calls in a buffer (checkpointed and restored)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.cross_entropy = WeightedCrossEntropy()

    def forward(self, logits, labels, weights, domain, features):
        self.calls += 1
        return self.cross_entropy(logits, labels, weights, domain, features)


def components(dropout: float = 0.0, loss=None) -> TrainingComponents:
    torch.manual_seed(0)
    return TrainingComponents(
        model=TwoLayerNet(dropout),
        source=BandsDataset(8),
        target=BandsDataset(8, shift=40, seed=1, labels=False),
        val=BandsDataset(3, shift=40, seed=2),
        class_names=CLASSES,
        loss=WeightedCrossEntropy() if loss is None else loss,
        normalize=normalize,
    )


def small_config(*overrides: str):
    return load_config(
        None,
        [
            "model.arch=test", "run.batch_size=2", "run.num_workers=0", "run.live=false",
            "run.device=cpu", "run.log_interval=2", "run.checkpoint_interval=100",
            "data.source_size=[24, 32]", "data.target_size=[24, 32]",
            "augment.crop_size=[16, 16]", "augment.scale_range=[0.75, 1.5]",
            "rcs.min_pixels=10", "self_training.ignore_top_rows=2",
            "self_training.ignore_bottom_rows=2", "optim.warmup_iters=2", "optim.lr=1e-3",
            "evaluation.resize=[]", "evaluation.crop_size=[16, 16]", "evaluation.stride=[8, 8]",
            *overrides,
        ],
    )  # fmt: skip


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest.pth", weights_only=True)


def test_resume_continues_exactly(tmp_path):
    config = small_config("run.iterations=20", "evaluation.interval=10", "run.log_interval=5")
    whole = run_training(config, tmp_path / "whole", components(0.2, CountingCrossEntropy()))
    run_training(config, tmp_path / "split", components(0.2, CountingCrossEntropy()), stop_at=10)
    assert _state(tmp_path / "split")["meta"]["iteration"] == 10
    # A record written after the checkpoint (an interrupted run) is dropped on resume.
    JsonlLog(tmp_path / "split").write({"kind": "train", "iteration": 11, "losses": {}})
    split = run_training(
        config, tmp_path / "split", components(0.2, CountingCrossEntropy()), resume=True
    )
    assert whole["iteration"] == split["iteration"] == 20
    one, two = _state(tmp_path / "whole"), _state(tmp_path / "split")
    assert one["state_dict"].keys() == two["state_dict"].keys()
    assert any(k.startswith("ema_model.") for k in one["state_dict"])
    for key, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][key]), key
    for key, value in one["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], two["optimizer"]["state"][key]["exp_avg_sq"])
    assert torch.equal(one["rng"]["torch"], two["rng"]["torch"])
    assert one["loss"]["calls"] == two["loss"]["calls"] == 40  # source + mixed, 20 iterations
    # The resumed log has each iteration once.
    iterations = [r["iteration"] for r in read_log(tmp_path / "split") if r["kind"] == "train"]
    assert iterations == [5, 10, 15, 20]
    assert split["last_scores"] == whole["last_scores"]


class UnreadableVal(BandsDataset):
    """Val whose image 2 cannot be read (the probe before iteration 1 reads image 0 only)."""

    def __getitem__(self, index):
        if index == 2:
            from blda_tools.datasets.base import CorruptSampleError

            raise CorruptSampleError("val/2.png: cannot read image (truncated)")
        return super().__getitem__(index)


class UnreadableSource(BandsDataset):
    def __getitem__(self, index):
        if index > 0:
            from blda_tools.datasets.base import CorruptSampleError

            raise CorruptSampleError(f"source/labels/{index}.png: cannot read label (truncated)")
        return super().__getitem__(index)


def test_an_unreadable_sample_in_a_loader_worker_gives_its_own_one_line_message(tmp_path):
    # torch re-raises a worker's error with the worker's traceback as its message.
    from blda_tools.training.sampling import count_class_pixels

    broken = components()
    broken.source = UnreadableSource(8)
    config = small_config("run.iterations=4", "run.num_workers=1", "rcs.enabled=false")
    with pytest.raises(BLDAError) as caught:
        run_training(config, tmp_path / "run", broken)
    assert re.fullmatch(
        r"source/labels/\d\.png: cannot read label \(truncated\)", str(caught.value)
    )
    with pytest.raises(BLDAError) as caught:
        count_class_pixels(UnreadableSource(8), 3, num_workers=1)
    assert str(caught.value) == "source/labels/1.png: cannot read label (truncated)"


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # Micro-batches k = 0, 1 of one sample hold the samples 0 and 1, as one batch of two does.
    accumulated = Trainer(
        small_config("run.batch_size=1", "run.accumulate=2"), tmp_path / "a", components(),
        device=torch.device("cpu"),
    )  # fmt: skip
    for micro_step in (0, 1):
        accumulated.micro_step(accumulated.batches[micro_step])
    whole = Trainer(small_config("run.batch_size=2"), tmp_path / "b", components(),
                    device=torch.device("cpu"))  # fmt: skip
    whole.micro_step(whole.batches[0])
    for (name, first), second in zip(
        accumulated.model.named_parameters(), whole.model.parameters(), strict=True
    ):
        assert torch.allclose(first.grad, second.grad, rtol=1e-4, atol=1e-6), name


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        config = small_config("run.batch_size=1", "run.iterations=2", "evaluation.interval=2")
        trainer = Trainer(config, Path(out_dir) / "grad", components(), device=torch.device("cpu"),
                          rank=rank, world_size=2)  # fmt: skip
        trainer.micro_step(trainer.batches[0])
        if rank == 0:
            grads = {n: p.grad for n, p in trainer.model.named_parameters()}
            torch.save(grads, Path(out_dir) / "ddp_grads.pt")
        run_training(config, Path(out_dir) / "run", components())
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_on_the_same_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    # One process with the whole global batch (2 samples) draws the same samples and mixing.
    config = small_config("run.batch_size=2", "run.iterations=2")
    single = Trainer(config, tmp_path / "single", components(), device=torch.device("cpu"))
    single.micro_step(single.batches[0])
    for name, parameter in single.model.named_parameters():
        assert torch.allclose(ddp_grads[name], parameter.grad, rtol=1e-4, atol=1e-6), name
    log = read_log(tmp_path / "run")
    assert [r["iteration"] for r in log if r["kind"] == "eval"] == [2]
    assert (tmp_path / "run" / "checkpoints" / "latest.pth").is_file()


def test_resume_with_another_config_is_refused(tmp_path):
    run_training(small_config("run.iterations=1"), tmp_path, components())
    with pytest.raises(BLDAError, match=r"another config \(different: optim\.lr\)"):
        run_training(small_config("run.iterations=1", "optim.lr=0.5"), tmp_path, components(),
                     resume=True)  # fmt: skip
    with pytest.raises(BLDAError, match="already holds a run; pass --resume"):
        run_training(small_config("run.iterations=1"), tmp_path, components())


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(BLDAError, match="has no config.toml"):
        run_training(small_config(), tmp_path, components(), resume=True)


def test_source_and_target_with_different_classes_are_refused():
    source = BandsDataset(1)
    target = BandsDataset(1, class_names=("road", "person", "sky"))
    # Only the names that differ are named, not both lists.
    with pytest.raises(
        BLDAError,
        match=r"source and target: the class names differ: only in source: car; only in target: person$",
    ):
        check_same_classes({"source": source, "target": target})


def test_missing_pretrained_weights_are_refused_before_reading_data(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(BLDAError, match=rf"model\.pretrained = '{missing}' does not exist"):
        train("synthcity_tiny", tmp_path / "run", [f'model.pretrained="{missing}"'])
    with pytest.raises(BLDAError, match=r"feature_distance\.imagenet_weights = .* does not exist"):
        train("synthcity_tiny", tmp_path / "run",
              ["feature_distance.enabled=true", f'feature_distance.imagenet_weights="{missing}"'])  # fmt: skip


def test_feature_distance_runs_in_the_loop(tmp_path):
    parts = components()
    torch.manual_seed(1)
    parts.imagenet_model = TwoLayerNet()
    config = small_config(
        "run.iterations=2",
        "feature_distance.enabled=true",
        'feature_distance.imagenet_weights="built by the test"',
        "feature_distance.classes=[1]",
    )
    run_training(config, tmp_path, parts)
    losses = [r["losses"] for r in read_log(tmp_path) if r["kind"] == "train"]
    assert all(loss["feature_distance"] >= 0 for loss in losses)
    assert any(loss["feature_distance"] > 0 for loss in losses)


def test_amp_on_cpu_is_refused(tmp_path):
    with pytest.raises(BLDAError, match="run.amp=bf16 needs a CUDA device"):
        run_training(small_config("run.amp=bf16"), tmp_path, components())


def test_synthcity_tiny_end_to_end_with_real_models_and_datasets(tmp_path):
    from blda_cli.train import plot_log_command, train_command
    from blda_tools.datasets.synthcity.generate import make_synthcity
    from blda_tools.models import create_model, load_checkpoint

    make_synthcity(tmp_path / "synthcity", images=6, size=(64, 128), seed=0)
    overrides = [
        f'data.root="{tmp_path / "synthcity"}"', "run.iterations=2", "run.num_workers=0",
        "run.live=false", "augment.crop_size=[32, 32]", "data.source_size=[64, 128]",
        "data.target_size=[64, 128]", "rcs.min_pixels=0", "evaluation.crop_size=[64, 64]",
        "evaluation.stride=[64, 64]",
    ]  # fmt: skip
    arguments = ["--config", "synthcity_tiny", "--work-dir", str(tmp_path / "run")]
    for override in overrides:
        arguments += ["--set", override]
    result = CliRunner().invoke(train_command, arguments)
    assert result.exit_code == 0, result.output
    assert "finished at iteration 2" in result.output and "target val mIoU" in result.output
    evaluation = [r for r in read_log(tmp_path / "run") if r["kind"] == "eval"][-1]
    assert evaluation["iteration"] == 2 and len(evaluation["per_class_iou"]) == 19
    # The weights load with the models package's loader, student and teacher alike.
    for part in ("student", "teacher"):
        model = create_model("tiny", 19)
        load_checkpoint(model, tmp_path / "run" / "checkpoints" / "latest.pth", weights=part)
    assert (tmp_path / "run" / "config.toml").is_file()
    result = CliRunner().invoke(plot_log_command, [str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0
    assert not list((tmp_path / "run").rglob("*.partial"))
    assert os.path.getsize(tmp_path / "run" / "log.jsonl") > 0


def test_batches_are_the_same_with_and_without_loader_workers(tmp_path):
    """run.num_workers may change on --resume: it must not change a number. A worker builds
    batches on one torch thread; the main process (num_workers = 0) has two here."""
    from blda_tools.datasets.synthcity.generate import make_synthcity
    from blda_tools.training.batches import TrainingBatches
    from blda_tools.training.runner import build_components

    make_synthcity(tmp_path / "synthcity", images=4, size=(64, 128), seed=0)
    config = load_config("synthcity_tiny", [
        f'data.root="{tmp_path / "synthcity"}"', "data.source_size=[64, 128]",
        "data.target_size=[64, 128]", "augment.crop_size=[64, 64]", "rcs.min_pixels=0",
        "augment.color_jitter_probability=1.0", "run.num_workers=0",
    ])  # fmt: skip
    parts = build_components(config)
    batches = TrainingBatches(parts.source, parts.target, config, ignore_index=parts.ignore_index)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        in_process = [batches[step] for step in range(4)]
    finally:
        torch.set_num_threads(previous)
    loader = torch.utils.data.DataLoader(
        batches, sampler=range(4), batch_size=None, num_workers=1, collate_fn=lambda item: item
    )
    for ours, theirs in zip(in_process, loader, strict=True):
        for field in dataclasses.fields(ours):
            mine, worker = getattr(ours, field.name), getattr(theirs, field.name)
            if isinstance(mine, torch.Tensor):
                assert torch.equal(mine, worker), field.name


class NeedsLargeInputs(TwoLayerNet):
    """TwoLayerNet behind a 12 x 12 kernel: 16 x 16 training crops pass, 8 x 8 windows do not."""

    def forward_with_features(self, x):
        F.conv2d(x, torch.zeros(1, 3, 12, 12))  # torch refuses inputs below the kernel size
        return super().forward_with_features(x)


def test_evaluation_settings_the_model_cannot_run_are_refused_before_training(tmp_path):
    parts = components()
    parts.model = NeedsLargeInputs()
    config = small_config(
        "run.iterations=4", "evaluation.crop_size=[8, 8]", "evaluation.stride=[8, 8]"
    )
    with pytest.raises(BLDAError) as caught:
        run_training(config, tmp_path / "run", parts)
    message = str(caught.value)
    assert (
        "config: evaluation.resize / crop_size / stride (tried on the first val image)" in message
    )
    assert "an input of 8 x 8 is too small" in message
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left


def test_an_evaluation_stride_beyond_the_crop_is_refused():
    with pytest.raises(BLDAError, match=r"evaluation.stride \[16, 16\] is larger than"):
        small_config("evaluation.crop_size=[8, 8]", "evaluation.stride=[16, 16]")
