"""The fused row kernels on bfloat16 rows, with the casting recipes' roundings.

NumPy has no bfloat16: the rows arrive as their 16-bit patterns (``uint16``), and each
value widens exactly to float32 (the pattern shifted left by 16). The statistics and the
backward run in float64, as in :mod:`normlab.kernels.fused`; where the replaced code
rounds, these kernels round, with torch's rounding (float32 to bfloat16 to nearest even,
every NaN to ``0x7FC0``):

* the residual stream ``s = x + r`` is the bfloat16 sum (a float32 add rounded), and the
  statistics are those of the rounded ``s``, as the code the block replaces takes them;
  a gate that comes first multiplies ``s`` in float32, as both recipes do;
* recipe ``ROUND_ONCE`` (``"gemma"``, and ``nn.LayerNorm`` on bfloat16 input, whose kernel
  applies its weight and bias in float32): x̂ (from the float64 statistics) and each step
  after it in float32, as the recipes compute them, and the output rounded once, at the end;
* recipe ``ROUND_STEPS`` (``"llama"``, and diffusers' modulation after a bfloat16 norm):
  ``x̂`` is rounded to bfloat16, then each step after it (weight, ``1 + scale``, shift,
  bias, gate) is a bfloat16 operation: the float32 product or sum of two bfloat16 values
  rounded to bfloat16, which is torch's arithmetic on bfloat16 tensors to the bit. (Taken
  in float64 and rounded to float32 it gives the same bits: float64 holds the product, and
  the sum unless one term lies below 2^-45 of the other, where both give the larger term.)
  The gate's activation is rounded first, as ``silu(z)`` is.

The one difference from the replaced code is where it keeps float32 statistics: these
are float64, so ``x̂`` may round to the neighbouring bfloat16 value where the float32
``x̂`` lies within its rounding error of a midpoint (a few values in 100,000). The
backward computes from the bfloat16 inputs and rounds each gradient once, closer to the
exact gradient than eager bfloat16 autograd, which rounds after every operation: in
float32 arithmetic with float64 sums where no residual enters it and the gate, if any,
is silu or sigmoid (:data:`DIRECT32`, as on float32 rows), in float64 otherwise.

The kernels are :mod:`normlab.kernels.fused`'s own, built with the helpers below in place
of its float ones (its ``_variant``). Tables are float64 ``(groups, n)`` as there; the
caller builds them with the recipe's own arithmetic (``w + offset`` and ``1 + scale``
rounded as the recipe rounds them), so the kernels take them as they are.
"""

from __future__ import annotations

import numpy as np

from normlab.kernels import fused, gates
from normlab.kernels._jit import helper
from normlab.kernels.fused import Layout, _variant
from normlab.kernels.gates import bitcast

ROUND_ONCE, ROUND_STEPS = 1, 2


@helper
def widen(bits):
    """A bfloat16 pattern's value, float64 (exact)."""
    return np.float64(bitcast(np.uint32(np.uint32(bits) << np.uint32(16)), np.float32))


