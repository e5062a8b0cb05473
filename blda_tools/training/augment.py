"""Training augmentations: random rescale/crop/flip (weak), DACS colour jitter and blur (strong), ClassMix.

Images stay float RGB on the 0-255 scale until `blda_tools.models.normalize` right before the
forward pass. Every random draw comes from an explicit `torch.Generator`, so a batch is a pure
function of its seed (that is what makes `--resume` exact and workers deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

CROP_ATTEMPTS = 10  # as mmseg's RandomCrop(cat_max_ratio) and DAFormer's RCS crop loop


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One float drawn uniformly from [low, high)."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def fit_size(height: int, width: int, bound: Sequence[int]) -> tuple[int, int]:
    """Size after rescaling (keeping the aspect ratio) to fit inside `bound` = [height, width].

    This is mmseg's `Resize(img_scale, keep_ratio=True)`: GTA5's 1052 x 1914 fits into
    [720, 1280] as 704 x 1280 (mmcv rounds 1052 x 1280 / 1914 = 703.5 to 704).
    """
    scale = min(bound[0] / height, bound[1] / width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_pair(
    image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bilinear image (3, H, W) and nearest-neighbour label (H, W) resize to `size`."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float(), label
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def _crop_box(
    height: int, width: int, crop: Sequence[int], generator: torch.Generator
) -> tuple[int, int]:
    top = int(torch.randint(max(height - crop[0], 0) + 1, (), generator=generator))
    left = int(torch.randint(max(width - crop[1], 0) + 1, (), generator=generator))
    return top, left


def _dominant_ratio(label: torch.Tensor, ignore_index: int) -> float:
    valid = label[label != ignore_index]
    if valid.numel() == 0:
        return 0.0
    return torch.bincount(valid).max().item() / valid.numel()


def random_crop(
    image: torch.Tensor,
    label: torch.Tensor,
    crop: Sequence[int],
    generator: torch.Generator,
    *,
    cat_max_ratio: float = 1.0,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop `crop` = [h, w], padding with 0 / ignore when the image is smaller.

    With `cat_max_ratio` < 1 the crop is redrawn (up to 10 times) while one class covers more
    than that share of its labelled pixels, as mmseg's RandomCrop.
    """
    height, width = image.shape[-2:]
    for _ in range(CROP_ATTEMPTS):
        top, left = _crop_box(height, width, crop, generator)
        label_crop = label[top : top + crop[0], left : left + crop[1]]
        if cat_max_ratio >= 1.0 or _dominant_ratio(label_crop, ignore_index) < cat_max_ratio:
            break
    image_crop = image[:, top : top + crop[0], left : left + crop[1]]
    pad_bottom, pad_right = crop[0] - image_crop.shape[1], crop[1] - image_crop.shape[2]
    if pad_bottom or pad_right:
        image_crop = F.pad(image_crop, (0, pad_right, 0, pad_bottom), value=0.0)
        label_crop = F.pad(label_crop, (0, pad_right, 0, pad_bottom), value=ignore_index)
    return image_crop, label_crop


