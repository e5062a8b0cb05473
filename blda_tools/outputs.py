"""Which files a command owns, and writing a command's files as one set.

The policy, the same for every command (docs/outputs.md):
- A command owns the files it wrote before, as recorded in `.blda-outputs.json` of the directory
  they are in. A re-run replaces them, and removes those of the earlier run it does not write
  again, so an output directory never mixes two runs.
- A file the command did not write (the user's, or another command's) is never touched: when
  the command would write a file of that name it refuses before any work, naming the file.
- The files of one run are built in a hidden staging folder `.blda-partial-<command>` inside
  the output directory and moved into place only when all are complete. A killed run leaves
  only that folder, which the next run of the command removes; a failed run removes it, and
  the output directories it created if they are left empty.
- A run holds a lock on its staging folder until it is done: a second run of the same command
  into the same output refuses at once, naming it (two diagnose runs into one --out each
  emptied the other's staging folder; both reported success and left nothing).

A set is named by its command and key: key "." for a command that owns a whole output directory
(`diagnose`, `calibrate`), the file name for one that writes a single file into a directory
(`export --out model.pt`), so two such files in one directory are two sets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from blda_tools.errors import BLDAError
from blda_tools.fileio import (
    PARTIAL_SUFFIX,
    created_directories,
    describe_os_error,
    remove_empty_directories,
    write_json,
)

MANIFEST = ".blda-outputs.json"
MANIFEST_FORMAT = "blda-outputs"
STAGING_PREFIX = ".blda-partial-"
WHOLE_DIRECTORY = "."


def set_name(command: str, key: str = WHOLE_DIRECTORY) -> str:
    """The manifest's name of a set: the command, and the file name for single-file sets."""
    return command if key == WHOLE_DIRECTORY else f"{command} {key}"


def read_manifest(directory: Path) -> dict[str, list[str]]:
    """Sets recorded in `directory` (set name -> relative file names); empty when none."""
    path = directory / MANIFEST
    if not path.is_file():
        if path.exists() or path.is_symlink():  # found now, not when the run's work is done
            raise BLDAError(
                f"{path}: expected blda's record of the files it wrote here (a file); it is "
                "not a regular file: remove it"
            )
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        sets = content["sets"] if content.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError, KeyError, AttributeError):
        sets = None
    if not isinstance(sets, dict) or not all(isinstance(files, list) for files in sets.values()):
        raise _damaged_record(path, "")
    inside = directory.resolve()
    for files in sets.values():
        for name in files:
            _check_recorded(path, inside, str(name))
    return {str(name): [str(file) for file in files] for name, files in sets.items()}


def _check_recorded(record: Path, inside: Path, name: str) -> None:
    """blda records the files it wrote by relative names inside the directory. Any other
    entry (absolute, "..", a folder, or a file behind a symbolic link to elsewhere) would make
    a re-run remove a file outside it, and a record may come from anyone: it is refused here,
    when the record is read, before any work and any removal."""
    folder = name.endswith("/")  # a folder the set owns as a whole (train's blda/)
    relative = PurePosixPath(name)
    if not name.strip("/") or relative.is_absolute() or ".." in relative.parts:
        raise _damaged_record(record, f" (it lists {name!r}, not a file inside {record.parent})")
    target = record.parent / name
    if not target.parent.resolve().is_relative_to(inside):
        raise _damaged_record(record, f" (it lists {name!r}, which lies outside the directory)")
    if folder and target.is_symlink():
        raise _damaged_record(record, f" (it lists {name!r}, which is a symbolic link)")
    if not folder and target.is_dir() and not target.is_symlink():
        raise _damaged_record(record, f" (it lists {name!r}, which is a folder)")


def _damaged_record(path: Path, detail: str) -> BLDAError:
    return BLDAError(
        f"{path}: damaged record of the files blda wrote here{detail}; delete it (blda then "
        "treats the files of this directory as not its own)"
    )


def _write_manifest(directory: Path, sets: dict[str, list[str]]) -> None:
    sets = {name: sorted(files) for name, files in sets.items() if files}
    if not sets:
        with contextlib.suppress(FileNotFoundError):
            (directory / MANIFEST).unlink()
        return
    write_json(directory / MANIFEST, {"format": MANIFEST_FORMAT, "version": 1, "sets": sets})


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise manifest updates of one directory (torchrun ranks write shards side by side)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


# Output sets whose command name is not how a user runs it.
_COMMAND_LINES = {"calibrate-apply": "blda calibrate --apply"}


def command_line(command: str) -> str:
    """How a user runs the command that writes the output sets named `command`."""
    return _COMMAND_LINES.get(command, f"blda {command}")


