"""The online BLDA loss in `blda train` (Sec. 3.3.4-3.3.5, Table 4): registry entry, CDF head.

`loss.name = "blda"` wraps `blda_tools.online.BLDALoss` in the loss seam of
`blda_tools.training.losses`. The switch `loss.blda_mode` reproduces the rows of Table 4:

    none        BLDALoss mode "none": the pixel-weighted cross-entropy, no statistics
    ola_source  mode "ola_source": logit adjustment (Eq. 9) on source pixels only (OLA_S)
    ola         mode "ola": source and target GMMs, Eq. 9 on both domains (OLA)
    ola+cde     mode "ola" + the CDF regression head and lambda x Eq. 10 (OLA + CDE)

Only `ola+cde` asks the loop for a regression head (`needs_regression_head`); the loop then
passes `regression=` (the head's sigmoid output at the label size) to every call.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blda_tools.errors import BLDAError
from blda_tools.online.loss import BLDALoss
from blda_tools.training.losses import register_loss

# loss.blda_mode -> (BLDALoss mode, with the CDF regression head)
BLDA_MODES: dict[str, tuple[str, bool]] = {
    "none": ("none", False),
    "ola_source": ("ola_source", False),
    "ola": ("ola", False),
    "ola+cde": ("ola", True),
}

# BLDALoss argument -> config key, to name the key in a range error.
_ARGUMENT_KEYS = {
    "n_components": "loss.blda_components",
    "em_steps": "loss.blda_em_steps",
    "momentum": "loss.blda_momentum",
    "momentum_warmup": "loss.blda_momentum_warmup",
    "min_samples": "loss.blda_min_samples",
    "max_samples_per_cell": "loss.blda_max_samples_per_cell",
    "eps": "loss.blda_eps",
    "tau": "loss.blda_tau",
    "regression_weight": "loss.blda_lambda",
    "regression_loss": "loss.blda_regression_loss",
    "anchor_sampling": "loss.blda_anchor_sampling",
    "anchor_max_samples": "loss.blda_anchor_max_samples",
}


def blda_arguments(loss_config) -> dict:
    """`BLDALoss` keyword arguments from a `LossConfig` (the `loss.blda_*` keys)."""
    mode, _ = BLDA_MODES[loss_config.blda_mode]
    return {
        "mode": mode,
        "n_components": loss_config.blda_components,
        "em_steps": loss_config.blda_em_steps,
        "momentum": loss_config.blda_momentum,
        "momentum_warmup": loss_config.blda_momentum_warmup,
        "min_samples": loss_config.blda_min_samples,
        # 0 in the config means uncapped (BLDALoss: None), as the release does.
        "max_samples_per_cell": loss_config.blda_max_samples_per_cell or None,
        "eps": loss_config.blda_eps,
        "tau": loss_config.blda_tau,
        "regression_weight": loss_config.blda_lambda,
        "regression_loss": loss_config.blda_regression_loss,
        "anchor_sampling": loss_config.blda_anchor_sampling,
        # 0 = every labelled source pixel (BLDALoss: None), as released.
        "anchor_max_samples": loss_config.blda_anchor_max_samples or None,
        "mixed_updates_source": loss_config.blda_mixed_updates_source,
    }


def check_blda_settings(loss_config) -> None:
    """BLDAError naming the `loss.blda_*` key whose value BLDALoss refuses."""
    if loss_config.blda_mode not in BLDA_MODES:
        raise BLDAError(
            f"config: loss.blda_mode must be one of {', '.join(BLDA_MODES)}, "
            f"got {loss_config.blda_mode!r}"
        )
    try:
        BLDALoss(num_classes=2, **blda_arguments(loss_config))
    except BLDAError as error:
        argument, _, rest = str(error).partition(":")
        key = _ARGUMENT_KEYS.get(argument)
        if key is None:
            raise
        for name, other_key in _ARGUMENT_KEYS.items():  # "... >= n_components=5" names a key
            rest = re.sub(rf"\b{name}=", f"{other_key}=", rest)
        raise BLDAError(f"config: {key}:{rest}") from None


class TrainingBLDALoss(nn.Module):
    """The seam's `loss(logits, labels, weights, domain, features, regression=None)` over a
    `BLDALoss`; its state (GMMs, counters) is this module's state_dict, so the loop checkpoints
    and restores it. `capture` keeps the next source batch for the periodic GMM report.
    `update=False` computes the loss from the current statistics without updating them (the
    loop's HRDA detail term; `keeps_statistics` tells the loop it may ask)."""

    keeps_statistics = True

    def __init__(self, blda: BLDALoss, *, with_regression_head: bool, plot_interval: int = 0):
        super().__init__()
        self.blda = blda
        self.needs_regression_head = with_regression_head
        self.plot_interval = int(plot_interval)
        self.captured: tuple[Tensor, Tensor] | None = None
        self.capture = False
        self.logged: dict[str, Tensor] = {}

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        weights: Tensor | None,
        domain: str,
        features: Tensor | None = None,
        regression: Tensor | None = None,
        update: bool = True,
    ) -> Tensor:
        if self.needs_regression_head and regression is None:
            raise BLDAError("loss: blda_mode 'ola+cde' needs the regression head's output")
        if self.capture and domain == "source" and update:
            self.captured = (logits.detach().float(), labels)
        total = self.blda(logits, labels, weights, domain, regression=regression, update=update)
        if update:  # the logged parts are those of the pass's main (updating) call
            self.logged = dict(self.blda.last_terms)
        return total

    def logged_terms(self) -> dict[str, Tensor]:
        """Parts of the last call worth a line in the log: the Eq. 10 term with the head."""
        if not self.needs_regression_head:
            return {}
        return {"regression": self.logged["regression"]}

    def start_iteration(self, iteration: int) -> None:
        """Called before iteration `iteration` (1-based) runs: capture a batch if a report is due."""
        due = self.plot_interval > 0 and iteration % self.plot_interval == 0
        self.capture = due and self.blda.mode != "none"  # "none" keeps no GMMs to report
        self.captured = None

    def finish_iteration(self, iteration: int, run_dir, class_names=None) -> dict | None:
        """After the step: the GMM report (plots in `run_dir`, None = another rank) if due;
        `class_names` title its panels."""
        from blda_tools.training.blda_report import write_report

        if not self.capture:
            return None
        captured, self.captured, self.capture = self.captured, None, False
        if run_dir is None:
            return None
        return write_report(self.blda, captured, run_dir, iteration, class_names)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module, but a state of another loss or class count raises BLDAError."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except (RuntimeError, KeyError, TypeError, BLDAError) as error:
            raise BLDAError(
                f"checkpoint: the saved loss state does not fit loss.name = 'blda' with "
                f"these classes and loss.blda_* settings ({error})"
            ) from None


