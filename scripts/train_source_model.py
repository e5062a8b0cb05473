"""Train the `tiny` model on the SynthCity source, supervised only (no target data at all).

A plain, reproducible trainer for the shipped sample (used instead of `blda train`, whose
DAFormer recipe with rare-class sampling and self-training is more than a source-only sample
needs and is tuned for longer runs): every source image is decoded once into memory, each
iteration takes a seeded random batch with random horizontal flips, and AdamW with a poly
learning-rate decay minimises the pixel cross-entropy (void ignored). Same seed, same thread
count and same torch build give the same weights (deterministic algorithms on the CPU).

    python scripts/train_source_model.py --data sample_data/synthcity \
        --out sample_data/model/tiny_source.pth --iterations 1500 --threads 1

The checkpoint is `{"state_dict": ..., "meta": {...}}` and loads with
`blda_tools.models.load_checkpoint` or `blda dump-logits --model tiny --checkpoint FILE`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from blda_tools.datasets import build_dataset
from blda_tools.errors import BLDAError
from blda_tools.fileio import atomic_output
from blda_tools.models import create_model, normalize


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the weights (written into the checkpoint's `meta`)."""

    iterations: int = 1500
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 1e-2
    poly_power: float = 0.9
    seed: int = 0
    # One thread: on a shared 2-core machine two threads contend and run several times slower,
    # and a fixed thread count keeps the float reductions, hence the weights, reproducible.
    threads: int = 1


def load_source(root: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """All source images `(N, 3, H, W)` uint8 and labels `(N, H, W)` int64 of a SynthCity root."""
    dataset = build_dataset("gta5", Path(root) / "source", "all")
    if len(dataset) == 0:
        raise BLDAError(f"--data {root}: the source split holds no images")
    samples = [dataset[index] for index in range(len(dataset))]
    images = torch.stack([sample.image for sample in samples])
    labels = torch.stack([sample.label for sample in samples])
    return images, labels, tuple(dataset.class_names)


def poly_learning_rate(settings: TrainSettings, iteration: int) -> float:
    """DAFormer's poly schedule: lr * (1 - t / T) ** power."""
    remaining = 1.0 - iteration / settings.iterations
    return settings.learning_rate * remaining**settings.poly_power


def random_batch(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch (with replacement) in which each image is flipped left-right at random."""
    chosen = torch.randint(len(images), (batch_size,), generator=generator)
    batch_images, batch_labels = images[chosen].clone(), labels[chosen].clone()
    flipped = torch.rand(batch_size, generator=generator) < 0.5
    batch_images[flipped] = batch_images[flipped].flip(-1)
    batch_labels[flipped] = batch_labels[flipped].flip(-1)
    return batch_images, batch_labels


def train_source_model(
    root: str | os.PathLike, settings: TrainSettings, log_every: int = 100
) -> tuple[torch.nn.Module, dict]:
    """Train `tiny` on the source of the SynthCity set at `root`; return it and its `meta`."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    images, labels, class_names = load_source(root)
    model = create_model("tiny", len(class_names))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    model.train()
    for iteration in range(settings.iterations):
        for group in optimizer.param_groups:
            group["lr"] = poly_learning_rate(settings, iteration)
        batch_images, batch_labels = random_batch(images, labels, settings.batch_size, generator)
        logits = model(normalize(batch_images))
        logits = F.interpolate(
            logits, size=batch_labels.shape[-2:], mode="bilinear", align_corners=False
        )
        loss = F.cross_entropy(logits, batch_labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (iteration + 1) % log_every == 0:
            print(
                f"iteration {iteration + 1}/{settings.iterations} loss {loss.item():.4f} "
                f"({time.perf_counter() - started_wall:.0f} s wall)",
                flush=True,
            )
    model.eval()
    meta = {
        "arch": "tiny",
        "classes": list(class_names),
        "trained_on": "SynthCity source (GTA5 layout), supervised only",
        "source_images": len(images),
        "settings": asdict(settings),
        "wall_seconds": round(time.perf_counter() - started_wall, 1),
        "cpu_seconds": round(time.process_time() - started_cpu, 1),
        "torch": str(torch.__version__),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    return model, meta


def save_checkpoint(model: torch.nn.Module, meta: dict, path: str | os.PathLike) -> Path:
    """Write `{"state_dict", "meta"}` atomically (plain tensors and containers only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, temporary)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="SynthCity root (holds source/)")
    parser.add_argument("--out", required=True, help="checkpoint file to write")
    defaults = TrainSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = TrainSettings(**{k: getattr(args, k) for k in asdict(TrainSettings())})
    model, meta = train_source_model(args.data, settings)
    save_checkpoint(model, meta, args.out)
    print(f"wrote {args.out}: {meta['wall_seconds']} s wall, {meta['cpu_seconds']} s CPU")


if __name__ == "__main__":
    main()
