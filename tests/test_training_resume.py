"""`blda train --resume` beyond the exact continuation (test_training_loop.py): a finished run,
failures after a checkpoint, a damaged log or checkpoint, and failed evaluations kept for
resuming. The small in-memory data and net come from test_training_loop.py."""

from __future__ import annotations

import pytest
import torch
from test_training_loop import UnreadableVal, _state, components, small_config

from blda_tools.errors import BLDAError
from blda_tools.training import run_training
from blda_tools.training.run_log import read_log

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resuming_a_finished_run_changes_nothing_and_reports_its_scores(tmp_path, caplog):
    # It ran the probe evaluation, rewrote the log and reported no scores.
    config = small_config("run.iterations=4", "evaluation.interval=0")
    finished = run_training(config, tmp_path, components())
    log_before = (tmp_path / "log.jsonl").read_bytes()
    with caplog.at_level("INFO", logger="blda_tools"):
        again = run_training(config, tmp_path, components(), resume=True)
    assert "already finished at iteration 4 of 4; nothing to resume" in caplog.text
    assert again["last_scores"] == finished["last_scores"] is not None
    assert again["iteration"] == 4 and again["best_miou"] == finished["best_miou"]
    assert (tmp_path / "log.jsonl").read_bytes() == log_before


def test_a_run_stopped_by_a_failure_after_a_checkpoint_says_it_is_kept(tmp_path, monkeypatch):
    # A full disk at a later checkpoint gave one correct line without the way to go on.
    import blda_tools.training.run_loop as run_loop_module

    real_save, calls = run_loop_module.save_checkpoint, []

    def save_then_fill_the_disk(path, checkpoint):
        calls.append(checkpoint["meta"]["iteration"])
        if len(calls) > 1:
            raise BLDAError(f"{path}: cannot write: No space left on device")
        real_save(path, checkpoint)

    monkeypatch.setattr(run_loop_module, "save_checkpoint", save_then_fill_the_disk)
    config = small_config("run.iterations=4", "run.checkpoint_interval=2", "evaluation.interval=0")
    with pytest.raises(BLDAError) as caught:
        run_training(config, tmp_path, components())
    latest = tmp_path / "checkpoints" / "latest.pth"
    assert str(caught.value) == (
        f"{latest}: cannot write: No space left on device; {latest} (iteration 2) is kept: fix "
        "the cause and continue with the same train command and --resume"
    )
    assert _state(tmp_path)["meta"]["iteration"] == 2


def test_a_damaged_log_is_found_before_the_resumed_run_evaluates(tmp_path, monkeypatch):
    # found only after the probe evaluation, with no advice
    config = small_config("run.iterations=4", "evaluation.interval=0")
    run_training(config, tmp_path, components(), stop_at=2)
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write("{broken\n")
    monkeypatch.setattr(
        "blda_tools.training.runner.check_evaluation",
        lambda *a: pytest.fail("the probe evaluation ran first"),
    )
    with pytest.raises(
        BLDAError, match=r"log.jsonl:\d+: not a JSON line; --resume keeps .* fix or"
    ):
        run_training(config, tmp_path, components(), resume=True)


def _damaged(state: dict, part: str) -> dict:
    if part == "weights":  # as a checkpoint of another architecture is
        state["state_dict"] = dict(list(state["state_dict"].items())[3:])
    elif part == "optimizer":  # as another loss's parameter groups are
        state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    elif part == "iteration text":
        state["meta"]["iteration"] = "x"
    elif part == "rng":
        state["rng"] = {}
    elif part == "iteration beyond":
        state["meta"]["iteration"] = 100
    return state


@pytest.mark.parametrize(
    "part", ["weights", "optimizer", "iteration text", "rng", "iteration beyond"]
)
def test_resuming_from_a_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path, part):
    # Each raised from torch's or Python's loaders (RuntimeError, ValueError, KeyError) with a
    # traceback; an iteration beyond the run "finished" at once (helper's probe).
    config = small_config("run.iterations=4", "evaluation.interval=0")
    run_training(config, tmp_path, components(), stop_at=2)
    latest = tmp_path / "checkpoints" / "latest.pth"
    torch.save(_damaged(_state(tmp_path), part), latest)
    with pytest.raises(BLDAError) as caught:
        run_training(config, tmp_path, components(), resume=True)
    message = str(caught.value)
    assert message.startswith(f"{latest}: ") and "\n" not in message, message
    expected = "outside this run's 0 to 4" if part == "iteration beyond" else "does not fit"
    assert expected in message, message


def test_a_failed_evaluation_keeps_the_training_so_far_and_resume_ends_as_a_whole_run(tmp_path):
    # Evaluation and the first checkpoint are due at the same iteration, as in the paper
    # configs; the run was removed as one that failed before its first checkpoint.
    config = small_config("run.iterations=8", "evaluation.interval=4", "run.checkpoint_interval=8")
    broken = components()
    broken.val = UnreadableVal(3, shift=40, seed=2)
    latest = tmp_path / "split" / "checkpoints" / "latest.pth"
    with pytest.raises(BLDAError) as caught:
        run_training(config, tmp_path / "split", broken)
    assert str(caught.value) == (
        "val/2.png: cannot read image (truncated); the evaluation at iteration 4 failed, the "
        f"training so far is kept in {latest}: fix the cause and continue with the same train "
        "command and --resume"
    )
    assert _state(tmp_path / "split")["meta"]["iteration"] == 4
    resumed = run_training(config, tmp_path / "split", components(), resume=True)
    whole = run_training(config, tmp_path / "whole", components())
    assert resumed["iteration"] == whole["iteration"] == 8
    one, two = _state(tmp_path / "whole"), _state(tmp_path / "split")
    for key, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][key]), key
    assert resumed["last_scores"] == whole["last_scores"]
    # The evaluation that failed is run first on resume: the logs and best.pth agree too.
    evaluations = [
        (r["iteration"], r["mIoU"]) for r in read_log(tmp_path / "split") if r["kind"] == "eval"
    ]
    assert evaluations == [
        (r["iteration"], r["mIoU"]) for r in read_log(tmp_path / "whole") if r["kind"] == "eval"
    ]
    assert [i for i, _ in evaluations] == [4, 8]
    best = [torch.load(p / "checkpoints" / "best.pth", weights_only=True) for p in
            (tmp_path / "whole", tmp_path / "split")]  # fmt: skip
    assert best[0]["meta"]["iteration"] == best[1]["meta"]["iteration"]
    assert "evaluation_pending" not in _state(tmp_path / "split")["meta"]


def test_a_failed_final_evaluation_is_run_on_resume(tmp_path):
    config = small_config("run.iterations=4", "evaluation.interval=0")
    broken = components()
    broken.val = UnreadableVal(3, shift=40, seed=2)
    with pytest.raises(BLDAError, match="the evaluation at iteration 4 failed"):
        run_training(config, tmp_path, broken)
    resumed = run_training(config, tmp_path, components(), resume=True)
    assert resumed["iteration"] == 4 and resumed["last_scores"] is not None
    assert [r["iteration"] for r in read_log(tmp_path) if r["kind"] == "eval"] == [4]
    assert "evaluation_pending" not in _state(tmp_path)["meta"]  # rewritten after it ran
