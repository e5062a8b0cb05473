"""Where a dump writes and what it records: this rank's images and its shard's name, the
store's metadata (what it was dumped from), an unfinished store to continue, and the stores of
an earlier dump to the same `--out` with another number of ranks (the output policy,
docs/outputs.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import h5py

from blda_tools.errors import BLDAError
from blda_tools.fileio import partial_path
from blda_tools.inference.predict import distributed_rank
from blda_tools.outputs import claim_file, read_manifest, record_set

COMMAND = "dump-logits"
# Metadata that must match between an unfinished store and a resumed run.
RESUME_KEYS = ("model", "checkpoint", "weights", "dataset", "split", "inference", "sampling")


def shard_of(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) as given, or torchrun's environment when either is None."""
    if rank is None or world_size is None:
        return distributed_rank()
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise BLDAError(
            f"rank={rank!r}, world_size={world_size!r}: expected integers 0 <= rank < world_size"
        )
    return rank, world_size


def images_of_rank(count: int, rank: int, world_size: int) -> range:
    """The indices of the `count` images that rank `rank` dumps (every world_size-th)."""
    planned = range(rank, count, world_size)
    if not planned:
        raise BLDAError(
            f"rank {rank} of {world_size}: no image to dump ({count} in all, one per rank at "
            f"most); run at most {count} processes"
        )
    return planned


def dump_metadata(
    model_spec, checkpoint, weights, dataset, data_root, split, inference, protocol, sampling,
    rank, world_size,
) -> dict:  # fmt: skip
    """What a store was dumped from, stored with it; `--resume` compares it (`RESUME_KEYS`)."""
    return {
        "model": model_spec,
        # absolute: a resumed run may start elsewhere, and the store says what it came from
        "checkpoint": None if checkpoint is None else os.path.abspath(checkpoint),
        "checkpoint_fingerprint": checkpoint_fingerprint(checkpoint),
        "weights": weights,
        "dataset": dataset,
        "data_root": os.path.abspath(data_root),
        "split": split,
        "inference": inference.to_metadata(),
        "inference_protocol": protocol,
        "sampling": vars(sampling).copy(),
        "shard": {"rank": rank, "world_size": world_size},
    }


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The file rank `rank` of `world_size` writes: `<stem>.rank<r>-of-<W><suffix>`."""
    out = Path(out)
    if world_size <= 1:
        return out
    return out.with_name(f"{out.stem}.rank{rank}-of-{world_size}{out.suffix}")


def remove_other_layouts(out: Path, world_size: int) -> None:
    """Remove the stores of an earlier dump to the same `out` written with another number of
    ranks (`out` itself, or `<stem>.rank<r>-of-<W>` shards), where this command wrote them: a
    re-run never leaves an earlier run's shards beside the new ones."""
    directory = out.parent if str(out.parent) else Path(".")
    current = {shard_path(out, rank, world_size).name for rank in range(world_size)}
    pattern = re.compile(rf"{re.escape(out.stem)}\.rank\d+-of-\d+{re.escape(out.suffix)}")
    for owner in read_manifest(directory):
        name = owner.partition(" ")[2]
        is_layout = name == out.name or pattern.fullmatch(name)
        if owner.startswith(f"{COMMAND} ") and is_layout and name not in current:
            (directory / name).unlink(missing_ok=True)
            record_set(directory, owner, [])


def _being_written(path: Path) -> bool:
    """Whether another process has the HDF5 file `path` open for writing: HDF5 locks a file it
    writes, and an open for reading then fails with EAGAIN ("unable to lock file")."""
    try:
        with h5py.File(path, "r"):
            return False
    except OSError as error:
        return error.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock" in str(error)


