"""SYNTHIA RAND-CITYSCAPES as distributed: `RGB/NNNNNNN.png` + `GT/LABELS/NNNNNNN.png`.

Labels are 16-bit PNGs whose first channel (R, read as RGB) holds the SYNTHIA class id and the
second an instance id. Pillow opens 16-bit colour PNGs as 8-bit, keeping only the high byte of
each sample (an id 3 would read as 0), so those files are decoded here with `zlib`: PNG
chunks, inflate, then the five scanline filters undone (PNG specification, section 9).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blda_tools.datasets.base import (
    CorruptSampleError,
    SegmentationDataset,
    map_ids,
    read_id_image,
    train_id_lookup,
)
from blda_tools.datasets.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from blda_tools.datasets.listing import DAFORMER_CONVERTED, paired_listing, require_dir

# SYNTHIA class id -> Cityscapes train id, from the dataset's README; every other id -> 255.
SYNTHIA_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip
# Evaluation subsets (train ids): SYNTHIA has no terrain, truck or train; the 13-class
# protocol also leaves out wall, fence and pole.
SYNTHIA_16_CLASSES: tuple[int, ...] = tuple(c for c in range(19) if c not in (9, 14, 16))
SYNTHIA_13_CLASSES: tuple[int, ...] = tuple(c for c in SYNTHIA_16_CLASSES if c not in (3, 4, 5))

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (no palette type 3)


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA RAND-CITYSCAPES with labels mapped to the 19 Cityscapes train ids.

    `split`: no official split, so "all" (default) or a list file with one image name per line
    (`0000000`, `0000000.png` or `RGB/0000000.png`). Labels are read from channel R of 16-bit
    (or 8-bit) PNGs; ids outside `SYNTHIA_TO_TRAIN_ID` (void, lane marking, parking slot, ...)
    and any unknown id become 255. Evaluate on `SYNTHIA_16_CLASSES` or `SYNTHIA_13_CLASSES`.
    """

    dataset_name = "synthia"

    def __init__(self, root: str | os.PathLike, split: str = "all"):
        root = require_dir(Path(root), "synthia", "the SYNTHIA RAND-CITYSCAPES data root")
        image_dir = require_dir(root / "RGB", "synthia", "RGB/NNNNNNN.png")
        label_dir = root / "GT" / "LABELS"
        # DAFormer's tools/convert_datasets/synthia.py writes NAME_labelTrainIds.png beside
        # each label; blda maps the original ids itself, to the same train ids.
        image_paths, label_paths = paired_listing(
            image_dir, label_dir, split, "synthia", derived_labels=DAFORMER_CONVERTED
        )
        super().__init__(
            root,
            split,
            image_paths=image_paths,
            label_paths=label_paths,
            class_names=CITYSCAPES_CLASSES,
            palette=CITYSCAPES_PALETTE,
        )
        self._lookup = train_id_lookup(SYNTHIA_TO_TRAIN_ID)

    def read_label(self, path: Path) -> torch.Tensor:
        return map_ids(read_synthia_class_ids(path), self._lookup)


def read_synthia_class_ids(path: Path) -> np.ndarray:
    """The SYNTHIA class id of every pixel: channel R (or the gray value) of a label PNG."""
    data = _read_bytes(path)
    _, _, bit_depth, color_type, interlace = _parse_header(data, path)
    if bit_depth != 16:  # Pillow reads 8-bit (and smaller) PNGs exactly
        return read_id_image(path) if color_type in (0, 3) else _read_8bit_color(path)
    if interlace:
        raise CorruptSampleError(
            f"{path}: interlaced 16-bit PNG labels are not supported; re-save without interlacing"
        )
    return decode_png16(data, path, channel=0)[:, :, 0]


def decode_png16(
    data: bytes, path: Path | str = "<bytes>", channel: int | None = None
) -> np.ndarray:
    """Decode a non-interlaced 16-bit PNG (gray, gray+alpha, RGB or RGBA) to uint16 (H, W, S).

    With `channel`, only that sample of each pixel is reconstructed (S = 1): PNG filters act
    on each byte position of a pixel separately, so the other channels can be left filtered.
    """
    width, height, bit_depth, color_type, interlace = _parse_header(data, path)
    if bit_depth != 16 or interlace or color_type not in _CHANNELS:
        raise CorruptSampleError(
            f"{path}: expected a non-interlaced 16-bit PNG without palette, got bit depth "
            f"{bit_depth}, colour type {color_type}, interlace {interlace}"
        )
    bytes_per_pixel = 2 * _CHANNELS[color_type]
    compressed = b"".join(body for kind, body in _chunks(data, path) if kind == b"IDAT")
    try:
        raw = zlib.decompress(compressed)
    except zlib.error as error:
        raise CorruptSampleError(f"{path}: image data does not inflate ({error})") from None
    row_bytes = 1 + width * bytes_per_pixel
    if len(raw) != height * row_bytes:
        raise CorruptSampleError(
            f"{path}: image data holds {len(raw)} bytes; expected {height * row_bytes} "
            f"for {width}x{height}"
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, row_bytes)
    filter_types = rows[:, 0]
    if int(filter_types.max(initial=0)) > 4:
        raise CorruptSampleError(f"{path}: unknown PNG filter type {int(filter_types.max())}")
    filtered = rows[:, 1:].reshape(height, width, bytes_per_pixel)
    if channel is not None:
        filtered = filtered[:, :, 2 * channel : 2 * channel + 2]
    pixels = unfilter_scanlines(filtered, filter_types)
    # 16-bit samples are big-endian: high byte first.
    return (pixels[:, :, 0::2].astype(np.uint16) << 8) | pixels[:, :, 1::2]


