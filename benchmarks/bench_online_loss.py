"""Cost of the online BLDA loss against plain cross-entropy (issue 17 targets: <= 2x time,
<= 300 MB extra peak memory) on 2 x 19 x 512 x 512 logits, with the default options, and the
error of the offset tables against the exact Eq. 6.

Time: forward + backward of each loss on the same tensors, alternated in one process, median of
`--repeats` runs after warm-up iterations that fit every GMM (so offsets are active). BLDA
includes its per-call statistics update (sampling, T EM steps, momentum) and the regression term.
Memory: a fresh subprocess runs cross-entropy steps, then BLDA steps on the same inputs, and
reports each one's peak resident set size (VmHWM, reset in between) above the resident size once
the inputs exist; with glibc's mmap threshold lowered, freed tensors leave the RSS at once, so
the peak follows live tensors. BLDA's extra peak memory is the difference.

Offset error: after the warm-up, every source cell (y, c) of a fitted row is evaluated on 400
logits from mu_min - 4 sigma to mu_max + 4 sigma (both clamp kinks inside) through
`BLDALoss.offsets`, against F_anchor^-1(clip(F_yc(z), eps, 1 - eps)) - z in float64 with the
anchor inverse by bisection (80 halvings).

    python benchmarks/bench_online_loss.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from blda_tools.gmm import mixture_cdf
from blda_tools.online.loss import BLDALoss

SHAPE = (2, 19, 512, 512)
# Roughly Cityscapes-like class shares: a few head classes, many small ones.
CLASS_SHARES = [
    0.33, 0.08, 0.20, 0.006, 0.008, 0.011, 0.002, 0.005, 0.14, 0.01,
    0.035, 0.011, 0.002, 0.06, 0.003, 0.003, 0.002, 0.001, 0.004,
]  # fmt: skip


def make_batch(seed: int = 0):
    """Blocky label maps (16 x 16 blocks drawn with CLASS_SHARES, 2% ignored) and logits that
    score the labelled class higher (N(0, 1) + 4 on the true class)."""
    generator = torch.Generator().manual_seed(seed)
    batch, classes, height, width = SHAPE
    shares = torch.tensor(CLASS_SHARES)
    coarse = torch.multinomial(shares, batch * 32 * 32, replacement=True, generator=generator)
    coarse = coarse.reshape(batch, 1, 32, 32).float()
    labels = F.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    labels[torch.rand(labels.shape, generator=generator) < 0.02] = 255
    logits = torch.randn(SHAPE, generator=generator)
    # in place, so building the inputs never needs more memory than a loss step
    logits.scatter_add_(
        1, labels.clamp_max(classes - 1)[:, None], torch.full_like(logits[:, :1], 4)
    )
    regression = torch.rand(batch, 1, height, width, generator=generator)
    return logits, labels, regression


def cross_entropy_step(logits, labels, regression=None):
    leaf = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(leaf, labels, reduction="none", ignore_index=255).mean()
    loss.backward()
    return leaf.grad


def blda_step(blda, logits, labels, regression):
    leaf = logits.clone().requires_grad_(True)
    head = regression.clone().requires_grad_(True)
    loss = blda(leaf, labels, domain="source", regression=head)
    loss.backward()
    return leaf.grad


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure_time(repeats: int) -> dict:
    logits, labels, regression = make_batch()
    blda = BLDALoss(SHAPE[1])
    for _ in range(3):  # fits the GMMs: later calls run the steady-state path
        blda_step(blda, logits, labels, regression)
    cross_entropy_step(logits, labels)
    ce_times, blda_times = [], []
    for _ in range(repeats):
        ce_times.append(timed(lambda: cross_entropy_step(logits, labels)))
        blda_times.append(timed(lambda: blda_step(blda, logits, labels, regression)))
    ce, bl = statistics.median(ce_times), statistics.median(blda_times)
    return {
        "offset_error": offset_table_error(blda),
        "cross_entropy_s": ce,
        "blda_s": bl,
        "ratio": bl / ce,
        "samples_per_cell": blda.last_terms.get("source_samples_per_cell"),
        "rows_updated": blda.last_terms.get("source_cells_updated", 0) // SHAPE[1],
    }


def exact_offsets(blda: BLDALoss, z, row: int, column: int):
    """Eq. 6 in float64 for source cell (row, column): anchor inverse by bisection."""
    cell = [
        getattr(blda.source, n)[row, column].double() for n in ("weights", "means", "variances")
    ]
    which = 0 if row == column else 1
    anchor = [getattr(blda.anchors, n)[which].double() for n in ("weights", "means", "variances")]
    p = mixture_cdf(z, *cell).clamp(blda.eps, 1 - blda.eps)
    spread = 12 * anchor[2].sqrt().max()
    low = torch.full_like(z, float(anchor[1].min() - spread))
    high = torch.full_like(z, float(anchor[1].max() + spread))
    for _ in range(80):
        middle = (low + high) / 2
        below = mixture_cdf(middle, *anchor) < p
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return (low + high) / 2 - z


def offset_table_error(blda: BLDALoss, points: int = 400) -> float:
    """Largest |table Delta - exact Delta| over every cell of the fitted source rows."""
    classes = blda.num_classes
    worst = 0.0
    for row in blda.source.fitted.all(dim=1).nonzero()[:, 0].tolist():
        means, std = blda.source.means[row], blda.source.variances[row].sqrt()
        low = (means - 4 * std).amin(-1).double()
        high = (means + 4 * std).amax(-1).double()
        steps = torch.linspace(0, 1, points, dtype=torch.float64)
        z = (low[None, :] + (high - low)[None, :] * steps[:, None]).float()  # (N, C)
        labels = torch.full((points,), row, dtype=torch.int64)
        table = blda.offsets(z, labels).double()
        for column in range(classes):
            exact = exact_offsets(blda, z[:, column].double(), row, column)
            worst = max(worst, float((table[:, column] - exact).abs().max()))
    return worst


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux >= 4.0). Not ru_maxrss: that one
    survives fork + exec, so a child would start from its parent's peak."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_child() -> None:
    """Run in a fresh subprocess: the peak RSS of cross-entropy steps and of BLDA steps, both
    above the resident size once the inputs exist; BLDA's extra is the difference."""
    logits, labels, regression = make_batch()
    blda = BLDALoss(SHAPE[1])
    base = status_bytes("VmRSS")
    reset_peak()
    for _ in range(2):
        cross_entropy_step(logits, labels)
    cross_entropy = status_bytes("VmHWM") - base
    reset_peak()
    for _ in range(4):
        blda_step(blda, logits, labels, regression)
    blda_peak = status_bytes("VmHWM") - base
    print(json.dumps({"cross_entropy": cross_entropy, "blda": blda_peak}))


