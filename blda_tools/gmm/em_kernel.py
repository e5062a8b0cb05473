"""EM for flat cells of 1-D mixtures in float32 on a CPU, compiled with numba: each cell runs
its whole EM loop (E step, M step, stopping rule) in one thread while its samples stay in cache.

The torch path of `em._run_em` makes about fifteen passes over a (cells, K, N) work tensor per
iteration and copies the active cells whenever some converge; here one pass per iteration
reads a cell's samples in blocks of `BLOCK` and keeps the K x BLOCK work in L1. Every loop runs
over the samples of a block, in float32 (16 per AVX-512 instruction, 8 per AVX2 one), so the
compiler vectorises it; exp and log are written out (`blda_tools.runtime.float32_math`)
because numba calls libm one value at a time. The log-densities are kept in base 2 (log2 p = log p /
ln 2, the scale folded into the per-component constants), which saves exp its multiplication by
1 / ln 2 and its two-part reduction. Threads take a few cells at a time (they converge unevenly).

The arithmetic is the torch path's (`em._em_statistics`, `em._parameters_from_moments`) in the
same float32: responsibilities with 1e-7 added, the variance floor, components without weight
kept finite, the stopping rule on the float32 mean log-likelihood (base 2 only changes the
last bits of the log-densities' rounding). Sums over a cell are formed per position of the
block in float32 (about N / BLOCK terms each) and then in float64, closer than torch's float32
reductions.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from blda_tools.runtime import float32_math
from blda_tools.runtime.float32_math import exp2_32, log32, prefer_wide_vectors
from blda_tools.runtime.jit import kernel

# Samples per block: the K x BLOCK work and 3 K x BLOCK float32 moment sums of K = 5 take 20 KiB.
BLOCK = 256
# Partial sums of `_sum64` (BLOCK is a multiple): two 512-bit registers of float64.
LANES = 16
_F = np.float32
LOG_2PI = math.log(2.0 * math.pi)
_HALF, _LN2 = _F(0.5), _F(math.log(2.0))
_LOG2_E = 1.0 / math.log(2.0)
# exp(-80) = 2^(-80 / ln 2) is still a normal float32 (no slow denormals) and far below the
# 1e-7 added to every responsibility, as in the torch path.
_LOWEST_TERM = _F(-80.0 * _LOG2_E)


@kernel(vectorise=True, depends_on=(float32_math,))
def fit_cells(x, w, weights, means, variances, settings, converged, n_iter, last, start, stop):
    """EM on cells [start, stop) of `x`, `w` ``(G, N)`` float32 (weight 0 = not a sample) from
    the parameters ``(G, K)`` float32 (updated in place) until the cell's mean log-likelihood
    changes by less than `tol` or `max_iter` iterations ran. `settings` = (floor, tiny,
    epsilon, max_iter, tol) float64: variance floor, float32's smallest normal, the
    responsibility epsilon. Writes `converged` ``(G,)`` bool, `n_iter` ``(G,)`` int64, `last`
    ``(G,)`` float32 (the last mean log-likelihood). Releases the GIL: threads may run
    disjoint ranges (numba's prange lowering made these loops half as fast)."""
    prefer_wide_vectors()
    for cell in range(start, stop):
        _fit_cell(x[cell], w[cell], weights[cell], means[cell], variances[cell], settings,
                  converged, n_iter, last, cell)  # fmt: skip


@numba.njit(inline="always")
def _fit_cell(x, w, weights, means, variances, settings, converged, n_iter, last, cell):
    floor, tiny, epsilon, max_iter, tol = settings
    components, count = weights.shape[0], x.shape[0]
    work, moments = np.empty((components, BLOCK), _F), np.empty((components, 3, BLOCK), _F)
    peak, evidence, likelihood = np.empty(BLOCK, _F), np.empty(BLOCK, _F), np.empty(BLOCK, _F)
    center, inv_std, log_norm = (
        np.empty(components, _F),
        np.empty(components, _F),
        np.empty(components, _F),
    )
    mass, lanes = np.empty(components), np.empty(LANES)
    raw0 = raw1 = raw2 = 0.0
    for n in range(count):
        weight, value = float(w[n]), float(x[n])
        raw0, raw1, raw2 = raw0 + weight, raw1 + weight * value, raw2 + weight * value * value
    total_weight = _F(raw0)
    previous = _F(-math.inf)
    converged[cell], n_iter[cell] = False, 0
    for _ in range(int(max_iter)):
        for k in range(components):  # log2 w_k N(x) = log_norm_k - ((x - mean_k) inv_std_k)^2
            variance = max(float(variances[k]), floor)
            inv_std[k] = math.sqrt(0.5 * _LOG2_E / variance)
            log_norm[k] = _LOG2_E * (
                math.log(max(float(weights[k]), tiny)) - 0.5 * (LOG_2PI + math.log(variance))
            )
            center[k] = means[k]
        moments[:], likelihood[:] = 0.0, 0.0
        for start in range(0, count, BLOCK):
            size = min(BLOCK, count - start)
            _e_step_block(x[start : start + size], w[start : start + size], center, inv_std,
                          log_norm, work, moments, peak, evidence, likelihood)  # fmt: skip
        total = 0.0
        for k in range(components):
            mass[k] = max(_sum64(moments[k, 0], lanes) + epsilon * raw0, tiny)
            total += mass[k]
        for k in range(components):  # M step
            mean = (_sum64(moments[k, 1], lanes) + epsilon * raw1) / mass[k]
            second = (_sum64(moments[k, 2], lanes) + epsilon * raw2) / mass[k]
            means[k] = mean
            variances[k] = max(second - mean * mean, floor)
            weights[k] = mass[k] / total
        n_iter[cell] += 1
        current = _F(_sum64(likelihood, lanes)) / total_weight  # float32, as torch
        last[cell] = current
        if abs(current - previous) < tol:
            converged[cell] = True
            break
        previous = current


@numba.njit(inline="always")
def _sum64(values, lanes):
    """The float64 sum of the BLOCK float32 `values`, in LANES interleaved partial sums: one
    chain of dependent float64 additions (numpy's order) took a fifth of an iteration."""
    lanes[:] = 0.0
    for start in range(0, BLOCK, LANES):
        for lane in range(LANES):
            lanes[lane] += values[start + lane]
    total = 0.0
    for lane in range(LANES):
        total += lanes[lane]
    return total


@numba.njit(inline="always")
def _e_step_block(x, w, center, inv_std, log_norm, work, moments, peak, evidence,
                  likelihood):  # fmt: skip
    """E step of one block of samples: responsibilities r_nk (their normalisation folded into
    the weights), and per position of the block the moments [r, r x, r x^2] and w log p(x).
    `work`, `peak` hold log2 densities."""
    size, components = x.shape[0], work.shape[0]
    for j in range(size):  # component 0 starts the peak (an -inf start cost 12 %: harness)
        standard = (x[j] - center[0]) * inv_std[0]
        value = log_norm[0] - standard * standard
        work[0, j] = value
        peak[j], evidence[j] = value, 0.0
    for k in range(1, components):
        for j in range(size):
            standard = (x[j] - center[k]) * inv_std[k]
            value = log_norm[k] - standard * standard
            work[k, j] = value
            peak[j] = max(peak[j], value)
    for k in range(components):
        for j in range(size):
            term = exp2_32(max(work[k, j] - peak[j], _LOWEST_TERM))
            work[k, j] = term
            evidence[j] += term  # >= 1: the peak's term is exp(0)
    for j in range(size):  # log p(x_n) = peak ln 2 + log(evidence)
        likelihood[j] += w[j] * (peak[j] * _LN2 + log32(evidence[j]))
        evidence[j] = w[j] / evidence[j]  # r_nk = work * evidence from here on
    for k in range(components):
        for j in range(size):
            responsibility = work[k, j] * evidence[j]
            moments[k, 0, j] += responsibility
            moments[k, 1, j] += responsibility * x[j]
            moments[k, 2, j] += responsibility * x[j] * x[j]
