"""Compiled kernels: once per installation, said in one line, recompiled when a helper changes.

Each case runs fresh interpreters (a compile or a cache load happens once per process) with
`NUMBA_CACHE_DIR` pointing into the test's directory, so the cache under test is the test's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from blda_tools.runtime.jit import COMPILE_NOTICE

ARGMAX_PROBE = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="NOTICE %(message)s")
from blda_tools.statistics import first_argmax
rows = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 3.0], [-1.0, -1.0, -0.5]])
print(first_argmax(rows).tolist(), first_argmax(rows.half()).tolist())
"""


def _run(code: str, cache: Path, *, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    if cwd is not None:
        environment["PYTHONPATH"] = str(cwd)
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment,
        cwd=cwd, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return completed


def test_first_compile_says_so_once_and_later_processes_load_the_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    first = _run(ARGMAX_PROBE, cache)
    # The first largest value wins (ties -> lowest index), float32 and float16 alike.
    assert first.stdout.split("\n")[0] == "[1, 0, 2] [1, 0, 2]"
    assert first.stderr.count(f"NOTICE {COMPILE_NOTICE}") == 1  # two signatures, one line
    assert list(cache.rglob("kernel.argmax_rows-*.nbi")), "nothing cached in NUMBA_CACHE_DIR"

    second = _run(ARGMAX_PROBE, cache)
    assert second.stdout == first.stdout
    assert COMPILE_NOTICE not in second.stderr


HELPER = """
import numba

@numba.njit(inline="always")
def increment():
    return {value}
"""

KERNELS = """
import numba
import helper
from blda_tools.runtime.jit import kernel

@kernel(depends_on=(helper,))
def with_dependency(x):
    return x + helper.increment()

@numba.njit(cache=True)
def plain_numba(x):
    return x + helper.increment()
"""


def test_a_kernel_recompiles_when_a_module_it_depends_on_changes(tmp_path):
    package, cache = tmp_path / "package", tmp_path / "numba-cache"
    package.mkdir()
    (package / "kernels.py").write_text(textwrap.dedent(KERNELS))
    probe = "import kernels; print(kernels.with_dependency(10), kernels.plain_numba(10))"
    (package / "helper.py").write_text(HELPER.format(value=1))
    assert _run(probe, cache, cwd=package).stdout.split() == ["11", "11"]
    (package / "helper.py").write_text(HELPER.format(value=5))
    # `kernel` sees the change; numba alone keeps the machine code of the old helper (its
    # cache checks only the kernel's own file), which is why `depends_on` exists.
    assert _run(probe, cache, cwd=package).stdout.split() == ["15", "11"]


LABEL_TYPES_PROBE = """
import logging, sys, numpy as np
logging.basicConfig(level=logging.INFO, format="NOTICE %(message)s")
from blda_tools.statistics import LogitGrid, LogitSetStatistics
logits = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
for kind in sys.argv[1:]:
    statistics = LogitSetStatistics(3, LogitGrid(-4, 4, 16))
    statistics.update(logits, (np.arange(64) % 3).astype(kind))
    print(kind, int(statistics.confusion.sum()))
"""


def test_labels_of_any_integer_type_reuse_the_kernels_compiled_once(tmp_path):
    # Each label type was a signature of its own: "compiling kernels, once" came back for
    # int32, uint16 or int16 labels (helper's probe).
    cache = tmp_path / "numba-cache"
    first = _run(LABEL_TYPES_PROBE.replace("sys.argv[1:]", '["uint8", "int64"]'), cache)
    assert first.stdout.split() == ["uint8", "64", "int64", "64"]
    assert first.stderr.count(f"NOTICE {COMPILE_NOTICE}") == 1
    others = '["int16", "uint16", "int32", "uint32", "int8"]'
    second = _run(LABEL_TYPES_PROBE.replace("sys.argv[1:]", others), cache)
    assert second.stdout.split()[1::2] == ["64"] * 5
    assert COMPILE_NOTICE not in second.stderr
