"""Dataset folders listed: image files by key, splits (names or list files), images paired
with their label files, and class-name options.

The layouts' own modules say where images and labels are; this module turns two folders into
the matched (image, label) file lists that `SegmentationDataset` is built from, with one
error per kind of mismatch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from blda_tools.datasets.base import IMAGE_EXTENSIONS
from blda_tools.errors import BLDAError
from blda_tools.fileio import read_text_file


def require_dir(path: Path, dataset: str, what: str) -> Path:
    """Raise a `BLDAError` naming the expected folder if `path` is not a directory."""
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise BLDAError(f"{dataset}: expected folder {path} ({what}); it {problem}")
    return path


def image_key(relative: PurePosixPath) -> str:
    """A file's key for matching images to labels: relative path without image extension."""
    if relative.suffix.lower() in IMAGE_EXTENSIONS:
        relative = relative.with_suffix("")
    return relative.as_posix()


def list_files(directory: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Every file below `directory` with one of `extensions` (any case), by `image_key`."""
    found: dict[str, Path] = {}
    for dirpath, _dirnames, filenames in os.walk(directory):
        for filename in filenames:
            if os.path.splitext(filename)[1].lower() in extensions:
                path = Path(dirpath, filename)
                key = image_key(PurePosixPath(path.relative_to(directory).as_posix()))
                if key in found:
                    raise BLDAError(
                        f"{path}: same name as {found[key]} up to the extension; "
                        "expected one file per name"
                    )
                found[key] = path
    return dict(sorted(found.items()))


def select_split(keys: Sequence[str], split: str, dataset: str, image_dir: Path) -> list[str]:
    """Keys of the split: all of them for "all", else those listed in the file `split`.

    A list file holds one image per line: a key (`00001`), a file name (`00001.png`) or a path
    starting with the image folder's name (`images/00001.png`). Blank lines and lines starting
    with `#` are skipped. Entries are kept in the file's order.
    """
    if split == "all":
        return list(keys)
    list_file = Path(split)
    if not list_file.is_file():
        found = "a folder" if list_file.is_dir() else "not a file" if list_file.exists() else None
        raise BLDAError(
            f"--split {split}: {dataset} takes 'all' or an existing list file (one image name "
            f"per line); {found or 'no such file'}"
        )
    try:
        text = read_text_file(list_file, "a list of image names")
    except BLDAError as error:  # the option, not --data-root (`open_dataset`), is at fault
        raise BLDAError(f"--split {error}") from None
    available = set(keys)
    selected: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        relative = PurePosixPath(entry.replace("\\", "/"))
        if relative.parts and relative.parts[0] == image_dir.name and len(relative.parts) > 1:
            relative = PurePosixPath(*relative.parts[1:])
        key = image_key(relative)
        if key not in available:
            raise BLDAError(f"--split {list_file}:{number}: no image {entry!r} under {image_dir}")
        if key in seen:
            raise BLDAError(f"--split {list_file}:{number}: image {entry!r} is listed twice")
        seen.add(key)
        selected.append(key)
    if not selected:
        raise BLDAError(f"--split {list_file}: the list file names no images")
    return selected


def pair_labels(
    image_keys: Sequence[str],
    labels_by_key: dict[str, Path],
    *,
    dataset: str,
    all_image_keys: Sequence[str],
    expected_label: str,
) -> list[Path] | None:
    """The label file of each image, or None when the dataset has no labels at all.

    Labels without an image are an error (a broken or mixed-up extraction), and so is a
    partly labelled split (metrics over it would silently cover only some images).
    `expected_label` describes where a label should be, for the message.
    """
    orphans = sorted(set(labels_by_key) - set(all_image_keys))
    if orphans:
        raise BLDAError(
            f"{dataset}: label file {labels_by_key[orphans[0]]} has no matching image "
            f"({len(orphans)} label files without images)"
        )
    if not labels_by_key:
        return None
    missing = [key for key in image_keys if key not in labels_by_key]
    if missing:
        raise BLDAError(
            f"{dataset}: {len(missing)} of {len(image_keys)} images have no label file; "
            f"first: image {missing[0]!r}, expected label {expected_label.format(key=missing[0])}"
        )
    return [labels_by_key[key] for key in image_keys]


# The suffix of the train-id label copies that DAFormer's dataset converters write beside the
# original GTA5 and SYNTHIA labels (the "Setup Datasets" step of its README).
DAFORMER_CONVERTED = "_labelTrainIds"


def paired_listing(
    image_dir: Path,
    label_dir: Path,
    split: str,
    dataset: str,
    image_extensions: Sequence[str] = (".png",),
    derived_labels: str = "",
) -> tuple[list[Path], list[Path] | None]:
    """Images of a split under `image_dir` and their labels under `label_dir`, matched by key.

    The layouts of GTA5, SYNTHIA and the generic folder dataset: one folder of images, one of
    labels with the same relative names (labels are always PNG). Label files whose name ends
    in `derived_labels` + ".png" are converted copies beside the originals and are left out.
    Errors as `pair_labels`.
    """
    images = list_files(image_dir, image_extensions)
    if not images:
        raise BLDAError(f"{dataset}: no images ({', '.join(image_extensions)}) under {image_dir}")
    labels = list_files(label_dir, (".png",)) if label_dir.is_dir() else {}
    if derived_labels:
        originals = {key: path for key, path in labels.items() if not key.endswith(derived_labels)}
        if labels and not originals:  # converted copies alone: not a dataset without labels
            raise BLDAError(
                f"{dataset}: {label_dir} holds only converted *{derived_labels}.png copies "
                f"({len(labels)}), not the original label files, which blda reads (it maps "
                "their ids to train ids itself); put the original labels back"
            )
        labels = originals
    keys = select_split(list(images), split, dataset, image_dir)
    label_paths = pair_labels(
        keys,
        labels,
        dataset=dataset,
        all_image_keys=list(images),
        expected_label=f"{label_dir}/{{key}}.png",
    )
    return [images[key] for key in keys], label_paths


def read_names_option(
    value: Sequence[str] | str | os.PathLike, option: str, max_classes: int | None = 255
) -> list[str]:
    """A list of class names given directly or as a text file with one name per line.

    Segmentation labels are 8-bit with 255 as ignore, hence at most 255 classes (ids 0..254) by default.
    """
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise BLDAError(f"{option}: file {path} does not exist (one class name per line)")
        text = read_text_file(path, "class names, one per line")
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = [str(name) for name in value]
    if not names:
        raise BLDAError(f"{option}: no class names given")
    if len(set(names)) != len(names):
        raise BLDAError(f"{option}: class names must be unique, got {names}")
    if max_classes is not None and len(names) > max_classes:
        raise BLDAError(
            f"{option}: {len(names)} classes; at most {max_classes} (255 is the ignore index)"
        )
    return names
