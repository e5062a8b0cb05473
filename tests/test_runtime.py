"""`keep_freed_memory`: the kernel's own page-fault counter as the truth, in a fresh process
(the setting is process-wide)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, resource
    import torch
    from blda_tools.runtime.process import keep_freed_memory

    def faults_of_churn():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            torch.ones(32 << 20)  # 128 MB of float32, written, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = max(faults_of_churn() for _ in range(3))
    applied = keep_freed_memory()
    for _ in range(5):  # the heap grows until freed blocks merge into ones that fit
        faults_of_churn()
    print(json.dumps({"default": default, "applied": applied, "kept": faults_of_churn()}))
    """
)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_memory_is_reused_without_page_faults():
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    )
    result = json.loads(finished.stdout)
    pages = 4 * (128 << 20) // 4096
    # By default each 128 MB block is mapped afresh (and unmapped when freed): every page
    # faults in again, however often it is repeated.
    assert result["default"] > 0.9 * pages
    assert result["applied"] is True
    assert result["kept"] < 0.01 * pages


# A caller's script as new users write them: no `if __name__ == "__main__":` guard.
UNGUARDED_SCRIPT = textwrap.dedent(
    """
    import os
    from blda_tools.runtime.process import worker_processes

    with worker_processes(2, "the job") as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(4)}
    print("workers", len(pids) <= 2 and os.getpid() not in pids)
    """
)


@pytest.mark.parametrize("how", ["script file", "stdin"])
def test_worker_pools_work_from_unguarded_scripts_and_stdin(tmp_path, how):
    # spawn runs the caller's main module in every worker: the script would start its pool
    # again in each (which dies), and stdin cannot be found at all
    if how == "script file":
        (tmp_path / "script.py").write_text(UNGUARDED_SCRIPT)
        command, stdin = [sys.executable, str(tmp_path / "script.py")], None
    else:
        command, stdin = [sys.executable, "-"], UNGUARDED_SCRIPT
    process = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip() == "workers True"
