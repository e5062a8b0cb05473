"""Options that contradict each other or mean nothing, refused with both options named.

`given(ctx, name)` tells an option typed on the command line from its default; the commands call
`refuse_together` / `require` in their bodies. `refuse_empty_values` (applied by the `blda`
group to every command) refuses an empty value such as `--tau ""` or `--out ""`, which click
would otherwise take as "no value" or as the current directory.
"""

from __future__ import annotations

from collections.abc import Iterable

import click
from click.core import ParameterSource

from blda_tools.errors import BLDAError


def given(ctx: click.Context, name: str) -> bool:
    """True when the parameter `name` was set by the user (command line or environment)."""
    source = ctx.get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def option_text(ctx: click.Context, name: str) -> str:
    """How the user spells the parameter `name` (`--fit-on`, or `STORES` for an argument)."""
    for param in ctx.command.params:
        if param.name == name:
            if isinstance(param, click.Option):
                return max(param.opts, key=len)
            return param.human_readable_name
    return name


def refuse_together(ctx: click.Context, option: str, others: Iterable[str], why: str) -> None:
    """BLDAError when `option` and any of `others` are both given: '--a and --b: why'."""
    if not given(ctx, option):
        return
    for other in others:
        if given(ctx, other):
            raise BLDAError(f"{option_text(ctx, option)} and {option_text(ctx, other)}: {why}")


def require(ctx: click.Context, option: str, needed: str, why: str) -> None:
    """BLDAError when `option` is given without `needed`."""
    if given(ctx, option) and not given(ctx, needed):
        raise BLDAError(f"{option_text(ctx, option)} without {option_text(ctx, needed)}: {why}")


def _empty(value) -> bool:
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, tuple | list):
        return any(_empty(item) for item in value)
    return False


def refuse_empty_values(command: click.Command) -> click.Command:
    """Make every parameter of `command` (and of its sub-commands) refuse an empty value before
    click converts it (a path "" would become the current directory)."""
    if getattr(command, "_refuses_empty_values", False):
        return command
    command._refuses_empty_values = True
    for param in command.params:
        if isinstance(param, click.Option) and param.is_flag:
            continue
        original = param.process_value

        def process_value(ctx, value, param=param, original=original):
            if _empty(value) and ctx.get_parameter_source(param.name) not in (
                ParameterSource.DEFAULT,
                ParameterSource.DEFAULT_MAP,
            ):
                where = max(param.opts, key=len) if isinstance(param, click.Option) else None
                raise BLDAError(
                    f"{where or param.human_readable_name}: empty value; expected "
                    "a value, or leave the option out for its default"
                )
            return original(ctx, value)

        param.process_value = process_value
    for sub in getattr(command, "commands", {}).values():
        refuse_empty_values(sub)
    return command
