"""RMS norm casting recipes: where a model family rounds low-precision input.

RMS norm is one formula, ``y = x / sqrt(mean(x²) + eps) · (offset + weight)``, but model
families round bfloat16/float16 input at different places, and outputs that must match a
checkpoint's numbers bit for bit depend on it. The recipes, named as Liger-Kernel's
``casting_mode`` names them (``"t5"`` added for transformers' T5LayerNorm):

* ``"llama"``: normalize in float32, cast to the input's dtype, *then* multiply by the
  weight: ``weight · x̂.to(x.dtype)`` (LlamaRMSNorm, and Mistral, Qwen2, ... that copy it);
* ``"gemma"``: normalize and multiply by ``(offset + weight)`` in float32, cast *after*:
  ``(x̂ · (1 + weight.float())).to(x.dtype)`` (GemmaRMSNorm, with ``weight_offset=1``);
* ``"t5"``: the mean of squares in float32, ``x · rsqrt(...)`` in the promoted dtype, cast to
  the weight's dtype when the weight is float16/bfloat16, then ``weight · x̂`` (T5LayerNorm);
* ``"mochi"``: as ``"gemma"`` (``x̂ · weight`` in float32, cast after), but the input, not its
  float32 copy, multiplies the root, as in ``"t5"`` (diffusers' ``MochiRMSNorm``): ``"gemma"``'s
  outputs, with the input's half-precision gradient rounded where the input enters the product;
* ``"gemma3n"``: as ``"gemma"``, but the reciprocal root taken as ``pow(mean(x²) + eps, -0.5)``
  (transformers' ``Gemma3nRMSNorm``, and Gemma 4's copy of it): ``"gemma"``'s outputs, with the float32 input gradient
  rounded as ``pow``'s backward rounds, not ``rsqrt``'s;
* ``"none"``: everything in the input's dtype;
* ``"input_dtype"``: everything in the input's dtype, the weight cast to it too (diffusers'
  ``StableAudio3RMSNorm(force_fp32=False)``): a float32 weight on bfloat16 input gives
  bfloat16, where ``"none"`` promotes to float32;
* ``"imagegpt"``: everything in the input's dtype, dividing by ``sqrt(mean(x²) + eps)``
  rather than multiplying by its reciprocal, then ``x̂ · weight`` (ImageGPT's layer norm).

Gated norms (:class:`~normlab.torch.fused.GatedRMSNorm`) have one more:

* ``"qwen3_next"``: as ``"llama"`` up to the weight, then the gate's product in float32 and
  one cast to the input's dtype at the end (Qwen3-Next's, Qwen3.5's and OLMo-Hybrid's
  ``RMSNormGated``).

RMS norms without a weight, over the last axis whatever its size (or the channels)
(:class:`~normlab.torch.recipe_norms.UnweightedRMSNorm`, :func:`unweighted_rms_norm_recipe`):

* ``"llama"``: ``x̂`` in float32, cast to the input's dtype once (Llama 4's ``L2Norm``,
  FalconMamba's and NanoChat's weight-less RMS norms);
* ``"deepseek"``: ``rsqrt(mean(x²) + eps)`` in float32, cast to the input's dtype, and
  multiplying the input there (DeepSeek-V4's ``UnweightedRMSNorm``);
* ``"diffusers"``: ``mean(x²)`` in float32, multiplying the input in its own dtype (so in
  float32, by promotion), cast to the input's dtype once (diffusers' ``RMSNorm`` without
  a weight): ``"llama"``'s outputs, but the input's gradient is rounded where the input
  enters each product, as there;
* ``"gemma3n"``: ``"llama"`` with the reciprocal root taken by ``pow``, as above
  (``Gemma3nRMSNorm(..., with_scale=False)``);
* ``"none"``: everything in the input's dtype (timm's ``RmsNorm(..., affine=False)``);
* ``"imagegpt"``: everything in the input's dtype, ``x / sqrt(mean(x²) + eps)``, a division
  (LTX-2's ``PerChannelRMSNorm`` and ``LTX2AudioPixelNorm``, over the channels: ``dim=1``).

RMS norms over the channels of ``(N, C, H, W)`` input (axis 1), as timm writes them
(:class:`~normlab.torch.recipe_norms.RMSNorm2d`, :func:`channels_first_rms_norm_recipe`), with
their weight reshaped to ``(1, C, 1, 1)``:

* ``"none"``: everything in the input's dtype (timm's ``RmsNorm2d``);
* ``"float32"``: the input and weight cast to float32 (float64 input too), cast back to the
  input's dtype once at the end (timm's ``RmsNorm2dFp32``).

In float32 the recipes coincide with each other and with ``torch.nn.RMSNorm``; they differ
only in where low precision rounds and in the output dtype when weight and input dtypes
differ. "float32" above means at least float32: float64 input stays float64 (transformers'
classes downcast it to float32).

:func:`rms_norm_recipe` writes each recipe as the model family's own sequence of torch
operations, so its results are theirs to the bit. Its pieces (:func:`recipe_dtypes`,
:func:`rms_normalize`, :func:`weigh`) are the one implementation of the recipes: the fused
blocks of :mod:`normlab.torch.fused` build their torch path from them too.

Layer norms computed in float32 have recipes of their own (:func:`layer_norm_recipe`), both
normalizing the last axis in float32 and casting the result to the input's dtype once, but
through different operations, hence different float32 bits:

* ``"olmo"``: ``F.layer_norm`` on the float32 copy, with the parameters in float32
  (OLMo's parameter-less ``OlmoLayerNorm``);
* ``"cohere"``: the mean, the variance ``mean((x - mean)²)`` and ``(x - mean) · rsqrt(var + eps)``
  written out, then ``weight.float() · x̂`` (``CohereLayerNorm``, whose weight may also span
  leading axes: one weight per head for QK-norm, shape ``(heads, head_dim)``);
* ``"deberta"``: as ``"cohere"`` but dividing by ``sqrt(var + eps)``, and casting ``x̂`` to the
  input's dtype *before* ``weight · x̂ + bias`` (DeBERTa's ``DebertaLayerNorm``; a float32
  weight on bfloat16 input then gives float32, as there).

>>> x = torch.tensor([[3., 4.]], dtype=torch.bfloat16)
>>> rms_norm_recipe(x, torch.zeros(2), 1e-6, "gemma", weight_offset=1.0).tolist()
[[0.84765625, 1.1328125]]
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

CASTINGS = ("llama", "gemma", "t5", "none", "input_dtype", "imagegpt", "mochi", "gemma3n")
LAYER_NORM_CASTINGS = ("olmo", "cohere", "deberta")
UNWEIGHTED_CASTINGS = ("llama", "deepseek", "diffusers", "gemma3n", "none", "imagegpt")
CHANNELS_FIRST_RMS_CASTINGS = ("none", "float32")
_CAST_AFTER_WEIGHT = ("gemma", "mochi", "gemma3n")  # the recipes that weigh x̂ in float32 and cast once after


def check_casting(casting: Optional[str]) -> Optional[str]:
    if casting is not None and casting not in CASTINGS:
        raise ValueError(f"casting must be None (torch.nn.RMSNorm's own) or one of {', '.join(map(repr, CASTINGS))}, "
                         f"got {casting!r}")
    return casting


def check_weight_offset(weight_offset) -> float:
    """``weight_offset`` as a float, or a ValueError where it is not finite (every output
    would be NaN or infinite), as the NumPy API refuses it.

    >>> check_weight_offset(1)
    1.0
    """
    offset = float(weight_offset)
    if not math.isfinite(offset):
        raise ValueError(f"weight_offset={offset} would make every output NaN or infinite; pass one finite number "
                         "such as 1.0 (Gemma's 1 + weight), or 0.0 for none")
    return offset


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a recipe normalizes in: float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(weight: Optional[Tensor], offset: float, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    if weight is None:
        return None
    weight = weight if dtype is None else weight.to(dtype)
    return weight if offset == 0 else offset + weight


def recipe_dtypes(dtype: torch.dtype, casting: str) -> tuple[torch.dtype, torch.dtype]:
    """``(compute, work)`` of a recipe for input of ``dtype``: where it normalizes (x̂), and
    where the steps after the weight run (a modulation, a bias, a gate), before the final
    cast to ``dtype``: the input's dtype for ``"llama"`` and ``"none"``, float32 for ``"gemma"``.

    >>> recipe_dtypes(torch.bfloat16, "llama"), recipe_dtypes(torch.bfloat16, "gemma")
    ((torch.float32, torch.bfloat16), (torch.float32, torch.float32))
    """
    if casting == "none" or casting == "input_dtype":
        return dtype, dtype
    compute = compute_dtype(dtype)
    return compute, dtype if casting == "llama" else compute  # (qwen3_next: the gate's product in float32)


def rms_normalize(h: Tensor, dims: List[int], eps: float) -> Tensor:
    """``x̂ = h / sqrt(mean(h²) + eps)`` over ``dims``, in ``h``'s dtype: the normalization
    every recipe shares (transformers' operation sequence, so its bits)."""
    return h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)


