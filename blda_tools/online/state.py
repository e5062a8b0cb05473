"""State of the online BLDA loss and its per-cell work: mixture sets, samples, offset tables.

`MixtureSet` keeps a batch of 1-D Gaussian mixtures as module buffers (so `state_dict`, `.to()`
and checkpoints work like any PyTorch module) and runs Algorithm 1's update on them with the
`blda_tools.gmm` engine (the samples come from `blda_tools.online.sampling`).
`OffsetTables` tabulates every cell's aligned logit z' (Eq. 6) once and gathers it per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blda_tools.gmm import GaussianMixture1D, StepsSinceUpdate, mixture_cdf
from blda_tools.online.kernel import lookup_offsets

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
        """m ramped linearly from 0 over the first `warmup` updates of this set (the release's
        formula; 0 disables the ramp): m * min(1, u / warmup), u = updates done before this."""
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
    """scale * (z' - z), z' = F_anchor^-1(clamp(F_cl(z), eps, 1 - eps)) (Eq. 6), of every cell
    of several C x C sets as piecewise-linear functions of z, plus one row of zero cells
    (index `len(sets) * C`) for pixels that get no offset.

    Cell i's grid runs from its eps to its 1 - eps quantile (found by safeguarded Newton steps),
    so the two kinks of the clamp are grid ends: below and above, z' is constant and exact, and
    inside, z'(z) is smooth and linear interpolation between `points` nodes is accurate to
    O(step^2) (benchmarks/bench_online_loss.py prints the error against the exact Eq. 6).
    Position of z on cell i's grid: z * `inverse_step[i]` + `origin[i]`; piece 0 lies below the
    grid, piece `points` above it, piece j between nodes j - 1 and j; `pieces` ``(cells *
    (points + 1), 2)`` holds (a, b) with scale * (z' - z) = a + b z on each piece.
    """

    origin: Tensor
    inverse_step: Tensor
    pieces: Tensor
    points: int
    cdf_nodes: Tensor  # (sets * C, points): F_cc on the grid of every diagonal cell
    classes: int

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        sets,
        anchors: MixtureSet,
        eps,
        points,
        anchor_points,
        scale,
        cells: Tensor | None = None,
    ):
        """Tables for `sets` (C x C MixtureSets, stacked in order), diagonal cells aligned to
        the positive anchor (row 0 of `anchors`), the others to the negative one (row 1). The
        anchors' inverse CDF is tabulated exactly (Newton-polished) on `anchor_points` evenly
        spaced probabilities in [eps, 1 - eps] and interpolated linearly. `cells` (bool,
        ``(len(sets), C, C)``) limits the work to the cells a call can read (the others get zero
        offsets and no CDF nodes; a pixel is only sent to a row whose cells were all built)."""
        count, components = sets[0].cell_shape[0], sets[0].n_components
        weights, means, variances = (
            torch.stack([getattr(s, name) for s in sets]).reshape(-1, components)
            for name in ("weights", "means", "variances")
        )
        device, total = means.device, means.shape[0]
        diagonal = torch.eye(count, dtype=torch.bool, device=device).repeat(len(sets), 1, 1)
        chosen = torch.arange(total, device=device) if cells is None else cells.reshape(-1)
        chosen = chosen.nonzero()[:, 0] if chosen.dtype == torch.bool else chosen
        weights, means, variances, diagonal = (
            p.index_select(0, chosen) for p in (weights, means, variances, diagonal.reshape(-1))
        )
        grid, probability, aligned = _aligned_nodes(
            weights, means, variances, diagonal, anchors, eps, points, anchor_points
        )
        lower, step = grid[:, 0], (grid[:, -1] - grid[:, 0]) / (points - 1)
        slope = aligned.diff(dim=1) / step[:, None]
        # pieces[i, j] = (a, b): scale (z' - z) = a + b z; below / above the grid z' is constant
        part = torch.zeros((chosen.numel(), points + 1, 2), dtype=torch.float32, device=device)
        part[:, 0, 0] = aligned[:, 0]
        part[:, 1:points, 0] = aligned[:, :-1] - slope * grid[:, :-1]
        part[:, points, 0] = aligned[:, -1]
        part[:, 1:points, 1] = slope
        part[:, :, 1] -= 1.0
        part.mul_(float(scale))
        pieces = torch.zeros((total + count, points + 1, 2), dtype=torch.float32, device=device)
        pieces.index_copy_(0, chosen, part)
        inverse_step = torch.zeros(total + count, dtype=torch.float64, device=device)
        origin = torch.zeros_like(inverse_step)
        inverse_step.index_copy_(0, chosen, 1.0 / step)
        origin.index_copy_(0, chosen, 1.0 - lower / step)
        nodes = torch.zeros((total, points), dtype=torch.float32, device=device)
        nodes.index_copy_(0, chosen, probability.float())
        nodes = nodes.view(len(sets), count * count, points)[:, :: count + 1]
        nodes = nodes.reshape(-1, points).contiguous()
        pieces = pieces.reshape(-1, 2)
        return cls(origin.float(), inverse_step.float(), pieces, points, nodes, count)

    @torch.no_grad()
    def diagonal_cdf(self, z: Tensor, row: Tensor) -> tuple[Tensor, Tensor]:
        """F_yy(z) interpolated on the grid of the diagonal cell of `row` (set * C + y), and
        where z lies on that grid (elsewhere the value is meaningless)."""
        classes = self.classes
        cell = row * classes + row % classes
        position = z * self.inverse_step[cell] + self.origin[cell] - 1.0
        inside = (position >= 0.0) & (position <= self.points - 1)
        position = position.clamp(0.0, self.points - 1.0)
        left = position.floor().clamp_max_(self.points - 2.0)
        index = row * self.points + left.long()
        nodes = self.cdf_nodes.reshape(-1)
        value = torch.lerp(nodes[index], nodes[index + 1], position - left)
        return value, inside

    @torch.no_grad()
    def gather(self, logits: Tensor, row: Tensor, compiled: bool = True) -> Tensor:
        """scale * (z'(z) - z) for every pixel and class: logits
        ``(B, C, P)`` float, row ``(B, P)`` the index of each pixel's table row (set * C +
        label, or the zero row). Per pixel only the C cells of its row are read. On a CPU (with
        `compiled`) one numba pass (`blda_tools.online.kernel`); elsewhere torch ops in blocks,
        so that the temporaries stay small."""
        if compiled and logits.device.type == "cpu" and logits.dtype == torch.float32:
            return lookup_offsets(logits, row, self)
        batch, count, size = logits.shape
        offsets = torch.empty_like(logits)
        # Each (a, b) pair read as one 8-byte element: one 1-D gather (a cache line) per lookup.
        pairs = self.pieces.view(torch.float64).view(-1)
        # int32 index arithmetic is several times faster than int64 on CPU; int64 only if needed
        index_type = torch.int32 if pairs.numel() < 2**31 else torch.int64
        row = row.to(index_type)
        columns = torch.arange(count, device=logits.device, dtype=index_type)[:, None]
        block = max(1, BLOCK_ELEMENTS // count)
        for image in range(batch):
            for start in range(0, size, block):
                part = slice(start, start + block)
                z, out = logits[image, :, part], offsets[image, :, part]  # (C, m) strided views
                cell = (row[image, None, part] * count + columns).view(-1)  # cells (y, c)
                # index_select, not advanced indexing: several times faster on CPU.
                position = torch.addcmul(
                    self.origin.index_select(0, cell).view_as(z),
                    z,
                    self.inverse_step.index_select(0, cell).view_as(z),
                ).clamp_(0.0, float(self.points))
                index = cell.mul_(self.points + 1).add_(position.view(-1).to(index_type))
                pair = pairs.index_select(0, index).view(torch.float32).view(*z.shape, 2)
                # into a contiguous temporary, then one strided write into the output
                out.copy_(torch.addcmul(pair[..., 0], pair[..., 1], z))
        return offsets


def _aligned_nodes(weights, means, variances, diagonal, anchors, eps, points, anchor_points):
    """Each cell's grid (cells, points) from its eps to its 1 - eps quantile (float64), F_cl on
    it (float32 evaluation, as float64) and the aligned values F_anchor^-1(F_cl) (float64)."""
    cell_mixture = GaussianMixture1D(
        weights.shape[1], (means.shape[0],), inverse_cdf_points=64, device=means.device,
        dtype=means.dtype,
    )  # fmt: skip
    cell_mixture.weights, cell_mixture.means, cell_mixture.variances = weights, means, variances
    ends = torch.tensor([eps, 1.0 - eps], device=means.device, dtype=means.dtype)
    ends = cell_mixture.inverse_cdf(ends.expand(means.shape[0], 2), eps=eps, newton_steps=4)
    lower, upper = ends.double().unbind(1)
    upper = torch.maximum(upper, lower + 1e-6)  # a degenerate cell still gets a grid
    steps = torch.linspace(0.0, 1.0, points, device=means.device, dtype=torch.float64)
    grid = torch.lerp(lower[:, None], upper[:, None], steps)
    probability = mixture_cdf(grid.float(), weights, means, variances).double()
    return grid, probability, _anchor_inverse(anchors, probability, eps, anchor_points, diagonal)


def _anchor_inverse(anchors: MixtureSet, probability, eps, anchor_points, diagonal):
    """F_anchor^-1(probability) (cells, points), float64; `diagonal` cells (bool, (cells,)) use
    the positive anchor (row 0), the others the negative one (row 1)."""
    device = probability.device
    levels = torch.linspace(eps, 1.0 - eps, anchor_points, device=device, dtype=torch.float64)
    anchor_mixture = anchors.mixture(inverse_cdf_points=1000).to(dtype=torch.float64)
    inverse = anchor_mixture.inverse_cdf(levels.expand(2, -1), eps=eps, newton_steps=2)
    position = (probability.clamp(eps, 1.0 - eps) - eps) * ((anchor_points - 1) / (1 - 2 * eps))
    left = position.floor().clamp_(0, anchor_points - 2)
    fraction = position - left
    which = torch.where(diagonal[:, None], 0, anchor_points)
    index = (which + left.long()).reshape(-1)
    flat = inverse.reshape(-1)
    # index_select, not advanced indexing: the same gather, several times faster on a CPU
    below = flat.index_select(0, index).view_as(position)
    above = flat.index_select(0, index + 1).view_as(position)
    return torch.lerp(below, above, fraction)
