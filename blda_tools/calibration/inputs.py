"""The inputs of `blda calibrate`, opened and checked before any long pass: every store and
statistics file named with the option it came from, classes compared with the evaluated stores
(only the names that differ are reported), labels present where they are needed.

`--fit-on` and `--anchor-from` take logit stores, or statistics files written by
`blda diagnose` (`statistics.h5`), whose pass over the data is then skipped: their histogram
grid must be calibrate's `--grid`, and for `--fit-on` their rows must be what `--fit-labels`
asks for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py

from blda_tools.calibration.alignment import anchor_class
from blda_tools.calibration.calibrator import Calibrator, check_tau
from blda_tools.calibration.sweep import MAX_TAUS, check_metric, parse_tau_spec
from blda_tools.errors import BLDAError, check_same_classes
from blda_tools.statistics import LogitGrid, LogitSetStatistics, collect_statistics
from blda_tools.statistics.evaluation_classes import evaluation_classes
from blda_tools.statistics.io import FORMAT_NAME as STATISTICS_FORMAT
from blda_tools.store import LogitStore

Paths = str | os.PathLike | Sequence[str | os.PathLike]


def as_paths(paths: Paths) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def open_store(paths: Paths, option: str) -> LogitStore:
    """`LogitStore(paths)`, with any error prefixed by the option the paths came from."""
    try:
        return LogitStore(paths)
    except BLDAError as error:
        raise BLDAError(f"{option} {error}") from None


def is_statistics_file(path: Path) -> bool:
    """True for a statistics file written by `LogitSetStatistics.save` (`blda diagnose`)."""
    try:
        with h5py.File(path, "r") as file:
            return file.attrs.get("format") == STATISTICS_FORMAT
    except (OSError, ValueError):
        return False


@dataclass
class StatisticsSource:
    """Statistics `calibrate` needs (`--fit-on`, `--anchor-from`): a store to stream, or
    statistics already saved (`saved`)."""

    option: str
    store: LogitStore | None
    saved: LogitSetStatistics | None

    @property
    def rows(self) -> int:
        """Rows the pass over this source will stream (0 when the statistics are saved)."""
        return self.store.num_rows if self.store is not None else 0

    @property
    def paths(self) -> list[str]:
        if self.store is not None:
            return [str(path) for path in self.store.paths]
        return list(self.saved.stores or ())

    @property
    def has_labels(self) -> bool:
        if self.store is not None:
            return self.store.has_labels
        return self.saved.label_source == "gt"

    def statistics(self, labels: str, grid: LogitGrid, progress: Callable | None):
        if self.saved is not None:
            return self.saved
        return collect_statistics(self.store, labels=labels, grid=grid, progress=progress)


def statistics_source(
    paths: Paths, option: str, class_names: Sequence[str], grid: LogitGrid, labels: str | None
) -> StatisticsSource:
    """Open `paths` (stores, or statistics files) for `option` and check them against the
    evaluated stores' `class_names`, the `grid` and the rows `labels` ("gt", "pseudo", or None
    for any)."""
    paths = as_paths(paths)
    kinds = [is_statistics_file(path) for path in paths]
    if not any(kinds):
        store = open_store(paths, option)
        check_same_classes(class_names, store.class_names, option, ("STORES", option))
        if labels == "gt" and not store.has_labels:
            raise BLDAError(
                f"{option} {', '.join(map(str, paths))}: --fit-labels gt, but the store has no "
                "ground-truth labels; use --fit-labels pseudo"
            )
        if labels == "gt" and not store.has_labelled_pixel():
            raise BLDAError(
                f"{option} {', '.join(map(str, paths))}: --fit-labels gt, but every label is "
                f"the ignore index {store.ignore_index}; use --fit-labels pseudo"
            )
        return StatisticsSource(option, store, None)
    if not all(kinds):
        raise BLDAError(
            f"{option}: give logit stores or statistics files (statistics.h5), not both"
        )
    if len({Path(path).resolve() for path in paths}) != len(paths):  # as for store shards
        raise BLDAError(f"{option}: a statistics file is listed twice in {[str(p) for p in paths]}")
    saved = None
    for path in paths:
        statistics = LogitSetStatistics.load(path)
        _check_saved(statistics, path, option, class_names, grid, labels)
        saved = statistics if saved is None else saved.merge(statistics)
    return StatisticsSource(option, None, saved)


def _check_saved(statistics, path, option, class_names, grid, labels) -> None:
    where = f"{option} {path}"
    if statistics.class_names is None:
        if statistics.num_classes != len(class_names):
            raise BLDAError(
                f"{where}: {statistics.num_classes} classes, the evaluated stores have "
                f"{len(class_names)}"
            )
    else:
        check_same_classes(class_names, statistics.class_names, where, ("STORES", option))
    if statistics.grid != grid:
        found = statistics.grid
        raise BLDAError(
            f"{where}: statistics on the grid {found.low:g}:{found.high:g}:{found.bins}, but "
            f"--grid is {grid.low:g}:{grid.high:g}:{grid.bins}; pass --grid "
            f"{found.low:g}:{found.high:g}:{found.bins} or the stores themselves"
        )
    if labels is None:
        return
    if statistics.label_source is None:
        raise BLDAError(
            f"{where}: the file does not record whether its rows are ground truth or "
            "pseudo-labels (written by an older blda); run `blda diagnose` again, or pass the "
            "stores"
        )
    if statistics.label_source != labels:
        choice = "gt" if statistics.label_source == "gt" else "pseudo"
        raise BLDAError(
            f"{where}: its rows are {_rows(statistics.label_source)} but --fit-labels is "
            f"{labels}; pass --fit-labels {choice}, or run `blda diagnose --labels {labels}`"
        )


def _rows(source: str) -> str:
    return "ground truth" if source == "gt" else "pseudo-labels (argmax)"


def open_held_out(paths: Paths, class_names: Sequence[str]) -> LogitStore:
    """The `--select-on` stores: same classes as the evaluated stores, and labelled."""
    store = open_store(paths, "--select-on")
    check_same_classes(class_names, store.class_names, "--select-on", ("STORES", "--select-on"))
    if not store.has_labelled_pixel():  # no labels, or every label the ignore index
        raise BLDAError(
            f"--select-on {', '.join(map(str, store.paths))}: no ground-truth labels to choose "
            "tau with (every pixel unlabelled or ignored); give a labelled held-out store"
        )
    return store


# The calibrate defaults that its checks refer to (`CalibrateOptions` holds them).
DEFAULT_TAUS, DEFAULT_COMPONENTS = "0:1:0.1", 5
FIT_LABELS = ("gt", "pseudo")


@dataclass
class CalibrationInputs:
    """Every input of `calibrate`, opened and checked (`open_inputs`) before any pass."""

    taus: list[float]
    calibrator: Calibrator  # not fitted yet: its options are checked
    evaluated: LogitStore
    fit: StatisticsSource
    anchors: StatisticsSource | None
    held_out: LogitStore | None
    # Whether the evaluated stores hold a pixel whose label is not the ignore index: only
    # then are there metrics to report (a labels dataset of 255s has none).
    evaluated_labelled: bool
    averaged: tuple[int, ...] = ()  # the classes mIoU / mAcc average over (all if empty)

    def rows(self) -> int:
        """Rows `calibrate` will stream in all (for a progress bar's total)."""
        evaluated = self.evaluated
        # A sweep of the evaluated stores needs their labels; the before/after pass always runs.
        passes = 2 if self.evaluated_labelled else 1
        total = self.fit.rows + passes * evaluated.num_rows
        total += self.anchors.rows if self.anchors is not None else 0
        return total + (self.held_out.num_rows if self.held_out is not None else 0)


def open_inputs(stores: Paths, options) -> CalibrationInputs:
    """Open and check every store and statistics file, naming the option each came from;
    `options` is a `blda_tools.calibrate.CalibrateOptions`."""
    taus = _taus(options.taus)
    if len(taus) == 1 and options.select_on:
        raise BLDAError(
            f"--select-on and --tau {options.taus}: one tau leaves nothing to choose; give "
            "several values (0:1:0.1) or leave --select-on out"
        )
    if options.estimator != "gmm" and options.n_components != DEFAULT_COMPONENTS:
        raise BLDAError(
            f"n_components={options.n_components} and estimator={options.estimator!r}: "
            "components are those of a Gaussian mixture (estimator 'gmm')"
        )
    if options.fit_labels not in FIT_LABELS:
        raise BLDAError(f"--fit-labels: expected gt or pseudo, got {options.fit_labels!r}")
    calibrator = Calibrator(
        options.estimator,
        options.n_components,
        options.eps,
        options.min_samples,
        options.table_points,
        options.anchor,
    )
    evaluated = open_store(stores, "STORES")
    names, grid = evaluated.class_names, options.grid
    anchor_class(options.anchor, names)
    if options.fit_on:
        fit = statistics_source(options.fit_on, "--fit-on", names, grid, options.fit_labels)
    else:
        fit = statistics_source(
            stores, "--fit-on (default: STORES)", names, grid, options.fit_labels
        )
    anchors = None
    if options.anchor_from:
        anchors = statistics_source(options.anchor_from, "--anchor-from", names, grid, None)
    if options.metric is not None:
        check_metric(options.metric)
        if len(taus) == 1:
            raise BLDAError(
                f"--metric {options.metric} and --tau {options.taus}: one tau leaves nothing to "
                "choose; give several values (0:1:0.1) or leave --metric out"
            )
    held_out = open_held_out(options.select_on, names) if options.select_on else None
    labelled = evaluated.has_labelled_pixel()
    if held_out is None and len(taus) > 1 and not labelled:
        default = " (the default when fitting)" if options.taus == DEFAULT_TAUS else ""
        none = "no labels" if not evaluated.has_labels else "no labelled pixel (all ignored)"
        raise BLDAError(
            f"--tau {options.taus}{default}: several values, but STORES have {none} to "
            "choose among them: give --select-on STORE with ground truth, or one --tau value"
        )
    averaged = evaluation_classes(options.eval_classes, evaluated.class_names)
    return CalibrationInputs(
        taus, calibrator, evaluated, fit, anchors, held_out, labelled, averaged
    )


def _taus(spec) -> list[float]:
    """`CalibrateOptions.taus` (a spec or a sequence of numbers) -> sorted unique taus."""
    if isinstance(spec, str):
        return parse_tau_spec(spec)
    if isinstance(spec, int | float):
        return parse_tau_spec(str(spec))
    try:
        values = list(spec)
    except TypeError:
        raise BLDAError(
            f"taus: expected a spec (0:1:0.1) or a sequence of numbers, got {spec!r}"
        ) from None
    if not values or len(values) > MAX_TAUS:
        raise BLDAError(f"taus: {len(values)} values; expected 1 to {MAX_TAUS}")
    # each checked as a number: float() made True a tau of 1.0 and "0.5" a tau
    return sorted({check_tau(tau, "taus") for tau in values})
