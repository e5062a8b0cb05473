"""The `blda dump-logits` job: a model's logits on a dataset, written to a logit store.

Images are decoded in DataLoader worker processes while the main process runs the model and
writes the store (`LogitWriter`, atomic: `<out>.partial` until complete), so loading overlaps
compute. Per image the store keeps the full map at label resolution, every `stride`-th pixel
in both axes, or `pixels_per_image` sampled pixels (uniformly, or stratified by class), with
their positions.

Resume: `resume=True` reopens `<out>.partial` and skips the images already stored; sampling is
seeded per image name, so the result equals an uninterrupted run. Sharding: when `WORLD_SIZE`
> 1 (torchrun), rank r takes images r, r + W, ... and writes `<stem>.rank<r>-of-<W><suffix>`;
the shards read as one store (`LogitStore([...])`, `blda diagnose SHARD...`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import torch
from torch.utils.data import DataLoader, Dataset

from blda_tools import __version__
from blda_tools.datasets import CorruptSampleError, build_dataset
from blda_tools.errors import BLDAError
from blda_tools.fileio import partial_path
from blda_tools.inference import (
    InferenceSettings,
    default_inference,
    distributed_rank,
    predict_logits,
    select_device,
)
from blda_tools.models import load_model, normalize
from blda_tools.pixel_sampling import PixelSampling, sampled_positions
from blda_tools.store import LogitWriter

# Metadata that must match between an unfinished store and a resumed run.
RESUME_KEYS = ("model", "checkpoint", "weights", "dataset", "split", "inference", "sampling")
# Seconds between store commits (`LogitWriter(commit_interval=...)`): an interrupted dump
# redoes at most this much work on `--resume`; a commit per image (two flushes, nine index
# writes) cost ~2 ms CPU per 256 x 512 image, one a second a few images' worth less.
COMMIT_SECONDS = 1.0


class CorruptImageWarning(UserWarning):
    """An image that cannot be decoded was skipped (counted in `DumpSummary.corrupt`)."""


@dataclass
class DumpSummary:
    """What a dump did. `corrupt` lists the skipped images' messages."""

    out: Path
    has_labels: bool
    images_already_stored: int = 0
    images_written: int = 0
    rows_written: int = 0
    corrupt: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The file rank `rank` of `world_size` writes: `<stem>.rank<r>-of-<W><suffix>`."""
    out = Path(out)
    if world_size <= 1:
        return out
    return out.with_name(f"{out.stem}.rank{rank}-of-{world_size}{out.suffix}")


# ---------------------------------------------------------------------------- the job


class _DecodedItems(Dataset):
    """Dataset items by position in `indices`, with decoding failures returned, not raised
    (a raise inside a worker would end the whole DataLoader)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        try:
            return _compact_label(self.dataset[self.indices[position]]), None
        except CorruptSampleError as error:
            return None, str(error)


def _compact_label(sample):
    """The sample with its label as uint8 when the values fit (train ids and 255 always do):
    an eighth of the bytes of int64 to pass from a worker, and the store's own label dtype."""
    label = sample.label
    if label is None or label.dtype == torch.uint8 or label.dim() != 2:
        return sample
    low, high = torch.aminmax(label)
    if low < 0 or high > 255:
        return sample
    return dataclasses.replace(sample, label=label.to(torch.uint8))


def _as_list(batch):
    return batch


def _single_threaded_worker(_worker_id: int) -> None:
    # Workers only decode images; their own thread pools would compete with the model.
    torch.set_num_threads(1)


class _BackgroundWriter:
    """Hands `add` calls to one thread of this process, so that converting and writing an
    image overlaps the next forward pass. At most `depth` images wait; the first error is
    raised in the caller, and leaving the block waits until every queued image is stored.

    The writer commits every `commit_interval` seconds while images arrive (`LogitWriter`);
    this thread also commits once no image has arrived for that long, so that a dump stalled
    or killed later (a slow image, a hung loader) loses nothing it had finished.
    """

    def __init__(self, writer: LogitWriter, depth: int = 2) -> None:
        self._writer, self._error = writer, None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._work, name="blda-store-writer", daemon=True)

    def __enter__(self) -> _BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._queue.put(None)
        self._thread.join()  # the store is closed next: nothing may be writing then
        if exc_info[0] is None:
            self._raise_failure()

    def add(self, *args, **kwargs) -> None:
        self._raise_failure()
        self._queue.put((args, kwargs))

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            pending = self._error is None and self._writer.uncommitted_images > 0
            try:
                task = self._queue.get(timeout=self._writer.commit_interval if pending else None)
            except queue.Empty:  # idle for a commit interval: commit what is stored
                self._run(self._writer.commit)
                continue
            if task is None:
                return
            if self._error is None:  # after a failure, only drain the queue
                self._run(self._writer.add, *task[0], **task[1])

    def _run(self, action, *args, **kwargs) -> None:
        try:
            action(*args, **kwargs)
        except BaseException as error:
            self._error = error


