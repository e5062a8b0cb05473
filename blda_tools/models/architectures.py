"""The built-in architectures by name: `BUILTIN_ARCHITECTURES`, read lazily by the registry.

This module does not import the registry (imports run one way: registry -> architectures).
"""

from __future__ import annotations

from blda_tools.models.deeplabv2 import DLV2_REDUCED_DILATIONS, DLV2Head, ResNetV1c
from blda_tools.models.heads import DAFORMER_FUSION_DILATIONS, DAFormerHead, SegFormerHead
from blda_tools.models.hrda import DETAIL_CROP as HRDA_DETAIL_CROP
from blda_tools.models.hrda import HRDAHead, HRDASegmentor, daformer_heads
from blda_tools.models.mit import MIT_CONFIGS, MixVisionTransformer
from blda_tools.models.resnet import RESNET_DEPTHS, ResNetClassifier
from blda_tools.models.segmentor import Segmentor
from blda_tools.models.tiny import TinyDecoder, TinyEncoder

# SegFormer decoder width of the released configs: 256 for B0/B1, 768 for B2-B5.
SEGFORMER_EMBED_DIMS = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}


def _daformer(variant: str):
    def factory(
        num_classes: int,
        *,
        embed_dim: int = 256,
        dilations: tuple[int, ...] = DAFORMER_FUSION_DILATIONS,
        dropout_ratio: float = 0.1,
        drop_path_rate: float = 0.1,
        regression_head: bool = False,
    ) -> Segmentor:
        backbone = MixVisionTransformer(MIT_CONFIGS[variant], drop_path_rate=drop_path_rate)
        head = DAFormerHead(
            backbone.embed_dims,
            num_classes,
            embed_dim=embed_dim,
            channels=embed_dim,
            dilations=dilations,
            dropout_ratio=dropout_ratio,
            regression_head=regression_head,
        )
        # BLDA checkpoints add the regression head `conv_reg`; it is not needed for logits.
        optional = () if regression_head else ("decode_head.conv_reg.",)
        return Segmentor(
            backbone,
            head,
            feature_channels=head.channels,
            output_stride=4,
            optional_checkpoint_keys=optional,
            test_protocol="daformer",
        )

    factory.__doc__ = (
        f"MiT-{variant.upper()} encoder with the DAFormer head (separable ASPP fusion)."
    )
    return factory


def _hrda(variant: str):
    def factory(
        num_classes: int,
        *,
        embed_dim: int = 256,
        dilations: tuple[int, ...] = DAFORMER_FUSION_DILATIONS,
        dropout_ratio: float = 0.1,
        drop_path_rate: float = 0.1,
        detail_crop: tuple[int, int] = HRDA_DETAIL_CROP,
    ) -> HRDASegmentor:
        backbone = MixVisionTransformer(MIT_CONFIGS[variant], drop_path_rate=drop_path_rate)
        head = daformer_heads(
            backbone.embed_dims,
            num_classes,
            embed_dim=embed_dim,
            dilations=dilations,
            dropout_ratio=dropout_ratio,
        )
        return HRDASegmentor(backbone, head, detail_crop)

    factory.__doc__ = (
        f"HRDA (and MIC) over MiT-{variant.upper()}: a DAFormer head at context (0.5) and "
        "detail scale, fused by a class-wise scale attention (inference only)."
    )
    return factory


def _segformer(variant: str):
    def factory(
        num_classes: int,
        *,
        embed_dim: int = SEGFORMER_EMBED_DIMS[variant],
        dropout_ratio: float = 0.1,
        drop_path_rate: float = 0.1,
    ) -> Segmentor:
        backbone = MixVisionTransformer(MIT_CONFIGS[variant], drop_path_rate=drop_path_rate)
        head = SegFormerHead(
            backbone.embed_dims, num_classes, embed_dim=embed_dim, dropout_ratio=dropout_ratio
        )
        # mmseg's BaseDecodeHead builds a `conv_seg` the SegFormer head never uses; released
        # checkpoints carry it.
        return Segmentor(
            backbone,
            head,
            feature_channels=head.channels,
            output_stride=4,
            optional_checkpoint_keys=("decode_head.conv_seg.",),
            test_protocol="daformer",
        )

    factory.__doc__ = f"MiT-{variant.upper()} encoder with SegFormer's all-MLP head."
    return factory


def deeplabv2_r101(
    num_classes: int, *, dilations: tuple[int, ...] = DLV2_REDUCED_DILATIONS
) -> Segmentor:
    """ResNet-101 V1c + DeepLabV2 classifier (DAFormer's `dlv2red`, dilations 6 and 12)."""
    backbone = ResNetV1c()
    head = DLV2Head(backbone.out_channels, num_classes, dilations)
    return Segmentor(
        backbone,
        head,
        feature_channels=backbone.out_channels,
        output_stride=8,
        test_protocol="daformer",
    )


def hrda_deeplabv2_r101(
    num_classes: int,
    *,
    dilations: tuple[int, ...] = DLV2_REDUCED_DILATIONS,
    detail_crop: tuple[int, int] = HRDA_DETAIL_CROP,
) -> HRDASegmentor:
    """HRDA over ResNet-101 V1c + DeepLabV2 (`hrda1-512-0.1_dlv2red`): two DLV2 heads, the
    second the class-wise scale attention; logits at 1/8 (inference only)."""
    backbone = ResNetV1c()
    head = HRDAHead(
        DLV2Head(backbone.out_channels, num_classes, dilations),
        DLV2Head(backbone.out_channels, num_classes, dilations),
        backbone.out_channels,
    )
    return HRDASegmentor(backbone, head, detail_crop, head_stride=8)


def tiny(num_classes: int, *, channels: int = 64) -> Segmentor:
    """Small CNN encoder-decoder (~0.2 M parameters), logits at 1/4 resolution."""
    backbone = TinyEncoder()
    head = TinyDecoder(backbone.out_channels, num_classes, channels=channels)
    return Segmentor(backbone, head, feature_channels=channels, output_stride=4)


def hrda_tiny(
    num_classes: int, *, channels: int = 64, detail_crop: tuple[int, int] = (128, 128)
) -> HRDASegmentor:
    """HRDA over the tiny CNN, for CPU runs: two `tiny` decoders (the second the class-wise
    scale attention), logits at 1/4, a 128 x 128 detail crop (trainable)."""
    backbone = TinyEncoder()
    head = HRDAHead(
        TinyDecoder(backbone.out_channels, num_classes, channels=channels),
        TinyDecoder(backbone.out_channels, num_classes, channels=channels),
        channels,
    )
    return HRDASegmentor(backbone, head, detail_crop)


def _resnet(name: str):
    def factory(num_classes: int) -> ResNetClassifier:
        return ResNetClassifier(RESNET_DEPTHS[name], num_classes)

    factory.__doc__ = (
        f"{name} image classifier, torchvision's state-dict layout (scores (B, C) per image)."
    )
    return factory


BUILTIN_ARCHITECTURES = {
    **{f"daformer_mit{variant}": _daformer(variant) for variant in MIT_CONFIGS},
    **{f"segformer_mit{variant}": _segformer(variant) for variant in MIT_CONFIGS},
    **{f"hrda_mit{variant}": _hrda(variant) for variant in MIT_CONFIGS},
    "deeplabv2_r101": deeplabv2_r101,
    "hrda_deeplabv2_r101": hrda_deeplabv2_r101,
    "tiny": tiny,
    "hrda_tiny": hrda_tiny,
    **{name: _resnet(name) for name in RESNET_DEPTHS},
}
