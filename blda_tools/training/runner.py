"""`train()`: from a config to a finished run directory (components, run dir, resume, DDP).

Run directory layout:
    config.toml              the resolved config (every key)
    log.jsonl                train / eval records
    checkpoints/latest.pth   written every run.checkpoint_interval iterations and at the end
    checkpoints/best.pth     the checkpoint with the best target-val mIoU so far
    rcs_class_pixels.pt      per-image class pixel counts of the source (Rare Class Sampling)
    blda/gmm_fits_<it>.png   online BLDA (loss.name = "blda"): GMMs over logit histograms
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from blda_tools.errors import BLDAError
from blda_tools.errors import check_same_classes as check_class_lists
from blda_tools.fileio import (
    atomic_output,
    created_directories,
    ensure_writable_dir,
    remove_empty_directories,
)
from blda_tools.outputs import (
    check_can_write,
    checked_output_path,
    hold_lock,
    read_manifest,
    record_set,
)
from blda_tools.training.checkpoint import resume_into
from blda_tools.training.config import (
    TrainingConfig,
    check_class_ids,
    checked_config,
    config_differences,
    load_config,
    resolve_data_root,
    to_toml,
)
from blda_tools.training.evaluate import check_evaluation
from blda_tools.training.loop import Trainer, TrainingComponents, resolve_device
from blda_tools.training.losses import build_loss
from blda_tools.training.run_log import JsonlLog, read_log
from blda_tools.training.run_loop import checkpoint_path, run_loop

COMMAND = "train"
# What a run writes in its directory (module docstring): `blda train` owns these names.
RUN_FILES = (
    "config.toml",
    "log.jsonl",
    "checkpoints/latest.pth",
    "checkpoints/best.pth",
    "rcs_class_pixels.pt",
    "blda/",  # a folder of the set (online BLDA's plots): the record marks it with "/"
)
# Held by the run training in a directory (`_one_run_at_a_time`); removed when it ends.
RUN_LOCK = ".blda-train.lock"

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators (model initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the global generator user code relies on)
    torch.manual_seed(seed)


def _check_pretrained_path(path: str, key: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise BLDAError(f"config: {key} = {path!r} does not exist; expected a checkpoint file")
    return resolved


def check_same_classes(named_datasets: dict[str, object]) -> tuple[tuple[str, ...], int]:
    """All datasets must share class names and ignore index; returns them."""
    (first_name, first), *others = named_datasets.items()
    classes, ignore = tuple(first.class_names), first.ignore_index
    for name, dataset in others:
        check_class_lists(
            classes, dataset.class_names, f"data: {first_name} and {name}", (first_name, name)
        )
        if dataset.ignore_index != ignore:
            raise BLDAError(f"data: {first_name} and {name} use different ignore indices")
    return classes, ignore


def pretrained_paths(config: TrainingConfig) -> dict[str, Path]:
    """Every weight file the config names, checked to exist before any dataset is scanned."""
    named = {
        "model.backbone_weights": config.model.backbone_weights,
        "model.pretrained": config.model.pretrained,
    }
    if config.feature_distance.enabled:
        named["feature_distance.imagenet_weights"] = config.feature_distance.imagenet_weights
    return {key: _check_pretrained_path(path, key) for key, path in named.items() if path}


# The options of dump-logits whose library calls training shares, as they start messages.
_SHARED_OPTIONS = ("--model", "--split", "--data-root", "--dataset")


@contextlib.contextmanager
def _named_by(key: str, split_key: str | None = None) -> Iterator[None]:
    """Errors of library calls that dump-logits shares name its options (`--split x: ...`);
    in a training run they name the config key instead (`split_key` for --split)."""
    try:
        yield
    except BLDAError as error:
        message = str(error)
        option = next((o for o in _SHARED_OPTIONS if message.startswith(o)), None)
        if option is None:
            raise BLDAError(f"config: {key}: {message}") from None
        named = split_key if option == "--split" and split_key else key
        raise BLDAError(f"config: {named}{message[len(option) :]}") from None


def build_components(config: TrainingConfig) -> TrainingComponents:
    """Datasets, model (+ pretrained weights), ImageNet model and loss named by `config`."""
    from blda_tools.datasets import build_dataset
    from blda_tools.models import (
        create_model,
        load_checkpoint,
        load_pretrained_backbone,
        normalize,
    )

    weights = pretrained_paths(config)
    trust = config.model.trust_checkpoint
    data = config.data
    source_root = resolve_data_root(data, data.source_root)
    with _named_by("data.source / data.root / data.source_root", "data.source_split"):
        source = build_dataset(data.source, source_root, data.source_split)
    target_root = resolve_data_root(data, data.target_root)
    with _named_by("data.target / data.root / data.target_root", "data.target_split"):
        target = build_dataset(data.target, target_root, data.target_split)
    with _named_by("data.target / data.root / data.target_root", "data.val_split"):
        val = build_dataset(data.target, target_root, data.val_split)
    if not getattr(source, "has_labels", True):
        raise BLDAError(
            f"data: the source {data.source} at {source_root} has no labels to train on"
        )
    if not getattr(val, "has_labels", True):
        raise BLDAError(f"data: the target {data.val_split} split at {target_root} has no labels")
    classes, ignore = check_same_classes({"source": source, "target": target, "val": val})
    check_class_ids(config, len(classes))
    with _named_by("model.arch"):
        model = create_model(config.model.arch, len(classes))
    if not getattr(model, "supports_training", True):
        raise BLDAError(
            f"model.arch: {config.model.arch} can be used for inference (dump-logits, "
            "evaluation) but blda does not train it; choose a daformer_*, segformer_*, "
            "deeplabv2_r101 or tiny model"
        )
    if "model.backbone_weights" in weights:
        load_pretrained_backbone(
            model, weights["model.backbone_weights"], trust, "model.backbone_weights"
        )
    if "model.pretrained" in weights:
        load_checkpoint(
            model, weights["model.pretrained"], trust_checkpoint=trust, option="model.pretrained"
        )
    imagenet_model = None
    if config.feature_distance.enabled:
        imagenet_model = create_model(config.model.arch, len(classes))
        load_pretrained_backbone(
            imagenet_model,
            weights["feature_distance.imagenet_weights"],
            trust,
            "feature_distance.imagenet_weights",
        )
    loss = build_loss(
        config.loss.name, num_classes=len(classes), ignore_index=ignore, config=config
    )
    return TrainingComponents(
        model=model, source=source, target=target, val=val, class_names=classes,
        loss=loss, normalize=normalize, ignore_index=ignore, imagenet_model=imagenet_model,
    )  # fmt: skip


def prepare_run_dir(config: TrainingConfig, run_dir: Path, *, resume: bool, is_main: bool) -> None:
    """Create the run dir and write `config.toml`, or check a resumed one was made by `config`."""
    saved = run_dir / "config.toml"
    if resume:
        if not saved.is_file():
            raise BLDAError(f"--resume: {run_dir} has no config.toml; not a blda training run")
        differences = config_differences(load_config(saved, notes=False), config)
        if differences:
            raise BLDAError(
                f"--resume: {run_dir} was made with another config (different: "
                f"{', '.join(differences)}); resume with the same config or use a new --work-dir"
            )
        if not checkpoint_path(run_dir).is_file():
            raise BLDAError(f"--resume: {checkpoint_path(run_dir)} does not exist yet")
        return
    if checkpoint_path(run_dir).exists():
        if not saved.is_file():  # --resume would refuse it: no config to resume with
            raise BLDAError(
                f"--work-dir: {run_dir} holds {checkpoint_path(run_dir).relative_to(run_dir)} "
                "but no config.toml, so not a run --resume can continue; remove it or choose "
                "another directory"
            )
        raise BLDAError(
            f"--work-dir: {run_dir} already holds a run; pass --resume or choose another directory"
        )
    if is_main:
        # The files of a run are `blda train`'s (docs/outputs.md): a file of that name that
        # train did not write is refused; a run that failed before its first checkpoint left
        # none (`remove_unstarted_run`).
        sets = read_manifest(run_dir) if run_dir.is_dir() else {}
        for name in RUN_FILES:
            check_can_write(run_dir, name, COMMAND, sets, option="--work-dir")
        _remove_run_files(run_dir)  # train's own, from a run killed before its first checkpoint
        ensure_writable_dir(run_dir / "checkpoints")
        with atomic_output(saved) as temporary:
            temporary.write_text(to_toml(config))
        record_set(run_dir, COMMAND, RUN_FILES)


def remove_unstarted_run(run_dir: Path, created: list[Path]) -> None:
    """After a run failed before its first checkpoint: remove what it wrote (nothing there to
    resume from), and the directories it created."""
    _remove_run_files(run_dir)
    with contextlib.suppress(OSError):
        (run_dir / "checkpoints").rmdir()
    if run_dir.is_dir():
        record_set(run_dir, COMMAND, [])
    remove_empty_directories(created)


def _remove_run_files(run_dir: Path) -> None:
    for name in RUN_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def run_training(
    config: TrainingConfig,
    work_dir: str | os.PathLike,
    components: TrainingComponents,
    *,
    resume: bool = False,
    stop_at: int | None = None,
) -> dict:
    """Train `components` as `config` says into `work_dir` (DDP if a process group is up).

    `stop_at` ends this call after that many iterations (checkpointing, as if interrupted) so a
    later `resume=True` call continues; the schedule still spans `run.iterations`.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    run_dir = checked_output_path(work_dir, "work_dir")
    # The device is checked before the run directory is touched.
    device = resolve_device(config.run.device, int(os.environ.get("LOCAL_RANK", 0)))
    created = created_directories(run_dir) if rank == 0 and not resume else []
    started = False
    try:
        with _one_run_at_a_time(run_dir, rank == 0):
            prepare_run_dir(config, run_dir, resume=resume, is_main=rank == 0)
            started = True
            return _train(config, run_dir, components, device, resume, stop_at, rank, world_size)
    except BaseException:
        if not started:
            remove_empty_directories(created)  # a refused run directory: the user's files stay
        elif rank == 0 and not resume and not checkpoint_path(run_dir).exists():
            remove_unstarted_run(run_dir, created)
        raise


