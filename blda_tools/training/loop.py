"""The training iteration: source CE (+ feature distance), DACS self-training on mixed images,
gradient accumulation, AMP, DDP, evaluation, logging and checkpoints.

One iteration = one optimizer step = `run.accumulate` micro-batches. As in DAFormer's `dacs.py`,
the teacher is a copy of the student at iteration 0 and EMA-updated at the start of every later
iteration; the source loss and the mixed loss are back-propagated one after the other.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from blda_tools.errors import BLDAError
from blda_tools.training.batches import (
    STREAM_MIX,
    MicroBatch,
    TrainingBatches,
    collate_single,
    stream_generator,
)
from blda_tools.training.checkpoint import (
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
    split_weights,
    weights_state_dict,
)
from blda_tools.training.config import TrainingConfig, to_toml
from blda_tools.training.evaluate import evaluate
from blda_tools.training.feature_distance import ImageNetFeatureDistance
from blda_tools.training.losses import load_loss_state, loss_state
from blda_tools.training.optim import WarmupPolySchedule, build_optimizer
from blda_tools.training.run_log import JsonlLog, LiveView
from blda_tools.training.sampling import RareClassSampler, count_class_pixels
from blda_tools.training.self_training import (
    make_teacher,
    mixed_batch,
    pseudo_labels,
    update_teacher,
)

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainingComponents:
    """Everything built from the config before the loop starts (tests build their own).

    `loss` follows the seam of `blda_tools.training.losses`; `imagenet_model` is the frozen
    ImageNet-pretrained copy for the feature distance (None when disabled).
    """

    model: nn.Module
    source: object
    target: object
    val: object | None
    class_names: tuple[str, ...]
    loss: Callable
    normalize: Callable[[torch.Tensor], torch.Tensor]
    ignore_index: int = 255
    imagenet_model: nn.Module | None = None


class SegmentationNetwork(nn.Module):
    """What DDP wraps, so every forward goes through DDP: returns (logits, decoder features,
    deepest encoder features or None). Encoder features need a `backbone` returning a list of
    maps and a `decode_head.forward_with_features` (the built-in `Segmentor` layout)."""

    def __init__(self, model: nn.Module, with_encoder_features: bool) -> None:
        super().__init__()
        self.model, self.with_encoder_features = model, with_encoder_features

    def forward(self, images: torch.Tensor):
        if not self.with_encoder_features:
            return (*self.model.forward_with_features(images), None)
        encoder = self.model.backbone(images)
        logits, features = self.model.decode_head.forward_with_features(encoder)
        return logits, features, encoder[-1] if isinstance(encoder, list | tuple) else encoder


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`run.device`: 'auto' -> CUDA (this process's GPU) when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BLDAError(f"config: run.device {name!r} is not a device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BLDAError(f"config: run.device is {name!r} but CUDA is not available")
    return device


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class Trainer:
    """Holds the training state of one process and runs iterations over it."""

    def __init__(
        self,
        config: TrainingConfig,
        run_dir: Path,
        parts: TrainingComponents,
        *,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config, self.run_dir, self.parts = config, run_dir, parts
        self.device, self.rank, self.world_size = device, rank, world_size
        self.model = parts.model.to(device)
        self.teacher = make_teacher(self.model) if config.self_training.enabled else None
        self.feature_distance = self._feature_distance()
        network = SegmentationNetwork(self.model, self.feature_distance is not None)
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            network = DistributedDataParallel(network, device_ids=ids)
        self.network = network
        self.optimizer = build_optimizer(self.model, config.optim)
        self.schedule = WarmupPolySchedule(self.optimizer, config.run.iterations, config.optim)
        self.scaler = self._scaler()
        self.loss = parts.loss.to(device) if isinstance(parts.loss, nn.Module) else parts.loss
        self.iteration, self.best_miou, self.last_scores = 0, None, None
        self.last_lr: dict[str, float] = {}
        self.batches = TrainingBatches(
            parts.source,
            parts.target,
            config,
            rank=rank,
            world_size=world_size,
            with_target=config.self_training.enabled,
            sampler=self._rare_class_sampler(),
            ignore_index=parts.ignore_index,
        )

    # ------------------------------------------------------------------ construction

    def _feature_distance(self) -> ImageNetFeatureDistance | None:
        settings = self.config.feature_distance
        if not settings.enabled:
            return None
        if self.parts.imagenet_model is None:
            raise BLDAError("feature_distance.enabled: no ImageNet model was built")
        return ImageNetFeatureDistance(
            self.parts.imagenet_model.to(self.device),
            weight=settings.weight,
            classes=settings.classes,
            scale_min_ratio=settings.scale_min_ratio,
            num_classes=len(self.parts.class_names),
            ignore_index=self.parts.ignore_index,
        )

    def _scaler(self):
        amp = self.config.run.amp
        if amp != "none" and self.device.type != "cuda":
            raise BLDAError(f"config: run.amp={amp} needs a CUDA device; use run.amp=none on CPU")
        return torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def _autocast(self):
        amp = self.config.run.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _rare_class_sampler(self) -> RareClassSampler | None:
        settings = self.config.rcs
        if not settings.enabled:
            return None
        cache = self.run_dir / "rcs_class_pixels.pt"
        if self.rank == 0 and not cache.exists():
            counts = count_class_pixels(
                self.parts.source,
                len(self.parts.class_names),
                self.parts.ignore_index,
                self.config.run.num_workers,
            )
            save_checkpoint(cache, {"image_class_pixels": counts})
        if self.world_size > 1:
            dist.barrier()
        counts = torch.load(cache, weights_only=True)["image_class_pixels"]
        if len(counts) != len(self.parts.source):
            raise BLDAError(
                f"{cache}: counts {len(counts)} images, the source has a different number"
            )
        return RareClassSampler(
            counts,
            temperature=settings.temperature,
            min_pixels=settings.min_pixels,
            min_crop_ratio=settings.min_crop_ratio,
            class_names=self.parts.class_names,
        )

    # ------------------------------------------------------------------ one iteration

    def micro_step(self, batch: MicroBatch) -> dict[str, float]:
        """Forward and backward of one micro-batch (gradients accumulate); returns its losses
        (and `pseudo_weight`, the mean pseudo-label weight of the target crops)."""
        scale = 1.0 / self.config.run.accumulate
        labels = batch.source_labels
        source_images = self.parts.normalize(batch.source_images)
        with self._autocast():
            logits, features, encoder = self.network(source_images)
        losses = {
            "source": self.loss(
                _upsample(logits, labels.shape[-2:]), labels, None, "source", features
            )
        }
        if self.feature_distance is not None:
            losses["feature_distance"] = self.feature_distance(encoder, source_images, labels)
        self._backward(sum(losses.values()) * scale)
        if self.teacher is not None:
            losses["mixed"], losses["pseudo_weight"] = self._mixed_loss(batch)
            self._backward(losses["mixed"] * scale)
        return {name: value.detach().item() for name, value in losses.items()}

    def _mixed_loss(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        settings, augment = self.config.self_training, self.config.augment
        size = tuple(batch.target_images.shape[-2:])
        with torch.no_grad(), self._autocast():
            teacher_logits = self.teacher(self.parts.normalize(batch.target_images))
        target_labels, target_weights = pseudo_labels(
            teacher_logits,
            size,
            settings.pseudo_threshold,
            ignore_top_rows=settings.ignore_top_rows,
            ignore_bottom_rows=settings.ignore_bottom_rows,
        )
        generators = [
            stream_generator(self.config.run.seed, int(j), STREAM_MIX) for j in batch.sample_indices
        ]
        images, labels, weights = mixed_batch(
            batch.source_images,
            batch.source_labels,
            batch.target_images,
            target_labels,
            target_weights,
            generators,
            jitter_strength=augment.color_jitter_strength,
            jitter_probability=augment.color_jitter_probability,
            blur=augment.blur,
            class_mix=settings.mix == "class",
            ignore_index=self.parts.ignore_index,
        )
        with self._autocast():
            logits, features, _ = self.network(self.parts.normalize(images))
        loss = self.loss(_upsample(logits, size), labels, weights, "mixed", features)
        return loss, target_weights.mean()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients, clear them, advance the schedule."""
        self.last_lr = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    def iterate(self, micro_batches) -> dict[str, float]:
        """One iteration: EMA update, `accumulate` micro-steps, optimizer step."""
        if self.teacher is not None and self.iteration > 0:
            update_teacher(
                self.teacher, self.model, self.iteration, self.config.self_training.ema_alpha
            )
        totals: dict[str, float] = {}
        accumulate = self.config.run.accumulate
        for index in range(accumulate):
            batch = next(micro_batches).to(self.device)
            last = index == accumulate - 1
            no_sync = (
                self.network.no_sync if self.world_size > 1 and not last else contextlib.nullcontext
            )
            with no_sync():
                for name, value in self.micro_step(batch).items():
                    totals[name] = totals.get(name, 0.0) + value / accumulate
        self.optimizer_step()
        self.iteration += 1
        return totals

    # ------------------------------------------------------------------ state

    def checkpoint(self) -> dict:
        """Everything `--resume` needs, as tensors and primitive types."""
        meta = {
            "iteration": self.iteration,
            "config": to_toml(self.config),
            "arch": self.config.model.arch,
            "class_names": list(self.parts.class_names),
            "best_miou": self.best_miou,
        }
        return {
            "state_dict": weights_state_dict(self.model, self.teacher),
            "meta": meta,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "loss": loss_state(self.loss),
            "rng": capture_rng_state(),
            "sampler": {
                "seed": self.config.run.seed,
                "next_micro_step": self.iteration * self.config.run.accumulate,
            },
        }

    def load(self, checkpoint: dict) -> None:
        """Restore a `checkpoint()`; the global RNGs are restored last by `restore_rng`."""
        weights = checkpoint["state_dict"]
        self.model.load_state_dict(split_weights(weights, "model"))
        if self.teacher is not None:
            self.teacher.load_state_dict(split_weights(weights, "ema_model"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        load_loss_state(self.loss, checkpoint["loss"])
        self.iteration = int(checkpoint["meta"]["iteration"])
        self.best_miou = checkpoint["meta"]["best_miou"]

    def micro_batch_loader(self) -> DataLoader:
        """Micro-batches from the current iteration to the end of the run, in order."""
        start = self.iteration * self.config.run.accumulate
        return DataLoader(
            self.batches,
            sampler=range(start, len(self.batches)),
            batch_size=None,
            collate_fn=collate_single,
            num_workers=self.config.run.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating the loader must not consume the global torch RNG,
            # or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.config.run.seed),
        )

    def evaluate(self) -> dict | None:
        """Scores of the student on target val (every rank takes part), or None without val."""
        if self.parts.val is None:
            return None
        settings = self.config.evaluation
        return evaluate(
            self.model,
            self.parts.val,
            num_classes=len(self.parts.class_names),
            class_names=self.parts.class_names,
            normalize=self.parts.normalize,
            device=self.device,
            resize=settings.resize,
            crop_size=settings.crop_size,
            stride=settings.stride,
            max_images=settings.max_images,
            classes=settings.classes,
            amp=self.config.run.amp != "none",
            ignore_index=self.parts.ignore_index,
            rank=self.rank,
            world_size=self.world_size,
        )


def average_over_ranks(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Mean of each logged value over the processes (all ranks must call it together)."""
    if world_size == 1 or not values:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {n: v / world_size for n, v in zip(names, tensor.tolist(), strict=True)}


def checkpoint_path(run_dir: Path, name: str = "latest") -> Path:
    """`RUN_DIR/checkpoints/<name>.pth`."""
    return run_dir / CHECKPOINT_DIR / f"{name}.pth"


def run_loop(trainer: Trainer, *, stop_at: int | None, rng_state: dict | None) -> dict:
    """Iterate from `trainer.iteration` to the end (or `stop_at`), evaluating, logging and
    checkpointing on rank 0. Returns a summary."""
    config, run_dir, is_main = trainer.config, trainer.run_dir, trainer.rank == 0
    total = config.run.iterations
    stop = total if stop_at is None else min(stop_at, total)
    log = JsonlLog(run_dir)
    micro_batches = iter(trainer.micro_batch_loader())
    if rng_state is not None:
        restore_rng_state(rng_state)
    view = LiveView(total, trainer.iteration, enabled=is_main and config.run.live)
    interval_losses: dict[str, float] = {}
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        while trainer.iteration < stop:
            for name, value in trainer.iterate(micro_batches).items():
                interval_losses[name] = interval_losses.get(name, 0.0) + value
            interval_steps += 1
            iteration = trainer.iteration
            if iteration % config.run.log_interval == 0 or iteration == stop:
                losses = {k: v / interval_steps for k, v in interval_losses.items()}
                losses = average_over_ranks(losses, trainer.world_size)
                pseudo_weight = losses.pop("pseudo_weight", None)
                seconds = (time.perf_counter() - interval_start) / interval_steps
                if is_main:
                    log.write(
                        {
                            "kind": "train",
                            "iteration": iteration,
                            "losses": losses,
                            "pseudo_weight": pseudo_weight,
                            "lr": trainer.last_lr,
                            "seconds_per_iteration": seconds,
                        }
                    )
                    view.update(iteration, losses)
                interval_losses, interval_steps = {}, 0
                interval_start = time.perf_counter()
            _evaluate_and_checkpoint(trainer, log, view, stop)
    finally:
        view.close()
    return {
        "iteration": trainer.iteration,
        "best_miou": trainer.best_miou,
        "last_scores": trainer.last_scores,
        "run_dir": str(run_dir),
    }


def _evaluate_and_checkpoint(trainer: Trainer, log: JsonlLog, view: LiveView, stop: int) -> None:
    config, iteration = trainer.config, trainer.iteration
    final = iteration == config.run.iterations
    interval = config.evaluation.interval
    improved = False
    if final or (interval > 0 and iteration % interval == 0):
        scores = trainer.evaluate()
        if scores is not None:
            trainer.last_scores = scores
            view.last_miou = scores["mIoU"]
            improved = trainer.best_miou is None or scores["mIoU"] > trainer.best_miou
            if improved:
                trainer.best_miou = scores["mIoU"]
            if trainer.rank == 0:
                log.write({"kind": "eval", "iteration": iteration, **scores})
    due = iteration % config.run.checkpoint_interval == 0 or iteration == stop
    if trainer.rank == 0 and (due or improved):
        checkpoint = trainer.checkpoint()
        if due:
            save_checkpoint(checkpoint_path(trainer.run_dir), checkpoint)
        if improved:
            save_checkpoint(checkpoint_path(trainer.run_dir, "best"), checkpoint)
