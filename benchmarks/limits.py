"""What a benchmark needs to say how far a figure is from this machine's limit: the machine
(CPU model, cores, load) and its measured memory bandwidth and float32 arithmetic rate.

    from limits import print_machine, measure_bandwidth, measure_flops

Bandwidth: the best of a few copies of a 256 MiB numpy array (bytes read + written per
second). Arithmetic: the best rate of a float32 matrix product (fused multiply-adds counted
as 2 flops) on torch's threads; a vectorised kernel that is not a matrix product reaches a
fraction of it, so figures against it are lower bounds of the time.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_machine(threads: int | None = None) -> None:
    """CPU model, cores, torch's threads and the load average (other processes share it)."""
    import torch

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    threads = torch.get_num_threads() if threads is None else threads
    print(f"machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} cores")
    print(f"torch {torch.__version__} with {threads} thread(s); nice {os.nice(0)}")
    print(f"load average 1/5/15 min (other processes share the cores): {load}")


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one core copies between two numpy arrays (each byte read once and
    written once), the best of `repeats`: the rate at which it can stream data from memory."""
    source = np.ones(megabytes << 20, dtype=np.uint8)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return source.nbytes / best


def measure_bandwidth(megabytes: int = 256, repeats: int = 4) -> float:
    """Bytes per second of a big numpy copy, read + written counted."""
    return 2 * copy_bandwidth(megabytes, repeats)


def measure_flops(size: int = 1024, repeats: int = 5) -> float:
    """float32 flops per second of a size x size matrix product, the best of `repeats`."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def print_limits() -> tuple[float, float]:
    """Measure and print both; returns (bytes per second, flops per second)."""
    bandwidth, flops = measure_bandwidth(), measure_flops()
    print(
        f"measured: memory copy {bandwidth / 1e9:.1f} GB/s (read + write), "
        f"float32 matrix product {flops / 1e9:.0f} GFLOP/s"
    )
    return bandwidth, flops
