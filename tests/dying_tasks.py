"""Functions that end their own process as the system's out-of-memory killer would (SIGKILL),
importable by name in spawned worker processes (a test puts them where a worker function was)."""

from __future__ import annotations

import os
import signal
import time


def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def sleeping(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def pid() -> int:
    return os.getpid()