def weigh(normalized: Tensor, weight: Optional[Tensor], casting: str, dtype: torch.dtype,
          weight_offset: float = 0.0) -> Tensor:
    """``x̂ · (weight_offset + weight)`` with ``casting``'s casts for input of ``dtype``, up to
    (not including) the recipe's final cast: ``"llama"`` and ``"none"`` cast x̂ to ``dtype``
    first, ``"gemma"`` multiplies in x̂'s dtype, ``"t5"`` casts to a half weight's dtype.
    ``weight`` may be laid out to broadcast against x̂ in any way.

    >>> weigh(torch.tensor([0.5, 1.5]), torch.tensor([2., 2.]), "gemma", torch.bfloat16, weight_offset=1.0)
    tensor([1.5000, 4.5000])
    """
    if casting in ("gemma", "mochi", "gemma3n"):  # (_CAST_AFTER_WEIGHT, written out for TorchScript)
        scale = _scale(weight, weight_offset, normalized.dtype)
        return normalized if scale is None else normalized * scale
    if casting == "t5":
        if weight is None:
            return normalized.to(dtype)
        if weight.dtype == torch.float16 or weight.dtype == torch.bfloat16:
            normalized = normalized.to(weight.dtype)
        return (weight if weight_offset == 0 else weight_offset + weight) * normalized  # (_scale's, refined)
    if casting == "input_dtype":  # (x̂ first, as StableAudio3RMSNorm multiplies)
        scale = _scale(weight, weight_offset, dtype)
        normalized = normalized.to(dtype)
        return normalized if scale is None else normalized * scale
    normalized = normalized.to(dtype)  # llama, qwen3_next, none and imagegpt (which the kernels approximate in float32)
    scale = _scale(weight, weight_offset)
    return normalized if scale is None else scale * normalized


