"""HRDA: a decode head at two scales fused by a learned, class-wise scale attention.

Structure and inference as the public HRDA / MIC code defines them (lhoyer/MIC
`seg/mmseg/models/segmentors/hrda_encoder_decoder.py`, `decode_heads/hrda_head.py`; the same
files in lhoyer/HRDA). One *window* (the model's input) is predicted as follows:

1. context: the window downscaled by 0.5 (torch bilinear on the normalised tensor,
   align_corners False) through the encoder; the DAFormer head `head` gives the context logits
   `lr` (1/8 of the window) and the attention head `scale_attention`, on the same features,
   gives `att = sigmoid(.)`, one channel per class;
2. detail: 512 x 512 crops of the full-resolution window on mmseg's sliding grid with stride
   256 (the last crop flush with the border), all crops through the encoder and `head` in one
   batch, their logits placed at crop offset / 4 on a 1/4-resolution canvas and averaged where
   crops overlap (a count map) -> `hr`;
3. fusion: `fused = up(att) * hr + up((1 - att) * lr)`, `up` a bilinear x2 upsampling
   (align_corners False). The product with `1 - att` is taken before upsampling.

`forward` returns `fused` at 1/4 of the window (`output_stride` 4); callers resize it to the
window and average windows (`blda_tools.inference.predict`, sliding windows of 1024 at stride
512 in HRDA's own test protocol). State-dict keys are the released ones: `backbone.*`,
`decode_head.head.*` (a full DAFormer head) and `decode_head.scale_attention.*` (embeddings,
a 1 x 1 ConvModule fusion, a classifier with one channel per class); no
`decode_head.conv_seg` (manifest: `manifests/hrda_mitb5.json`). HRDA over DeepLabV2
(`hrda_deeplabv2_r101`, MIC's and HRDA's experiment generators) has two DLV2 heads instead
(`decode_head.head.aspp_modules.*`, `decode_head.scale_attention.aspp_modules.*`), logits at
1/8: the same computation with `os` 8.

Training (`forward_train`, hrda_head.py `forward` with a crop box): the context as above, the
detail is ONE full-resolution crop `box` of the training crop; the attention is zeroed outside
the box (at context-logit resolution, box / (os / 0.5)), the detail logits are inserted at
box / os into zeros, and `fused = up(att) * inserted + up((1 - att) * lr)`. The losses on it
are the training code's (`blda_tools/training/hrda_step.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blda_tools.errors import BLDAError
from blda_tools.models.heads import DAFORMER_FUSION_DILATIONS, DAFormerHead
from blda_tools.models.segmentor import Segmentor
from blda_tools.models.sliding import window_starts

# hrda_encoder_decoder.py: scales [1, 0.5] (sorted to [0.5, 1]), hr_crop_size (512, 512),
# hr_slide_overlapping True (detail stride = crop // 2); hrda_head.py: os 4 for DAFormerHead.
CONTEXT_SCALE = 0.5
DETAIL_CROP = (512, 512)
HEAD_STRIDE = 4


class HRDAHead(nn.Module):
    """`head` (used at both scales) and `scale_attention` (`num_classes` outputs: class-wise
    attention), as HRDA's `HRDAHead`; `channels` are the decoder features' channels.

    `daformer_heads` builds them as HRDA does over the DAFormer head; over DeepLabV2 both are
    DLV2 heads (hrda_head.py: the attention config is the head config unchanged).
    """

    def __init__(self, head: nn.Module, scale_attention: nn.Module, channels: int) -> None:
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention
        self.channels = channels

    def attention(self, context_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scale attention in [0, 1], one channel per class, at the context logits' size."""
        return torch.sigmoid(self.scale_attention(context_features))


def daformer_heads(
    in_channels: Sequence[int],
    num_classes: int,
    *,
    embed_dim: int = 256,
    dilations: Sequence[int] = DAFORMER_FUSION_DILATIONS,
    dropout_ratio: float = 0.1,
    attention_embed_dim: int = 256,
) -> HRDAHead:
    """HRDA's head over the DAFormer head (hrda_head.py, `DAFormerHead` branch): the full
    DAFormer head, and an attention head whose embeddings and channels are
    `attention_embed_dim` and whose ASPP fusion becomes one 1 x 1 ConvModule."""
    head = DAFormerHead(
        in_channels,
        num_classes,
        embed_dim=embed_dim,
        channels=embed_dim,
        dilations=dilations,
        dropout_ratio=dropout_ratio,
    )
    attention = DAFormerHead(
        in_channels,
        num_classes,
        embed_dim=attention_embed_dim,
        channels=attention_embed_dim,
        dropout_ratio=dropout_ratio,
        fusion="conv1",
    )
    return HRDAHead(head, attention, head.channels)


