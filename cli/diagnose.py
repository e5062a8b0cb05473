"""`blda diagnose`: parse options, call `blda_tools.diagnose.diagnose`, print the results."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from blda_cli.progress import console, progress_bar

if TYPE_CHECKING:
    from blda_tools.statistics import LogitGrid


eval_classes_option = click.option(
    "--eval-classes",
    default="all",
    show_default=True,
    help="Classes mIoU and mAcc average over: all, synthia16 or synthia13 (the SYNTHIA to "
    "Cityscapes protocols: no terrain, truck, train; and no wall, fence, pole) or class names "
    "(road,car,...). Each class's IoU still comes from the whole confusion matrix.",
)


@click.command("diagnose")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory (created if needed).",
)
@click.option(
    "--labels",
    type=click.Choice(["auto", "gt", "pseudo"]),
    default="auto",
    show_default=True,
    help="Rows of the logit-set matrix: ground truth, pseudo-labels (argmax), or ground "
    "truth when the stores have it.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes that stream parts of the stores in parallel.",
)
@click.option(
    "--grid",
    "grid_spec",
    default="-50:50:4000",
    show_default=True,
    help="Histogram grid LOW:HIGH:BINS shared by every class pair.",
)
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots and the HTML report.")
@eval_classes_option
def diagnose_command(stores, out_dir, labels, workers, grid_spec, no_plots, eval_classes):
    """Measure class bias from logit STORES (shards of one store may be listed together).

    Writes DIR/diagnosis.json, DIR/statistics.h5 (`blda calibrate --fit-on` / `--anchor-from`
    take it instead of the stores), PNG plots and a self-contained DIR/report.html. A re-run
    replaces the files an earlier diagnose wrote there (docs/outputs.md).
    """
    # The library is imported here, not at the top, so that `--help` never loads torch. The
    # figure workers start first (a light import): they load matplotlib on the other core
    # while this process loads torch (`blda_tools.plots.workers`).
    from blda_tools.plots import workers as figure_workers

    with figure_workers.FigureWorkers(
        0 if no_plots else figure_workers.DEFAULT_PROCESSES
    ) as figures:
        from blda_tools.diagnose import diagnose, diagnosis_passes

        grid = parse_grid(grid_spec)
        total = diagnosis_passes(stores, labels)
        with progress_bar("diagnose", total, unit="px") as advance:
            result = diagnose(
                stores,
                out_dir,
                labels=labels,
                workers=workers,
                grid=grid,
                plots_and_report=not no_plots,
                progress=advance,
                figures=figures,
                eval_classes=eval_classes,
            )
    console.print(_results_table(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if result.miou is not None:
        over = f" ({len(result.eval_classes)} classes)" if result.eval_classes else ""
        console.print(
            f"mIoU{over} {result.miou:.1%}  mAcc{over} {result.macc:.1%}  IoU std {result.iou_std:.1%}  "
            f"Spearman(Eq. 4, Eq. 5) {_fmt(result.bias_rank_correlation, '.3f')}"
        )
    # every file of the set (statistics.h5 and the figures too), by name, as calibrate does
    written = sorted(Path(str(name)).name for name in result.files.values())
    console.print(f"wrote {', '.join(written)} in {out_dir}", markup=False)
    from blda_tools.report.explain import after_diagnose

    console.print("next:", highlight=False)
    for line in after_diagnose(result.stores, out_dir, result.bias is not None):
        console.print(f"  {line}", highlight=False, markup=False)


def parse_grid(spec: str) -> LogitGrid:
    """LOW:HIGH:BINS -> LogitGrid, with a clear error for anything else."""
    from blda_tools.statistics import LogitGrid

    parts = spec.split(":")
    try:
        low, high, bins = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise click.BadParameter(
            f"expected LOW:HIGH:BINS like -50:50:4000, got {spec!r}", param_hint="--grid"
        ) from None
    return LogitGrid(low=low, high=high, bins=bins)


def _results_table(result) -> Table:
    from blda_tools.diagnose import CLASS_TABLE_FORMATS, class_table

    columns, rows = class_table(result)
    table = Table(title="Class bias (Bias > 0: over-predicted)", show_lines=False)
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in rows:
        cells = [Text(row[0])] + [
            _fmt(value, CLASS_TABLE_FORMATS[column])
            for column, value in zip(columns[1:], row[1:], strict=True)
        ]
        bias = row[4] if row[4] is not None else row[5]
        over = bias is not None and bias > result.balanced_tolerance
        style = "red" if over else None
        table.add_row(*cells, style=style)
    return table


def _fmt(value, spec: str) -> str:
    from blda_tools.report.html import format_value  # "n/a" for None / NaN, never "-0.0"

    return format_value(value, spec)