def unfilter_scanlines(filtered: np.ndarray, filter_types: np.ndarray) -> np.ndarray:
    """Undo PNG filtering of (H, W, B) bytes, B = bytes per pixel, one filter type per row.

    Byte (r, x) depends only on (r, x-1), (r-1, x) and (r-1, x-1) (left, up, up-left), so all
    bytes on an anti-diagonal r + x = d are independent given the previous diagonals. The bytes
    are laid out by diagonal (`skewed[d, r]` holds pixel (r, d - r)), so each of the H + W - 1
    steps works on contiguous slices: left is `[d - 1, r]`, up `[d - 1, r - 1]` and up-left
    `[d - 2, r - 1]`.
    """
    height, width, depth = filtered.shape
    row, column = np.indices((height, width))
    diagonal_of = row + column
    source = np.zeros((height + width - 1, height, depth), dtype=np.int16)
    source[diagonal_of, row] = filtered
    # Two leading zero diagonals and one leading zero row: the bytes "outside the image".
    skewed = np.zeros((height + width + 1, height + 1, depth), dtype=np.int16)
    kinds = filter_types.astype(np.int16)[:, None]
    for diagonal in range(height + width - 1):
        first = max(0, diagonal - width + 1)
        last = min(height - 1, diagonal) + 1
        left = skewed[diagonal + 1, first + 1 : last + 1]
        up = skewed[diagonal + 1, first:last]
        up_left = skewed[diagonal, first:last]
        predictor = _predict(kinds[first:last], left, up, up_left)
        skewed[diagonal + 2, first + 1 : last + 1] = (
            source[diagonal, first:last] + predictor
        ) & 0xFF
    return skewed[diagonal_of + 2, row + 1].astype(np.uint8)


def _predict(kind: np.ndarray, left: np.ndarray, up: np.ndarray, up_left: np.ndarray):
    """The PNG predictor of each byte for its row's filter type (0 None ... 4 Paeth)."""
    predictor = np.where(kind == 1, left, 0)
    predictor = np.where(kind == 2, up, predictor)
    predictor = np.where(kind == 3, (left + up) >> 1, predictor)
    if not (kind == 4).any():
        return predictor
    # Paeth: the neighbour closest to p = left + up - up_left, ties to left, then up.
    distance_left = np.abs(up - up_left)
    distance_up = np.abs(left - up_left)
    distance_up_left = np.abs(left + up - 2 * up_left)
    paeth = np.where(
        (distance_left <= distance_up) & (distance_left <= distance_up_left),
        left,
        np.where(distance_up <= distance_up_left, up, up_left),
    )
    return np.where(kind == 4, paeth, predictor)


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CorruptSampleError(f"{path}: cannot read label ({error.strerror})") from None


def _chunks(data: bytes, path: Path | str):
    """Yield (type, body) of each PNG chunk, checking signature, lengths and CRCs."""
    if not data.startswith(_PNG_SIGNATURE):
        raise CorruptSampleError(f"{path}: not a PNG file (bad signature)")
    offset = len(_PNG_SIGNATURE)
    while offset < len(data):
        if offset + 8 > len(data):
            raise CorruptSampleError(f"{path}: truncated PNG chunk header at byte {offset}")
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        end = offset + 8 + length + 4
        if end > len(data):
            raise CorruptSampleError(f"{path}: truncated PNG chunk {kind!r} at byte {offset}")
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + body) != crc:
            raise CorruptSampleError(f"{path}: PNG chunk {kind!r} fails its CRC check")
        yield kind, body
        if kind == b"IEND":
            return
        offset = end
    raise CorruptSampleError(f"{path}: PNG has no IEND chunk (truncated file)")


def _parse_header(data: bytes, path: Path | str) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from the IHDR chunk."""
    kind, body = next(_chunks(data, path))
    if kind != b"IHDR" or len(body) != 13:
        raise CorruptSampleError(f"{path}: PNG does not start with a valid IHDR chunk")
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
    if width == 0 or height == 0:
        raise CorruptSampleError(f"{path}: PNG has an empty size {width}x{height}")
    return width, height, bit_depth, color_type, interlace


def _read_8bit_color(path: Path) -> np.ndarray:
    """Channel R of an 8-bit RGB(A) label PNG (some conversions re-save SYNTHIA that way)."""
    try:
        with Image.open(path) as opened:
            return np.array(opened.convert("RGB"))[:, :, 0]
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptSampleError(f"{path}: cannot read label ({error})") from None
