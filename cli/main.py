"""Entry point of the `blda` command: the click group and uniform error reporting."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings

import click

from blda_cli.progress import show_library_notices
from blda_tools import __version__
from blda_tools.errors import BLDAError, Interrupted, WorkerDied, needs_less_memory
from blda_tools.fileio import resource_failure

# What each command can do about memory running out or a worker process killed (a job that
# failed part-way through says itself what it kept and how to resume).
MEMORY_HINTS = {
    "dump-logits": ("a smaller --batch-size, fewer --workers or a smaller --resize",),
    "diagnose": ("fewer --workers or --grid bins", "--no-plots"),
    "calibrate": ("fewer --table-points or --grid bins",),
    "train": (
        "--set run.num_workers=0, or --set run.batch_size=1 or a smaller augment.crop_size "
        "(these two change the recipe)",
    ),
    "synthcity": ("a smaller --size or fewer --workers",),
    "demo": ("--quick",),
}
DEFAULT_MEMORY_HINT = "free memory, or use a machine with more"


class _Group(click.Group):
    """A click group that turns BLDAError, any OS failure that no library code translated and
    memory running out into a one-line message and exit status 2, and Ctrl-C into one line and
    exit status 130."""

    def resolve_command(self, ctx: click.Context, args):
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta["blda.arguments"] = list(rest)  # for `_memory_hint`
        from blda_cli.option_rules import refuse_empty_values

        return name, refuse_empty_values(command) if command else command, rest

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BLDAError as error:
            cause = error if isinstance(error, WorkerDied) else error.__cause__
            _fail(f"{error}; {_memory_hint(ctx)}" if needs_less_memory(cause) else error)
        except (OSError, MemoryError, RuntimeError) as error:
            failure = resource_failure(error)
            if failure is None:
                raise  # a bug: its traceback is what a report needs
            _fail(failure if isinstance(error, OSError) else f"{failure}; {_memory_hint(ctx)}")
        except click.UsageError as error:  # a bad option value: one line too, with the way on
            where = error.ctx.command_path if error.ctx is not None else "blda"
            _fail(f"{error.format_message()} (see `{where} --help`)")
        except KeyboardInterrupt as interrupt:
            _report_interrupt(interrupt)
            # 128 + the signal's number, what a shell reports: 130 for Ctrl-C, 143 for SIGTERM
            sys.exit(128 + (signal.SIGTERM if _terminated else signal.SIGINT))


def _memory_hint(ctx: click.Context) -> str:
    """What the command's options can do about memory; a flag the user gave is no advice."""
    given = set(ctx.meta.get("blda.arguments", ()))
    hints = MEMORY_HINTS.get(ctx.invoked_subcommand or "", ())
    hints = [hint for hint in hints if hint not in given]
    return f"try {' or '.join(hints)}" if hints else DEFAULT_MEMORY_HINT


def _fail(error: BLDAError | str) -> None:
    click.secho(f"error: {one_line(str(error))}", fg="red", err=True)
    sys.exit(2)


def one_line(message: str) -> str:
    """`message` on one line: a library's text quoted in it (torch, OpenCV, h5py) may span
    several, and a one-line error is what scripts and logs grep for."""
    joined = ""
    for line in (line.strip() for line in message.splitlines()):
        if line:  # a line that ends a clause joins with "; ", one that runs on with a space
            joined += ("" if not joined else " " if joined[-1] in ":;,.(" else "; ") + line
    return joined


def _report_interrupt(interrupt: KeyboardInterrupt) -> None:
    """One line: what an interrupted job kept (`Interrupted`) or that it kept nothing (outputs
    are written under temporary names and renamed only when complete)."""
    message = str(interrupt) if isinstance(interrupt, Interrupted) else ""
    if not message:
        message = (
            "interrupted: no half-written file is left (outputs are renamed into place only "
            "when complete); run the command again to finish"
        )
    click.secho(message, fg="yellow", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blda")
def cli() -> None:
    """Measure and remove class bias in segmentation models (BLDA, ICML 2025)."""


def _register_commands() -> None:
    # Each command module adds itself here once it does real work; no placeholders.
    from blda_cli import commands

    for command in commands.ALL:
        cli.add_command(command)


_terminated = False
# After SIGTERM: seconds until SIGINT repeats the stop, then until the process ends.
INSIST_SECONDS = 30.0


def _stop_on_sigterm() -> None:
    """SIGTERM (`kill`, a batch scheduler preempting the job, torchrun stopping its workers) ends
    a command as Ctrl-C does: a job keeps what it has stored and says how to continue, and the
    exit status is 143. A second SIGTERM kills at once (what it leaves is resumable, as after
    SIGKILL)."""

    def stop(signum, frame) -> None:
        global _terminated
        _terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # A scheduler signals every process of the job, so loader workers die with this one;
        # torch's SIGCHLD handler would then raise "worker exited unexpectedly" at any point of
        # the cleanup below. Python runs pending handlers by signal number, SIGTERM (15) before
        # SIGCHLD (17), so this one runs first and the other is never called.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        threading.Thread(target=_insist, name="blda-sigterm", daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _insist() -> None:
    """The KeyboardInterrupt of a SIGTERM can be lost: raised while a weakref callback or a
    __del__ runs, Python only prints it, and the job goes on, e.g. waiting for a loader worker
    that died with the signal (a hang the regression helper saw in 2 of 5 runs). SIGINT then
    raises it again in the main thread, interrupting a blocking read; if even that is lost the
    process ends, leaving what SIGKILL would (resumable)."""
    time.sleep(INSIST_SECONDS)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(INSIST_SECONDS)
    os._exit(128 + signal.SIGTERM)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on stderr as one line each, without the source file and line (a user's
    terminal is not a traceback)."""
    return f"warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    _stop_on_sigterm()
    _register_commands()
    show_library_notices()
    cli()
