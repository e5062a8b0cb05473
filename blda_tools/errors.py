"""The one exception type users see: a clear message naming the file, field or option; and the
wording of the commonest mismatch, two class lists that differ."""

from __future__ import annotations

from collections.abc import Sequence


class BLDAError(Exception):
    """Bad input or an unusable file, with a message meant for the user.

    The CLI prints the message (no traceback) and exits with status 2. Library callers can catch
    it like any exception.
    """


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
