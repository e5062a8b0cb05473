"""`blda dump-logits`: parse options, call `blda_tools.inference.dump`, print what was written."""

from __future__ import annotations

import warnings
from pathlib import Path

import click
from rich.markup import escape

from blda_cli.option_rules import require
from blda_cli.progress import console, progress_bar
from blda_tools.datasets import list_datasets
from blda_tools.inference import MODES


class SizeParam(click.ParamType):
    """HEIGHTxWIDTH (or one number for a square); `none` where `allow_none`."""

    name = "HxW"

    def __init__(self, allow_none: bool = False) -> None:
        self.allow_none = allow_none

    def convert(self, value, param, ctx):
        if isinstance(value, tuple) or value is None:
            return value
        text = str(value).strip().lower()
        if self.allow_none and text == "none":
            return "none"
        parts = text.replace(",", "x").split("x")
        try:
            numbers = tuple(int(part) for part in parts)
        except ValueError:
            numbers = ()
        if len(numbers) == 1:
            numbers = numbers * 2
        if len(numbers) != 2 or min(numbers) < 1:
            expected = "HEIGHTxWIDTH like 1024x2048" + (", or none" if self.allow_none else "")
            self.fail(f"expected {expected}, got {value!r}", param, ctx)
        return numbers


@click.command("dump-logits")
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="Architecture name (see `blda_tools.models.list_models()`), `torchscript`, or "
    "`package.module:factory` returning an nn.Module (your own model).",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="Checkpoint to load (mmseg UDA, raw state dict, or the TorchScript archive).",
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Run a built-in architecture on its random initialisation, without --checkpoint "
    "(for tests and timing; refused otherwise). The weights are drawn from a fixed seed: the "
    "same in every run, so --resume continues the same model.",
)
@click.option(
    "--weights",
    type=click.Choice(["student", "teacher"]),
    default="student",
    show_default=True,
    help="Which model of a UDA checkpoint: the student (`model.`) or the EMA teacher "
    "(`ema_model.`).",
)
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Unpickle arbitrary Python objects in the checkpoint (weights_only=False). "
    "Only for files from a source you trust.",
)
@click.option(
    "--dataset",
    required=True,
    type=click.Choice(list_datasets()),
    help="Dataset layout; image-folder is classification (one score row per image, for a "
    "classifier such as resnet101).",
)
@click.option(
    "--data-root",
    required=True,
    type=click.Path(path_type=Path),
    help="The dataset's root folder, as distributed.",
)
@click.option(
    "--split",
    default=None,
    help="Cityscapes: train, val or test (default val); GTA5, SYNTHIA: all (the default) or "
    "a list file of image names; folder: all (the default), a subfolder NAME of images/ (with "
    "labels/NAME) or a list file; image-folder: a split folder (default val).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),  # a string: "dir/" reaches the library as given (a Path drops the "/")
    help="The logit store to write (.h5). Under torchrun rank r writes "
    "<stem>.rank<r>-of-<W>.h5; pass all shards to later commands.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="Whole-image or sliding-window inference. Default: the model family's test "
    "protocol (DAFormer, SegFormer, DeepLabV2: whole; HRDA/MIC: slide; others: whole).",
)
@click.option(
    "--crop",
    type=SizeParam(),
    help="Sliding-window size HxW. Default: the protocol's (1024x1024).",
)
@click.option(
    "--window-stride",
    type=SizeParam(),
    help="Step between sliding windows HxW. Default: the protocol's (512x512).",
)
@click.option(
    "--resize",
    type=SizeParam(allow_none=True),
    help="Resize images to exactly HxW (one number N: NxN; OpenCV, as mmcv) before inference; logits come back "
    "at label resolution; `none` keeps the native size. Default: the protocol's, keeping the "
    "aspect ratio within 512x1024 (DAFormer, SegFormer, DeepLabV2) or 1024x2048 (HRDA/MIC); "
    "native size for other models.",
)
@click.option("--flip", is_flag=True, help="Average with the horizontally flipped image.")
@click.option(
    "--no-amp",
    is_flag=True,
    help="No mixed precision on CUDA (float32 throughout); AMP is never used on the CPU.",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Spatial subsampling: store every S-th pixel in both axes.",
)
@click.option(
    "--pixels-per-image",
    type=click.IntRange(min=1),
    help="Store N random labelled pixels per image (with their positions) instead of maps.",
)
@click.option(
    "--stratified",
    is_flag=True,
    help="With --pixels-per-image: share N equally among the classes present.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pixel sampling.")
