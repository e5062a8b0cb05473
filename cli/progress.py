"""Progress and messages on stderr: a rich bar on a terminal, plain periodic lines elsewhere.

Library jobs drive progress through a plain `progress(n)` callback (`progress_bar`) and say what
a long step is doing through the `blda_tools` logger (`show_library_notices`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape

from blda_tools.runtime.progress import PlainProgress, human_count

# Not a terminal (a log file, CI): tables at their natural width, never wrapped at 80 columns.
WIDE_OUTPUT_COLUMNS = 250


def make_console(stderr: bool = True) -> Console:
    """A rich console whose text lines are never broken (a note stays one line; a terminal
    wraps it on screen); off a terminal (without COLUMNS set) tables as wide as they need."""
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, soft_wrap=True, width=WIDE_OUTPUT_COLUMNS)
    return console


console = make_console()


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None, unit: str = "rows"
) -> Iterator[Callable[[int], None]]:
    """Yield a callback `advance(n)` that moves a bar towards `total` (rate and ETA shown);
    on a non-terminal, plain lines every `BLDA_PROGRESS_INTERVAL` seconds and at the end."""
    if not console.is_terminal:
        plain = PlainProgress(description, total, unit)
        try:
            yield plain.advance
        finally:
            plain.close()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{unit}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        def advance(count: int) -> None:
            progress.advance(task, count)
            speed = progress.tasks[0].speed
            if speed:
                progress.update(task, rate=f"{human_count(speed)} {unit}/s")

        yield advance


class _ConsoleHandler(logging.Handler):
    """Prints the library's notices as `note: ...` lines above any live bar."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]note:[/] {escape(record.getMessage())}", highlight=False)


def show_library_notices() -> None:
    """Show the `blda_tools` logger's info lines (e.g. "compiling kernels, once") on stderr."""
    logger = logging.getLogger("blda_tools")
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)
