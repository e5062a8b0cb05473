"""Logit store throughput: write and read a 10M-row, 19-class uncompressed float16 store.

Run: `python benchmarks/bench_store.py [--rows N] [--dir DIR]`. Prints rows per second for
writing, reading (fresh tensors and reused buffers, with and without validation) and the
machine. The target: reading is not the bottleneck of a pipeline that needs >= 10 M rows/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from blda_tools.store import LogitStore, LogitWriter

NUM_CLASSES = 19
IMAGE_SHAPE = (512, 1024)  # one add = one 0.5 Mpixel map, as a dump of Cityscapes at half size


def write_store(path: str, rows: int) -> float:
    """Write `rows` rows as maps of IMAGE_SHAPE (the last image may be a shorter (N, C) add)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(NUM_CLASSES, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, IMAGE_SHAPE, generator=generator)
    per_image = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    start = time.perf_counter()
    with LogitWriter(path, [f"class{i}" for i in range(NUM_CLASSES)]) as writer:
        for number in range(rows // per_image):
            writer.add(image, labels, name=f"image{number}")
        remainder = rows % per_image
        if remainder:
            flat = image.reshape(NUM_CLASSES, -1).T[:remainder]
            writer.add(flat, labels.reshape(-1)[:remainder], name="remainder")
    return time.perf_counter() - start


def read_store(
    path: str, validate: bool, reuse_buffers: bool, dtype: torch.dtype | None = torch.float32
) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads) to stream the whole store."""
    start, start_cpu = time.perf_counter(), time.process_time()
    with LogitStore(path) as store:
        for chunk in store.iter_chunks(validate=validate, reuse_buffers=reuse_buffers, dtype=dtype):
            del chunk
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dir", default=None, help="where to put the temporary store")
    args = parser.parse_args()
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = os.path.join(directory, "bench.h5")
        seconds = write_store(path, args.rows)
        size = os.path.getsize(path)
        print(
            f"write: {args.rows / seconds / 1e6:.1f} M rows/s ({seconds:.2f} s, {size / 1e6:.0f} MB)"
        )
        read_store(path, validate=False, reuse_buffers=True)  # warm the page cache
        # dtype=None keeps float16 (what collect_statistics reads); float32 converts.
        for dtype, reuse_buffers in ((torch.float32, False), (torch.float32, True), (None, True)):
            for validate in (False, True):
                seconds, cpu_seconds = min(
                    read_store(path, validate, reuse_buffers, dtype) for _ in range(3)
                )
                print(
                    f"read (dtype={dtype}, validate={validate}, reuse_buffers={reuse_buffers}): "
                    f"{args.rows / seconds / 1e6:.1f} M rows/s "
                    f"({args.rows * NUM_CLASSES * 2 / seconds / 1e6:.0f} MB/s of float16 logits), "
                    f"{args.rows / cpu_seconds / 1e6:.1f} M rows per CPU second"
                )
    # Other jobs on the machine slow the wall-clock figures; the load shows how busy it was.
    print(f"load average after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
