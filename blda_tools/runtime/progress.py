"""Progress where the output is not a terminal (a log file, CI): plain lines, every so often.

A live bar redraws one line with control codes, which a log file keeps as noise (or, as rich does
for a non-terminal, shows nothing until the end). `PlainProgress` writes a whole line instead,
at most every `interval` seconds (`BLDA_PROGRESS_INTERVAL`, default 10 s) and once at the end:

    diagnose: 40,960/81,920 px (50%), 12.3k px/s, 0:00:03 elapsed, ETA 0:00:03
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import TextIO

DEFAULT_INTERVAL_SECONDS = 10.0


def plain_interval() -> float:
    """Seconds between plain progress lines: `BLDA_PROGRESS_INTERVAL` or 10."""
    text = os.environ.get("BLDA_PROGRESS_INTERVAL", "")
    if not text:
        return DEFAULT_INTERVAL_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # a typo, a negative number or NaN: said, not silently ignored
        warnings.warn(
            f"BLDA_PROGRESS_INTERVAL={text!r}: expected seconds (a number >= 0); using "
            f"{DEFAULT_INTERVAL_SECONDS:g}",
            UserWarning,
            stacklevel=2,
        )
        return DEFAULT_INTERVAL_SECONDS
    return seconds


class PlainProgress:
    """Counts work done towards `total` (None: unknown) and writes a line now and then."""

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str = "rows",
        *,
        completed: int = 0,
        interval: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.completed = self.start_completed = completed
        self.interval = plain_interval() if interval is None else interval
        self.stream = stream
        self.status = ""
        self.start = self.last_line = time.perf_counter()
        # as if a line had been written at the start: a job that fails before counting any
        # work ends without a '0/N' line above its error
        self.last_line_completed, self.last_line_status = completed, ""
        self.closed = False

    def advance(self, count: int) -> None:
        self.update(self.completed + count)

    def update(self, completed: int, status: str = "") -> None:
        self.completed, self.status = completed, status or self.status
        now = time.perf_counter()
        if now - self.last_line >= self.interval:
            self.write_line(now)

    def close(self) -> None:
        """The last line (once), unless neither the work counted nor the status changed since
        the last line (or the start)."""
        if not self.closed:
            self.closed = True
            moved = self.last_line_completed != self.completed
            if moved or (
                self.completed != self.start_completed and self.last_line_status != self.status
            ):
                self.write_line(time.perf_counter())

    def write_line(self, now: float) -> None:
        self.last_line, self.last_line_completed = now, self.completed
        self.last_line_status = self.status
        elapsed = now - self.start
        done = self.completed - self.start_completed
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.completed:,}"]
        if self.total:
            parts = [f"{self.completed:,}/{self.total:,} {self.unit} "
                     f"({100 * self.completed / self.total:.0f}%)"]  # fmt: skip
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{human_count(rate)} {self.unit}/s")
        parts.append(f"{clock(elapsed)} elapsed")
        if self.total and rate > 0 and self.completed < self.total:
            parts.append(f"ETA {clock((self.total - self.completed) / rate)}")
        if self.status:
            parts.append(self.status)
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(f"{self.description}: {', '.join(parts)}\n")
        stream.flush()


def human_count(value: float) -> str:
    """12345.6 -> '12.3k' (k, M, G)."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