def rms_norm_recipe(x: Tensor, weight: Optional[Tensor], eps: float, casting: str, weight_offset: float = 0.0,
                    normalized_ndim: int = 1) -> Tensor:
    """RMS norm over the last ``normalized_ndim`` axes with ``casting``'s roundings, in
    torch operations (differentiable; the model family's own operation sequence).

    >>> x = torch.tensor([[3., 4.]])
    >>> [round(v, 4) for v in rms_norm_recipe(x, torch.ones(2), 0.0, "llama")[0].tolist()]
    [0.8485, 1.1314]
    """
    if casting not in ("llama", "gemma", "t5", "none", "input_dtype", "imagegpt", "mochi", "gemma3n"):  # (CASTINGS)
        raise ValueError(f"unknown casting '{casting}'; use one of llama, gemma, t5, none, input_dtype, imagegpt, "
                         "mochi, gemma3n")
    normalized = _rms_normalized(x, list(range(-normalized_ndim, 0)), eps, casting)
    # apply_recipe_scale's steps here, so that x̂ goes before the last cast, as the family's
    # code lets it go by rebinding one name (an argument passed on stays alive in this frame
    # until the call returns, on Python 3.10 in the callee's frame too)
    y = weigh(normalized, weight, casting, x.dtype, weight_offset)
    del normalized
    return y.to(x.dtype) if casting in ("gemma", "mochi", "gemma3n") else y  # (_CAST_AFTER_WEIGHT: TorchScript)


