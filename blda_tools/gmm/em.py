"""EM for flat batches of 1-D mixtures: initialisations (quantile, k-means++), the E step with
the M step's sufficient statistics, the M step, and the EM loop with per-cell convergence.

Every function works on flat cells: samples and weights ``(G, N)`` (weight 0 = not a sample),
parameters ``(G, K)``. `GaussianMixture1D` flattens its batch, validates and centres the samples
before calling them.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from blda_tools.gmm import em_kernel, init_kernel
from blda_tools.gmm.normal import _LOG_2PI

# Added to every normalised responsibility in the M step, so a component that explains no
# sample keeps a finite mean (the cell's mean) instead of 0 / 0. The release adds 1e-7 to the
# un-normalised weighted likelihoods instead, which makes far-away samples' responsibilities
# uniform (docs/training.md, departures).
RESPONSIBILITY_EPSILON = 1e-7
INITS = ("quantile", "kmeans++")
# Size of the (cells, K, samples) work tensor of the E step, in elements (about 1 MiB).
CHUNK_ELEMENTS = 1 << 18
LLOYD_ITERATIONS = 10
# Cells per task of the compiled EM: small enough that threads finish together although
# cells converge after different numbers of iterations.
CELLS_PER_TASK = 4
# Cells per task of the quantile initialisation: every cell costs the same (one sort), so
# larger tasks only amortise numpy's per-call cost.
INIT_CELLS_PER_TASK = 32


def _em_statistics(x, w, weights, means, variances, floor):
    """E step plus the M step's sufficient statistics for flat cells.

    x, w: (G, N) samples and weights (0 = not a sample); parameters (G, K). Returns the
    responsibility-weighted moments (G, K, 3) = sum_n w_n r_nk [1, x_n, x_n^2] (with 1e-7 added
    to every normalised r_nk) and the weighted log-likelihood sum per cell (G,).
    """
    cells, count = x.shape
    components = weights.shape[-1]
    variances = variances.clamp_min(floor)
    inv_std = variances.rsqrt()[:, :, None]
    log_norm = weights.clamp_min(torch.finfo(x.dtype).tiny).log() - 0.5 * (
        _LOG_2PI + variances.log()
    )
    moments = torch.empty(cells, components, 3, dtype=x.dtype, device=x.device)
    log_likelihood = torch.empty(cells, dtype=x.dtype, device=x.device)
    # Blocks of whole cells, (cells, K, N) layout: the work tensor stays in cache and every op
    # runs along contiguous sample rows (measured fastest on CPU; see benchmarks/bench_gmm.py).
    block = max(1, CHUNK_ELEMENTS // max(1, components * count))
    for start in range(0, cells, block):
        rows = slice(start, start + block)
        x_block, w_block = x[rows], w[rows]
        log_joint = x_block[:, None, :] - means[rows, :, None]
        log_joint.mul_(inv_std[rows]).square_().mul_(-0.5).add_(log_norm[rows, :, None])
        peak = log_joint[:, 0]
        for k in range(1, components):
            peak = torch.maximum(peak, log_joint[:, k])
        # exp(-80) is still a normal float32: no slow denormals, and far below the 1e-7 added.
        joint = log_joint.sub_(peak[:, None]).clamp_min_(-80.0).exp_()
        evidence = joint.sum(dim=1)  # >= 1: the peak term is exp(0)
        log_likelihood[rows] = (w_block * (peak + evidence.log())).sum(dim=-1)
        # r_nk = joint / evidence; 1 / evidence and the weight fold into the moment rows.
        scaled = w_block / evidence
        powers = torch.stack((scaled, scaled * x_block, scaled * x_block * x_block), dim=1)
        moments[rows] = torch.bmm(joint, powers.transpose(1, 2))
    raw = torch.stack((w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)), dim=-1)
    moments += RESPONSIBILITY_EPSILON * raw[:, None, :]
    return moments, log_likelihood


def _parameters_from_moments(moments: Tensor, floor: float):
    """M step: weights, means and floored variances from weighted moments (G, K, 3)."""
    mass = moments[..., 0].clamp_min(torch.finfo(moments.dtype).tiny)
    means = moments[..., 1] / mass
    variances = (moments[..., 2] / mass - means * means).clamp_min(floor)
    weights = mass / mass.sum(dim=-1, keepdim=True)
    return weights, means, variances


def _quantile_init(x, w, components, floor):
    """Means at the weighted quantiles (k + 1/2) / K, equal weights, pooled within variance.
    float32 on a CPU: numpy's argsort and the compiled walk (`init_kernel.quantile_cells`);
    float64 or another device: torch."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return _quantile_init_compiled(x, w, components, floor)
    return _quantile_init_torch(x, w, components, floor)


