"""The outer loop of a run: iterations, logging, the loss's periodic report, evaluation and
checkpoints (rank 0 writes), from `Trainer.iteration` to the end or to `stop_at`."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from blda_tools.errors import BLDAError, Interrupted
from blda_tools.fileio import resource_failure
from blda_tools.runtime.process import readable_worker_errors
from blda_tools.training.checkpoint import restore_rng_state, save_checkpoint
from blda_tools.training.loop import Trainer
from blda_tools.training.run_log import JsonlLog, LiveView

CHECKPOINT_DIR = "checkpoints"


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
    micro_batches = readable_worker_errors(iter(trainer.micro_batch_loader()))  # starts now
    if rng_state is not None:
        restore_rng_state(rng_state)
    view = LiveView(total, trainer.iteration, enabled=is_main and config.run.live)
    interval_losses: dict[str, float] = {}
    interval_start, interval_steps = time.perf_counter(), 0
    # The iteration `checkpoints/latest.pth` holds (a resumed run starts from it).
    saved = trainer.iteration if checkpoint_path(run_dir).exists() else None
    try:
        if getattr(trainer, "evaluation_pending", False):  # it failed where the run stopped
            written = _evaluate_and_checkpoint(trainer, log, view, stop)
            trainer.evaluation_pending = False
            if is_main and not written:  # so that a later --resume does not evaluate again
                save_checkpoint(checkpoint_path(run_dir), trainer.checkpoint())
        while trainer.iteration < stop:
            for name, value in trainer.iterate(micro_batches).items():
                interval_losses[name] = interval_losses.get(name, 0.0) + value
            interval_steps += 1
            iteration = trainer.iteration
            _loss_report(trainer, log)
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
            if _evaluate_and_checkpoint(trainer, log, view, stop):
                saved = trainer.iteration
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(trainer, saved)) from None
    except Exception as error:  # a full disk, memory, a loader worker killed, bad data
        kept = _kept_after_failure(trainer, saved, error)
        if kept is None:
            raise
        raise kept from None
    finally:
        view.close()
    return {
        "iteration": trainer.iteration,
        "best_miou": trainer.best_miou,
        "last_scores": trainer.last_scores,
        "run_dir": str(run_dir),
    }


def _loss_report(trainer: Trainer, log: JsonlLog) -> None:
    """A stateful loss's periodic report (e.g. online BLDA's GMM plots), logged on rank 0."""
    finish_iteration = getattr(trainer.loss, "finish_iteration", None)
    if finish_iteration is None:
        return
    is_main = trainer.rank == 0
    record = finish_iteration(
        trainer.iteration, trainer.run_dir if is_main else None, trainer.parts.class_names
    )
    if record is not None and is_main:
        log.write({"kind": "loss", "iteration": trainer.iteration, **record})


def _kept_after_failure(trainer: Trainer, saved: int | None, error: Exception):
    """For a run stopped by `error` after a checkpoint: the one-line error, with the checkpoint
    that is kept (written atomically, so a failed write leaves the one before) and how to go
    on; None to raise `error` as it is (no checkpoint yet, a bug, or it says so already)."""
    line = str(error) if isinstance(error, BLDAError) else resource_failure(error)
    if saved is None or trainer.rank != 0 or line is None or "--resume" in line:
        return None
    return BLDAError(
        f"{line}; {checkpoint_path(trainer.run_dir)} (iteration {saved}) is kept: fix the cause "
        "and continue with the same train command and --resume"
    )


def _interrupted_message(trainer: Trainer, saved: int | None) -> str:
    where = f"train interrupted at iteration {trainer.iteration}"
    if saved is None:
        run = trainer.config.run
        first = min(run.checkpoint_interval, run.iterations)  # the last iteration saves too
        when = (
            f"the first is written at iteration {first}"
            if trainer.iteration < first
            else f"stopped before the checkpoint of iteration {first} was written"
        )
        return f"{where}: no checkpoint yet ({when}); nothing to resume, run it again"
    return (
        f"{where}: {checkpoint_path(trainer.run_dir)} (iteration {saved}) is kept; continue "
        "with the same train command and --resume"
    )


def _training_kept(trainer: Trainer, error: BLDAError) -> BLDAError:
    """An evaluation that failed must not cost the training done so far (an evaluation is
    often due where the first checkpoint is, and a run without one is removed): rank 0 saves
    latest.pth first, so the run continues with --resume once the cause is fixed."""
    if trainer.rank != 0:
        return error
    path = checkpoint_path(trainer.run_dir)
    state = trainer.checkpoint()
    state["meta"]["evaluation_pending"] = True  # --resume evaluates first (`run_loop`)
    save_checkpoint(path, state)
    return BLDAError(
        f"{error}; the evaluation at iteration {trainer.iteration} failed, the training so far "
        f"is kept in {path}: fix the cause and continue with the same train command and --resume"
    )


def _evaluate_and_checkpoint(trainer: Trainer, log: JsonlLog, view: LiveView, stop: int) -> bool:
    """Evaluate and checkpoint when due; True when `checkpoints/latest.pth` was written."""
    config, iteration = trainer.config, trainer.iteration
    final = iteration == config.run.iterations
    interval = config.evaluation.interval
    improved = False
    if final or (interval > 0 and iteration % interval == 0):
        try:
            scores = trainer.evaluate()
        except BLDAError as error:  # e.g. a val image that cannot be read
            raise _training_kept(trainer, error) from error
        if scores is not None:
            trainer.last_scores = scores
            view.evaluated(scores["mIoU"])
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
    return trainer.rank == 0 and due