@register_loss("blda")
def _blda(*, num_classes: int, ignore_index: int, config=None) -> TrainingBLDALoss:
    if config is None:
        raise BLDAError("loss 'blda': needs the training config (its loss.blda_* keys)")
    settings = config.loss
    check_blda_settings(settings)
    _, with_head = BLDA_MODES[settings.blda_mode]
    blda = BLDALoss(num_classes, ignore_index, seed=config.run.seed, **blda_arguments(settings))
    return TrainingBLDALoss(
        blda, with_regression_head=with_head, plot_interval=settings.blda_plot_interval
    )


class CDFRegressionHead(nn.Module):
    """h_phi of Sec. 3.3.5: a 1 x 1 conv on the decoder features predicting d = F_yy(f[y]).

    Owned by the training code so it works on every model with `forward_with_features`. The
    target is a CDF value in [0, 1], so the prediction is sigmoid(conv) (see `predict`): always a
    valid CDF value, and with the classifier-style init (N(0, 0.01), bias 0) it starts at 0.5,
    the mean of d, which is uniform on [0, 1] for pixels drawn from the fitted positive mixture
    (probability integral transform). `forward` gives the raw conv output (inside DDP's forward).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 1)
        nn.init.normal_(self.conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features)

    @staticmethod
    def predict(raw: Tensor, size: tuple[int, int]) -> Tensor:
        """The raw output upsampled (bilinear, as the logits) to `size`, then the sigmoid."""
        upsampled = F.interpolate(raw.float(), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(upsampled)


def feature_channels(model: nn.Module) -> int:
    """Channels of `forward_with_features`' decoder features (`Segmentor.feature_channels`)."""
    channels = getattr(model, "feature_channels", None)
    if not isinstance(channels, int) or channels < 1:
        raise BLDAError(
            f"loss.blda_mode 'ola+cde': the model {type(model).__name__} does not declare "
            "`feature_channels` (the decoder features' channels) for the CDF regression head"
        )
    return channels
