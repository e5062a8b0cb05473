"""Online BLDA in `blda train`: the Table 4 switches, the CDF regression head, exact resume with
the GMM state, the periodic GMM / JS-divergence report, the shipped *_blda configs.

Truths: hand-written cross-entropy (log-softmax), scipy's norm.pdf and jensenshannon, the base
configs the *_blda ones extend, and what the paper fixes (K, T, m, tau, lambda).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import norm
from test_training_loop import BandsDataset, TwoLayerNet, normalize, small_config

from blda_tools.errors import BLDAError
from blda_tools.online.loss import BLDALoss
from blda_tools.training import build_loss, load_config, run_training
from blda_tools.training.blda_report import anchor_js_divergences
from blda_tools.training.config import to_dict
from blda_tools.training.loop import Trainer, TrainingComponents
from blda_tools.training.losses import WeightedCrossEntropy
from blda_tools.training.run_log import read_log

CLASSES = ("road", "car", "sky")
# Small enough that the 16 x 16 crops of the bands data fit GMMs from the first call.
BLDA = ["loss.name=blda", "loss.blda_min_samples=5", "loss.blda_components=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blda_config(mode: str, *overrides: str):
    return small_config(*BLDA, f'loss.blda_mode="{mode}"', "loss.blda_plot_interval=0", *overrides)


def parts(config) -> TrainingComponents:
    torch.manual_seed(0)
    model = TwoLayerNet()
    model.feature_channels = 8  # what a built-in Segmentor declares for the CDF head
    return TrainingComponents(
        model=model,
        source=BandsDataset(8),
        target=BandsDataset(8, shift=40, seed=1, labels=False),
        val=BandsDataset(3, shift=40, seed=2),
        class_names=CLASSES,
        loss=build_loss("blda", num_classes=3, ignore_index=255, config=config),
        normalize=normalize,
    )


@pytest.mark.parametrize(
    ("switch", "mode", "head"),
    [("none", "none", False), ("ola_source", "ola_source", False), ("ola", "ola", False),
     ("ola+cde", "ola", True)],
)  # fmt: skip
def test_switches_build_the_paper_loss(switch, mode, head):
    config = load_config(None, ["loss.name=blda", f"loss.blda_mode={switch}"])
    loss = build_loss("blda", num_classes=19, ignore_index=255, config=config)
    assert loss.blda.mode == mode and loss.needs_regression_head is head
    blda = loss.blda
    # The paper's hyper-parameters are the schema defaults (Sec. 4.1).
    assert (blda.n_components, blda.em_steps, blda.momentum) == (5, 3, 0.99)
    assert (blda.tau, blda.regression_weight, blda.eps) == (0.1, 0.2, 0.01)
    assert (blda.regression_loss, blda.min_samples, blda.num_classes) == ("l2", 100, 19)


def test_none_is_plain_weighted_cross_entropy_and_ola_is_not():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 7, generator=generator)
    labels = torch.randint(0, 3, (2, 6, 7), generator=generator)
    labels[0, 0] = 255
    weights = torch.rand(2, 6, 7, generator=generator)
    weights[1, :3] = 1.0  # pasted source pixels of a mixed image
    none = build_loss("blda", num_classes=3, ignore_index=255, config=blda_config("none"))
    value = none(logits, labels, weights, "mixed", None)
    assert torch.equal(value, WeightedCrossEntropy()(logits, labels, weights, "mixed", None))
    # By hand: -log softmax at the label, weighted, averaged over every pixel (ignored = 0).
    log_p = logits.log_softmax(1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
    by_hand = torch.where(labels == 255, 0.0, -log_p * weights).mean()
    torch.testing.assert_close(value, by_hand)
    # With statistics fitted, "ola" adjusts the logits: the same batch gives another loss.
    ola = build_loss("blda", num_classes=3, ignore_index=255, config=blda_config("ola"))
    ola(logits, labels, None, "source", None)
    assert bool(ola.blda.anchors.fitted.all())
    assert not torch.allclose(ola(logits, labels, None, "source", None), by_hand, atol=1e-3)


@pytest.mark.parametrize(
    ("override", "named"),
    [('loss.blda_mode="olaa"', "loss.blda_mode"), ("loss.blda_momentum=1.5", "loss.blda_momentum"),
     ("loss.blda_components=0", "loss.blda_components"),
     ("loss.blda_min_samples=3", "loss.blda_min_samples"),
     ('loss.blda_regression_loss="l3"', "loss.blda_regression_loss"),
     ("loss.blda_eps=0.7", "loss.blda_eps"), ("loss.blda_tau=-1", "loss.blda_tau"),
     ("loss.blda_plot_interval=-1", "loss.blda_plot_interval")],
)  # fmt: skip
def test_bad_blda_values_are_refused_naming_the_key(override, named):
    with pytest.raises(BLDAError, match=named.replace(".", r"\.")):
        load_config(None, ["loss.name=blda", override])


def test_blda_keys_for_another_loss_are_refused_not_ignored():
    with pytest.raises(BLDAError, match=r"loss\.blda_tau set but loss\.name is 'cross_entropy'"):
        load_config(None, ["loss.blda_tau=0.2"])


@pytest.mark.parametrize("mode", ["none", "ola_source", "ola", "ola+cde"])
def test_only_ola_cde_trains_a_regression_head(tmp_path, mode):
    config = blda_config(mode)
    trainer = Trainer(config, tmp_path, parts(config), device=torch.device("cpu"))
    batch = next(iter(trainer.micro_batch_loader()))
    losses = trainer.micro_step(batch)
    groups = [g["name"] for g in trainer.optimizer.param_groups]
    if mode != "ola+cde":
        assert trainer.regression_head is None and "regression_head" not in groups
        assert "source_regression" not in losses
        return
    head = trainer.regression_head
    assert head.conv.weight.grad is not None and head.conv.weight.grad.abs().sum() > 0
    assert losses["source_regression"] > 0 and losses["mixed_regression"] >= 0
    group = trainer.optimizer.param_groups[groups.index("regression_head")]
    assert group["initial_lr"] == pytest.approx(1e-3 * 10.0)  # optim.lr x head_lr_mult
    assert {id(p) for p in group["params"]} == {id(p) for p in head.parameters()}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        config = blda_config("ola+cde", "run.batch_size=1", "run.iterations=2")
        trainer = Trainer(config, Path(out_dir) / "grad", parts(config),
                          device=torch.device("cpu"), rank=rank, world_size=2)  # fmt: skip
        losses = trainer.micro_step(trainer.batches[0])
        head = trainer.regression_head.conv
        result = {"weight": head.weight.grad, "bias": head.bias.grad, "source": losses["source"]}
        torch.save(result, Path(out_dir) / f"head_{rank}.pt")
        # A whole run: DDP accepts the head (every parameter gets a gradient every step).
        run_training(config, Path(out_dir) / "run", parts(config))
    finally:
        dist.destroy_process_group()


def test_ddp_reduces_the_regression_head_gradients(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"head_{r}.pt", weights_only=True) for r in (0, 1))
    # The ranks saw different crops (different losses) yet hold one averaged head gradient.
    assert first["source"] != second["source"]
    assert first["weight"].abs().sum() > 0
    assert torch.equal(first["weight"], second["weight"])
    assert torch.equal(first["bias"], second["bias"])
    assert (tmp_path / "run" / "checkpoints" / "latest.pth").is_file()


def _checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints" / "latest.pth", weights_only=True)


def test_resume_with_ola_cde_equals_the_uninterrupted_run(tmp_path):
    # A threshold the untrained teacher reaches, so target pixels get 0 < weight < 1 and the
    # target GMMs are fitted too.
    config = blda_config(
        "ola+cde", "run.iterations=20", "evaluation.interval=0",
        "self_training.pseudo_threshold=0.4",
    )  # fmt: skip
    run_training(config, tmp_path / "whole", parts(config))
    run_training(config, tmp_path / "split", parts(config), stop_at=10)
    run_training(config, tmp_path / "split", parts(config), resume=True)
    one, two = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "split")
    assert two["meta"]["iteration"] == 20
    assert one["state_dict"].keys() == two["state_dict"].keys()
    assert "regression_head.conv.weight" in one["state_dict"]
    for key, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][key]), key
    assert one["loss"].keys() == two["loss"].keys()
    for key, value in one["loss"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, two["loss"][key]), key
    # The state is not trivial: the source GMMs and the anchors were fitted and updated.
    assert bool(one["loss"]["blda.source.fitted"].all())
    assert bool(one["loss"]["blda.target.fitted"].any())
    # once per iteration, from the source call only (the mixed call feeds the target set)
    assert int(one["loss"]["blda.anchors.updates"]) == 20


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), unfitted_row=st.integers(0, 2))
def test_js_divergences_to_the_anchors_match_scipy(seed, unfitted_row):
    blda = BLDALoss(3, n_components=2, min_samples=2, mode="ola")
    generator = torch.Generator().manual_seed(seed)
    for mixture_set in (blda.source, blda.target, blda.anchors):
        shape = mixture_set.means.shape
        mixture_set.means.copy_(torch.randn(shape, generator=generator) * 2)
        mixture_set.variances.copy_(torch.rand(shape, generator=generator) + 0.3)
        weights = torch.rand(shape, generator=generator) + 0.1
        mixture_set.weights.copy_(weights / weights.sum(-1, keepdim=True))
        mixture_set.fitted.fill_(True)
    blda.target.fitted[unfitted_row] = False  # a target row never updated
    grid = torch.linspace(-9.0, 9.0, 301)
    result = anchor_js_divergences(blda, grid)

    def density(mixture_set, index):
        w, m, v = (getattr(mixture_set, n)[index].double().numpy() for n in
                   ("weights", "means", "variances"))  # fmt: skip
        return sum(w[k] * norm.pdf(grid.double().numpy(), m[k], np.sqrt(v[k])) for k in range(2))

    positive_anchor, negative_anchor = density(blda.anchors, 0), density(blda.anchors, 1)
    for name, mixture_set in (("source", blda.source), ("target", blda.target)):
        fitted = mixture_set.fitted.numpy()
        for column in range(3):
            expected = (
                jensenshannon(density(mixture_set, (column, column)), positive_anchor) ** 2
                if fitted[column, column]
                else math.nan
            )
            others = [
                jensenshannon(density(mixture_set, (row, column)), negative_anchor) ** 2
                for row in range(3)
                if row != column and fitted[row, column]
            ]
            # float32 densities summed over 301 points: a relative 1e-5, not approx's 1e-6
            # (a hypothesis draw gave 1.7e-6)
            assert result[name]["positive"][column] == pytest.approx(
                expected, rel=1e-5, nan_ok=True
            )
            assert result[name]["negative"][column] == pytest.approx(np.mean(others), rel=1e-5)
    assert math.isnan(result["target"]["positive"][unfitted_row])
    blda.anchors.fitted[0] = False
    assert anchor_js_divergences(blda, grid) is None


@pytest.mark.parametrize(
    "name",
    ["gta2cs_daformer_mitb5", "synthia2cs_daformer_mitb5", "gta2cs_dacs_r101", "synthcity_tiny"],
)
def test_shipped_blda_configs_are_their_base_recipe_plus_the_blda_loss(name):
    """Everything but [loss] is the base config's; the paper configs' BLDA keys are the
    release's (checked key by key in test_paper_configs.py), SynthCity's the paper's."""
    blda, base = load_config(f"{name}_blda"), load_config(name)
    loss = blda.loss
    assert loss.name == "blda"
    assert (loss.blda_components, loss.blda_em_steps, loss.blda_momentum) == (5, 3, 0.99)
    assert (loss.blda_tau, loss.blda_eps, loss.blda_anchor_sampling) == (0.1, 0.01, "pixels")
    assert not loss.blda_mixed_updates_source
    if name == "synthcity_tiny":
        assert (loss.blda_mode, loss.blda_lambda, loss.blda_regression_loss) == (
            "ola+cde",
            0.2,
            "l2",
        )
        assert loss.blda_min_samples == 100
    else:
        assert (loss.blda_mode, loss.blda_min_samples) == ("ola", 500)
    without_loss = {k: v for k, v in to_dict(blda).items() if k != "loss"}
    assert without_loss == {k: v for k, v in to_dict(base).items() if k != "loss"}
    assert dataclasses.asdict(base.loss)["name"] == "cross_entropy"