@helper
def narrow(value):
    """float64 → float32 → bfloat16 pattern, each to nearest even (torch's ``round_to_nearest_even``)."""
    single = np.float32(value)
    bits = bitcast(single, np.uint32)
    rounded = np.uint16((bits + (((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16))
    return rounded if single == single else np.uint16(0x7FC0)  # (a NaN's payload could carry into the sign)


@helper
def rounded(value):
    """``value`` rounded as torch rounds a float32 result into a bfloat16 tensor, float64."""
    return widen(narrow(value))


@helper
def summed(a, b):
    """The bfloat16 sum of two bfloat16 patterns (a float32 add, rounded), as its pattern."""
    return narrow(np.float32(widen(a)) + np.float32(widen(b)))


@helper
def staged(source, h):
    """A row of patterns widened into the float64 row buffer, which the statistics read."""
    for j in range(source.shape[0]):
        h[j] = widen(source[j])
    return h


@helper
def gated_in_float32(value):
    """The recipes multiply by a gate that comes first in float32."""
    return np.float64(np.float32(value))


@helper
def single(bits):
    """A bfloat16 pattern's value, float32 (exact)."""
    return bitcast(np.uint32(np.uint32(bits) << np.uint32(16)), np.float32)


@helper
def rounded32(value):
    """``value`` rounded to bfloat16 as :func:`rounded`, as float32."""
    return single(narrow(value))


@helper
def finish_in_steps(normalized, w, scale, shift, b):
    """``ROUND_STEPS``: x̂ rounded, then each step a bfloat16 operation, which is torch's
    arithmetic on bfloat16 tensors: the float32 product or sum of two bfloat16 values,
    rounded to bfloat16."""
    return rounded32(rounded32(rounded32(rounded32(rounded32(normalized) * np.float32(w)) * np.float32(scale))
                               + np.float32(shift)) + np.float32(b))


@helper
def weigh_in_steps(normalized, w):
    return rounded32(normalized) * np.float32(w)


@helper
def gate_applied_in_steps(value, phi):
    return np.float32(value) * rounded32(phi)  # silu(z) is a bfloat16 tensor there


@helper
def gate_used_in_steps(phi):
    return rounded(phi)


@helper
def finish_once(normalized, w, scale, shift, b):
    """``ROUND_ONCE``: the epilogue in float32, as the recipes compute it (gemma's
    ``x̂·(1 + w)``, ``nn.LayerNorm``'s weight and bias), rounded once by the store."""
    return ((np.float32(normalized) * np.float32(w)) * np.float32(scale) + np.float32(shift)) + np.float32(b)


@helper
def weigh_once(normalized, w):
    return np.float32(normalized) * np.float32(w)


@helper
def gate_applied_once(value, phi):
    return np.float32(value) * np.float32(phi)


_ROWS = dict(load=widen, store=narrow, add=summed, stage=staged, gated=gated_in_float32)
_STEPS = dict(finish=finish_in_steps, weigh=weigh_in_steps, gate_applied=gate_applied_in_steps,
              gate_used=gate_used_in_steps)
_ONCE = dict(finish=finish_once, weigh=weigh_once, gate_applied=gate_applied_once)
_GATES = {False: dict(gate_value=gates.logistic_gate32, gate_derivative=gates.logistic_gate_derivative32),
          True: dict(gate_value=gates.gelu_gate, gate_derivative=gates.gelu_gate_derivative)}
_SUFFIXES = {ROUND_ONCE: "_half_once", ROUND_STEPS: "_half_steps"}
# (forward, backward) per (recipe, gelu): silu and sigmoid in float32, as the recipes compute them
KERNELS = {(recipe, gelu): tuple(_variant(kern, _SUFFIXES[recipe] + ("_gelu" if gelu else ""), **_ROWS,
                                          **(_STEPS if recipe == ROUND_STEPS else _ONCE), **_GATES[gelu])
                                 for kern in (fused.fused_row_forward, fused.fused_row_backward))
           for recipe in (ROUND_ONCE, ROUND_STEPS) for gelu in (False, True)}


# per recipe, the backward with no residual in float32 arithmetic (fused.direct_row_backward32;
# silu and sigmoid gates)
DIRECT32 = {recipe: _variant(fused.direct_row_backward32, _SUFFIXES[recipe] + "_32", **_ROWS,
                             **(_STEPS if recipe == ROUND_STEPS else _ONCE), **_GATES[False], load32=single)
            for recipe in (ROUND_ONCE, ROUND_STEPS)}


class HalfLayout(Layout):
    """:class:`normlab.kernels.fused.Layout` for bfloat16 rows (their ``uint16`` patterns)
    under a rounding ``recipe``; its tables come from :meth:`Layout.tables` with
    ``as_given=True``, and the backward takes the forward's statistics."""

    def __init__(self, plan, mod_plan, epilogue, recipe: int):
        super().__init__(plan, mod_plan, epilogue, np.float32)
        self.dtype = np.dtype(np.uint16)
        self.recipe = recipe
        if self.ok:
            self.forward_kernel, self.backward_kernel = KERNELS[recipe, self.code == 2]
            self.direct32_kernel = DIRECT32[recipe]

    def forward(self, tables, *arguments, **keywords):
        """:meth:`Layout.forward` with the tables in float32, which holds the recipes'
        parameters exactly (bfloat16 values, gemma's float32 ``1 + w``): its loops then load
        no float64 but the statistics and run twice as wide (bfloat16 gated RMS forward
        1.36x faster, one thread), with the same bits."""
        single = tuple(t.astype(np.float32) for t in tables[:4])
        if all(np.array_equal(a, b) for a, b in zip(single, tables[:4])):
            tables = (*single, *tables[4:])
        return super().forward(tables, *arguments, **keywords)