def measure_memory(threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child"]
    if threads:
        command += ["--threads", str(threads)]
    # Large blocks go straight to mmap and back on free, so the peak RSS follows the peak of
    # live tensors rather than whatever glibc's heap happened to keep.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    return {**memory, "extra": memory["blda"] - memory["cross_entropy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        peak_rss_child()
        return
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | {os.cpu_count()} cores | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads | "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} | "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"logits {SHAPE}, float32, CPU")
    times = measure_time(args.repeats)
    print(
        f"time (median of {args.repeats}): cross_entropy fwd+bwd {times['cross_entropy_s']:.3f} s"
        f" | BLDA fwd+bwd incl. GMM update {times['blda_s']:.3f} s | ratio "
        f"{times['ratio']:.2f}x (target <= 2x) | {times['samples_per_cell']} samples per cell, "
        f"{times['rows_updated']} rows updated"
    )
    print(
        f"offset tables: largest error against the exact Eq. 6 {times['offset_error']:.2e} "
        "(target <= 1e-4)"
    )
    memory = measure_memory(args.threads)
    mib = 1 << 20
    print(
        f"peak RSS above the inputs: cross_entropy {memory['cross_entropy'] / mib:.0f} MiB | "
        f"BLDA {memory['blda'] / mib:.0f} MiB | extra {memory['extra'] / mib:.0f} MiB "
        f"(target <= 300 MB)"
    )


if __name__ == "__main__":
    main()
