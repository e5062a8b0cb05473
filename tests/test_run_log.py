"""A training log cut short or edited by hand: the resume and plot-log read what they can and
name the line they cannot."""

from __future__ import annotations

import json

import pytest

from blda_tools.errors import BLDAError
from blda_tools.training.run_log import JsonlLog, curve_records, read_log

RECORDS = [{"kind": "train", "iteration": i, "losses": {"ce": 1.0 / i}} for i in (1, 2, 3)]


def write(path, text: str) -> None:
    path.mkdir(exist_ok=True)
    (path / "log.jsonl").write_text(text)


def test_a_record_cut_short_at_the_end_is_dropped_and_resume_rewrites_the_log(tmp_path):
    lines = "".join(json.dumps(record) + "\n" for record in RECORDS)
    write(tmp_path, lines + '{"kind": "tra')  # a full disk stopped the write mid-line
    assert read_log(tmp_path) == RECORDS
    JsonlLog(tmp_path).truncate_after(2)  # what --resume from iteration 2 does
    assert (tmp_path / "log.jsonl").read_text() == "".join(
        json.dumps(record) + "\n" for record in RECORDS[:2]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"kind": "tra\n{"kind": "train", "iteration": 2}\n', r"log.jsonl:1: not a JSON line"),
        ('{"kind": "train", "iteration": 1}\n{"kind": "tr\n', r"log.jsonl:2: not a JSON line"),
        ("[1, 2]\n", r"log.jsonl:1: expected a record"),
        ('{"kind": "train", "iteration": "x"}\n', r"log.jsonl:1: expected a record"),
        # without an iteration plot-log raised KeyError
        ('{"kind": "train", "losses": {"source": 1.0}}\n', r"log.jsonl:1: expected a record"),
        ('{"kind": "eval", "iteration": true}\n', r"log.jsonl:1: expected a record"),
    ],
)
def test_lines_that_are_not_records_are_named(tmp_path, text, message):
    write(tmp_path, text)  # a broken line that ends with its newline was not cut short
    with pytest.raises(BLDAError, match=message):
        read_log(tmp_path)


def test_curves_refuse_values_that_are_not_numbers():
    records = [{"kind": "train", "iteration": 4, "losses": {"ce": "high"}}]
    with pytest.raises(BLDAError, match="iteration 4: loss_ce is 'high', expected a number"):
        curve_records(records)
    evaluation = [{"kind": "eval", "iteration": 5, "mIoU": 40.0, "mAcc": 50.0}]
    assert curve_records(evaluation) == [{"iteration": 5, "miou": 0.4, "macc": 0.5}]


def test_the_last_progress_line_shows_the_final_evaluation(capsys, monkeypatch):
    from blda_tools.training.run_log import LiveView

    monkeypatch.setenv("BLDA_PROGRESS_INTERVAL", "0")  # a line per update
    view = LiveView(total=20, start=0, enabled=True)
    view.update(10, {"ce": 0.5})
    view.evaluated(3.1)
    view.update(20, {"ce": 0.25})  # the line of the last iteration, before its evaluation
    view.evaluated(8.99)
    view.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[-2].endswith("ce 0.250  mIoU 3.1")
    assert lines[-1].startswith("train: 20/20 it") and lines[-1].endswith("ce 0.250  mIoU 9.0")


@pytest.mark.parametrize(
    ("iteration", "interval", "iterations", "said"),
    [(3, 500, 200, "the first is written at iteration 200"),
     (3, 5, 200, "the first is written at iteration 5"),
     (5, 5, 200, "stopped before the checkpoint of iteration 5 was written")],
)  # fmt: skip
def test_an_interrupt_before_any_checkpoint_says_when_the_first_comes(
    tmp_path, iteration, interval, iterations, said
):
    from types import SimpleNamespace

    from blda_tools.training.run_loop import _interrupted_message

    run = SimpleNamespace(checkpoint_interval=interval, iterations=iterations)
    trainer = SimpleNamespace(
        iteration=iteration, config=SimpleNamespace(run=run), run_dir=tmp_path
    )
    message = _interrupted_message(trainer, None)
    assert f"interrupted at iteration {iteration}: no checkpoint yet ({said})" in message


def test_plot_log_names_the_log_file_of_a_bad_record(tmp_path):
    from blda_tools.training.run_log import plot_log

    record = {"kind": "train", "iteration": 1, "losses": {"source": "high"}}
    write(tmp_path / "run", json.dumps(record) + "\n")
    with pytest.raises(BLDAError) as caught:
        plot_log(tmp_path / "run")
    assert str(caught.value).startswith(
        f"{tmp_path / 'run' / 'log.jsonl'}: the record of iteration 1"
    )
    assert not (tmp_path / "run" / "training_curves.png").exists()


def test_a_log_path_that_is_a_folder_is_named_as_given(tmp_path):
    # read as RUN_DIR: "log.jsonl/log.jsonl: no training log"
    (tmp_path / "log.jsonl").mkdir()
    with pytest.raises(BLDAError, match=r"log\.jsonl: a folder; expected the training log file"):
        read_log(tmp_path / "log.jsonl")
