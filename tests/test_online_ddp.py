"""BLDALoss under DDP: 2 gloo processes on a CPU hold the same statistics after a few
iterations, equal to one process that sees the whole global batch (both ranks' batches)."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blda_tools.online.loss import BLDALoss

CLASSES, WORLD, PER_RANK, SIZE, ITERATIONS = 4, 2, 2, 20, 3
OPTIONS = {
    "default": {"min_samples": 30},
    # a cap below the counts: the per-cell draw and the anchor subsample select by key
    "capped": {"min_samples": 30, "max_samples_per_cell": 40, "anchor_max_samples": 300},
}


def global_batch(iteration: int):
    """Source logits, labels, mixed logits, labels and weights of the whole global batch
    (WORLD * PER_RANK images), drawn with numpy; rank r holds images r * PER_RANK onwards."""
    rng = np.random.default_rng(iteration)
    shape = (WORLD * PER_RANK, SIZE, SIZE)
    batch = []
    for _ in range(2):
        labels = rng.choice(CLASSES, size=shape, p=[0.55, 0.25, 0.15, 0.05])
        logits = rng.normal(size=(shape[0], CLASSES, SIZE, SIZE))
        logits += 3.0 * np.moveaxis(np.eye(CLASSES)[labels], -1, 1)
        labels[rng.random(shape) < 0.05] = 255
        batch += [torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)]
    weights = torch.tensor(np.where(rng.random(shape) < 0.4, 1.0, 0.8), dtype=torch.float32)
    return (*batch, weights)


def run_iterations(losses: dict, images: slice) -> None:
    for iteration in range(ITERATIONS):
        source, source_labels, mixed, mixed_labels, weights = global_batch(iteration)
        for blda in losses.values():
            blda(source[images], source_labels[images], domain="source")
            blda(mixed[images], mixed_labels[images], weights[images], domain="mixed")


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        losses = {name: BLDALoss(CLASSES, **options) for name, options in OPTIONS.items()}
        run_iterations(losses, slice(rank * PER_RANK, (rank + 1) * PER_RANK))
        states = {name: blda.state_dict() for name, blda in losses.items()}
        torch.save(states, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_hold_the_single_process_state(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = {name: BLDALoss(CLASSES, **options) for name, options in OPTIONS.items()}
    run_iterations(single, slice(None))
    for name, blda in single.items():
        expected = blda.state_dict()
        assert bool(expected["source.fitted"].all()) and bool(expected["target.fitted"].all())
        for key, value in expected.items():
            if not isinstance(value, torch.Tensor):
                continue
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
            if value.is_floating_point():
                torch.testing.assert_close(ranks[0][name][key], value, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(ranks[0][name][key], value), (name, key)
