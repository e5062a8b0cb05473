"""The online BLDA loss (Sec. 3.3.4-3.3.5, Algorithm 1, Eq. 8-10) for any PyTorch training loop.

`BLDALoss` keeps per-domain C x C x K Gaussian mixtures of the logit sets M_cl (Eq. 8) and the
two global source anchors, updates them every call by momentum EM, and returns the logit-adjusted
cross-entropy of Eq. 9 plus the CDF regression loss of Eq. 10::

    blda = BLDALoss(num_classes=19)
    loss = blda(source_logits, source_labels, domain="source", regression=source_cdf_head)
    loss = loss + blda(mixed_logits, mixed_labels, mixed_weights, domain="mixed")

Statistics as the release feeds them: the source call updates the source set and the anchors
(pixel-weighted, from every labelled source pixel), the mixed call only the target set (from its
pixels with 0 < weight < 1). Each call updates first, then computes its loss with the new
offsets. Under DDP the statistics are global (`blda_tools.online.sync`). Every point where this
departs from the release or the paper, and the option that restores it, is in the departures
table of docs/training.md.

Speed: per pixel only the C cells of its label row are needed. Each cell's aligned value
z' = F_anchor^-1(F_cl(z)) (Eq. 6) is tabulated once per call on a grid between the cell's
eps and 1 - eps quantiles and gathered with linear interpolation (`OffsetTables`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blda_tools.errors import BLDAError
from blda_tools.gmm import mixture_cdf
from blda_tools.gmm.normal import _numerical_variance_floor
from blda_tools.online.kernel import (
    adjusted_cross_entropy,
    cdf_targets,
    label_fields,
    table_rows,
)
from blda_tools.online.options import DOMAINS, check_choice, check_options
from blda_tools.online.pixels import (
    FixedGradient,
    Pixels,
    regression_like,
    small_op_threads,
    to_logit_shape,
)
from blda_tools.online.sampling import (
    class_balanced_anchors,
    draw_anchor_samples,
    draw_cell_samples,
    pixel_keys,
)
from blda_tools.online.state import MixtureSet, OffsetTables
from blda_tools.online.sync import RankSync

STATE_FORMAT = "blda.BLDALoss"


class BLDALoss(nn.Module):
    """Online logit adjustment (OLA) and cumulative density estimation (CDE) as one loss.

    Arguments (docs/training.md, "Departures", says where each differs from the release or the
    paper): `num_classes` C >= 2, `ignore_index`, `n_components` K, `em_steps` T, `momentum` m,
    `momentum_warmup` (m ramps linearly from 0 over a set's first N updates; 0 disables),
    `min_samples` N_min, `eps` (CDF clamp of the anchor inverse), `tau`, `regression_weight`
    lambda, `regression_loss` "l2" or "l1", `mode` "ola" (both domains), "ola_source" (source
    only; target pixels get plain cross-entropy) or "none" (weighted cross-entropy, no
    statistics), `anchor_grid_points` (table of the anchors' inverse CDF), `offset_grid_points`
    (table of each cell's aligned value), `max_samples_per_cell` (cap on n per cell; None =
    uncapped), `anchor_sampling` "pixels" (every labelled source pixel, pixel-weighted) or
    "class_balanced" (the per-cell samples), `anchor_max_samples` (uniform pixel subsample of
    the "pixels" anchors; None = every pixel), `mixed_updates_source` (the mixed call's weight-1
    pixels also update the source set and the anchors), `sync_processes` (sum and gather the
    samples over the processes of `process_group` when torch.distributed is initialised),
    `reduction` "mean" (over ALL pixels, ignored ones counting 0: the training loop's and
    mmseg's convention), "sum" or "none" (per pixel), `seed` (the sampling draws from a
    generator seeded by seed and the call counter, so a resumed run draws what an uninterrupted
    one would).

    Buffers (in `state_dict`): the mixture sets `source`, `target` (C x C x K) and `anchors`
    (2 x K: positive, negative) with their `fitted`, `steps` (n) and `updates` counters, and
    `iteration` (calls that updated statistics). `last_terms` holds the parts of the last call.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        n_components: int = 5,
        em_steps: int = 3,
        momentum: float = 0.99,
        momentum_warmup: int = 1500,
        min_samples: int = 500,
        eps: float = 0.01,
        tau: float = 0.1,
        regression_weight: float = 0.2,
        regression_loss: str = "l2",
        mode: str = "ola",
        anchor_grid_points: int = 8192,
        *,
        offset_grid_points: int = 512,
        max_samples_per_cell: int | None = 1000,
        anchor_sampling: str = "pixels",
        anchor_max_samples: int | None = 65536,
        mixed_updates_source: bool = False,
        sync_processes: bool = True,
        process_group=None,
        reduction: str = "mean",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_options(locals())
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.n_components = int(n_components)
        self.em_steps = int(em_steps)
        self.momentum = float(momentum)
        self.momentum_warmup = int(momentum_warmup)
        self.min_samples = int(min_samples)
        self.max_samples_per_cell = max_samples_per_cell and int(max_samples_per_cell)
        self.eps = float(eps)
        self.tau = float(tau)
        self.regression_weight = float(regression_weight)
        self.regression_loss = regression_loss
        self.mode = mode
        self.anchor_grid_points = int(anchor_grid_points)
        self.offset_grid_points = int(offset_grid_points)
        self.anchor_sampling = anchor_sampling
        self.anchor_max_samples = int(anchor_max_samples) if anchor_max_samples else None
        self.mixed_updates_source = bool(mixed_updates_source)
        self.sync_processes = bool(sync_processes)
        self.process_group = process_group
        self.reduction = reduction
        self.seed = int(seed)
        cells = (self.num_classes, self.num_classes)
        self.source = MixtureSet(cells, self.n_components)
        self.target = MixtureSet(cells, self.n_components)
        self.anchors = MixtureSet((2,), self.n_components)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self.last_terms: dict = {}

    # -- public API ----------------------------------------------------------------------------

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        weights: Tensor | None = None,
        domain: str = "source",
        *,
        regression: Tensor | None = None,
        update: bool = True,
    ) -> Tensor:
        """Eq. 9 (+ lambda Eq. 10): update the statistics from this batch, then the loss.

        logits ``(N, C)`` or ``(B, C, *spatial)``; labels ``(N,)`` / ``(B, *spatial)`` with the
        ignore index (ground truth or pseudo-labels); weights the same shape (pseudo-label
        quality q(p); None = 1); domain "source", "target" or "mixed" (weight 1 marks source
        pixels, as released); regression the CDF head's output ``(B, 1, *spatial)``, labels'
        shape or ``(N, 1)`` (None: no Eq. 10 term). The offsets are detached; so is d.
        """
        pixels = self._pixels(logits, labels, weights, domain)
        self.last_terms = {}
        needed = self.mode != "none" and (self.tau > 0 or regression is not None)
        with small_op_threads(logits):
            if update:
                self._update(pixels)
            tables = self._tables(-self.tau, domain) if needed else None  # Eq. 9: f - tau Delta
        per_pixel = self._cross_entropy(pixels, tables if self.tau > 0 else None, logits, labels)
        if weights is not None:
            per_pixel = per_pixel * weights
        cross_entropy = self._reduce(per_pixel)
        total = cross_entropy
        regression_term = torch.zeros((), device=logits.device)
        if regression is not None:
            if self.mode == "none":
                raise BLDAError(
                    "regression: mode 'none' keeps no statistics, so there is no CDF target "
                    "(Eq. 10); use mode 'ola' or 'ola_source', or pass regression=None"
                )
            threads = torch.get_num_threads()  # the CDF pass's, while torch runs in one
            with small_op_threads(logits):
                per_pixel = self._regression_per_pixel(pixels, regression, labels, tables, threads)
            regression_term = self._reduce(per_pixel)
            total = total + self.regression_weight * regression_term
        self.last_terms.update(ce=cross_entropy.detach(), regression=regression_term.detach())
        return total

    @torch.no_grad()
    def update_statistics(
        self, logits: Tensor, labels: Tensor, weights: Tensor | None = None, domain="source"
    ) -> dict:
        """Only the momentum-EM update of Algorithm 1 (what `forward` does first)."""
        self._update(self._pixels(logits, labels, weights, domain))
        return dict(self.last_terms)

    @torch.no_grad()
    def offsets(
        self, logits: Tensor, labels: Tensor, domain: str = "source", weights: Tensor | None = None
    ) -> Tensor:
        """Delta_{y, c}(f[c]) of Eq. 6 for every pixel and class, shaped like `logits`; zero at
        ignored pixels and where the label's row or the anchors were never updated."""
        pixels = self._pixels(logits, labels, weights, domain)
        tables = None if self.mode == "none" else self._tables(1.0, domain)
        offsets = None if tables is None else self._offsets(pixels, tables)
        if offsets is None:
            return torch.zeros_like(logits, dtype=torch.float32)
        return to_logit_shape(offsets, logits)

    @torch.no_grad()
    def regression_target(
        self, logits: Tensor, labels: Tensor, domain: str = "source", weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """d = F_yy(f[y]) (Sec. 3.3.5) shaped like `labels`, and where it exists (bool)."""
        pixels = self._pixels(logits, labels, weights, domain)
        target, available = self._cdf_targets(pixels)
        return target.reshape(labels.shape), available.reshape(labels.shape)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, mode={self.mode!r}, K={self.n_components}, "
            f"T={self.em_steps}, momentum={self.momentum}, tau={self.tau}, "
            f"regression={self.regression_loss}x{self.regression_weight}"
        )

    def get_extra_state(self) -> dict:
        return {"format": STATE_FORMAT, "num_classes": self.num_classes, "K": self.n_components}

    def set_extra_state(self, state) -> None:
        expected = self.get_extra_state()
        if state != expected:
            raise BLDAError(f"state_dict: written for {state}, this loss is {expected}")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module, but a mismatched or malformed state raises BLDAError."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except (RuntimeError, KeyError, TypeError) as error:
            raise BLDAError(f"state_dict: does not fit this BLDALoss ({error})") from None

    # -- input ---------------------------------------------------------------------------------

    def _pixels(self, logits, labels, weights, domain) -> Pixels:
        check_choice("domain", domain, DOMAINS)
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim < 2:
            raise BLDAError("logits: expected a float tensor (N, C) or (B, C, *spatial)")
        if logits.shape[1] != self.num_classes:
            raise BLDAError(
                f"logits: expected {self.num_classes} classes in dim 1, got {tuple(logits.shape)}"
            )
        expected = logits.shape[:1] + logits.shape[2:]
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
            raise BLDAError("labels: expected an int64 tensor")
        if labels.shape != expected:
            raise BLDAError(f"labels: expected shape {tuple(expected)}, got {tuple(labels.shape)}")
        if weights is not None and (not isinstance(weights, Tensor) or weights.shape != expected):
            raise BLDAError(f"weights: expected None or a tensor of shape {tuple(expected)}")
        if domain == "mixed" and weights is None:
            raise BLDAError("weights: domain 'mixed' needs the pixel weights (1 marks source)")
        valid, labels = self._checked_labels(labels)
        if logits.ndim == 2:  # classification: N pixels of one "image"
            flat_logits, valid = logits.detach().t()[None], valid[None]
            flat_labels, flat_weights = labels[None], None if weights is None else weights[None]
        else:
            # flatten, not reshape(batch, C, -1): an empty batch has no -1 to infer
            flat_logits = logits.detach().flatten(2)
            flat_labels, valid = labels.flatten(1), valid.flatten(1)
            flat_weights = None if weights is None else weights.flatten(1)
        if domain == "source":
            in_target = torch.zeros_like(valid)
        elif domain == "target":
            in_target = torch.ones_like(valid)
        else:
            in_target = flat_weights != 1
        return Pixels(flat_logits, flat_labels, valid, in_target, flat_weights, domain)

    def _checked_labels(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(valid, labels with 0 where ignored), both labels' shape, after checking that every
        other label is a class. On a CPU one compiled pass instead of six."""
        if labels.device.type == "cpu":
            valid, clean, out_of_range = label_fields(labels, self.ignore_index, self.num_classes)
        else:
            valid = labels != self.ignore_index
            clean = torch.where(valid, labels, 0)
            out_of_range = bool((valid & ((labels < 0) | (labels >= self.num_classes))).any())
        if out_of_range:
            raise BLDAError(
                f"labels: values must lie in [0, {self.num_classes}) or be the ignore index "
                f"{self.ignore_index}"
            )
        return valid, clean

    # -- statistics (Algorithm 1, lines 6-32) ----------------------------------------------------

    @torch.no_grad()
    def _update(self, pixels: Pixels) -> None:
        self.last_terms = {"n_cells_updated": 0}
        if self.mode == "none":
            return
        # Every pixel the update may draw, checked before anything is sampled or changed: a
        # NaN was caught only when the sampling happened to draw it, and after the source
        # mixtures had been updated. (The loss itself treats non-finite logits as
        # F.cross_entropy does; an ignored pixel's logits are never read.)
        if not _finite_at(pixels.logits, pixels.valid):
            raise BLDAError("logits: contain NaN or infinite values at labelled pixels")
        self.iteration += 1
        sync = RankSync(self.process_group, self.sync_processes)
        generator = torch.Generator(device=pixels.logits.device)
        generator.manual_seed(self.seed * 1_000_003 + int(self.iteration))
        keys = pixel_keys(pixels.valid.shape, generator, sync)
        source_members, target_members = pixels.members()
        feeds_source = pixels.domain == "source" or (
            pixels.domain == "mixed" and self.mixed_updates_source
        )
        domains = [("source", self.source, source_members)] if feeds_source else []
        if self.mode == "ola":
            domains.append(("target", self.target, target_members))
        for name, mixture_set, members in domains:
            samples = draw_cell_samples(
                pixels.logits,
                pixels.labels,
                members,
                keys,
                self.min_samples,
                self.max_samples_per_cell,
                sync,
            )
            self.last_terms[f"{name}_samples_per_cell"] = 0 if samples is None else samples.per_cell
            if samples is not None:  # as released: no qualifying class, no update, no clock tick
                self._update_set(name, mixture_set, samples.cells, samples.mask)
            if name == "source":  # the anchors: global source distributions (line 26)
                if self.anchor_sampling == "pixels":
                    anchors = draw_anchor_samples(
                        pixels.logits,
                        pixels.labels,
                        members,
                        keys,
                        self.min_samples,
                        self.anchor_max_samples,
                        sync,
                    )
                else:
                    anchors = None if samples is None else class_balanced_anchors(samples)
                if anchors is not None:
                    self.last_terms["anchor_samples"] = anchors.shape[1]
                    self._update_set("anchors", self.anchors, anchors, None)

    def _update_set(self, name, mixture_set: MixtureSet, samples, mask) -> None:
        momentum = mixture_set.effective_momentum(self.momentum, self.momentum_warmup)
        try:
            updated = mixture_set.update(samples, mask, self.em_steps, momentum)
        except BLDAError as error:  # e.g. NaN logits: name the argument the user passed
            raise BLDAError(f"logits: {error}") from None
        if name != "anchors":
            self.last_terms[f"{name}_cells_updated"] = int(updated.sum())
            self.last_terms["n_cells_updated"] += int(updated.sum())

    # -- offsets (Eq. 6) -------------------------------------------------------------------------

    def _sets(self) -> list[MixtureSet]:
        return [self.source, self.target]

    def _row_active(self) -> Tensor:
        """(2, C): rows whose every cell was updated (sampling updates whole rows), per domain;
        none without fitted anchors, and none on the target in mode "ola_source"."""
        rows = torch.stack([s.fitted.all(dim=1) for s in self._sets()])
        rows &= bool(self.anchors.fitted.all())
        if self.mode != "ola":
            rows[1] = False
        return rows

    @torch.no_grad()
    def _tables(self, scale: float, domain: str) -> OffsetTables | None:
        """The offset tables (offsets times `scale`) of the current state, for the fitted cells
        of the sets that pixels of `domain` read (source pixels the source set, target pixels
        the target set, a mixed image both); None if there is none."""
        reads = (domain != "target", domain != "source" and self.mode == "ola")
        cells = torch.stack([s.fitted & read for s, read in zip(self._sets(), reads, strict=True)])
        if not bool(cells.any()):
            return None
        return OffsetTables.build(
            self._sets(),
            self.anchors,
            self.eps,
            self.offset_grid_points,
            self.anchor_grid_points,
            scale,
            cells,
        )

    @torch.no_grad()
    def _table_rows(self, pixels: Pixels) -> Tensor | None:
        """(B, P) each pixel's table row: set * C + label, or the zero row 2 C where the pixel
        is ignored or its row inactive; None if no row of the batch's domains is active."""
        row_active = self._row_active()
        if not bool(row_active.any()):
            return None
        if pixels.labels.device.type == "cpu":
            return table_rows(pixels.labels, pixels.valid, pixels.in_target, row_active.reshape(-1))
        row = pixels.in_target.long() * self.num_classes + pixels.labels  # into 2 C rows
        gate = pixels.valid & row_active.reshape(-1)[row]
        return torch.where(gate, row, 2 * self.num_classes)

    @torch.no_grad()
    def _offsets(self, pixels: Pixels, tables: OffsetTables) -> Tensor | None:
        """The tables' scale * Delta (B, C, P), Delta = z'(z) - z gathered per pixel from its
        label row; None if no row of the batch's domains is active (no offset anywhere)."""
        row = self._table_rows(pixels)
        return None if row is None else tables.gather(pixels.logits.float(), row)

    def _cross_entropy(self, pixels: Pixels, tables, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-pixel cross-entropy of f + scale Delta (Eq. 9), differentiable in f with Delta a
        constant (detached); plain cross-entropy where `tables` is None or no row is active."""
        row = None if tables is None else self._table_rows(pixels)
        # float64 logits stay float64 (as F.cross_entropy keeps them: gradcheck works);
        # half precision is computed in float32
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if row is None:
            adjusted = logits
        elif logits.dtype == torch.float32 and logits.device.type == "cpu":
            # one pass: offsets, log-softmax, loss and its gradient (no offsets tensor, no
            # autograd graph through the softmax)
            loss, gradient = adjusted_cross_entropy(
                pixels.logits, row, pixels.labels, pixels.valid, tables
            )
            return FixedGradient.apply(
                logits, loss.reshape(labels.shape), to_logit_shape(gradient, logits)
            )
        else:
            scaled = tables.gather(pixels.logits.float(), row)
            # in place into the offsets buffer: one (B, C, H, W) tensor less. detach() makes
            # the reshaped buffer a non-differentiable view, so autograd records a plain add
            # (no CopySlices: a copy and a zero fill of the whole buffer in backward).
            adjusted = to_logit_shape(scaled, logits).detach().to(compute).add_(logits.to(compute))
        return F.cross_entropy(
            adjusted.to(compute), labels, reduction="none", ignore_index=self.ignore_index
        )

    # -- cumulative density estimation (Eq. 10) --------------------------------------------------

    def _cdf_targets(self, pixels: Pixels, tables=None, threads=None) -> tuple[Tensor, Tensor]:
        """d = F_yy(f[y]) with the pixel's domain's positive mixture, and where it is defined
        (labelled pixels whose diagonal cell was updated; never on the target in "ola_source").
        With `tables`, pixels inside their cell's grid interpolate its CDF nodes (error
        ~ step^2 max|F''| / 8, about 1e-6) and only the others evaluate the mixture."""
        count = self.num_classes
        diagonal = [
            torch.stack([getattr(s, name).diagonal(dim1=0, dim2=1).t() for s in self._sets()])
            for name in ("weights", "means", "variances")
        ]
        fitted = torch.stack([s.fitted.diagonal() for s in self._sets()])
        if self.mode != "ola":
            fitted[1] = False
        if pixels.logits.dtype == torch.float32 and pixels.logits.device.type == "cpu":
            flat = [p.reshape(2 * count, -1) for p in diagonal]
            floor = _numerical_variance_floor(torch.float32)
            args = (pixels.logits, pixels.labels, pixels.valid, pixels.in_target)
            return cdf_targets(*args, fitted.reshape(-1), flat, floor, tables, threads)
        row = pixels.in_target.long() * count + pixels.labels
        available = pixels.valid & fitted.reshape(-1)[row]
        z = pixels.logits.gather(1, pixels.labels[:, None, :])[:, 0].float()
        if tables is None:
            target, exact = torch.zeros_like(z), available
        else:
            target, inside = tables.diagonal_cdf(z, row)
            exact = available & ~inside
        where = exact.reshape(-1).nonzero()[:, 0]
        weights, means, variances = (
            p.reshape(2 * count, -1).index_select(0, row.reshape(-1)[where]) for p in diagonal
        )
        values = mixture_cdf(z.reshape(-1)[where, None], weights, means, variances)[:, 0]
        target = target.reshape(-1).index_copy(0, where, values).view_as(z)
        return torch.where(available, target, 0.0), available

    def _regression_per_pixel(self, pixels, regression, labels, tables=None, threads=None):
        regression = regression_like(regression, labels)
        target, available = self._cdf_targets(pixels, tables, threads)
        prediction = regression.float().reshape(target.shape)
        error = prediction - target
        per_pixel = error.square() if self.regression_loss == "l2" else error.abs()
        per_pixel = torch.where(available, per_pixel, 0.0)
        if pixels.weights is not None:
            per_pixel = per_pixel * pixels.weights
        return per_pixel.reshape(labels.shape)

    def _reduce(self, per_pixel: Tensor) -> Tensor:
        if self.reduction == "mean":
            return per_pixel.mean()
        if self.reduction == "sum":
            return per_pixel.sum()
        return per_pixel


def _finite_at(logits: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether every logit of the `valid` pixels is finite. One sum decides the usual case (a
    finite sum has no NaN or infinity among its terms); only a non-finite sum, from a bad value
    anywhere or a float overflow, pays for the masked test (a full isfinite mask and gather
    cost 40 % of the whole loss at 2 x 19 x 512 x 512)."""
    if bool(torch.isfinite(logits.sum())):
        return True
    return bool(torch.isfinite(logits).all(1)[valid].all())
