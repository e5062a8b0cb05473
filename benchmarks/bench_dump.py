"""Benchmark `blda dump-logits`: throughput against the model's pure forward throughput.

Target (real-inputs issue): on CPU with a small model, dump-logits reaches >= 90% of the
model's pure forward throughput on the same images, i.e. decoding (DataLoader workers), the
resize to label resolution and the HDF5 writing hide behind compute.

"Pure forward" is `model(images)` on images already decoded and normalised in memory, batch 1,
after a warm-up. The dump runs whole-image inference at native size (no resize), float16,
uncompressed, timed from its first image to the closed store (model loading excluded).

    python benchmarks/bench_dump.py [--model tiny|segformer_mitb0] [--images 24]
        [--size 256x512] [--workers 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NUM_CLASSES = 19


def write_dataset(root: Path, count: int, height: int, width: int) -> None:
    """`count` random images with label ids in the Cityscapes layout."""
    generator = np.random.default_rng(0)
    for index in range(count):
        stem = f"bench_000000_{index:06d}"
        image = root / "leftImg8bit" / "val" / "bench" / f"{stem}_leftImg8bit.png"
        label = root / "gtFine" / "val" / "bench" / f"{stem}_gtFine_labelIds.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        # Smooth-ish content so PNG decoding costs about what a photo costs.
        pixels = generator.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(image)
        ids = generator.integers(0, 34, (height // 16, width // 16), dtype=np.uint8)
        Image.fromarray(ids).resize((width, height), Image.NEAREST).save(label)


def cpu_seconds() -> float:
    """CPU time used so far by this process (all threads) and its finished children."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def forward_throughput(model, images: list[torch.Tensor]) -> tuple[float, float]:
    """(images per second, CPU seconds per image) of `model(image)` alone on decoded,
    normalised images in memory."""
    with torch.inference_mode():
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for image in images:
            model(image)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return len(images) / elapsed, cpu / len(images)


def dump_throughput(
    root: Path, checkpoint: Path, arch: str, workers: int, out: Path, warm_up_image
) -> tuple[float, float]:
    """(images per second, CPU seconds per image) of a dump, first image to closed store
    (the CPU time includes the loader workers)."""
    from blda_tools.dump import prepare_dump
    from blda_tools.inference import InferenceSettings

    job = prepare_dump(
        arch,
        checkpoint,
        "cityscapes",
        root,
        "val",
        out,
        inference=InferenceSettings(mode="whole"),
        workers=workers,
        device="cpu",
    )
    with torch.inference_mode():  # the same warm-up as the pure forward gets
        job.model(warm_up_image)
    cpu_start = cpu_seconds()
    summary = job.run()
    return summary.images_per_second, (cpu_seconds() - cpu_start) / summary.images_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="256x512", help="HEIGHTxWIDTH")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))

    from blda_tools.datasets import build_dataset
    from blda_tools.models import create_model, normalize

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    print(
        f"cores: {os.cpu_count()}, torch {torch.__version__} threads {torch.get_num_threads()}, "
        f"python {sys.version.split()[0]}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary) / "data"
        write_dataset(root, args.images, height, width)
        torch.manual_seed(0)
        model = create_model(args.model, NUM_CLASSES).eval()
        checkpoint = Path(temporary) / "model.pth"
        torch.save(model.state_dict(), checkpoint)
        dataset = build_dataset("cityscapes", root, "val")
        images = [normalize(dataset[i].image[None]) for i in range(len(dataset))]
        with torch.inference_mode():
            model(images[0])  # warm-up
        forward, dump = [], []
        # Alternated, so a change in the machine's load affects both figures alike.
        for repeat in range(args.repeats):
            forward.append(forward_throughput(model, images))
            out = Path(temporary) / f"dump{repeat}.h5"
            dump.append(dump_throughput(root, checkpoint, args.model, args.workers, out, images[0]))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    # Best of the repeats: the highest rate and the lowest CPU time of each.
    forward_cpu, dump_cpu = min(c for _, c in forward), min(c for _, c in dump)
    forward, dump = max(r for r, _ in forward), max(r for r, _ in dump)
    print(
        f"{args.model} on {args.images} images {height}x{width}, CPU, whole image, float16 store, "
        f"{args.workers} loader worker(s), best of {args.repeats}"
    )
    print(f"pure forward : {forward:8.2f} images/s")
    print(f"dump-logits  : {dump:8.2f} images/s  ({dump / forward:.0%} of forward; target >= 90%)")
    # CPU time per image depends far less on other processes than wall time does.
    print(
        f"CPU per image: forward {forward_cpu * 1000:.0f} ms, dump {dump_cpu * 1000:.0f} ms "
        f"({(dump_cpu - forward_cpu) * 1000:+.0f} ms for decoding, upsampling and writing; "
        f"forward's share of the dump's CPU: {forward_cpu / dump_cpu:.0%})"
    )


if __name__ == "__main__":
    main()
