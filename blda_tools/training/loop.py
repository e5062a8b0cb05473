"""The training iteration: source loss (+ feature distance), DACS self-training on mixed images,
gradient accumulation, AMP, DDP, the online BLDA regression head, evaluation and checkpoint
contents (`run_loop.py` runs the iterations, logs and writes).

One iteration = one optimizer step = `run.accumulate` micro-batches. As in DAFormer's `dacs.py`,
the teacher is a copy of the student at iteration 0 and EMA-updated at the start of every later
iteration; the source loss and the mixed loss are back-propagated one after the other.
"""

from __future__ import annotations

import contextlib
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
from blda_tools.torch_files import load_torch
from blda_tools.training.batches import (
    STREAM_MIX,
    MicroBatch,
    TrainingBatches,
    collate_single,
    stream_generator,
)
from blda_tools.training.blda_loss import CDFRegressionHead, feature_channels
from blda_tools.training.checkpoint import (
    capture_rng_state,
    save_checkpoint,
    split_weights,
    weights_state_dict,
)
from blda_tools.training.config import TrainingConfig, to_toml
from blda_tools.training.evaluate import evaluate
from blda_tools.training.feature_distance import ImageNetFeatureDistance
from blda_tools.training.hrda_step import HRDAStep, context_images
from blda_tools.training.losses import load_loss_state, loss_state
from blda_tools.training.masking import MaskedPass
from blda_tools.training.optim import (
    WarmupPolySchedule,
    add_regression_head_group,
    build_optimizer,
)
from blda_tools.training.sampling import RareClassSampler, count_class_pixels
from blda_tools.training.self_training import (
    make_teacher,
    mixed_batch,
    pseudo_labels,
    update_teacher,
)