def _quantile_init_torch(x, w, components, floor):
    """`_quantile_init` in torch (any device)."""
    order = torch.where(w > 0, x, torch.inf).argsort(dim=-1)
    sorted_x, sorted_w = x.gather(-1, order), w.gather(-1, order)
    cumulative = sorted_w.cumsum(dim=-1)
    levels = (torch.arange(components, dtype=x.dtype, device=x.device) + 0.5) / components
    targets = (levels * cumulative[:, -1:]).contiguous()
    index = torch.searchsorted(cumulative.contiguous(), targets).clamp_max(x.shape[-1] - 1)
    means = sorted_x.gather(-1, index)
    closest = torch.full_like(x, torch.inf)
    for k in range(components):
        closest = torch.minimum(closest, (x - means[:, k, None]).square())
    pooled = (w * closest).sum(-1) / w.sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
    variances = pooled.clamp_min(floor)[:, None].expand_as(means).clone()
    weights = torch.full_like(means, 1.0 / components)
    return weights, means, variances


def _quantile_init_compiled(x, w, components, floor):
    """`_quantile_init` for float32 on a CPU, cells split over torch's threads."""
    x, w = x.contiguous().numpy(), w.to(torch.float32).contiguous().numpy()
    cells = x.shape[0]
    means = np.empty((cells, components), np.float32)
    variances = np.empty_like(means)
    settings = np.array([floor, torch.finfo(torch.float32).tiny], dtype=np.float64)

    def task(start: int, stop: int) -> None:
        # numpy's sort releases the GIL; weight-0 samples go last, as in the torch path.
        rows = slice(start, stop)
        order = np.argsort(np.where(w[rows] > 0, x[rows], np.inf), axis=-1)
        init_kernel.quantile_cells(x[rows], w[rows], order, means[rows], variances[rows],
                                   settings, 0, stop - start)  # fmt: skip

    _in_threads(task, cells, INIT_CELLS_PER_TASK)
    weights = torch.full((cells, components), 1.0 / components, dtype=torch.float32)
    return weights, torch.from_numpy(means), torch.from_numpy(variances)


def _kmeans_plus_plus_init(x, w, components, floor, generator):
    """k-means++ seeding (D^2 sampling, weighted), Lloyd iterations, then an M step."""
    uniform = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    chosen = x.gather(-1, torch.multinomial(uniform, 1, generator=generator))
    centers = [chosen]
    closest = (x - chosen).square()
    for _ in range(1, components):
        spread = closest * w
        spread = torch.where(spread.sum(-1, keepdim=True) > 0, spread, uniform)
        chosen = x.gather(-1, torch.multinomial(spread, 1, generator=generator))
        centers.append(chosen)
        closest = torch.minimum(closest, (x - chosen).square())
    centers = torch.cat(centers, dim=-1)
    raw = torch.stack((w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)), dim=-1)
    powers = torch.stack((w, w * x, w * x * x), dim=-1)
    # Lloyd iterations (like the k-means scikit-learn runs before its EM), then one M step.
    for _ in range(LLOYD_ITERATIONS):
        label = (x[:, None, :] - centers[:, :, None]).abs().argmin(dim=1)
        moments = torch.zeros(*centers.shape, 3, dtype=x.dtype, device=x.device)
        moments.scatter_add_(1, label[..., None].expand(-1, -1, 3), powers)
        moments += RESPONSIBILITY_EPSILON * raw[:, None, :]
        previous, centers = centers, moments[..., 1] / moments[..., 0]
        if torch.equal(previous, centers):
            break
    return _parameters_from_moments(moments, floor)


