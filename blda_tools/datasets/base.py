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
from blda_tools.fileio import as_text, atomic_output

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