def check_can_write(
    directory: Path, name: str, owner: str, sets: dict[str, list[str]], option: str = "--out"
) -> None:
    """Refuse when `directory/name` exists and is not a file of the set `owner` (`option`:
    the command's option that names where it writes), and when its folder is a symbolic link
    out of `directory`: blda writes inside it only."""
    target = directory / name
    if not target.parent.resolve().is_relative_to(directory.resolve()):
        raise BLDAError(
            f"{target}: its folder leads out of {directory} (a symbolic link); blda writes only "
            f"inside {option}: remove the link or choose another {option}"
        )
    if not (target.exists() or target.is_symlink()):
        return
    holders = [set_name for set_name, files in sets.items() if name in files]
    if owner in holders:
        return
    command = command_line(owner.split(" ")[0])
    if holders:
        cause = f"written by `{command_line(holders[0].split(' ')[0])}`, not by `{command}`"
    else:
        cause = f"exists and was not written by `{command}` (no record in {MANIFEST})"
    raise BLDAError(
        f"{target}: {cause}; blda does not replace it: remove it or choose another {option}"
    )


def check_set(
    directory: str | os.PathLike,
    command: str,
    names: Iterable[str],
    *,
    key: str = WHOLE_DIRECTORY,
) -> None:
    """Refuse, before any work, when a file of `names` exists in `directory` and is not the
    set's own (what `output_set` checks on entry; a pipeline such as the demo checks every
    stage's set first)."""
    directory = checked_output_path(directory, "out")
    if not directory.is_dir():
        return
    sets, owner = read_manifest(directory), set_name(command, key)
    for name in sorted(Path(name).as_posix() for name in names):
        check_can_write(directory, name, owner, sets)


@dataclass
class OutputSet:
    """Files being written as one set: write each under `path(name)`, inside `staging`."""

    directory: Path
    command: str
    key: str
    staging: Path
    names: frozenset[str] | None
    created: list[Path] = field(default_factory=list)

    @property
    def owner(self) -> str:
        return set_name(self.command, self.key)

    def path(self, name: str | os.PathLike) -> Path:
        """Where to write the output `name` (relative to the output directory) now."""
        relative = Path(name).as_posix()
        if self.names is not None and relative not in self.names:
            raise BLDAError(f"{self.directory / relative}: not an output `{self.command}` declared")
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def staged_files(self) -> list[str]:
        return sorted(
            path.relative_to(self.staging).as_posix()
            for path in self.staging.rglob("*")
            if path.is_file() and not path.name.endswith(".partial")
        )

    def commit(self) -> list[str]:
        """Move the staged files into place, replacing and removing the earlier run's."""
        written = self.staged_files()
        with _locked(self.directory):
            sets = read_manifest(self.directory)
            for name in written:
                check_can_write(self.directory, name, self.owner, sets)
            earlier = sets.get(self.owner, [])
            # Recorded first as the union: a run killed while moving leaves only owned files.
            sets[self.owner] = sorted(set(earlier) | set(written))
            _write_manifest(self.directory, sets)
            for name in set(earlier) - set(written):
                _remove_owned(self.directory, name)
            for name in written:
                target = self.directory / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staging / name, target)
            sets[self.owner] = written
            _write_manifest(self.directory, sets)
        shutil.rmtree(self.staging, ignore_errors=True)
        return written


