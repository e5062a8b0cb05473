"""What the reports say: every column explained, balanced classes apart, no "-0.0", ordinals,
the next command with the user's paths, tau = 0 said plainly, and the prior-adjustment
baseline at its own best tau (issue 16, section 4). Hand-worked small cases."""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from blda_tools.calibrate import CalibrateOptions, CalibrationResult, _describe_choice, calibrate
from blda_tools.calibration.sweep import SweepRow, select_tau
from blda_tools.demo import _every
from blda_tools.diagnose import CLASS_TABLE_FORMATS, diagnose
from blda_tools.report import explain
from blda_tools.report.html import _cell, format_value, ordinal, without_negative_zero
from blda_tools.store import LogitWriter

NAMES = ["a", "b", "c", "d"]
# Rows: true class, columns: predicted class. P(l | c) averaged over the 4 rows minus 1/4:
# a: 0.8/4 - 1/4 = -0.05, b: 1.2/4 - 1/4 = +0.05, c and d: exactly 0.
CONFUSION = np.array([[8, 2, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]])


def _hand_store(path):
    labels, predictions = [], []
    for true, row in enumerate(CONFUSION):
        for predicted, count in enumerate(row):
            labels += [true] * count
            predictions += [predicted] * count
    logits = np.zeros((len(labels), 4), dtype=np.float32)
    logits[np.arange(len(labels)), predictions] = 5.0  # argmax = the prediction
    with LogitWriter(path, NAMES) as writer:
        writer.add(logits, np.array(labels), name="hand")
    return path


def test_numbers_that_round_to_zero_carry_no_sign_and_no_colour():
    assert format_value(-1e-9, ".3f") == "0.000"
    assert format_value(-0.00004, "+.4f") == "0.0000"
    assert format_value(0.0, "+.4f") == "0.0000"
    assert format_value(-0.00001, ".1%") == "0.0%"
    assert format_value(-0.25, "+.2f") == "-0.25" and format_value(0.01, "+.2f") == "+0.01"
    assert without_negative_zero("-0.0") == "0.0" and without_negative_zero("-10.0") == "-10.0"
    assert _cell(-0.00001, ".1%", ".3f", True, True) == '<td class="num">0.0%</td>'
    assert _cell(-0.012, ".1%", ".3f", True, True) == '<td class="num bad">-1.2%</td>'
    assert _cell(0.012, ".1%", ".3f", True, True) == '<td class="num good">+1.2%</td>'


def test_ordinals():
    expected = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th",
                21: "21st", 22: "22nd", 23: "23rd", 100: "100th", 101: "101st", 111: "111th"}  # fmt: skip
    assert {n: ordinal(n) for n in expected} == expected
    # The demo's sentence: "every 2nd pixel" (it read "every 2th pixel"), "every pixel".
    assert _every(2) == "2nd pixel" and _every(1) == "pixel" and _every(3) == "3rd pixel"


def test_bias_findings_group_small_biases_as_balanced():
    sentences = explain.bias_findings(
        ["a", "b", "c", "d", "e"], [0.2, -0.1, 0.001, -0.001, 0.05], 0.01, "Eq. 4"
    )
    assert sentences == [
        "2 classes are over-predicted (Eq. 4): a (+0.200), e (+0.050).",
        "1 class is under-predicted (Eq. 4): b (-0.100).",
        "2 classes are balanced: c, d.",
    ]


def test_diagnose_report_explains_columns_groups_and_the_next_command(tmp_path):
    store = _hand_store(tmp_path / "val.h5")
    out = tmp_path / "diagnosis"
    result = diagnose(store, out)
    np.testing.assert_allclose(result.bias, [-0.05, 0.05, 0.0, 0.0], atol=1e-12)
    assert result.balanced_tolerance == pytest.approx(0.1 / 4)
    groups = {name: group["classes"] for name, group in result.groups.items()}
    assert groups == {"over": ["b"], "under": ["a"], "balanced": ["c", "d"]}

    page = html.unescape((out / "report.html").read_text())
    summary = [column for column in explain.SUMMARY_COLUMNS if column != "predictions"]
    for column in [*CLASS_TABLE_FORMATS, *explain.GROUP_COLUMNS, *summary]:
        assert f"<dt>{column}</dt><dd>" in page, column
    assert "|Bias| <= 0.0250 (a tenth of the uniform share 1/C = 1/4)" in page
    assert "<td>balanced</td><td>c, d</td>" in page
    # Bias exactly 0 is shown unsigned, never as "-0.0000" or "+0.0000".
    assert re.findall(r"[+-]0\.0000", page) == []
    assert "1 class is over-predicted (Eq. 4, from the ground truth): b (+0.050)." in page
    assert "What this means, what to try next" in page
    assert f"<code>blda calibrate {store} --out {tmp_path / 'calibration'}</code>" in page


def _rows(method, values):
    # select_tau reads only the chosen metric of each row.
    return [SweepRow(tau, method, SimpleNamespace(miou=v, macc=v)) for tau, v in values]


def test_the_prior_baseline_gets_its_own_best_tau():
    rows = [
        *_rows("blda", [(0.0, 0.6), (0.5, 0.7), (1.0, 0.65)]),
        *_rows("prior", [(0.0, 0.6), (0.5, 0.62), (1.0, 0.68)]),
    ]
    assert select_tau(rows, "miou", [0.0, 0.5, 1.0]).tau == 0.5
    assert select_tau(rows, "miou", [0.0, 0.5, 1.0], method="prior").tau == 1.0


