"""Build `sample_data/`: a small SynthCity set, the source-only `tiny` model and its logit stores.

    python scripts/make_sample_data.py --out sample_data            # everything, ~15 min CPU

Steps (`--steps`, default all, in this order):

- `data`: `make_synthcity(OUT/synthcity, images=80, size=128x256, seed=0, val_fraction=0.5)`:
  80 source images, 40 target train, 40 target val;
- `train`: `scripts/train_source_model.py`'s trainer on the source only -> OUT/model/tiny_source.pth;
- `stores`: `blda_tools.inference.dump_logits` of that model on source, target train and target val,
  whole images at native size, every 4th (target) or 8th (source) pixel in both axes, float16, gzip ->
  OUT/stores/{source,target_train,target_val}.h5;
- then OUT/build.json records the settings, the timings and the files' sizes.

Everything is seeded (generator seed, training seed, one torch thread, deterministic algorithms),
so the same command on the same torch build writes the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from blda_tools.datasets.synthcity.generate import make_synthcity
from blda_tools.fileio import atomic_output
from blda_tools.inference.dump import PixelSampling, dump_logits
from blda_tools.inference.predict import InferenceSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_source_model import TrainSettings, save_checkpoint, train_source_model  # noqa: E402

STEPS = ("data", "train", "stores")
# store name -> (dataset, root under synthcity/, split, pixel stride). Float16 logits barely
# compress (~35 bytes per pixel with gzip), so the strides keep the stores within the 25 MB
# budget; the source, with twice the images and only used for anchors, is thinned more.
STORES = {
    "source": ("gta5", "source", "all", 8),
    "target_train": ("cityscapes", "target", "train", 4),
    "target_val": ("cityscapes", "target", "val", 4),
}
CHECKPOINT = Path("model") / "tiny_source.pth"


def build_stores(out: Path, threads: int) -> dict:
    """Dump the shipped model's logits on the three splits; return rows and seconds per store."""
    torch.set_num_threads(threads)
    written = {}
    for name, (dataset, root, split, stride) in STORES.items():
        started = time.perf_counter()
        summary = dump_logits(
            "tiny",
            out / CHECKPOINT,
            dataset,
            out / "synthcity" / root,
            split,
            out / "stores" / f"{name}.h5",
            inference=InferenceSettings(),  # whole 128 x 256 images, not Cityscapes' windows
            sampling=PixelSampling(stride=stride),
            workers=0,
            device="cpu",
            compression="gzip",
        )
        written[name] = {
            "stride": stride,
            "images": summary.images_written,
            "rows": summary.rows_written,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"stores/{name}.h5: {written[name]}", flush=True)
    return written


def file_sizes(out: Path) -> dict[str, int]:
    """Bytes per top-level part of the sample (what `du` would count, without block rounding)."""
    sizes = {}
    for part in sorted(out.iterdir()):
        files = [part] if part.is_file() else [p for p in part.rglob("*") if p.is_file()]
        sizes[part.name] = sum(p.stat().st_size for p in files)
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_data"))
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    parser.add_argument("--images", type=int, default=80, help="images per domain")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.5)
    parser.add_argument("--iterations", type=int, default=TrainSettings.iterations)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise SystemExit(
            f"--steps: unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEPS)}"
        )
    record_path = args.out / "build.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if "data" in steps:
        make_synthcity(args.out / "synthcity", images=args.images, size=tuple(args.size),
                       seed=args.seed, val_fraction=args.val_fraction)  # fmt: skip
        record["synthcity"] = {"images": args.images, "size": list(args.size),
                               "seed": args.seed, "val_fraction": args.val_fraction}  # fmt: skip
    if "train" in steps:
        settings = TrainSettings(iterations=args.iterations, seed=args.seed, threads=args.threads)
        model, meta = train_source_model(args.out / "synthcity", settings)
        save_checkpoint(model, meta, args.out / CHECKPOINT)
        record["training"] = meta
    if "stores" in steps:
        record["stores"] = {"dtype": "float16", "compression": "gzip",
                            "inference": asdict(InferenceSettings()),
                            "written": build_stores(args.out, args.threads)}  # fmt: skip
    record["command"] = "python scripts/make_sample_data.py " + " ".join(argv or sys.argv[1:])
    record["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    record["bytes"] = file_sizes(args.out)
    with atomic_output(record_path) as temporary:
        temporary.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}: {sum(record['bytes'].values()) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
