"""Library callers get a BLDAError naming the argument, never a TypeError, an AttributeError
or a silent NaN, for the inputs a new user tried: wrong types, NaN, values float32 cannot
hold, devices this machine lacks, indices outside a store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blda_tools.calibration.calibrator import Calibrator
from blda_tools.errors import BLDAError
from blda_tools.gmm import GaussianMixture1D
from blda_tools.online import BLDALoss
from blda_tools.statistics import LogitGrid, LogitSetStatistics
from blda_tools.statistics.metrics import (
    bias_from_histograms,
    prediction_probabilities_from_histograms,
)
from blda_tools.store import LogitStore, LogitWriter


def _run_demo(**options):
    from blda_tools.demo import run_demo

    return run_demo("never-written", **options)


def _check_tau(tau):
    from blda_tools.calibration.calibrator import check_tau

    return check_tau(tau)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Calibrator(eps="a"), "--eps: expected a number, got 'a'"),
        (lambda: Calibrator(n_components="a"), "--components: expected an integer, got 'a'"),
        (lambda: Calibrator(min_samples=None), "--min-samples: expected an integer, got None"),
        (lambda: Calibrator().fit(np.zeros((3, 3))), "fit: statistics must be LogitSetStatistics"),
        (lambda: BLDALoss(3, momentum="a"), "momentum: expected a number, got 'a'"),
        (lambda: BLDALoss(3, eps=None), "eps: expected a number, got None"),
        (lambda: BLDALoss("x"), "num_classes: expected an integer, got 'x'"),
        (lambda: LogitSetStatistics("3"), "num_classes: expected an integer, got '3'"),
        (lambda: LogitGrid(0, 1, "3"), "--grid: BINS: expected an integer, got '3'"),
        (lambda: LogitGrid("a", 1, 3), "--grid: LOW: expected a number, got 'a'"),
        (lambda: GaussianMixture1D("a"), "n_components: expected an integer, got 'a'"),
        (lambda: GaussianMixture1D(2, device="bogus"), "device: 'bogus' is not a device"),
        (lambda: GaussianMixture1D(2).momentum_update(GaussianMixture1D(2), float("nan")),
         "momentum: expected values in \\[0, 1\\]"),
        (lambda: LogitStore(None), "logit store: expected a path or a list of paths, got None"),
        (lambda: LogitStore([3]), "logit store: expected a path or a list of paths, got \\[3\\]"),
        (lambda: _run_demo(threads=0), "threads: expected None or an integer >= 1, got 0"),
        (lambda: _check_tau("0.3"), "--tau: expected a number, got '0.3'"),
        (lambda: _check_tau(1e39), "--tau: expected a tau of at most 10000"),
        (lambda: GaussianMixture1D(2).inverse_cdf(torch.tensor([float("nan"), 0.5])),
         "p: expected probabilities, got NaN"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(build, message):
    with pytest.raises(BLDAError, match=message):
        build()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_device_this_machine_lacks_is_named():
    with pytest.raises(BLDAError, match="device cuda: CUDA is not available"):
        GaussianMixture1D(2, device="cuda")


def test_a_grid_given_as_low_high_bins_works_for_the_statistics_too():
    assert LogitSetStatistics(3, grid=(-1, 1, 10)).grid == LogitGrid(-1.0, 1.0, 10)


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_eq5_refuses_histograms_that_are_not_counts(bad):
    histogram = np.ones((2, 2, 4))
    histogram[0, 1, 2] = bad
    for function in (prediction_probabilities_from_histograms, bias_from_histograms):
        with pytest.raises(BLDAError, match="histogram: counts must be finite and non-negative"):
            function(histogram)


def test_float64_logits_beyond_float32_are_told_as_such():
    huge = np.array([[1e300, 0.0, 0.0]])
    with pytest.raises(BLDAError, match="finite values up to 1e\\+300 lie beyond the float32"):
        LogitSetStatistics(3).update(huge, np.array([0]))
    statistics = LogitSetStatistics(3, LogitGrid(-5, 5, 50))
    statistics.update(np.random.default_rng(0).normal(size=(60, 3)), np.arange(60) % 3)
    calibrator = Calibrator("empirical", min_samples=1).fit(statistics)
    with pytest.raises(BLDAError, match="beyond the float32 range"):
        calibrator.predict(torch.tensor(huge), tau=0.5)
    with pytest.raises(BLDAError, match="threads: expected None or an integer >= 1, got -3"):
        calibrator.predict(torch.zeros(2, 3), 0.5, -3)


def test_an_image_outside_the_store_is_named(tmp_path):
    with LogitWriter(tmp_path / "s.h5", ["a", "b"]) as writer:
        writer.add(torch.zeros(2, 3, 3), name="only")
    with LogitStore(tmp_path / "s.h5") as store, pytest.raises(BLDAError, match="no image 99"):
        store.read_image(99)


def _api_calls_with_an_empty_output(store):
    from blda_tools.calibrate import calibrate
    from blda_tools.datasets.synthcity.generate import make_synthcity
    from blda_tools.diagnose import diagnose
    from blda_tools.inference.dump import dump_logits
    from blda_tools.training import train

    return {
        "diagnose": lambda: diagnose(store, ""),
        "calibrate": lambda: calibrate(store, ""),
        "make_synthcity": lambda: make_synthcity("", images=1, size=(32, 64)),
        "dump_logits": lambda: dump_logits(
            "tiny", None, "cityscapes", store.parent, "val", "", random_weights=True
        ),
        "train": lambda: train("synthcity_tiny", "", []),
    }


@pytest.mark.parametrize(
    "call", ["diagnose", "calibrate", "make_synthcity", "dump_logits", "train"]
)
def test_an_empty_output_path_is_refused_not_taken_as_the_current_directory(
    tmp_path, monkeypatch, call
):
    store = tmp_path / "s.h5"
    with LogitWriter(store, ["a", "b", "c"]) as writer:
        writer.add(np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32),
                   np.zeros(50, np.int64), name="x")  # fmt: skip
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(BLDAError, match="an empty path"):
        _api_calls_with_an_empty_output(store)[call]()
    assert not any(cwd.iterdir())  # nothing written where the user stands


def test_a_fit_takes_the_class_names_of_whichever_statistics_carry_them():
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.standard_normal((3000, 3)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 3, 3000))
    unnamed = LogitSetStatistics(3)
    named = LogitSetStatistics(3, class_names=["road", "car", "sky"])
    for statistics in (unnamed, named):
        statistics.update(logits, labels)
    calibrator = Calibrator(min_samples=10, table_points=64).fit(unnamed, named)
    assert calibrator.class_names == ("road", "car", "sky")
