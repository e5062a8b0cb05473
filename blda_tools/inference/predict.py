"""Whole-image and sliding-window inference, as mmseg evaluates, and device choice.

`predict_logits(model, images)` returns logits at the images' (= the labels') resolution:

* `resize=(H, W)` first resizes the normalised images with torch (bilinear); `keep_ratio`
  makes `(H, W)` bounds, as mmcv's keep-ratio rule (`resize.rescaled_size`);
* `mode="whole"` runs the model once; `mode="slide"` runs it on `crop`-sized windows on a
  regular grid `stride` apart, the last window flush with the border (mmseg's
  `slide_inference`), resizes each window's logits to the window and averages overlapping
  windows with a count map;
* the logits are resized back to the input size (bilinear, `align_corners=False`);
* `flip=True` averages them with those of the horizontally flipped images (flipped back).

`predict_images(model, uint8_images, settings)` is what the base methods' test pipelines do:
the uint8 images are resized with OpenCV first (`resize.resize_uint8`), then normalised, then
predicted as above. Which settings a model family is tested with: `protocols`. A model whose
forward is itself multi-resolution (HRDA, `models/hrda.py`) is just a model here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from blda_tools.errors import BLDAError
from blda_tools.inference import MODES
from blda_tools.inference.resize import rescaled_size, resize_uint8
from blda_tools.models.segmentor import normalize
from blda_tools.models.sliding import window_starts
from blda_tools.runtime.devices import checked_device


def _checked_size(value, option: str) -> tuple[int, int]:
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise BLDAError(f"{option}: expected two positive integers (height, width), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class InferenceSettings:
    """How logits are predicted; stored in a logit store's metadata (`asdict`).

    `resize` is `(height, width)` or None (native size); with `keep_ratio` it bounds the
    size as mmcv's keep-ratio rule does (`resize.rescaled_size`: 1024 x 2048 keeps a
    1024 x 2048 image, turns 128 x 256 into 1024 x 2048 and 1052 x 1914 into 1024 x 1863).
    `crop` and `stride` are `(height, width)` of the sliding windows (unused by
    `mode="whole"`). `center_crop` `(h, w)` crops the resized image's centre (classifiers:
    `predict_classes`). `amp` None means "on where available" (CUDA).
    """

    mode: str = "whole"
    crop: tuple[int, int] = (1024, 1024)
    stride: tuple[int, int] = (512, 512)
    resize: tuple[int, int] | None = None
    keep_ratio: bool = False
    center_crop: tuple[int, int] | None = None
    flip: bool = False
    amp: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BLDAError(f"--mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        for option, value in (("crop", self.crop), ("window-stride", self.stride)):
            _checked_size(value, f"--{option}")
        if self.resize is not None:
            _checked_size(self.resize, "--resize")
        if self.center_crop is not None:
            _checked_size(self.center_crop, "center_crop")
        if self.center_crop is not None and self.resize is not None and not self.keep_ratio:
            if any(side < crop for side, crop in zip(self.resize, self.center_crop, strict=True)):
                # an exact size below the centre crop fails on every image: refused here
                raise BLDAError(
                    f"--resize {self.resize[0]}x{self.resize[1]}: smaller than the "
                    f"{self.center_crop[0]} x {self.center_crop[1]} centre crop of the "
                    "classifier protocol; give at least that"
                )

    @property
    def windows_leave_gaps(self) -> bool:
        """Whether windows of `crop` at `stride` leave pixels in no window (a stride beyond
        the crop): mmseg's slide inference needs every pixel in some window."""
        return any(step > side for step, side in zip(self.stride, self.crop, strict=True))

    def to_metadata(self) -> dict:
        """A JSON-ready dict of the settings (tuples as lists)."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    def input_size(self, size: Sequence[int]) -> tuple[int, int]:
        """The size an image of `size` `(H, W)` is inferred at."""
        if self.resize is None:
            return int(size[0]), int(size[1])
        return rescaled_size(size, self.resize, self.keep_ratio)


def select_device(option: str | torch.device | None = None) -> torch.device:
    """The device to run on: `option` if given ("cpu", "cuda", "cuda:1", "mps"), else CUDA if
    available, else the CPU.

    Under torchrun (`LOCAL_RANK` set) "cuda" and the automatic choice mean this process's GPU.
    Asking for a device that is not there raises `BLDAError`.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if option is None or str(option) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = checked_device(option, "--device")
    if device.type == "cuda" and device.index is None:
        index = local_rank
        if index >= torch.cuda.device_count():
            raise BLDAError(
                f"--device {option}: GPU {index} does not exist ({torch.cuda.device_count()} found)"
            )
        return torch.device("cuda", index)
    return device