def gated_rms_norm_recipe(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float, group_size: int,
                          norm_before_gate: bool, gate_activation: str, casting: str) -> Tensor:
    """The gated RMS norm of :class:`~normlab.torch.fused.GatedRMSNorm` in torch operations,
    its composite's steps (``casting`` one of ``"llama"``, ``"gemma"``, ``"qwen3_next"``):
    the gate's activation in the recipe's compute dtype, ``x · act(gate)`` before the norm
    (``norm_before_gate=False``) or after the weight (``True``), each group of ``group_size``
    channels normalized on its own. Written for TorchScript, which compiles it where it
    compiles the families' classes (FalconH1's, Mamba2's, Qwen3-Next's gated norms).

    >>> x = torch.tensor([[3., 4., 1., 1.]])
    >>> [round(v, 4) for v in gated_rms_norm_recipe(x, None, torch.ones(4), 0.0, 2, True, "silu", "gemma")[0].tolist()]
    [0.8485, 1.1314, 1.0, 1.0]
    """
    dtype = x.dtype
    compute, work = recipe_dtypes(dtype, casting)
    h = x.to(compute)
    # (the activation beside its product, each where the families write it: TorchScript's
    # optimized backward differentiates them together there, in its own roundings)
    if gate is not None and not norm_before_gate:
        h = h * activate(gate.to(compute), gate_activation)
    shape = h.shape
    groups = shape[-1] // group_size
    normalized = rms_normalize(h.reshape(list(shape[:-1]) + [groups, group_size]), [-1], eps)
    del h
    y = weigh(normalized, weight.reshape(groups, group_size), casting, dtype).reshape(shape)
    del normalized
    if gate is not None and norm_before_gate:
        y = y * activate(gate.to(compute), gate_activation).to(work)
    return y.to(dtype) if casting == "gemma" or casting == "qwen3_next" else y  # (they round once, at the end)


def activate(gate: Tensor, gate_activation: str) -> Tensor:
    """A gated norm's activation of its gate: ``"silu"``, ``"sigmoid"`` or ``"gelu"``.

    >>> activate(torch.zeros(1), "sigmoid").tolist()
    [0.5]
    """
    if gate_activation == "silu":
        return F.silu(gate)
    if gate_activation == "sigmoid":
        return torch.sigmoid(gate)
    if gate_activation == "gelu":
        return F.gelu(gate)
    raise ValueError(f"unknown gate activation '{gate_activation}'; use one of silu, sigmoid, gelu")


def _rms_normalized(x: Tensor, dims: List[int], eps: float, casting: str) -> Tensor:
    """``casting``'s x̂ of ``x`` over ``dims``, before its weight."""
    if casting == "imagegpt":  # (a division: other bits than the reciprocal's product)
        return x / torch.sqrt(torch.mean(torch.square(x), dims, keepdim=True) + eps)
    if casting in ("t5", "mochi"):  # T5 scales the input itself (promoted), not its float32 copy
        variance = x.to(compute_dtype(x.dtype)).pow(2).mean(dims, keepdim=True)
        return x * torch.rsqrt(variance + eps)
    if casting == "gemma3n":
        return _pow_normalize(x.to(compute_dtype(x.dtype)), dims, eps)
    return rms_normalize(x.to(recipe_dtypes(x.dtype, casting)[0]), dims, eps)


def _pow_normalize(h: Tensor, dims: List[int], eps: float) -> Tensor:
    """``rms_normalize`` as Gemma3n writes it: the root's reciprocal by ``pow``, whose backward
    rounds otherwise than ``rsqrt``'s."""
    return h * torch.pow(h.pow(2).mean(dims, keepdim=True) + eps, -0.5)


def apply_recipe_scale(x: Tensor, normalized: Tensor, weight: Optional[Tensor], casting: str,
                       weight_offset: float = 0.0) -> Tensor:
    """The recipe's casts and weight on an already normalized ``x̂`` (computed in
    ``compute_dtype(x.dtype)`` by the kernels): what :func:`rms_norm_recipe` does after
    its statistics.

    >>> x = torch.tensor([[3., 4.]], dtype=torch.bfloat16)
    >>> apply_recipe_scale(x, torch.tensor([[0.6, 0.8]]) * 2 ** 0.5, torch.ones(2), "llama").dtype
    torch.float32
    """
    y = weigh(normalized, weight, casting, x.dtype, weight_offset)
    return y.to(x.dtype) if casting in _CAST_AFTER_WEIGHT else y


