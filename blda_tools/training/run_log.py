"""The run's record: `log.jsonl` (one JSON object per line), the rich live view, training curves."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from blda_tools.errors import BLDAError
from blda_tools.fileio import atomic_output, json_ready, read_text_file, write_failure

LOG_NAME = "log.jsonl"


class JsonlLog:
    """Append-only `log.jsonl`; records are `{"kind": "train" | "eval" | ..., "iteration": n, ...}`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOG_NAME

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop records written after the checkpoint's iteration (rewritten atomically)."""
        if not self.path.exists():
            return
        try:
            records = read_log(self.path)
        except BLDAError as error:
            raise BLDAError(
                f"{error}; --resume keeps the log's records up to the checkpoint's iteration "
                f"{iteration} and needs every line readable: fix or delete that line"
            ) from None
        kept = [r for r in records if r["iteration"] <= iteration]
        with atomic_output(self.path) as temporary:
            temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        try:
            with self.path.open("a") as stream:
                # JSON has no NaN: a class absent from val is written as null.
                stream.write(json.dumps(json_ready(record)) + "\n")
        except OSError as error:  # a full disk mid-run: name the log
            raise write_failure(self.path, error) from None


def log_path(path: str | Path) -> Path:
    """The log file `path` names: itself, or `RUN_DIR/log.jsonl` for a run directory."""
    path = Path(path)
    return path / LOG_NAME if path.is_dir() else path


def read_log(path: str | Path) -> list[dict]:
    """Records of a `log.jsonl` (or of `RUN_DIR/log.jsonl`)."""
    given, path = Path(path), log_path(path)
    if given.name == LOG_NAME and given.is_dir():  # not RUN_DIR/log.jsonl/log.jsonl
        raise BLDAError(f"{given}: a folder; expected the training log file {LOG_NAME}")
    if not path.is_file():
        raise BLDAError(f"{path}: no training log (expected {LOG_NAME} in a run directory)")
    text = read_text_file(path, "a training log")
    lines = text.splitlines()
    # A record is written as one line with its newline: a last line without one is a write
    # cut short (a full disk, a kill), which a resume rewrites; it is not read.
    torn = bool(lines) and not text.endswith("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn and number == len(lines):
                break
            raise BLDAError(f"{path}:{number}: not a JSON line") from None
        iteration = record.get("iteration") if isinstance(record, dict) else None
        if isinstance(iteration, bool) or not isinstance(iteration, int):  # every record has one
            raise BLDAError(
                f'{path}:{number}: expected a record {{"kind": ..., "iteration": N, ...}}, '
                f"got {line[:60]}"
            )
        records.append(record)
    return records


class LiveView:
    """Progress of rank 0: a rich live line on a terminal (iteration, it/s, ETA, latest losses,
    last mIoU); elsewhere (a log file, CI) the same as plain lines (`PlainProgress`)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start_iteration, self.start_time = start, time.perf_counter()
        self.last_miou: float | None = None
        self.last_update: tuple[int, dict[str, float]] | None = None
        self.progress = self.plain = None
        if enabled and not _stdout_is_terminal():
            from blda_tools.runtime.progress import PlainProgress

            self.plain = PlainProgress("train", total, "it", completed=start)
        elif enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self.task = self.progress.add_task("train", total=total, completed=start, status="")
            self.progress.start()

    def rate(self, iteration: int) -> float:
        elapsed = time.perf_counter() - self.start_time
        return (iteration - self.start_iteration) / elapsed if elapsed > 0 else 0.0

    def evaluated(self, miou: float) -> None:
        """A new target-val mIoU: shown from now on, the last line included."""
        self.last_miou = miou
        if self.last_update is not None:
            iteration, losses = self.last_update
            self.update(iteration, losses, quiet=True)

    def update(self, iteration: int, losses: dict[str, float], quiet: bool = False) -> None:
        """`quiet`: the status only, without a line of its own (plain output)."""
        self.last_update = (iteration, losses)
        loss_text = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
        miou = f"mIoU {self.last_miou:.1f}" if self.last_miou is not None else "mIoU -"
        if self.plain is not None and quiet:
            self.plain.status = f"{loss_text}  {miou}"
        elif self.plain is not None:
            self.plain.update(iteration, f"{loss_text}  {miou}")
        if self.progress is None:
            return
        rate = self.rate(iteration)
        eta = (self.total - iteration) / rate if rate > 0 else math.inf
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        status = f"{rate:.2f} it/s  ETA {eta_text}  {loss_text}  {miou}"
        self.progress.update(self.task, completed=iteration, status=status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.plain is not None:
            self.plain.close()


def _stdout_is_terminal() -> bool:
    # rich's own test (it honours FORCE_COLOR / TTY_COMPATIBLE), on the stream it draws on.
    from rich.console import Console

    return Console().is_terminal


def curve_records(records: list[dict], where: str = "log") -> list[dict]:
    """Log records in the shape `blda_tools.plots.plot_training_curves` draws: `loss_<name>`
    per training record, `miou` / `macc` as fractions per evaluation. `where` starts errors
    (the log file's path)."""
    curves = []
    for record in records:
        if record.get("kind") == "train":
            losses = record.get("losses", {})
            losses = losses if isinstance(losses, dict) else {"?": losses}
            values = {f"loss_{k}": v for k, v in losses.items() if v is not None}
            curves.append({"iteration": record["iteration"], **values})
        elif record.get("kind") == "eval" and record.get("mIoU") is not None:
            values = {"miou": record["mIoU"], "macc": record.get("mAcc")}
            curves.append({"iteration": record["iteration"], **values})
        else:
            continue
        for name, value in curves[-1].items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BLDAError(
                    f"{where}: the record of iteration {record['iteration']}: {name} is "
                    f"{value!r}, expected a number"
                )
        if "miou" in curves[-1]:
            curves[-1]["miou"] /= 100
            curves[-1]["macc"] /= 100
    return curves


def plot_log(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw losses and target-val mIoU / mAcc against iterations into a PNG (default
    `RUN_DIR/training_curves.png`), a file `blda plot-log` owns (`outputs.output_file`)."""
    from blda_tools.outputs import output_file
    from blda_tools.plots import plot_training_curves

    curves = curve_records(read_log(run_dir), where=str(log_path(run_dir)))
    if not curves:
        raise BLDAError(f"{run_dir}: the log has no training or evaluation records yet")
    out = Path(out) if out is not None else Path(run_dir) / "training_curves.png"
    with output_file(out, "plot-log") as target:
        plot_training_curves(curves, path=target)
    return out
