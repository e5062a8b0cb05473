"""`blda calibrate --apply`: a saved calibrator's Eq. 7 predictions for logit stores.

Map images become Cityscapes-style train-id and colour PNGs; stores of samples become one
prediction store (format in `apply_calibrator`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import torch

from blda_tools.calibration.calibrator import Calibrator
from blda_tools.datasets import CITYSCAPES_PALETTE, default_palette
from blda_tools.datasets.base import write_color_png, write_label_png
from blda_tools.datasets.cityscapes import CITYSCAPES_CLASSES
from blda_tools.errors import BLDAError
from blda_tools.fileio import as_text, atomic_output
from blda_tools.outputs import output_set
from blda_tools.runtime.process import torch_threads
from blda_tools.store import LogitStore

Paths = str | os.PathLike | Sequence[str | os.PathLike]


PREDICTIONS_FORMAT = "blda-predictions"
PREDICTION_STORE = "predictions.h5"
# The owner of --apply's files in the output manifest (`blda_tools.outputs`).
COMMAND = "calibrate-apply"


@dataclass
class ApplyResult:
    """What `apply_calibrator` wrote: PNG pairs per map image, or one prediction store."""

    tau: float
    num_pixels: int
    images: int
    files: list[str]
    prediction_store: str | None


def apply_calibrator(
    calibrator_path: str | os.PathLike,
    stores: Paths,
    out_dir: str | os.PathLike,
    tau: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> ApplyResult:
    """Write Eq. 7 predictions of `stores` with a saved calibrator.

    When every image of the stores is a map and the classes fit 8-bit train ids (at most
    255: 255 is the ignore index): `DIR/trainIds/<name>.png` (8-bit train ids,
    Cityscapes style, ignore 255 never predicted) and `DIR/color/<name>.png`, at the full label
    size (a map stored with stride s is upsampled by repeating each prediction s x s times).
    Otherwise one prediction store `DIR/predictions.h5`: attributes `format` =
    "blda-predictions", `format_version` = 1, `class_names` (JSON list), `tau`, `calibrator`;
    dataset `prediction` (P,) uint8 (int32 beyond 255 classes), row i being row i of the input
    stores in the order given; `labels` (P,) copied when the stores have them; and the image
    index `images/name`, `images/offset`, `images/count` of the input stores.
    """
    calibrator = Calibrator.load(calibrator_path)
    tau = calibrator.tau if tau is None else tau
    store = LogitStore(stores)
    calibrator.check_classes(store.class_names, ", ".join(map(str, store.paths)))
    with output_set(out_dir, COMMAND, output_names(store)) as outputs:
        result = _apply(calibrator, calibrator_path, store, outputs.staging, tau, progress)
    if result.prediction_store is not None:  # where it is now, no longer where it was built
        result.prediction_store = str(Path(out_dir) / PREDICTION_STORE)
    return result


def writes_pngs(store: LogitStore) -> bool:
    """Whether `--apply` writes PNG pairs for `store` (every image a map, and at most 255
    classes: an 8-bit PNG holds train ids 0 to 254 and the ignore index 255), else one
    prediction store (which was only found when the first PNG was written)."""
    return store.num_classes <= 255 and all(record.kind == "map" for record in store.images)


def output_names(store: LogitStore) -> list[str]:
    """The files `--apply` writes for `store` (`writes_pngs`)."""
    if not writes_pngs(store):
        return [PREDICTION_STORE]
    return [f"{folder}/{name}.png" for name in png_names(store) for folder in ("trainIds", "color")]


def png_names(store: LogitStore) -> list[str]:
    """Each image's PNG name (without the suffix), or a BLDAError when two images would
    write the same file: names that differ only in their spelling of a path ('x/y', 'x//y',
    'x/./y'), or an unnamed image's `imageNNNNNN` that another image is called."""
    names, first_of = [], {}
    for index, record in enumerate(store.images):
        name = _safe_relative_name(record.name, index)
        if name in first_of:
            earlier = store.images[first_of[name]].name
            raise BLDAError(
                f"images {earlier!r} and {record.name!r} (#{first_of[name]} and #{index}): "
                f"both would be written as {name}.png; give the images distinct names"
            )
        first_of[name] = index
        names.append(name)
    return names