def layer_norm_recipe(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, casting: str,
                      size: Optional[int] = None) -> Tensor:
    """Layer norm over the last axis of ``x`` in float32 (float64 for float64 input), cast to
    ``x``'s dtype once at the end, as ``casting`` (one of :data:`LAYER_NORM_CASTINGS`) writes
    it; ``weight`` and ``bias`` broadcast against ``x`` (``"olmo"`` hands them to ``F.layer_norm``,
    as OLMo does, where they span the last axis alone).
    ``size``: the last axis' size where the caller knows it (under ``torch.jit.trace`` the
    input's sizes are tensors, which the TorchScript ONNX exporter refuses as a layer norm's
    shape; OLMo's own code passes its ``normalized_shape``).

    >>> x = torch.tensor([[1., 2., 3.]], dtype=torch.bfloat16)
    >>> layer_norm_recipe(x, torch.ones(3), None, 0.0, "cohere").tolist()
    [[-1.2265625, 0.0, 1.2265625]]
    """
    if casting not in ("olmo", "cohere", "deberta"):  # (LAYER_NORM_CASTINGS, written out for TorchScript)
        raise ValueError(f"unknown layer norm casting '{casting}'; use one of olmo, cohere, deberta")
    compute = compute_dtype(x.dtype)
    h = x.to(compute)
    if casting != "deberta":  # (DeBERTa's parameters multiply in their own dtype)
        weight = None if weight is None else weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    if casting == "olmo" and (weight is None or weight.dim() == 1) and (bias is None or bias.dim() == 1):
        # (OLMo's own call; a weight per head, (heads, head_dim), spans more than F.layer_norm's
        # last axis: the steps below scale each head as cohere's do)
        return F.layer_norm(h, [h.shape[-1] if size is None else size], weight, bias, eps).to(x.dtype)
    mean = h.mean(-1, keepdim=True)
    variance = (h - mean).pow(2).mean(-1, keepdim=True)
    if casting == "deberta":
        return apply_deberta_scale(x, (h - mean) / torch.sqrt(variance + eps), weight, bias)
    h = (h - mean) * torch.rsqrt(variance + eps)
    if weight is not None:
        h = weight * h
    if bias is not None:
        h = h + bias
    return h.to(x.dtype)


def apply_deberta_scale(x: Tensor, normalized: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """DeBERTa's steps after its statistics: ``x̂`` cast to ``x``'s dtype, then
    ``weight · x̂ + bias`` in the dtype they promote to.

    >>> apply_deberta_scale(torch.ones(2, dtype=torch.bfloat16), torch.ones(2), torch.ones(2), None).dtype
    torch.float32
    """
    h = normalized.to(x.dtype)
    if weight is not None:
        h = weight * h
    return h if bias is None else h + bias


def unweighted_rms_norm_recipe(x: Tensor, eps: float, casting: str, dim: int = -1) -> Tensor:
    """RMS norm over axis ``dim`` of ``x`` (the last one, or the channels of LTX-2's
    channels-first norms), without a weight, with ``casting``'s roundings (one of
    :data:`UNWEIGHTED_CASTINGS`), in the model family's own torch operations.

    >>> x = torch.tensor([[3., 4.]], dtype=torch.bfloat16)
    >>> unweighted_rms_norm_recipe(x, 0.0, "llama").tolist(), unweighted_rms_norm_recipe(x, 0.0, "deepseek").tolist()
    ([[0.84765625, 1.1328125]], [[0.8515625, 1.1328125]])
    """
    if casting not in ("llama", "deepseek", "diffusers", "gemma3n", "none", "imagegpt"):  # (UNWEIGHTED_CASTINGS)
        raise ValueError(f"unknown casting '{casting}' of an RMS norm without a weight; use one of llama, deepseek, "
                         "diffusers, gemma3n, none, imagegpt")
    if casting == "deepseek":
        return x * torch.rsqrt(x.to(compute_dtype(x.dtype)).pow(2).mean(dim, keepdim=True) + eps).to(x.dtype)
    if casting == "diffusers":
        return (x * torch.rsqrt(x.to(compute_dtype(x.dtype)).pow(2).mean(dim, keepdim=True) + eps)).to(x.dtype)
    if casting == "gemma3n":
        return _pow_normalize(x.to(compute_dtype(x.dtype)), [dim], eps).to(x.dtype)
    if casting == "none":
        return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps)
    if casting == "imagegpt":  # (LTX-2's x / sqrt(mean(x ** 2) + eps), every step in the input's dtype)
        return x / torch.sqrt(torch.mean(x.pow(2), dim, keepdim=True) + eps)
    return rms_normalize(x.to(compute_dtype(x.dtype)), [dim], eps).to(x.dtype)


