"""Whole-image and sliding-window inference against hand-worked window averages, closed-form
bilinear values, and models whose output is known in advance (coordinates, 1 x 1 convs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.inference.predict import (
    predict_logits,
    select_device,
    window_starts,
)
from blda_tools.models import create_model


class WindowCoordinates(nn.Module):
    """Logits = the pixel's column (channel 0) and row (channel 1) inside the input it is given.

    Not translation-equivariant, so each window's contribution to the average can be told apart.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        columns = torch.arange(width, dtype=torch.float32).expand(batch, 1, height, width)
        rows = torch.arange(height, dtype=torch.float32)[:, None].expand(batch, 1, height, width)
        return torch.cat([columns, rows], dim=1)


def channel_identity() -> nn.Module:
    conv = nn.Conv2d(3, 3, 1, bias=False)
    conv.weight.data = torch.eye(3)[:, :, None, None]
    return conv


def test_window_starts_hand_worked():
    assert window_starts(2048, 1024, 512) == [0, 512, 1024]  # Cityscapes width, DAFormer
    assert window_starts(1024, 1024, 512) == [0]
    assert window_starts(6, 4, 2) == [0, 2]
    assert window_starts(7, 4, 2) == [0, 2, 3]  # the last window is flush with the border
    assert window_starts(3, 4, 2) == [0]  # image smaller than a window


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 300), crop=st.integers(1, 120), stride=st.integers(1, 120))
def test_windows_cover_the_axis_with_steps_at_most_stride(length, crop, stride):
    stride = min(stride, crop)  # larger steps would leave gaps, as in mmseg
    starts = window_starts(length, crop, stride)
    size = min(crop, length)
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start : start + size] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def test_overlapping_windows_average_as_worked_by_hand():
    # 5 x 7 image, 4 x 4 windows, stride 2: columns start at 0, 2, 3 and rows at 0, 1.
    # Column x sees (x - start) from every window covering it:
    # x=0: 0 | x=1: 1 | x=2: (2+0)/2 | x=3: (3+1+0)/3 | x=4: (2+1)/2 | x=5: (3+2)/2 | x=6: 3
    expected_columns = torch.tensor([0, 1, 1, 4 / 3, 1.5, 2.5, 3])
    # y=0: 0 | y=1: (1+0)/2 | y=2: (2+1)/2 | y=3: (3+2)/2 | y=4: 3
    expected_rows = torch.tensor([0, 0.5, 1.5, 2.5, 3])
    images = torch.zeros(2, 3, 5, 7)
    logits = predict_logits(WindowCoordinates(), images, "slide", crop=(4, 4), stride=(2, 2))
    assert logits.shape == (2, 2, 5, 7)
    torch.testing.assert_close(logits[:, 0], expected_columns.expand(2, 5, 7))
    torch.testing.assert_close(logits[:, 1], expected_rows[:, None].expand(2, 5, 7))


def test_one_window_covering_the_image_equals_whole_image():
    torch.manual_seed(0)
    model = create_model("tiny", 5).eval()
    images = torch.randn(2, 3, 32, 48)
    whole = predict_logits(model, images, "whole")
    one_window = predict_logits(model, images, "slide", crop=(64, 64), stride=(32, 32))
    assert torch.equal(whole, one_window)


def test_per_pixel_model_gives_the_same_logits_with_overlapping_windows():
    torch.manual_seed(1)
    model = nn.Conv2d(3, 4, 1)
    images = torch.randn(1, 3, 19, 23)
    whole = predict_logits(model, images, "whole")
    torch.testing.assert_close(whole, model(images))
    slide = predict_logits(model, images, "slide", crop=(8, 8), stride=(3, 5))
    torch.testing.assert_close(slide, whole, atol=1e-6, rtol=0)


def test_each_image_of_a_batch_gets_its_own_windows():
    torch.manual_seed(2)
    model = create_model("tiny", 3).eval()
    images = torch.randn(2, 3, 16, 24)
    batched = predict_logits(model, images, "slide", crop=(12, 12), stride=(8, 8))
    for index in range(2):
        alone = predict_logits(
            model, images[index : index + 1], "slide", crop=(12, 12), stride=(8, 8)
        )
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=1e-5)


