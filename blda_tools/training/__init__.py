"""DAFormer-style self-training (`blda train`): configs, the loop, checkpoints, evaluation.

    from blda_tools.training import train
    summary = train("synthcity_tiny", "runs/tiny", overrides=["run.iterations=2000"])

See docs/training.md for the recipe, the config keys and the distributed command lines.
"""

from __future__ import annotations

from blda_tools.training import blda_loss as _blda_loss  # noqa: F401 (registers loss 'blda')
from blda_tools.training.config import TrainingConfig, load_config, shipped_configs, to_toml
from blda_tools.training.losses import WeightedCrossEntropy, build_loss, register_loss
from blda_tools.training.run_log import plot_log, read_log
from blda_tools.training.runner import build_components, run_training, train

__all__ = [
    "TrainingConfig",
    "WeightedCrossEntropy",
    "build_components",
    "build_loss",
    "load_config",
    "plot_log",
    "read_log",
    "register_loss",
    "run_training",
    "shipped_configs",
    "to_toml",
    "train",
]