@dataclass
class DumpJob:
    """A dump ready to run: dataset, model and output resolved, images still to do known.

    Build it with `prepare_dump`; `total` is the number of images `run` will go through (the
    CLI sizes its progress bar with it).
    """

    dataset: object
    model: torch.nn.Module
    device: torch.device
    inference: InferenceSettings
    sampling: PixelSampling
    out: Path
    pending: list[int]
    already_stored: int
    writer_options: dict
    strict: bool
    workers: int
    batch_size: int
    rank: int
    world_size: int

    @property
    def total(self) -> int:
        return len(self.pending)

    def run(self, progress: Callable[[int], None] | None = None) -> DumpSummary:
        """Predict and store every pending image; `progress(n)` after every n images."""
        started = time.perf_counter()
        summary = DumpSummary(
            self.out,
            self.dataset.has_labels,
            self.already_stored,
            rank=self.rank,
            world_size=self.world_size,
        )
        # Worker processes start (fork) before the store is opened and the writer thread runs.
        batches = iter(self._loader())
        with LogitWriter(
            self.out, resume=True, commit_interval=COMMIT_SECONDS, **self.writer_options
        ) as writer:
            with _BackgroundWriter(writer) as background:
                for group in self._groups_of_equal_size(batches, summary, progress):
                    self._predict_and_write(group, background, summary)
                    if progress is not None:
                        progress(len(group))
        summary.seconds = time.perf_counter() - started
        if summary.images_written + self.already_stored == 0:
            self.out.unlink()  # an empty store would only fail later, in every reader
            raise BLDAError(f"{self.out}: no image could be read ({len(summary.corrupt)} corrupt)")
        if not summary.has_labels:
            summary.notes.append(
                "The dataset has no labels: the store holds logits only "
                "(diagnose will use pseudo-labels)."
            )
        if summary.corrupt:
            summary.notes.append(f"{len(summary.corrupt)} corrupt image(s) skipped.")
        return summary

    def _loader(self) -> DataLoader:
        return DataLoader(
            _DecodedItems(self.dataset, self.pending),
            batch_size=self.batch_size,
            num_workers=self.workers,
            collate_fn=_as_list,
            worker_init_fn=_single_threaded_worker if self.workers else None,
            prefetch_factor=4 if self.workers else None,
        )

    def _groups_of_equal_size(self, batches, summary, progress) -> Iterator[list]:
        """Decoded samples in dataset order, in runs of equal size (one forward pass each)."""
        for batch in batches:
            samples = []
            for sample, error in batch:
                if error is None:
                    samples.append(sample)
                    continue
                if self.strict:
                    raise BLDAError(f"{error} (--strict: stopping at the first corrupt image)")
                warnings.warn(f"skipped: {error}", CorruptImageWarning, stacklevel=2)
                summary.corrupt.append(error)
                if progress is not None:
                    progress(1)
            while samples:
                size = samples[0].image.shape
                run_length = next(
                    (i for i, s in enumerate(samples) if s.image.shape != size), len(samples)
                )
                yield samples[:run_length]
                samples = samples[run_length:]

    def _predict_and_write(self, group, writer: _BackgroundWriter, summary: DumpSummary) -> None:
        images = torch.stack([sample.image for sample in group]).to(self.device)
        logits = predict_logits(self.model, normalize(images), **asdict(self.inference))
        for sample, logit_map in zip(group, logits, strict=True):
            rows = self._store_image(writer, sample, logit_map)
            summary.images_written += 1
            summary.rows_written += rows

    def _store_image(self, writer: _BackgroundWriter, sample, logit_map: torch.Tensor) -> int:
        """Add one image's `(C, H, W)` logits as the sampling asks; return the rows written."""
        sampling, label = self.sampling, sample.label
        if sampling.pixels_per_image is None:
            # The writer lays out and casts a tensor to the store's rows in one torch copy.
            writer.add(logit_map, label, sample.name, stride=sampling.stride)
            height, width = logit_map.shape[-2:]
            return -(-height // sampling.stride) * -(-width // sampling.stride)
        num_classes, height, width = logit_map.shape
        # (H * W, C): a view of channels-last logits (as `predict_logits` resizes them)
        pixel_logits = logit_map.permute(1, 2, 0).reshape(-1, num_classes)
        positions = sampled_positions(
            sampling, pixel_logits, label, self.dataset.ignore_index, sample.name
        )
        rows = pixel_logits[positions.to(pixel_logits.device)]
        writer.add(
            rows,
            None if label is None else label.reshape(-1)[positions],
            sample.name,
            pixel_index=positions,
            image_size=(height, width),
        )
        return len(positions)


def prepare_dump(
    model_spec: str,
    checkpoint: str | os.PathLike | None,
    dataset: str,
    data_root: str | os.PathLike,
    split: str | None,
    out: str | os.PathLike,
    *,
    weights: str = "student",
    trust_checkpoint: bool = False,
    dataset_options: dict | None = None,
    inference: InferenceSettings | None = None,
    sampling: PixelSampling | None = None,
    max_images: int | None = None,
    resume: bool = False,
    strict: bool = False,
    workers: int = 2,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "float16",
    compression: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DumpJob:
    """Resolve everything `dump_logits` needs and check it, before any compute.

    `inference=None` takes the dataset's default (`default_inference`: DAFormer's sliding
    window on 1024 x 2048 for Cityscapes, whole images otherwise). `rank` / `world_size`
    default to torchrun's environment.
    """
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    _check_counts(max_images=max_images, workers=workers, batch_size=batch_size)
    data = build_dataset(dataset, data_root, split, **(dataset_options or {}))
    if data.dataset_name == "image-folder":
        raise BLDAError(f"--dataset {dataset}: classification; dump-logits stores segmentation")
    inference = default_inference(dataset) if inference is None else inference
    sampling = PixelSampling() if sampling is None else sampling
    out = shard_path(out, rank, world_size)
    metadata = {
        "model": model_spec,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "weights": weights,
        "dataset": dataset,
        "data_root": str(data_root),
        "split": data.split,
        "inference": inference.to_metadata(),
        "sampling": vars(sampling).copy(),
        "shard": {"rank": rank, "world_size": world_size},
    }
    stored = _names_already_stored(out, resume, metadata)
    chosen_device = select_device(device)
    model = load_model(model_spec, data.num_classes, checkpoint, weights, trust_checkpoint)
    count = len(data) if max_images is None else min(max_images, len(data))
    planned = list(range(rank, count, world_size))
    pending = [index for index in planned if data.names[index] not in stored]
    writer_options = dict(
        class_names=data.class_names,
        ignore_index=data.ignore_index,
        dtype=dtype,
        compression=compression,
        domain=dataset,
        producer=f"blda dump-logits {__version__}",
        **metadata,
    )
    return DumpJob(
        dataset=data,
        model=model.to(chosen_device).eval(),
        device=chosen_device,
        inference=inference,
        sampling=sampling,
        out=out,
        pending=pending,
        already_stored=len(planned) - len(pending),
        writer_options=writer_options,
        strict=strict,
        workers=workers,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
    )


def dump_logits(
    model_spec: str,
    checkpoint: str | os.PathLike | None,
    dataset: str,
    data_root: str | os.PathLike,
    split: str | None,
    out: str | os.PathLike,
    *,
    progress: Callable[[int], None] | None = None,
    **options,
) -> DumpSummary:
    """Write `model_spec`'s logits on `dataset` to the logit store `out`; see `prepare_dump`
    for the options and the module docstring for sampling, resume and sharding."""
    job = prepare_dump(model_spec, checkpoint, dataset, data_root, split, out, **options)
    return job.run(progress)


def _check_counts(**values) -> None:
    for option, value in values.items():
        minimum = 0 if option == "workers" else 1
        if value is not None and (not isinstance(value, int) or value < minimum):
            raise BLDAError(
                f"--{option.replace('_', '-')}: expected an integer >= {minimum}, got {value!r}"
            )


def _names_already_stored(out: Path, resume: bool, metadata: dict) -> set[str]:
    """Images an unfinished store of `out` committed, after checking it may be continued:
    written with the same settings (else the store would mix two dumps)."""
    path = partial_path(out)
    if not resume:
        if out.exists() or path.exists():
            raise BLDAError(
                f"--out {out}: {out if out.exists() else path} exists; delete it, or pass "
                "--resume to continue an unfinished dump"
            )
        return set()
    if not path.exists():
        if out.exists():
            raise BLDAError(f"--resume: {out} is already complete; delete it to dump again")
        return set()
    try:
        with h5py.File(path, "r") as file:
            stored = json.loads(file.attrs["metadata"])
            committed = int(file.attrs["committed_images"])
            names = {name.decode() for name in file["images/name"][:committed]}
    except (OSError, KeyError, ValueError) as error:
        raise BLDAError(
            f"--resume: {path} is not a resumable logit store ({error}); delete it"
        ) from None
    for key in RESUME_KEYS:
        if stored.get(key) != metadata[key]:
            raise BLDAError(
                f"--resume: {path} was written with {key}={stored.get(key)!r}, this run has "
                f"{key}={metadata[key]!r}; use the same options or delete it"
            )
    return names
