"""The tau sweep of Eq. 7: tau specs, one pass over the data for every tau, baselines, selection.

`TauSweep` accumulates, for every tau, the confusion matrix of the Eq. 7 prediction ("blda") and
of prior logit adjustment (Menon et al. 2020: argmax f - tau log pi, "prior"). Per pixel the
bounds of Eq. 7 are formed once and one certificate decides most pixels for every tau of the
sweep at once; the range of taus is halved only for the pixels left undecided, and the full C x C
computation runs only for those no single-tau certificate decides (`predict_taus`). The counts
of both methods are added in one compiled pass (`sweep_counts`). tau = 0 is the uncalibrated
model for both methods and is computed as the plain argmax, so it reproduces the uncalibrated
metrics exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from blda_tools.calibration.calibrator import Calibrator, check_tau, predict_taus
from blda_tools.calibration.eq7.certify import prediction_dtype
from blda_tools.calibration.eq7.pruning import thread_pool
from blda_tools.calibration.sweep_counts import count_sweep
from blda_tools.errors import BLDAError
from blda_tools.runtime.arrays import check_eq7_logits, check_float32_range
from blda_tools.runtime.process import torch_threads
from blda_tools.statistics.metrics import SegmentationMetrics

METHODS = ("blda", "prior")
METRICS = ("miou", "macc")
MAX_TAUS = 1000


def parse_tau_spec(spec: str) -> list[float]:
    """`0.1`, `0:1:0.05` (start:stop:step, stop included) or `0,0.1,0.5,1` -> sorted unique taus.

    BLDAError (naming --tau) for a spec that does not parse, a negative tau, a step <= 0, a stop
    below the start or more than 1000 values.
    """
    text = str(spec).strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, step = (float(part) for part in parts)
            start, stop = check_tau(start), check_tau(stop)  # finite, within range
            if not 0 < step < math.inf:
                raise BLDAError(
                    f"--tau: step must be > 0 and finite in START:STOP:STEP, got {spec!r}"
                )
            if stop < start:
                raise BLDAError(f"--tau: STOP is below START in {spec!r}")
            steps = (stop - start) / step  # may overflow to inf for a tiny step
            if not steps < MAX_TAUS:
                raise BLDAError(
                    f"--tau: {spec!r} gives more than {MAX_TAUS} values, at most {MAX_TAUS}"
                )
            count = math.floor(steps + 1e-9) + 1
            if count > MAX_TAUS:
                raise BLDAError(f"--tau: {spec!r} gives {count} values, at most {MAX_TAUS}")
            # Rounded so that 0:1:0.1 gives 0.3, not 0.30000000000000004.
            values = [round(start + index * step, 12) for index in range(count)]
        else:
            values = [float(part) for part in text.split(",")]
    except ValueError:
        raise BLDAError(
            f"--tau: cannot parse {spec!r}; expected a number (0.1), START:STOP:STEP (0:1:0.05) "
            "or a list (0,0.1,0.5,1)"
        ) from None
    return sorted({check_tau(value) for value in values})


# Pixels per block of a sweep (its Eq. 7 predictions are (taus, block) int64): 2^18 measured
# faster than 2^16 for both 1 and 11 taus (benchmarks/bench_calibrate.py), as each block
# starts and joins the certificate threads once.
SWEEP_BLOCK = 1 << 18


@dataclass(frozen=True)
class SweepRow:
    """One line of sweep.csv: a method at one tau, with its metrics."""

    tau: float
    method: str
    metrics: SegmentationMetrics


class TauSweep:
    """Streaming confusion matrices of Eq. 7 and prior adjustment for every tau (update/compute)."""

    def __init__(
        self,
        calibrator: Calibrator,
        taus: Sequence[float],
        block: int = SWEEP_BLOCK,
        classes: Sequence[int] = (),
        ignore_index: int | None = None,
    ):
        """`classes`: those the metrics' means run over (`evaluation_classes`; all if empty);
        `ignore_index`: of the labels to come (default the calibrator's, that of the labels
        it was fitted on)."""
        taus = sorted({check_tau(tau) for tau in taus} | {0.0})  # tau = 0: the uncalibrated model
        self.calibrator, self.taus, self.block = calibrator, taus, int(block)
        self.classes = tuple(classes)
        self.num_classes = calibrator.num_classes
        self.ignore_index = calibrator.ignore_index if ignore_index is None else ignore_index
        C, T = self.num_classes, len(taus)
        self.confusion = {method: torch.zeros(T, C * C, dtype=torch.int64) for method in METHODS}
        with np.errstate(divide="ignore"):  # a class never seen: log 0 = -inf, as intended
            self._log_prior = np.log(calibrator.class_prior_.to(torch.float64).numpy())
        self._kernel = calibrator.kernel_tensors()
        self._tables = calibrator.certify_tables()

    def update(self, logits: Tensor, labels: Tensor, threads: int | None = None) -> None:
        """Add pixels: `logits` ``(n, C)`` float32 (finite), `labels` ``(n,)`` with ignore index;
        `threads` for the certificates (default: torch's thread count)."""
        kept = labels != self.ignore_index
        if not bool(kept.all()):
            logits, labels = logits[kept], labels[kept]
        if logits.shape[0] == 0:
            return
        C = self.num_classes
        if int(labels.min()) < 0 or int(labels.max()) >= C:
            raise BLDAError(f"labels: values outside [0, {C}) other than the ignore index")
        T = len(self.taus)
        threads = torch.get_num_threads() if threads is None else int(threads)
        check_float32_range(logits)
        logits = logits.to(torch.float32).contiguous()
        check_eq7_logits(logits)  # the certificates need finite values
        cells = np.zeros((2, T, C, C), dtype=np.int64)
        with torch_threads(1) if threads > 1 else contextlib.nullcontext():
            self._count_blocks(logits, labels, threads, cells)
        for method_index, method in enumerate(METHODS):
            self.confusion[method] += torch.from_numpy(cells[method_index]).view(T, C * C)

    def _count_blocks(self, logits: Tensor, labels: Tensor, threads: int, cells) -> None:
        """Add the confusion cells ``(2, T, C, C)`` of every block of rows into `cells`. Each
        of `threads` threads predicts AND counts its part of a block: counting 11 taus after
        the certificates, in the calling thread alone, took a third of the sweep's wall time
        on 2 cores (measured 160 ns per pixel, against 705 ns for the 10-tau certificate)."""
        threads = max(1, min(threads, logits.shape[0] // 4096))  # small inputs: one thread
        for start in range(0, logits.shape[0], self.block):
            stop = min(start + self.block, logits.shape[0])
            bounds = np.linspace(start, stop, threads + 1).astype(np.int64).tolist()
            parts = [slice(bounds[index], bounds[index + 1]) for index in range(threads)]
            work = functools.partial(self._count_part, logits, labels)
            counted = map(work, parts) if threads == 1 else thread_pool(threads).map(work, parts)
            for part_cells in counted:
                cells += part_cells

    def _count_part(self, logits: Tensor, labels: Tensor, rows: slice) -> np.ndarray:
        """The confusion cells ``(2, T, C, C)`` of `rows`: their Eq. 7 predictions at every
        tau > 0 (one thread) and the counts of both methods."""
        C, T = self.num_classes, len(self.taus)
        part = logits[rows]
        # in the certificates' narrow type, written by them directly (`predict_taus`)
        predictions = torch.empty(T - 1, part.shape[0], dtype=prediction_dtype(C))
        if T > 1:
            predict_taus(part, self._kernel, self._tables, self.taus[1:], 1, predictions)
        cells = np.zeros((2, T, C, C), dtype=np.int64)
        taus = np.asarray(self.taus, dtype=np.float64)
        arrays = (part.numpy(), labels[rows].numpy(), predictions.numpy())
        count_sweep(*arrays, taus, self._log_prior, cells)
        return cells

    def compute(self) -> list[SweepRow]:
        """Rows ordered by method, then tau."""
        C = self.num_classes
        rows = []
        for method in METHODS:
            for index, tau in enumerate(self.taus):
                confusion = self.confusion[method][index].view(C, C)
                scores = SegmentationMetrics.from_confusion(confusion, self.classes)
                rows.append(SweepRow(tau, method, scores))
        return rows

    def confusion_at(self, tau: float, method: str = "blda") -> Tensor:
        """The ``(C, C)`` confusion matrix of `method` at `tau` (which must be in the sweep)."""
        return self.confusion[method][self.taus.index(float(tau))].view(
            self.num_classes, self.num_classes
        )


def sweep_stores(
    calibrator: Calibrator,
    store,
    taus: Sequence[float],
    progress: Callable[[int], None] | None = None,
    rows_per_chunk: int = SWEEP_BLOCK,
    classes: Sequence[int] = (),
) -> TauSweep:
    """Stream a labelled `LogitStore` through a `TauSweep` (one pass for every tau); its
    metrics average over `classes` (all if empty)."""
    if not store.has_labels:
        raise BLDAError(
            f"{', '.join(map(str, store.paths))}: the sweep needs ground-truth labels to measure "
            "mIoU and mAcc, and this store has none"
        )
    calibrator.check_classes(store.class_names, ", ".join(map(str, store.paths)))
    # The store's own ignore index: its labels may mark ignored pixels otherwise than those
    # the calibrator was fitted on.
    sweep = TauSweep(calibrator, taus, classes=classes, ignore_index=store.ignore_index)
    for chunk in store.iter_chunks(rows=rows_per_chunk, reuse_buffers=True):
        sweep.update(chunk.logits, chunk.labels)
        if progress is not None:
            progress(chunk.logits.shape[0])
    return sweep


def check_metric(metric: str) -> str:
    """`metric` if it is one of `METRICS`, else BLDAError naming --metric."""
    if metric not in METRICS:
        raise BLDAError(f"--metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def select_tau(
    rows: Sequence[SweepRow], metric: str, taus: Sequence[float], method: str = "blda"
) -> SweepRow:
    """The `method` row ("blda" or "prior") among `taus` with the best `metric` ("miou" or
    "macc"); ties go to the smallest tau (the least adjustment)."""
    check_metric(metric)
    wanted = {float(tau) for tau in taus}
    candidates = [row for row in rows if row.method == method and row.tau in wanted]
    scored = [row for row in candidates if not math.isnan(getattr(row.metrics, metric))]
    if not scored:
        raise BLDAError(f"--metric: {metric} is undefined for every tau (no labelled pixels?)")
    return max(scored, key=lambda row: (getattr(row.metrics, metric), -row.tau))


def sweep_table(rows: Sequence[SweepRow], class_names: Sequence[str]) -> tuple[list, list]:
    """Columns and rows of sweep.csv (metrics as fractions in [0, 1])."""
    columns = ["tau", "method", "miou", "macc", "iou_std", "acc_std"]
    columns += [f"iou_{name}" for name in class_names] + [f"acc_{name}" for name in class_names]
    table = []
    for row in rows:
        scores = row.metrics
        table.append(
            [row.tau, row.method, scores.miou, scores.macc, scores.iou_std, scores.acc_std]
            + list(scores.iou)
            + list(scores.acc)
        )
    return columns, table
