"""Benchmark the batched GMM engine against a loop of scikit-learn over the cells.

    python benchmarks/bench_gmm.py [--cells 361] [--samples 10000] [--sklearn-cells N] [--threads T]

Prints the machine, the time of the batched fit (361 cells x 10,000 samples, K = 5) and of a
Python loop of sklearn.mixture.GaussianMixture over the same cells (same max_iter and tol: both
stop on the change of the mean log-likelihood per sample), the speed-up, the mean log-likelihood of
both, and the cost of one online step (T = 3 EM steps from the previous estimate plus the momentum
update, 361 cells x 2,000 samples) next to cross-entropy forward + backward on 2 x 19 x 512 x 512
logits. With --sklearn-cells N < cells, scikit-learn is timed on the first N cells only and its
total is extrapolated (said so in the output). Target (issue 20): the batched fit >= 100x the
scikit-learn loop, mean log-likelihood within 0.5 %.

The limit printed next to the fit: its arithmetic (cell-iterations x samples x K x about 30
float32 operations of the fused E + M pass, `blda_tools/gmm/em_kernel.py`) at the measured
matrix-product rate, and its memory traffic (samples and weights read once per iteration) at
the measured copy bandwidth; the larger is a lower bound of the time.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from limits import print_limits, print_machine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from blda_tools.gmm import GaussianMixture1D, StepsSinceUpdate

# float32 operations per sample and component of one E + M iteration in the compiled kernel:
# the base-2 log-density (3), peak and clamp (3), exp2 (11), the evidence (1), the moments (6),
# and a share of the per-sample log and division.
OPERATIONS_PER_SAMPLE_COMPONENT = 26


def random_mixture_samples(cells: int, samples: int, seed: int = 0) -> np.ndarray:
    """Each cell: 3 components with random weights, means in [-8, 8], stds in [0.3, 2]."""
    rng = np.random.default_rng(seed)
    out = np.empty((cells, samples))
    for cell in range(cells):
        weights = rng.dirichlet(np.ones(3))
        component = rng.choice(3, size=samples, p=weights)
        means, stds = rng.uniform(-8, 8, 3), rng.uniform(0.3, 2.0, 3)
        out[cell] = rng.normal(means[component], stds[component])
    return out


def best_of(function, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def bench_fit(
    data: np.ndarray, sklearn_cells: int, max_iter: int, tol: float, n_init: int, limits
) -> None:
    samples = torch.tensor(data, dtype=torch.float32)
    cells, count = data.shape
    start = time.perf_counter()
    GaussianMixture1D(5).fit(samples[:2, :1000], max_iter=3)  # loads (or compiles) the kernel
    print(f"\nkernel load or compile: {time.perf_counter() - start:.2f} s (not in the timings)")
    start = time.perf_counter()
    model = GaussianMixture1D(5, n_init=n_init).fit(samples, max_iter=max_iter, tol=tol)
    batched_seconds = time.perf_counter() - start
    ours = model.log_likelihood(samples).double().numpy()
    print(f"\nfit: {cells} cells x {count} samples, K = 5, max_iter = {max_iter}, tol = {tol}")
    print(f"  (ours: init quantile, n_init {n_init}; sklearn: k-means init, n_init 1)")
    print(
        f"  batched GaussianMixture1D: {batched_seconds:.2f} s "
        f"(iterations per cell: mean {model.n_iter_.float().mean():.1f}, "
        f"converged {int(model.converged_.sum())}/{cells})"
    )
    bandwidth, flops = limits
    iterations = float(model.n_iter_.sum())
    arithmetic = iterations * count * 5 * OPERATIONS_PER_SAMPLE_COMPONENT / flops
    traffic = iterations * count * 8 / bandwidth
    print(
        f"  limit: arithmetic {arithmetic:.2f} s ({iterations:.0f} cell-iterations x {count} "
        f"samples x K x {OPERATIONS_PER_SAMPLE_COMPONENT} ops at the matrix-product rate), "
        f"memory {traffic:.2f} s; the fit takes {batched_seconds / max(arithmetic, traffic):.1f}x"
        " the larger"
    )
    theirs = np.empty(sklearn_cells)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for cell in range(sklearn_cells):
            reference = GaussianMixture(5, max_iter=max_iter, tol=tol, random_state=cell)
            theirs[cell] = reference.fit(data[cell, :, None]).score(data[cell, :, None])
    sklearn_seconds = (time.perf_counter() - start) * cells / sklearn_cells
    note = "" if sklearn_cells == cells else f" (timed on {sklearn_cells} cells, extrapolated)"
    print(f"  loop of sklearn GaussianMixture: {sklearn_seconds:.2f} s{note}")
    print(f"  speed-up: {sklearn_seconds / batched_seconds:.1f}x (target >= 100x)")
    relative = (ours[:sklearn_cells] - theirs) / np.abs(theirs)
    print(
        f"  mean log-likelihood per sample, mean over cells: ours {ours[:sklearn_cells].mean():.5f}, "
        f"sklearn {theirs.mean():.5f}"
    )
    print(
        f"  per cell (ours - sklearn) / |sklearn|: min {relative.min():+.4%}, "
        f"max {relative.max():+.4%}; within 0.5%: {np.mean(np.abs(relative) <= 0.005):.1%} of cells"
    )
    print(
        f"  cells where ours is worse by > 0.5%: {int(np.sum(relative < -0.005))}, "
        f"better by > 0.5%: {int(np.sum(relative > 0.005))} (EM local optima, either side)"
    )


def bench_online_step(data: np.ndarray, repeats: int) -> None:
    cells = data.shape[0]
    samples = torch.tensor(data[:, :2000], dtype=torch.float32)
    model = GaussianMixture1D(5).fit(samples, max_iter=10)
    clock = StepsSinceUpdate(model.batch_shape)

    def online_step():
        steps = clock.tick()
        new = model.em_step(samples, n_steps=3)
        model.momentum_update(new, 0.99, steps, new.updated_)
        clock.reset(new.updated_)

    step_seconds = best_of(online_step, repeats)
    logits = torch.randn(2, 19, 512, 512, requires_grad=True)
    labels = torch.randint(0, 19, (2, 512, 512))

    def cross_entropy():
        F.cross_entropy(logits, labels).backward()

    ce_seconds = best_of(cross_entropy, repeats)
    print(f"\nonline step: {cells} cells x 2000 samples, K = 5, T = 3 EM steps + momentum update")
    print(f"  {step_seconds * 1000:.1f} ms (best of {repeats})")
    print(f"  cross-entropy forward + backward, 2 x 19 x 512 x 512: {ce_seconds * 1000:.1f} ms")
    print(f"  ratio online step / cross-entropy: {step_seconds / ce_seconds:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=361)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--sklearn-cells", type=int, default=None)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine(torch.get_num_threads())
    limits = print_limits()
    data = random_mixture_samples(args.cells, args.samples)
    bench_online_step(data, args.repeats)
    sklearn_cells = min(args.sklearn_cells or args.cells, args.cells)
    bench_fit(data, sklearn_cells, args.max_iter, args.tol, args.n_init, limits)


if __name__ == "__main__":
    main()
