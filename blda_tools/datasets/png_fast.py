"""Decoding the common PNG layouts with OpenCV straight into numpy, the rest left to Pillow.

A dump decodes one image and one label per forward pass; on a 256 x 512 Cityscapes-layout
pair Pillow took 3.7 ms (decode, `convert("RGB")`, `np.array`) and OpenCV's `imdecode` 2.9 ms
for the image, 0.29 vs 0.21 ms for the label (`benchmarks/bench_dump.py`). PNG is lossless,
so both give the same pixels, but only where both read the file the same way. OpenCV is used
only for files with none of the features they treat differently:

- 8-bit depth, colour type 2 (RGB) for images, 0 (grey) for labels: palettes (Pillow keeps
  the indices of a palette label, OpenCV gives colours), alpha, tRNS (OpenCV adds an alpha
  channel to a grey image) and 16 bits go to Pillow;
- before the first IDAT only the chunks in `_CHUNKS_BEFORE_DATA` (neither library applies
  gamma, chromaticities, ICC profiles or text to the pixel values it returns, but a chunk
  not listed is simply not tried);
- the file ends with the IEND chunk (a truncated file is left to Pillow, which decides
  whether it is readable and words the error, as before);
- at most Pillow's `MAX_IMAGE_PIXELS`, so Pillow's decompression-bomb check still applies.

Anything else, or an OpenCV failure (a corrupt stream; libpng then prints one line on
stderr), returns None and the caller decodes with Pillow as before.
"""

from __future__ import annotations

import os
import struct

import cv2
import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_CHUNKS_BEFORE_DATA = frozenset({b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"tIME", b"gAMA", b"cHRM"})
RGB_COLOUR_TYPE, GREY_COLOUR_TYPE = 2, 0


def decode_rgb8(path: str | os.PathLike) -> np.ndarray | None:
    """An 8-bit RGB PNG as uint8 `(H, W, 3)` RGB, or None (see the module doc)."""
    return _decode(path, RGB_COLOUR_TYPE, cv2.IMREAD_COLOR_RGB, channels=3)


def decode_grey8(path: str | os.PathLike) -> np.ndarray | None:
    """An 8-bit grey PNG as its stored uint8 values `(H, W)`, or None (see the module doc)."""
    return _decode(path, GREY_COLOUR_TYPE, cv2.IMREAD_UNCHANGED, channels=1)


def _decode(path, colour_type: int, flag: int, channels: int) -> np.ndarray | None:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError):
        return None  # Pillow reports the file, as before
    size = simple_png_size(data, colour_type)
    if size is None:
        return None
    decoded = cv2.imdecode(data, flag)
    expected = size if channels == 1 else (*size, channels)
    if decoded is None or decoded.shape != expected or decoded.dtype != np.uint8:
        return None
    return decoded


def simple_png_size(data: np.ndarray, colour_type: int) -> tuple[int, int] | None:
    """`(height, width)` of a complete 8-bit PNG of `colour_type` whose chunks before the
    image data are all in `_CHUNKS_BEFORE_DATA`; None for any other file."""
    raw = data.data
    if len(raw) < 8 + 25 + 12 or bytes(raw[:8]) != _SIGNATURE or bytes(raw[-12:]) != _IEND:
        return None
    length, kind, width, height, depth, colour, _, _, _ = struct.unpack(">I4sIIBBBBB", raw[8:29])
    if kind != b"IHDR" or length != 13 or depth != 8 or colour != colour_type:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if width == 0 or height == 0 or (limit is not None and width * height > limit):
        return None
    offset = 8 + 8 + 13 + 4
    while offset + 8 <= len(raw):  # the few chunks before the first IDAT
        length, kind = struct.unpack(">I4s", raw[offset : offset + 8])
        if kind == b"IDAT":
            return height, width
        if kind not in _CHUNKS_BEFORE_DATA:
            return None
        offset += 12 + length
    return None
