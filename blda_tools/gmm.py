"""Batched 1-D Gaussian mixtures: EM from samples or histograms, the momentum update of
Algorithm 1, CDF, density, inverse CDF, save and load.

Every parameter is a tensor of shape ``(*batch_shape, K)``: one mixture per cell (for example the
C x C logit sets M_cl of Eq. 3), all fitted at once: Python loops run only over blocks of cells
(to keep the E step's work tensor in cache) and over the K components, never over samples.

Typical online use (Algorithm 1, lines 9-17)::

    clock = StepsSinceUpdate(gmm.batch_shape)
    ...  # every training iteration:
    n = clock.tick()
    new = gmm.em_step(samples, mask=mask, n_steps=3)       # T EM steps from the last estimate
    gmm.momentum_update(new, 0.99, n, new.updated_)
    clock.reset(new.updated_)
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping

import torch
from torch import Tensor

from blda_tools.errors import BLDAError
from blda_tools.fileio import atomic_output

FORMAT = "blda.GaussianMixture1D"
FORMAT_VERSION = 1
# As released: added to every responsibility in the M step, so a component that explains no
# sample keeps a finite mean (the cell's mean) instead of 0 / 0.
RESPONSIBILITY_EPSILON = 1e-7
INITS = ("quantile", "kmeans++")
CDF_METHODS = ("ndtr", "abramowitz-stegun")
# Size of the (cells, K, samples) work tensor of the E step, in elements (about 1 MiB).
CHUNK_ELEMENTS = 1 << 18
LLOYD_ITERATIONS = 10
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


def _em_statistics(x, w, weights, means, variances, floor):
    """E step plus the M step's sufficient statistics for flat cells.

    x, w: (G, N) samples and weights (0 = not a sample); parameters (G, K). Returns the
    responsibility-weighted moments (G, K, 3) = sum_n w_n r_nk [1, x_n, x_n^2] (with the released
    1e-7 added to every r_nk) and the weighted log-likelihood sum per cell (G,).
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
    """Means at the weighted quantiles (k + 1/2) / K, equal weights, pooled within variance."""
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
    """EM on flat cells until each cell's mean log-likelihood changes by less than `tol`.

    Converged cells are frozen and dropped from later iterations (as scikit-learn stops per
    model). Returns the parameters, a converged flag, the iteration count and the last mean
    log-likelihood per cell.
    """
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


def _better_run(best, challenger):
    """Per cell, keep the EM run (parameters, converged, n_iter, log-likelihood) that fits best."""
    wins = challenger[3] > best[3]
    parameters = tuple(
        torch.where(wins[:, None], new, old)
        for new, old in zip(challenger[0], best[0], strict=True)
    )
    flags = (torch.where(wins, new, old) for new, old in zip(challenger[1:], best[1:], strict=True))
    return (parameters, *flags)


