"""Post-hoc CDF alignment (paper Sec. 3.3.3, Eq. 6-7, Appendix A): the fitted `Calibrator`.

Eq. 6 aligns a logit z of cell [c, l] (c = the pixel's class, l = the logit's class) to an anchor
through the CDFs: z' = F_anchor^-1(F_cl(z)), with the positive anchor for c = l and the negative
anchor for c != l, F_cl clamped to [eps, 1 - eps]; the offset is Delta_cl(z) = z' - z. Eq. 7
predicts argmax_c of softmax_c'(f[c'] + tau Delta_cc'(f[c'])) evaluated at c.

Speed. Evaluating CDFs per pixel for C x C cells is far too slow, so `fit` tabulates every cell's
offset function once on a uniform grid of `table_points` values per logit column l (covering the
fitted data and every cell's clamp points) and prediction interpolates it linearly. The table of
column l is stored as rows (l, g) holding Delta_{., l} at grid point g and the step to g + 1 for all
C classes c, so per pixel the grid position of f[l] is computed once per column and one row gather
returns the C offsets of that column. Beyond the table every cell's clamped CDF is constant, so the
aligned value z' is constant there and Delta = Delta_end - (z - z_end): the rare pixels outside
the table get that exact correction (see `gather_offsets`).

Eq. 7 itself is computed in log space by the scriptable functions of `blda_tools.calibration.eq7.kernel`
(`blda export` scripts them, so `--apply` and the exported module run the same code).

Predictions (`Calibrator.predict`, the tau sweep) first bound every class's Eq. 7 score from
C-vectors (see `blda_tools.calibration.eq7.pruning`, `blda_tools.calibration.eq7.certify`); only the few pixels those
bounds leave undecided (~3% at tau = 1 for C = 19) go through the C x C computation, with
identical results.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from blda_tools.calibration.alignment import (
    NEWTON_STEPS,
    Anchors,
    anchor_histograms,
    empirical_cdf,
    fitting_bins,
    mixture_parameters,
)
from blda_tools.calibration.eq7.certify import CertifyTables, certify_tables
from blda_tools.calibration.eq7.kernel import (
    BLOCK_PIXELS,
    balanced_log_scores_blocks,
    gather_offsets,
    log_scores_from_gaps,  # noqa: F401
    score_gaps,  # noqa: F401
)
from blda_tools.calibration.eq7.pruning import (
    bound_tables,
    full_prediction,  # noqa: F401
    predict_pruned,
    predict_taus,  # noqa: F401
)
from blda_tools.calibration.parameters import DEFAULTS, checked_parameters
from blda_tools.errors import BLDAError, check_number, check_same_classes
from blda_tools.fileio import save_torch
from blda_tools.gmm import GaussianMixture1D
from blda_tools.runtime.arrays import check_eq7_logits, check_float32_range, logit_rows
from blda_tools.runtime.memory import check_fits_in_memory
from blda_tools.statistics import LogitSetStatistics
from blda_tools.torch_files import load_torch

# The eq7_kernel / eq7_pruning names marked F401 are re-exported: sweep, export, calibrate, the
# tests and the benchmarks import them from here, where they lived before the split.

FORMAT_NAME = "blda-calibrator"
FORMAT_VERSION = 1


class Calibrator:
    """Post-hoc CDF alignment (Eq. 6-7), fitted from logit-set statistics.

    Hyper-parameters: `estimator` ("gmm": K-component mixtures fitted on the statistics
    histograms; "empirical": the histograms' own CDFs), `n_components` (K), `eps` (CDF clamp),
    `min_samples` (cells with fewer logits get Delta = 0 and are listed in `unadjusted_cells_`),
    `table_points` (G, grid points per logit column), `anchor` ("global" or "class:NAME"), `tau`.

    After `fit`: `class_names`, `ignore_index`, `table_low_`, `table_high_` ``(C,)``,
    `offsets_` ``(C, C, G)`` (Delta_cl on column l's grid), `adjusted_` ``(C, C)`` bool,
    `class_prior_` ``(C,)`` (of the fit-on labels), `cell_mixture_` / `anchor_mixtures_`
    (fitted GMM parameters, for reference).
    """

    def __init__(
        self,
        estimator: str = "gmm",
        n_components: int = 5,
        eps: float = 0.01,
        min_samples: int = 100,
        table_points: int = 2048,
        anchor: str = "global",
        tau: float = 1.0,
    ) -> None:
        parameters = checked_parameters(
            estimator, n_components, eps, min_samples, table_points, anchor
        )
        for name, value in parameters.items():
            setattr(self, name, value)
        self.tau = tau
        self.class_names: tuple[str, ...] | None = None
        self.ignore_index = 255
        self.cell_mixture_: dict[str, Tensor] | None = None
        self.anchor_mixtures_: dict[str, dict[str, Tensor]] = {}

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters and their values (scikit-learn's convention)."""
        return {name: getattr(self, name) for name in DEFAULTS}

    def set_params(self, **params) -> Calibrator:
        """Set constructor parameters by name, checked together; returns self. A fitted
        calibrator keeps its tables until the next `fit` (only `tau` changes them at once)."""
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise BLDAError(
                f"set_params: unknown parameter(s) {', '.join(unknown)}; expected some of "
                f"{', '.join(DEFAULTS)}"
            )
        merged = self.get_params() | params
        tau = merged.pop("tau")
        for name, value in checked_parameters(**merged).items():
            setattr(self, name, value)
        self.tau = tau
        return self

    def __repr__(self) -> str:
        """As scikit-learn shows an estimator: the parameters that differ from the defaults."""
        changed = [f"{name}={value!r}" for name, value in self.get_params().items()
                   if value != DEFAULTS[name]]  # fmt: skip
        return f"Calibrator({', '.join(changed)})"

    # ------------------------------------------------------------------ fit
    @property
    def tau(self) -> float:
        """The tau `predict` and `log_scores` use by default (checked when set)."""
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        checked = check_tau(value, "tau")
        # A plain float is kept as the object given: scikit-learn's `clone` checks that the
        # constructor stores its parameters unchanged (`is`); -0.0 and tensors are converted.
        keep = type(value) is float and checked == value and math.copysign(1.0, value) > 0
        self._tau = value if keep else checked

    def fit(
        self,
        statistics: LogitSetStatistics,
        anchor_statistics: LogitSetStatistics | None = None,
    ) -> Calibrator:
        """Tabulate Delta_cl (Eq. 6) from `statistics` (rows = fit-on labels); anchors from
        `anchor_statistics` (default: the same statistics)."""
        # Checked again: attributes assigned since the constructor (c.eps = 5) were saved and
        # then refused by `load`.
        self.set_params()
        anchor_statistics = statistics if anchor_statistics is None else anchor_statistics
        for name, value in (("statistics", statistics), ("anchor_statistics", anchor_statistics)):
            if not isinstance(value, LogitSetStatistics):
                raise BLDAError(
                    f"fit: {name} must be LogitSetStatistics (collect_statistics or "
                    f"read from statistics.h5), got {type(value).__name__}"
                )
        if anchor_statistics.grid != statistics.grid:
            raise BLDAError("anchor statistics: histogram grid differs from the fit-on statistics")
        if anchor_statistics.num_classes != statistics.num_classes:
            raise BLDAError(
                f"anchor statistics: {anchor_statistics.num_classes} classes, the fit-on "
                f"statistics {statistics.num_classes}"
            )
        if None not in (statistics.class_names, anchor_statistics.class_names) and (
            statistics.class_names != anchor_statistics.class_names
        ):
            check_same_classes(
                statistics.class_names,
                anchor_statistics.class_names,
                "anchor statistics",
                ("fit-on", "anchors"),
            )
        num_classes = statistics.num_classes
        self.check_tables_fit(num_classes)
        # Names from whichever statistics carry them (where both do, checked equal above).
        named = statistics.class_names or anchor_statistics.class_names
        self.class_names = tuple(named or [f"class{c}" for c in range(num_classes)])
        self.ignore_index = statistics.ignore_index
        anchors = Anchors(
            *anchor_histograms(anchor_statistics, self.anchor),
            self.estimator,
            self.n_components if self.estimator == "gmm" else 1,
            statistics.grid,
        )
        self.adjusted_ = torch.from_numpy(statistics.count >= self.min_samples)
        cell_cdf, quantiles = self._cell_distributions(statistics)
        low, high = self._table_range(statistics, quantiles)
        steps = torch.linspace(0.0, 1.0, self.table_points, dtype=torch.float64)
        grid = low[:, None] + (high - low)[:, None] * steps  # (C_l, G)
        probability = cell_cdf(grid.expand(num_classes, num_classes, -1)).clamp(
            self.eps, 1.0 - self.eps
        )
        aligned = anchors.inverse_cdf("negative", probability)  # Eq. 6, c != l
        diagonal = torch.arange(num_classes)
        aligned[diagonal, diagonal] = anchors.inverse_cdf(
            "positive", probability[diagonal, diagonal]
        )  # Eq. 6, c = l
        offsets = torch.where(self.adjusted_[..., None], aligned - grid, 0.0)
        self.offsets_ = offsets.to(torch.float32)
        self.table_low_, self.table_high_ = low.to(torch.float32), high.to(torch.float32)
        counts = torch.from_numpy(statistics.count[:, 0]).to(torch.float64)
        # A class never seen counts as one pixel, so log(prior) stays finite.
        self.class_prior_ = (counts.clamp(min=1) / counts.clamp(min=1).sum()).to(torch.float32)
        self.anchor_mixtures_ = {
            name: mixture_parameters(mixture) for name, mixture in anchors.mixtures.items()
        }
        self._build_rows()
        return self

    def _cell_distributions(self, statistics: LogitSetStatistics):
        """(CDF function of grid points (C, C, G), per-cell [eps, 1 - eps] quantiles or None)."""
        grid = statistics.grid
        if self.estimator == "empirical":
            histogram = torch.from_numpy(statistics.histogram)

            def cdf(z: Tensor) -> Tensor:
                return empirical_cdf(histogram, grid.low, grid.width, z)

            return cdf, None
        mixture = GaussianMixture1D(
            self.n_components, dtype=torch.float64, min_samples=self.min_samples
        )
        centers, counts, width = fitting_bins(grid, torch.from_numpy(statistics.histogram))
        mixture.fit_histogram(centers, counts, bin_width=width)
        self.adjusted_ &= mixture.fitted_
        self.cell_mixture_ = mixture_parameters(mixture)
        levels = torch.tensor([self.eps, 1.0 - self.eps], dtype=torch.float64)
        quantiles = mixture.inverse_cdf(
            levels.expand(*mixture.batch_shape, 2), newton_steps=NEWTON_STEPS
        )
        return mixture.cdf, quantiles

    def _table_range(self, statistics, quantiles) -> tuple[Tensor, Tensor]:
        """Each column's grid covers its cells' data and their clamp points (so z' is constant
        beyond it)."""
        present = torch.from_numpy(statistics.count > 0)
        low = torch.where(present, torch.from_numpy(statistics.minimum), math.inf)
        high = torch.where(present, torch.from_numpy(statistics.maximum), -math.inf)
        if quantiles is not None:
            low = torch.where(self.adjusted_, torch.minimum(low, quantiles[..., 0]), low)
            high = torch.where(self.adjusted_, torch.maximum(high, quantiles[..., 1]), high)
        low, high = low.amin(0), high.amax(0)
        empty = ~torch.isfinite(low) | ~torch.isfinite(high)
        low = torch.where(empty, -1.0, low)
        high = torch.where(empty, 1.0, high)
        high = torch.maximum(high, low + 1e-3)
        return low, high

    def _build_rows(self) -> None:
        """The hot-path layout of the table (see `gather_offsets`)."""
        num_classes, _, points = self.offsets_.shape
        by_column = self.offsets_.permute(1, 2, 0)  # (C_l, G, C_c)
        increment = torch.zeros_like(by_column)
        increment[:, :-1] = by_column[:, 1:] - by_column[:, :-1]
        self._rows = torch.cat([by_column, increment], 2).reshape(num_classes * points, -1)
        self._rows = self._rows.contiguous()
        self._inv_step = ((points - 1) / (self.table_high_ - self.table_low_)).to(torch.float32)
        self._adjusted_lc = self.adjusted_.T.to(torch.float32).contiguous()
        self._certify_tables = certify_tables(
            bound_tables(self.offsets_, self.adjusted_, self._rows), self.kernel_tensors()
        )

    # ------------------------------------------------------------------ apply
    @property
    def num_classes(self) -> int:
        return len(self._require_fitted())

    @property
    def unadjusted_cells_(self) -> list[tuple[str, str]]:
        """Cells [c, l] left with Delta = 0 (fewer than `min_samples` logits, or not fitted)."""
        names = self._require_fitted()
        return [(names[row], names[column]) for row, column in (~self.adjusted_).nonzero().tolist()]

    def _require_fitted(self) -> tuple[str, ...]:
        if self.class_names is None:
            raise BLDAError("Calibrator: not fitted; call fit() or Calibrator.load() first")
        return self.class_names

    def offsets(self, logits: Tensor) -> Tensor:
        """Delta_cl(f[l]) for every pixel, ``(n, C_l, C_c)`` (the table interpolated); maps
        ``(B, C, H, W)`` give ``(B, H, W, C_l, C_c)``."""
        rows, pixels = self._check_logits(logits)
        offsets = gather_offsets(rows, *self.kernel_tensors())
        offsets = offsets if pixels is None else offsets.reshape(*pixels, *offsets.shape[1:])
        return offsets.to(_device_of(logits))

    def kernel_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(rows, low, inv_step, high, adjusted_lc): the arguments of `gather_offsets`."""
        self._require_fitted()
        return self._rows, self.table_low_, self._inv_step, self.table_high_, self._adjusted_lc

    def log_scores(self, logits: Tensor, tau: float | None = None) -> Tensor:
        """Eq. 7 log scores (the "balanced logits") of `logits`: rows ``(n, C)`` or maps
        ``(B, C, H, W)`` (a model's output), in the same shape."""
        rows, pixels = self._check_logits(logits)
        tau = self.tau if tau is None else check_tau(tau, "tau")
        scores = balanced_log_scores_blocks(rows, *self.kernel_tensors(), tau, BLOCK_PIXELS)
        scores = scores if pixels is None else scores.reshape(*pixels, rows.shape[1]).movedim(-1, 1)
        return scores.to(_device_of(logits))

    def predict(
        self, logits: Tensor, tau: float | None = None, threads: int | None = None
    ) -> Tensor:
        """Eq. 7 prediction int64: the argmax of `log_scores` (lowest index on ties), ``(n,)``
        for rows ``(n, C)`` and ``(B, H, W)`` for maps ``(B, C, H, W)``; certified from bounds
        where they decide, else fully computed (`predict_pruned`); `threads` defaults to
        torch's thread count."""
        rows, pixels = self._check_logits(logits)
        tau = self.tau if tau is None else check_tau(tau, "tau")
        check_number(threads, "threads", integer=True, optional=True)
        if threads is not None and threads < 1:
            raise BLDAError(f"threads: expected None or an integer >= 1, got {threads!r}")
        threads = torch.get_num_threads() if threads is None else int(threads)
        tables = self.certify_tables()
        prediction = predict_pruned(rows, self.kernel_tensors(), tables, tau, threads)
        prediction = prediction if pixels is None else prediction.reshape(pixels)
        return prediction.to(_device_of(logits))

    def certify_tables(self) -> CertifyTables:
        """The tables of the pruning bounds, laid out for `blda_tools.calibration.eq7.certify`."""
        self._require_fitted()
        return self._certify_tables

    def _check_logits(self, logits) -> tuple[Tensor, tuple[int, ...] | None]:
        """(float32 contiguous rows (n, C), the maps' (B, H, W) or None): see `logit_rows`;
        finite values within +-1.7e38 (`check_eq7_logits`), else BLDAError."""
        names = self._require_fitted()
        # Post-hoc: a model's output may carry a grad_fn; no gradient flows through Eq. 7 here.
        # The tables and the certificate live on the CPU: a GPU model's output is copied there
        # (callers return their results to its device). numpy views of any strides are taken.
        given = logits.detach() if isinstance(logits, Tensor) else np.ascontiguousarray(logits)
        rows, pixels = logit_rows(torch.as_tensor(given).cpu(), len(names))
        check_float32_range(rows)
        rows = rows.to(torch.float32).contiguous()
        check_eq7_logits(rows)
        return rows, pixels

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain tensors and primitives only (loadable with torch.load(weights_only=True))."""
        names = self._require_fitted()
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "class_names": list(names),
            "ignore_index": self.ignore_index,
            "tau": self.tau,
            "eps": self.eps,
            "estimator": self.estimator,
            "n_components": self.n_components,
            "min_samples": self.min_samples,
            "table_points": self.table_points,
            "anchor": self.anchor,
            "table_low": self.table_low_,
            "table_high": self.table_high_,
            "offsets": self.offsets_,
            "adjusted": self.adjusted_,
            "class_prior": self.class_prior_,
            "cell_mixture": self.cell_mixture_,
            "anchor_mixtures": self.anchor_mixtures_,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` with torch.save (atomically)."""
        save_torch(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibrator:
        """Read a calibrator written by `save` (torch.load with weights_only=True)."""
        state = load_torch(path, str(path), "a blda calibrator file")
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise BLDAError(f"{path}: not a blda calibrator (format {FORMAT_NAME!r} missing)")
        if state.get("format_version") != FORMAT_VERSION:
            raise BLDAError(
                f"{path}: calibrator format version {state.get('format_version')}, "
                f"expected {FORMAT_VERSION}"
            )
        try:
            calibrator = cls(
                state["estimator"],
                state["n_components"],
                state["eps"],
                state["min_samples"],
                state["table_points"],
                state["anchor"],
                state["tau"],
            )
            names = state["class_names"]
            if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
                raise BLDAError(f"{path}: class_names is not a list of names: {names!r}")
            calibrator.class_names = tuple(names)
            calibrator.ignore_index = int(state["ignore_index"])
            calibrator.table_low_ = state["table_low"].to(torch.float32)
            calibrator.table_high_ = state["table_high"].to(torch.float32)
            calibrator.offsets_ = state["offsets"].to(torch.float32)
            calibrator.adjusted_ = state["adjusted"].to(torch.bool)
            calibrator.class_prior_ = state["class_prior"]
            calibrator.cell_mixture_ = state["cell_mixture"]
            calibrator.anchor_mixtures_ = state["anchor_mixtures"]
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            raise BLDAError(f"{path}: calibrator is missing or has a bad field {error}") from None
        except BLDAError as error:  # a field the constructor refuses (its message names it)
            message = str(error)
            named = message if message.startswith(str(path)) else f"{path}: {message}"
            raise BLDAError(named) from None
        _check_loaded_tables(calibrator, path)
        calibrator._build_rows()
        return calibrator

    def check_tables_fit(self, num_classes: int) -> None:
        """Refuse `table_points` whose fit cannot fit in memory (`runtime.memory`)."""
        check_fits_in_memory(  # probabilities, aligned logits and offsets, float64
            3 * num_classes * num_classes * self.table_points * 8,
            f"--table-points: {self.table_points:,} points for {num_classes} classes: the "
            "(C, C, points) float64 tables of the fit",
            "give fewer --table-points (the default is 2,048)",
        )

    def check_classes(self, class_names: Sequence[str], where: str) -> None:
        """BLDAError unless `class_names` are the calibrator's classes, in the same order."""
        names = self._require_fitted()
        check_same_classes(names, class_names, where, ("the calibrator", "the stores"))


def _check_loaded_tables(calibrator: Calibrator, path) -> None:
    """The tables of a loaded calibrator: shaped for its classes and finite (a damaged or
    edited file would otherwise fail inside the kernels, or give NaN scores)."""
    classes = len(calibrator.class_names)
    offsets = calibrator.offsets_
    if offsets.ndim != 3 or offsets.shape[:2] != (classes, classes):
        raise BLDAError(f"{path}: offsets have shape {tuple(offsets.shape)}")
    expected = {
        "table_low": (calibrator.table_low_, (classes,)),
        "table_high": (calibrator.table_high_, (classes,)),
        "adjusted": (calibrator.adjusted_, (classes, classes)),
    }
    prior = calibrator.class_prior_
    if not isinstance(prior, torch.Tensor):
        raise BLDAError(f"{path}: class_prior is not a tensor: {type(prior).__name__}")
    expected["class_prior"] = (prior, (classes,))
    if offsets.shape[2] != calibrator.table_points:
        raise BLDAError(
            f"{path}: offsets hold {offsets.shape[2]} grid points, table_points says "
            f"{calibrator.table_points}"
        )
    for name, (table, shape) in expected.items():
        if tuple(table.shape) != shape:
            raise BLDAError(f"{path}: {name} has shape {tuple(table.shape)}, expected {shape}")
    for name, table in (("offsets", offsets), ("table_low", calibrator.table_low_),
                        ("table_high", calibrator.table_high_), ("class_prior", prior)):  # fmt: skip
        if not bool(torch.isfinite(table).all()):
            raise BLDAError(f"{path}: {name} holds NaN or infinite values")
    if not bool((calibrator.table_high_ > calibrator.table_low_).all()):
        raise BLDAError(f"{path}: table_high is not above table_low for every class")


# The largest tau taken. The paper's lie in [0, 1]; far beyond, tau Delta leaves the range
# in which Eq. 7's float32 arithmetic is meaningful (1e39 does not even fit in float32).
MAX_TAU = 1e4


def _device_of(logits) -> torch.device:
    """Where results go back to: the input tensor's device (the CPU for numpy input)."""
    return logits.device if isinstance(logits, Tensor) else torch.device("cpu")


def check_tau(tau: float, option: str = "--tau") -> float:
    """A number 0 <= tau <= MAX_TAU (a string is not one), else BLDAError naming `option`."""
    if getattr(tau, "ndim", None) == 0 and hasattr(tau, "item"):  # torch.tensor(0.5), numpy
        tau = tau.item()
    check_number(tau, option)
    try:
        value = float(tau)
    except OverflowError:  # an int beyond float64 (10**400)
        value = math.inf if tau > 0 else -math.inf
    if math.isnan(value) or value < 0:
        raise BLDAError(f"{option}: expected a finite tau >= 0, got {tau!r}")
    if value > MAX_TAU:
        raise BLDAError(
            f"{option}: expected a tau of at most {MAX_TAU:g} (the paper's lie in [0, 1]; larger "
            f"ones take Eq. 7's float32 arithmetic out of its range), got {tau!r}"
        )
    return value + 0.0  # -0.0 as 0.0 (it was written as -0.0 into sweep.csv and the files)