def names_already_stored(
    out: Path, resume: bool, metadata: dict, planned: set[str], layout: dict
) -> set[str]:
    """Images an unfinished store of `out` committed, after checking it may be continued:
    written with the same settings and data (`RESUME_KEYS`, `PATH_KEYS`: else the store would
    mix two dumps), every image it holds among this run's `planned` names, its logits of this
    run's `layout` (dtype, compression)."""
    path = partial_path(out)
    if path.exists() and _being_written(path):
        raise BLDAError(
            f"--out {out}: another dump-logits is writing {path} now; wait for it to finish "
            "(then --resume, if it was stopped), or choose another --out"
        )
    if not resume:
        if path.exists():
            raise BLDAError(
                f"--out {out}: {path} exists, an unfinished dump; pass --resume to continue it, "
                "or delete it to start again"
            )
        claim_file(out, COMMAND)  # a store this command wrote is replaced, nothing else
        return set()
    if not path.exists():
        if out.exists():
            raise BLDAError(
                f"--resume: {out} is already complete, nothing to resume; run without --resume "
                "to dump it again (the store is then replaced)"
            )
        return set()
    try:
        with h5py.File(path, "r") as file:
            stored = json.loads(file.attrs["metadata"])
            committed = int(file.attrs["committed_images"])
            names = {name.decode() for name in file["images/name"][:committed]}
            logits = file["logits"]
            stored_layout = {"dtype": str(logits.dtype), "compression": logits.compression}
    except (OSError, KeyError, ValueError) as error:
        raise BLDAError(
            f"--resume: {path} is not a resumable logit store ({error}); delete it"
        ) from None
    _check_same_run(path, stored, metadata)
    for key, option in (("dtype", "--float32"), ("compression", "--compression")):
        if stored_layout[key] != layout[key]:
            raise BLDAError(
                f"--resume: {path} holds {key}={stored_layout[key]!r}, this run has "
                f"{key}={layout[key]!r} ({option}); use the same options or delete it"
            )
    outside = sorted(names - planned)
    if outside:
        raise BLDAError(
            f"--resume: {path} holds {len(outside)} image(s) this run would not dump (first: "
            f"{outside[0]!r}); use the same --split, --max-images and number of ranks, or "
            "delete it"
        )
    return names


# Paths compared by the file they name: the same checkpoint or data folder given another way
# (absolute, relative, through a link) is the same run.
PATH_KEYS = ("checkpoint", "data_root")


# Bytes read from each end of a checkpoint for its fingerprint. A torch zip archive ends with
# its central directory, which holds every entry's CRC-32, so the tail changes with any weight.
FINGERPRINT_BYTES = 1 << 20


def checkpoint_fingerprint(checkpoint: str | os.PathLike | None) -> str | None:
    """SHA-256 of a checkpoint's size and its first and last MB: a rewritten file at the same
    path (training's `latest.pth`) tells itself apart without reading gigabytes."""
    if checkpoint is None:
        return None
    digest = hashlib.sha256()
    try:
        with open(checkpoint, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            digest.update(str(size).encode())
            digest.update(file.read(FINGERPRINT_BYTES))
            file.seek(max(size - FINGERPRINT_BYTES, 0))
            digest.update(file.read(FINGERPRINT_BYTES))
    except OSError as error:
        raise BLDAError(f"--checkpoint {checkpoint}: cannot read: {error.strerror}") from None
    return digest.hexdigest()


def _check_same_run(path: Path, stored: dict, metadata: dict) -> None:
    for key in RESUME_KEYS + PATH_KEYS:
        before, now = stored.get(key), metadata[key]
        if key in PATH_KEYS and before is not None and now is not None:
            same = os.path.realpath(before) == os.path.realpath(now)
        else:
            same = before == now
        if not same:
            raise BLDAError(
                f"--resume: {path} was written with {key}={before!r}, this run has "
                f"{key}={now!r}; use the same options or delete it"
            )
    # Stores of blda before the fingerprint have none to compare.
    before = stored.get("checkpoint_fingerprint")
    if before is not None and before != metadata["checkpoint_fingerprint"]:
        raise BLDAError(
            f"--resume: {path} was dumped from another version of {metadata['checkpoint']} (the "
            f"file has changed since: new weights would mix two models in one store); delete "
            f"{path} and dump again, or resume with the checkpoint it was dumped from"
        )
