"""`blda train` and `blda plot-log`: thin click wrappers over `blda_tools.training`."""

from __future__ import annotations

import json

import click


@click.command("train")
@click.option(
    "--config",
    "config",
    required=True,
    help="A shipped config by name (e.g. synthcity_tiny, gta2cs_daformer_mitb5) or a TOML file "
    "(./NAME for a file named like a shipped config).",
)
@click.option(
    "--work-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run directory: config.toml, log.jsonl, checkpoints/.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set run.iterations=2000 (repeatable; values are TOML, "
    "and a key that holds text takes the value as written: data.root=2024 is a folder).",
)
@click.option(
    "--resume", is_flag=True, help="Continue the run in --work-dir from its latest checkpoint."
)
def train_command(config: str, work_dir: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Self-train a segmentation model DAFormer-style (source CE, EMA teacher, ClassMix, RCS).

    The *_blda configs (or --set loss.name=blda) add the online BLDA loss; loss.blda_mode
    picks none, ola_source, ola or ola+cde (paper Table 4).

    Under torchrun every process runs this command; see docs/training.md.
    """
    from blda_tools.training import train

    summary = train(config, work_dir, overrides=overrides, resume=resume)
    scores = summary["last_scores"]
    line = f"finished at iteration {summary['iteration']} in {summary['run_dir']}"
    if scores is not None:
        line += f"; target val mIoU {scores['mIoU']:.2f}, mAcc {scores['mAcc']:.2f}"
    if summary["best_miou"] is not None:
        line += f" (best mIoU {summary['best_miou']:.2f})"
    click.echo(line)


@click.command("plot-log")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG path (default RUN_DIR/training_curves.png).",
)
@click.option("--json", "as_json", is_flag=True, help="Also print the last evaluation as JSON.")
def plot_log_command(run_dir: str, out: str | None, as_json: bool) -> None:
    """Draw the training losses and target-val mIoU / mAcc of a run directory."""
    from blda_tools.training import plot_log, read_log

    path = plot_log(run_dir, out)
    click.echo(f"wrote {path}")
    if as_json:
        evaluations = [r for r in read_log(run_dir) if r.get("kind") == "eval"]
        click.echo(json.dumps(evaluations[-1] if evaluations else None, indent=2))


COMMANDS = [train_command, plot_log_command]
