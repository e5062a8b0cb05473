"""State of the online BLDA loss and its per-cell work: mixture sets, samples, offset tables.

`MixtureSet` keeps a batch of 1-D Gaussian mixtures as module buffers (so `state_dict`, `.to()`
and checkpoints work like any PyTorch module) and runs Algorithm 1's update on them with the
`blda_tools.gmm` engine (the samples come from `blda_tools.online.sampling`).
`OffsetTables` tabulates every cell's aligned logit z' (Eq. 6) once and gathers it per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.special import ndtri
from torch import Tensor, nn

from blda_tools.gmm import GaussianMixture1D, StepsSinceUpdate, mixture_cdf

# Elements per block of the offset interpolation: keeps its temporaries small and in cache.
BLOCK_ELEMENTS = 1 << 20


class MixtureSet(nn.Module):
    """Mixtures of shape `cell_shape` x K updated by momentum EM (Algorithm 1, lines 9-17, 26-32).

    Buffers: `weights`, `means`, `variances` ``(*cell_shape, K)``; `fitted` (cells updated at
    least once); `steps` (iterations since each cell's last update, n of line 16);
    `updates` (number of updates of this set so far, which drives the momentum warm-up).
    """

    def __init__(self, cell_shape: tuple[int, ...], n_components: int) -> None:
        super().__init__()
        shape = (*cell_shape, n_components)
        self.cell_shape = tuple(cell_shape)
        self.n_components = int(n_components)
        self.register_buffer("weights", torch.full(shape, 1.0 / n_components))
        self.register_buffer("means", torch.zeros(shape))
        self.register_buffer("variances", torch.ones(shape))
        self.register_buffer("fitted", torch.zeros(cell_shape, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros(cell_shape, dtype=torch.int64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def mixture(self, inverse_cdf_points: int = 1000) -> GaussianMixture1D:
        """A `GaussianMixture1D` holding (references to) this set's parameters."""
        gmm = GaussianMixture1D(
            self.n_components,
            self.cell_shape,
            inverse_cdf_points=inverse_cdf_points,
            device=self.means.device,
            dtype=self.means.dtype,
        )
        gmm.weights, gmm.means, gmm.variances = self.weights, self.means, self.variances
        gmm.fitted_ = self.fitted
        return gmm

    def effective_momentum(self, momentum: float, warmup: int) -> float:
        """m ramped linearly from 0 over the first `warmup` updates of this set (as released;
        0 disables the ramp): m * min(1, u / warmup), u = updates done before this one."""
        if warmup <= 0:
            return float(momentum)
        return float(momentum) * min(1.0, int(self.updates) / warmup)

    @torch.no_grad()
    def update(
        self, samples: Tensor | None, mask: Tensor | None, em_steps: int, momentum: float
    ) -> Tensor:
        """One iteration of Algorithm 1 for this set; returns the cells updated (bool).

        Every cell's n grows by one; cells with samples run `em_steps` EM steps from their last
        estimate, then phi <- (1 - m^n) phi_new + m^n phi_old. A cell never updated before takes
        the new estimate as it is (there is no old estimate to keep). `samples` ``(*cells, N)``
        with a bool `mask`; None when the batch has no sample for this set.
        """
        clock = StepsSinceUpdate(self.cell_shape, device=self.steps.device)
        clock.load_state_dict({"steps": self.steps})
        steps = clock.tick()
        if samples is None:
            self.steps.copy_(clock.steps)
            return torch.zeros_like(self.fitted)
        gmm = self.mixture()
        new = gmm.em_step(samples, mask=mask, n_steps=em_steps)
        gmm.momentum_update(new, momentum, steps, new.updated_)
        clock.reset(new.updated_)
        self.weights.copy_(gmm.weights)
        self.means.copy_(gmm.means)
        self.variances.copy_(gmm.variances)
        self.fitted.copy_(gmm.fitted_)
        self.steps.copy_(clock.steps)
        if bool(new.updated_.any()):
            self.updates += 1
        return new.updated_


@dataclass
class OffsetTables:
    """Aligned values z' = F_anchor^-1(clamp(F_cl(z), eps, 1 - eps)) (Eq. 6) of every cell of
    several C x C sets, tabulated on an even grid per cell: cell i's grid starts at
    `lower[i]` with 1 / step `inverse_step[i]`; `aligned` holds the (cells, points) values."""

    lower: Tensor
    inverse_step: Tensor
    aligned: Tensor
    points: int

    @classmethod
    @torch.no_grad()
    def build(cls, sets, anchors: MixtureSet, eps: float, points: int, anchor_points: int):
        """Tables for `sets` (C x C MixtureSets, stacked in order), diagonal cells aligned to
        the positive anchor (row 0 of `anchors`), the others to the negative one (row 1).

        Each grid spans min_k(mu - s sigma) .. max_k(mu + s sigma), s = Phi^-1(1 - eps): beyond
        it F_cl is below eps or above 1 - eps, where the clamped z' is constant, so clamping z
        to the grid is exact there.
        """
        count, components = sets[0].cell_shape[0], sets[0].n_components
        weights, means, variances = (
            torch.stack([getattr(s, name) for s in sets]).reshape(-1, components)
            for name in ("weights", "means", "variances")
        )
        span = float(ndtri(1.0 - eps))
        std = variances.sqrt()
        lower = (means - span * std).amin(-1)
        upper = (means + span * std).amax(-1)
        upper = torch.maximum(upper, lower + 1e-6)  # a degenerate cell still gets a grid
        steps = torch.linspace(0.0, 1.0, points, device=means.device, dtype=means.dtype)
        grid = torch.lerp(lower[:, None], upper[:, None], steps)
        probability = mixture_cdf(grid, weights, means, variances)
        anchor_mixture = anchors.mixture(inverse_cdf_points=anchor_points)
        both = anchor_mixture.inverse_cdf(probability.reshape(1, -1).expand(2, -1), eps=eps)
        diagonal = torch.eye(count, dtype=torch.bool, device=means.device).repeat(len(sets), 1, 1)
        aligned = torch.where(diagonal.reshape(-1, 1), both[0].view_as(grid), both[1].view_as(grid))
        return cls(lower, (points - 1) / (upper - lower), aligned.reshape(-1), points)

    @torch.no_grad()
    def gather(self, logits: Tensor, row: Tensor, gate: Tensor) -> Tensor:
        """gate * (z'(z) - z) for every pixel and class: logits ``(B, C, P)`` float, row
        ``(B, P)`` the index of each pixel's table row (set * C + label), gate ``(B, P)``.
        Linear interpolation with z clamped to the cell's grid; per pixel only the C cells of
        its row are read, in blocks so that the temporaries stay small."""
        batch, count, size = logits.shape
        origin = -self.lower * self.inverse_step  # grid position of z is z / step + origin
        offsets = torch.empty_like(logits)
        # int32 index arithmetic is several times faster than int64 on CPU; int64 only if needed
        index_type = torch.int32 if self.aligned.numel() < 2**31 else torch.int64
        row = row.to(index_type)
        columns = torch.arange(count, device=logits.device, dtype=index_type)[:, None]
        block = max(1, BLOCK_ELEMENTS // count)
        last = float(self.points - 1)
        for image in range(batch):
            for start in range(0, size, block):
                part = slice(start, start + block)
                z, out = logits[image, :, part], offsets[image, :, part]  # (C, m) strided views
                flat = (row[image, None, part] * count + columns).view(-1)  # cells (y, c)
                # index_select, not advanced indexing: several times faster on CPU.
                position = torch.addcmul(
                    origin.index_select(0, flat).view_as(z),
                    z,
                    self.inverse_step.index_select(0, flat).view_as(z),
                ).clamp_(0.0, last)
                left = position.floor().clamp_max_(last - 1.0)
                fraction = position.sub_(left)
                index = flat.mul_(self.points).add_(left.view(-1).to(index_type))
                below = self.aligned.index_select(0, index).view_as(z)
                above = self.aligned[1:].index_select(0, index).view_as(z)  # entry index + 1
                torch.lerp(below, above, fraction, out=out)
                out.sub_(z).mul_(gate[image, None, part])
        return offsets
