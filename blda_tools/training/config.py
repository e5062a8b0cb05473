"""Training configuration: a typed schema with defaults, TOML files, `--set` overrides, validation.

A configuration is a tree of dataclasses (`TrainingConfig` and one section per concept). Every
key has a default and a docstring-like comment in `KEY_DOCS`; a TOML file only lists what it
changes. Shipped configs live in `blda_tools/configs/*.toml` and are found by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from blda_tools.errors import BLDAError
from blda_tools.fileio import as_text, read_text_file

# The schema (dataclasses, KEY_DOCS) lives in config_schema.py; re-exported here.
from blda_tools.training.config_schema import (  # noqa: F401
    KEY_DOCS,
    AugmentConfig,
    DataConfig,
    EvaluationConfig,
    FeatureDistanceConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RareClassSamplingConfig,
    RunConfig,
    SelfTrainingConfig,
    TrainingConfig,
)

logger = logging.getLogger(__name__)

_CHOICES = {
    "run.amp": ("none", "bf16", "fp16"),
    "self_training.mix": ("class", "none"),
    "self_training.pseudo_weight_pooling": ("batch", "image"),
    "loss.blda_anchor_sampling": ("pixels", "class_balanced"),
    "loss.blda_mode": ("none", "ola_source", "ola", "ola+cde"),
    "loss.blda_regression_loss": ("l2", "l1"),
}
# The largest integer a key takes (int64: what torch, numpy and the loaders convert to).
_LARGEST_INT = 2**63 - 1
_PAIRS = (
    "data.source_size",
    "data.target_size",
    "augment.crop_size",
    "augment.scale_range",
    "evaluation.crop_size",
    "evaluation.stride",
    "hrda.detail_crop_size",
)  # optim.betas: a pair too, in [0, 1) (`validate`)
_MINIMA = {
    "run.iterations": 1,
    "run.batch_size": 1,
    "run.accumulate": 1,
    "run.log_interval": 1,
    "run.checkpoint_interval": 1,
    "run.num_workers": 0,
    "evaluation.interval": 0,
    "evaluation.max_images": 0,
    "self_training.ignore_top_rows": 0,
    "self_training.ignore_bottom_rows": 0,
    "rcs.min_pixels": 0,
    "hrda.crop_coord_divisible": 1,
    "loss.blda_plot_interval": 0,
    "loss.blda_max_samples_per_cell": 0,
    "loss.blda_anchor_max_samples": 0,
}
# Numbers the types leave open: (low, high, low included, high included); every float key
# must also be finite. A value outside trains wrongly (a negative learning rate ascends, a
# pseudo-label threshold above 1 weights every target pixel 0) or fails late in torch.
_RANGES = {
    "run.seed": (0, 2**32 - 1, True, True),  # numpy's seed range
    "optim.lr": (0.0, math.inf, False, False),
    "optim.head_lr_mult": (0.0, math.inf, False, False),
    "optim.weight_decay": (0.0, math.inf, True, False),
    "optim.warmup_iters": (0, math.inf, True, False),
    "optim.warmup_ratio": (0.0, 1.0, True, True),
    "optim.poly_power": (0.0, math.inf, True, False),
    "optim.min_lr": (0.0, math.inf, True, False),
    "augment.cat_max_ratio": (0.0, 1.0, False, True),
    "augment.color_jitter_strength": (0.0, math.inf, True, False),
    "augment.color_jitter_probability": (0.0, 1.0, True, True),
    "self_training.pseudo_threshold": (0.0, 1.0, True, True),
    "rcs.min_crop_ratio": (0.0, math.inf, True, False),  # HRDA 2.0 (crops of 4x the pixels)
    "feature_distance.weight": (0.0, math.inf, True, False),
    "feature_distance.scale_min_ratio": (0.0, 1.0, True, True),
}
# Lists of class ids (their upper bound, the class count, is checked with the data).
CLASS_LISTS = ("evaluation.classes", "feature_distance.classes")
# Keys a resumed run may change: they affect logging and file writes, never the numbers.
RESUMABLE_KEYS = (
    "run.log_interval",
    "run.checkpoint_interval",
    "run.live",
    "run.num_workers",
    "loss.blda_plot_interval",
)


# --------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    """Names of the configs installed with the package (usable as `--config NAME`)."""
    folder = resources.files("blda_tools") / "configs"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped config by name (`synthcity_tiny`) or any TOML file by path. A shipped name
    is that config even when a file of that name lies in the working folder (which was read
    instead); `./NAME` reads such a file."""
    path = Path(name_or_path)
    folder = resources.files("blda_tools") / "configs"
    is_name = (
        isinstance(name_or_path, str) and "/" not in name_or_path and name_or_path.isidentifier()
    )
    shipped = folder / f"{name_or_path}.toml"
    if is_name and shipped.is_file():
        return Path(str(shipped))
    if path.is_file():
        return path
    raise BLDAError(
        f"--config: {name_or_path} is neither a file nor a shipped config; "
        f"shipped: {', '.join(shipped_configs()) or 'none'}"
    )