def weak_augment(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator,
    *,
    base_size: Sequence[int],
    scale_range: Sequence[float],
    crop_size: Sequence[int],
    flip: bool,
    cat_max_ratio: float = 1.0,
    ignore_index: int = 255,
    accept: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to fit `base_size`, rescale by U(scale_range), crop, flip.

    `accept(label_crop)` lets Rare Class Sampling redraw the whole pipeline (up to 10 times)
    until the crop holds enough pixels of the sampled class. A missing label (unlabelled target)
    becomes an all-ignore map so the crop logic is the same.
    """
    if label is None:
        label = torch.full(image.shape[-2:], ignore_index, dtype=torch.long)
    height, width = fit_size(image.shape[-2], image.shape[-1], base_size)
    for _ in range(CROP_ATTEMPTS):
        ratio = uniform(generator, scale_range[0], scale_range[1])
        size = (max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5)))
        resized_image, resized_label = resize_pair(image, label, size)
        image_crop, label_crop = random_crop(
            resized_image,
            resized_label,
            crop_size,
            generator,
            cat_max_ratio=cat_max_ratio,
            ignore_index=ignore_index,
        )
        if flip and uniform(generator) < 0.5:
            image_crop, label_crop = image_crop.flip(-1), label_crop.flip(-1)
        if accept is None or accept(label_crop):
            break
    return image_crop.contiguous(), label_crop.contiguous()


# --------------------------------------------------------------------------- strong (DACS)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    red, green, blue = images.unbind(dim=-3)
    return (0.299 * red + 0.587 * green + 0.114 * blue).unsqueeze(-3)


# RGB <-> YIQ: a hue change is a rotation of the chroma plane (I, Q).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(image: torch.Tensor, turns: float) -> torch.Tensor:
    angle = 2.0 * math.pi * turns
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    to_yiq = _RGB_TO_YIQ.to(image)
    transform = torch.linalg.inv(to_yiq) @ rotation.to(image) @ to_yiq
    return torch.einsum("ij,jhw->ihw", transform, image)


def color_jitter(
    image: torch.Tensor, strength: float, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """DACS colour jitter of one 0-255 image (3, H, W).

    Applied when a uniform draw exceeds `probability` (DACS's convention, so 0.2 means 80 % of
    images). Brightness, contrast and saturation factors are U(1 - s, 1 + s); the hue is rotated
    by U(-s, s) turns in YIQ space (kornia rotates in HSV; the effect is the same kind).
    """
    if uniform(generator) <= probability:
        return image
    brightness, contrast, saturation = (
        uniform(generator, 1 - strength, 1 + strength) for _ in range(3)
    )
    hue = uniform(generator, -strength, strength)
    image = (image / 255.0 * brightness).clamp(0, 1)
    mean = _grayscale(image).mean()
    image = ((image - mean) * contrast + mean).clamp(0, 1)
    gray = _grayscale(image)
    image = ((image - gray) * saturation + gray).clamp(0, 1)
    return _rotate_hue(image, hue).clamp(0, 1) * 255.0


def blur_kernel_size(length: int) -> int:
    """DACS's kernel size: about 10 % of the side, made odd."""
    size = math.ceil(0.1 * length)
    return max(1, size if size % 2 == 1 else size - 1)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DACS blur of one image (3, H, W): with probability 1/2, sigma ~ U(0.15, 1.15)."""
    if uniform(generator) <= 0.5:
        return image
    sigma = uniform(generator, 0.15, 1.15)
    size_y, size_x = (blur_kernel_size(n) for n in image.shape[-2:])
    kernel_y = _gaussian_kernel(size_y, sigma).to(image).view(1, 1, -1, 1)
    kernel_x = _gaussian_kernel(size_x, sigma).to(image).view(1, 1, 1, -1)
    channels = image[:, None]  # (3, 1, H, W): the same kernel for every channel
    channels = F.pad(channels, (0, 0, size_y // 2, size_y // 2), mode="reflect")
    channels = F.conv2d(channels, kernel_y)
    channels = F.pad(channels, (size_x // 2, size_x // 2, 0, 0), mode="reflect")
    return F.conv2d(channels, kernel_x)[:, 0]


# --------------------------------------------------------------------------- ClassMix


def class_mix_mask(
    label: torch.Tensor, generator: torch.Generator, ignore_index: int = 255
) -> torch.Tensor:
    """Boolean mask (H, W): the pixels of half of a source label's classes.

    ceil(n / 2) of the label's n classes are drawn without replacement and their pixels are
    pasted onto the target (ClassMix as in DACS). The ignore index is never a class (DACS draws
    from the whole batch's unique values, ignore included; we draw per image).
    """
    classes = torch.unique(label)
    classes = classes[classes != ignore_index]
    order = torch.randperm(len(classes), generator=generator)
    chosen = classes[order[: (len(classes) + 1) // 2].to(classes.device)]
    return torch.isin(label, chosen)


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Source where `mask` (B, H, W), target elsewhere; images (B, 3, H, W) or maps (B, H, W)."""
    if source.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, source, target)
