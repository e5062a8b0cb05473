"""Helpers that write tiny datasets in the official layouts, and an independent PNG encoder.

The 16-bit PNG encoder applies the PNG scanline filters in the forward direction (PNG
specification, section 9), so the library's decoder (which undoes them) is checked against
an implementation written the other way round.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLOR_TYPE_OF_CHANNELS = {1: 0, 2: 4, 3: 2, 4: 6}


def write_rgb(path: Path, pixels: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 array as an RGB PNG (or JPEG by extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def write_gray(path: Path, values: np.ndarray) -> Path:
    """Write an (H, W) array of 0..255 as an 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def write_palette(path: Path, indices: np.ndarray) -> Path:
    """Write an (H, W) array of 0..255 as a palette PNG (as GTA5 labels are stored).

    The palette colours are deliberately unrelated to the indices, so reading colours (or
    luminance) instead of indices gives other values.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("P", (indices.shape[1], indices.shape[0]))
    image.putdata(indices.astype(np.uint8).ravel().tolist())
    palette = [(255 - i, (7 * i) % 256, (13 * i + 5) % 256) for i in range(256)]
    image.putpalette([channel for color in palette for channel in color])
    image.save(path)
    return path


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """Distinct values per channel, so a channel-order mistake shows."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _paeth(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    estimate = left + up - up_left
    to_left, to_up, to_up_left = (
        np.abs(estimate - left),
        np.abs(estimate - up),
        np.abs(estimate - up_left),
    )
    return np.where(
        (to_left <= to_up) & (to_left <= to_up_left),
        left,
        np.where(to_up <= to_up_left, up, up_left),
    )


def filter_rows(raw: np.ndarray, filters: list[int], bytes_per_pixel: int) -> bytes:
    """Apply PNG filter `filters[r]` to each row of (H, row_bytes) uint8 `raw`."""
    height, row_bytes = raw.shape
    padded = np.zeros((height + 1, row_bytes + bytes_per_pixel), dtype=np.int32)
    padded[1:, bytes_per_pixel:] = raw
    out = bytearray()
    for r, kind in enumerate(filters):
        current = padded[r + 1, bytes_per_pixel:]
        left = padded[r + 1, :-bytes_per_pixel]
        up = padded[r, bytes_per_pixel:]
        up_left = padded[r, :-bytes_per_pixel]
        predictor = [0 * current, left, up, (left + up) // 2, _paeth(left, up, up_left)][kind]
        out.append(kind)
        out += ((current - predictor) % 256).astype(np.uint8).tobytes()
    return bytes(out)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png16(samples: np.ndarray, filters: list[int] | None = None) -> bytes:
    """Encode (H, W, S) uint16 samples (S = 1..4) as a 16-bit PNG with the given row filters."""
    height, width, channels = samples.shape
    filters = [r % 5 for r in range(height)] if filters is None else filters
    raw = samples.astype(">u2").view(np.uint8).reshape(height, width * channels * 2)
    header = struct.pack(">IIBBBBB", width, height, 16, COLOR_TYPE_OF_CHANNELS[channels], 0, 0, 0)
    idat = zlib.compress(filter_rows(raw, filters, 2 * channels))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def write_png16(path: Path, samples: np.ndarray, filters: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png16(samples, filters))
    return path


def png_filter_types(data: bytes) -> set[int]:
    """The filter types used by a non-interlaced PNG's rows (to check a fixture's coverage)."""
    offset, idat, header = 8, b"", None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    width, height, bit_depth, color_type = header[:4]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row_bytes = 1 + width * channels * bit_depth // 8
    raw = zlib.decompress(idat)
    return {raw[r * row_bytes] for r in range(height)}