def distributed_rank() -> tuple[int, int]:
    """`(rank, world_size)` from torchrun's environment, `(0, 1)` outside it."""
    try:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise BLDAError("RANK / WORLD_SIZE: expected integers (as torchrun sets them)") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise BLDAError(f"RANK={rank}, WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world_size


@torch.inference_mode()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    mode: str = "whole",
    crop: Sequence[int] = (1024, 1024),
    stride: Sequence[int] = (512, 512),
    resize: Sequence[int] | None = None,
    flip: bool = False,
    amp: bool | None = None,
    *,
    keep_ratio: bool = False,
    output_size: Sequence[int] | None = None,
    windows_per_batch: int = 4,
    resize_output: bool = True,
) -> torch.Tensor:
    """Float32 logits `(B, C, H_out, W_out)` of normalised images `(B, 3, H, W)` (channels-last
    in memory when they were resized to the output size).

    The model runs on the images' device. `(H_out, W_out)` is `output_size` (the labels' size)
    or `(H, W)`. `amp=None` uses autocast (float16) on CUDA only; `amp=True` elsewhere is an
    error. `windows_per_batch` bounds how many windows (per image) go through the model at once.
    `resize_output=False` leaves out the last bilinear resize to `(H_out, W_out)`: the logits
    come at the resolution they had before it (the model's own with a whole image at
    `(H_out, W_out)`), for a caller that resizes them itself (the dump, fused with its cast).
    """
    settings = InferenceSettings(
        mode=mode,
        crop=tuple(crop),
        stride=tuple(stride),
        resize=None if resize is None else tuple(resize),
        keep_ratio=keep_ratio,
        flip=flip,
        amp=amp,
    )
    if settings.mode == "slide" and settings.windows_leave_gaps:
        raise BLDAError(  # mmseg's slide inference needs every pixel in some window
            f"predict_logits: stride {settings.stride} is larger than crop {settings.crop}: the "
            "pixels between windows would get no logits; give a stride at most the crop"
        )
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise BLDAError(
            f"predict_logits: images must be normalised float (B, 3, H, W), got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    output_size = tuple(images.shape[-2:]) if output_size is None else tuple(output_size)
    _checked_size(output_size, "output_size")
    forward = _Forward(model, _use_amp(images.device, settings.amp))
    # Without flips, a whole image inferred at the output size needs one resize, model -> output.
    model_resolution = (
        not resize_output
        and not settings.flip
        and settings.input_size(images.shape[-2:]) == output_size
    )
    logits = _predict_resized(forward, images, settings, windows_per_batch, model_resolution)
    if settings.flip:
        # mmseg averages the softmax scores of the flips; a logit store needs logits, so the
        # logits are averaged instead.
        flipped = _predict_resized(forward, images.flip(-1), settings, windows_per_batch)
        logits = (logits + flipped.flip(-1)) / 2
    return _resize_logits(logits, output_size) if resize_output else logits


def _predict_resized(
    forward, images, settings: InferenceSettings, windows_per_batch: int, model_resolution=False
):
    """Logits at the (resized) input size: mmseg's `encode_decode` / `slide_inference`; with
    `model_resolution`, a whole image's logits as the model returns them."""
    if settings.resize is not None:
        images = _resize(images, settings.input_size(images.shape[-2:]))
    if settings.mode == "whole":
        logits = forward(images)
        return logits if model_resolution else _resize_logits(logits, images.shape[-2:])
    return _slide(forward, images, settings.crop, settings.stride, windows_per_batch)


def predict_images(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: InferenceSettings,
    device: torch.device | str = "cpu",
    *,
    output_size: Sequence[int] | None = None,
    windows_per_batch: int = 4,
    resize_output: bool = True,
) -> torch.Tensor:
    """Logits `(B, C, H_out, W_out)` of uint8 RGB images `(B, 3, H, W)` as mmseg's test
    pipeline computes them: the uint8 images resized with OpenCV on the CPU (`settings.resize`,
    `keep_ratio`), normalised on `device`, then `predict_logits` without a further resize.
    `(H_out, W_out)` is `output_size` (the labels' size) or `(H, W)`; `resize_output=False`:
    see `predict_logits`."""
    if images.dtype != torch.uint8:
        raise BLDAError(f"predict_images: expected uint8 images, got {images.dtype}")
    output_size = tuple(images.shape[-2:]) if output_size is None else tuple(output_size)
    resized = resize_uint8(images.cpu(), settings.input_size(images.shape[-2:]))
    options = {**asdict(settings), "resize": None, "keep_ratio": False}
    del options["center_crop"]
    return predict_logits(
        model,
        normalize(resized.to(device)),
        **options,
        output_size=output_size,
        windows_per_batch=windows_per_batch,
        resize_output=resize_output,
    )


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The last resize `predict_logits` does (bilinear, `align_corners=False`, channels-last),
    for logits from `resize_output=False`."""
    return _resize_logits(logits, size)


def predict_classes(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: InferenceSettings,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Float32 class scores `(B, C)` of a classifier on uint8 RGB images `(B, 3, H, W)`:
    resized with OpenCV (`settings.resize`), centre-cropped (`settings.center_crop`, rounded
    as torchvision's CenterCrop), normalised, one forward pass (`flip` averages the flipped
    image's scores)."""
    if images.dtype != torch.uint8:
        raise BLDAError(f"predict_classes: expected uint8 images, got {images.dtype}")
    resized = resize_uint8(images.cpu(), settings.input_size(images.shape[-2:]))
    if settings.center_crop is not None:
        resized = center_crop(resized, settings.center_crop)
    inputs = normalize(resized.to(device))
    use_amp = _use_amp(inputs.device, settings.amp)
    with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
        scores = model(inputs)
        if settings.flip:
            scores = (scores + model(inputs.flip(-1))) / 2
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or len(scores) != len(images):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise BLDAError(
            f"model: returned {shape} for images {tuple(inputs.shape)}; a classifier returns "
            f"scores ({len(images)}, C)"
        )
    return scores.float()


def center_crop(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The central `size` `(h, w)` of images `(..., H, W)`; offsets rounded as torchvision's
    `CenterCrop` (`round((H - h) / 2)`). Images smaller than `size` are refused."""
    height, width = images.shape[-2:]
    crop_h, crop_w = int(size[0]), int(size[1])
    if crop_h > height or crop_w > width:
        raise BLDAError(
            f"the {height} x {width} image (after --resize) is smaller than its {crop_h} x "
            f"{crop_w} centre crop; give --resize HxW of at least {crop_h} x {crop_w}"
        )
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return images[..., top : top + crop_h, left : left + crop_w]


def _slide(forward, images, crop, stride, windows_per_batch: int) -> torch.Tensor:
    batch, _, height, width = images.shape
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    boxes = [
        (top, left)
        for top in window_starts(height, crop[0], stride[0])
        for left in window_starts(width, crop[1], stride[1])
    ]
    total = count = None
    for first in range(0, len(boxes), windows_per_batch):
        group = boxes[first : first + windows_per_batch]
        # Windows of all images in one forward pass: (windows * B, 3, crop_h, crop_w).
        crops = torch.cat(
            [images[:, :, top : top + crop_h, left : left + crop_w] for top, left in group]
        )
        window_logits = _resize_logits(forward(crops), (crop_h, crop_w))
        if total is None:
            num_classes = window_logits.shape[1]
            total = torch.empty(  # channels-last, as the windows
                (batch, num_classes, height, width),
                dtype=torch.float32,
                device=images.device,
                memory_format=torch.channels_last,
            ).zero_()
            count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
        for number, (top, left) in enumerate(group):
            part = window_logits[number * batch : (number + 1) * batch]
            total[:, :, top : top + crop_h, left : left + crop_w] += part
            count[:, :, top : top + crop_h, left : left + crop_w] += 1
    return total / count


class _Forward:
    """The model as a function of a batch: float32 logits `(B, C, h, w)`, checked."""

    def __init__(self, model, use_amp: bool) -> None:
        self.model, self.use_amp = model, use_amp

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        try:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                output = self.model(images)
        except RuntimeError as error:
            if not any(words in str(error) for words in TOO_SMALL_WORDS):
                raise
            first_line = str(error).strip().splitlines()[0]
            raise BLDAError(
                f"model: an input of {images.shape[2]} x {images.shape[3]} is too small for it "
                f"({first_line}); give a larger --resize or --crop (train: evaluation.resize / "
                "evaluation.crop_size)"
            ) from None
        return _checked_logits(output, images)


# torch's words when an input is too small for a network's strides and kernels.
TOO_SMALL_WORDS = (
    "Kernel size can't be greater than actual input size",
    "Output size is too small",
)


def _checked_logits(output, images: torch.Tensor) -> torch.Tensor:
    if isinstance(output, dict) and "out" in output:  # torchvision segmentation models
        output = output["out"]
    if isinstance(output, torch.Tensor) and output.dim() == 2 and len(output) == len(images):
        raise BLDAError(
            f"model: returned class scores {tuple(output.shape)} for images "
            f"{tuple(images.shape)}: a whole-image classifier; segmentation needs logits "
            f"({len(images)}, C, h, w); classifiers run on --dataset image-folder"
        )
    if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[0] != len(images):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise BLDAError(
            f"model: returned {shape} for input {tuple(images.shape)}; expected logits "
            f"({len(images)}, C, h, w)"
        )
    return output.float()


def _resize(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    return F.interpolate(values, size=tuple(size), mode="bilinear", align_corners=False)


def _resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`_resize` for logits, computed and returned channels-last: torch's bilinear kernel is
    faster on that layout, and a store keeps each pixel's class scores together, so a
    consumer lays the rows out with a plain copy instead of a transposing one."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return _resize(logits.contiguous(memory_format=torch.channels_last), size)


def _use_amp(device: torch.device, amp: bool | None) -> bool:
    if amp is None:
        return device.type == "cuda"
    if amp and device.type != "cuda":
        raise BLDAError(f"amp: mixed precision is only used on CUDA, the images are on {device}")
    return bool(amp)
