"""The standard normal CDF (exact, or by Abramowitz & Stegun as released) and the CDF, density
and log-density of 1-D Gaussian mixtures given as parameter tensors ``(..., K)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

CDF_METHODS = ("ndtr", "abramowitz-stegun")
_LOG_2PI = math.log(2.0 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Abramowitz & Stegun (1964), formula 26.2.17.
_AS_P = 0.2316419
_AS_B = (0.319381530, -0.356563782, 1.781477937, -1.821255978, 1.330274429)


def normal_cdf_abramowitz_stegun(x: Tensor) -> Tensor:
    """Standard normal CDF by Abramowitz & Stegun 26.2.17 (|error| < 7.5e-8), as released."""
    magnitude = x.abs()
    t = 1.0 / (1.0 + _AS_P * magnitude)
    b1, b2, b3, b4, b5 = _AS_B
    polynomial = t * (b1 + t * (b2 + t * (b3 + t * (b4 + t * b5))))
    upper_tail = torch.exp(-0.5 * magnitude * magnitude) * _INV_SQRT_2PI * polynomial
    return torch.where(x >= 0, 1.0 - upper_tail, upper_tail)


def _numerical_variance_floor(dtype: torch.dtype) -> float:
    # Keeps 1 / sigma and (z - mu)^2 / sigma^2 finite even with variance_floor = 0.
    return math.sqrt(torch.finfo(dtype).tiny)


def mixture_cdf(z: Tensor, weights: Tensor, means: Tensor, variances: Tensor, method="ndtr"):
    """F(z) = sum_k pi_k Phi((z - mu_k) / sigma_k); parameters ``(..., K)`` broadcast against
    ``z[..., None]``. Loops over the K components only, so no ``(..., K)`` temporary is made."""
    normal_cdf = torch.special.ndtr if method == "ndtr" else normal_cdf_abramowitz_stegun
    inv_std = variances.clamp_min(_numerical_variance_floor(variances.dtype)).rsqrt()
    total = torch.zeros((), dtype=z.dtype, device=z.device)
    for k in range(weights.shape[-1]):
        standard = (z - means[..., k, None]) * inv_std[..., k, None]
        total = total + weights[..., k, None] * normal_cdf(standard)
    return total.clamp(0.0, 1.0)


def mixture_pdf(z: Tensor, weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """Density sum_k pi_k N(z; mu_k, sigma_k^2), broadcasting as `mixture_cdf`."""
    inv_std = variances.clamp_min(_numerical_variance_floor(variances.dtype)).rsqrt()
    total = torch.zeros((), dtype=z.dtype, device=z.device)
    for k in range(weights.shape[-1]):
        standard = (z - means[..., k, None]) * inv_std[..., k, None]
        scale = weights[..., k, None] * inv_std[..., k, None] * _INV_SQRT_2PI
        total = total + scale * torch.exp(-0.5 * standard * standard)
    return total


def mixture_log_pdf(z: Tensor, weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """log of `mixture_pdf`, computed stably with a log-sum-exp over components."""
    variances = variances.clamp_min(_numerical_variance_floor(variances.dtype))
    log_norm = weights.clamp_min(torch.finfo(weights.dtype).tiny).log() - 0.5 * (
        _LOG_2PI + variances.log()
    )
    standard = (z[..., None] - means[..., None, :]) * variances.rsqrt()[..., None, :]
    return torch.logsumexp(log_norm[..., None, :] - 0.5 * standard * standard, dim=-1)
