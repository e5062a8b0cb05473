"""Each model family's own test protocol: what `dump-logits` uses when no inference option is
given, so that blda's mIoU equals the one the family's trainer reports.

A built-in model names its protocol (`Segmentor.test_protocol`); a plugin's factory (the
callable `--model module:factory` names) may carry a `test_protocol` attribute set to one of
these names (`models.loading.declared_family` reads it before any weight is built). Protocols (Cityscapes val, from the public
configs; implementation facts, "Test protocols of the base methods"):

* `daformer` (DAFormer, DACS / DeepLabV2, SegFormer as trained in DAFormer's framework):
  lhoyer/DAFormer `configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py` (test
  `img_scale=(1024, 512)`, keep ratio) with `test_cfg=dict(mode='whole')`: the image resized to
  512 x 1024, one forward pass on the whole image, logits resized to the label size;
* `hrda` (HRDA, MIC): lhoyer/MIC `seg/configs/mic/gtaHR2csHR_mic_hrda.py` (`test_cfg`
  slide, crop 1024, stride 512, batched) over `uda_gtaHR_to_cityscapesHR_1024x1024.py`
  (`img_scale=(2048, 1024)`, keep ratio): the image at 1024 x 2048, 1024 x 1024 windows at
  stride 512; inside each window HRDA's multi-resolution fusion (the model's forward);
* `classifier` (ResNet classifiers, VisDA-2017 as in MIC's `cls/examples/utils.py`
  `get_val_transform('default')`): the image resized to 256 x 256, its central 224 x 224, one
  score row per image. MIC resizes with Pillow (bicubic by default); blda with OpenCV
  bilinear, like every other protocol here, so scores can differ slightly;
* `native`: whole images at their own size (models without a declared protocol).

The keep-ratio rule applies the same bounds to any dataset, as the trainers' pipelines do.
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from blda_tools.errors import BLDAError
from blda_tools.inference.predict import InferenceSettings

PROTOCOLS: dict[str, InferenceSettings] = {
    "daformer": InferenceSettings(mode="whole", resize=(512, 1024), keep_ratio=True),
    "hrda": InferenceSettings(
        mode="slide", crop=(1024, 1024), stride=(512, 512), resize=(1024, 2048), keep_ratio=True
    ),
    "classifier": InferenceSettings(mode="whole", resize=(256, 256), center_crop=(224, 224)),
    "native": InferenceSettings(),
}
# The options that change a protocol (named in messages).
PROTOCOL_OPTIONS = "--mode, --resize, --crop, --window-stride"
# A protocol that scales an image by more than this is probably not meant for it.
MAX_QUIET_SCALE = 2.0


def resolve_inference(
    protocol: str | None, overrides: dict | None = None
) -> tuple[str, InferenceSettings]:
    """`(description, settings)`: the protocol named `protocol` (a model's `test_protocol`,
    None for `native`) with `overrides` (InferenceSettings field -> value) applied. An
    explicit `resize` is an exact size (keep_ratio off) unless `keep_ratio` is given too. The
    description names the protocol and what was overridden."""
    name = protocol or "native"
    if name not in PROTOCOLS:
        raise BLDAError(f"model: test_protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    overrides = dict(overrides or {})
    unknown = set(overrides) - {field.name for field in dataclasses.fields(InferenceSettings)}
    if unknown:
        raise BLDAError(f"inference: unknown setting(s) {', '.join(sorted(unknown))}")
    if "resize" in overrides and "keep_ratio" not in overrides:
        overrides["keep_ratio"] = False
    settings = dataclasses.replace(PROTOCOLS[name], **overrides)
    window_options = [key for key in ("crop", "stride") if key in overrides]
    if settings.mode == "whole" and window_options:
        how = "--mode whole" if "mode" in overrides else f"the {name} protocol (whole images)"
        given = " and ".join(
            {"crop": "--crop", "stride": "--window-stride"}[k] for k in window_options
        )
        raise BLDAError(
            f"{given} and {how}: sliding-window options, but the inference is on whole images; "
            "add --mode slide"
        )
    if settings.mode == "slide" and settings.windows_leave_gaps:
        stride = "--window-stride" if "stride" in overrides else f"the {name} protocol's stride"
        raise BLDAError(
            f"{stride} {settings.stride[0]}x{settings.stride[1]} is larger than --crop "
            f"{settings.crop[0]}x{settings.crop[1]}: the pixels between windows would get no "
            "logits (mmseg's slide inference needs every pixel in a window); give "
            f"--window-stride at most {settings.crop[0]}x{settings.crop[1]}"
        )
    changed = [
        key
        for key in ("mode", "resize", "crop", "stride")
        if key in overrides and getattr(settings, key) != getattr(PROTOCOLS[name], key)
    ]
    description = f"{name} protocol" + (f", overridden: {', '.join(changed)}" if changed else "")
    return description, settings


def describe(settings: InferenceSettings) -> str:
    """One line: `whole image, resized within 512 x 1024 (keep ratio)`."""
    if settings.resize is None:
        size = "native size"
    else:
        bound = "within " if settings.keep_ratio else ""
        size = f"resized {bound}{settings.resize[0]} x {settings.resize[1]}"
        size += " (keep ratio)" if settings.keep_ratio else ""
    if settings.mode == "whole":
        how = "whole image"
    else:
        how = (
            f"{settings.crop[0]} x {settings.crop[1]} windows at stride "
            f"{settings.stride[0]} x {settings.stride[1]}"
        )
    crop = "" if settings.center_crop is None else ", central {} x {}".format(*settings.center_crop)
    return f"{how}, {size}{crop}" + (", flip" if settings.flip else "")


def rescale_warning(settings: InferenceSettings, size) -> str | None:
    """A message when `settings` rescale an image of `size` `(H, W)` by more than 2x (up or
    down), naming the options that change it; None otherwise."""
    height, width = int(size[0]), int(size[1])
    new_height, new_width = settings.input_size((height, width))
    factor = max(new_height / height, new_width / width, height / new_height, width / new_width)
    if factor <= MAX_QUIET_SCALE:
        return None
    direction = "upsamples" if new_height * new_width > height * width else "downsamples"
    example, options = "e.g. --resize none", PROTOCOL_OPTIONS
    if settings.center_crop is not None:  # a classifier: the window options do not apply
        crop_height, crop_width = settings.center_crop  # native size may be below the crop
        example = f"--resize HxW of at least its {crop_height} x {crop_width} centre crop"
        options = "--resize"
    return (
        f"the inference protocol {direction} {height} x {width} images {factor:.2f}x (to "
        f"{new_height} x {new_width}); if the model was not trained at that scale, choose "
        f"another with {options} ({example})"
    )


def protocol_notices(description: str, settings: InferenceSettings, data, index) -> list[str]:
    """The lines a dump prints before it starts: which protocol, and a warning when it
    rescales the first image (`index` of `data`, its size read from the file header) by
    more than 2x."""
    notices = [f"inference: {description}: {describe(settings)}"]
    size = None if index is None else _image_size(data, index)
    warning = None if size is None else rescale_warning(settings, size)
    return notices + ([] if warning is None else [f"warning: {warning}"])


def _image_size(data, index: int) -> tuple[int, int] | None:
    """`(H, W)` of image `index` from its file header (no decoding); None if unknown."""
    paths = getattr(data, "image_paths", None)
    if paths is None:
        return None
    try:
        with Image.open(paths[index]) as image:
            return image.height, image.width
    except (OSError, ValueError):
        return None  # a corrupt file is reported when it is decoded
