"""`blda calibrate` and `blda export`: parse options, call one library function, print a table."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from blda_cli.diagnose import eval_classes_option, parse_grid
from blda_cli.option_rules import given, refuse_together
from blda_cli.progress import console, progress_bar
from blda_tools.errors import BLDAError

PATH = click.Path(path_type=Path)


@click.command("calibrate", short_help="Post-hoc CDF alignment (Eq. 6-7): fit, tau sweep, --apply.")
@click.argument("stores", nargs=-1, required=True, type=PATH)
@click.option("--out", "out_dir", required=True, type=PATH, help="Output directory.")
@click.option(
    "--tau",
    "tau_spec",
    default=None,
    help="Scale of the offsets (Eq. 7), each in [0, 10000]: 0.1, START:STOP:STEP (inclusive) or "
    "0,0.1,0.5,1. Default 0:1:0.1 when fitting; the calibrator's own tau with --apply.",
)
@click.option(
    "--apply",
    "apply_path",
    type=PATH,
    default=None,
    help="Apply a saved CALIBRATOR (calibrator.pt) to STORES instead of fitting one.",
)
@click.option(
    "--fit-on",
    multiple=True,
    type=PATH,
    help="Store(s) the class-wise distributions come from, or a statistics.h5 written by "
    "`blda diagnose` (its pass is then skipped; rows as --fit-labels, grid as --grid). Repeat "
    "for several; default: the evaluated STORES.",
)
@click.option(
    "--fit-labels",
    type=click.Choice(["gt", "pseudo"]),
    default="pseudo",
    show_default=True,
    help="Rows of the fit-on statistics: ground truth or pseudo-labels (argmax).",
)
@click.option(
    "--anchor-from",
    multiple=True,
    type=PATH,
    help="Store(s) the anchors come from (ground truth when present), or a statistics.h5 of "
    "`blda diagnose`; default: the fit-on statistics. Repeat for several.",
)
@click.option(
    "--anchor",
    default="global",
    show_default=True,
    help="'global' (pooled diagonal / off-diagonal cells) or 'class:NAME' (Table 14).",
)
@click.option(
    "--select-on",
    multiple=True,
    type=PATH,
    help="Labelled held-out store(s) on which tau is chosen (repeat for several).",
)
@click.option(
    "--metric",
    type=click.Choice(["miou", "macc"]),
    default="miou",
    show_default=True,
    help="What the choice of tau maximises: mean IoU or mean class accuracy.",
)
@eval_classes_option
@click.option(
    "--estimator",
    type=click.Choice(["gmm", "empirical"]),
    default="gmm",
    show_default=True,
    help="CDF of each logit set (Eq. 6): a Gaussian mixture fitted to its histogram, or the "
    "histogram's empirical CDF.",
)
@click.option(
    "--components",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Gaussian components per logit set (with --estimator gmm).",
)
@click.option("--eps", type=float, default=0.01, show_default=True, help="CDF clamp (Eq. 6).")
@click.option(
    "--min-samples",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Cells with fewer logits get no offset (listed in calibration.json).",
)
@click.option(
    "--table-points",
    type=click.IntRange(min=16),
    default=2048,
    show_default=True,
    help="Grid points of each logit column's offset table.",
)
@click.option(
    "--grid",
    "grid_spec",
    default="-50:50:4000",
    show_default=True,
    help="Histogram grid LOW:HIGH:BINS of the logit-set statistics (that of a statistics.h5 "
    "given to --fit-on / --anchor-from).",
)
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.pass_context
def calibrate_command(ctx, stores, out_dir, tau_spec, apply_path, **options):
    """Post-hoc CDF alignment (Eq. 6-7) of logit STORES: fit, sweep tau, choose it, or --apply.

    Writes DIR/calibrator.pt, DIR/calibration.json, DIR/sweep.csv (when the evaluated
    stores have labels) and plots (unless --no-plots); with --apply, calibrated predictions
    (PNG pairs per image, or DIR/predictions.h5).
    """
    # The library is imported here, not at the top, so that `--help` never loads torch.
    from blda_tools.calibrate import DEFAULT_TAUS, CalibrateOptions, calibrate, calibration_passes
    from blda_tools.report.explain import after_calibrate

    _check_options(ctx)
    if apply_path is not None:
        _apply(apply_path, stores, out_dir, tau_spec)
        return
    config = CalibrateOptions(
        taus=DEFAULT_TAUS if tau_spec is None else tau_spec,
        fit_on=list(options["fit_on"]) or None,
        fit_labels=options["fit_labels"],
        anchor_from=list(options["anchor_from"]) or None,
        anchor=options["anchor"],
        select_on=list(options["select_on"]) or None,
        metric=options["metric"] if given(ctx, "metric") else None,  # refused with one tau
        eval_classes=options["eval_classes"],
        estimator=options["estimator"],
        n_components=options["components"],
        eps=options["eps"],
        min_samples=options["min_samples"],
        table_points=options["table_points"],
        grid=parse_grid(options["grid_spec"]),
        plots=not options["no_plots"],
    )
    with progress_bar(
        "calibrate (all passes)", calibration_passes(stores, config), unit="px"
    ) as advance:
        result = calibrate(stores, out_dir, config, progress=advance)
    for warning in result.warnings:
        console.print(f"[bold red]WARNING:[/] {escape(warning)}")
    console.print(_class_table(result))
    selection = result.selection
    console.print(f"chosen tau = {result.chosen_tau:g}, {selection['how']}", markup=False)
    baseline = result.prior_baseline
    if baseline is not None and baseline["tau"] != result.chosen_tau:
        metric = selection.get("metric") or "miou"
        console.print(
            f"prior adjustment at its own best tau = {baseline['tau']:g}: "
            f"mIoU {_percent(baseline['miou'])}, mAcc {_percent(baseline['macc'])}"
            + (
                f" (chosen by {_METRIC_NAMES[metric]} the same way)"
                if selection.get("metric")
                else ""
            )
        )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if result.unadjusted_cells:
        console.print(
            f"[yellow]note:[/] {len(result.unadjusted_cells)} cells have fewer than "
            f"{config.min_samples} logits and get no offset (listed in calibration.json)"
        )
    # every file of the set (sweep.csv and the plots too), by name
    written = sorted(Path(str(name)).name for name in result.files.values())
    console.print(f"wrote {', '.join(written)} in {out_dir}", markup=False)
    console.print("next:", highlight=False)
    for line in after_calibrate([str(path) for path in stores], out_dir):
        console.print(f"  {line}", highlight=False, markup=False)


FIT_ONLY = ("fit_on", "fit_labels", "anchor_from", "anchor", "select_on", "metric", "eval_classes",
            "estimator", "components", "eps", "min_samples", "table_points", "grid_spec",
            "no_plots")  # fmt: skip


def _check_options(ctx) -> None:
    """Options that mean nothing together are refused, naming both."""
    refuse_together(ctx, "apply_path", FIT_ONLY, "the option only applies when fitting")
    if ctx.params["estimator"] != "gmm" and given(ctx, "components"):
        raise BLDAError(
            f"--components and --estimator {ctx.params['estimator']}: components are those of "
            "a Gaussian mixture (--estimator gmm)"
        )


def _apply(apply_path, stores, out_dir, tau_spec) -> None:
    from blda_tools.calibration.apply import apply_calibrator
    from blda_tools.calibration.sweep import parse_tau_spec
    from blda_tools.fileio import check_input_file
    from blda_tools.store import LogitStore

    check_input_file(apply_path, f"--apply {apply_path}", "a blda calibrator file")
    taus = None if tau_spec is None else parse_tau_spec(tau_spec)
    if taus is not None and len(taus) != 1:
        raise BLDAError(f"--apply and --tau {tau_spec}: applying takes one tau, got {len(taus)}")
    tau = None if taus is None else taus[0]
    total = LogitStore(stores).num_rows
    with progress_bar("apply", total, unit="px") as advance:
        result = apply_calibrator(apply_path, stores, out_dir, tau=tau, progress=advance)
    where = result.prediction_store or f"{len(result.files)} PNG files in {out_dir}"
    console.print(
        f"tau = {result.tau:g}: {result.num_pixels:,} pixels of {result.images} images -> {where}",
        markup=False,
    )


def _class_table(result) -> Table:
    table = Table(title=f"Per class, before -> after (tau = {result.chosen_tau:g})")
    table.add_column("class")
    for column in ("IoU %", "Acc %", "JS pos", "JS neg"):
        table.add_column(column, justify="right")
    js = result.js
    for index, name in enumerate(result.classes):
        cells = [Text(name)]
        for key in ("iou", "acc"):
            if result.before is None or result.after is None:
                cells.append("n/a")
            else:
                before, after = result.before[key][index], result.after[key][index]
                cells.append(f"{_pct(before)} -> {_pct(after)}")
        for key in ("positive", "negative"):
            before, after = js[f"{key}_before"][index], js[f"{key}_after"][index]
            cells.append(f"{_num(before)} -> {_num(after)}")
        table.add_row(*cells)
    if result.before is not None and result.after is not None:
        summary = [
            f"{_pct(result.before[key])} -> {_pct(result.after[key])}" for key in ("miou", "macc")
        ]
        over = f" ({len(result.eval_classes)} classes)" if result.eval_classes else ""
        table.add_row(f"mean{over}", *summary, "", "", style="bold")
    return table


_METRIC_NAMES = {"miou": "mIoU", "macc": "mAcc"}


def _percent(value) -> str:
    text = _pct(value)
    return text if text == "n/a" else f"{text}%"


def _pct(value) -> str:
    from blda_tools.report.html import format_value  # "n/a" for None / NaN, never "-0.0"

    return format_value(None if value is None else 100 * value, ".1f")


def _num(value) -> str:
    from blda_tools.report.html import format_value

    return format_value(value, ".3f")


@click.command("export")
@click.argument("calibrator_path", type=PATH)
# A string, not a Path: "dir/" must reach the library as given (a Path drops the slash).
@click.option("--out", "out_path", required=True, type=click.Path(), help="Output FILE.pt.")
@click.option(
    "--model",
    "model_path",
    type=PATH,
    default=None,
    help="A TorchScript segmentation model to wrap (images -> balanced logits); its forward "
    "takes an image tensor and returns logits, or a dict with them as 'out' (torchvision). "
    "A model whose logits on a 64x64 image have another class count than the calibrator's is "
    "refused.",
)
@click.option("--tau", type=float, default=None, help="Override the calibrator's tau (0 to 10000).")
def export_command(calibrator_path, out_path, model_path, tau):
    """Write CALIBRATOR as a self-contained TorchScript module: logits (B, C, H, W), or (B, C)
    of a classifier, -> Eq. 7 log scores (balanced logits) of the same shape, loadable with
    torch.jit.load without blda."""
    from blda_tools.calibration.export import export_torchscript

    export_torchscript(calibrator_path, out_path, model_path=model_path, tau=tau)
    console.print(f"wrote {out_path}", markup=False)
