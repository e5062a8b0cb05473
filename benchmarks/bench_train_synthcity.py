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
  --compare table4         Table 4: none, none + post-hoc BLDA, ola_source, ola, ola+cde
                           (post-hoc: `blda_tools.posthoc_synthcity`, tau chosen on target
                           train's labels, never on val); scores in OUT/table4_seed<S>.json
  --compare mic_hrda       `synthcity_tiny_mic_hrda` vs `synthcity_tiny_mic_hrda_blda` (the
                           warm start is the HRDA model trained source-only); scores in
                           OUT/mic_hrda_seed<S>.json

  python benchmarks/bench_train_synthcity.py --summarize OUT [--compare mic_hrda] aggregates
  the seeds of table4 (default) or mic_hrda.

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
from blda_tools.fileio import write_json
from blda_tools.training import read_log, train

# arm -> (shipped config, extra overrides)
ARMS = {
    "source_only": ("synthcity_tiny", ["self_training.enabled=false"]),
    "self_training": ("synthcity_tiny", []),
    "blda_none": ("synthcity_tiny_blda", ["loss.blda_mode=none"]),
    "blda_ola_source": ("synthcity_tiny_blda", ["loss.blda_mode=ola_source"]),
    "blda_ola": ("synthcity_tiny_blda", ["loss.blda_mode=ola"]),
    "blda_ola_cde": ("synthcity_tiny_blda", ["loss.blda_mode=ola+cde"]),
    "mic_hrda": ("synthcity_tiny_mic_hrda", []),
    "mic_hrda_blda": ("synthcity_tiny_mic_hrda_blda", []),
}
COMPARISONS = {
    "self_training": ("source_only", "self_training"),
    "blda": ("blda_none", "blda_ola_cde"),
    "table4": ("blda_none", "blda_ola_cde", "blda_ola", "blda_ola_source"),
    "mic_hrda": ("mic_hrda", "mic_hrda_blda"),
}
# comparison -> the config of its source-only warm start (same architecture as its arms)
WARM_START_CONFIGS = {"mic_hrda": "synthcity_tiny_mic_hrda"}
# ... and what source-only training turns off besides self-training (MIC needs a teacher)
WARM_START_EXTRA = {"mic_hrda": ["mic.enabled=false"]}
# comparisons whose per-seed scores are written to OUT/<comparison>_seed<S>.json
SAVED_COMPARISONS = ("table4", "mic_hrda")


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
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default=None)
    parser.add_argument("--only", choices=tuple(ARMS), default=None, help="run one arm")
    parser.add_argument("--summarize", type=Path, default=None, help="aggregate table4 seeds")
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
        "iou_std": scores["iou_std"],
        "acc_std": scores["acc_std"],
        "per_class_iou": scores["per_class_iou"],
        "per_class_acc": scores["per_class_acc"],
        "best_mIoU": summary["best_miou"],
        "seconds_per_iteration": sum(steps) / len(steps),
        "minutes": (time.perf_counter() - start) / 60,
    }
    print(f"{run_dir.name}: {json.dumps(row)}", flush=True)
    return row


def main() -> None:
    args = parse_args()
    if args.summarize:
        print(summarize(args.summarize, args.compare or "table4"))
        return
    args.compare = args.compare or "self_training"
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
        warm_config = WARM_START_CONFIGS.get(args.compare, "synthcity_tiny")
        results["warm_start"] = run_arm(
            warm_config,
            warm_dir,
            overrides(args.warm_start),
            ARMS["source_only"][1] + WARM_START_EXTRA.get(args.compare, []),
        )
        common.append(f'model.pretrained="{warm_dir / "checkpoints" / "latest.pth"}"')
    for name in names:
        config, extra = ARMS[name]
        run_dir = args.out / f"{name}_seed{args.seed}"
        results[name] = run_arm(config, run_dir, common, extra)
        if args.compare == "table4" and name == "blda_none":
            results["blda_none_posthoc"] = posthoc(run_dir, data)
        if args.compare in SAVED_COMPARISONS:
            write_json(args.out / f"{args.compare}_seed{args.seed}.json", results)
    print(f"machine: {machine()}")
    print(f"command: {args.iterations} iterations, seed {args.seed}, {common}")
    for name, row in results.items():
        if "seconds_per_iteration" not in row:  # post-hoc rows
            print(f"{name:14s} target val mIoU {row['mIoU']:6.2f}  mAcc {row['mAcc']:6.2f}")
            continue
        print(
            f"{name:14s} target val mIoU {row['mIoU']:6.2f}  mAcc {row['mAcc']:6.2f}  "
            f"class-acc std {row['acc_std']:6.2f}  {row['seconds_per_iteration']:.2f} s/it  "
            f"({row['minutes']:.1f} min)"
        )


