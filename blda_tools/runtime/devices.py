"""A device named by the user, checked: one this machine has, or one line saying why not."""

from __future__ import annotations

import torch

from blda_tools.errors import BLDAError


def checked_device(option: str | torch.device | None, where: str = "device") -> torch.device:
    """`option` ("cpu", "cuda", "cuda:1", "mps"; None: the CPU) as a torch device this machine
    has; `BLDAError` naming `where` otherwise (torch itself fails later, or asserts)."""
    if option is None:
        return torch.device("cpu")
    try:
        device = torch.device(option)
    except (RuntimeError, TypeError):
        raise BLDAError(
            f"{where}: {option!r} is not a device; expected auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BLDAError(f"{where} {option}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BLDAError(
                f"{where} {option}: GPU {device.index} does not exist "
                f"({torch.cuda.device_count()} found)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BLDAError(f"{where} {option}: MPS is not available on this machine")
    elif device.type not in ("cpu", "mps"):
        raise BLDAError(f"{where}: {option!r} is not supported; expected cpu, cuda or mps")
    return device
