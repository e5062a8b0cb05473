"""Does self-training help on SynthCity, and does online BLDA? Paired `synthcity_tiny` runs.

Generates a SynthCity set (unless --data points at one) and trains the arms of one comparison
with the same seed and iterations, printing the target-val mIoU / mAcc / class-accuracy std of
each, the seconds per iteration and the machine it ran on. With --warm-start N both arms start
from one source-only model trained for N iterations first (DAFormer adapts a pretrained network;
the `tiny` CNN has no ImageNet weights, so this is its stand-in), and that model's scores are
printed too:

  --compare self_training  source-only (`self_training.enabled=false`) vs DACS self-training
  --compare blda           `synthcity_tiny_blda` with loss.blda_mode = none vs ola+cde
                           (issue 7's check; `--only blda_ola` runs the OLA row of Table 4)

    python benchmarks/bench_train_synthcity.py --out runs/bench --iterations 3000
    python benchmarks/bench_train_synthcity.py --out runs/bench --warm-start 2000 --iterations 2000
    python benchmarks/bench_train_synthcity.py --compare blda --out runs/bench --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from blda_tools.datasets.synthcity.generate import make_synthcity
from blda_tools.training import read_log, train

# arm -> (shipped config, extra overrides)
ARMS = {
    "source_only": ("synthcity_tiny", ["self_training.enabled=false"]),
    "self_training": ("synthcity_tiny", []),
    "blda_none": ("synthcity_tiny_blda", ["loss.blda_mode=none"]),
    "blda_ola": ("synthcity_tiny_blda", ["loss.blda_mode=ola"]),
    "blda_ola_cde": ("synthcity_tiny_blda", ["loss.blda_mode=ola+cde"]),
}
COMPARISONS = {
    "self_training": ("source_only", "self_training"),
    "blda": ("blda_none", "blda_ola_cde"),
}


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
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default="self_training")
    parser.add_argument("--only", choices=tuple(ARMS), default=None, help="run one arm")
    parser.add_argument(
        "--warm-start",
        type=int,
        default=0,
        metavar="N",
        help="start both arms from a source-only model trained for N iterations (0 = from scratch)",
    )
    return parser.parse_args()


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    )


def run_arm(config: str, run_dir: Path, common: list[str], extra: list[str]) -> dict:
    """Train (or finish, or just re-read) one arm and return its last target-val scores."""
    start = time.perf_counter()
    resume = (run_dir / "checkpoints" / "latest.pth").is_file()
    summary = train(config, run_dir, [*common, *extra], resume=resume)
    records = read_log(run_dir)
    # From the log rather than the summary: a run that had already finished is not re-evaluated.
    scores = [r for r in records if r["kind"] == "eval"][-1]
    steps = [r["seconds_per_iteration"] for r in records if r["kind"] == "train"]
    row = {
        "mIoU": scores["mIoU"],
        "mAcc": scores["mAcc"],
        "acc_std": scores["acc_std"],
        "best_mIoU": summary["best_miou"],
        "seconds_per_iteration": sum(steps) / len(steps),
        "minutes": (time.perf_counter() - start) / 60,
    }
    print(f"{run_dir.name}: {json.dumps(row)}", flush=True)
    return row


def main() -> None:
    args = parse_args()
    data = args.data or args.out / "synthcity"
    if not (data / "synthcity.json").is_file():
        make_synthcity(data, images=args.images, size=(256, 512), seed=args.data_seed)

    def overrides(iterations: int) -> list[str]:
        settings = [f'data.root="{data}"', f"run.iterations={iterations}", f"run.seed={args.seed}"]
        return [*settings, "run.live=false", *args.overrides]

    common = overrides(args.iterations)
    names = [args.only] if args.only else list(COMPARISONS[args.compare])
    results = {}
    if args.warm_start:
        warm_dir = args.out / f"warm_start_seed{args.seed}"
        results["warm_start"] = run_arm(
            "synthcity_tiny", warm_dir, overrides(args.warm_start), ARMS["source_only"][1]
        )
        common.append(f'model.pretrained="{warm_dir / "checkpoints" / "latest.pth"}"')
    for name in names:
        config, extra = ARMS[name]
        results[name] = run_arm(config, args.out / f"{name}_seed{args.seed}", common, extra)
    print(f"machine: {machine()}")
    print(f"command: {args.iterations} iterations, seed {args.seed}, {common}")
    for name, row in results.items():
        print(
            f"{name:14s} target val mIoU {row['mIoU']:6.2f}  mAcc {row['mAcc']:6.2f}  "
            f"class-acc std {row['acc_std']:6.2f}  {row['seconds_per_iteration']:.2f} s/it  "
            f"({row['minutes']:.1f} min)"
        )


if __name__ == "__main__":
    main()
