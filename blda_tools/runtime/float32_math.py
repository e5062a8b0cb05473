"""exp, exp2 and log of float32 values written out for numba loops that should be vectorised.

numba lowers `math.exp` / `np.exp` to one libm call per value (no SVML in a plain install), so
a loop over pixels that calls them runs one value at a time. These are straight-line float32
code with the exponent handled through the float's bits, which LLVM vectorises (16 values per
AVX-512 instruction). Each is accurate to about one ulp (tests/test_float32_math.py checks
them against float64 numpy). The float64 bit casts serve the float64 exponential of the Eq. 7
certificate (`blda_tools.calibration.eq7.steps.fast_exp`), built the same way.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F = np.float32
# exp(v) = 2^n exp(r), n = round(v / ln 2), r = v - n ln 2 with ln 2 split in two (Cody-Waite)
# so that r is exact to float32; exp(r), |r| <= 0.347, by its Taylor polynomial of degree 7
# (truncation 5e-9 relative); 2^n from its float32 bits.
_LOG2_E = _F(1.0 / math.log(2.0))
_LN2_HIGH, _LN2_LOW = _F(0.693359375), _F(math.log(2.0) - 0.693359375)
_T0, _T1, _T2, _T3 = _F(1.0), _F(1.0), _F(1.0 / 2), _F(1.0 / 6)
_T4, _T5, _T6, _T7 = _F(1.0 / 24), _F(1.0 / 120), _F(1.0 / 720), _F(1.0 / 5040)
_SQRT_2, _HALF, _LN2 = _F(math.sqrt(2.0)), _F(0.5), _F(math.log(2.0))
# 2^v = 2^n 2^r, n = round(v), r = v - n exact in float32, |r| <= 1/2. Adding 1.5 * 2^23 rounds
# v to an integer and leaves n + 127 in the low bits of the sum, so 2^n is those bits shifted
# into the exponent field (no float-to-int conversion); the 127 is part of the shifter.
# 2^r by a degree-6 polynomial fitted to 2^r's relative error on [-1/2, 1/2] (iteratively
# reweighted least squares, near minimax; 1.6e-8 with these float32 coefficients, a quarter of
# an ulp, where Taylor needs degree 7).
_SHIFTER = _F(1.5 * 2**23 + 127)
_P0, _P1, _P2 = _F(1.0), _F(0.6931471824645996), _F(0.24022646248340607)
_P3, _P4 = _F(0.05550328642129898), _F(0.009618489071726799)
_P5, _P6 = _F(0.0013399930903688073), _F(0.00015345810970757157)


@intrinsic
def float32_from_bits(typingctx, value):
    """The float32 whose bits are the int32 `value` (an LLVM bitcast: no instruction)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def bits_of_float32(typingctx, value):
    """The int32 holding the bits of the float32 `value`."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def float64_from_bits(typingctx, value):
    """The float64 whose bits are the int64 `value` (an LLVM bitcast: no instruction)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def bits_of_float64(typingctx, value):
    """The int64 holding the bits of the float64 `value`."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def fused_multiply_add(typingctx, factor, other, addend):
    """factor * other + addend for float64 values with one rounding (`llvm.fma`: one FMA
    instruction, vectorised, where the CPU has FMA, as every x86-64 CPU since 2013 does).
    Explicit, so that only the code that asks for it is fused: numba's `fastmath` flags would
    fuse every a * b + c of an inlined kernel, the float32 interpolation included."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float64(types.float64, types.float64, types.float64), codegen


@numba.njit(inline="always")
def exp32(value):
    """exp(value) for a float32 value in [-87, 0]: the caller clamps (below -87 the result
    would be a denormal, which this does not build; above 0 it is still exact up to 88)."""
    n = np.floor(value * _LOG2_E + _HALF)  # float32 (math.floor would give an int64)
    r = (value - n * _LN2_HIGH) - n * _LN2_LOW
    p = _T7
    p = p * r + _T6
    p = p * r + _T5
    p = p * r + _T4
    p = p * r + _T3
    p = p * r + _T2
    p = p * r + _T1
    p = p * r + _T0
    return p * float32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@numba.njit(inline="always")
def exp2_32(value):
    """2^value for a float32 value in [-125, 0], relative error about one ulp (see _SHIFTER):
    cheaper than `exp32` where the caller keeps its logarithms in base 2."""
    shifted = value + _SHIFTER
    r = value - (shifted - _SHIFTER)  # (shifted - _SHIFTER) = round(value), exactly
    p = _P6
    p = p * r + _P5
    p = p * r + _P4
    p = p * r + _P3
    p = p * r + _P2
    p = p * r + _P1
    p = p * r + _P0
    return p * float32_from_bits(bits_of_float32(shifted) << np.int32(23))


@intrinsic
def prefer_wide_vectors(typingctx):
    """Lets LLVM vectorise the calling kernel with 512-bit registers: on AVX-512 CPUs it
    prefers 256-bit ones by default (a tuning for CPUs that slow down on wide instructions),
    and the EM kernel measured 1.2x faster with 512-bit ones on a Sapphire Rapids VM. No effect
    on CPUs without AVX-512. llvmlite checks attribute names against a list that lacks LLVM's
    string attributes, hence the set's own add."""

    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        if isinstance(attributes, set):
            set.add(attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@numba.njit(inline="always")
def log32(value):
    """log(value) for a positive normal float32: value = 2^e m with m in [1 / sqrt 2, sqrt 2)
    from its bits, then log m = 2 atanh(u), u = (m - 1) / (m + 1), |u| <= 0.172, by its
    series to u^11 (truncation below 3e-10 relative)."""
    bits = bits_of_float32(value)
    m = float32_from_bits((bits & np.int32(0x007FFFFF)) | np.int32(0x3F800000))  # in [1, 2)
    exponent = _F((bits >> np.int32(23)) - np.int32(127))
    big = m >= _SQRT_2
    m = m * _HALF if big else m
    exponent = exponent + _F(1.0) if big else exponent
    u = (m - _F(1.0)) / (m + _F(1.0))
    square = u * u
    series = _F(1.0 / 11)
    series = series * square + _F(1.0 / 9)
    series = series * square + _F(1.0 / 7)
    series = series * square + _F(1.0 / 5)
    series = series * square + _F(1.0 / 3)
    series = series * square + _F(1.0)
    return _F(2.0) * u * series + exponent * _LN2
