"""Package names imported from their modules on first use (PEP 562).

A package whose `__init__` would import torch for a few names instead declares where each
lives; `blda --help` can then read the package's light constants without loading torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`: name -> submodule in `exports`; a name, once
    looked up, is stored in the package's `namespace` (its `globals()`)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
