"""`blda synthcity make`: generate the SynthCity domain-shift benchmark."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import click
from rich.table import Table

from blda_cli.progress import make_console, progress_bar
from blda_tools.errors import BLDAError, Interrupted

if TYPE_CHECKING:
    from blda_tools.datasets.synthcity.generate import SynthCityInfo


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``256x512``) into (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise BLDAError(f"--size: expected HxW like 256x512, got {text!r}")
    return int(match.group(1)), int(match.group(2))


@click.group("synthcity")
def synthcity() -> None:
    """SynthCity: generated street scenes with a class-dependent domain shift."""


@synthcity.command("make")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--images", default=100, show_default=True, type=int,
              help="N >= 1: N source images and N target images (split into train and val).")  # fmt: skip
@click.option(
    "--size",
    "size_text",
    default="256x512",
    show_default=True,
    help="HxW in pixels, each at least 32.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Same seed, same files (a whole number >= 0).",
)
@click.option("--val-fraction", default=0.25, show_default=True, type=float,
              help="Share of the N target images that go to the val split, in [0, 1) (at least one image once N >= 2 and it is > 0).")  # fmt: skip
@click.option("--workers", default=1, show_default=True, type=int,
              help="Processes to generate with, >= 1 (same files whatever the number).")  # fmt: skip
def make(out, images, size_text, seed, val_fraction, workers) -> None:
    """Write source (GTA5 layout) and target (Cityscapes layout) images and labels.

    A set this command wrote in --out before is replaced; other files there are not touched.
    """
    # The library is imported here, not at the top, so that `--help` never loads torch.
    from blda_tools.datasets.synthcity.generate import make_synthcity, split_counts

    size = parse_size(size_text)
    total = sum(split_counts(images, val_fraction).values())
    try:
        with progress_bar("synthcity", total, unit="images") as advance:
            info = make_synthcity(out, images=images, size=size, seed=seed,
                                  val_fraction=val_fraction, progress=lambda done, _: advance(1),
                                  workers=workers)  # fmt: skip
    except KeyboardInterrupt:
        # The set is built in a staging folder (`outputs.output_set`) and moved in when complete.
        raise Interrupted(
            f"synthcity interrupted: nothing was moved into {out}; run the same command again "
            "(it removes the unfinished staging folder)"
        ) from None
    make_console(stderr=False).print(_summary(info))


def _summary(info: SynthCityInfo) -> Table:
    """Images per split, where they are, and the commonest and rarest classes."""
    table = Table(title=f"SynthCity {info.size[0]}x{info.size[1]}, seed {info.seed}: {info.root}")
    for column in ("split", "images", "layout", "commonest class", "rarest class"):
        table.add_column(column)
    layouts = {"source": "GTA5", "target/train": "Cityscapes", "target/val": "Cityscapes"}
    for split, count in info.counts.items():
        pixels = info.class_pixels.get(split, [])
        # The rarest class that is there: a class the split lacks is not "rare".
        ranked = sorted((c for c in range(len(pixels)) if pixels[c]), key=lambda c: pixels[c])
        common, rare = (
            (_share(pixels, ranked[-1]), _share(pixels, ranked[0])) if sum(pixels) else ("-", "-")
        )
        absent = sum(1 for value in pixels if value == 0)
        if absent and sum(pixels):
            rare += f", {absent} class{'es' if absent > 1 else ''} absent"
        table.add_row(split, str(count), layouts[split], common, rare)
    return table


def _share(pixels: list[int], train_id: int) -> str:
    from blda_tools.datasets.synthcity.generate import CLASS_NAMES

    return f"{CLASS_NAMES[train_id]} ({100 * pixels[train_id] / sum(pixels):.2f}%)"
