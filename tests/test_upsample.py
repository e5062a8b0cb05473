"""The dump's fused resize + float16 cast (`inference.upsample`) against independent truths:
numpy's float16 conversion, torch's `F.interpolate` and a float64 bilinear computed directly
in numpy from the definition of `align_corners=False`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blda_tools.inference.upsample import (
    HARDWARE_FLOAT16,
    float32_to_float16_bits,
    upsample_to_float16_rows,
)

CONVERSIONS = [False, True] if HARDWARE_FLOAT16 else [False]


def conversion_cases() -> np.ndarray:
    """Every float16 value, every midpoint between neighbours (the ties), one float32 ulp on
    either side of each, the specials and random float32 bit patterns."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float32))
    midpoints = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    around = np.concatenate(
        [np.nextafter(midpoints, np.float32(np.inf)), np.nextafter(midpoints, np.float32(-np.inf))]
    )
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, -65520, 1e30, 2**-25,
         2**-24, 2**-14, 3 * 2**-26, 1e-40], np.float32,
    )  # fmt: skip
    bits = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    random_values = bits.astype(np.uint32).view(np.float32)
    return np.concatenate([halves.astype(np.float32), midpoints, around, specials, random_values])


def test_float16_conversion_equals_numpy_bit_for_bit():
    values = conversion_cases()
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    converted = np.empty(values.size, np.uint16)
    float32_to_float16_bits(values, converted)
    nan = np.isnan(expected)
    assert np.array_equal(converted[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(converted.view(np.float16)[nan]).all()


@pytest.mark.parametrize("by_hardware", CONVERSIONS)
def test_hardware_and_integer_conversions_agree_in_the_kernel(by_hardware):
    # Each value a class of a (1, 1) map resized to itself: a copy, then the cast.
    values = conversion_cases()[:200_000]
    rows, _ = upsample_to_float16_rows(values[:, None, None], (1, 1), by_hardware=by_hardware)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    nan = np.isnan(expected)
    assert np.array_equal(rows[0].view(np.uint16)[~nan], expected.view(np.uint16)[~nan])


def torch_rows(logits: np.ndarray, size, stride=1) -> np.ndarray:
    """Today's torch path: channels-last `F.interpolate`, strided, cast to float16 rows."""
    tensor = torch.from_numpy(logits)[None].contiguous(memory_format=torch.channels_last)
    if tuple(size) != logits.shape[1:]:
        tensor = F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    strided = tensor[0, :, ::stride, ::stride]
    return strided.permute(1, 2, 0).reshape(-1, logits.shape[0]).half().numpy()


def numpy_bilinear(logits: np.ndarray, size) -> np.ndarray:
    """Bilinear resize in float64 from the definition: output pixel i samples input coordinate
    (i + 0.5) * in / out - 0.5, clamped to [0, in - 1], between its two neighbours."""

    def axis(n_in, n_out):
        source = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, source - low

    y0, y1, fy = axis(logits.shape[1], size[0])
    x0, x1, fx = axis(logits.shape[2], size[1])
    values = logits.astype(np.float64)
    top = values[:, y0][:, :, x0] * (1 - fx) + values[:, y0][:, :, x1] * fx
    bottom = values[:, y1][:, :, x0] * (1 - fx) + values[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def assert_within_tolerance(rows, reference, scale):
    """The documented tolerance: one float16 ulp, or a few float32 ulps of the inputs'
    magnitude where sums cancel near 0."""
    rows64, reference64 = rows.astype(np.float64), reference.astype(np.float64)
    ulp = np.spacing(np.maximum(np.abs(rows), np.abs(reference.astype(np.float16))))
    allowed = np.maximum(ulp.astype(np.float64), 8 * np.finfo(np.float32).eps * scale)
    assert (np.abs(rows64 - reference64) <= allowed).all()


SHAPES = [  # (C, h, w) -> (H, W): the dump's 4x, uneven ratios, 1-pixel sides, downsampling
    ((19, 64, 128), (256, 512)),
    ((3, 7, 13), (50, 77)),
    ((5, 1, 1), (4, 6)),
    ((2, 3, 1), (7, 1)),
    ((4, 9, 17), (5, 8)),
    ((1, 2, 2), (3, 3)),
]


@pytest.mark.parametrize("by_hardware", CONVERSIONS)
@pytest.mark.parametrize(("shape", "size"), SHAPES)
@pytest.mark.parametrize("stride", [1, 3])
def test_resize_matches_torch_and_float64_bilinear(shape, size, stride, by_hardware):
    logits = (np.random.default_rng(1).standard_normal(shape) * 8).astype(np.float32)
    rows, largest = upsample_to_float16_rows(logits, size, stride, by_hardware=by_hardware)
    expected = torch_rows(logits, size, stride)
    assert rows.shape == expected.shape and rows.dtype == np.float16
    scale = float(np.abs(logits).max())
    assert_within_tolerance(rows, expected, scale)
    exact = numpy_bilinear(logits, size)[:, ::stride, ::stride]
    exact_rows = exact.transpose(1, 2, 0).reshape(-1, shape[0])
    assert_within_tolerance(rows, exact_rows, scale)
    assert largest == pytest.approx(np.abs(exact_rows).max(), rel=1e-6)


def test_few_values_differ_from_torch_on_the_dumps_shape():
    logits = (np.random.default_rng(2).standard_normal((19, 64, 128)) * 5).astype(np.float32)
    rows, _ = upsample_to_float16_rows(logits, (256, 512))
    assert (rows != torch_rows(logits, (256, 512))).mean() < 1e-3  # measured ~3e-4


@pytest.mark.parametrize("shape", [(19, 32, 48), (3, 1, 5)])
def test_equal_sizes_copy_and_cast_exactly(shape):
    logits = (np.random.default_rng(3).standard_normal(shape) * 100).astype(np.float32)
    rows, largest = upsample_to_float16_rows(logits, shape[1:], stride=2)
    assert np.array_equal(rows, torch_rows(logits, shape[1:], stride=2))
    assert largest == np.abs(logits[:, ::2, ::2]).max()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 70000.0])
def test_largest_reports_values_the_store_refuses(bad):
    logits = np.zeros((2, 4, 4), np.float32)
    logits[1] = bad
    _, largest = upsample_to_float16_rows(logits, (8, 8))
    assert not largest < 65504


@pytest.mark.parametrize("stride", [1, 2])
def test_dump_stores_torch_resized_logits_within_the_tolerance(tmp_path, stride):
    """A dump through the fused path (float16 store) against the same dump through torch's
    resize (float32 store, cast here): the same index and labels, logits within tolerance."""
    from PIL import Image

    from blda_tools.inference.dump import prepare_dump
    from blda_tools.inference.pixel_sampling import PixelSampling
    from blda_tools.inference.predict import InferenceSettings
    from blda_tools.store import LogitStore

    rng = np.random.default_rng(4)
    for index, size in enumerate([(40, 56), (40, 56), (33, 47)]):
        stem = f"aachen_000000_{index:06d}"
        image_dir = tmp_path / "data" / "leftImg8bit" / "val" / "aachen"
        label_dir = tmp_path / "data" / "gtFine" / "val" / "aachen"
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / f"{stem}_leftImg8bit.png")
        ids = rng.integers(0, 34, size).astype(np.uint8)
        Image.fromarray(ids).save(label_dir / f"{stem}_gtFine_labelIds.png")
    stores = {}
    for dtype in ("float16", "float32"):
        torch.manual_seed(0)
        out = tmp_path / f"{dtype}.h5"
        job = prepare_dump(
            "tiny", None, "cityscapes", tmp_path / "data", "val", out,
            random_weights=True, inference=InferenceSettings(mode="whole"), workers=0,
            device="cpu", sampling=PixelSampling(stride=stride), dtype=dtype,
        )  # fmt: skip
        job.run()
        stores[dtype] = LogitStore(out)
    fused, reference = stores["float16"], stores["float32"]
    assert fused.images == reference.images
    for a, b in zip(fused.iter_arrays(dtype=None), reference.iter_arrays(dtype=None), strict=True):
        assert np.array_equal(a.labels, b.labels)
        scale = float(np.abs(b.logits).max())
        assert_within_tolerance(a.logits, b.logits.astype(np.float16), scale)
