"""Mix Transformer (MiT) encoder of SegFormer, B0 to B5.

Attribute names follow the released SegFormer / DAFormer code (`patch_embed1..4`, `block1..4`,
`norm1..4`, `attn.q`, `attn.kv`, `attn.sr`, `mlp.dwconv.dwconv`, ...) so that the ImageNet
weights (`mit_b5.pth`) and the DAFormer-family segmentation checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blda_tools.models.blocks import DropPath, tokens_to_grid

# The released MiT blocks use LayerNorm(eps=1e-6); the patch-embedding and spatial-reduction
# norms are plain nn.LayerNorm (eps=1e-5).
BLOCK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MiTConfig:
    """Per-stage sizes of one MiT variant."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


MIT_CONFIGS = {
    "b0": MiTConfig(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with overlapping windows, then LayerNorm over channels."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_channels, embed_dim, patch_size, stride=stride, padding=patch_size // 2
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[2:]
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        return tokens, height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a spatially reduced sequence."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        query = self.q(x).reshape(batch, length, self.num_heads, head_dim).transpose(1, 2)
        context = x
        if self.sr_ratio > 1:
            context = self.norm(
                self.sr(tokens_to_grid(x, height, width)).flatten(2).transpose(1, 2)
            )
        key_value = self.kv(context).reshape(batch, -1, 2, self.num_heads, head_dim)
        key, value = key_value.permute(2, 0, 3, 1, 4)
        # Default scale 1 / sqrt(head_dim), as in the released code.
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class DepthwiseConv(nn.Module):
    """3 x 3 depthwise convolution applied to a token sequence laid out on its grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.dwconv(tokens_to_grid(x, height, width)).flatten(2).transpose(1, 2)


class MixFeedForward(nn.Module):
    """Linear, depthwise conv (positional information), GELU, linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: efficient self-attention, then Mix-FFN."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFeedForward(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixVisionTransformer(nn.Module):
    """Four-stage hierarchical encoder; returns feature maps at strides 4, 8, 16 and 32."""

    strides = (4, 8, 16, 32)

    def __init__(self, config: MiTConfig, *, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.config = config
        self.embed_dims = config.embed_dims
        # Stochastic depth grows linearly over all blocks of all stages.
        total_blocks = sum(config.depths)
        drop_rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        in_channels = 3
        first_block = 0
        for stage, (dim, depth) in enumerate(
            zip(config.embed_dims, config.depths, strict=True), start=1
        ):
            patch_size, stride = (7, 4) if stage == 1 else (3, 2)
            setattr(
                self, f"patch_embed{stage}", OverlapPatchEmbed(in_channels, dim, patch_size, stride)
            )
            blocks = nn.ModuleList(
                TransformerBlock(
                    dim,
                    config.num_heads[stage - 1],
                    config.sr_ratios[stage - 1],
                    config.mlp_ratio,
                    drop_rates[first_block + index],
                )
                for index in range(depth)
            )
            setattr(self, f"block{stage}", blocks)
            setattr(self, f"norm{stage}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            in_channels = dim
            first_block += depth
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in range(1, 5):
            tokens, height, width = getattr(self, f"patch_embed{stage}")(x)
            for block in getattr(self, f"block{stage}"):
                tokens = block(tokens, height, width)
            tokens = getattr(self, f"norm{stage}")(tokens)
            x = tokens_to_grid(tokens, height, width)
            features.append(x)
        return features


def _init_weights(module: nn.Module) -> None:
    # Initialisation of the released code, used when no pretrained weights are loaded.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        fan_out //= module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