def load_config(
    name_or_path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    *,
    notes: bool = True,
) -> TrainingConfig:
    """Defaults, then the TOML file (if any), then `key=value` overrides; validated. `notes`:
    name the given keys that have no effect (`inactive_keys`); off for a run's own resolved
    config.toml, which lists every key."""
    config = TrainingConfig()
    given: list[tuple[str, str]] = []  # (source, key) of every key the file and --set give
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            table = tomllib.loads(read_text_file(path, "a TOML config"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise BLDAError(f"{path}: cannot read the TOML config: {error}") from None
        apply_table(config, table, source=str(path))
        given += [(str(path), f"{section}.{key}") for section in table for key in table[section]]
    if isinstance(overrides, str):  # one KEY=VALUE, not its characters
        raise BLDAError(f"--set: expected a list of KEY=VALUE, got the string {overrides!r}")
    for override in overrides:
        key, value = parse_override(override)
        if _is_text_key(key) and not isinstance(value, str):
            # data.root=2024 or =inf: a folder's name, not the number or date TOML reads
            value = override.partition("=")[2].strip()
        set_key(config, key, value, source="--set")
        given.append(("--set", key))
    validate(config)
    for source, key, switch in inactive_keys(config, given) if notes else ():
        logger.info("%s: %s has no effect while %s = false (--set %s=true to use it)",
                    source, key, switch, switch)  # fmt: skip
    return config


def inactive_keys(
    config: TrainingConfig, given: typing.Iterable[tuple[str, str]]
) -> list[tuple[str, str, str]]:
    """(source, key, switch) for each given key of a section whose `enabled` key (the switch)
    is false: the run never reads it, and a user who sets `mic.mask_ratio` but not
    `mic.enabled = true` should hear so. A file's keys are not named when `--set` switched their section off (an ablation
    of a shipped recipe). (`loss.blda_*` with another loss is an error: `_validate_blda`.)"""
    given = list(dict.fromkeys(given))  # a key given twice is named once per source
    inactive = []
    for source, dotted in given:
        section, _, key = dotted.partition(".")
        if key == "enabled" or getattr(getattr(config, section), "enabled", True) is not False:
            continue
        if source != "--set" and ("--set", f"{section}.enabled") in given:
            continue
        inactive.append((source, dotted, f"{section}.enabled"))
    return inactive


def checked_config(config: TrainingConfig) -> TrainingConfig:
    """A config object built in Python, checked as a file is: every key's type, then
    `validate` (returns a checked copy; the object itself is left as it was)."""
    checked = TrainingConfig()
    apply_table(checked, to_dict(config), source="TrainingConfig")
    validate(checked)
    return checked


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as TOML, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BLDAError(f"--set: expected KEY=VALUE (e.g. run.iterations=1000), got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def _is_text_key(dotted: str) -> bool:
    """Whether the known key `dotted` holds text (False for unknown keys: `set_key` names them)."""
    if dotted not in KEY_DOCS:
        return False
    section_name, _, key = dotted.partition(".")
    return typing.get_type_hints(type(getattr(TrainingConfig(), section_name)))[key] is str


def apply_table(config: TrainingConfig, table: dict, *, source: str) -> None:
    """Set every key of a nested TOML table on `config`."""
    for section, values in table.items():
        if not isinstance(values, dict):
            _unknown_key(section, source)
        for key, value in values.items():
            set_key(config, f"{section}.{key}", value, source=source)


def set_key(config: TrainingConfig, dotted: str, value: Any, *, source: str) -> None:
    """Type-check `value` against the schema and store it under the dotted key."""
    section_name, _, key = dotted.partition(".")
    if dotted not in KEY_DOCS:
        _unknown_key(dotted, source)
    section = getattr(config, section_name)
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(value, hint, f"{source}: {dotted}"))


def _unknown_key(dotted: str, source: str) -> typing.NoReturn:
    close = difflib.get_close_matches(dotted, list(KEY_DOCS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise BLDAError(
        f"{source}: unknown key {dotted!r}{hint}; valid keys: {', '.join(sorted(KEY_DOCS))}"
    )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise BLDAError(f"{where}: expected a list of {item_hint.__name__}, got {value!r}")
        return [_coerce(item, item_hint, where) for item in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported schema type {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > _LARGEST_INT:  # torch and numpy take C longs: OverflowError
                raise BLDAError(
                    f"{where}: expected an integer of at most {_LARGEST_INT}, got {value}"
                )
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            if as_text(value) != value:  # a file name's bytes that are not UTF-8
                raise BLDAError(
                    f"{where}: {as_text(value)} is not UTF-8 text; a config (TOML) holds UTF-8 "
                    "only: rename the folder, or link it under a UTF-8 name"
                )
            return value
    raise BLDAError(f"{where}: expected {hint.__name__}, got {value!r}")


def validate(config: TrainingConfig) -> None:
    """Range and consistency checks that the types alone do not express."""
    for dotted, choices in _CHOICES.items():
        value = get_key(config, dotted)
        if value not in choices:
            raise BLDAError(f"config: {dotted} must be one of {', '.join(choices)}, got {value!r}")
    for dotted in _PAIRS:
        value = get_key(config, dotted)
        if len(value) != 2 or min(value) <= 0:
            raise BLDAError(f"config: {dotted} must be two positive numbers, got {value}")
    crop, stride = config.evaluation.crop_size, config.evaluation.stride
    if any(step > side for step, side in zip(stride, crop, strict=False)):
        raise BLDAError(
            f"config: evaluation.stride {list(stride)} is larger than evaluation.crop_size "
            f"{list(crop)}: the pixels between windows would get no logits (and a NaN score); "
            "give a stride at most the crop"
        )
    resize = config.evaluation.resize
    if resize and (len(resize) != 2 or min(resize) <= 0):
        raise BLDAError(f"config: evaluation.resize must be [] or [height, width], got {resize}")
    for dotted, minimum in _MINIMA.items():
        if get_key(config, dotted) < minimum:
            raise BLDAError(f"config: {dotted} must be >= {minimum}, got {get_key(config, dotted)}")
    _validate_ranges(config)
    low, high = config.augment.scale_range
    if low > high:
        raise BLDAError(f"config: augment.scale_range must be [low, high], got {[low, high]}")
    if not 0.0 <= config.self_training.ema_alpha <= 1.0:
        raise BLDAError(
            f"config: self_training.ema_alpha must lie in [0, 1], got {config.self_training.ema_alpha}"
        )
    if not 0 < config.rcs.temperature < math.inf:
        raise BLDAError("config: rcs.temperature must be a finite number > 0")
    betas = config.optim.betas
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise BLDAError(f"config: optim.betas must be two numbers in [0, 1), got {betas}")
    if config.optim.min_lr > config.optim.lr:  # the poly decay would climb towards it
        raise BLDAError(
            f"config: optim.min_lr {config.optim.min_lr:g} is above optim.lr "
            f"{config.optim.lr:g}: the learning rate decays from lr to min_lr"
        )
    if config.feature_distance.enabled and not config.feature_distance.imagenet_weights:
        raise BLDAError(
            "config: feature_distance.enabled needs feature_distance.imagenet_weights, the path "
            "of an ImageNet-pretrained checkpoint; set it or set feature_distance.enabled=false"
        )
    margins = config.self_training.crop_pseudo_margins
    if margins and (len(margins) != 4 or min(margins) < 0):
        raise BLDAError(
            "config: self_training.crop_pseudo_margins must be [] or four pixel counts "
            f"[top, bottom, left, right] >= 0, got {margins}"
        )
    if not 0.0 <= config.hrda.detail_loss_weight < 1.0:
        raise BLDAError(
            f"config: hrda.detail_loss_weight must lie in [0, 1), got {config.hrda.detail_loss_weight}"
        )
    from blda_tools.training.masking import check_mic_settings

    check_mic_settings(config.mic)
    _validate_blda(config.loss)


def _validate_ranges(config: TrainingConfig) -> None:
    for section in dataclasses.fields(config):
        for key in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), key.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise BLDAError(f"config: {section.name}.{key.name} must be finite, got {value}")
    for dotted, (low, high, low_in, high_in) in _RANGES.items():
        value = get_key(config, dotted)
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
            bounds = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise BLDAError(f"config: {dotted} must lie in {bounds}, got {value}")
    for dotted in CLASS_LISTS:
        ids = get_key(config, dotted)
        if any(class_id < 0 for class_id in ids) or len(set(ids)) != len(ids):
            raise BLDAError(f"config: {dotted} must be distinct class ids >= 0, got {ids}")


def check_class_ids(config: TrainingConfig, num_classes: int) -> None:
    """The class-id lists against the data's class count (known once the data is open)."""
    for dotted in CLASS_LISTS:
        ids = get_key(config, dotted)
        if any(class_id >= num_classes for class_id in ids):
            raise BLDAError(
                f"config: {dotted} must be class ids below {num_classes} (the data's classes), "
                f"got {ids}"
            )


def _validate_blda(loss: LossConfig) -> None:
    """The loss.blda_* ranges; setting them for another loss is an error, not silently ignored."""
    from blda_tools.training.blda_loss import check_blda_settings

    check_blda_settings(loss)
    if loss.name == "blda":
        return
    defaults = LossConfig()
    changed = [
        f"loss.{f.name}"
        for f in dataclasses.fields(loss)
        if f.name.startswith("blda_") and getattr(loss, f.name) != getattr(defaults, f.name)
    ]
    if changed:
        raise BLDAError(
            f"config: {', '.join(changed)} set but loss.name is {loss.name!r}; "
            "the loss.blda_* keys apply to loss.name = 'blda'"
        )


def get_key(config: TrainingConfig, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return getattr(getattr(config, section), key)


# --------------------------------------------------------------------------- saving


def to_dict(config: TrainingConfig) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts (one table per section)."""
    return dataclasses.asdict(config)


def to_toml(config: TrainingConfig) -> str:
    """Every key, resolved, as TOML text (what `config.toml` of a run directory holds)."""
    lines = ["# Resolved configuration of this run (every key, defaults included)."]
    for section, values in to_dict(config).items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


_TOML_ESCAPES = {
    **{chr(code): f"\\u{code:04X}" for code in (*range(0x20), 0x7F)},
    **{"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"},
    **{'"': '\\"', "\\": "\\\\"},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # TOML basic strings: backslash, quote and control characters escaped (a raw newline,
        # which --set data.root="a\\nb" gives, would end the string)
        return '"' + "".join(_TOML_ESCAPES.get(c, c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


# Keys naming files or folders: the same place given another way (absolute, relative,
# through a link) is the same value.
PATH_KEYS = frozenset(
    ("data.root", "data.source_root", "data.target_root", "model.pretrained",
     "model.backbone_weights", "feature_distance.imagenet_weights")
)  # fmt: skip


def config_differences(old: TrainingConfig, new: TrainingConfig) -> list[str]:
    """Dotted keys whose values differ, excluding those a resume may change."""
    old_table, new_table = to_dict(old), to_dict(new)
    return [
        f"{section}.{key}"
        for section, values in new_table.items()
        for key, value in values.items()
        if not _same_value(f"{section}.{key}", old_table[section][key], value)
        and f"{section}.{key}" not in RESUMABLE_KEYS
    ]


def _same_value(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in PATH_KEYS and old and new:
        return os.path.realpath(old) == os.path.realpath(new)
    return False


def resolve_data_root(config: DataConfig, root: str) -> Path:
    """A dataset root, relative to `data.root` unless absolute."""
    path = Path(root)
    return path if path.is_absolute() or not config.root else Path(config.root) / path
