"""The `blda dump-logits` job: a model's logits on a dataset, written to a logit store.

`streams` inference threads each take the next batch of images, run the model and lay out the
rows to store (`LogitWriter.prepare`); the calling thread appends them in dataset order
(`LogitWriter`, atomic: `<out>.partial` until complete). Images are decoded by loader worker
processes, or, with `workers=0`, by the streams themselves (`loader`). On a CPU two
single-threaded streams keep the cores busy, one decoding or preparing while the other
computes. Per image the store keeps the full map at label resolution, every `stride`-th pixel
in both axes, or `pixels_per_image` sampled pixels (uniformly, or stratified by class), with
their positions.

Resume: `resume=True` reopens `<out>.partial` and skips the images already stored; sampling is
seeded per image name, so the result equals an uninterrupted run. Sharding: when `WORLD_SIZE`
> 1 (torchrun), rank r takes images r, r + W, ... and writes `<stem>.rank<r>-of-<W><suffix>`;
the shards read as one store (`LogitStore([...])`, `blda diagnose SHARD...`). Shard names,
resume checks and the earlier layouts of `--out`: `dump_files`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blda_tools import __version__
from blda_tools.errors import BLDAError, Interrupted, check_counts
from blda_tools.fileio import (
    created_directories,
    partial_path,
    remove_empty_directories,
    resource_failure,
)
from blda_tools.inference.dump_checks import (
    check_archive_options,
    check_image_names,
    check_model,
    check_sampling,
    open_dataset,
)
from blda_tools.inference.dump_files import (
    COMMAND,
    dump_metadata,
    images_of_rank,
    names_already_stored,
    remove_other_layouts,
    shard_of,
    shard_path,
)
from blda_tools.inference.dump_summary import CorruptImageWarning, DumpSummary
from blda_tools.inference.loader import (
    cpu_warning,
    decode,
    reissue,
    runs_of_equal_size,
    start_loader,
    with_arrays,
)
from blda_tools.inference.pixel_sampling import PixelSampling, sampled_positions
from blda_tools.inference.predict import (
    InferenceSettings,
    predict_classes,
    predict_images,
    resize_logits,
    select_device,
)
from blda_tools.inference.protocols import protocol_notices
from blda_tools.inference.streams import stream_executor, stream_layout
from blda_tools.inference.tasks import check_classifier_inference, check_task
from blda_tools.inference.upsample import upsample_to_float16_rows
from blda_tools.models import load_model
from blda_tools.outputs import checked_output_file, record_file
from blda_tools.runtime.process import keep_freed_memory, torch_threads
from blda_tools.store import LogitWriter, PreparedImage
from blda_tools.store.schema import FLOAT16_MAX
from blda_tools.store.writer import StoreWriteError

# Seconds between store commits (`LogitWriter(commit_interval=...)`): an interrupted dump
# redoes at most this much work on `--resume`; a commit per image (two flushes, nine index
# writes) cost ~2 ms CPU per 256 x 512 image, one a second a few images' worth less.
COMMIT_SECONDS = 1.0
# The torch seed of a model built without a checkpoint (`--random-weights`).
RANDOM_WEIGHTS_SEED = 0


# ---------------------------------------------------------------------------- the job


class StrictStop(BLDAError):
    """`--strict` stopped the dump at a corrupt image (the images before it are kept)."""


@dataclass
class DumpJob:
    """A dump ready to run: dataset, model and output resolved, images still to do known.

    Build it with `prepare_dump`, run it once; `total` is the number of images `run` will go
    through (the CLI sizes its progress bar with it). `batches` yields the batches of
    `pending` (`loader.start_loader`: decoded by loader workers, or still to decode).
    """

    dataset: object
    model: torch.nn.Module
    device: torch.device
    inference: InferenceSettings
    sampling: PixelSampling
    out: Path
    pending: list[int]
    batches: Iterator
    already_stored: int
    writer_options: dict
    strict: bool
    workers: int
    rank: int
    world_size: int
    streams: int = 1
    threads_per_stream: int = 1
    protocol: str = "as given"
    notices: list[str] = field(default_factory=list)
    classification: bool = False
    requested_out: Path | None = None  # --out as given (`out` is this rank's shard of it)
    resume: bool = False  # continue the unfinished store of `out` (checked by `prepare_dump`)

    @property
    def total(self) -> int:
        return len(self.pending)

    def run(self, progress: Callable[[int], None] | None = None) -> DumpSummary:
        """Predict and store every pending image; `progress(n)` after every n images.

        `streams` threads each take a batch at a time (decoding it without loader workers),
        run the model with `threads_per_stream` threads inside each operation and prepare the
        rows; this thread appends them in dataset order, so the store is the same whatever
        the streams' timing. On 2 CPU cores, two one-thread streams ran the forward pass
        alone 1.5x faster than one two-thread stream (`benchmarks/bench_dump.py`).

        A run that fails and leaves no store (complete or unfinished) also removes the
        folders it created for it.
        """
        created = created_directories(self.out.parent)
        try:
            return self._write(progress)
        except BaseException:
            if not self.out.exists() and not partial_path(self.out).exists():
                remove_empty_directories(created)
            raise

    def _write(self, progress: Callable[[int], None] | None) -> DumpSummary:
        started = time.perf_counter()
        summary = DumpSummary(
            self.out,
            self.dataset.has_labels,
            self.already_stored,
            rank=self.rank,
            world_size=self.world_size,
        )
        writer = LogitWriter(
            self.out,
            # The unfinished store `prepare_dump` checked is continued; a complete one (this
            # command's) is replaced when the new one is complete.
            resume=self.resume,
            exclusive=True,  # a dump started beside this one into the same --out
            commit_interval=COMMIT_SECONDS,
            **self.writer_options,
        )
        try:
            with (
                writer,
                torch_threads(self.threads_per_stream),
                stream_executor(self.streams) as pool,
            ):
                in_flight: deque[Future] = deque()
                for batch in self.batches:
                    in_flight.append(pool.submit(self._process, batch, writer))
                    # A batch more than the streams: the next one is ready when a stream frees.
                    while len(in_flight) > self.streams:
                        self._store(in_flight.popleft(), writer, summary, progress)
                while in_flight:
                    self._store(in_flight.popleft(), writer, summary, progress)
                if summary.images_written + self.already_stored == 0:
                    # Raised before the writer completes: an empty store would replace the
                    # store of an earlier run, and would only fail later, in every reader.
                    first = f"; the first: {summary.corrupt[0]}" if summary.corrupt else ""
                    raise BLDAError(
                        f"{self.out}: no image could be read ({len(summary.corrupt)} corrupt"
                        f"{first})"
                    )
        except BaseException as error:
            stopped = self._stopped(error, writer)
            if stopped is error:
                raise
            raise stopped from (None if isinstance(error, KeyboardInterrupt) else error)
        summary.seconds = time.perf_counter() - started
        summary.images_in_store, summary.rows_in_store = writer.num_images, writer.num_rows
        record_file(self.out, COMMAND)
        if self.rank == 0 and self.requested_out is not None:
            remove_other_layouts(self.requested_out, self.world_size)
        if not summary.has_labels:
            summary.notes.append(
                "The dataset has no labels: the store holds logits only "
                "(diagnose will use pseudo-labels)."
            )
        if summary.corrupt:
            summary.notes.append(f"{len(summary.corrupt)} corrupt image(s) skipped.")
        return summary

    def _stopped(self, error: BaseException, writer: LogitWriter) -> BaseException:
        """What to raise for a dump stopped part-way by `error`. The writer committed every
        image it had on the way out (`LogitWriter._abandon`): Ctrl-C and a resource that ran
        out (disk, memory, a loader worker killed) say how many are kept for --resume; an
        unfinished store that holds no image is removed, as it would only block the next run.
        Any other error is raised as it is."""
        kept = writer.num_images - writer.uncommitted_images
        if kept == 0:
            writer.partial_path.unlink(missing_ok=True)
        if isinstance(error, KeyboardInterrupt):
            if kept == 0:
                return Interrupted("dump-logits interrupted before any image was stored")
            return Interrupted(f"dump-logits interrupted: {self._kept(kept)}")
        if kept == 0:
            return error
        if isinstance(error, StrictStop | StoreWriteError):  # fixed outside: then resume
            return BLDAError(f"{error}; {self._kept(kept)}")
        if isinstance(error, BLDAError):  # an image the run stopped at: resuming may stop again
            return BLDAError(f"{error}; {self._kept(kept, after_error=True)}")
        failure = resource_failure(error)
        return error if failure is None else BLDAError(f"{failure}; {self._kept(kept)}")

    def _kept(self, kept: int, after_error: bool = False) -> str:
        where = (
            f"{kept} of {self.already_stored + self.total} images kept in {partial_path(self.out)}"
        )
        if after_error:
            return (
                f"{where}: fix the cause and run the same dump-logits command with --resume, "
                "or delete it to start again"
            )
        return f"{where}; run the same dump-logits command with --resume to continue"

    def _store(self, processed: Future, writer: LogitWriter, summary, progress) -> None:
        """Store one batch's prepared images once its stream has them. While waiting, commit
        what is stored after `commit_interval` seconds without a new image, so that a dump
        stalled or killed later (a slow image, a hung loader) loses nothing it had finished."""
        while True:
            waiting = writer.uncommitted_images > 0
            try:
                prepared, errors = processed.result(
                    timeout=writer.commit_interval if waiting else None
                )
                break
            except FutureTimeout:
                writer.commit()
        if errors and self.strict:
            raise StrictStop(f"{errors[0]} (--strict: stopping at the first corrupt image)")
        for error in errors:
            warnings.warn(f"skipped: {error}", CorruptImageWarning, stacklevel=2)
            summary.corrupt.append(error)
        for image in prepared:
            writer.append(image)
            summary.images_written += 1
            summary.rows_written += len(image.rows)
        if progress is not None:
            progress(len(prepared) + len(errors))

    def _process(self, batch: list, writer: LogitWriter) -> tuple[list[PreparedImage], list[str]]:
        """A batch's prepared images and corrupt images' messages, in a stream thread. Items
        are `(sample, error, warnings)` from the loader workers, or dataset indices to decode here
        (without workers)."""
        pairs = []
        for item in batch:
            if isinstance(item, int):
                pairs.append(decode(self.dataset, item))
            else:  # from a loader worker
                sample, error, warned = item
                reissue(warned)
                pairs.append((sample, error))
        errors = [error for _, error in pairs if error is not None]
        if errors and self.strict:
            return [], errors
        samples = [
            with_arrays(sample, torch.from_numpy) for sample, error in pairs if error is None
        ]
        prepared = []
        for group in runs_of_equal_size(samples):
            prepared.extend(self._predict(group, writer))
        return prepared, errors

    def _predict(self, group, writer: LogitWriter) -> list[PreparedImage]:
        """`_predict_group`, whose errors (an image too small for the model or its centre
        crop) name the image."""
        try:
            return self._predict_group(group, writer)
        except BLDAError as error:
            if str(error).startswith(str(writer.path)):  # the writer's, naming the image
                raise
            more = f" (with {len(group) - 1} more of its batch)" if len(group) > 1 else ""
            raise BLDAError(f"image {group[0].name!r}{more}: {error}") from None

    def _predict_group(self, group, writer: LogitWriter) -> list[PreparedImage]:
        """One group's logits, laid out as the store keeps them (in a stream thread): uint8
        images resized with OpenCV as mmcv does (`predict_images`), logits at label size."""
        first = group[0]
        # One image (the default batch): a view, not stack's copy.
        images = group[0].image[None] if len(group) == 1 else torch.stack([s.image for s in group])
        if self.classification:  # one row of class scores per image, its label beside it
            with torch.inference_mode():
                scores = predict_classes(self.model, images, self.inference, self.device)
            return [
                writer.prepare(row[None], sample.label.reshape(1), sample.name)
                for sample, row in zip(group, scores, strict=True)
            ]
        size = tuple(first.image.shape[-2:] if first.label is None else first.label.shape[-2:])
        # Full maps into a float16 store on the CPU: the last resize is fused with the cast.
        fused = (
            self.device.type == "cpu"
            and self.sampling.pixels_per_image is None
            and writer.dtype == "float16"
        )
        with torch.inference_mode():
            logits = predict_images(
                self.model,
                images,
                self.inference,
                self.device,
                output_size=size,
                resize_output=not fused,
            )
            return [
                self._prepare_image(writer, sample, logit_map, size if fused else None)
                for sample, logit_map in zip(group, logits, strict=True)
            ]

    def _prepare_image(self, writer: LogitWriter, sample, logit_map: torch.Tensor, fuse_to):
        """One image's `(C, H, W)` logits as the sampling asks (`LogitWriter.prepare`). With
        `fuse_to` `(H, W)`, `logit_map` still needs its last resize to that size: done with
        the cast to float16 rows in one pass (`inference.upsample`: within a float16 ulp of
        torch's resize, docs/store-format.md); logits out of the float16 range (or not finite)
        take torch's resize, so that `prepare` reports them as before."""
        sampling, label = self.sampling, sample.label
        if fuse_to is not None:
            rows, largest = upsample_to_float16_rows(logit_map.numpy(), fuse_to, sampling.stride)
            if largest < FLOAT16_MAX:
                return writer.prepare_map_rows(
                    rows, label, sample.name, fuse_to, sampling.stride, largest=largest
                )
            logit_map = resize_logits(logit_map[None], fuse_to)[0]
        if sampling.pixels_per_image is None:
            # The writer lays out and casts a tensor to the store's rows in one torch copy.
            return writer.prepare(logit_map, label, sample.name, stride=sampling.stride)
        num_classes, height, width = logit_map.shape
        # (H * W, C): a view of channels-last logits (as `predict_logits` resizes them)
        pixel_logits = logit_map.permute(1, 2, 0).reshape(-1, num_classes)
        positions = sampled_positions(
            sampling, pixel_logits, label, self.dataset.ignore_index, sample.name
        )
        return writer.prepare(
            pixel_logits[positions.to(pixel_logits.device)],
            None if label is None else label.reshape(-1)[positions],
            sample.name,
            pixel_index=positions,
            image_size=(height, width),
        )


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
    streams: int | None = None,
    random_weights: bool = False,
) -> DumpJob:
    """Resolve everything `dump_logits` needs and check it, before any compute.

    `inference=None` takes the model family's test protocol (`inference.protocols`:
    DAFormer, SegFormer, DeepLabV2: whole images resized to 512 x 1024; HRDA / MIC: 1024 x 2048,
    1024 windows at stride 512; otherwise whole images at native size); a dict changes some
    of its settings (`resolve_inference`); an `InferenceSettings` is used as given. The job's
    `protocol` says which, and `notices` warn of a rescale above 2x. `rank` / `world_size`
    default to torchrun's environment. `streams` is the number of forward passes run at
    once (`DumpJob.run`); None: `default_streams`. `workers` processes decode the images;
    with 0 the streams decode their own. A built-in architecture needs a `checkpoint`, or
    `random_weights=True` to run on its random initialisation on purpose (a plugin factory
    brings its own weights).

    On a CPU this sets the process's allocator to keep freed memory (`keep_freed_memory`:
    without it, each image page-faults its activations back in). The loader workers start
    here, before the model is loaded, and start decoding.
    """
    rank, world_size = shard_of(rank, world_size)
    check_counts(max_images=max_images, workers=workers, batch_size=batch_size, streams=streams)
    requested_out = checked_output_file(out, "out")  # a file, not a name blda keeps
    inference_changes = inference  # what the caller changed, before the protocol fills it
    protocol, inference, task = check_model(model_spec, checkpoint, random_weights, inference)
    check_archive_options(model_spec, weights, trust_checkpoint)
    data = open_dataset(dataset, data_root, split, dataset_options)
    classification = check_task(model_spec, task, dataset, data.dataset_name == "image-folder")
    check_classifier_inference(inference_changes, classification)
    sampling = check_sampling(sampling, classification, dataset)
    out = shard_path(requested_out, rank, world_size)
    metadata = dump_metadata(
        model_spec, checkpoint, weights, dataset, data_root, data.split,
        inference, protocol, sampling, rank, world_size,
    )  # fmt: skip
    count = len(data) if max_images is None else min(max_images, len(data))
    planned = images_of_rank(count, rank, world_size)
    layout = {"dtype": dtype, "compression": compression}
    planned_names = {data.names[index] for index in planned}
    stored = names_already_stored(out, resume, metadata, planned_names, layout)
    chosen_device = select_device(device)
    if chosen_device.type == "cpu":
        keep_freed_memory()
    pending = [index for index in planned if data.names[index] not in stored]
    check_image_names(data.names[index] for index in pending)
    notices = protocol_notices(protocol, inference, data, pending[0] if pending else None)
    notices += [line for line in [cpu_warning(workers, len(pending))] if line]
    # Workers fork before the model exists: pages this process writes after a fork are
    # copied (copy-on-write) while the workers live, and the model's weights and
    # activations would be, image after image.
    batches = start_loader(data, pending, workers, batch_size)
    # Without a checkpoint the weights are the model's random initialisation: drawn from a
    # fixed seed, so that such a dump is reproducible and --resume continues the same model
    # (in a forked random state: the caller's is left as it was).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = load_model(model_spec, data.num_classes, checkpoint, weights, trust_checkpoint)
    writer_options = dict(
        class_names=data.class_names, ignore_index=data.ignore_index, dtype=dtype,
        compression=compression, domain=dataset, producer=f"blda dump-logits {__version__}",
        **metadata,
    )  # fmt: skip
    return DumpJob(
        dataset=data,
        model=model.to(chosen_device),
        device=chosen_device,
        inference=inference,
        sampling=sampling,
        out=out,
        pending=pending,
        batches=batches,
        already_stored=len(planned) - len(pending),
        writer_options=writer_options,
        strict=strict,
        workers=workers,
        rank=rank,
        world_size=world_size,
        **stream_layout(streams, chosen_device),
        protocol=protocol,
        notices=notices,
        classification=classification,
        requested_out=requested_out,
        resume=resume,
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
