"""The one exception type users see: a clear message naming the file, field or option; the
wording of the commonest mismatch, two class lists that differ; and how running out of memory
or losing a worker process is recognised and told."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence


class BLDAError(Exception):
    """Bad input or an unusable file, with a message meant for the user.

    The CLI prints the message (no traceback) and exits with status 2. Library callers can catch
    it like any exception.
    """


def check_number(value, name: str, *, integer: bool = False, optional: bool = False) -> None:
    """BLDAError naming `name` unless `value` is a real number (an integer when `integer`; not
    NaN, not a bool; None too when `optional`), before any range is compared with it."""
    if optional and value is None:
        return
    kind = numbers.Integral if integer else numbers.Real
    # (an integer is never NaN, and math.isnan refuses one beyond float64, e.g. 10**400)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or (not isinstance(value, numbers.Integral) and math.isnan(value))
    ):
        expected = "an integer" if integer else "a number"
        raise BLDAError(f"{name}: expected {expected}, got {value!r}")


# The largest count an option takes: stored as int64 attributes and passed to C (islice,
# HDF5), a larger integer raised OverflowError or ValueError part-way through the dump.
LARGEST_COUNT = 2**31 - 1


def check_counts(**values) -> None:
    """Each option given as a keyword (`max_images` for --max-images) is None or an integer
    from 1 (0 for `workers`) to `LARGEST_COUNT`."""
    for option, value in values.items():
        minimum = 0 if option == "workers" else 1  # streams: None (default) or >= 1
        if value is not None and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not minimum <= value <= LARGEST_COUNT
        ):
            raise BLDAError(
                f"--{option.replace('_', '-')}: expected an integer from {minimum} to "
                f"{LARGEST_COUNT}, got {value!r}"
            )


def class_difference(expected: Sequence[str], found: Sequence[str], names=("expected", "found")):
    """Only what differs between two class lists, in one phrase (None when they are equal):
    the names missing on either side, or else the positions where the order differs."""
    expected, found = [str(n) for n in expected], [str(n) for n in found]
    if expected == found:
        return None
    first, second = names
    only_first = [name for name in expected if name not in found]
    only_second = [name for name in found if name not in expected]
    parts = []
    if len(expected) != len(found):
        parts.append(f"{len(expected)} classes ({first}) vs {len(found)} ({second})")
    if only_first:
        parts.append(f"only in {first}: {', '.join(only_first)}")
    if only_second:
        parts.append(f"only in {second}: {', '.join(only_second)}")
    if not only_first and not only_second:
        moved = [
            f"{index}: {a} vs {b}"
            for index, (a, b) in enumerate(zip(expected, found, strict=False))
            if a != b
        ]
        shown = moved[:4] + ([f"... ({len(moved) - 4} more)"] if len(moved) > 4 else [])
        parts.append(f"same classes in another order (position {'; '.join(shown)})")
    return "; ".join(parts)


def check_same_classes(expected, found, where: str, names=("expected", "found")) -> None:
    """BLDAError naming `where` and only the class names that differ."""
    difference = class_difference(expected, found, names)
    if difference is not None:
        raise BLDAError(f"{where}: the class names differ: {difference}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job that keeps its work: the message says what was kept and how to
    continue (e.g. "12 of 40 images kept in val.h5.partial; rerun with --resume").

    A `KeyboardInterrupt`, so code that stops on Ctrl-C still does; the CLI prints the message
    in one line and exits with status 130 (as a shell does for SIGINT).
    """


class WorkerDied(BLDAError):
    """A worker process ended without a result (killed, mostly by the system for lack of
    memory): a resource failure like a full disk, after which a resumable job can go on."""


# torch's allocators fail with a RuntimeError: "CUDA out of memory. ...", "MPS backend out of
# memory ...", "[enforce fail at alloc_cpu.cpp:...] ... DefaultCPUAllocator: can't allocate
# memory: you tried to allocate N bytes ..." (Linux; "not enough memory" on Windows).
_ALLOCATOR_FAILED = re.compile(r"out of memory|DefaultCPUAllocator: (?:can't allocate|not enough)")
_ENFORCE_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\][^.]*\.\s*")


def is_out_of_memory(error: BaseException | None) -> bool:
    """Whether `error` is an allocation that failed: MemoryError (Python, numpy) or torch's."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and bool(_ALLOCATOR_FAILED.search(str(error)))


def out_of_memory_text(error: BaseException) -> str:
    """The line a user reads: "out of memory: " and what the allocator said, in its first two
    sentences (CUDA's message goes on with a paragraph of allocator statistics)."""
    said = _ENFORCE_PREFIX.sub("", " ".join(str(error).split()))
    said = ". ".join(said.split(". ")[:2]).rstrip(".")
    return f"out of memory: {said}" if said else "out of memory"


def worker_died(purpose: str, detail: str = "") -> WorkerDied:
    """The error for a worker process of `purpose` that ended without its result."""
    return WorkerDied(
        f"{purpose}: a worker process ended unexpectedly (killed; most often by the system, "
        f"for lack of memory{detail})"
    )


def loader_worker_death(error: BaseException | None) -> WorkerDied | None:
    """`WorkerDied` for torch's RuntimeError about a DataLoader worker that died ("DataLoader
    worker (pid(s) ...) exited unexpectedly", "... is killed by signal: Killed"), else None.
    torch raises it from its SIGCHLD handler, so anywhere in the thread that iterates."""
    if not (isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker")):
        return None
    return worker_died("image loading", f"; torch: {error}")


def needs_less_memory(error: BaseException | None) -> bool:
    """Memory ran out, or a worker process died (what the out-of-memory killer leaves)."""
    return (
        is_out_of_memory(error)
        or isinstance(error, WorkerDied)
        or loader_worker_death(error) is not None
    )
