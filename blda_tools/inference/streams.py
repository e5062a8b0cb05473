"""The inference streams of a dump: how many forward passes run at once, on how many torch
threads each (`DumpJob.run` explains why two one-thread streams on two CPU cores)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


def default_streams(device: torch.device) -> tuple[int, int]:
    """`(streams, threads_per_stream)`: on a CPU with several threads, two streams sharing
    them; elsewhere one stream (a GPU overlaps the host's work by itself)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return 1, threads
    return 2, threads // 2


@contextmanager
def stream_executor(streams: int):
    """The threads that run a dump's forward passes, `streams` of them."""
    executor = ThreadPoolExecutor(streams, thread_name_prefix="blda-dump-stream")
    try:
        yield executor
    finally:  # on an error, the groups not started are dropped; running ones finish
        executor.shutdown(wait=True, cancel_futures=True)


def stream_layout(streams: int | None, device: torch.device) -> dict:
    """`DumpJob`'s streams and threads per stream: `streams` (None: `default_streams`)
    sharing the CPU's torch threads."""
    if streams is None:
        streams, threads = default_streams(device)
    else:
        threads = max(1, torch.get_num_threads() // streams) if device.type == "cpu" else 1
    return {"streams": streams, "threads_per_stream": threads}
