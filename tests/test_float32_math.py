"""The vectorisable float32 exp, exp2 and log of `blda_tools.runtime.float32_math` against float64
numpy (the EM kernel and the online loss's fused cross-entropy use them), and its float64 fused
multiply-add and bit casts against exact rational arithmetic and numpy's views."""

from __future__ import annotations

from fractions import Fraction

import numba
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from blda_tools.runtime.float32_math import (
    bits_of_float64,
    exp2_32,
    exp32,
    float64_from_bits,
    fused_multiply_add,
    log32,
)


@numba.njit
def _fma(factor, other, addend):
    return fused_multiply_add(factor, other, addend)


@numba.njit
def _bits_round_trip(value):
    return bits_of_float64(value), float64_from_bits(bits_of_float64(value))


def test_fused_multiply_add_rounds_once():
    # (1 + 2^-30)(1 - 2^-30) - 1 = -2^-60 exactly; a rounded product first gives 0
    assert _fma(1.0 + 2.0**-30, 1.0 - 2.0**-30, -1.0) == -(2.0**-60)
    assert (1.0 + 2.0**-30) * (1.0 - 2.0**-30) - 1.0 == 0.0


finite = st.floats(-1e100, 1e100, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@settings(max_examples=300, deadline=None)
@given(finite, finite, finite)
def test_fused_multiply_add_is_the_exact_result_rounded(factor, other, addend):
    exact = Fraction(factor) * Fraction(other) + Fraction(addend)
    assert _fma(factor, other, addend) == float(exact)  # float(Fraction) rounds to nearest


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False))
def test_float64_bit_casts_are_numpys_views(value):
    bits, back = _bits_round_trip(value)
    assert bits == np.array(value, np.float64).view(np.int64) and back == value


def test_exp32_is_float32_accurate_on_its_range():
    values = np.concatenate([np.linspace(-87.0, 0.0, 20001), [-80.0, -1e-8, 0.0]])
    got = np.array([exp32(np.float32(v)) for v in values.astype(np.float32)], dtype=np.float64)
    truth = np.exp(values.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got, truth, rtol=3e-7, atol=0)  # a few float32 ulps


def test_exp2_32_is_float32_accurate_on_its_range():
    values = np.concatenate([np.linspace(-125.0, 0.0, 40001), [-115.4, -1e-8, -0.5, 0.0]])
    got = np.array([exp2_32(np.float32(v)) for v in values.astype(np.float32)])
    truth = np.exp2(values.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got.astype(np.float64), truth, rtol=3e-7, atol=0)


def test_log32_is_float32_accurate_on_normal_floats():
    points = np.concatenate([np.linspace(1.0, 5.0, 20001), np.geomspace(1e-30, 1e30, 2001)])
    points = points.astype(np.float32)
    got = np.array([log32(p) for p in points], dtype=np.float64)
    np.testing.assert_allclose(got, np.log(points.astype(np.float64)), rtol=3e-7, atol=2e-7)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-87.0, 0.0, width=32, allow_subnormal=False),
    st.floats(2.0**-99, 1.0, width=32, allow_subnormal=False),
)
def test_log32_inverts_exp32(value, positive):
    # log(exp(v)) = v and exp(log(x)) = x (x <= 1: exp32's domain) to float32 rounding; the
    # rounding of log x (an ulp of |log x|) becomes a relative error of exp of that size
    value, positive = np.float32(value), np.float32(positive)
    assert abs(float(log32(exp32(value))) - float(value)) <= 1e-6 * max(1.0, abs(float(value)))
    logarithm = log32(positive)
    tolerance = 4e-7 * (1.0 + abs(float(logarithm))) * float(positive)
    assert abs(float(exp32(logarithm)) - float(positive)) <= tolerance
