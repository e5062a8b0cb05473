"""Process-wide CPU settings that inference and calibration share.

- `keep_freed_memory`: glibc's allocator keeps freed memory for long CPU inference runs;
- `torch_threads`: torch's intra-op thread count changed for a block of work;
- `exit_with_parent`: a worker process ends when the process that started it dies;
- `worker_processes`: a pool of such workers, stopped at once on an error, that reports a
  worker which died (killed by the system for lack of memory, mostly) instead of waiting for
  it forever.

Why the allocator setting matters:

A forward pass allocates and frees hundreds of MB of activations. By default glibc returns
large freed blocks to the kernel (`munmap`, heap trimming, per-thread arenas deleted when
empty), so the next image page-faults all of that memory back in: measured on a 2-core VM with
SegFormer MiT-B0 on 256 x 512 images in one thread, 19 thousand page faults and 24 ms of kernel
time per image, against 73-75 ms of compute. Keeping freed memory
in the process for reuse removes the faults; the cost is that the process keeps its peak
footprint until it exits, which suits a command that runs one job.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from blda_tools.errors import BLDAError, worker_died

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; True when applied (glibc), False elsewhere.

    Three settings, each found necessary on its own (page faults measured per image): never
    trim the heap (`M_TRIM_THRESHOLD`), never serve an allocation with its own mapping
    (`M_MMAP_MAX = 0`), and one arena for all threads (`M_ARENA_MAX = 1`), as worker threads'
    arenas are unmapped whenever they empty. Threads that already allocated keep their arena,
    so call this before the first inference. Applied once per process.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((M_TRIM_THRESHOLD, 1 << 30), (M_MMAP_MAX, 0), (M_ARENA_MAX, 1))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` meanwhile (process-wide), restored afterwards.

    Used where the caller runs its own threads: torch's OpenMP workers, spinning after each
    multi-threaded torch call, would take cores from them.
    """
    # Imported here: `exit_with_parent` serves processes that never load torch (figure workers).
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# prctl(2) option: the signal a process gets when the thread that forked it dies.
PR_SET_PDEATHSIG = 1
# Seconds between a worker's checks that its dump process is still there (the fallback where
# prctl is not available).
PARENT_POLL_SECONDS = 1.0


def exit_with_parent(parent: int) -> None:  # also a Pool / executor initializer
    """End this process when `parent` dies, even by SIGKILL: a worker blocked on a full pipe
    to a dead parent would otherwise live on for minutes (its queue's feeder thread waits for
    a reader). Linux kills it at once (prctl PR_SET_PDEATHSIG); a thread polling the parent id
    ends it within `PARENT_POLL_SECONDS` elsewhere, or if the parent died before prctl ran."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


@contextlib.contextmanager
def worker_processes(
    processes: int, purpose: str, initializer: Callable | None = None, initargs=()
) -> Iterator:
    """A `concurrent.futures.ProcessPoolExecutor` of `processes` spawned workers for a block.

    `multiprocessing.Pool` waits forever for the task of a worker that was killed (the
    system's out-of-memory killer, mostly); an executor fails every pending future with
    `BrokenProcessPool`, raised here as `WorkerDied` (a `BLDAError`) naming `purpose` (the
    CLI adds what to try). Workers leave Ctrl-C to this process and end when it dies
    (`exit_with_parent`), then run `initializer(*initargs)`. Leaving the block by an exception
    stops them at once; leaving it normally waits for their work.
    """
    pool = start_worker_pool(processes, initializer, initargs)
    try:
        yield pool
    except BaseException as error:
        close_worker_pool(pool, error, purpose)
        raise
    close_worker_pool(pool, None, purpose)


def start_worker_pool(processes: int, initializer: Callable | None = None, initargs=()):
    """The executor of `worker_processes`, its processes started now, for a caller that
    manages its lifetime itself."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fork of a process running torch and numba threads is not safe, and a fresh
    # process does not carry the parent's memory.
    pool = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, tuple(initargs)),
    )
    # An executor starts a process per task while none is idle: one task each starts them all
    # (they warm up meanwhile), here, where the caller's main module is hidden from them.
    with _main_module_hidden():
        for _ in range(processes):
            pool.submit(int)
    return pool


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Spawned workers run blda's functions only, yet spawn runs the caller's main module in
    each (`__mp_main__`) unless it has no file: a script without an `if __name__ ==
    "__main__"` guard started its work again in every worker (which died), and code fed on
    stdin could not be found. While processes start, `__main__` is an empty module."""
    import types

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def close_worker_pool(pool, error: BaseException | None, purpose: str) -> None:
    """Leave a pool: wait for its work when its block ended normally (`error` None), else stop
    the workers at once, and raise `WorkerDied` naming `purpose` when `error` is a worker's
    death (`BrokenProcessPool`); the caller re-raises any other error."""
    if error is None:
        pool.shutdown(wait=True)
        return
    stop_worker_pool(pool)
    if is_broken_pool(error):
        raise worker_died(purpose) from None


def stop_worker_pool(pool) -> None:
    """Cancel what has not started and terminate the workers now (their results are unwanted)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    # Before 3.14 an executor has no public way to stop running tasks: its worker processes
    # (`_processes`, pid -> Process, which `shutdown` drops) are terminated directly.
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=5.0)


def is_broken_pool(error: BaseException | None) -> bool:
    """Whether `error` is an executor's report of a worker that died."""
    from concurrent.futures.process import BrokenProcessPool

    return isinstance(error, BrokenProcessPool)


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    # Ctrl-C reaches every process of the terminal's group; the parent stops the pool, and a
    # worker's own KeyboardInterrupt would only print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def readable_worker_errors(items: Iterable):
    """`items` (a DataLoader's), with each BLDAError as its worker raised it
    (`without_worker_traceback`)."""
    try:
        yield from items
    except BLDAError as error:  # e.g. a sample that cannot be read
        raise without_worker_traceback(error) from None


def without_worker_traceback(error: Exception) -> Exception:
    """`error` as a DataLoader worker raised it. torch re-raises a worker's exception in the
    parent with the worker's whole traceback as its message ("Caught CorruptSampleError in
    DataLoader worker process 0. Original Traceback (most recent call last): ..."), which the
    CLI would print as one 1,400-character error line; the same type with the worker's own
    message instead (an error raised without workers is returned as it is)."""
    message = str(error)
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return error
    kind = type(error)
    # The traceback's last line is "<module>.<class>: <the worker's message>" (chained
    # exceptions, if any, come before it).
    _, found, original = message.rpartition(f"\n{kind.__module__}.{kind.__qualname__}: ")
    if not found:
        return error
    try:
        return kind(original.strip())
    except Exception:  # noqa: BLE001 - a class that wants other arguments: keep torch's
        return error
