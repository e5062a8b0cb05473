"""Benchmark `blda diagnose`: streaming speed and peak memory against the store's size.

Target (foundation issue): >= 10 million pixels per second for C = 19 from an uncompressed
float16 store on the 2-core machine, and the same peak memory for a 10M- and a 50M-pixel store.

Each measurement runs `diagnose` (statistics, metrics, Eq. 4/5, JSON; plots are skipped because
their cost does not depend on the data size) in a fresh subprocess so its peak RSS is its own.

    python benchmarks/bench_diagnose.py [--sizes 10 50] [--workers 1 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NUM_CLASSES = 19
ROWS_PER_ADD = 1 << 20


def write_store(path: Path, rows: int) -> None:
    """A store of `rows` labelled pixels with class-dependent Gaussian logits."""
    from blda_tools.store import LogitWriter

    generator = torch.Generator().manual_seed(0)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    with LogitWriter(path, names, dtype="float16") as writer:
        for index, start in enumerate(range(0, rows, ROWS_PER_ADD)):
            count = min(ROWS_PER_ADD, rows - start)
            labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
            logits = torch.randn(count, NUM_CLASSES, generator=generator) * 2
            logits[torch.arange(count), labels] += 4
            writer.add(logits, labels, name=f"block{index}")


def measure(store: Path, workers: int) -> dict:
    """Run diagnose in a child process; return its wall time and peak RSS."""
    code = (
        "import json, resource, sys, time\n"
        "from blda_tools.diagnose import diagnose\n"
        "def cpu():\n"
        "    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
        "    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime\n"
        "start, cpu_start = time.perf_counter(), cpu()\n"
        # numba's one-time start-up (loading the compiled kernels), timed on its own first.
        "import torch\n"
        "from blda_tools.statistics import LogitSetStatistics\n"
        "LogitSetStatistics(2).update(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))\n"
        "startup = time.perf_counter() - start\n"
        f"diagnose({str(store)!r}, sys.argv[1], workers={workers}, plots_and_report=False)\n"
        "elapsed, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'seconds': elapsed, 'startup': startup, 'cpu_seconds': cpu_seconds,\n"
        "                  'peak_kb': peak,\n"
        "                  'children_peak_kb': children}))\n"
    )
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(
            [sys.executable, "-c", code, out], capture_output=True, text=True, check=True
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50], help="millions of pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", type=Path, help="directory for the stores (kept between runs)")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="blda-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    for millions in args.sizes:
        store = directory / f"bench_{millions}M.h5"
        if not store.exists():
            start = time.perf_counter()
            write_store(store, millions * 1_000_000)
            print(
                f"wrote {store} ({store.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s"
            )
        # Warm the page cache so every run reads from memory alike.
        with open(store, "rb") as file:
            while file.read(1 << 24):
                pass
        for workers in args.workers:
            load_before = os.getloadavg()[0]
            figures = measure(store, workers)
            rate = millions * 1e6 / figures["seconds"]
            streaming = millions * 1e6 / (figures["seconds"] - figures["startup"])
            peak_mb = max(figures["peak_kb"], figures["children_peak_kb"]) / 1024
            # CPU time (all threads and worker processes) does not depend on how busy the
            # machine is as much as wall time does: 10M pixels/s on 2 idle cores needs at most
            # 200 CPU-ms per M pixels, evenly spread over both.
            print(
                f"{millions:>3}M pixels, C={NUM_CLASSES}, workers={workers}: "
                f"{figures['seconds']:.2f} s, {rate / 1e6:.1f} M pixels/s wall "
                f"({figures['startup']:.2f} s of it numba's one-time start-up; "
                f"{streaming / 1e6:.1f} M pixels/s after it), "
                f"{figures['cpu_seconds'] * 1e3 / millions:.0f} CPU-ms per M pixels, "
                f"peak RSS {figures['peak_kb'] / 1024:.0f} MB (main), "
                f"{figures['children_peak_kb'] / 1024:.0f} MB (largest worker), max {peak_mb:.0f} MB, "
                f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
            )
    if args.keep is None:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


if __name__ == "__main__":
    main()
