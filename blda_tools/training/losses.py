"""The per-pixel loss seam of the training loop, and the default weighted cross-entropy.

A loss is any callable `loss(logits, labels, weights, domain, features) -> scalar tensor`:
  * `logits` (B, C, H, W) float, already resized to the label resolution;
  * `labels` (B, H, W) int64 with the ignore index;
  * `weights` (B, H, W) float pixel weights, or None (the source batch: all ones);
  * `domain` "source" (labelled source crops) or "mixed" (ClassMix images: weight 1 marks
    pasted source pixels, 0 <= weight < 1 pseudo-labelled target pixels);
  * `features` the decoder features of `forward_with_features` (B, F, h, w).
A loss holding state (e.g. the online BLDA GMMs) may be an `nn.Module` or offer
`state_dict()` / `load_state_dict()`; the loop checkpoints it and restores it on `--resume`.
Losses register under a name used by the config key `loss.name`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from blda_tools.errors import BLDAError

LossFactory = Callable[..., Callable]
_LOSSES: dict[str, LossFactory] = {}


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator: register `factory(num_classes=..., ignore_index=..., config=...)` as `name`."""

    def decorator(factory: LossFactory) -> LossFactory:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = factory
        return factory

    return decorator


def build_loss(name: str, *, num_classes: int, ignore_index: int, config=None):
    """The loss registered as `name` (config key `loss.name`)."""
    if name not in _LOSSES:
        raise BLDAError(
            f"config: loss.name {name!r} is unknown; valid: {', '.join(sorted(_LOSSES))}"
        )
    return _LOSSES[name](num_classes=num_classes, ignore_index=ignore_index, config=config)


class WeightedCrossEntropy:
    """Pixel-weighted cross-entropy averaged over ALL pixels, ignored ones counting as 0.

    That is mmseg's reduction (`weight_reduce_loss` with mean): the average does not depend on
    how many pixels are ignored in each image, so with equal crop sizes the mean over a batch
    equals the mean of the per-process means, and DDP's gradient averaging is exact.
    """

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = ignore_index

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None,
        domain: str,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        per_pixel = F.cross_entropy(
            logits.float(), labels, reduction="none", ignore_index=self.ignore_index
        )
        if weights is not None:
            per_pixel = per_pixel * weights
        return per_pixel.mean()


@register_loss("cross_entropy")
def _cross_entropy(*, num_classes: int, ignore_index: int, config=None) -> WeightedCrossEntropy:
    return WeightedCrossEntropy(ignore_index)


def loss_state(loss) -> dict:
    """The loss's `state_dict()` if it has one, else {}."""
    return loss.state_dict() if hasattr(loss, "state_dict") else {}


def load_loss_state(loss, state: dict) -> None:
    """Restore what `loss_state` saved; a stateful loss with no saved state is an error."""
    if hasattr(loss, "load_state_dict"):
        loss.load_state_dict(state)
    elif state:
        raise BLDAError("checkpoint: holds a loss state but the configured loss keeps none")
