"""The gates of the fused kernels, as Numba helpers: φ(z) and φ'(z) for silu, sigmoid and
gelu (torch's default erf form), and the exponential they rest on.

Numba has no vector exp without Intel's SVML, so :func:`vector_exp` (float64) and
:func:`vector_exp32` (float32) are written out, and the loops that call them vectorize.
Float64 rows take the float64 gates; float32 and bfloat16 rows the float32 ones, as torch
computes silu and sigmoid on those dtypes (and as the casting recipes do); gelu calls the
library's erf in float64 for every dtype (its kernels are built apart, so that no loop
branches between a library call and a vector exp).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba.core import types as numba_types
from numba.extending import intrinsic

from normlab.kernels._jit import helper

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@intrinsic
def bitcast(typingctx, value, kind):
    """The bits of ``value`` read as a ``kind`` of the same width (``np.int64``,
    ``np.float32``, ...): a reinterpretation, which vectorizes. (Numba widens integer
    arithmetic to 64 bits: narrow a 32-bit result first, ``np.uint32(...)``.)"""
    target = kind.instance_type

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(target))

    return target(value, kind), codegen


_ROUNDER = 6755399441055744.0  # 1.5·2^52: adding it rounds to an integer held in the low bits
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: k·LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10


@helper
def vector_exp(x):
    """exp(x) in float64 without a library call, so that the loops calling it vectorize
    (Numba has no vector exp without Intel's SVML): x = k·ln 2 + r with |r| ≤ ln 2 / 2
    (Cody and Waite), e^r by its Taylor series to r^13 (truncation below 1e-17), times 2^k
    built from its bits. Within about an ulp of ``math.exp``; NaN stays NaN, e^x is inf
    above 709 and about 3e-308 below -708 (where 1 + e^x is 1 exactly)."""
    clamped = 709.0 if x > 709.0 else x  # comparisons are false for NaN: NaN passes through
    clamped = -708.0 if clamped < -708.0 else clamped
    rounded = clamped * _LOG2E + _ROUNDER
    k = rounded - _ROUNDER
    r = (clamped - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    result = p * bitcast((bitcast(rounded, np.int64) - bitcast(_ROUNDER, np.int64) + 1023) << 52, np.float64)
    return math.inf if x > 709.0 else result


_F = np.float32  # float32 constants (a Python float would promote the arithmetic to float64)
_ONE = _F(1.0)
_ROUNDER_32 = _F(12582912.0)  # 1.5·2^23
_LOG2E_32 = _F(_LOG2E)
_LN2_HI_32 = _F(0.693359375)  # Cephes' split of ln 2 for float32: k·LN2_HI is exact
_LN2_LO_32 = _F(-2.12194440e-4)
_EXP_HI_32, _EXP_LO_32 = _F(88.0), _F(-87.0)
_E2, _E3, _E4, _E5, _E6, _E7 = (_F(1.0 / math.factorial(k)) for k in range(2, 8))


@helper
def vector_exp32(x):
    """exp(x) in float32, as :func:`vector_exp` (reduction by ln 2, then a Taylor series,
    here to r^7: truncation below 1e-8 for |r| ≤ ln 2 / 2). Within 2 float32 ulps of the
    exact value (tests/test_fused_gate32.py); NaN stays NaN, inf above 88."""
    clamped = _EXP_HI_32 if x > _EXP_HI_32 else x
    clamped = _EXP_LO_32 if clamped < _EXP_LO_32 else clamped
    rounded = clamped * _LOG2E_32 + _ROUNDER_32
    k = rounded - _ROUNDER_32
    r = (clamped - k * _LN2_HI_32) - k * _LN2_LO_32
    p = _E7 * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + _ONE
    p = p * r + _ONE
    # 2^k from its bits (uint32 arithmetic wraps, so a negative k gives its two's complement)
    power = np.uint32((bitcast(rounded, np.uint32) - bitcast(_ROUNDER_32, np.uint32) + np.uint32(127)) << np.uint32(23))
    result = p * bitcast(power, np.float32)
    return _F(math.inf) if x > _EXP_HI_32 else result


@helper
def logistic_gate32(gate, code):
    """:func:`logistic_gate` in float32 arithmetic (as torch computes silu and sigmoid on
    float32 and bfloat16 tensors), for float32 and bfloat16 rows: the loops vectorize
    with a shorter series. Returned as float64."""
    z = _F(gate)
    sig = _ONE / (_ONE + vector_exp32(-z))
    return np.float64(sig if code == 1 else z * sig)


@helper
def logistic_gate_derivative32(gate, code):
    """:func:`logistic_gate_derivative` in float32 arithmetic, returned as float64."""
    z = _F(gate)
    sig = _ONE / (_ONE + vector_exp32(-z))
    if code == 1:
        return np.float64(sig), np.float64(sig * (_ONE - sig))
    return np.float64(z * sig), np.float64(sig * (_ONE + z * (_ONE - sig)))


@helper
def logistic_gate(gate, code):
    """φ(z) for silu (code 0) and sigmoid (code 1), float64, branch-free in the loop."""
    z = np.float64(gate)
    sig = 1.0 / (1.0 + vector_exp(-z))
    return sig if code == 1 else z * sig


@helper
def logistic_gate_derivative(gate, code):
    """(φ(z), φ'(z)) for silu (code 0) and sigmoid (code 1), float64."""
    z = np.float64(gate)
    sig = 1.0 / (1.0 + vector_exp(-z))
    if code == 1:
        return sig, sig * (1.0 - sig)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@helper
def gelu_gate(gate, code):
    """φ(z) for gelu in its erf form, float64."""
    z = np.float64(gate)
    return z * (0.5 * (1.0 + math.erf(z * _SQRT_HALF)))


@helper
def gelu_gate_derivative(gate, code):
    """(φ(z), φ'(z)) for gelu in its erf form, float64."""
    z = np.float64(gate)
    cdf = 0.5 * (1.0 + math.erf(z * _SQRT_HALF))
    return z * cdf, cdf + z * (math.exp(-0.5 * z * z) * _INV_SQRT_2PI)