def posthoc(run_dir: Path, data: Path) -> dict:
    """Post-hoc BLDA (Eq. 6-7) on the final student of `run_dir`, as `blda demo` does it: logits
    of source, target train and target val (the training evaluation's windows, every 2nd pixel
    in both axes), class distributions from target-train pseudo-labels, anchors from the
    labelled source, tau chosen by mIoU on target train's labels (held out from val). Returns
    target-val scores (in %) after calibration, and `before` (tau = 0, same pixels)."""
    from blda_tools.calibrate import CalibrateOptions, calibrate
    from blda_tools.inference.dump import PixelSampling, prepare_dump
    from blda_tools.inference.predict import InferenceSettings

    start = time.perf_counter()
    checkpoint = run_dir / "checkpoints" / "latest.pth"
    splits = {
        "source": ("gta5", "source", "all"),
        "target_train": ("cityscapes", "target", "train"),
        "target_val": ("cityscapes", "target", "val"),
    }
    stores = {}
    for name, (dataset, root, split) in splits.items():
        stores[name] = run_dir / "posthoc" / f"{name}.h5"
        if not stores[name].is_file():
            prepare_dump(
                "tiny",
                checkpoint,
                dataset,
                data / root,
                split,
                stores[name],
                inference=InferenceSettings(mode="slide", crop=(256, 256), stride=(128, 128)),
                sampling=PixelSampling(stride=2),
                workers=0,
                device="cpu",
            ).run(lambda count: None)
    options = CalibrateOptions(
        taus="0:1:0.05",
        fit_on=stores["target_train"],
        fit_labels="pseudo",
        anchor_from=stores["source"],
        select_on=stores["target_train"],
        metric="miou",
        plots=False,
    )
    result = calibrate(stores["target_val"], run_dir / "posthoc" / "calibration", options)

    def percent(metrics: dict) -> dict:
        names = {"miou": "mIoU", "macc": "mAcc", "iou_std": "iou_std", "acc_std": "acc_std"}
        row = {new: 100 * metrics[old] for old, new in names.items()}
        row["per_class_iou"] = [100 * v for v in metrics["iou"]]
        row["per_class_acc"] = [100 * v for v in metrics["acc"]]
        return row

    row = {**percent(result.after), "before": percent(result.before), "tau": result.chosen_tau}
    row["minutes"] = (time.perf_counter() - start) / 60
    print(
        f"{run_dir.name} + post-hoc (tau {result.chosen_tau}): mIoU {row['mIoU']:.2f}", flush=True
    )
    return row


TABLE4_METRICS = ("mIoU", "mAcc", "iou_std", "acc_std")


def summarize(out: Path, comparison: str = "table4") -> str:
    """Mean +- sample std over the seeds of every arm of `comparison` (table4 or mic_hrda),
    and paired differences to its baseline (none, or mic_hrda without BLDA)."""
    import statistics

    seeds = {}
    prefix = f"{comparison}_seed"
    for path in sorted(out.glob(f"{prefix}*.json")):
        seeds[int(path.stem.removeprefix(prefix))] = json.loads(path.read_text())
    lines = [f"seeds: {sorted(seeds)}"]
    arms = ["blda_none", "blda_none_posthoc", "blda_ola_source", "blda_ola", "blda_ola_cde"]
    if comparison != "table4":
        arms = ["warm_start", *COMPARISONS[comparison]]
    baseline = "blda_none" if comparison == "table4" else COMPARISONS[comparison][0]

    def spread(values):
        if len(values) < 2:
            return f"{values[0]:.2f}" if values else "-"
        return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"

    for arm in arms:
        rows = {s: r[arm] for s, r in seeds.items() if arm in r}
        cells = [spread([row[m] for row in rows.values()]) for m in TABLE4_METRICS]
        paired = []
        for metric in TABLE4_METRICS:
            # post-hoc pairs with its own tau = 0 scores (same pixels, same windows)
            pairs = [
                row[metric] - (row["before"] if "before" in row else seeds[s][baseline])[metric]
                for s, row in rows.items()
                if baseline in seeds[s]
            ]
            paired.append(spread(pairs))
        lines.append(
            f"{arm} (n={len(rows)}): "
            + " | ".join(cells)
            + f"  || minus {baseline}: "
            + " | ".join(paired)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
