"""File-system helpers shared by every writer: atomic outputs, writable directories, and one
translation of OS failures (full disk, read-only or virtual file system, a name the file system
refuses) into a one-line `BLDAError` naming the path and the cause."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from blda_tools.errors import (
    BLDAError,
    is_out_of_memory,
    loader_worker_death,
    out_of_memory_text,
)

PARTIAL_SUFFIX = ".partial"
# The longest file name most Linux file systems take (ext4, xfs, tmpfs, btrfs).
DEFAULT_NAME_MAX = 255
# libhdf5 reports OS failures as text: "..., errno = 28, error message = 'No space left ...'".
_HDF5_CAUSE = re.compile(r"error message = '([^']*)'")
_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def describe_os_error(error: BaseException) -> str:
    """The cause of an OS failure in a few words ("No space left on device"), from Python's
    `OSError`, from h5py's text, or from torch's C++ writers."""
    text = str(error)
    cause = _HDF5_CAUSE.search(text)  # h5py puts its whole report into strerror
    if cause:
        return cause.group(1)
    number = _HDF5_ERRNO.search(text)
    if number and int(number.group(1)) in errno.errorcode:
        return os.strerror(int(number.group(1)))
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first_line[:200]


def write_failure(path: str | os.PathLike, error: BaseException) -> BLDAError:
    """The error to raise when writing `path` failed with `error`."""
    return BLDAError(f"{path}: cannot write: {describe_os_error(error)}")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def partial_path(path: str | os.PathLike) -> Path:
    """Where an output is written before it is complete (renamed to `path` at the end):
    `<name>.partial`, or a shortened name with a checksum when that would be too long for the
    file system although `<name>` itself is not."""
    path = Path(path)
    name = path.name + PARTIAL_SUFFIX
    limit = _name_max(path.parent) if path.parent.is_dir() else DEFAULT_NAME_MAX
    if len(os.fsencode(name)) <= limit or len(os.fsencode(path.name)) > limit:
        return path.with_name(name)
    tag = f"~{zlib.crc32(os.fsencode(path.name)):08x}{PARTIAL_SUFFIX}"
    keep = path.name.encode()[: limit - len(tag) - 4].decode(errors="ignore")
    return path.with_name(keep + tag)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write therefore never leaves a file under the final name, and
    leaves no temporary file either. An OS failure (inside the block or at the rename) becomes
    a `BLDAError` naming `path` and the cause.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    temporary = partial_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise write_failure(path, error) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, flushed to disk before it gets its name."""
    path = Path(path)
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def save_torch(content, path: str | os.PathLike) -> Path:
    """`torch.save(content)` to `path` atomically. The bytes are built in memory first: torch's
    zip writer aborts the whole process when the disk fills up under it."""
    import torch

    buffer = io.BytesIO()
    torch.save(content, buffer)
    return write_bytes(path, buffer.getbuffer())


def save_torchscript(module, path: str | os.PathLike) -> Path:
    """`torch.jit.save(module)` to `path` atomically, built in memory first (as `save_torch`)."""
    import torch

    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return write_bytes(path, buffer.getbuffer())


def created_directories(directory: str | os.PathLike) -> list[Path]:
    """Create `directory` and its missing parents; return those created, deepest first, so a
    failed run can remove them again (`remove_empty_directories`)."""
    directory = Path(directory) if str(directory) else Path(".")
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    ensure_writable_dir(directory)
    return missing


def remove_empty_directories(directories: list[Path]) -> None:
    """Remove each of `directories` (deepest first) that is empty; keep any that is not."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and check that files can be written there."""
    directory = Path(directory) if str(directory) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BLDAError(f"{directory}: exists and is not a directory") from None
    except OSError as error:
        raise BLDAError(
            f"{directory}: cannot create the directory: {describe_os_error(error)}"
        ) from None
    if not directory.is_dir():
        raise BLDAError(f"{directory}: exists and is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BLDAError(f"{directory}: cannot write: {_why_unwritable(directory)}")
    return directory


def _why_unwritable(directory: Path) -> str:
    with contextlib.suppress(OSError):
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    return os.strerror(errno.EACCES)


def check_input_file(path: str | os.PathLike, where: str, expected: str) -> Path:
    """`path` as an input file, or a BLDAError that says what it is instead: missing, a folder,
    not a regular file. `where` starts the message (`--checkpoint model.pth`)."""
    path = Path(path)
    if path.is_dir():
        raise BLDAError(f"{where}: is a directory; expected {expected}")
    if not path.exists():
        raise BLDAError(f"{where}: no such file")
    if not path.is_file():
        raise BLDAError(f"{where}: not a regular file; expected {expected}")
    return path


def read_text_file(path: str | os.PathLike, expected: str) -> str:
    """The UTF-8 text of `path`, or a BLDAError naming it and what it should hold (a binary
    or otherwise encoded file given where a text file is expected)."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a leading BOM is not text
    except UnicodeDecodeError as error:
        raise BLDAError(
            f"{as_text(path)}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); expected {expected}"
        ) from None


def as_text(value: str | os.PathLike) -> str:
    r"""`value` (a path, mostly) as text an output can hold: output files and HDF5 strings are
    UTF-8, but a Linux file name may be any bytes, which Python keeps as lone surrogates. Each
    byte that is not UTF-8 becomes the four characters \xNN (any other lone surrogate \uXXXX)."""
    text = os.fspath(value)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


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


def os_failure(error: OSError) -> BLDAError:
    """An OS failure that reached the command line, as the one-line error the CLI prints."""
    where = error.filename if error.filename is not None else "file system"
    return BLDAError(f"{where}: {describe_os_error(error)}")


def resource_failure(error: BaseException) -> str | None:
    """The line for a resource that ran out: an OS failure (a full disk, ...), memory, or a
    data loader worker killed; None for any other error."""
    if isinstance(error, OSError):
        return str(os_failure(error))
    died = loader_worker_death(error)
    if died is not None:
        return str(died)
    return out_of_memory_text(error) if is_out_of_memory(error) else None
