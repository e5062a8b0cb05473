"""`blda demo`: parse options, call `blda_tools.demo.run_demo`, print the results."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from blda_cli.progress import console, progress_bar

if TYPE_CHECKING:
    from blda_tools.demo import DemoResult


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (created if needed); the sample is only read.",
)
@click.option(
    "--sample-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="the repository's sample_data/",
    help="A sample built by scripts/make_sample_data.py.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Reduced run for CI: 8 images per split, every 4th pixel, tau in 0:1:0.25.",
)
@click.option(
    "--metric",
    type=click.Choice(["miou", "macc"]),
    default="miou",
    show_default=True,
    help="What the tau selection on target train maximises.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="torch CPU threads. More threads than free cores slow torch down many times over "
    "(measured: 6x with 2 threads on a busy 2-core machine); raise it on an idle machine.",
)
def demo_command(out_dir, sample_dir, quick, metric, threads):
    """The whole pipeline on the shipped SynthCity sample: dump-logits -> diagnose -> calibrate.

    A source-only model is diagnosed on target val, then calibrated post hoc (class
    distributions from pseudo-labels on target train, anchors from the source, tau chosen on
    target train's labels). Writes OUT/report.html, OUT/demo.json and the stores, diagnosis and
    calibration under OUT.
    """
    # The library is imported here, not at the top, so that `--help` never loads torch.
    from blda_tools.demo import DEFAULT_SAMPLE_DIR, DemoSettings, run_demo

    sample_dir = DEFAULT_SAMPLE_DIR if sample_dir is None else sample_dir
    settings = DemoSettings.quick() if quick else DemoSettings()
    settings = DemoSettings(settings.stride, settings.max_images, settings.taus, metric)
    result = run_demo(
        out_dir, sample_dir, settings=settings, threads=threads, progress=progress_bar
    )
    console.print(_class_table(result))
    _print_summary(result)


def _class_table(result: DemoResult) -> Table:
    diagnosis, calibration = result.diagnosis, result.calibration
    before, after = calibration.before, calibration.after
    table = Table(title="Target val: class bias (Bias > 0: over-predicted) and calibration")
    columns = ["class", "pixels", "Bias (Eq. 4)", "Bias est. (Eq. 5)", "IoU", "IoU after",
               "Acc", "Acc after"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    rows = zip(
        diagnosis.classes, diagnosis.class_pixels, diagnosis.bias, diagnosis.bias_estimated,
        before["iou"], after["iou"], before["acc"], after["acc"], strict=True,
    )  # fmt: skip
    for name, pixels, bias, estimated, iou, iou_after, acc, acc_after in rows:
        table.add_row(
            Text(name), f"{pixels:,}", _fmt(bias, "+.4f"), _fmt(estimated, "+.4f"),
            _fmt(iou, ".1%"), _fmt(iou_after, ".1%"), _fmt(acc, ".1%"), _fmt(acc_after, ".1%"),
            style="red" if bias is not None and bias > diagnosis.balanced_tolerance else None,
        )  # fmt: skip
    return table


def _print_summary(result: DemoResult) -> None:
    calibration = result.calibration
    before, after = calibration.before, calibration.after
    selection = calibration.selection
    for warning in calibration.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    for note in calibration.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(
        f"before: mIoU {before['miou']:.1%}  mAcc {before['macc']:.1%}  "
        f"IoU std {before['iou_std']:.1%}"
    )
    console.print(
        f"after (tau {calibration.chosen_tau:g}, chosen by {selection['metric']} on "
        f"{selection['how']}): mIoU {after['miou']:.1%}  mAcc {after['macc']:.1%}  "
        f"IoU std {after['iou_std']:.1%}"
    )
    console.print(
        "Spearman(Eq. 4, Eq. 5) on target val: "
        f"{_fmt(result.diagnosis.bias_rank_correlation, '.3f')}"
    )
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.seconds.items())
    console.print(
        f"wrote {result.report} and {result.out_dir / 'demo.json'} ({stages})", markup=False
    )


def _fmt(value, spec: str) -> str:
    from blda_tools.report.html import format_value  # "n/a" for None / NaN, never "-0.0"

    return format_value(value, spec)