def test_flip_averages_the_flipped_logits_flipped_back():
    # Column of the flipped image, flipped back, is (W - 1 - x): the average is (W - 1) / 2.
    images = torch.zeros(1, 3, 4, 9)
    logits = predict_logits(WindowCoordinates(), images, flip=True)
    torch.testing.assert_close(logits[:, 0], torch.full((1, 4, 9), 4.0))
    torch.testing.assert_close(logits[:, 1], torch.arange(4.0)[:, None].expand(1, 4, 9))


def test_resize_and_back_to_label_resolution_closed_form():
    # A ramp v(x) = x upsampled 2x and brought back with bilinear, align_corners=False:
    # interior pixels average up(2x) = x - 1/4 and up(2x + 1) = x + 1/4, so stay x; the edges
    # are clamped: up(0) = 0 gives (0 + 1/4) / 2 = 1/8, up(2W - 1) = W - 1 gives W - 9/8.
    width = 6
    ramp = torch.arange(float(width)).expand(1, 3, 4, width).contiguous()
    logits = predict_logits(channel_identity(), ramp, resize=(8, 2 * width))
    expected = torch.tensor([0.125, 1, 2, 3, 4, width - 1.125])
    torch.testing.assert_close(logits, expected.expand(1, 3, 4, width))


def test_low_resolution_logits_come_back_at_output_size():
    # A stride-4 model on a constant image gives constant logits at any output size.
    model = nn.Sequential(nn.AvgPool2d(4), channel_identity())
    images = torch.full((2, 3, 16, 24), 0.5)
    for mode in ("whole", "slide"):
        logits = predict_logits(model, images, mode, crop=(8, 8), stride=(4, 4))
        torch.testing.assert_close(logits, torch.full((2, 3, 16, 24), 0.5))
    smaller = predict_logits(model, images, output_size=(5, 7))
    assert smaller.shape == (2, 3, 5, 7)


def test_bad_settings_and_outputs_raise_clear_errors():
    images = torch.zeros(1, 3, 8, 8)
    with pytest.raises(BLDAError, match="--mode"):
        predict_logits(channel_identity(), images, "tiles")
    with pytest.raises(BLDAError, match="--crop"):
        predict_logits(channel_identity(), images, "slide", crop=(0, 4))
    with pytest.raises(BLDAError, match="--resize"):
        predict_logits(channel_identity(), images, resize=(8,))
    with pytest.raises(BLDAError, match=r"normalised float \(B, 3, H, W\)"):
        predict_logits(channel_identity(), torch.zeros(3, 8, 8))
    with pytest.raises(BLDAError, match=r"model: returned class scores \(1, 3\).*classifier"):
        predict_logits(lambda x: x.mean((2, 3)), images)
    if not torch.cuda.is_available():
        with pytest.raises(BLDAError, match="amp: mixed precision is only used on CUDA"):
            predict_logits(channel_identity(), images, amp=True)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(BLDAError, match="--device: 'gpu0' is not a device"):
        select_device("gpu0")
    if torch.cuda.is_available():
        assert select_device(None).type == "cuda"
    else:
        assert select_device(None) == torch.device("cpu")
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(BLDAError, match="--device cuda: CUDA is not available"):
            select_device("cuda")


def test_predict_logits_refuses_a_stride_beyond_the_crop_and_inputs_too_small():
    """A stride larger than the window leaves pixels in no window (their logits were NaN);
    an input below a kernel's size is torch's RuntimeError, told as one line."""
    from blda_tools.inference.predict import predict_logits

    model = torch.nn.Conv2d(3, 4, 5)
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(BLDAError, match=r"stride \(32, 32\) is larger than crop \(16, 16\)"):
        predict_logits(model, images, mode="slide", crop=(16, 16), stride=(32, 32))
    with pytest.raises(BLDAError, match="an input of 4 x 4 is too small for it"):
        predict_logits(model, images, mode="whole", resize=(4, 4))
