"""Wall time of `blda --help`, `blda --version` and every `blda COMMAND --help` (issue 16).

Each is the median of `--repeats` fresh processes of the installed `blda` script (target:
<= 0.5 s). Printed beside them, from the same run: a bare `python -c pass` (the floor any
command pays) and `python -c "import torch"` (roughly what each of them cost when the command
modules imported the library at the top). Run:

    python benchmarks/bench_cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from limits import cpu_model

from blda_cli import commands


def machine() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {load}"
    )


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def invocations() -> list[list[str]]:
    cases = [["--help"], ["--version"]]
    for command in commands.ALL:
        cases.append([command.name, "--help"])
        for sub in getattr(command, "commands", {}):
            cases.append([command.name, sub, "--help"])
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command")
    options = parser.parse_args()
    blda = shutil.which("blda")
    if blda is None:
        sys.exit("the `blda` script is not on PATH: pip install -e . first")
    print(f"machine: {machine()}")
    print(f"median of {options.repeats} fresh processes (wall seconds):")
    floor = median_seconds([sys.executable, "-c", "pass"], options.repeats)
    torch_import = median_seconds([sys.executable, "-c", "import torch"], options.repeats)
    worst = 0.0
    for arguments in invocations():
        seconds = median_seconds([blda, *arguments], options.repeats)
        worst = max(worst, seconds)
        print(f"  blda {' '.join(arguments):<28} {seconds:6.3f}")
    print(f"  {'python -c pass':<33} {floor:6.3f}   (interpreter start, the floor)")
    print(
        f"  {'python -c ' + repr('import torch'):<33} {torch_import:6.3f}   (what --help paid before)"
    )
    print(
        f"slowest: {worst:.3f} s ({'meets' if worst <= 0.5 else 'MISSES'} the 0.5 s target); "
        f"load average after: {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