def _apply(calibrator, calibrator_path, store, out_dir: Path, tau, progress) -> ApplyResult:
    # The certificates run in `threads` threads of their own, torch at one thread meanwhile.
    threads = torch.get_num_threads()
    predict = functools.partial(calibrator.predict, tau=tau, threads=threads)
    with torch_threads(1) if threads > 1 else contextlib.nullcontext():
        if writes_pngs(store):
            files = _write_prediction_pngs(calibrator, predict, store, out_dir, progress)
            return ApplyResult(tau, store.num_rows, len(store.images), files, None)
        path = _write_prediction_store(
            calibrator, calibrator_path, predict, store, out_dir, tau, progress
        )
    return ApplyResult(tau, store.num_rows, len(store.images), [path.name], str(path))


def _write_prediction_pngs(calibrator, predict, store, out_dir: Path, progress) -> list[str]:
    names = calibrator.class_names
    palette = (
        CITYSCAPES_PALETTE if tuple(names) == CITYSCAPES_CLASSES else default_palette(len(names))
    )
    written = []
    for index, (record, relative) in enumerate(zip(store.images, png_names(store), strict=True)):
        logits, _ = store.read_image(index)
        height, width = record.shape
        flat = logits.permute(1, 2, 0).reshape(-1, len(names))
        prediction = predict(flat).view(height, width)
        if record.stride > 1:
            prediction = prediction.repeat_interleave(record.stride, 0)
            prediction = prediction.repeat_interleave(record.stride, 1)
            prediction = prediction[: record.height, : record.width]
        for folder, writer in (("trainIds", write_label_png), ("color", None)):
            target = out_dir / folder / f"{relative}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if writer is None:
                write_color_png(target, prediction, palette)
            else:
                writer(target, prediction)
            written.append(str(target.relative_to(out_dir)))
        if progress is not None:
            progress(record.count)
    return written


def _safe_relative_name(name: str, index: int) -> str:
    if not name:
        return f"image{index:06d}"
    path = PurePosixPath(name)  # 'x//y' and 'x/./y' name the file 'x/y' names
    if path.is_absolute() or ".." in path.parts or str(path) == ".":
        raise BLDAError(f"image name {name!r}: not a safe relative file name for an output PNG")
    return str(path)


def _write_prediction_store(
    calibrator, calibrator_path, predict, store, out_dir, tau, progress
) -> Path:
    dtype = np.uint8 if calibrator.num_classes <= 256 else np.int32
    path = out_dir / PREDICTION_STORE
    with atomic_output(path) as temporary, h5py.File(temporary, "w") as file:
        file.attrs["format"] = PREDICTIONS_FORMAT
        file.attrs["format_version"] = 1
        file.attrs["class_names"] = json.dumps(list(calibrator.class_names))
        file.attrs["tau"] = float(tau)
        file.attrs["calibrator"] = as_text(calibrator_path)
        prediction = file.create_dataset("prediction", (store.num_rows,), dtype=dtype)
        labels = (
            file.create_dataset("labels", (store.num_rows,), dtype=np.int32)
            if store.has_labels
            else None
        )
        for chunk in store.iter_chunks(rows=1 << 18, reuse_buffers=True):
            rows = slice(chunk.first_row, chunk.first_row + chunk.logits.shape[0])
            prediction[rows] = predict(chunk.logits).numpy().astype(dtype)
            if labels is not None:
                labels[rows] = chunk.labels.numpy().astype(np.int32)
            if progress is not None:
                progress(chunk.logits.shape[0])
        images = file.create_group("images")
        images["name"] = np.array([r.name for r in store.images], dtype=h5py.string_dtype())
        images["offset"] = np.array([r.offset for r in store.images], dtype=np.int64)
        images["count"] = np.array([r.count for r in store.images], dtype=np.int64)
    return path
