"""The dump's decoding shortcuts against their slow paths as independent truth: OpenCV PNG
decoding (`datasets.png_fast`) against Pillow, the uint8 label table against numpy's `take`,
the normalisation table against the float32 formula."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from blda_tools.datasets import png_fast
from blda_tools.datasets.base import array_to_tensor, map_ids, read_id_image, read_rgb_array
from blda_tools.models import normalize
from blda_tools.models.segmentor import normalisation_table

RNG = np.random.default_rng(0)


def pillow_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def chunk(kind: bytes, body: bytes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add(kind, body)
    return info


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (64, 33)])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"pnginfo": chunk(b"gAMA", struct.pack(">I", 45455))},
        {"pnginfo": chunk(b"cHRM", struct.pack(">8I", *range(31270, 31278)))},
        {"pnginfo": chunk(b"tEXt", b"Comment\x00made by the test")},
        {"dpi": (72, 72)},
    ],
)
def test_rgb_pngs_decode_as_pillow_decodes_them(tmp_path, size, extra):
    pixels = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path, **extra)
    decoded = png_fast.decode_rgb8(path)
    assert decoded is not None and decoded.dtype == np.uint8
    assert np.array_equal(decoded, pillow_rgb(path))
    assert np.array_equal(read_rgb_array(path), pixels)


def test_grey_labels_decode_as_pillow_decodes_them(tmp_path):
    ids = RNG.integers(0, 256, (9, 31), dtype=np.uint8)
    path = tmp_path / "label.png"
    Image.fromarray(ids).save(path)
    assert np.array_equal(png_fast.decode_grey8(path), np.array(Image.open(path)))
    assert np.array_equal(read_id_image(path), ids)


def save_other_layouts(tmp_path) -> dict:
    """PNGs the shortcut must leave to Pillow, with what Pillow reads from each."""
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    files = {
        "palette": Image.fromarray(rgb[:, :, 0] % 4).convert("P"),
        "rgba": Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])),
        "grey16": Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257),
        "grey": Image.fromarray(rgb[:, :, 0]),
        "rgb": Image.fromarray(rgb),
    }
    paths = {}
    for name, image in files.items():
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    paths["rgb_trns"] = tmp_path / "rgb_trns.png"
    files["rgb"].save(paths["rgb_trns"], transparency=(1, 2, 3))
    paths["grey_trns"] = tmp_path / "grey_trns.png"
    files["grey"].save(paths["grey_trns"], transparency=5)
    paths["icc"] = tmp_path / "icc.png"
    files["rgb"].save(paths["icc"], icc_profile=b"\0" * 200)
    data = paths["rgb"].read_bytes()
    paths["truncated"] = tmp_path / "truncated.png"
    paths["truncated"].write_bytes(data[: len(data) - 20])
    paths["missing"] = tmp_path / "missing.png"
    return paths


@pytest.mark.parametrize(
    ("decoder", "names"),
    [
        (png_fast.decode_rgb8, ["palette", "rgba", "grey16", "grey", "rgb_trns", "icc"]),
        (png_fast.decode_grey8, ["palette", "rgba", "grey16", "rgb", "grey_trns"]),
        (png_fast.decode_rgb8, ["truncated", "missing"]),
    ],
)
def test_other_layouts_are_left_to_pillow(tmp_path, decoder, names):
    paths = save_other_layouts(tmp_path)
    for name in names:
        assert decoder(paths[name]) is None, name


def opencv_colour(path) -> np.ndarray:
    """mmcv's `imread(path, "color")` (its cv2 backend), as RGB."""
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_images_read_as_mmcv_reads_them_and_classifier_images_as_pillow(tmp_path):
    paths = save_other_layouts(tmp_path)
    grey16 = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)  # not 257 x a byte
    paths["grey16_random"] = tmp_path / "grey16_random.png"
    Image.fromarray(grey16).save(paths["grey16_random"])
    rgb16 = RNG.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    paths["rgb16"] = tmp_path / "rgb16.png"
    cv2.imwrite(str(paths["rgb16"]), rgb16)
    for name in ["palette", "rgba", "grey16", "grey", "rgb", "rgb_trns", "grey_trns", "icc",
                 "grey16_random", "rgb16"]:  # fmt: skip
        assert np.array_equal(read_rgb_array(paths[name]), opencv_colour(paths[name])), name
        pillow = read_rgb_array(paths[name], reader="pillow")
        assert np.array_equal(pillow, pillow_rgb(paths[name])), name
    # the case that differs: Pillow clips 16-bit grey at 255, OpenCV keeps the high byte
    assert np.array_equal(read_rgb_array(paths["grey16_random"])[:, :, 1], grey16 >> 8)
    assert not np.array_equal(
        pillow_rgb(paths["grey16_random"]), opencv_colour(paths["grey16_random"])
    )


def test_corrupt_image_data_falls_back_to_pillow_and_its_error(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # inside the compressed image data: its check fails
    path.write_bytes(bytes(data))
    assert png_fast.decode_rgb8(path) is None
    from blda_tools.datasets import CorruptSampleError

    with pytest.raises(CorruptSampleError, match="cannot read image"):
        read_rgb_array(path)


def test_simple_png_size_reads_the_header():
    body = struct.pack(">IIBBBBB", 5, 3, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))
    idat = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))
    iend = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    data = np.frombuffer(b"\x89PNG\r\n\x1a\n" + ihdr + idat + iend, np.uint8)
    assert png_fast.simple_png_size(data, 2) == (3, 5)
    assert png_fast.simple_png_size(data, 0) is None


def test_uint8_label_table_equals_numpy_take_for_every_id():
    table = torch.full((256,), 255, dtype=torch.int64)
    table[RNG.permutation(256)[:40]] = torch.arange(40)
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mapped = map_ids(ids, table)
    assert mapped.dtype == torch.uint8
    assert np.array_equal(mapped.numpy(), np.take(table.numpy(), ids))
    wide = table.clone()
    wide[3] = 300  # a value beyond uint8: the int64 path
    assert map_ids(ids, wide).dtype == torch.int64
    assert np.array_equal(map_ids(ids, wide).numpy(), np.take(wide.numpy(), ids))


def test_normalisation_table_equals_the_float32_formula():
    mean = np.array([123.675, 116.28, 103.53], np.float32)  # mmseg's img_norm_cfg, typed in
    std = np.array([58.395, 57.12, 57.375], np.float32)
    levels = np.arange(256, dtype=np.float32)
    expected = (levels[None] - mean[:, None]) / std[:, None]
    assert np.array_equal(normalisation_table().numpy(), expected)


@pytest.mark.parametrize("shape", [(1, 3, 256, 512), (2, 3, 1, 7), (3, 5, 4)])
def test_normalize_by_table_is_bitwise_the_float_path(shape):
    images = torch.from_numpy(RNG.integers(0, 256, shape, dtype=np.uint8))
    expected = normalize(images.float())  # the float input takes the arithmetic path
    assert torch.equal(normalize(images), expected)
    assert normalize(images).is_contiguous()
    non_contiguous = images.transpose(-1, -2)
    assert torch.equal(normalize(non_contiguous), normalize(non_contiguous.float()))


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (256, 512)])
def test_array_to_tensor_equals_torchs_transposing_copy(size):
    image = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
    tensor = array_to_tensor(image)
    assert tensor.is_contiguous() and tensor.dtype == torch.uint8
    assert torch.equal(tensor, torch.from_numpy(image).permute(2, 0, 1))
