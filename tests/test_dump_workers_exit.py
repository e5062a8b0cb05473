"""A `dump-logits` killed with SIGKILL leaves no loader worker behind: the workers notice that
their parent is gone and exit within seconds (prctl PR_SET_PDEATHSIG, or a parent-id poll)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_dump import make_cityscapes

SLOW_PLUGIN = textwrap.dedent(
    """
    import time
    from torch import nn

    class Slow(nn.Conv2d):
        def forward(self, x):
            time.sleep(0.5)  # the dump runs long enough for the test to kill it midway
            return super().forward(x)

    def build(num_classes):
        return Slow(3, num_classes, 1)
    """
)


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigkilled_dump_logits_leaves_no_loader_worker(tmp_path):
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    # Large enough images that the workers' pipes fill up: a worker then blocks on a dead
    # reader (torch's own parent check never runs again), as real Cityscapes images do.
    make_cityscapes(tmp_path / "data", count=16, size=(256, 512))
    environment = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-c", "from blda_cli.main import main; main()", "dump-logits",
               "--model", "slow_plugin:build", "--dataset", "cityscapes", "--data-root",
               str(tmp_path / "data"), "--mode", "whole", "--resize", "none", "--workers", "2",
               "--out", str(tmp_path / "o.h5")]  # fmt: skip
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
            workers = children(process.pid)
            time.sleep(0.2)
        assert len(workers) >= 2, (
            process.stderr.read().decode()[-2000:] if process.poll() else workers
        )
        time.sleep(1.0)  # the workers are decoding and their queues fill
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in workers if alive(pid)] == []
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()


def test_a_worker_whose_parent_is_already_gone_exits_at_once():
    code = (
        "import os\n"
        "from blda_tools.runtime.process import exit_with_parent\n"
        "exit_with_parent(os.getppid() + 100000)\n"  # not our parent: as if it had died
        "print('still running')\n"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert finished.returncode == 1 and b"still running" not in finished.stdout