def channels_first_rms_norm_recipe(x: Tensor, weight: Optional[Tensor], eps: float, casting: str) -> Tensor:
    """RMS norm over axis 1 of ``x`` (``(N, C, H, W)``, channels first) with ``casting``'s
    roundings (one of :data:`CHANNELS_FIRST_RMS_CASTINGS`), in timm's own torch operations
    (``rms_norm2d``): the mean of squares over axis 1, ``x · rsqrt(...)``, then the weight
    reshaped to ``(1, C, 1, 1)``.

    >>> x = torch.tensor([[[[3.]], [[4.]]]], dtype=torch.bfloat16)
    >>> channels_first_rms_norm_recipe(x, None, 0.0, "none").flatten().tolist()  # (each step rounded in bfloat16)
    [0.8515625, 1.1328125]
    >>> channels_first_rms_norm_recipe(x, None, 0.0, "float32").flatten().tolist()  # (rounded once)
    [0.84765625, 1.1328125]
    """
    if casting not in ("none", "float32"):  # (CHANNELS_FIRST_RMS_CASTINGS, written out for TorchScript)
        raise ValueError(f"unknown casting '{casting}' of a channels-first RMS norm; use one of none, float32")
    h = x.float() if casting == "float32" else x
    return weigh_channels(x, h * torch.rsqrt(torch.mean(h.pow(2), dim=1, keepdim=True) + eps), weight, casting)


def weigh_channels(x: Tensor, normalized: Tensor, weight: Optional[Tensor], casting: str) -> Tensor:
    """A channels-first recipe's steps after its statistics: ``x̂ · weight.reshape(1, C, 1, 1)``
    (in float32 for ``"float32"``, cast to ``x``'s dtype after), as timm writes them.

    >>> weigh_channels(torch.ones(1, 2, 1, 1, dtype=torch.bfloat16), torch.ones(1, 2, 1, 1), torch.ones(2),
    ...                "float32").dtype
    torch.bfloat16
    """
    if weight is not None:
        normalized = normalized * (weight.float() if casting == "float32" else weight).reshape(1, -1, 1, 1)
    return normalized.to(x.dtype) if casting == "float32" else normalized


class TransformersEpsName:
    """``variance_epsilon``, the name transformers' norms (``LlamaRMSNorm`` and its copies,
    ``T5LayerNorm``, DeBERTa's layer norm, ``MambaRMSNormGated``) give their epsilon, read
    and set as ``eps``: code written for the original class, ``norm.variance_epsilon = 1e-5``,
    changes the norm that :func:`~normlab.torch.convert` made of it.

    >>> from normlab.torch import RMSNorm
    >>> norm = RMSNorm(4, eps=1e-6, casting="llama")
    >>> norm.variance_epsilon = 1e-5
    >>> norm.eps
    1e-05
    """

    __jit_unused_properties__ = ["variance_epsilon"]  # (torch.jit.script compiles properties otherwise)

    @property
    def variance_epsilon(self):
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value) -> None:
        self.eps = value
        if "variance_epsilon" in self.__dict__:  # (convert's copy of the original's, which unconvert gives back)
            self.__dict__["variance_epsilon"] = value
