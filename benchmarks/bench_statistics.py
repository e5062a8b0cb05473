"""Throughput of `LogitSetStatistics.update` (the hot path of `blda diagnose`), C = 19.

Prints million pixels per second for 10M pixels fed in 1M-row chunks (the store's default chunk),
for spatially coherent labels (runs of 20-400 pixels, like image rows of a segmentation map) and
for i.i.d. random labels (the worst case for cache locality), then the machine.

    python benchmarks/bench_statistics.py [--pixels 10000000] [--threads N] [--store DIR]

With --store DIR it also writes an uncompressed float16 store of the coherent-label pixels in DIR
and times `collect_statistics` over it with workers=1 and workers=2 (reading included).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from blda_tools.statistics import LogitGrid, LogitSetStatistics, collect_statistics

NUM_CLASSES = 19
CHUNK_ROWS = 1 << 20


def coherent_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """Labels in runs of 20-400 equal values, 5% of them the ignore index 255."""
    run_lengths = torch.randint(20, 401, (n // 20 + 1,), generator=generator)
    run_classes = torch.randint(0, NUM_CLASSES, run_lengths.shape, generator=generator)
    ignore_runs = torch.rand(run_lengths.shape, generator=generator) < 0.05
    run_classes[ignore_runs] = 255
    return run_classes.repeat_interleave(run_lengths)[:n]


def synthetic_logits(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Logits with a bump on the labelled class, roughly like a trained network's."""
    logits = torch.randn(labels.shape[0], NUM_CLASSES, generator=generator) * 3.0
    rows = torch.nonzero(labels < NUM_CLASSES).squeeze(1)
    logits[rows, labels[rows]] += 8.0
    return logits


def measure(logits: torch.Tensor, labels: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` wall-clock Mpixels/s of streaming all rows through a fresh statistics
    object, and the CPU seconds (all threads) per million pixels of that run."""
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        statistics = LogitSetStatistics(NUM_CLASSES, LogitGrid())
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            statistics.update(
                logits[start : start + CHUNK_ROWS], labels[start : start + CHUNK_ROWS]
            )
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if wall < best_wall:
            best_wall, best_cpu = wall, cpu
    pixels = logits.shape[0] / 1e6
    return pixels / best_wall, best_cpu / pixels


def process_and_children_cpu() -> float:
    """CPU seconds of this process and of its finished child processes (workers)."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_collect(logits: torch.Tensor, labels: torch.Tensor, directory: Path) -> None:
    """Mpixels/s of `collect_statistics` from a store on disk, workers=1 and workers=2."""
    from blda_tools.store import LogitStore, LogitWriter

    path = directory / "bench_statistics_store.h5"
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    with LogitWriter(path, names, chunk_rows=1 << 16) as writer:
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            writer.add(logits[start : start + CHUNK_ROWS], labels[start : start + CHUNK_ROWS])
    try:
        with LogitStore(path) as store:
            for workers in (1, 2):
                started, cpu_started = time.perf_counter(), process_and_children_cpu()
                collect_statistics(store, workers=workers)
                rate = store.num_rows / (time.perf_counter() - started) / 1e6
                cpu = (process_and_children_cpu() - cpu_started) / (store.num_rows / 1e6)
                print(
                    f"collect_statistics from a float16 store, {store.num_rows / 1e6:.0f}M "
                    f"pixels, workers={workers}: {rate:.1f} Mpixels/s wall, "
                    f"{cpu * 1e3:.0f} CPU-ms per Mpixel (worker processes included)"
                )
    finally:
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--store", type=Path, default=None, help="also time collect_statistics")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    generator = torch.Generator().manual_seed(0)
    coherent = coherent_labels(options.pixels, generator)
    random_labels = torch.randint(0, NUM_CLASSES, (options.pixels,), generator=generator)
    for name, labels in (("coherent labels", coherent), ("random labels", random_labels)):
        logits = synthetic_logits(labels, generator)
        # float16 is what a default store holds and what `collect_statistics` passes on.
        for dtype in (torch.float32, torch.float16):
            rate, cpu_per_million = measure(logits.to(dtype), labels, options.repeats)
            print(
                f"update, C={NUM_CLASSES}, {options.pixels / 1e6:.0f}M pixels, {name}, "
                f"{str(dtype).removeprefix('torch.')} logits: {rate:.1f} Mpixels/s wall, "
                f"{cpu_per_million * 1e3:.0f} CPU-ms per Mpixel"
            )
        if options.store is not None and labels is coherent:
            with tempfile.TemporaryDirectory(dir=options.store) as directory:
                measure_collect(logits, labels, Path(directory))
        del logits
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} "
        "(other processes compete for the cores when it exceeds ~0.5)"
    )


if __name__ == "__main__":
    main()
