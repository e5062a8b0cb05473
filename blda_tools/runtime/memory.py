"""Refusing work whose arrays cannot fit in memory, before any is allocated.

An option that sizes an array (`--grid` BINS, `--table-points`) can ask for more memory than the
machine has. numpy and torch then often get the memory lazily and the kernel's OOM killer ends
the process with no message at all, part-way through. So the commands check the least memory
those arrays need against what is available (Linux: MemAvailable + SwapFree, and the cgroup's
limit when it is lower) and refuse at once. The figure is a lower bound of the need, so a run
that is refused could never have fitted; one that passes may still run short, which the CLI's
out-of-memory message then reports.
"""

from __future__ import annotations

from pathlib import Path

from blda_tools.errors import BLDAError

_MEMINFO = Path("/proc/meminfo")
_CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),  # cgroup v2
    (
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
        Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ),
)


def available_bytes() -> int | None:
    """Memory this process can still get, in bytes; None where it cannot be read."""
    available = _meminfo_available()
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max" (v2) means no limit
            headroom = max(int(limit) - usage, 0)
            available = headroom if available is None else min(available, headroom)
        break
    return available


def _meminfo_available() -> int | None:
    try:
        fields = dict(
            line.split(":", 1) for line in _MEMINFO.read_text().splitlines() if ":" in line
        )
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemAvailable", "SwapFree"))
    except (OSError, ValueError, KeyError, IndexError):
        return None


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_fits_in_memory(needed: int, what: str, remedy: str) -> None:
    """Refuse when `needed` bytes (the least `what` needs) exceed the memory available.

    `what` starts the message and names the option (``--grid: 10000000 BINS for 19 classes``);
    `remedy` says what to change.
    """
    available = available_bytes()
    if available is not None and needed > available:
        raise BLDAError(
            f"{what} need at least {format_bytes(needed)} of memory, more than the "
            f"{format_bytes(available)} available; {remedy}"
        )
