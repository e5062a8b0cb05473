"""Figures drawn in worker processes while the caller computes, two at a time.

Why: `blda diagnose` on a 30M-pixel store spent ~3.2 s drawing its four figures one after the
other once the statistics were known, and ~1.1 s importing matplotlib and scipy before it
started (2-core VM, `benchmarks/bench_diagnose.py --whole`). Drawing is Python-bound in
matplotlib, so threads cannot share it out; processes can. `FigureWorkers(2)` starts two
processes at once: each imports matplotlib and draws a small throw-away figure (fonts,
caches) while the caller streams its statistics, then draws the figures it is given. In a
process without torch, matplotlib's array checks are also cheaper (its `_is_jax_array` probe
cost ~0.2 s per diagnose when torch was loaded).

A worker ends when the process that started it dies (`runtime.process.exit_with_parent`) and
leaves Ctrl-C to it. `FigureWorkers(0)` draws in the calling process instead, when the figure
is asked for (one core, or a caller that wants no processes).

Figures are handed over by the name of their function in `blda_tools.plots`, with plain
arguments (numpy arrays, lists, paths), so the caller never imports matplotlib; a figure's error (a `BLDAError` naming the bad input or the file
that could not be written) is raised again by `Figure.result()` in the caller.
"""

from __future__ import annotations

import os
from types import TracebackType

# Processes a job starts by default: two figures at a time halved the drawing time on 2 cores
# (`benchmarks/bench_diagnose.py --whole`); one core draws them itself.
DEFAULT_PROCESSES = 2 if (os.cpu_count() or 1) > 1 else 0


class Figure:
    """A figure being drawn: `result()` waits for it and returns its path (or raises)."""

    def __init__(self, pending=None, call: tuple = ()) -> None:
        self._pending, self._call = pending, call

    def result(self):
        if self._pending is not None:
            return self._pending.result()
        return draw(*self._call)


def draw(name: str, args: tuple, kwargs: dict):
    """`blda_tools.plots.<name>(*args, **kwargs)`: one figure (in a worker or here)."""
    from blda_tools import plots

    return getattr(plots, name)(*args, **kwargs)


class FigureWorkers:
    """`processes` worker processes drawing figures (0: drawn here, when asked for).

    Use as a context manager: entering starts the workers (unless started: a job may enter
    the caller's workers again), leaving the block stops them; leaving it by an exception
    stops them at once (a figure half-drawn is dropped: `atomic_output` never leaves it).
    """

    def __init__(self, processes: int) -> None:
        self.processes = int(processes)
        self._pool = None

    def submit(self, name: str, /, *args, **kwargs) -> Figure:
        """Draw `blda_tools.plots.<name>(*args, **kwargs)`; in this process when it is asked for
        (`Figure.result`), so without workers the figures are drawn in the order asked."""
        if self._pool is None:
            return Figure(call=(name, args, kwargs))
        return Figure(pending=self._pool.submit(draw, name, args, kwargs))

    def __enter__(self) -> FigureWorkers:
        """Start the workers (they import matplotlib and warm up meanwhile)."""
        if self.processes > 0 and self._pool is None:
            from blda_tools.runtime.process import start_worker_pool

            # started now: they import matplotlib and warm up while the caller computes
            self._pool = start_worker_pool(self.processes, _warm_up)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pool is None:
            return
        from blda_tools.runtime.process import close_worker_pool

        pool, self._pool = self._pool, None
        close_worker_pool(pool, exc, "figures")


def _warm_up() -> None:
    """Import the plot modules and draw a tiny figure to memory: the first figure of a process
    otherwise pays for loading the fonts and matplotlib's caches."""
    import io

    from blda_tools.plots import style

    figure, axes = style._figure(1.0, 1.0)
    axes.set_title("warm-up 0123456789", fontsize=8)
    axes.plot([0.0, 1.0], [0.0, 1.0])
    figure.savefig(io.BytesIO(), format="png", dpi=style.DPI)
