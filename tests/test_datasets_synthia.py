"""SYNTHIA RAND-CITYSCAPES: 16-bit labels checked against hand-worked train ids, its evaluation
subsets, and the 16-bit PNG decoder against Pillow and an independent encoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fixtures_datasets import (
    encode_png16,
    png_filter_types,
    random_image,
    write_gray,
    write_png16,
    write_rgb,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from blda_tools.datasets import (
    CITYSCAPES_CLASSES,
    SYNTHIA_13_CLASSES,
    SYNTHIA_16_CLASSES,
    CorruptSampleError,
    build_dataset,
)
from blda_tools.datasets.synthia import decode_png16

H, W = 6, 8


# ---------------------------------------------------------------- SYNTHIA

# SYNTHIA ids in channel R and their train ids, by hand from the SYNTHIA README table.
SYNTHIA_IDS = np.array(
    [
        [3, 4, 2, 21, 5, 7, 15, 9],
        [6, 16, 1, 10, 17, 8, 18, 19],
        [20, 12, 11, 0, 13, 14, 22, 255],
        # 0x0103 and 0x0803 have low byte 3 (road), 0x0300 and 0x0A00 high bytes 3 and 10:
        # reading one byte, or the wrong byte order, gives road or person instead of ignore.
        [0x0103, 0x0300, 0x0803, 0x0A00, 3, 8, 10, 1],
        [8] * 8,
        [3] * 8,
    ]
)
SYNTHIA_TRAIN_IDS = np.array(
    [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [8, 9, 10, 11, 12, 13, 14, 15],
        [16, 17, 18, 255, 255, 255, 255, 255],
        [255, 255, 255, 255, 0, 13, 11, 10],
        [13] * 8,
        [0] * 8,
    ]
)


def synthia_label_samples() -> np.ndarray:
    """R = class id, G = instance id (car's id 8 mostly, 300 here and there), B = other."""
    instance = np.full((H, W), 8)
    instance[::2, ::3] = 300
    other = 1000 + np.arange(H * W).reshape(H, W)
    return np.stack([SYNTHIA_IDS, instance, other], axis=-1).astype(np.uint16)


def test_synthia_16bit_labels_read_from_channel_r(tmp_path):
    filters = [0, 1, 2, 3, 4, 4]  # every PNG filter type
    for index in range(2):
        write_rgb(tmp_path / "RGB" / f"{index:07d}.png", random_image(H, W, seed=index))
        write_png16(tmp_path / "GT/LABELS" / f"{index:07d}.png", synthia_label_samples(), filters)
    dataset = build_dataset("synthia", tmp_path)
    assert dataset.names == ("RGB/0000000", "RGB/0000001") and dataset.num_classes == 19
    for index in range(2):
        sample = dataset[index]
        np.testing.assert_array_equal(sample.label.numpy(), SYNTHIA_TRAIN_IDS)
        np.testing.assert_array_equal(
            sample.image.permute(1, 2, 0).numpy(), random_image(H, W, seed=index)
        )
    # The fixture can tell readers apart: Pillow keeps only the high byte of 16-bit RGB.
    with Image.open(tmp_path / "GT/LABELS/0000000.png") as pillow_read:
        assert not np.array_equal(np.array(pillow_read)[:, :, 0], SYNTHIA_IDS)


def test_synthia_converted_by_daformer_reads_the_original_labels(tmp_path):
    write_rgb(tmp_path / "RGB/0000000.png", random_image(H, W, 0))
    write_png16(tmp_path / "GT/LABELS/0000000.png", synthia_label_samples())
    # DAFormer's converter writes train ids beside it; zeros, so that reading it would show.
    write_gray(tmp_path / "GT/LABELS/0000000_labelTrainIds.png", np.zeros((H, W)))
    dataset = build_dataset("synthia", tmp_path)
    assert dataset.names == ("RGB/0000000",)
    np.testing.assert_array_equal(dataset[0].label.numpy(), SYNTHIA_TRAIN_IDS)


def test_synthia_8bit_gray_labels_and_corrupt_16bit_labels(tmp_path):
    write_rgb(tmp_path / "RGB/0000000.png", random_image(H, W, 0))
    write_gray(tmp_path / "GT/LABELS/0000000.png", np.minimum(SYNTHIA_IDS, 255))
    expected = SYNTHIA_TRAIN_IDS.copy()
    expected[3, :4] = [255, 255, 255, 255]  # the clipped values are all 255 -> ignore
    np.testing.assert_array_equal(build_dataset("synthia", tmp_path)[0].label.numpy(), expected)

    data = bytearray(encode_png16(synthia_label_samples()))
    data[45] ^= 0xFF  # inside the IDAT body (IDAT starts at byte 33): its CRC now fails
    (tmp_path / "GT/LABELS/0000000.png").write_bytes(bytes(data))
    with pytest.raises(CorruptSampleError, match=r"0000000.png: PNG chunk b'IDAT' fails its CRC"):
        build_dataset("synthia", tmp_path)[0]
    (tmp_path / "GT/LABELS/0000000.png").write_bytes(bytes(data[:30]))
    with pytest.raises(CorruptSampleError, match="0000000.png: truncated"):
        build_dataset("synthia", tmp_path)[0]


def test_synthia_evaluation_subsets():
    assert len(SYNTHIA_16_CLASSES) == 16 and len(SYNTHIA_13_CLASSES) == 13
    names16 = {CITYSCAPES_CLASSES[c] for c in SYNTHIA_16_CLASSES}
    assert set(CITYSCAPES_CLASSES) - names16 == {"terrain", "truck", "train"}
    names13 = {CITYSCAPES_CLASSES[c] for c in SYNTHIA_13_CLASSES}
    assert names16 - names13 == {"wall", "fence", "pole"}


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 6),
    width=st.integers(1, 7),
    channels=st.sampled_from([1, 2, 3, 4]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_png16_decoder_inverts_every_filter(height, width, channels, seed, data):
    filters = data.draw(st.lists(st.integers(0, 4), min_size=height, max_size=height))
    samples = np.random.default_rng(seed).integers(0, 65536, (height, width, channels))
    decoded = decode_png16(encode_png16(samples.astype(np.uint16), filters))
    np.testing.assert_array_equal(decoded, samples)


def test_png16_decoder_matches_pillow_on_pillow_written_files():
    rng = np.random.default_rng(1)
    # Coarse noise plus a ramp: Pillow's adaptive filtering then picks several filter types.
    gray = rng.integers(0, 40, (60, 80)) * 1000 + np.arange(80)
    buffer = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16)).save(buffer, format="PNG")
    assert len(png_filter_types(buffer.getvalue())) >= 3
    with Image.open(io.BytesIO(buffer.getvalue())) as pillow_read:
        np.testing.assert_array_equal(
            decode_png16(buffer.getvalue())[:, :, 0], np.array(pillow_read)
        )
    # For 16-bit RGB Pillow returns the high bytes: an independent check of those.
    rgb = rng.integers(0, 65536, (9, 11, 3)).astype(np.uint16)
    encoded = encode_png16(rgb, [4, 3, 1, 2, 0, 4, 4, 3, 1])
    with Image.open(io.BytesIO(encoded)) as pillow_read:
        np.testing.assert_array_equal(decode_png16(encoded) >> 8, np.array(pillow_read))
