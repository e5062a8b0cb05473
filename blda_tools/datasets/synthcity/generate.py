"""SynthCity: a generated domain-shift benchmark in the GTA5 (source) and Cityscapes (target) layouts.

`make_synthcity(out, images=N, ...)` writes

- N source images ("rendered", like GTA5): ``source/images/00001.png`` and
  ``source/labels/00001.png``;
- N target images ("camera", like Cityscapes), of which ``round(N * val_fraction)`` go to val
  (at least one of each split when N >= 2 and 0 < val_fraction < 1), the rest to train:
  ``target/leftImg8bit/<split>/synthcity/synthcity_<seq>_<frame>_leftImg8bit.png`` and
  ``target/gtFine/<split>/synthcity/synthcity_<seq>_<frame>_gtFine_labelIds.png``, where
  ``<seq>`` is 000000 for train and 000001 for val and frames count from 000001;
- ``synthcity.json``: generator version, seed, size, counts, per-class pixel counts and the drift
  table (written last: its presence marks a complete set).

Label PNGs hold Cityscapes label ids (8-bit), mapped from train ids with cityscapesscripts'
official table; void pixels (the target's ego-vehicle strip) get label id 0 ("unlabeled").
Every image has its own generator seeded from (seed, stream, index), so a set is byte-identical
for the same seed whatever the order of generation. Scenes: `scenes`; appearance and
the class-dependent drift of the target: `render`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import trainId2label
from PIL import Image

from blda_tools.datasets.synthcity.render import (
    DOMAINS,
    SOURCE,
    TARGET,
    TARGET_DRIFT,
    Domain,
    render_scene,
)
from blda_tools.datasets.synthcity.scenes import (
    CLASS_NAMES,
    VOID,
    LayoutParams,
    SceneLayout,
    draw_layout,
)
from blda_tools.errors import BLDAError, check_counts
from blda_tools.fileio import atomic_output
from blda_tools.outputs import checked_output_path, output_set, read_manifest, record_set
from blda_tools.runtime.process import worker_processes

__all__ = [
    "CLASS_NAMES", "DOMAINS", "GENERATOR_VERSION", "SOURCE", "TARGET", "TARGET_DRIFT", "Domain",
    "LayoutParams", "SceneLayout", "SynthCityInfo", "draw_layout", "generate_scene", "image_generator",
    "make_synthcity", "render_scene", "split_counts", "train_ids_to_label_ids",
]  # fmt: skip

GENERATOR_VERSION = 1
# The owner of the set's files in the output record (`blda_tools.outputs`): `blda synthcity make`.
COMMAND = "synthcity"
PNG_COMPRESS_LEVEL = 3  # explicit (files must not depend on Pillow's default); 6 is 2-3x slower for ~5% smaller files
MIN_SIZE = 32
# Streams of the per-image seeds: every (split, index) has its own generator.
_STREAMS = {"source": 0, "target/train": 1, "target/val": 2}


@dataclass
class SynthCityInfo:
    """What `make_synthcity` wrote: image counts and per-class pixel counts per split."""

    root: Path
    seed: int
    size: tuple[int, int]
    counts: dict[str, int]  # "source", "target/train", "target/val" -> images
    class_pixels: dict[str, list[int]] = field(default_factory=dict)  # split -> 19 counts
    void_pixels: dict[str, int] = field(default_factory=dict)

    @property
    def total_images(self) -> int:
        return sum(self.counts.values())


def split_counts(images: int, val_fraction: float) -> dict[str, int]:
    """How `images` maps to the three splits: N source, N target split into train and val."""
    check_counts(images=images)  # at most 2**31 - 1: numpy takes no larger count
    if not 0.0 <= val_fraction < 1.0:
        raise BLDAError(f"--val-fraction: expected a number in [0, 1), got {val_fraction!r}")
    val = int(round(images * val_fraction))
    if val_fraction > 0 and images >= 2:
        val = min(max(val, 1), images - 1)
    return {"source": images, "target/train": images - val, "target/val": val}


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map train ids (0..18, 255 = void) to Cityscapes label ids with the official table."""
    table = np.zeros(256, dtype=np.uint8)  # anything unknown stays 0 = "unlabeled"
    for train_id, label in trainId2label.items():
        if 0 <= train_id < 256:
            table[train_id] = label.id
    return table[train_ids]


