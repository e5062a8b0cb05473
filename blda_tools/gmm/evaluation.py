"""Evaluation of a batch of fitted mixtures: CDF, density, log-likelihood, inverse CDF and
sampling, as the methods `GaussianMixture1D` inherits."""

from __future__ import annotations

import torch
from torch import Tensor

from blda_tools.errors import BLDAError
from blda_tools.gmm.normal import (
    CDF_METHODS,
    _numerical_variance_floor,
    mixture_cdf,
    mixture_log_pdf,
    mixture_pdf,
)


class MixtureEvaluation:
    """CDF, density, log-likelihood, inverse CDF and sampling of a batch of 1-D mixtures.

    The base of `GaussianMixture1D`, which provides what these methods read: the parameters
    `weights`, `means`, `variances` ``(*batch_shape, K)``, `batch_shape`, `dtype`, `device`,
    `cdf_method`, `inverse_cdf_points`, `inverse_cdf_span` and `_flat()`.
    """

    def _points(self, z, name="z"):
        """z (..., M) as a model-dtype tensor whose leading dims broadcast with the batch."""
        z = torch.as_tensor(z, device=self.device)
        if z.ndim == 0:
            z = z[None]
        try:
            torch.broadcast_shapes(z.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise BLDAError(
                f"{name}: shape {tuple(z.shape)} does not broadcast as (*batch, M) against "
                f"batch shape {self.batch_shape}"
            ) from None
        return z.to(self.dtype)

    def cdf(self, z, method: str | None = None) -> Tensor:
        """Mixture CDF at `z` ``(*batch, M)`` -> ``(*batch, M)``; exact (ndtr) unless `method`
        (or the model's `cdf_method`) is "abramowitz-stegun" (as released, |error| < 7.5e-8)."""
        method = method or self.cdf_method
        if method not in CDF_METHODS:
            raise BLDAError(f"method: expected one of {CDF_METHODS}, got {method!r}")
        return mixture_cdf(self._points(z), self.weights, self.means, self.variances, method)

    def pdf(self, z) -> Tensor:
        """Mixture density at `z` ``(*batch, M)`` -> ``(*batch, M)``."""
        return mixture_pdf(self._points(z), self.weights, self.means, self.variances)

    def log_pdf(self, z) -> Tensor:
        """Log density at `z` ``(*batch, M)`` -> ``(*batch, M)``."""
        return mixture_log_pdf(self._points(z), self.weights, self.means, self.variances)

    def log_likelihood(self, samples, sample_weight=None, mask=None) -> Tensor:
        """Weighted mean log-density of the valid samples, per cell (NaN for a cell with none)."""
        z = self._points(samples, "samples")
        weight = (
            torch.ones_like(z)
            if sample_weight is None
            else torch.as_tensor(sample_weight, dtype=self.dtype, device=self.device).expand_as(z)
        )
        if mask is not None:
            weight = torch.where(torch.as_tensor(mask, device=self.device), weight, 0.0)
        z = torch.where(weight > 0, z, 0.0)
        if bool((weight > 0).any()) and not bool(torch.isfinite(z).all()):
            raise BLDAError("samples: contains NaN or infinite values")
        total = (self.log_pdf(z) * weight).sum(-1)
        return total / weight.sum(-1)

    def inverse_cdf(self, p, eps: float = 1e-6, newton_steps: int = 0) -> Tensor:
        """F^-1(p) for `p` ``(*batch, M)`` -> ``(*batch, M)``, by monotone interpolation.

        The CDF is tabulated per cell on `inverse_cdf_points` (default 1000, as released) evenly
        spaced points from min_k(mu_k - s sigma_k) to max_k(mu_k + s sigma_k), s =
        `inverse_cdf_span` = 6 (the release uses 3, which cuts the outer 0.13% off every
        component); p is clamped to [eps, 1 - eps] and located with searchsorted, then
        interpolated linearly. The error is about (grid step)^2 / (8 sigma_min) in the bulk;
        `newton_steps` safeguarded Newton steps on F(x) = p remove it at the cost of a CDF and a
        density evaluation each. Probabilities beyond the table (only when eps < Phi(-s)) map to
        its end points, so the result is always finite, also for zero-variance cells.
        """
        p = self._points(p, "p")
        if not bool(torch.isfinite(p).all()):  # clamp keeps a NaN, which would map to a value
            raise BLDAError("p: expected probabilities, got NaN or infinite values")
        p = p.clamp(float(eps), 1.0 - float(eps))
        std = self.variances.clamp_min(_numerical_variance_floor(self.dtype)).sqrt()
        lower = (self.means - self.inverse_cdf_span * std).amin(-1, keepdim=True)
        upper = (self.means + self.inverse_cdf_span * std).amax(-1, keepdim=True)
        steps = torch.linspace(
            0.0, 1.0, self.inverse_cdf_points, dtype=self.dtype, device=self.device
        )
        grid = torch.lerp(lower, upper, steps)  # (*batch, P)
        table = self.cdf(grid).cummax(dim=-1).values  # monotone even after rounding
        shape = torch.broadcast_shapes(p.shape[:-1], self.batch_shape)
        p = p.expand(*shape, p.shape[-1]).contiguous()
        grid = grid.expand(*shape, grid.shape[-1]).contiguous()
        table = table.expand(*shape, table.shape[-1]).contiguous()
        right = torch.searchsorted(table, p).clamp(1, self.inverse_cdf_points - 1)
        left = right - 1
        f_left, f_right = table.gather(-1, left), table.gather(-1, right)
        x_left, x_right = grid.gather(-1, left), grid.gather(-1, right)
        rise = f_right - f_left
        tiny = torch.finfo(self.dtype).tiny
        fraction = torch.where(rise > 0, (p - f_left) / rise.clamp_min(tiny), 0.5)
        x = torch.lerp(x_left, x_right, fraction.clamp(0.0, 1.0))
        for _ in range(int(newton_steps)):
            residual = self.cdf(x) - p
            slope = self.pdf(x)
            step = torch.where(slope > 0, residual / slope.clamp_min(tiny), 0.0)
            x = torch.minimum(torch.maximum(x - step, x_left), x_right)
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw `n` samples per cell -> ``(*batch, n)`` (for tests and demos)."""
        weights, means, variances = self._flat()
        component = torch.multinomial(weights, int(n), replacement=True, generator=generator)
        noise = torch.randn(
            component.shape, generator=generator, dtype=self.dtype, device=self.device
        )
        draws = means.gather(-1, component) + variances.gather(-1, component).sqrt() * noise
        return draws.reshape(*self.batch_shape, int(n))