class HRDASegmentor(Segmentor):
    """MiT encoder + `HRDAHead`; `forward` is HRDA's multi-resolution prediction of a window.

    `detail_crop` is the detail crop `(h, w)` (released: 512 x 512; the detail stride is half
    of it); `head_stride` the heads' output stride (hrda_head.py `os`: 4 for the DAFormer
    head, 8 for DeepLabV2). `crops_per_batch` bounds how many detail crops go through the encoder at once
    (None: all crops of all windows in the batch, as HRDA's `extract_slide_feat`); the result
    does not depend on it (BatchNorm in eval mode).
    """

    supports_training = True

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: HRDAHead,
        detail_crop: tuple[int, int] = DETAIL_CROP,
        head_stride: int = HEAD_STRIDE,
    ) -> None:
        super().__init__(
            backbone,
            decode_head,
            feature_channels=decode_head.channels,
            output_stride=head_stride,
            test_protocol="hrda",
        )
        self.detail_crop = (int(detail_crop[0]), int(detail_crop[1]))
        self.crops_per_batch: int | None = None

    def forward_train(self, images: torch.Tensor, box: tuple[int, int, int, int]):
        """HRDA's training forward of a crop with one detail `box` = (top, left, height,
        width) in crop pixels (the same for the whole batch). Returns `(fused logits (1/os of
        the crop), detail logits (1/os of the box), context decoder features, detail decoder
        features, deepest context encoder features)`."""
        top, left, height, width = box
        if min(images.shape[2:]) < 8:  # the context at 0.5 would be empty (a torch error)
            raise BLDAError(
                f"model {getattr(self, 'arch', 'hrda')}: window {tuple(images.shape[2:])}; HRDA "
                "needs window sides divisible by 8 (choose the resize and window to suit: "
                "dump-logits --resize / --crop, train evaluation.resize / evaluation.crop_size)"
            )
        head = self.decode_head
        context = F.interpolate(
            images, scale_factor=CONTEXT_SCALE, mode="bilinear", align_corners=False
        )
        context_encoder = self.backbone(context)
        context_logits, context_features = head.head.forward_with_features(context_encoder)
        attention = head.attention(context_encoder)
        detail = images[:, :, top : top + height, left : left + width]
        detail_logits, detail_features = head.head.forward_with_features(self.backbone(detail))
        stride = self.output_stride
        # scale_box: int(v / scale) of every corner; the context logits are at os / 0.5.
        context_stride = stride / CONTEXT_SCALE
        mask = torch.zeros_like(attention[:, :1])
        mask[
            :,
            :,
            int(top / context_stride) : int((top + height) / context_stride),
            int(left / context_stride) : int((left + width) / context_stride),
        ] = 1
        attention = attention * mask
        low = _upsample_by_two((1 - attention) * context_logits)
        rows = slice(int(top / stride), int((top + height) / stride))
        columns = slice(int(left / stride), int((left + width) / stride))
        if low.shape[2:] != (images.shape[2] // stride, images.shape[3] // stride) or tuple(
            detail_logits.shape[2:]
        ) != (rows.stop - rows.start, columns.stop - columns.start):
            raise BLDAError(
                f"model {getattr(self, 'arch', 'hrda')}: a training crop of "
                f"{tuple(images.shape[2:])} with a detail box {box} does not align with the "
                f"logits; HRDA needs crop sides divisible by {2 * stride} and detail boxes by "
                f"{stride}"
            )
        inserted = torch.zeros_like(low)
        inserted[:, :, rows, columns] = detail_logits.to(inserted.dtype)
        fused = _upsample_by_two(attention) * inserted + low
        return fused, detail_logits, context_features, detail_features, context_encoder[-1]

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(fused logits, detail decoder features)`, both at 1/4 of the window.

        The features are those of the detail head, averaged over overlapping crops as the
        logits are: the decoder features that produce the high-resolution logits.
        """
        return self._fused(images, with_features=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused logits at 1/4 of the window (without assembling the detail features)."""
        return self._fused(images, with_features=False)[0]

    def _fused(self, images: torch.Tensor, with_features: bool):
        if self.training:
            raise BLDAError(
                f"model {getattr(self, 'arch', 'hrda')}: in train mode HRDA predicts a crop "
                "with one detail box (`forward_train`, what `blda train` calls); use eval mode "
                "for the multi-resolution prediction of a window (inference, evaluation)"
            )
        if min(images.shape[2:]) < 8:  # the context at 0.5 would be empty (a torch error)
            raise BLDAError(
                f"model {getattr(self, 'arch', 'hrda')}: window {tuple(images.shape[2:])}; HRDA "
                "needs window sides divisible by 8 (choose the resize and window to suit: "
                "dump-logits --resize / --crop, train evaluation.resize / evaluation.crop_size)"
            )
        head = self.decode_head
        context = F.interpolate(
            images, scale_factor=CONTEXT_SCALE, mode="bilinear", align_corners=False
        )
        context_features = self.backbone(context)
        context_logits = head.head(context_features)
        attention = head.attention(context_features)
        detail_logits, detail_features = self._detail(images, with_features)
        # hrda_head.py forward: fused = up(att) * hr + up((1 - att) * lr)
        up = _upsample_by_two
        low = up((1 - attention) * context_logits)
        if low.shape[2:] != detail_logits.shape[2:]:
            raise BLDAError(
                f"model {getattr(self, 'arch', 'hrda')}: window {tuple(images.shape[2:])} gives "
                f"context logits {tuple(low.shape[2:])} but detail logits "
                f"{tuple(detail_logits.shape[2:])}; HRDA needs window sides divisible by 8 "
                "(choose the resize and window to suit: dump-logits --resize / --crop, train "
                "evaluation.resize / evaluation.crop_size)"
            )
        return up(attention) * detail_logits + low, detail_features

    def _detail(self, images: torch.Tensor, with_features: bool):
        """Detail logits (and features, or None) on the 1/4 canvas: overlapping
        full-resolution crops, averaged (hrda_encoder_decoder.py `extract_slide_feat`,
        hrda_head.py `decode_hr`)."""
        batch, _, height, width = images.shape
        (full_h, full_w) = self.detail_crop
        crop_h, crop_w = min(full_h, height), min(full_w, width)
        boxes = [
            (top, left)
            for top in window_starts(height, full_h, full_h // 2)
            for left in window_starts(width, full_w, full_w // 2)
        ]
        # Crop-major batch: crop i of every window is rows i * B ... (i + 1) * B - 1.
        crops = torch.cat([images[:, :, t : t + crop_h, s : s + crop_w] for t, s in boxes])
        step = len(crops) if not self.crops_per_batch else self.crops_per_batch * batch
        head = self.decode_head.head
        pieces = [
            head.forward_with_features(features) if with_features else (head(features), None)
            for features in (self.backbone(crops[i : i + step]) for i in range(0, len(crops), step))
        ]
        crop_logits = torch.cat([logits for logits, _ in pieces])
        crop_features = torch.cat([features for _, features in pieces]) if with_features else None
        # scale_box: int(v / os) of every corner; the canvas ends at the largest corner.
        stride = self.output_stride
        scaled = [
            (t // stride, (t + crop_h) // stride, s // stride, (s + crop_w) // stride)
            for t, s in boxes
        ]
        canvas = (max(box[1] for box in scaled), max(box[3] for box in scaled))
        logits = crop_logits.new_zeros((batch, crop_logits.shape[1], *canvas))
        features = None
        if with_features:
            features = crop_features.new_zeros((batch, crop_features.shape[1], *canvas))
        count = crop_logits.new_zeros((1, 1, *canvas))
        for number, (y1, y2, x1, x2) in enumerate(scaled):
            rows = slice(number * batch, (number + 1) * batch)
            if crop_logits.shape[2:] != (y2 - y1, x2 - x1):
                raise BLDAError(
                    f"model {getattr(self, 'arch', 'hrda')}: a detail crop of {crop_h} x "
                    f"{crop_w} gives logits {tuple(crop_logits.shape[2:])}, not its box / {stride} "
                    f"({y2 - y1} x {x2 - x1}); HRDA needs window sides divisible by 8"
                )
            logits[:, :, y1:y2, x1:x2] += crop_logits[rows]
            if with_features:
                features[:, :, y1:y2, x1:x2] += crop_features[rows]
            count[:, :, y1:y2, x1:x2] += 1
        return logits / count, None if features is None else features / count


def _upsample_by_two(values: torch.Tensor) -> torch.Tensor:
    # hrda_head.py `resize(x, hr_scale / lr_scale)`: scale_factor 2, bilinear, no corners.
    return F.interpolate(values, scale_factor=2.0, mode="bilinear", align_corners=False)
