"""Where a dump's images come from: decoded in loader worker processes, or by the inference
streams themselves, in dataset order, with corrupt files reported rather than raised.

A sample crosses from a worker as numpy arrays (pickled through the worker's pipe) and becomes
tensors again in the stream that runs the model (`with_arrays`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from blda_tools.datasets import CorruptSampleError
from blda_tools.runtime.process import exit_with_parent


class _DecodedItems(Dataset):
    """Dataset items by position in `indices`, with decoding failures returned, not raised
    (a raise inside a worker would end the whole DataLoader)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        # A worker's warnings (a resized GTA5 image) travel with the sample, so that the main
        # process shows them as it shows its own, not as a worker's raw stderr.
        with warnings.catch_warnings(record=True) as caught:
            sample, error = decode(self.dataset, self.indices[position])
        return sample, error, [(str(w.message), w.category) for w in caught]


def reissue(warned: list) -> None:
    """Issue again in this process the warnings a loader worker recorded (`_DecodedItems`)."""
    for message, category in warned:
        warnings.warn(message, category, stacklevel=2)


def decode(dataset, index: int):
    """`(sample, None)` for a readable image, `(None, message)` for a corrupt one."""
    # `read_sample` keeps labels uint8 where they fit, as the store does (no int64 map first).
    read = getattr(dataset, "read_sample", dataset.__getitem__)
    try:
        sample = compact_label(read(index))
    except CorruptSampleError as error:
        return None, str(error)
    # Arrays cross from a worker pickled through its pipe; a tensor would travel as a
    # shared-memory file, mapped and unmapped per image (kernel time in every thread).
    return with_arrays(sample, lambda tensor: tensor.numpy()), None


def with_arrays(sample, convert):
    """The sample with its image and label passed through `convert` (to numpy and back)."""
    label = None if sample.label is None else convert(sample.label)
    return dataclasses.replace(sample, image=convert(sample.image), label=label)


def compact_label(sample):
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


def _start_worker(parent: int, _worker_id: int) -> None:
    # Workers only decode images; their own thread pools would compete with the model.
    torch.set_num_threads(1)
    exit_with_parent(parent)


def runs_of_equal_size(samples: list) -> Iterator[list]:
    """Consecutive samples in runs of equal image and label size (one forward pass each)."""

    def size(sample):
        return sample.image.shape, None if sample.label is None else sample.label.shape

    while samples:
        first = size(samples[0])
        run_length = next((i for i, s in enumerate(samples) if size(s) != first), len(samples))
        yield samples[:run_length]
        samples = samples[run_length:]


def start_loader(dataset, pending: list[int], workers: int, batch_size: int) -> Iterator[list]:
    """Batches of the `pending` images in order: with `workers`, lists of `(sample, error,
    warnings)` decoded by that many processes, which start now; without, lists of dataset indices that
    the inference streams decode themselves (a thread beside them would take CPU time from
    them)."""
    workers = min(workers, len(pending))  # more processes than images only cost start-up
    if workers == 0:
        return (pending[start : start + batch_size] for start in range(0, len(pending), batch_size))
    with warnings.catch_warnings():
        # torch's advice on workers beyond the CPU count, twice and after the progress bar;
        # the dump says it once, up front (`cpu_warning`)
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        loader = DataLoader(
            _DecodedItems(dataset, pending),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_as_list,
            worker_init_fn=functools.partial(_start_worker, os.getpid()),
            prefetch_factor=4,
        )
        return iter(loader)  # iter() starts the workers now


def cpu_warning(workers: int, pending: int) -> str | None:
    """A warning line when the decoding processes outnumber the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    used = min(workers, pending)
    if not cpus or used <= cpus:
        return None
    fewer = f" ({used} started, one per image)" if used < workers else ""
    return (
        f"warning: --workers {workers}{fewer}: more decoding processes than the {cpus} CPUs "
        "here; they compete with the model for them"
    )
