"""One GPU check of the paper configs, meant to finish in under 10 minutes on one GPU.

    python benchmarks/gpu_check.py --out /tmp/gpu_check            # needs a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc   # CPU smoke test

It generates a small SynthCity set (blda_tools.datasets.synthcity.make_synthcity) large enough
for the paper's crops (1024 x 2048 frames: HRDA's 1024 crops, DAFormer's 512 crops after its
512 x 1024 resize), trains a few iterations of gta2cs_mic_hrda_mitb5_blda and
gta2cs_daformer_mitb5_blda from random weights (no backbone weights, no ImageNet feature
distance, AMP bf16), each against its twin without BLDA (loss.name cross_entropy), and prints iterations/s and
peak GPU memory (torch.cuda.max_memory_allocated) of each, from the same run, plus a dump of the
logits of a few target-val images (blda_tools.inference.dump_logits) with the trained weights.
`--tiny` shrinks everything
(hrda_tiny / tiny models, 128 x 256 frames) to smoke-test the script itself; its figures mean
nothing. Exits 2 with one line when the device is missing.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from blda_tools.datasets.synthcity.generate import make_synthcity
from blda_tools.errors import BLDAError
from blda_tools.inference.dump import dump_logits
from blda_tools.inference.predict import InferenceSettings
from blda_tools.training import read_log, train
from blda_tools.training.config import load_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--iterations", type=int, default=0, help="default 20 (tiny 3)")
    parser.add_argument("--images", type=int, default=0, help="SynthCity images, default 8")
    return parser.parse_args()


def arms(tiny: bool) -> dict[str, tuple[str, list[str]]]:
    """name -> (shipped config, overrides that fit it to the SynthCity set). Each runs as
    itself (loss.name cross_entropy) and as its `_blda` twin (loss.name blda)."""
    hrda = "gta2cs_mic_hrda_mitb5"
    if tiny:
        hr = ["model.arch=hrda_tiny", "data.source_size=[128, 256]"]
        hr += ["data.target_size=[128, 256]", "augment.crop_size=[64, 64]"]
        hr += ["hrda.detail_crop_size=[32, 32]", "evaluation.resize=[]"]
        hr += ["evaluation.crop_size=[64, 64]", "evaluation.stride=[32, 32]"]
        hr += ["self_training.crop_pseudo_margins=[]", "mic.mask_block_size=16"]
        df = ["model.arch=tiny", "data.source_size=[128, 256]", "data.target_size=[128, 256]"]
        df += ["augment.crop_size=[64, 64]", "evaluation.resize=[]"]
        df += ["evaluation.crop_size=[64, 128]", "evaluation.stride=[64, 128]"]
        df += ["self_training.ignore_top_rows=2", "self_training.ignore_bottom_rows=8"]
    else:  # the configs' own sizes: 1024 x 2048 frames (HRDA) and DAFormer's 512 x 1024
        hr = ["data.source_size=[1024, 2048]"]
        df = ["data.source_size=[512, 1024]"]
    return {hrda: (hrda, hr), "gta2cs_daformer_mitb5": ("gta2cs_daformer_mitb5", df)}


def common_overrides(data: Path, args: argparse.Namespace) -> list[str]:
    return [
        f'data.root="{data}"',
        'data.source_root="source"',
        'data.target_root="target"',
        f"run.iterations={args.iterations}",
        f"run.checkpoint_interval={args.iterations}",
        f"evaluation.interval={args.iterations}",
        "evaluation.max_images=2",
        f"run.log_interval={max(1, args.iterations // 4)}",
        f'run.device="{args.device}"',
        f'run.amp="{"none" if args.device == "cpu" else "bf16"}"',
        "run.num_workers=0" if args.tiny else "run.num_workers=4",
        "run.live=false",
        'model.backbone_weights=""',
        "feature_distance.enabled=false",
        "rcs.min_pixels=2" if args.tiny else "rcs.min_pixels=3000",
    ]


def run_arm(config: str, run_dir: Path, overrides: list[str], device: str) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(config, run_dir, overrides)
    minutes = (time.perf_counter() - start) / 60
    steps = [r["seconds_per_iteration"] for r in read_log(run_dir) if r["kind"] == "train"]
    # The first logged interval holds the warm-up (cuDNN autotune, allocator); skip it if more.
    steady = steps[1:] or steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"it_per_s": len(steady) / sum(steady), "peak_gib": peak, "minutes": minutes}


def dump_check(arch: str, checkpoint: Path, data: Path, out: Path, args: argparse.Namespace) -> str:
    crop, stride = ((64, 64), (32, 32)) if args.tiny else ((1024, 1024), (512, 512))
    start = time.perf_counter()
    summary = dump_logits(
        arch,
        checkpoint,
        "cityscapes",
        data / "target",
        "val",
        out,
        inference=InferenceSettings(mode="slide", crop=crop, stride=stride),
        max_images=2,
        workers=0,
        device=args.device,
    )
    return (
        f"dump-logits {arch}: {summary.images_written} images, {summary.rows_written} rows "
        f"in {time.perf_counter() - start:.1f} s -> {out}"
    )


def machine(device: str) -> str:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (CPU run)"
    return (
        f"{platform.node()} {platform.machine()} python {platform.python_version()} "
        f"torch {torch.__version__} CUDA {torch.version.cuda} cuDNN "
        f"{torch.backends.cudnn.version()} {gpu}"
    )


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
        return 2
    args.iterations = args.iterations or (3 if args.tiny else 20)
    images = args.images or (4 if args.tiny else 8)
    size = (128, 256) if args.tiny else (1024, 2048)
    data = args.out / "synthcity"
    if not (data / "synthcity.json").is_file():
        start = time.perf_counter()
        make_synthcity(data, images=images, size=size, seed=0)
        print(f"SynthCity {images} images {size}: {time.perf_counter() - start:.1f} s", flush=True)
    common = common_overrides(data, args)
    rows = {}
    for name, (config, extra) in arms(args.tiny).items():
        for loss, suffix in (("cross_entropy", ""), ("blda", "_blda")):
            run_dir = args.out / f"{name}_{loss}"
            overrides = [*common, *extra]
            rows[f"{name} {loss}"] = run_arm(config + suffix, run_dir, overrides, args.device)
            print(f"{name} {loss}: {rows[f'{name} {loss}']}", flush=True)
    dumps = []
    for name, (config, extra) in arms(args.tiny).items():
        arch = load_config(config, [*common, *extra]).model.arch
        checkpoint = args.out / f"{name}_blda" / "checkpoints" / "latest.pth"
        dumps.append(dump_check(arch, checkpoint, data, args.out / f"{name}.h5", args))
    print(f"machine: {machine(args.device)}")
    print(f"{args.iterations} iterations each, {images} SynthCity images {size}")
    print(f"{'run':52s} {'it/s':>8s} {'peak GiB':>9s} {'minutes':>8s}")
    for name, row in rows.items():
        print(f"{name:52s} {row['it_per_s']:8.3f} {row['peak_gib']:9.2f} {row['minutes']:8.2f}")
    for name in arms(args.tiny):
        ce, blda = rows[f"{name} cross_entropy"], rows[f"{name} blda"]
        print(
            f"{name}: BLDA / CE  it/s {blda['it_per_s'] / ce['it_per_s']:.3f}  "
            f"peak {blda['peak_gib'] / ce['peak_gib']:.3f}"
        )
    print("\n".join(dumps))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BLDAError as error:
        print(f"gpu_check: {error}")
        sys.exit(2)
