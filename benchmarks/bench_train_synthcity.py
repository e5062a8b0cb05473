"""Does self-training help on SynthCity? `synthcity_tiny` source-only vs DACS self-training.

Generates a SynthCity set (unless --data points at one), trains the shipped `synthcity_tiny`
config twice with the same seed and iterations, once with `self_training.enabled=false`, and
prints the target-val mIoU / mAcc / class-accuracy std of both with the machine it ran on.

    python benchmarks/bench_train_synthcity.py --out runs/bench --iterations 3000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from blda_tools.datasets.synthcity import make_synthcity
from blda_tools.training import train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_synthcity"))
    parser.add_argument("--data", type=Path, default=None, help="existing SynthCity root")
    parser.add_argument("--images", type=int, default=200, help="images per domain to generate")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of a generated set")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE"
    )
    parser.add_argument(
        "--only", choices=("source_only", "self_training"), default=None, help="run one arm"
    )
    return parser.parse_args()


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    )


def main() -> None:
    args = parse_args()
    data = args.data or args.out / "synthcity"
    if not (data / "synthcity.json").is_file():
        make_synthcity(data, images=args.images, size=(256, 512), seed=args.data_seed)
    common = [
        f'data.root="{data}"',
        f"run.iterations={args.iterations}",
        f"run.seed={args.seed}",
        "run.live=false",
        *args.overrides,
    ]
    arms = {"source_only": ["self_training.enabled=false"], "self_training": []}
    if args.only:
        arms = {args.only: arms[args.only]}
    results = {}
    for name, extra in arms.items():
        run_dir = args.out / f"{name}_seed{args.seed}"
        start = time.perf_counter()
        resume = (run_dir / "checkpoints" / "latest.pth").is_file()
        summary = train("synthcity_tiny", run_dir, [*common, *extra], resume=resume)
        scores = summary["last_scores"]
        results[name] = {
            "mIoU": scores["mIoU"],
            "mAcc": scores["mAcc"],
            "acc_std": scores["acc_std"],
            "best_mIoU": summary["best_miou"],
            "minutes": (time.perf_counter() - start) / 60,
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"machine: {machine()}")
    print(f"command: synthcity_tiny, {args.iterations} iterations, seed {args.seed}, {common}")
    for name, row in results.items():
        print(
            f"{name:14s} target val mIoU {row['mIoU']:6.2f}  mAcc {row['mAcc']:6.2f}  "
            f"class-acc std {row['acc_std']:6.2f}  ({row['minutes']:.1f} min)"
        )


if __name__ == "__main__":
    main()