def _result(chosen, after, prior_tau, prior, how="held-out stores (--select-on)"):
    # mAcc: 0.6 after, 0.7 for the baseline, whatever the mIoU.
    return CalibrationResult(
        classes=NAMES, chosen_tau=chosen, selection={"how": how, "metric": "miou"},
        warnings=[], before={"miou": 0.4}, after={"miou": after, "macc": 0.6}, js={},
        unadjusted_cells=[], fit={},
        prior_baseline={"tau": prior_tau, "miou": prior, "macc": 0.7},
    )  # fmt: skip


def test_the_summary_says_which_method_is_better_at_each_ones_best_tau():
    worse = _result(0.3, 0.50, 0.7, 0.55)
    _describe_choice(worse)
    assert worse.notes == [
        "On the evaluated stores the prior-adjustment baseline does better on mIoU than BLDA: mIoU "
        "50.0% at tau = 0.3 against 55.0% at its own best tau = 0.7 (-5.0 points); mAcc 60.0% "
        "against 70.0%."
    ]
    better = _result(0.3, 0.52, 0.6, 0.50)
    _describe_choice(better)
    assert (
        "BLDA does better on mIoU than the prior-adjustment baseline: mIoU 52.0%" in better.notes[0]
    )
    unchanged = _result(0.0, 0.52, 0.6, 0.50)
    _describe_choice(unchanged)
    assert unchanged.notes[1].startswith(
        "On the evaluated stores the uncalibrated model (BLDA's tau = 0) does better on mIoU "
        "than the prior-adjustment baseline: mIoU 52.0% at tau = 0 against 50.0%"
    )


def test_the_points_between_the_two_figures_are_those_of_the_figures_shown():
    """The gap is that of the two figures as printed (to 0.1 point): for 43.49% against
    42.45% the unrounded gap, +1.04, printed +1.0 beside figures 1.1 points apart."""
    close = _result(0.3, 0.4349, 0.6, 0.4245)
    _describe_choice(close)
    note = close.notes[0]
    shown = re.search(
        r"mIoU (\d+\.\d)% at tau = 0.3 against (\d+\.\d)%.*\(([+-]\d+\.\d) points\)", note
    )
    after, baseline, points = (float(value) for value in shown.groups())
    assert points == pytest.approx(after - baseline, abs=1e-9)


def test_tau_zero_is_said_plainly():
    chosen = _result(0.0, 0.4, 0.0, 0.4)
    _describe_choice(chosen)
    assert chosen.notes[0].startswith(
        "tau = 0 was chosen: no tau of the sweep did better than the uncalibrated model on the "
        "held-out stores (--select-on), so this calibrator changes nothing"
    )
    given = _result(0.0, 0.4, 0.0, 0.4, how="given (--tau with one value)")
    _describe_choice(given)
    assert given.notes[0] == (
        "tau = 0 was given: this calibrator changes nothing (its predictions are the argmax of "
        "the logits)."
    )


def test_calibrate_on_a_perfect_model_chooses_tau_zero_and_says_so(tmp_path):
    # Every pixel predicted right: no tau can do better, ties go to the smallest tau (0).
    labels = np.repeat(np.arange(4), 30)
    logits = np.zeros((120, 4), dtype=np.float32)
    logits[np.arange(120), labels] = 5.0
    with LogitWriter(tmp_path / "perfect.h5", NAMES) as writer:
        writer.add(logits, labels, name="perfect")
    # every cell holds 30 logits: offsets with --min-samples 10 (none with the default 100)
    options = CalibrateOptions(
        taus="0:1:0.5", select_on=tmp_path / "perfect.h5", min_samples=10, plots=False
    )
    result = calibrate(tmp_path / "perfect.h5", tmp_path / "out", options)
    assert result.chosen_tau == 0.0
    assert result.notes[0].startswith("tau = 0 was chosen")
    saved = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert saved["notes"] == result.notes
    assert saved["prior_baseline"]["tau"] == 0.0


def test_after_diagnosing_unlabelled_stores_the_suggested_calibrations_can_run():
    from blda_tools.report.explain import after_diagnose

    lines = after_diagnose(["target.h5"], "diagnosis", has_labels=False)
    # without labels a sweep needs a held-out labelled store, or one tau is given
    assert all("--select-on" in line or "--tau 0.5" in line for line in lines), lines
    labelled = after_diagnose(["val.h5"], "diagnosis", has_labels=True)
    assert labelled[0] == "blda calibrate val.h5 --out calibration"


def test_with_one_tau_given_the_baseline_is_compared_at_that_tau():
    given = _result(1.5, 0.50, 1.5, 0.55, how="given (--tau with one value)")
    _describe_choice(given)
    assert "against 55.0% at the same tau = 1.5" in given.notes[-1]
    assert "own best" not in given.notes[-1]


def test_the_rank_agreement_gives_the_correlation_to_three_decimals_as_every_table():
    from blda_tools.report.explain import rank_agreement

    assert "(Spearman 0.996)" in rank_agreement(0.9962)  # not a rounded "1.00"
    assert "(Spearman 0.412)" in rank_agreement(0.4121)
