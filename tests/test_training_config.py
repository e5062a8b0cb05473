"""`blda train` configs: shipped files, overrides with type checks, clear errors, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from blda_tools.errors import BLDAError
from blda_tools.training.config import (
    KEY_DOCS,
    TrainingConfig,
    config_differences,
    load_config,
    resolve_config_path,
    shipped_configs,
    to_dict,
    to_toml,
)


def test_every_shipped_config_loads_and_the_required_ones_exist():
    names = shipped_configs()
    assert {
        "gta2cs_daformer_mitb5",
        "synthia2cs_daformer_mitb5",
        "gta2cs_dacs_r101",
        "synthcity_tiny",
    } <= set(names)
    for name in names:
        load_config(name)
    tiny = load_config("synthcity_tiny")
    assert tiny.model.arch == "tiny" and tiny.run.device == "cpu"
    daformer = load_config("gta2cs_daformer_mitb5")
    # the DAFormer recipe of the facts file
    assert daformer.self_training.ema_alpha == 0.999
    assert daformer.self_training.pseudo_threshold == 0.968
    assert (daformer.self_training.ignore_top_rows, daformer.self_training.ignore_bottom_rows) == (
        15,
        120,
    )
    assert (daformer.rcs.temperature, daformer.rcs.min_pixels, daformer.rcs.min_crop_ratio) == (
        0.01,
        3000,
        0.5,
    )
    assert (daformer.optim.lr, daformer.optim.head_lr_mult, daformer.optim.weight_decay) == (
        6e-5,
        10.0,
        0.01,
    )
    assert daformer.optim.warmup_iters == 1500 and daformer.run.iterations == 40000
    assert daformer.feature_distance.weight == 0.005
    assert daformer.feature_distance.classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    assert len(load_config("synthia2cs_daformer_mitb5").evaluation.classes) == 16


def test_every_schema_key_is_documented():
    keys = {
        f"{section}.{key}"
        for section, values in to_dict(TrainingConfig()).items()
        for key in values
    }
    assert keys == set(KEY_DOCS)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert [key for key in sorted(keys) if f"`{key}`" not in docs] == []


def test_overrides_are_typed():
    config = load_config(
        "synthcity_tiny",
        ["run.iterations=7", "optim.lr=1", "augment.crop_size=[32, 48]", "model.arch=tiny",
         "run.live=false", "data.root=/some/where"],
    )  # fmt: skip
    assert config.run.iterations == 7
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.augment.crop_size == [32, 48]
    assert config.run.live is False
    assert config.data.root == "/some/where"  # not TOML: kept as a string
    assert load_config("synthcity_tiny", ["optim.betas=[0.0, 0.999]"]).optim.betas == [0.0, 0.999]
    # TOML reads these as a number, infinity and a date: a text key takes them as written
    for written in ("2024", "inf", "2024-01-01", "[1, 2]"):
        assert load_config("synthcity_tiny", [f"data.root={written}"]).data.root == written


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.iterations=ten", r"run\.iterations: expected int"),
        ("run.iterations=1.5", r"run\.iterations: expected int"),
        ("run.live=1", r"run\.live: expected bool"),
        ("augment.crop_size=[1, 'a']", r"augment\.crop_size"),
        ("run.amp=fp32", r"run\.amp must be one of none, bf16, fp16"),
        ("augment.crop_size=[512]", r"augment\.crop_size must be two positive numbers"),
        ("run.iterations", r"expected KEY=VALUE"),
        ("run.checkpoint_interval=0", r"run\.checkpoint_interval must be >= 1"),
        # values the types allow but training cannot use (each trained wrongly or failed late)
        ("optim.lr=-1", r"optim\.lr must lie in \(0, inf\), got -1"),
        ("optim.lr=nan", r"optim\.lr must be finite, got nan"),
        ("optim.betas=[0.9, 1.5]", r"optim\.betas must be two numbers in \[0, 1\)"),
        ("optim.betas=[0.9]", r"optim\.betas must be two numbers in \[0, 1\)"),
        # the poly decay climbed from lr towards it
        ("optim.min_lr=1.0", r"optim\.min_lr 1 is above optim\.lr"),
        # beyond a C long: OverflowError tracebacks in torch and the loaders
        ("run.iterations=100000000000000000000", r"run\.iterations: expected an integer of at most"),
        ("augment.crop_size=[100000000000000000000, 2]", r"augment\.crop_size: expected an integer"),
        ("optim.min_lr=-0.5", r"optim\.min_lr must lie in \[0, inf\)"),
        ("optim.weight_decay=-1", r"optim\.weight_decay must lie in \[0, inf\)"),
        ("optim.warmup_iters=-5", r"optim\.warmup_iters must lie in \[0, inf\)"),
        ("optim.poly_power=-1", r"optim\.poly_power must lie in \[0, inf\)"),
        ("run.seed=-1", r"run\.seed must lie in \[0, 4.29497e\+09\]"),
        ("run.seed=4294967296", r"run\.seed must lie in"),
        (
            "self_training.pseudo_threshold=2",
            r"self_training\.pseudo_threshold must lie in \[0, 1\]",
        ),
        ("augment.cat_max_ratio=-1", r"augment\.cat_max_ratio must lie in \(0, 1\]"),
        ("augment.color_jitter_probability=5", r"color_jitter_probability must lie in \[0, 1\]"),
        ("rcs.temperature=inf", r"rcs\.temperature must be finite"),
        ("evaluation.classes=[-1]", r"evaluation\.classes must be distinct class ids >= 0"),
        ("evaluation.classes=[0, 0]", r"evaluation\.classes must be distinct class ids >= 0"),
        ("self_training.ema_alpha=2.0", r"ema_alpha must lie in \[0, 1\], got 2\.0"),
        ("hrda.detail_loss_weight=1.5", r"detail_loss_weight must lie in \[0, 1\), got 1\.5"),
        ("loss.blda_min_samples=1", r"loss\.blda_min_samples: expected an integer >= "
                                    r"loss\.blda_components=5, got 1"),
    ],
)  # fmt: skip
def test_bad_override_values_are_refused(override, message):
    with pytest.raises(BLDAError, match=message):
        load_config("synthcity_tiny", [override])


def test_typo_in_a_key_names_it_suggests_and_lists_valid_keys(tmp_path):
    with pytest.raises(BLDAError) as caught:
        load_config("synthcity_tiny", ["optim.learning_rate=1e-4"])
    message = str(caught.value)
    assert "--set: unknown key 'optim.learning_rate'" in message
    assert "valid keys:" in message and "optim.lr" in message and "run.iterations" in message
    path = tmp_path / "typo.toml"
    path.write_text("[self_training]\nema_alpah = 0.99\n")
    with pytest.raises(BLDAError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "did you mean self_training.ema_alpha?" in str(caught.value)


def test_unknown_config_name_lists_shipped_ones():
    with pytest.raises(BLDAError, match="shipped: .*synthcity_tiny"):
        load_config("synthcity_tiyn")


def test_feature_distance_without_weights_is_refused():
    with pytest.raises(BLDAError, match="feature_distance.imagenet_weights"):
        load_config("synthcity_tiny", ["feature_distance.enabled=true"])


def test_resolved_toml_round_trips(tmp_path):
    config = load_config("gta2cs_daformer_mitb5", ['data.root="quote\\"d"', "run.seed=3"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    tomllib.loads(path.read_text())
    assert load_config(path) == config
    assert config_differences(load_config(path), config) == []
    changed = load_config(path, ["optim.lr=1e-3", "run.log_interval=7"])
    assert config_differences(config, changed) == ["optim.lr"]  # logging keys may change


def test_a_config_object_is_checked_as_a_file_is_and_class_ids_against_the_data():
    from blda_tools.training.config import check_class_ids, checked_config

    config = load_config("synthcity_tiny")
    config.run.iterations = 0
    with pytest.raises(BLDAError, match=r"run\.iterations must be >= 1"):
        checked_config(config)
    config.run.iterations = "2"
    with pytest.raises(BLDAError, match=r"run\.iterations: expected int, got '2'"):
        checked_config(config)
    config.run.iterations, config.loss.blda_tau = 2, 5.0
    with pytest.raises(BLDAError, match=r"loss\.blda_tau set but loss\.name is"):
        checked_config(config)
    config.loss.blda_tau = 0.1
    assert checked_config(config) == config
    config.evaluation.classes = [3, 99]
    with pytest.raises(BLDAError, match=r"evaluation\.classes must be class ids below 19"):
        check_class_ids(config, 19)
    with pytest.raises(BLDAError, match="a list of KEY=VALUE, got the string"):
        load_config("synthcity_tiny", "run.iterations=2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["model.arch=nope"], "config: model.arch: unknown architecture 'nope'"),
     (["data.source_split=nolist.txt"], "config: data.source_split nolist.txt: gta5 takes"),
     (["data.source=nope"], "config: data.source / data.root / data.source_root: dataset 'nope'"),
     (["data.root=/nonexistent"], "config: data.source / data.root / data.source_root: gta5: "
                                   "expected folder /nonexistent/source")],
)  # fmt: skip
def test_train_errors_name_config_keys_not_dump_logits_options(tmp_path, overrides, message):
    from blda_tools.demo import DEFAULT_SAMPLE_DIR
    from blda_tools.training import train

    root = DEFAULT_SAMPLE_DIR / "synthcity"
    with pytest.raises(BLDAError) as caught:
        train("synthcity_tiny", tmp_path / "run", [f'data.root="{root}"', *overrides])
    assert message in str(caught.value) and "--" not in str(caught.value).split(":")[1]
    assert not (tmp_path / "run").exists()


def test_a_foreign_file_in_the_run_directory_names_work_dir(tmp_path):
    from blda_tools.demo import DEFAULT_SAMPLE_DIR
    from blda_tools.training import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("mine")
    root = DEFAULT_SAMPLE_DIR / "synthcity"
    with pytest.raises(BLDAError, match="choose another --work-dir"):
        train("synthcity_tiny", tmp_path / "run", [f'data.root="{root}"', "rcs.min_pixels=20"])


def test_resume_takes_the_same_folder_given_another_way_as_the_same_config(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    absolute = load_config("synthcity_tiny", [f'data.root="{tmp_path / "data"}"'])
    relative = load_config("synthcity_tiny", ['data.root="../data"'])
    other = load_config("synthcity_tiny", [f'data.root="{tmp_path / "elsewhere"}"'])
    assert config_differences(absolute, relative) == []
    assert config_differences(absolute, other) == ["data.root"]


def test_a_checkpoint_without_its_config_is_not_called_a_run_to_resume(tmp_path):
    from blda_tools.demo import DEFAULT_SAMPLE_DIR
    from blda_tools.training import train

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest.pth").write_bytes(b"stray")
    overrides = [f'data.root="{DEFAULT_SAMPLE_DIR / "synthcity"}"']
    with pytest.raises(BLDAError, match="no config.toml, so not a run --resume can continue"):
        train("synthcity_tiny", tmp_path / "run", overrides)
    with pytest.raises(BLDAError, match="has no config.toml"):
        train("synthcity_tiny", tmp_path / "run", overrides, resume=True)


def _notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "blda_tools.training.config"]


def test_a_key_of_a_switched_off_section_gets_a_note_naming_its_switch(tmp_path, caplog):
    with caplog.at_level("INFO", logger="blda_tools"):
        load_config("synthcity_tiny", ["mic.mask_ratio=0.5", "rcs.enabled=false",
                                       "rcs.temperature=0.5", "rcs.temperature=0.4"])  # fmt: skip
    assert _notes(caplog) == [
        "--set: mic.mask_ratio has no effect while mic.enabled = false (--set mic.enabled=true "
        "to use it)",
        "--set: rcs.temperature has no effect while rcs.enabled = false (--set rcs.enabled=true "
        "to use it)",
    ]  # the file's rcs keys are not named: --set switched rcs off (an ablation)
    caplog.clear()
    own = tmp_path / "own.toml"
    own.write_text("[feature_distance]\nweight = 0.01\n\n[mic]\nenabled = true\nmask_ratio = 0.5\n")
    with caplog.at_level("INFO", logger="blda_tools"):
        load_config(own)
    assert _notes(caplog) == [
        f"{own}: feature_distance.weight has no effect while feature_distance.enabled = false "
        "(--set feature_distance.enabled=true to use it)"
    ]


def test_shipped_configs_and_their_ablations_load_without_notes(caplog):
    with caplog.at_level("INFO", logger="blda_tools"):
        for name in shipped_configs():
            load_config(name)
        load_config("gta2cs_mic_hrda_mitb5", ["mic.enabled=false"])
        load_config("gta2cs_daformer_mitb5", ["rcs.enabled=false", "self_training.enabled=false"])
    assert _notes(caplog) == []


def test_resuming_reads_the_runs_own_config_without_notes(tmp_path, caplog):
    # A run's config.toml lists every key, those of switched-off sections too: --resume
    # printed a note for each (regression helper).
    from blda_tools.training.runner import prepare_run_dir

    config = load_config("synthcity_tiny")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.pth").write_bytes(b"a checkpoint")
    (tmp_path / "config.toml").write_text(to_toml(config))
    with caplog.at_level("INFO", logger="blda_tools"):
        prepare_run_dir(config, tmp_path, resume=True, is_main=True)
        assert _notes(caplog) == []
        load_config(tmp_path / "config.toml")  # read as a user's file: its notes are due
    assert any("mic.mask_ratio has no effect" in note for note in _notes(caplog))


def test_a_shipped_name_is_the_shipped_config_whatever_lies_in_the_working_folder(
    tmp_path, monkeypatch
):
    # a file named synthcity_tiny in the working folder was read instead
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthcity_tiny").write_text("x")
    shipped = resolve_config_path("synthcity_tiny")
    assert shipped.parent.name == "configs" and shipped.name == "synthcity_tiny.toml"
    assert (
        load_config("synthcity_tiny").run.iterations
        == tomllib.loads(shipped.read_text())["run"]["iterations"]
    )
    with pytest.raises(BLDAError, match="synthcity_tiny: cannot read the TOML config"):
        load_config("./synthcity_tiny")