@contextlib.contextmanager
def _one_run_at_a_time(run_dir: Path, holds: bool) -> Iterator[None]:
    """While a run trains (its rank 0 holds the lock, `holds`), another `blda train` in the
    same directory, --resume or not, is refused: the two would interleave their checkpoints
    and log lines (both ran to the end, writing the same files, before this lock)."""
    if not holds or not run_dir.is_dir():  # a --resume of nothing: prepare_run_dir says so
        yield
        return
    busy = (
        f"--work-dir {run_dir}: another `blda train` is running in it now; wait for it to "
        "finish (then --resume, if it was stopped) or choose another directory"
    )
    lock = run_dir / RUN_LOCK
    descriptor = hold_lock(lock, busy)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the descriptor is closed (see `hold_lock`)
        os.close(descriptor)


def _train(config, run_dir, components, device, resume, stop_at, rank, world_size) -> dict:
    if world_size > 1:
        dist.barrier()
    trainer = Trainer(config, run_dir, components, device=device, rank=rank, world_size=world_size)
    rng_state = None
    if resume:
        rng_state = resume_into(trainer, checkpoint_path(run_dir), config.run.iterations)
        if trainer.iteration == config.run.iterations and not trainer.evaluation_pending:
            # Nothing to do: it evaluated and logged its last iteration before it ended (a
            # resume re-ran the probe evaluation and rewrote the log, and reported no scores).
            return _finished(trainer, run_dir)
        if rank == 0:
            logger.info(
                f"resuming from iteration {trainer.iteration} of {config.run.iterations} "
                f"({checkpoint_path(run_dir)})"
            )
            # before the probe evaluation: a damaged log is found at once
            JsonlLog(run_dir).truncate_after(trainer.iteration)
    check_evaluation(lambda: trainer.evaluate(probe=True), device)
    summary = run_loop(trainer, stop_at=stop_at, rng_state=rng_state)
    if world_size > 1:
        # Rank 0 still evaluates and writes the last checkpoint after the loop; a rank that tears
        # its process group down meanwhile can abort the job (seen with gloo), so all leave together.
        dist.barrier()
    return summary


