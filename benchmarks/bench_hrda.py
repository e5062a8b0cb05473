"""Benchmark HRDA's multi-resolution inference of one 1024 x 1024 window on the CPU: all nine
512 x 512 detail crops through the encoder in one batch (as HRDA's `extract_slide_feat`, the
default) against one crop at a time (`HRDASegmentor.crops_per_batch = 1`).

Each figure comes from a fresh process (random weights, eval mode, inference mode, fp32):
windows/s over `--repeats` windows after `--warmup` untimed ones (default 1), and the process's peak resident
memory (`ru_maxrss`) with the memory after building the model, so that the difference is what
the inference itself needs.

    python benchmarks/bench_hrda.py [--archs hrda_mitb0,hrda_mitb5] [--repeats 2] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(arch: str, crops_per_batch: int | None, repeats: int, warmup: int) -> dict:
    import torch

    from blda_tools.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, 19).eval()
    model.crops_per_batch = crops_per_batch
    window = torch.randn(1, 3, 1024, 1024)
    after_model = rss_mb()
    with torch.inference_mode():
        for _ in range(warmup):
            model(window)
        start = time.perf_counter()
        for _ in range(repeats):
            logits = model(window)
        seconds = (time.perf_counter() - start) / repeats
    assert logits.shape == (1, 19, 256, 256)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "after_model_mb": after_model, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="hrda_mitb0,hrda_mitb5")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed windows first")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arch, crops = args.child
        crops_per_batch = None if crops == "all" else int(crops)
        print(json.dumps(child(arch, crops_per_batch, args.repeats, args.warmup)))
        return
    import torch

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    print(
        f"cores: {os.cpu_count()}, torch {torch.__version__} threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("one 1024 x 1024 window (context 512 x 512 + 9 detail crops of 512 x 512), CPU, fp32")
    for arch in args.archs.split(","):
        for crops, label in (("all", "batched (9 crops at once)"), ("1", "one crop at a time")):
            command = [sys.executable, __file__, "--child", arch, crops]
            command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            finished = subprocess.run(command, capture_output=True, text=True, check=False)
            if finished.returncode != 0:
                sys.exit(f"{arch} {label} failed:\n{finished.stderr[-3000:]}")
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            print(
                f"{arch:11s} {label:26s}: {1 / result['seconds']:6.3f} windows/s "
                f"({result['seconds']:6.2f} s), peak RSS {result['peak_mb']:6.0f} MB "
                f"(+{result['peak_mb'] - result['after_model_mb']:5.0f} MB over the built model)"
            )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