def test_synthcity_tiny_blda_end_to_end_writes_plots_and_log(tmp_path, monkeypatch):
    from blda_cli.train import train_command
    from blda_tools.datasets.synthcity.generate import make_synthcity
    from blda_tools.models import create_model, load_checkpoint

    make_synthcity(tmp_path / "synthcity", images=6, size=(64, 128), seed=0)
    overrides = [
        f'data.root="{tmp_path / "synthcity"}"', "run.iterations=3", "run.num_workers=0",
        "run.live=false", "run.log_interval=1", "augment.crop_size=[32, 32]",
        "data.source_size=[64, 128]", "data.target_size=[64, 128]", "rcs.min_pixels=0",
        "evaluation.crop_size=[64, 64]", "evaluation.stride=[64, 64]",
        "loss.blda_min_samples=5", "loss.blda_plot_interval=2",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    arguments = ["--config", "synthcity_tiny_blda", "--work-dir", str(run_dir)]
    for override in overrides:
        arguments += ["--set", override]
    import blda_tools.plots as plots
    from blda_tools.datasets.synthcity.generate import CLASS_NAMES

    titles = []
    drawn = plots.plot_gmm_fits

    def plot_and_keep_titles(centers, histograms, densities, path):
        titles.extend(histograms)
        return drawn(centers, histograms, densities, path=path)

    monkeypatch.setattr(plots, "plot_gmm_fits", plot_and_keep_titles)
    result = CliRunner().invoke(train_command, arguments)
    assert result.exit_code == 0, result.output
    # Panels named by class: "label road, logit road (positive)", not class indices.
    assert titles and all(title.split(",")[0][len("label ") :] in CLASS_NAMES for title in titles)
    records = read_log(run_dir)
    # Strict JSON: a never-fitted class is null, not NaN.
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in log.jsonl"))
    reports = [r for r in records if r["kind"] == "loss"]
    assert [r["iteration"] for r in reports] == [2]
    report = reports[0]
    assert (run_dir / report["gmm_fits"]).stat().st_size > 0
    assert report["gmm_fits"] == "blda/gmm_fits_000002.png"
    assert set(report["js_to_anchors"]) == {"source", "target"}
    positive = report["js_to_anchors"]["source"]["positive"]
    assert len(positive) == 19
    assert all(v is None or 0 <= v <= math.log(2) for v in positive)
    assert any(v is not None for v in positive)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all("source_regression" in r["losses"] for r in train)
    checkpoint = _checkpoint(run_dir)
    assert checkpoint["loss"]["blda.source.means"].shape == (19, 19, 5)
    # The student loads as a plain tiny model: the head lives outside `model.*`.
    load_checkpoint(create_model("tiny", 19), run_dir / "checkpoints" / "latest.pth")
    assert not list(run_dir.rglob("*.partial"))
    # The record lists blda/ as a folder of the run: plot-log into the run directory refused
    # it as damaged ("lists 'blda', which is a folder")
    from blda_cli.train import plot_log_command

    plotted = CliRunner().invoke(plot_log_command, [str(run_dir)])
    assert plotted.exit_code == 0, plotted.output
    assert (run_dir / "training_curves.png").stat().st_size > 0
    from blda_tools.outputs import read_manifest

    assert "blda/" in read_manifest(run_dir)["train"]


def test_upsampled_head_prediction_is_a_cdf_value():
    from blda_tools.training.blda_loss import CDFRegressionHead

    raw = torch.tensor([[[[-30.0, 0.0], [2.0, 30.0]]]])
    prediction = CDFRegressionHead.predict(raw, (4, 4))
    assert prediction.shape == (1, 1, 4, 4)
    assert bool(((prediction >= 0) & (prediction <= 1)).all())
    expected = torch.sigmoid(F.interpolate(raw, size=(4, 4), mode="bilinear"))
    torch.testing.assert_close(prediction, expected)


def test_plotted_cells_pick_frequent_fitted_classes_and_their_strongest_rival():
    from blda_tools.training.blda_report import plotted_cells

    blda = BLDALoss(3, n_components=2, min_samples=2)
    blda.source.fitted[:] = True
    blda.source.fitted[2, 0] = False  # class 2's row is not whole: it is not plotted
    labels = torch.tensor([[[0, 0, 0], [1, 1, 2]]])  # 3 pixels of class 0, 2 of 1, 1 of 2
    logits = torch.zeros(1, 3, 2, 3)
    logits[0, 2, 0] = 1.0  # on class-0 pixels, class 2 scores above class 1
    logits[0, 0, 1, :2] = 0.5  # on class-1 pixels, class 0 scores above class 2
    assert plotted_cells(blda, logits, labels) == [(0, 0), (0, 2), (1, 1), (1, 0)]


def test_a_loss_state_of_another_class_count_is_refused():
    config = blda_config("ola")
    three = build_loss("blda", num_classes=3, ignore_index=255, config=config)
    four = build_loss("blda", num_classes=4, ignore_index=255, config=config)
    with pytest.raises(BLDAError, match="saved loss state does not fit loss.name = 'blda'"):
        four.load_state_dict(three.state_dict())
