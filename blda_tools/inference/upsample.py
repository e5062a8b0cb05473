"""The dump's last step in one pass: bilinear resize of low-resolution logits to the label
size, cast to float16 and laid out as the store's rows, with the largest magnitude for the
range check.

Otherwise the dump resizes with torch into a float32 map (10 MB for 19 classes at 256 x 512),
casts that to float16 rows (another read and a write) and reads the rows once more for the
range check: 3.7 ms per 256 x 512 image in one thread (`benchmarks/bench_dump.py`). Here each
output row is interpolated into a small float32 buffer that stays in cache and converted from
there, and only every `stride`-th pixel is computed at all.

Sampling positions and weights are those of `F.interpolate(mode="bilinear",
align_corners=False)` (`interpolation_taps`: computed in float32 as torch does), but the sums
are rounded in another order than torch's kernels (which differ among themselves: the
channels-last and the contiguous kernel disagree in the last float32 bit). So the float32
values can differ from torch's by a few float32 ulps, and the float16 rows by one float16 ulp
where such a value lies next to a float16 rounding boundary (measured: ~0.01 % of the values;
`tests/test_upsample.py` bounds it). Equal sizes copy exactly.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence

import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.extending import intrinsic

from blda_tools.runtime.jit import kernel

# LLVM turns a float16 conversion into one instruction on x86 with F16C (2012 on) and on ARM;
# on an x86 without it, into a call of a runtime function numba may not provide. There the
# integer conversion (`_half_from_bits`) runs instead.
HARDWARE_FLOAT16 = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686") or bool(
    binding.get_host_cpu_features().get("f16c")
)

# float32 bit patterns (magnitudes) the float16 conversion branches on.
_INF32 = 0x7F800000
_HALF_OVERFLOW = 0x477FF000  # 65520: rounds to float16 infinity
_HALF_NORMAL = 0x38800000  # 2**-14, the smallest normal float16


def interpolation_taps(input_size: int, output_size: int) -> tuple[np.ndarray, ...]:
    """`(first, second, first_weight, second_weight)` per output position along one axis:
    the two input positions and float32 weights of torch's bilinear resize with
    `align_corners=False` (source `scale * (i + 0.5) - 0.5` clamped at 0, `scale = in / out`
    in float32; equal sizes copy)."""
    positions = np.arange(output_size)
    if input_size == output_size:
        ones = np.ones(output_size, np.float32)
        return positions, positions, ones, np.zeros(output_size, np.float32)
    scale = np.float32(input_size) / np.float32(output_size)
    source = scale * (positions.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0))
    first = np.minimum(source.astype(np.int64), input_size - 1)
    second = np.where(first < input_size - 1, first + 1, first)
    second_weight = np.clip(source - first.astype(np.float32), 0, 1).astype(np.float32)
    return first, second, (np.float32(1) - second_weight).astype(np.float32), second_weight


def upsample_to_float16_rows(
    logits: np.ndarray, size: Sequence[int], stride: int = 1, *, by_hardware: bool | None = None
) -> tuple[np.ndarray, float]:
    """`(rows, largest)`: float32 logits `(C, h, w)` resized bilinearly to `size` `(H, W)`,
    every `stride`-th pixel in both axes, as float16 rows `(ceil(H / stride) * ceil(W /
    stride), C)` in row-major pixel order, and the largest magnitude of the float32 values
    (inf or NaN when there is one: the caller checks the range with it). `by_hardware`: the
    float16 conversion by the CPU's instruction (default: `HARDWARE_FLOAT16`) or by integer
    arithmetic (the same bits, ~2x slower here)."""
    by_hardware = HARDWARE_FLOAT16 if by_hardware is None else bool(by_hardware)
    num_classes, height, width = logits.shape
    out_height, out_width = int(size[0]), int(size[1])
    rows_y = interpolation_taps(height, out_height)
    columns_x = interpolation_taps(width, out_width)
    rows_y = tuple(taps[::stride] for taps in rows_y)
    columns_x = tuple(taps[::stride] for taps in columns_x)
    pixels_last = np.ascontiguousarray(np.asarray(logits, np.float32).transpose(1, 2, 0))
    bits = np.empty((len(rows_y[0]), len(columns_x[0]) * num_classes), np.uint16)
    # An axis of equal sizes is copied, not summed with a weight 0 (inf * 0 would be NaN).
    copies = (height == out_height, width == out_width)
    largest_bits = _upsample_rows(pixels_last, *rows_y, *columns_x, bits, by_hardware, *copies)
    largest = np.array([largest_bits], np.uint32).view(np.float32)[0]
    return bits.view(np.float16).reshape(-1, num_classes), float(largest)


@intrinsic
def _float16_by_hardware(typingctx, value):
    """float32 -> the bits of the nearest float16 (LLVM's `fptrunc`: round to nearest even;
    one vector instruction per 8 or 16 values with F16C, `HARDWARE_FLOAT16`)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _float32_bits(typingctx, value):
    """The bit pattern of a float32 as uint32 (a register move)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@kernel
def _upsample_rows(
    pixels, y0, y1, wy0, wy1, x0, x1, wx0, wx1, out_bits, by_hardware, copy_rows, copy_columns
):
    """Bilinear rows into `out_bits` (float16 bits, `(rows, columns * C)`); returns the
    largest float32 magnitude's bits. Input rows are resized along x once each (`across`);
    each output row then mixes two of them and converts the sums as they come
    (`by_hardware`), or through cache-sized buffers (`_half_from_bits`)."""
    height, _, num_classes = pixels.shape
    columns = x0.shape[0]
    across = np.empty((height, columns * num_classes), np.float32)
    for row in range(height):
        for column in range(columns):
            left, right = x0[column], x1[column]
            for c in range(num_classes):
                mixed_x = pixels[row, left, c] * wx0[column] + pixels[row, right, c] * wx1[column]
                across[row, column * num_classes + c] = (
                    pixels[row, left, c] if copy_columns else mixed_x
                )
    width = columns * num_classes
    mixed, tiny = np.empty(width, np.float32), np.empty(width, np.float32)
    mixed_bits, tiny_bits = mixed.view(np.uint32), tiny.view(np.uint32)
    largest = np.uint32(0)
    for row in range(out_bits.shape[0]):
        top, bottom, out = across[y0[row]], across[y1[row]], out_bits[row]
        top_weight, bottom_weight = wy0[row], wy1[row]
        if by_hardware:
            for i in range(width):
                value = top[i] * top_weight + bottom[i] * bottom_weight
                value = top[i] if copy_rows else value
                largest = max(largest, _float32_bits(value) & np.uint32(0x7FFFFFFF))
                out[i] = _float16_by_hardware(value)
            continue
        for i in range(width):
            value = top[i] * top_weight + bottom[i] * bottom_weight
            value = top[i] if copy_rows else value
            mixed[i] = value
            tiny[i] = abs(value) + np.float32(0.5)  # see `_half_from_bits`
        for i in range(width):
            largest = max(largest, mixed_bits[i] & np.uint32(0x7FFFFFFF))
            out[i] = _half_from_bits(mixed_bits[i], tiny_bits[i])
    return largest


@kernel
def float32_to_float16_bits(values, out_bits):
    """float32 values -> float16 bit patterns, rounded to nearest even (as numpy's
    `astype(np.float16)`): the kernel's conversion, exposed for its test."""
    tiny = np.abs(values) + np.float32(0.5)
    values_bits, tiny_bits = values.view(np.uint32), tiny.view(np.uint32)
    for i in range(values.shape[0]):
        out_bits[i] = _half_from_bits(values_bits[i], tiny_bits[i])


@kernel
def _half_from_bits(bits, tiny_bits):
    """The float16 nearest to the float32 with bit pattern `bits` (ties to even), as bits;
    NaN stays NaN and magnitudes from 65520 on become infinity. `tiny_bits` are the bits of
    `abs(value) + 0.5`: below 2**-14 the float32 addition itself rounds to a multiple of
    2**-24, the float16 subnormal step, so its low bits are the subnormal (ties to even by
    the hardware). Selects, no branches: the calling loop vectorises."""
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    # Rebias the exponent (127 -> 15) and round the 13 dropped bits to even.
    odd = (magnitude >> np.uint32(13)) & np.uint32(1)
    normal = (magnitude - np.uint32(0x38000000) + np.uint32(0xFFF) + odd) >> np.uint32(13)
    subnormal = tiny_bits - np.uint32(0x3F000000)  # bits of 0.5
    special = np.uint32(0x7E00) if magnitude > np.uint32(_INF32) else np.uint32(0x7C00)
    finite = normal if magnitude >= np.uint32(_HALF_NORMAL) else subnormal
    half = special if magnitude >= np.uint32(_HALF_OVERFLOW) else finite
    return np.uint16(sign | half)