def generate_scene(
    domain: Domain, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One scene of `domain`: an (H, W, 3) uint8 image and its (H, W) uint8 train ids."""
    layout = draw_layout(rng, size, domain.layout)
    return render_scene(layout, domain, rng), layout.labels


def image_generator(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`, independent of every other image's."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, _STREAMS[split], index]))
    )


def _paths(root: Path, split: str, index: int) -> tuple[Path, Path]:
    """Image and label paths of image `index` (0-based) in the official layouts."""
    if split == "source":
        name = f"{index + 1:05d}.png"
        return root / "source" / "images" / name, root / "source" / "labels" / name
    subset = split.split("/")[1]
    stem = f"synthcity_{int(subset == 'val'):06d}_{index + 1:06d}"
    return (
        root / "target" / "leftImg8bit" / subset / "synthcity" / f"{stem}_leftImg8bit.png",
        root / "target" / "gtFine" / subset / "synthcity" / f"{stem}_gtFine_labelIds.png",
    )


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as temporary:  # an OS failure names the file
        Image.fromarray(array).save(temporary, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _adopt_earlier_set(root: Path) -> None:
    """A set generated before blda recorded its outputs (`outputs.MANIFEST`) is recognised by
    its synthcity.json and recorded as this command's, so that a re-run replaces it."""
    manifest = root / "synthcity.json"
    if not manifest.is_file() or COMMAND in read_manifest(root):
        return
    try:
        content = json.loads(manifest.read_text())
        generator, counts = content.get("generator"), content.get("counts")
    except (OSError, ValueError, AttributeError):
        return
    if generator != "blda SynthCity" or not isinstance(counts, dict):
        return
    if not all(  # a record this generator could have written (10^7: a sanity bound)
        split in _STREAMS and isinstance(count, int) and 0 <= count <= 10**7
        for split, count in counts.items()
    ):
        return
    # Only the files its counts name: a PNG put beside them (or left by `cp -r A/* B`, which
    # copies no record) is the user's, and a re-run must not remove it.
    earlier = [
        path.relative_to(root).as_posix()
        for split, count in counts.items()
        for index in range(count)
        for path in _paths(root, split, index)
        if path.is_file()
    ]
    record_set(root, COMMAND, [*earlier, "synthcity.json"])


def _parse_size(size) -> tuple[int, int]:
    try:
        height, width = size
    except (TypeError, ValueError):
        raise BLDAError(f"--size: expected (height, width), got {size!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
        raise BLDAError(f"--size: expected whole numbers of pixels, got {size!r}")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise BLDAError(
            f"--size: height and width must be at least {MIN_SIZE}, got {height}x{width}"
        )
    return height, width


def make_synthcity(
    out: str | os.PathLike,
    images: int = 100,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    val_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> SynthCityInfo:
    """Generate a SynthCity set under `out`: `images` source and `images` target images.

    See the module docstring for the layout and `split_counts` for the target train/val split.
    `progress(done, total)` is called after each image is written. `workers` > 1 generates in
    that many processes; the files are the same whatever the number of workers.
    """
    size = _parse_size(size)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise BLDAError(f"--seed: expected a non-negative whole number, got {seed!r}")
    if not isinstance(workers, int) or workers < 1:
        raise BLDAError(f"--workers: expected a positive whole number, got {workers!r}")
    counts = split_counts(images, val_fraction)
    root = checked_output_path(out, "--out")
    info = SynthCityInfo(root=root, seed=seed, size=size, counts=counts)
    tasks = [(split, index) for split, count in counts.items() for index in range(count)]
    names = [p.relative_to(root).as_posix() for task in tasks for p in _paths(root, *task)]
    names.append("synthcity.json")
    if root.is_dir():
        _adopt_earlier_set(root)
    with output_set(root, COMMAND, names) as outputs:
        _generate(info, outputs.staging, tasks, val_fraction, progress, workers)
    return info


def _generate(info: SynthCityInfo, staging: Path, tasks, val_fraction, progress, workers) -> None:
    """Write every image and the manifest into `staging` (moved into place by the caller)."""
    seed, size, counts = info.seed, info.size, info.counts
    histograms = {split: np.zeros(256, dtype=np.int64) for split in counts}
    write = functools.partial(_write_image, staging, seed, size)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(worker_processes(workers, "synthcity make"))
            results = pool.map(write, tasks, chunksize=4)
        else:
            results = map(write, tasks)
        for done, ((split, _), histogram) in enumerate(zip(tasks, results, strict=True), 1):
            histograms[split] += histogram
            if progress is not None:
                progress(done, len(tasks))
    for split, histogram in histograms.items():
        info.class_pixels[split] = histogram[: len(CLASS_NAMES)].tolist()
        info.void_pixels[split] = int(histogram[VOID])
    _write_manifest(info, val_fraction, staging)


def _write_image(root: Path, seed: int, size: tuple[int, int], task: tuple[str, int]) -> np.ndarray:
    """Generate and write one image and its labels; return the label histogram (256 bins)."""
    split, index = task
    domain = SOURCE if split == "source" else TARGET
    image, train_ids = generate_scene(domain, size, image_generator(seed, split, index))
    image_path, label_path = _paths(root, split, index)
    _write_png(image_path, image)
    _write_png(label_path, train_ids_to_label_ids(train_ids))
    return np.bincount(train_ids.ravel(), minlength=256)


def _write_manifest(info: SynthCityInfo, val_fraction: float, directory: Path) -> None:
    manifest = {
        "generator": "blda SynthCity",
        "generator_version": GENERATOR_VERSION,
        "seed": info.seed,
        "size": {"height": info.size[0], "width": info.size[1]},
        "val_fraction": val_fraction,
        "counts": info.counts,
        "class_names": list(CLASS_NAMES),
        "class_pixels": info.class_pixels,
        "void_pixels": info.void_pixels,
        "label_encoding": "Cityscapes label ids (cityscapesscripts trainId2label); void = 0",
        "target_drift": [
            {"class": CLASS_NAMES[cls], "towards": CLASS_NAMES[towards], "amount": amount}
            for cls, (towards, amount) in sorted(TARGET_DRIFT.items())
        ],
    }
    with atomic_output(directory / "synthcity.json") as temporary:
        temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
