"""Name -> factory registry of segmentation models."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from blda_tools.errors import BLDAError

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register `factory(num_classes, **options) -> nn.Module` under `name`."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        _import_builtin_models()  # a clash with a built-in name is refused here, not later
        _add(name, factory)
        return factory

    return decorator


def _add(name: str, factory: ModelFactory) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    _import_builtin_models()
    return sorted(_REGISTRY)


def create_model(arch: str, num_classes: int, **options) -> nn.Module:
    """Build the registered model `arch` with `num_classes` output channels.

    `options` go to the factory (e.g. `regression_head=True` for the DAFormer models); an
    option the factory does not take is refused with the ones it does.
    """
    _import_builtin_models()
    if arch not in _REGISTRY:
        raise BLDAError(
            f"--model: unknown architecture {arch!r}; valid: {', '.join(list_models())}"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise BLDAError(f"num_classes: expected a positive integer, got {num_classes!r}")
    factory = _REGISTRY[arch]
    accepted = [
        name
        for name, parameter in inspect.signature(factory).parameters.items()
        if parameter.kind == parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BLDAError(
            f"model {arch}: unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(accepted) or 'none'}"
        )
    model = factory(num_classes, **options)
    model.arch = arch  # named in loading messages
    return model


@functools.cache
def _import_builtin_models() -> None:
    # Lazily, so that importing the registry does not build the architecture modules.
    from blda_tools.models.architectures import BUILTIN_ARCHITECTURES

    for name, factory in BUILTIN_ARCHITECTURES.items():
        _add(name, factory)