class GaussianMixture1D:
    """A batch of independent 1-D Gaussian mixtures with K components each.

    Parameters (visible, scikit-learn style): `weights`, `means`, `variances`, tensors of shape
    ``(*batch_shape, K)``. After fitting: `fitted_` (cells whose parameters come from data),
    `updated_` (cells changed by the last fit / em_step), `converged_`, `n_iter_`, all of the
    batch shape. Cells never fitted hold standard normal components (finite, meaningless): check
    `fitted_`.

    `n_init` (default 1): EM runs per cell in `fit`, the first from `init`, the others from
    k-means++ with seeds seed + 1, ...; each cell keeps its best run (EM finds local optima).
    `min_samples` (default K, at least K): a cell with fewer samples is not fitted. The variance
    floor (default 1e-4, as released) clamps variances in the M step; 0 is allowed and only a
    tiny internal floor (sqrt of the dtype's smallest normal) keeps densities finite.
    `inverse_cdf_points` / `inverse_cdf_span`: the table used by `inverse_cdf` (see there).

    EM as released: variances clamped at the floor in the M step and 1e-7 added to every
    responsibility (RESPONSIBILITY_EPSILON); it keeps an unused component finite and costs a
    negligible bias. Each cell's samples are centred on their mean before EM, which limits
    float32 cancellation in the second moments; use dtype=torch.float64 for exact work.
    """

    def __init__(
        self,
        n_components: int = 5,
        batch_shape: tuple[int, ...] = (),
        variance_floor: float = 1e-4,
        init: str = "quantile",
        seed: int = 0,
        *,
        min_samples: int | None = None,
        n_init: int = 1,
        cdf_method: str = "ndtr",
        inverse_cdf_points: int = 1000,
        inverse_cdf_span: float = 6.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if int(n_components) < 1:
            raise BLDAError(f"n_components: expected a positive integer, got {n_components}")
        self.n_components = int(n_components)
        self.min_samples = self.n_components if min_samples is None else int(min_samples)
        if self.min_samples < self.n_components:
            raise BLDAError(
                f"min_samples: expected at least n_components={self.n_components}, "
                f"got {self.min_samples}"
            )
        if not variance_floor >= 0:
            raise BLDAError(f"variance_floor: expected a number >= 0, got {variance_floor}")
        if init not in INITS:
            raise BLDAError(f"init: expected one of {INITS}, got {init!r}")
        if cdf_method not in CDF_METHODS:
            raise BLDAError(f"cdf_method: expected one of {CDF_METHODS}, got {cdf_method!r}")
        if int(inverse_cdf_points) < 2 or not inverse_cdf_span > 0:
            raise BLDAError("inverse_cdf_points: expected >= 2 and inverse_cdf_span: > 0")
        if dtype not in (torch.float32, torch.float64):
            raise BLDAError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        if int(n_init) < 1:
            raise BLDAError(f"n_init: expected a positive integer, got {n_init}")
        self.n_init = int(n_init)
        self.variance_floor = float(variance_floor)
        self.init = init
        self.seed = int(seed)
        self.cdf_method = cdf_method
        self.inverse_cdf_points = int(inverse_cdf_points)
        self.inverse_cdf_span = float(inverse_cdf_span)
        self._reset(tuple(int(s) for s in batch_shape), torch.device(device or "cpu"), dtype)

    # -- state ---------------------------------------------------------------------------------

    def _reset(self, batch_shape, device, dtype) -> None:
        shape = (*batch_shape, self.n_components)
        self.batch_shape = tuple(batch_shape)
        self.weights = torch.full(shape, 1.0 / self.n_components, dtype=dtype, device=device)
        self.means = torch.zeros(shape, dtype=dtype, device=device)
        self.variances = torch.ones(shape, dtype=dtype, device=device)
        flags = dict(dtype=torch.bool, device=device)
        self.fitted_ = torch.zeros(batch_shape, **flags)
        self.updated_ = torch.zeros(batch_shape, **flags)
        self.converged_ = torch.zeros(batch_shape, **flags)
        self.n_iter_ = torch.zeros(batch_shape, dtype=torch.int64, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    _TENSORS = ("weights", "means", "variances", "fitted_", "updated_", "converged_", "n_iter_")
    _SETTINGS = ("n_components", "min_samples", "variance_floor", "init", "seed", "cdf_method")
    _SETTINGS += ("inverse_cdf_points", "inverse_cdf_span", "n_init")

    def state_dict(self) -> dict:
        """Plain dict of tensors and settings (no pickled objects), loadable with weights_only."""
        state = {"format": FORMAT, "version": FORMAT_VERSION}
        state.update({name: getattr(self, name) for name in self._SETTINGS})
        state["batch_shape"] = list(self.batch_shape)
        state.update({name: getattr(self, name).clone() for name in self._TENSORS})
        return state

    def load_state_dict(self, state: Mapping) -> GaussianMixture1D:
        """Restore settings and parameters from `state_dict()`; raises BLDAError if malformed."""
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise BLDAError(f"state_dict: expected a dict with format={FORMAT!r}")
        missing = [k for k in (*self._SETTINGS, *self._TENSORS, "batch_shape") if k not in state]
        if missing:
            raise BLDAError(f"state_dict: missing entries {missing}")
        try:
            fresh = GaussianMixture1D(
                **{name: state[name] for name in self._SETTINGS},
                batch_shape=tuple(state["batch_shape"]),
                dtype=getattr(state["means"], "dtype", None),
            )
        except (TypeError, ValueError) as error:
            raise BLDAError(f"state_dict: malformed settings ({error})") from None
        for name in self._TENSORS:
            expected, value = getattr(fresh, name), state[name]
            if not isinstance(value, Tensor) or value.shape != expected.shape:
                raise BLDAError(
                    f"state_dict: {name} should be a tensor of shape {tuple(expected.shape)}"
                )
            setattr(fresh, name, value.to(device=self.device, dtype=expected.dtype).clone())
        self.__dict__.update(fresh.__dict__)
        return self

    def copy(self) -> GaussianMixture1D:
        """An independent copy (same settings, cloned tensors, same device)."""
        return GaussianMixture1D().load_state_dict(self.state_dict()).to(self.device)

    def to(self, device=None, dtype: torch.dtype | None = None) -> GaussianMixture1D:
        """Move (in place, like nn.Module) to `device` and/or floating `dtype`; returns self."""
        for name in self._TENSORS:
            value = getattr(self, name)
            cast = dtype if dtype is not None and value.is_floating_point() else None
            setattr(self, name, value.to(device=device, dtype=cast))
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` (CPU tensors) with torch.save, atomically."""
        state = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.state_dict().items()}
        with atomic_output(path) as temporary:
            torch.save(state, temporary)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None) -> GaussianMixture1D:
        """Read a file written by `save` (torch.load with weights_only=True)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise BLDAError(f"{path}: no such file") from None
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise BLDAError(f"{path}: not a saved GaussianMixture1D ({error})") from None
        try:
            return cls().load_state_dict(state).to(map_location)
        except BLDAError as error:
            raise BLDAError(f"{path}: {error}") from None

    # -- fitting -------------------------------------------------------------------------------

    def _prepare(self, samples, sample_weight, mask, name="samples"):
        """Validate samples (*batch, N) -> flat x, w (G, N) in the model dtype, and batch shape."""
        samples = torch.as_tensor(samples)
        if samples.ndim < 1 or samples.shape[-1] == 0:
            raise BLDAError(
                f"{name}: expected shape (*batch, N) with N >= 1, got {tuple(samples.shape)}"
            )
        x = samples.to(self.dtype)
        valid = torch.ones_like(x, dtype=torch.bool)
        if mask is not None:
            mask = torch.as_tensor(mask, device=x.device)
            if mask.shape != x.shape or mask.dtype != torch.bool:
                raise BLDAError(f"mask: expected a bool tensor of shape {tuple(x.shape)}")
            valid = mask
        weight = torch.ones_like(x)
        if sample_weight is not None:
            sample_weight = torch.as_tensor(sample_weight, device=x.device)
            try:
                weight = sample_weight.to(self.dtype).expand_as(x)
            except RuntimeError:
                raise BLDAError(
                    f"sample_weight: expected a shape broadcastable to {tuple(x.shape)}"
                ) from None
            if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
                raise BLDAError("sample_weight: expected finite values >= 0")
        valid = valid & (weight > 0)
        if bool((valid & ~torch.isfinite(x)).any()):
            raise BLDAError(f"{name}: contains NaN or infinite values (mask them out or drop them)")
        x = torch.where(valid, x, 0.0).reshape(-1, x.shape[-1])
        w = torch.where(valid, weight, 0.0).reshape(-1, x.shape[-1])
        return x, w, valid.reshape(x.shape).sum(-1), tuple(samples.shape[:-1])

    def _initial_parameters(self, x, w, generator, init=None):
        if (init or self.init) == "quantile":
            return _quantile_init(x, w, self.n_components, self._floor())
        generator = generator or self._generator(x.device, self.seed)
        return _kmeans_plus_plus_init(x, w, self.n_components, self._floor(), generator)

    @staticmethod
    def _generator(device, seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def _floor(self) -> float:
        return max(self.variance_floor, _numerical_variance_floor(self.dtype))

    def _flat(self):
        return [
            p.reshape(-1, self.n_components) for p in (self.weights, self.means, self.variances)
        ]

    def _fit_flat(self, x, w, sample_count, batch_shape, max_iter, tol, generator):
        if int(max_iter) < 1 or not tol >= 0:
            raise BLDAError(f"max_iter: expected >= 1 and tol >= 0, got {max_iter}, {tol}")
        enough = sample_count >= self.min_samples
        if batch_shape == () and not bool(enough.all()):
            raise BLDAError(
                f"samples: {int(sample_count.sum())} valid samples cannot fit "
                f"{self.n_components} components (need at least min_samples={self.min_samples})"
            )
        self._reset(batch_shape, x.device, self.dtype)
        flat = self._flat()
        converged = torch.zeros_like(enough)
        n_iter = torch.zeros(enough.shape, dtype=torch.int64, device=x.device)
        cells = enough.nonzero()[:, 0]
        if cells.numel():
            # EM runs on each cell's samples minus their mean: fewer cancellations in float32.
            x_fit, w_fit = x[cells], w[cells]
            center = (w_fit * x_fit).sum(-1, keepdim=True) / w_fit.sum(-1, keepdim=True)
            x_fit = x_fit - center
            best = None
            for run in range(self.n_init):
                # Restarts after the first use k-means++ with seeds seed + run.
                init = self.init if run == 0 else "kmeans++"
                restart = None if run == 0 else self._generator(x.device, self.seed + run)
                start = self._initial_parameters(x_fit, w_fit, restart or generator, init)
                outcome = _run_em(x_fit, w_fit, start, self._floor(), int(max_iter), float(tol))
                best = outcome if best is None else _better_run(best, outcome)
            result, converged[cells], n_iter[cells], _ = best
            result[1].add_(center)
            for target, value in zip(flat, result, strict=True):
                target[cells] = value
        self.fitted_ = enough.reshape(batch_shape)
        self.updated_ = self.fitted_.clone()
        self.converged_ = converged.reshape(batch_shape)
        self.n_iter_ = n_iter.reshape(batch_shape)
        return self

    def fit(self, samples, sample_weight=None, mask=None, max_iter=100, tol=1e-6, generator=None):
        """Fit every cell by EM from samples ``(*batch, N)``; the batch shape is taken from them.

        `mask` (bool, same shape) marks the valid samples, so cells with different numbers of
        samples share one tensor; `sample_weight` (broadcastable) weighs them. A cell converges
        when its mean log-likelihood changes by less than `tol`. Cells with fewer than
        `min_samples` samples are not fitted (`fitted_` False); a single mixture (batch shape ())
        with too few samples raises BLDAError, as does NaN among valid samples.
        """
        x, w, count, batch_shape = self._prepare(samples, sample_weight, mask)
        return self._fit_flat(x, w, count, batch_shape, max_iter, tol, generator)

    def fit_histogram(
        self,
        centers,
        counts,
        *,
        bin_width=None,
        sheppard_correction=True,
        max_iter=100,
        tol=1e-6,
        generator=None,
    ):
        """Fit by EM on bin centres ``(B,)`` weighted by `counts` ``(*batch, B)``.

        `counts` are numbers of samples (the sum per cell is checked against `min_samples`), not
        a normalised density. Binning adds about width^2 / 12 to the variance of smooth data
        (Sheppard): with `sheppard_correction` (default) that is subtracted from every fitted
        variance (exact for K = 1, approximate for narrow or overlapping components), floored.
        `bin_width` defaults to the spacing of `centers`, which must then be even.
        """
        centers = torch.as_tensor(centers)
        counts = torch.as_tensor(counts)
        if centers.ndim != 1 or counts.ndim < 1 or counts.shape[-1] != centers.shape[0]:
            raise BLDAError(
                f"counts: expected shape (*batch, {centers.shape[-1] if centers.ndim else 'B'}) "
                f"matching centers (B,), got {tuple(counts.shape)} and {tuple(centers.shape)}"
            )
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise BLDAError("counts: expected finite values >= 0")
        centers = centers.to(device=counts.device, dtype=self.dtype)
        x, w, _, batch_shape = self._prepare(centers.expand(counts.shape), counts, None, "centers")
        sample_count = counts.to(torch.float64).sum(-1).reshape(-1)
        self._fit_flat(x, w, sample_count, batch_shape, max_iter, tol, generator)
        if sheppard_correction:
            width = self._bin_width(centers, bin_width)
            corrected = (self.variances - width**2 / 12.0).clamp_min(self._floor())
            self.variances = torch.where(self.fitted_[..., None], corrected, self.variances)
        return self

    @staticmethod
    def _bin_width(centers: Tensor, bin_width) -> float:
        if bin_width is not None:
            return float(bin_width)
        spacing = centers.diff().to(torch.float64)
        if spacing.numel() == 0:
            raise BLDAError("bin_width: a single bin centre; pass bin_width explicitly")
        if float(spacing.max() - spacing.min()) > 1e-4 * float(spacing.abs().max()):
            raise BLDAError("centers: unevenly spaced; pass bin_width or sheppard_correction=False")
        return float(spacing.mean())

    def em_step(self, samples, sample_weight=None, mask=None, n_steps=1, generator=None):
        """Run `n_steps` EM steps from the current parameters; return a new mixture.

        `self` is unchanged (Algorithm 1 mixes old and new with `momentum_update`). Cells never
        fitted are first initialised from their samples; cells with fewer than `min_samples`
        samples keep their parameters. The result's `updated_` marks the cells that moved.
        """
        x, w, count, batch_shape = self._prepare(samples, sample_weight, mask)
        if batch_shape != self.batch_shape or x.device != self.device:
            raise BLDAError(
                f"samples: expected shape ({', '.join(map(str, self.batch_shape))}, N) on "
                f"{self.device}, got {tuple(samples.shape)} on {x.device}"
            )
        if int(n_steps) < 0:
            raise BLDAError(f"n_steps: expected >= 0, got {n_steps}")
        new = self.copy()
        enough = count >= self.min_samples
        cells = enough.nonzero()[:, 0]
        flat = new._flat()
        if cells.numel():
            x_fit, w_fit = x[cells], w[cells]
            center = (w_fit * x_fit).sum(-1, keepdim=True) / w_fit.sum(-1, keepdim=True)
            x_fit = x_fit - center
            weights, means, variances = (p[cells] for p in flat)
            means = means - center
            fresh = ~self.fitted_.reshape(-1)[cells]
            if bool(fresh.any()):
                start = self._initial_parameters(x_fit[fresh], w_fit[fresh], generator)
                for target, value in zip((weights, means, variances), start, strict=True):
                    target[fresh] = value
            for _ in range(int(n_steps)):
                moments, _ = _em_statistics(x_fit, w_fit, weights, means, variances, self._floor())
                weights, means, variances = _parameters_from_moments(moments, self._floor())
            for target, value in zip(flat, (weights, means + center, variances), strict=True):
                target[cells] = value
        new.updated_ = enough.reshape(batch_shape)
        new.fitted_ = self.fitted_ | new.updated_
        new.converged_ = torch.zeros_like(new.updated_)
        new.n_iter_ = torch.where(new.updated_, int(n_steps), 0)
        return new

    def momentum_update(self, new, momentum, steps_since_update=1, updated=None):
        """Algorithm 1, line 16: phi <- (1 - m^n) phi_new + m^n phi_old, in place; returns self.

        It mixes parameters (weights, means, variances component by component, as the paper
        does), not distributions: that is meaningful because `new` comes from `em_step` started
        at these parameters, so component k of both is the same component. `momentum` (m) and
        `steps_since_update` (n, iterations since the cell's last update, see StepsSinceUpdate)
        are numbers or tensors broadcastable to the batch shape. Only cells in `updated`
        (default `new.updated_`) change; a cell never fitted before takes `new` as it is.
        """
        if new.batch_shape != self.batch_shape or new.n_components != self.n_components:
            raise BLDAError(
                f"new: expected a mixture of batch shape {self.batch_shape} and K="
                f"{self.n_components}, got {new.batch_shape} and K={new.n_components}"
            )
        updated = new.updated_ if updated is None else torch.as_tensor(updated, device=self.device)
        if updated.dtype != torch.bool or updated.shape != self.batch_shape:
            raise BLDAError(f"updated: expected a bool tensor of shape {self.batch_shape}")
        momentum = torch.as_tensor(momentum, dtype=self.dtype, device=self.device)
        steps = torch.as_tensor(steps_since_update, dtype=self.dtype, device=self.device)
        if bool(((momentum < 0) | (momentum > 1)).any()) or bool((steps < 0).any()):
            raise BLDAError("momentum: expected values in [0, 1] and steps_since_update >= 0")
        old_share = torch.where(self.fitted_, momentum**steps, 0.0)[..., None]
        news = (new.weights, new.means, new.variances)
        olds = (self.weights, self.means, self.variances)
        mixed = [torch.lerp(fresh, old, old_share) for fresh, old in zip(news, olds, strict=True)]
        mixed[0] = mixed[0] / mixed[0].sum(-1, keepdim=True)
        keep = ~updated[..., None]
        self.weights = torch.where(keep, self.weights, mixed[0])
        self.means = torch.where(keep, self.means, mixed[1])
        self.variances = torch.where(keep, self.variances, mixed[2].clamp_min(self._floor()))
        self.fitted_ = self.fitted_ | updated
        self.updated_ = updated.clone()
        return self

    # -- evaluation ----------------------------------------------------------------------------

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
        p = self._points(p, "p").clamp(float(eps), 1.0 - float(eps))
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

    def __repr__(self) -> str:
        fitted = int(self.fitted_.sum())
        return (
            f"GaussianMixture1D(n_components={self.n_components}, batch_shape={self.batch_shape}, "
            f"fitted={fitted}/{self.fitted_.numel()}, dtype={self.dtype}, device={self.device})"
        )


class StepsSinceUpdate:
    """Per-cell count n of iterations since a cell's last update (Algorithm 1, line 16).

    Call `tick()` once per iteration (every count grows by 1; it returns n for this iteration),
    then `reset(updated)` after the momentum update (updated cells go back to 0).
    """

    def __init__(self, batch_shape: tuple[int, ...] = (), device=None) -> None:
        self.steps = torch.zeros(tuple(batch_shape), dtype=torch.int64, device=device)

    def tick(self) -> Tensor:
        """Advance one iteration; return the counts n to use in this iteration's update."""
        self.steps += 1
        return self.steps.clone()

    def reset(self, updated: Tensor) -> None:
        """Set n = 0 for the cells updated in this iteration."""
        updated = torch.as_tensor(updated, device=self.steps.device)
        if updated.dtype != torch.bool or updated.shape != self.steps.shape:
            raise BLDAError(f"updated: expected a bool tensor of shape {tuple(self.steps.shape)}")
        self.steps = torch.where(updated, 0, self.steps)

    def state_dict(self) -> dict:
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state: Mapping) -> StepsSinceUpdate:
        steps = state.get("steps") if isinstance(state, Mapping) else None
        if not isinstance(steps, Tensor) or steps.shape != self.steps.shape:
            raise BLDAError(
                f"state_dict: steps should be a tensor of shape {tuple(self.steps.shape)}"
            )
        self.steps = steps.to(device=self.steps.device, dtype=torch.int64).clone()
        return self
