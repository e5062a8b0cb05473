"""Small file-system helpers shared by every writer: atomic outputs and writable directories."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from blda_tools.errors import BLDAError

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """Where an output is written before it is complete (renamed to `path` at the end)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write therefore never leaves a file under the final name.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    temporary = partial_path(path)
    try:
        yield temporary
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    os.replace(temporary, path)


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and check that files can be written there."""
    directory = Path(directory) if str(directory) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BLDAError(f"cannot create output directory {directory}: {error.strerror}") from None
    if not directory.is_dir():
        raise BLDAError(f"output path {directory} exists and is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BLDAError(f"output directory {directory} is not writable")
    return directory


def json_ready(value):
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def write_json(path: str | os.PathLike, content) -> Path:
    """Write `content` as indented JSON atomically; NaN and infinities become null."""
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(json_ready(content), indent=2) + "\n", encoding="utf-8")
    return path


def none_to_nan(values) -> list[float]:
    """The inverse direction for lists read back from JSON: None becomes NaN."""
    return [math.nan if value is None else value for value in values]