def _finished(trainer: Trainer, run_dir: Path) -> dict:
    """The summary of a run that already reached its last iteration, from its log."""
    if trainer.rank == 0:
        logger.info(
            f"{run_dir}: already finished at iteration {trainer.iteration} of "
            f"{trainer.config.run.iterations}; nothing to resume"
        )
    evaluations = [r for r in read_log(run_dir) if r.get("kind") == "eval"]
    last = (
        evaluations[-1]
        if evaluations and evaluations[-1]["iteration"] == trainer.iteration
        else None
    )
    scores = (
        None if last is None else {k: v for k, v in last.items() if k not in ("kind", "iteration")}
    )
    return {
        "iteration": trainer.iteration,
        "best_miou": trainer.best_miou,
        "last_scores": scores,
        "run_dir": str(run_dir),
    }


def _init_distributed(config: TrainingConfig) -> None:
    """Join the torchrun process group (nccl on GPU, gloo on CPU) if WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    device = resolve_device(config.run.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def train(
    config: str | os.PathLike | TrainingConfig,
    work_dir: str | os.PathLike,
    overrides: Iterable[str] = (),
    resume: bool = False,
    *,
    stop_at: int | None = None,
) -> dict:
    """Run `blda train`: a config (shipped name, TOML path or object) into `work_dir`.

    Returns {"iteration", "best_miou", "last_scores", "run_dir"}. Under torchrun every process
    calls it; rank 0 writes the log and checkpoints.
    """
    if not isinstance(config, TrainingConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise BLDAError("train: overrides apply to a config file, not to a TrainingConfig object")
    else:
        config = checked_config(config)
    checked_output_path(work_dir, "work_dir")  # before the data and models are loaded
    _init_distributed(config)
    seed_everything(config.run.seed)
    components = build_components(config)
    return run_training(config, work_dir, components, resume=resume, stop_at=stop_at)