def _run_em(x, w, parameters, floor, max_iter, tol):
    """EM on flat cells until each cell's mean log-likelihood changes by less than `tol`
    (`tol` < 0: exactly `max_iter` steps).

    Converged cells are frozen and dropped from later iterations (as scikit-learn stops per
    model). Returns the parameters, a converged flag, the iteration count and the last mean
    log-likelihood per cell. float32 on a CPU: the compiled kernel runs each cell's loop
    (`em_kernel.fit_cells`); float64 or another device: the torch loop.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return _run_em_compiled(x, w, parameters, floor, max_iter, tol)
    return _run_em_torch(x, w, parameters, floor, max_iter, tol)


def _run_em_torch(x, w, parameters, floor, max_iter, tol):
    """`_run_em` in torch, one iteration of every active cell at a time (any device)."""
    cells = x.shape[0]
    weights, means, variances = (p.clone() for p in parameters)
    converged = torch.zeros(cells, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(cells, dtype=torch.int64, device=x.device)
    previous = torch.full((cells,), -torch.inf, dtype=x.dtype, device=x.device)
    total_weight = w.sum(-1)
    active = torch.arange(cells, device=x.device)
    x_active, w_active = x, w
    for _ in range(max_iter):
        moments, log_likelihood = _em_statistics(
            x_active, w_active, weights[active], means[active], variances[active], floor
        )
        step = _parameters_from_moments(moments, floor)
        for target, value in zip((weights, means, variances), step, strict=True):
            target[active] = value
        n_iter[active] += 1
        mean_log_likelihood = log_likelihood / total_weight[active]
        done = (mean_log_likelihood - previous[active]).abs() < tol
        previous[active] = mean_log_likelihood
        converged[active[done]] = True
        if done.all():
            break
        if done.any():
            active, x_active, w_active = active[~done], x_active[~done], w_active[~done]
    return (weights, means, variances), converged, n_iter, previous


def _run_em_compiled(x, w, parameters, floor, max_iter, tol):
    """`_run_em` on a CPU by `em_kernel.fit_cells`, in as many threads as torch's, each taking
    `CELLS_PER_TASK` cells at a time."""
    x, w = x.contiguous(), w.to(x.dtype).contiguous()
    weights, means, variances = (p.to(x.dtype).contiguous().clone() for p in parameters)
    cells = weights.shape[0]
    converged = torch.zeros(cells, dtype=torch.bool)
    n_iter = torch.zeros(cells, dtype=torch.int64)
    last = torch.full((cells,), -torch.inf, dtype=x.dtype)
    tiny = torch.finfo(x.dtype).tiny
    settings = np.array([floor, tiny, RESPONSIBILITY_EPSILON, max_iter, tol], dtype=np.float64)
    arrays = [t.numpy() for t in (x, w, weights, means, variances)]
    arrays += [settings, converged.numpy(), n_iter.numpy(), last.numpy()]

    def task(start: int, stop: int) -> None:
        em_kernel.fit_cells(*arrays, start, stop)

    _in_threads(task, cells, CELLS_PER_TASK)
    return (weights, means, variances), converged, n_iter, last


def _in_threads(task, cells: int, per_task: int) -> None:
    """task(start, stop) on consecutive ranges of `per_task` cells, in as many threads as
    torch's (the kernels release the GIL)."""
    ranges = [(start, min(cells, start + per_task)) for start in range(0, cells, per_task)]
    threads = max(1, min(torch.get_num_threads(), len(ranges)))
    if threads == 1:
        for start, stop in ranges:
            task(start, stop)
    else:
        list(_thread_pool(threads).map(lambda bounds: task(*bounds), ranges))


@functools.cache
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process (the kernel releases the GIL)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="blda-em")


def _better_run(best, challenger):
    """Per cell, keep the EM run (parameters, converged, n_iter, log-likelihood) that fits best."""
    wins = challenger[3] > best[3]
    parameters = tuple(
        torch.where(wins[:, None], new, old)
        for new, old in zip(challenger[0], best[0], strict=True)
    )
    flags = (torch.where(wins, new, old) for new, old in zip(challenger[1:], best[1:], strict=True))
    return (parameters, *flags)