def _remove_owned(directory: Path, name: str) -> None:
    target = directory / name  # checked when the record was read (`_check_recorded`)
    if name.endswith("/"):  # an owned folder, not a link (checked)
        shutil.rmtree(target, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    parent = target.parent
    while parent != directory:  # sub-folders the set made (trainIds/city/...) go when empty
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def staging_dir(directory: Path, command: str, key: str = WHOLE_DIRECTORY) -> Path:
    suffix = "" if key == WHOLE_DIRECTORY else f"-{zlib.crc32(key.encode()):08x}"
    return directory / f"{STAGING_PREFIX}{command}{suffix}"


@contextlib.contextmanager
def output_set(
    directory: str | os.PathLike,
    command: str,
    names: Iterable[str] | None = None,
    *,
    key: str = WHOLE_DIRECTORY,
) -> Iterator[OutputSet]:
    """Write a command's outputs in `directory` as one set (see the module docstring).

    `names` are the files the command may write (relative paths); each that exists already
    must be the command's own, checked here, before any work. Leaving the block normally moves
    the set into place; an exception removes everything this run made.
    """
    directory = checked_output_path(directory, "out")
    # Named in errors: the output the user asked for (the file, for a single-file set).
    where = directory if key == WHOLE_DIRECTORY else directory / key
    created = []
    try:
        created = created_directories(directory)
        declared = None if names is None else frozenset(Path(n).as_posix() for n in names)
        check_set(directory, command, declared or (), key=key)
        staging = staging_dir(directory, command, key)
        lock = _claim_staging(staging, where, command)
    except BaseException as error:
        remove_empty_directories(created)
        if isinstance(error, OSError):
            raise BLDAError(f"{where}: cannot write: {describe_os_error(error)}") from None
        raise
    outputs = OutputSet(directory, command, key, staging, declared, created)
    try:
        yield outputs
        outputs.commit()
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty_directories(created)
        if isinstance(error, OSError):
            raise BLDAError(f"{where}: cannot write: {describe_os_error(error)}") from None
        if isinstance(error, BLDAError) and str(staging) in str(error):
            # Name the file the user will look for, not where it was being built.
            raise BLDAError(str(error).replace(str(staging), str(directory))) from None
        raise
    finally:
        os.close(lock)  # after the staging folder is gone


def _claim_staging(staging: Path, where: Path, command: str) -> int:
    """Make `staging` an empty folder locked by this run (`hold_lock`). A folder left by a
    killed run is unlocked and emptied; one locked by a running command is refused."""
    busy = (
        f"{where}: another `{command_line(command)}` is writing there now; wait for it to finish or "
        "choose another --out"
    )
    descriptor = hold_lock(staging, busy, directory=True)
    try:
        for leftover in staging.iterdir():  # a killed run's files
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def hold_lock(path: Path, busy: str, *, directory: bool = False) -> int:
    """Lock `path` (a folder, or a file made if missing) for as long as the returned descriptor
    is open; `BLDAError(busy)` when another process holds it. flock: the kernel releases it
    when the process dies, so a killed run never leaves a stale lock behind."""
    while True:
        if directory:
            path.mkdir(exist_ok=True)
            descriptor = os.open(path, os.O_RDONLY)
        else:
            descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise BLDAError(busy) from None
        # A holder removes `path` as it finishes: a lock on what it removed holds nothing.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(descriptor), os.stat(path)):
                return descriptor
        os.close(descriptor)


def checked_output_path(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path; an empty one is refused (the CLI refuses an empty option value, and
    the library must not take it as the current directory either)."""
    if isinstance(path, str) and not path.strip():
        raise BLDAError(f"{what}: an empty path; give a file or directory ('.' for this one)")
    if not isinstance(path, (str, os.PathLike)):
        raise BLDAError(f"{what}: expected a path, got {type(path).__name__}")
    name = Path(path).name
    if name == MANIFEST or name.startswith(STAGING_PREFIX) or name.endswith(PARTIAL_SUFFIX):
        # blda's record, staging folders and unfinished files: a later run reads, replaces or
        # removes them as its own
        raise BLDAError(
            f"{what}: {os.fspath(path)!r}: a name blda keeps for itself ({MANIFEST}, "
            f"{STAGING_PREFIX}*, *{PARTIAL_SUFFIX}); choose another name"
        )
    return Path(path)


def checked_output_file(path: str | os.PathLike, what: str) -> Path:
    """`checked_output_path` of a file to write: `path` must end in a file name (not
    "dir/", ".", "..", "/"), which `Path` would drop or keep as a folder."""
    checked = checked_output_path(path, what)
    if os.path.basename(os.fspath(path)) in ("", ".", ".."):
        raise BLDAError(
            f"{what}: {os.fspath(path)!r} names a folder; expected the name of the file to "
            "write, as in DIR/NAME"
        )
    return checked


@contextlib.contextmanager
def output_file(path: str | os.PathLike, command: str) -> Iterator[Path]:
    """A single output file as a set of one: yields where to write it."""
    path = checked_output_file(path, "out")
    if _is_dir(path):
        raise BLDAError(f"{path}: is a directory; expected the name of the file to write")
    with output_set(path.parent, command, [path.name], key=path.name) as outputs:
        yield outputs.path(path.name)


def claim_file(path: str | os.PathLike, command: str) -> None:
    """Before writing `path` outside an `output_set` (a resumable store), check it may be."""
    path = checked_output_file(path, "out")
    if _is_dir(path):
        raise BLDAError(f"{path}: is a directory; expected the name of the file to write")
    directory = path.parent if str(path.parent) else Path(".")
    if directory.is_dir():
        check_can_write(
            directory, path.name, set_name(command, path.name), read_manifest(directory)
        )


def record_file(path: str | os.PathLike, command: str) -> None:
    """Record `path`, now complete, as the output of `command` (see `claim_file`)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    record_set(directory, set_name(command, path.name), [path.name])


def record_set(directory: str | os.PathLike, owner: str, names: Iterable[str]) -> None:
    """Record `names` in `directory` as the set `owner` (a set name); none: forget the set."""
    directory = Path(directory)
    with _locked(directory):
        sets = read_manifest(directory)
        # an owned folder keeps its "/" (which Path drops)
        sets[owner] = [Path(name).as_posix() + "/" * str(name).endswith("/") for name in names]
        _write_manifest(directory, sets)


def remove_sets(
    directory: str | os.PathLike, owners: Iterable[str], keep_directory: bool = False
) -> None:
    """Remove the files of the sets `owners` (set names) recorded in `directory` and forget
    them; `directory` goes too if that leaves it empty, unless `keep_directory` (a folder
    the user made). Other files are not touched."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    with _locked(directory):
        sets = read_manifest(directory)
        for owner in owners:
            for name in sets.pop(owner, []):
                _remove_owned(directory, name)
        _write_manifest(directory, sets)
    if not keep_directory:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError as error:  # a name too long for the file system
        raise BLDAError(f"{path}: cannot write: {describe_os_error(error)}") from None