@click.option(
    "--max-images", type=click.IntRange(min=1), help="Only the first N images of the split."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted dump (<out>.partial), skipping the images already stored "
    "(with none stored yet, every image is dumped).",
)
@click.option("--strict", is_flag=True, help="Stop at a corrupt image instead of skipping it.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Processes decoding images while the model runs (0: the inference streams decode "
    "their own images).",
)
@click.option(
    "--streams",
    type=click.IntRange(min=1),
    help="Forward passes run at once, sharing the CPU threads. Default: 2 on a CPU with 2+ "
    "threads (both cores busy while one stream decodes or prepares rows), 1 on a GPU.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images per forward pass (images of equal size).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda, cuda:N or mps.",
)
@click.option(
    "--float32", is_flag=True, help="Store float32 logits (default float16, half the size)."
)
@click.option(
    "--compression",
    type=click.Choice(["gzip", "lzf"]),
    help="Compress the store (smaller, slower to write and read).",
)
@click.pass_context
def dump_logits_command(ctx, **options):
    """Run a segmentation model (or a classifier) on a dataset and write its logits to a logit
    store.

    Logits are stored at label resolution, one row per pixel, with the labels when the
    dataset has them (an unlabelled split gives a store without labels); a classifier on
    --dataset image-folder gives one row per image.
    """
    # The library is imported here, not at the top, so that `--help` never loads torch.
    from blda_tools.datasets import SizeMismatchWarning
    from blda_tools.inference.dump import CorruptImageWarning

    _check_options(ctx)
    # Warnings (a partial checkpoint, a resized or corrupt image) as one line each, whether
    # the dump ends well or not; every corrupt or resized image, not only the first.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorruptImageWarning)
        warnings.simplefilter("always", SizeMismatchWarning)
        try:
            job, summary = _dump(options)
        finally:
            for warning in caught:
                console.print(f"[yellow]warning:[/] {escape(str(warning.message))}")
    _print_summary(job, summary)


def _dump(options: dict):
    from blda_tools.inference.dump import PixelSampling, prepare_dump

    sampling = PixelSampling(
        stride=options["stride"],
        pixels_per_image=options["pixels_per_image"],
        stratified=options["stratified"],
        seed=options["seed"],
    )
    job = prepare_dump(
        options["model_spec"],
        options["checkpoint"],
        options["dataset"],
        options["data_root"],
        options["split"],
        options["out"],
        weights=options["weights"],
        trust_checkpoint=options["trust_checkpoint"],
        inference=_inference_settings(options),
        sampling=sampling,
        max_images=options["max_images"],
        resume=options["resume"],
        strict=options["strict"],
        workers=options["workers"],
        streams=options["streams"],
        batch_size=options["batch_size"],
        device=options["device"],
        dtype="float32" if options["float32"] else "float16",
        compression=options["compression"],
        random_weights=options["random_weights"],
    )
    for notice in job.notices:
        console.print(notice)
    if job.already_stored:
        console.print(
            f"resuming {job.out}.partial: {job.already_stored} of "
            f"{job.already_stored + job.total} images already stored, {job.total} to go"
        )
    elif options["resume"]:  # said, so that a mistyped --out is not taken for a fresh start
        partial = Path(f"{job.out}.partial")
        state = "holds no image yet" if partial.exists() else "does not exist (nothing to resume)"
        console.print(f"--resume: {partial} {state}; dumping every image", markup=False)
    with progress_bar("dump-logits", job.total, unit="images") as advance:
        return job, job.run(advance)


def _print_summary(job, summary) -> None:
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {note}")
    this_run = ""
    if job.already_stored:
        this_run = f" ({summary.images_written} image(s), {summary.rows_written:,} rows this run)"
    console.print(
        f"wrote {summary.out}: {summary.images_in_store} image(s), {summary.rows_in_store:,} rows"
        f"{this_run} on {job.device}, {summary.images_per_second:.2f} images/s"
    )


def _check_options(ctx) -> None:
    """Options that mean nothing with the others are refused, naming both."""
    for option in ("weights", "trust_checkpoint"):
        require(ctx, option, "checkpoint", "the option is about the checkpoint's contents")
    for option in ("seed", "stratified"):
        require(ctx, option, "pixels_per_image", "the option is about the pixel sampling")
    # --crop / --window-stride against a whole-image protocol: refused by resolve_inference.


def _inference_settings(options: dict) -> dict:
    """The inference settings given on the command line: changes to the model's protocol."""
    changes = {
        "mode": options["mode"],
        "crop": options["crop"],
        "stride": options["window_stride"],
        "resize": None if options["resize"] == "none" else options["resize"],
    }
    changes = {key: value for key, value in changes.items() if value is not None}
    if options["resize"] == "none":
        changes["resize"] = None
    return {**changes, "flip": options["flip"], "amp": False if options["no_amp"] else None}
