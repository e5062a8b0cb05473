"""AdamW with DAFormer's parameter groups, and mmcv's linear warm-up + polynomial decay.

Facts read from DAFormer's config `gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py`
and `configs/_base_/schedules/poly10warm.py`: lr 6e-5, `head` lr_mult 10, `pos_block` and `norm`
decay_mult 0 (mmcv matches these as substrings of parameter names); warm-up linear over 1500
iterations from ratio 1e-6, poly power 1.0, min_lr 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _norm_parameter_names(model: nn.Module) -> set[str]:
    return {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, _NORM_TYPES)
        for name, _ in module.named_parameters(recurse=False)
    }


def parameter_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    head_lr_mult: float = 10.0,
    head_keys: Sequence[str] = ("head",),
    no_decay_keys: Sequence[str] = ("norm", "pos_block"),
    norm_layers_no_decay: bool = True,
) -> list[dict]:
    """AdamW groups: (encoder | head) x (decay | no decay), empty groups dropped.

    A parameter is in the head when its name contains a head key; it has no weight decay when
    its name contains a no-decay key or, with `norm_layers_no_decay`, it belongs to a
    normalisation layer (names like `bn1` escape mmcv's substring rule, which DAFormer's
    recipe applies as it is: `norm_layers_no_decay=False`).
    Each group carries `name` and `initial_lr` (the schedule's base).
    """
    norm_names = _norm_parameter_names(model) if norm_layers_no_decay else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_head = any(key in name for key in head_keys)
        no_decay = name in norm_names or any(key in name for key in no_decay_keys)
        groups.setdefault((is_head, no_decay), []).append(parameter)
    result = []
    for (is_head, no_decay), params in sorted(groups.items()):
        group_lr = lr * (head_lr_mult if is_head else 1.0)
        result.append(
            {
                "name": f"{'head' if is_head else 'encoder'}{'_no_decay' if no_decay else ''}",
                "params": params,
                "lr": group_lr,
                "initial_lr": group_lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return result


def build_optimizer(model: nn.Module, optim_config) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` with the settings of an `OptimConfig`."""
    groups = parameter_groups(
        model,
        lr=optim_config.lr,
        weight_decay=optim_config.weight_decay,
        head_lr_mult=optim_config.head_lr_mult,
        head_keys=optim_config.head_keys,
        no_decay_keys=optim_config.no_decay_keys,
        norm_layers_no_decay=optim_config.norm_layers_no_decay,
    )
    return torch.optim.AdamW(groups, lr=optim_config.lr, betas=tuple(optim_config.betas))


def add_regression_head_group(
    optimizer: torch.optim.Optimizer, head: nn.Module, optim_config
) -> None:
    """The online BLDA CDF regression head as its own group at the head's learning rate
    (lr x head_lr_mult, with weight decay), whatever `head_keys` says; call before the schedule
    is built so it takes the group's `initial_lr`."""
    group_lr = optim_config.lr * optim_config.head_lr_mult
    optimizer.add_param_group(
        {
            "name": "regression_head",
            "params": list(head.parameters()),
            "lr": group_lr,
            "initial_lr": group_lr,
            "weight_decay": optim_config.weight_decay,
        }
    )


def warmup_poly_factor(
    iteration: int,
    max_iters: int,
    *,
    warmup_iters: int,
    warmup_ratio: float,
    power: float,
    base_lr: float = 1.0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at `iteration` (0-based) for a base of `base_lr`, mmcv's 'poly' + linear warm-up.

    regular = (base - min) * (1 - i / max)^power + min; during warm-up (i < warmup_iters) it is
    multiplied by 1 - (1 - i / warmup_iters) * (1 - warmup_ratio).
    """
    regular = (base_lr - min_lr) * (1.0 - iteration / max_iters) ** power + min_lr
    if iteration < warmup_iters:
        regular *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return regular


class WarmupPolySchedule:
    """Sets every group's lr from its `initial_lr` for the current iteration; `step()` advances."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, optim_config) -> None:
        self.optimizer, self.max_iters = optimizer, max_iters
        self.warmup_iters = optim_config.warmup_iters
        self.warmup_ratio = optim_config.warmup_ratio
        self.power = optim_config.poly_power
        self.min_lr = optim_config.min_lr  # absolute, shared by all groups as in mmcv
        self.iteration = 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_poly_factor(
                min(self.iteration, self.max_iters),
                self.max_iters,
                warmup_iters=self.warmup_iters,
                warmup_ratio=self.warmup_ratio,
                power=self.power,
                base_lr=group["initial_lr"],
                min_lr=self.min_lr,
            )

    def step(self) -> None:
        """Move to the next iteration's learning rates."""
        self.iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self._apply()
