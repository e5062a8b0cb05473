"""What every dataset shares: the sample type, the base class, image/label reading and writing.

A dataset is a fixed list of (image file, label file or None, name) built from a directory
listing when it is constructed; files are only opened in `__getitem__`, so `len()` and `names`
are cheap and a dataset can be sent to DataLoader worker processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import torch
from PIL import Image

from blda_tools.datasets import png_fast
from blda_tools.errors import BLDAError
from blda_tools.fileio import as_text, atomic_output, read_text_file

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Pillow modes whose pixel values are label ids as stored (no colour conversion).
_ID_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")

RGB = tuple[int, int, int]


class CorruptSampleError(BLDAError):
    """An image or label file of one sample cannot be decoded.

    Raised by `__getitem__`, naming the file, so that callers can skip the sample with a
    warning and count it, or stop (the CLI's `--strict`).
    """


@dataclass(frozen=True)
class SegmentationSample:
    """One sample as every dataset returns it.

    `image` is a uint8 tensor (3, H, W) in RGB order. `label` is an int64 tensor (H, W) of
    train ids with `ignore_index` 255 for unlabelled pixels, or None when the dataset has no
    labels; the classification dataset stores a 0-d int64 class index instead. `name` is a
    stable identifier: the image path relative to the data root, without extension, with `/`.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    name: str


class SegmentationDataset:
    """A list of image files with optional label files, read on access.

    Subclasses discover the files in `__init__`, pass them here, and implement `read_label`
    (file -> int64 train ids). `align` decides what happens when image and label sizes differ;
    by default that sample is corrupt.
    """

    dataset_name = "dataset"
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        image_paths: Sequence[Path],
        label_paths: Sequence[Path] | None,
        class_names: Sequence[str],
        palette: Sequence[RGB],
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_paths: tuple[Path, ...] = tuple(image_paths)
        self.label_paths: tuple[Path, ...] | None = (
            None if label_paths is None else tuple(label_paths)
        )
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.palette: list[RGB] = [tuple(int(v) for v in color) for color in palette]
        if len(self.palette) != len(self.class_names):
            raise BLDAError(
                f"{self.dataset_name}: palette has {len(self.palette)} colours for "
                f"{len(self.class_names)} classes; expected one RGB colour per class"
            )
        self._names = tuple(sample_name(path, self.root) for path in self.image_paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        return self.label_paths is not None

    @property
    def names(self) -> tuple[str, ...]:
        """Every sample's name, in index order (from the listing; no file is opened)."""
        return self._names

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> SegmentationSample:
        sample = self.read_sample(index)
        if sample.label is not None and sample.label.dtype != torch.int64:
            return replace(sample, label=sample.label.long())
        return sample

    def read_sample(self, index: int) -> SegmentationSample:
        """`self[index]` with the label as `read_label` gives it: uint8 where the train ids
        fit (`map_ids`), an eighth of the bytes of int64, as a logit store keeps them (the
        dump reads samples this way)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.dataset_name}: index {index} out of range for {len(self)}")
        index = index % len(self)
        image = read_rgb_array(self.image_paths[index])
        label = None
        if self.label_paths is not None:
            label = self.read_label(self.label_paths[index])
            image = self.align(index, image, label)
        return SegmentationSample(
            image=array_to_tensor(image), label=label, name=self._names[index]
        )

    def read_label(self, path: Path) -> torch.Tensor:
        """Read one label file as an (H, W) tensor of train ids (255 = ignore): uint8 or int64
        (`map_ids`); `__getitem__` returns int64."""
        raise NotImplementedError

    def align(self, index: int, image: np.ndarray, label: torch.Tensor) -> np.ndarray:
        """Return the RGB image `(H, W, 3)` matching the label's size; a mismatch makes the
        sample corrupt."""
        label_size = (label.shape[-1], label.shape[-2])
        size = (image.shape[1], image.shape[0])
        if size != label_size:
            raise CorruptSampleError(
                f"{self.image_paths[index]}: image is {size[0]}x{size[1]} but its "
                f"label {self.label_paths[index]} is {label_size[0]}x{label_size[1]} (W x H); "
                "expected equal sizes"
            )
        return image

    def __repr__(self) -> str:
        labels = "with labels" if self.has_labels else "without labels"
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"{len(self)} images {labels}, {self.num_classes} classes)"
        )


def sample_name(path: Path, root: Path) -> str:
    """The path relative to `root` without extension, with `/` separators, as UTF-8 text
    (`as_text`: stores and prediction files hold names as text)."""
    relative = PurePosixPath(path.relative_to(root).as_posix())
    return as_text(relative.with_suffix(""))


# ---------------------------------------------------------------- reading files


def read_rgb_image(path: Path) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, or raise `CorruptSampleError` naming it."""
    with _decoded(path) as opened:
        return opened.convert("RGB")


@contextlib.contextmanager
def _decoded(path: Path) -> Iterator[Image.Image]:
    """The image at `path` opened and decoded by Pillow; `CorruptSampleError` names it."""
    try:
        with Image.open(path) as opened:
            opened.load()
            yield opened
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptSampleError(f"{path}: cannot read image ({error})") from None


# Pillow modes of more than 8 bits per sample (16-bit grey PNG, 32-bit TIFF): `convert("RGB")`
# clips their values at 255, so that nearly every pixel of a 16-bit grey image is white.
# mmcv's reader, OpenCV with IMREAD_COLOR, converts them to 8 bits (a 16-bit PNG keeps each
# value's high byte).
_DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def read_rgb_array(path: Path, *, reader: str = "mmcv") -> np.ndarray:
    """The image at `path` as a uint8 `(H, W, 3)` RGB array, decoded as `reader` does:
    "mmcv" (the segmentation frameworks: OpenCV's IMREAD_COLOR) or "pillow" (torchvision's
    ImageFolder: `convert("RGB")`). Both give the same pixels for 8-bit files: 8-bit RGB PNGs
    are decoded by OpenCV (`png_fast`: faster), the others by Pillow, except that "mmcv"
    leaves the images of more than 8 bits per sample to OpenCV."""
    decoded = png_fast.decode_rgb8(path)
    if decoded is not None:
        return decoded
    with _decoded(path) as opened:
        if reader == "pillow" or opened.mode not in _DEEP_MODES:
            return np.array(opened.convert("RGB"))
    try:
        decoded = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    except OSError as error:
        raise CorruptSampleError(f"{path}: cannot read image ({error})") from None
    if decoded is None or decoded.dtype != np.uint8:
        raise CorruptSampleError(f"{path}: cannot read image (OpenCV could not decode it)")
    return decoded


def array_to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB array `(H, W, 3)` -> contiguous uint8 tensor (3, H, W). OpenCV's `split` writes
    the channel planes in place: 0.03 ms at 256 x 512, torch's transposing copy 0.13."""
    planes = np.empty((3, *image.shape[:2]), np.uint8)
    cv2.split(np.ascontiguousarray(image), list(planes))
    return torch.from_numpy(planes)


def read_id_image(path: Path) -> np.ndarray:
    """Read a single-channel label PNG (8-bit, palette indices or 16-bit) as stored values.

    Palette PNGs (GTA5 labels) give their indices, never colours. A colour image is refused:
    it is usually the `*_color.png` visualisation rather than the id file. 8-bit grey PNGs are
    decoded by OpenCV (`png_fast`: the same values, faster), the others by Pillow.
    """
    decoded = png_fast.decode_grey8(path)
    if decoded is not None:
        return decoded
    try:
        with Image.open(path) as opened:
            opened.load()
            if opened.mode not in _ID_MODES:
                raise CorruptSampleError(
                    f"{path}: label image has mode {opened.mode}; expected a single-channel "
                    "label-id PNG (8-bit, palette or 16-bit), not a colour visualisation"
                )
            return np.array(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptSampleError(f"{path}: cannot read label ({error})") from None


def map_ids(ids: np.ndarray, lookup: torch.Tensor) -> torch.Tensor:
    """Map stored ids through a 256-entry table; ids outside the table become ignore (255).

    uint8 ids through a table of values 0..255 (train ids and 255 always are) give a uint8
    tensor, read with OpenCV's table lookup (~3x faster than numpy's `take` into int64 at
    256 x 512, and an eighth of the bytes); any other input an int64 tensor.
    """
    if ids.dtype == np.uint8 and lookup.numel() == 256:  # every value indexes the table
        table = lookup.numpy()
        if table.min() >= 0 and table.max() <= 255:
            return torch.from_numpy(cv2.LUT(ids, table.astype(np.uint8)))
        return torch.from_numpy(np.take(table, ids))
    values = torch.from_numpy(ids.astype(np.int64, copy=False))
    inside = (values >= 0) & (values < lookup.numel())
    return torch.where(inside, lookup[values.clamp(0, lookup.numel() - 1)], IGNORE_INDEX)


def train_id_lookup(pairs: dict[int, int]) -> torch.Tensor:
    """A 256-entry int64 table, stored id -> train id, 255 for every id not in `pairs`."""
    lookup = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    for stored_id, train_id in pairs.items():
        lookup[stored_id] = train_id
    return lookup


def identity_lookup(num_classes: int) -> torch.Tensor:
    """Table for files that already hold train ids: 0..C-1 kept, everything else ignore."""
    return train_id_lookup({train_id: train_id for train_id in range(num_classes)})


# ---------------------------------------------------------------- listing and splits


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
        raise BLDAError(
            f"--split {split}: {dataset} takes 'all' or an existing list file (one image name "
            "per line); no such file"
        )
    available = set(keys)
    selected: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(
        read_text_file(list_file, "a list of image names").splitlines(), start=1
    ):
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


# ---------------------------------------------------------------- colours and writing


def default_palette(num_classes: int) -> list[RGB]:
    """Distinct colours for any number of classes (the PASCAL VOC bit-interleaving scheme)."""
    palette = []
    for index in range(num_classes):
        red = green = blue = 0
        code = index
        for bit in range(7, -1, -1):
            red |= ((code >> 0) & 1) << bit
            green |= ((code >> 1) & 1) << bit
            blue |= ((code >> 2) & 1) << bit
            code >>= 3
        palette.append((red, green, blue))
    return palette


def label_to_color(
    label: torch.Tensor | np.ndarray, palette: Sequence[RGB], ignore_color: RGB = (0, 0, 0)
) -> torch.Tensor:
    """Colour a train-id map: (H, W) ints -> uint8 (H, W, 3).

    Pixel value i < len(palette) gets `palette[i]`; the ignore index and any other value get
    `ignore_color`. Negative values are refused.
    """
    label = torch.as_tensor(label)
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise BLDAError(f"label_to_color: expected an integer label map, got {label.dtype}")
    if label.numel() and int(label.min()) < 0:
        raise BLDAError("label_to_color: label map has negative values; expected train ids")
    table = torch.tensor([*palette, ignore_color], dtype=torch.uint8).reshape(-1, 3)
    beyond = len(table) - 1
    return table[label.long().clamp(max=beyond)]


def write_label_png(path: str | os.PathLike, train_ids: torch.Tensor | np.ndarray) -> None:
    """Write a (H, W) train-id map as an 8-bit grayscale PNG (atomically)."""
    values = torch.as_tensor(train_ids)
    if values.ndim != 2 or values.dtype.is_floating_point:
        raise BLDAError(
            f"{path}: expected an integer (H, W) train-id map, got {tuple(values.shape)} "
            f"{values.dtype}"
        )
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 255):
        raise BLDAError(f"{path}: train ids must lie in 0..255 to be written as an 8-bit PNG")
    image = Image.fromarray(values.to(torch.uint8).numpy())
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG")


def write_color_png(
    path: str | os.PathLike, train_ids: torch.Tensor | np.ndarray, palette: Sequence[RGB]
) -> None:
    """Write a (H, W) train-id map as an RGB PNG coloured with `palette` (atomically)."""
    colors = label_to_color(train_ids, palette)
    if colors.ndim != 3:
        raise BLDAError(f"{path}: expected a (H, W) train-id map, got {tuple(colors.shape[:-1])}")
    with atomic_output(path) as temporary:
        Image.fromarray(colors.numpy()).save(temporary, format="PNG")
