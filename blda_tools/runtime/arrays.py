"""numpy arrays from what users pass (numpy, lists, torch tensors), without importing torch.

A value can only be a torch tensor if torch is already loaded, so `sys.modules` answers the
isinstance question for free: code paths that never meet torch (`blda diagnose`) never pay its
second of import time.
"""

from __future__ import annotations

import sys

import numpy as np


def loaded_torch():
    """The torch module if this process has imported it, else None."""
    return sys.modules.get("torch")


def is_tensor(value) -> bool:
    torch = loaded_torch()
    return torch is not None and isinstance(value, torch.Tensor)


def as_numpy(value) -> np.ndarray:
    """A numpy view or copy of `value`: tensors are detached and brought to the CPU (bfloat16,
    which numpy lacks, as float32, which holds it exactly); anything else via `np.asarray`."""
    if is_tensor(value):
        value = value.detach()
        if value.dtype == loaded_torch().bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)