# Checkpoint keys of the CDF regression head: outside `model.` so `models.load_checkpoint` and
# `blda diagnose` read the student as any other segmentation model.
REGRESSION_HEAD_PREFIX = "regression_head"


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
    deepest encoder features or None, raw CDF-head output or None). Encoder features need a
    `backbone` returning a list of maps and a `decode_head.forward_with_features` (the built-in
    `Segmentor` layout). The CDF regression head (online BLDA, 'ola+cde') sits here, not in
    the model, so DDP reduces its gradients and the model's checkpoint keys stay its own."""

    def __init__(
        self,
        model: nn.Module,
        with_encoder_features: bool,
        regression_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model, self.with_encoder_features = model, with_encoder_features
        self.regression_head = regression_head

    def forward(self, images: torch.Tensor, detail_box: tuple[int, int, int, int] | None = None):
        if detail_box is not None:  # HRDA training: fused, detail, their features, encoder
            *outputs, encoder = self.model.forward_train(images, detail_box)
            head = self.regression_head
            regression = (None, None) if head is None else (head(outputs[2]), head(outputs[3]))
            return *outputs, encoder, regression
        if not self.with_encoder_features:
            logits, features = self.model.forward_with_features(images)
            encoder = None
        else:
            encoder = self.model.backbone(images)
            logits, features = self.model.decode_head.forward_with_features(encoder)
            encoder = encoder[-1] if isinstance(encoder, list | tuple) else encoder
        regression = None if self.regression_head is None else self.regression_head(features)
        return logits, features, encoder, regression


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
        # Train mode asked for here: loaded models come in eval mode (`load_model`).
        self.model = parts.model.to(device).train()
        # Before the teacher is copied: it sets the HRDA model's detail crop from the config.
        self.hrda = HRDAStep.from_config(config, self.model)
        self._first_sample = 0  # of the current micro-batch: seeds the HRDA detail boxes
        self.masked_pass = MaskedPass.from_config(config)
        self.teacher = make_teacher(self.model) if config.self_training.enabled else None
        self.feature_distance = self._feature_distance()
        self.regression_head = self._regression_head()
        network = SegmentationNetwork(
            self.model, self.feature_distance is not None, self.regression_head
        )
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            network = DistributedDataParallel(network, device_ids=ids)
        self.network = network
        self.optimizer = build_optimizer(self.model, config.optim)
        if self.regression_head is not None:
            add_regression_head_group(self.optimizer, self.regression_head, config.optim)
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

    def _regression_head(self) -> CDFRegressionHead | None:
        if not getattr(self.parts.loss, "needs_regression_head", False):
            return None
        return CDFRegressionHead(feature_channels(self.model)).to(self.device)

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
        expected = "blda's pixel-count cache (delete it to recount)"
        cached = load_torch(cache, str(cache), expected)
        if not isinstance(cached, dict) or "image_class_pixels" not in cached:
            raise BLDAError(f"{cache}: not {expected}")
        counts = cached["image_class_pixels"]
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
        self._first_sample = int(batch.sample_indices[0])
        labels = batch.source_labels
        source_images = self.parts.normalize(batch.source_images)
        source_loss, encoder = self._segmentation_loss(source_images, labels, None, "source")
        losses = {"source": source_loss}
        terms = self._loss_terms("source")
        if self.feature_distance is not None:
            # HRDA: the ImageNet model sees the context the student's features came from.
            images = source_images if self.hrda is None else context_images(source_images)
            losses["feature_distance"] = self.feature_distance(encoder, images, labels)
        self._backward(sum(losses.values()) * scale)
        if self.teacher is not None:
            target_labels, target_weights = self._pseudo_labels(batch)
            losses["mixed"] = self._mixed_loss(batch, target_labels, target_weights)
            losses["pseudo_weight"] = target_weights.mean()
            terms.update(self._loss_terms("mixed"))
            self._backward(losses["mixed"] * scale)
            if self.masked_pass is not None:
                losses["masked"] = self._masked_loss(batch, target_labels, target_weights)
                self._backward(losses["masked"] * scale)
        # Logged parts of the losses above (already in their totals): not back-propagated again.
        losses.update(terms)
        return {name: value.detach().item() for name, value in losses.items()}

    def _segmentation_loss(self, images, labels, weights, domain: str):
        """The loss of one pass (source, mixed, masked) on normalised `images`, and the
        deepest encoder features (the feature distance's input): the model family's seam.
        DAFormer-style models: one forward, the loss on the logits. HRDA: a detail box per
        pass, the fused and detail losses (`hrda_step.HRDAStep.loss`)."""
        if self.hrda is not None:

            def forward(inputs, box):
                with self._autocast():
                    return self.network(inputs, box)

            box = self.hrda.box(self._first_sample, domain)
            return self.hrda.loss(forward, self._loss, images, labels, weights, domain, box)
        with self._autocast():
            logits, features, encoder, regression = self.network(images)
        return self._loss(logits, regression, labels, weights, domain, features), encoder

    def _loss(
        self, logits, regression, labels, weights, domain, features, update: bool = True
    ) -> torch.Tensor:
        """The loss seam on logits (and the CDF head's prediction) resized to the labels;
        `update=False` asks a loss that keeps statistics to read them without updating."""
        size = labels.shape[-2:]
        if domain == "masked":  # MIC: target pixels, reading the statistics, never updating
            domain, update = "target", False
        options = {}
        if regression is not None:
            options["regression"] = CDFRegressionHead.predict(regression, size)
        if not update and getattr(self.loss, "keeps_statistics", False):
            options["update"] = False
        return self.loss(_upsample(logits, size), labels, weights, domain, features, **options)

    def _loss_terms(self, domain: str) -> dict[str, torch.Tensor]:
        logged = getattr(self.loss, "logged_terms", None)
        return {} if logged is None else {f"{domain}_{k}": v for k, v in logged().items()}

    def _pseudo_labels(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's pseudo-labels of the target crops and their pixel weights."""
        settings = self.config.self_training
        size = tuple(batch.target_images.shape[-2:])
        with torch.no_grad(), self._autocast():
            teacher_logits = self.teacher(self.parts.normalize(batch.target_images))
        target_labels, target_weights = pseudo_labels(
            teacher_logits,
            size,
            settings.pseudo_threshold,
            ignore_top_rows=settings.ignore_top_rows,
            ignore_bottom_rows=settings.ignore_bottom_rows,
            pooling=settings.pseudo_weight_pooling,
        )
        if batch.target_valid is not None:  # self_training.crop_pseudo_margins, cropped
            target_weights = target_weights * batch.target_valid
        return target_labels, target_weights

    def _mixed_loss(self, batch: MicroBatch, target_labels, target_weights) -> torch.Tensor:
        settings, augment = self.config.self_training, self.config.augment
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
        loss, _ = self._segmentation_loss(self.parts.normalize(images), labels, weights, "mixed")
        return loss

    def _masked_loss(self, batch: MicroBatch, target_labels, target_weights) -> torch.Tensor:
        """MIC (training/masking.py): the block-masked target crops against the teacher's
        pseudo-labels and weights of the unmasked crops, times mic.loss_weight."""
        images = self.masked_pass.inputs(
            batch.target_images, batch.sample_indices, self.parts.normalize
        )
        loss, _ = self._segmentation_loss(images, target_labels, target_weights, "masked")
        return self.masked_pass.settings.loss_weight * loss

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
        start_iteration = getattr(self.loss, "start_iteration", None)
        if start_iteration is not None:
            start_iteration(self.iteration + 1)
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
        weights = weights_state_dict(self.model, self.teacher)
        if self.regression_head is not None:
            weights.update(
                {
                    f"{REGRESSION_HEAD_PREFIX}.{k}": v.detach().clone()
                    for k, v in self.regression_head.state_dict().items()
                }
            )
        return {
            "state_dict": weights,
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
        if self.regression_head is not None:
            head = split_weights(weights, REGRESSION_HEAD_PREFIX)
            if not head:
                raise BLDAError(
                    "checkpoint: has no CDF regression head weights; it was not written by a "
                    "run with loss.blda_mode = 'ola+cde'"
                )
            self.regression_head.load_state_dict(head)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        load_loss_state(self.loss, checkpoint["loss"])
        meta = checkpoint["meta"]
        self.iteration, self.best_miou = int(meta["iteration"]), meta["best_miou"]
        self.evaluation_pending = bool(meta.get("evaluation_pending", False))  # run_loop's

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

    def evaluate(self, probe: bool = False) -> dict | None:
        """Scores of the student on target val (every rank takes part), or None without val;
        `probe`: on the first val image only, in this rank alone (`check_evaluation`)."""
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
            max_images=1 if probe else settings.max_images,
            classes=settings.classes,
            amp=self.config.run.amp != "none",
            ignore_index=self.parts.ignore_index,
            rank=0 if probe else self.rank,
            world_size=1 if probe else self.world_size,
        )
