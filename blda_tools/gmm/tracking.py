"""`StepsSinceUpdate`: per-cell counts of iterations since the last update (Algorithm 1)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from blda_tools.errors import BLDAError


class StepsSinceUpdate:
    """Per-cell count n of iterations since a cell's last update (Algorithm 1, line 16).

    Call `tick()` once per iteration (every count grows by 1; it returns n for this iteration),
    then `reset(updated)` after the momentum update (updated cells go back to 0).
    """

    def __init__(self, batch_shape: tuple[int, ...] = (), device=None) -> None:
        self.steps = torch.zeros(tuple(batch_shape), dtype=torch.int64, device=device)

    def tick(self) -> Tensor:
        """Advance one iteration; return the counts n to use in this iteration's update."""
        self.steps += 1
        return self.steps.clone()

    def reset(self, updated: Tensor) -> None:
        """Set n = 0 for the cells updated in this iteration."""
        updated = torch.as_tensor(updated, device=self.steps.device)
        if updated.dtype != torch.bool or updated.shape != self.steps.shape:
            raise BLDAError(f"updated: expected a bool tensor of shape {tuple(self.steps.shape)}")
        self.steps = torch.where(updated, 0, self.steps)

    def state_dict(self) -> dict:
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state: Mapping) -> StepsSinceUpdate:
        steps = state.get("steps") if isinstance(state, Mapping) else None
        if not isinstance(steps, Tensor) or steps.shape != self.steps.shape:
            raise BLDAError(
                f"state_dict: steps should be a tensor of shape {tuple(self.steps.shape)}"
            )
        self.steps = steps.to(device=self.steps.device, dtype=torch.int64).clone()
        return self
