"""Norms with a model family's casting recipe: the twins of transformers' layer norms that
compute in float32 (Cohere's, with its per-head QK-norm weight, OLMo's and DeBERTa's) and of
timm's ``LayerNormFp32`` and ``LayerNorm2dFp32``, and of its RMS norms without a weight, over
the last axis whatever its size (Llama 4's ``L2Norm``, DeepSeek-V4's ``UnweightedRMSNorm``,
FalconMamba's, NanoChat's, ...), of diffusers' RMS norm with a bias and Stable Audio 3's with
its weight named ``gamma``, and of timm's channels-first RMS norms (``RmsNorm2d``,
``RmsNorm2dFp32``).

The recipes themselves (which torch operations, where the casts are) live in
:mod:`normlab.torch.casting`, beside the RMS norm recipes.
"""

from typing import List, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normlab.errors import ParamsError
from normlab.torch.casting import (CHANNELS_FIRST_RMS_CASTINGS, LAYER_NORM_CASTINGS, UNWEIGHTED_CASTINGS,
                                   TransformersEpsName, apply_deberta_scale, channels_first_rms_norm_recipe,
                                   check_casting, check_weight_offset,
                                   compute_dtype, layer_norm_recipe, unweighted_rms_norm_recipe,
                                   weigh_channels)
from normlab.torch.compute import _normalize
from normlab.torch.modules import LayerNorm, LayerNorm2d, Norm, RMSNorm, _fx_call_module
from normlab.torch.paths import _LOW_PRECISION, _choose_path, _PathSwitch, _profiler, profiled_recipe
from normlab.torch.spec import Spec, refuse_non_tensor, torch_layout

__all__ = ["RecipeLayerNorm", "UnweightedRMSNorm", "BiasedRMSNorm", "GammaRMSNorm", "RMSNorm2d", "Float32LayerNorm",
           "Float32LayerNorm2d", "WrittenOutLayerNorm", "PerHeadLayerNorm", "MultiHeadLayerNorm",
           "PerFrameGroupNorm"]


_PRUNED_BY = frozenset({"weight", "bias", "normalized_shape"})  # what RecipeLayerNorm's originals read


class RecipeLayerNorm(TransformersEpsName, nn.Module):
    """Layer norm over the last axis, computed in float32 and cast back to the input's dtype
    as a model family writes it: ``casting="cohere"`` (``CohereLayerNorm``), ``"olmo"``
    (``OlmoLayerNorm``) or ``"deberta"`` (``DebertaLayerNorm``, which casts before its
    weight and bias), see :mod:`normlab.torch.casting`. ``hidden_size`` is the shape of
    the weight, as ``CohereLayerNorm`` takes it: an int, or ``(heads, head_dim)`` for a
    weight per head (QK-norm: each head's ``head_dim`` values are normalized, pattern
    ``"... h [d]"``, and scaled by that head's weight, params ``"h d"``). ``bias=False`` and
    ``elementwise_affine=False`` leave those parameters out, as the families do.

    Like :class:`~normlab.torch.RMSNorm`'s recipes, it runs the family's own torch
    operations, so its outputs and gradients are the family's to the bit in every dtype;
    under ``use_path("kernel")`` it runs on the kernels instead (statistics in float64,
    within one rounding of the family's numbers).

    >>> norm = RecipeLayerNorm((2, 3), eps=0.0, casting="cohere")
    >>> x = torch.tensor([[[1., 2., 3.], [0., 0., 6.]]])
    >>> [[round(v, 4) for v in row] for row in norm(x)[0].tolist()]
    [[-1.2247, 0.0, 1.2247], [-0.7071, -0.7071, 1.4142]]
    """

    _profile_name = "normlab::layer_norm"  # (torch's op for it, as torch.nn.LayerNorm's aten::layer_norm)

    def __init__(self, hidden_size, eps: float = 1e-5, casting: str = "cohere", elementwise_affine: bool = True,
                 bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if casting not in LAYER_NORM_CASTINGS:
            raise ValueError(f"casting must be one of {', '.join(map(repr, LAYER_NORM_CASTINGS))}, got {casting!r}")
        self.hidden_size = (hidden_size,) if isinstance(hidden_size, int) else tuple(hidden_size)
        self.eps, self.casting, self.elementwise_affine = eps, casting, elementwise_affine
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.hidden_size, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(self.hidden_size, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()
        self._init_spec()

    def _init_spec(self) -> None:
        """The kernels' pattern, from the attributes (a converted module has its original's)."""
        for name in ("weight", "bias"):
            self._parameters.setdefault(name, None)
        self.hidden_size = tuple(int(s) for s in self.hidden_size)
        names = [f"h{i}" for i in range(len(self.hidden_size) - 1)] + ["d"]
        affine = self._parameters["weight"] is not None or self._parameters["bias"] is not None
        self._spec = Spec.build(" ".join(["...", *names[:-1], "[d]"]), " ".join(names) if affine else None, False,
                                **dict(zip(names, self.hidden_size)))
        self._normalize_only = Spec.build(" ".join(["...", *names[:-1], "[d]"]), None, False,
                                          **dict(zip(names, self.hidden_size)))

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # a pruner narrows these between calls: follow at once, as the original reads them
        # on its next call (forward follows only an input of the new width)
        if name in _PRUNED_BY and "_spec" in self.__dict__:
            self._follows_pruning()

    def _follows_pruning(self) -> bool:
        """The originals have no ``hidden_size``: Cohere's and DeBERTa's multiply by their
        weight (and add their bias) whatever its shape, OLMo's reads its ``normalized_shape``,
        and structured pruning narrows those. Where they differ from ``hidden_size``, they
        become it (and the spec is built again), so the twin computes as the original; True
        where they did."""
        parameter = self._parameters.get("weight")
        if parameter is None:
            parameter = self._parameters.get("bias")
        pruned = self.__dict__.get("normalized_shape") if parameter is None else parameter.shape
        if pruned is None or len(pruned) == 0 or tuple(pruned) == self.hidden_size:
            return False
        self.hidden_size = tuple(pruned)
        self._init_spec()
        return True

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        shape = self.hidden_size[0] if len(self.hidden_size) == 1 else self.hidden_size
        return (f"{shape}, eps={self.eps}, casting={self.casting!r}, elementwise_affine={self.weight is not None}, "
                f"bias={self.bias is not None}")

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # the family's operations, as TorchScript compiles the original
            return layer_norm_recipe(x, self.weight, self.bias, self.eps, self.casting, self.hidden_size[-1])
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_call_module(self, x)  # one leaf call, as fx records torch.nn's norms
        refuse_non_tensor(self, x, "x", 1)
        shape = self.hidden_size
        # (under torch.jit.trace sizes are traced tensors: a check would warn, as torch.nn's norms do not)
        if not torch.jit.is_tracing() and tuple(x.shape[max(x.dim() - len(shape), 0):]) != shape:
            if self._follows_pruning():
                return self.forward(x)  # (once: hidden_size is now the pruned one)
            raise RuntimeError(f"{type(self).__name__}{shape}: expected input with shape [*, "
                               f"{', '.join(map(str, shape))}], but got input of size {list(x.shape)}")
        if _choose_path(x, has_native=True) == "kernel" and _PathSwitch.path == "kernel":
            h = x.to(compute_dtype(x.dtype))
            if self.casting == "deberta":  # the parameters after the cast, in their own dtype
                normalized = _normalize(h, None, None, self._normalize_only, float(self.eps), "kernel", self)[0]
                return apply_deberta_scale(x, normalized, self.weight, self.bias)
            weight, bias = (None if p is None else p.to(h.dtype) for p in (self.weight, self.bias))
            try:
                return _normalize(h, weight, bias, self._spec, float(self.eps), "kernel", self)[0].to(x.dtype)
            except ParamsError:
                # a parameter narrowed in place (weight.data = ...), which __setattr__ does not see
                if self._follows_pruning():
                    return self.forward(x)  # (the input's width now raises the originals' RuntimeError)
                raise
        if not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
            return profiled_recipe(self, layer_norm_recipe, x, self.weight, self.bias, self.eps, self.casting, shape[-1])
        return layer_norm_recipe(x, self.weight, self.bias, self.eps, self.casting, shape[-1])


class UnweightedRMSNorm(TransformersEpsName, nn.Module):
    """RMS norm without parameters over the last axis of any size (or axis
    ``normalized_dim``), ``y = x / sqrt(mean(x²) + eps)``, with a model family's casting recipe:
    ``casting="llama"`` (normalized in float32, cast back once: Llama 4's ``L2Norm``,
    FalconMamba's and NanoChat's weight-less RMS norms), ``"deepseek"`` (the reciprocal
    root cast back and multiplying the input in its own dtype: DeepSeek-V4's
    ``UnweightedRMSNorm``), ``"diffusers"`` (the float32 root multiplying the input in its
    own dtype, cast back once: diffusers' ``RMSNorm`` without a weight) or ``"gemma3n"``
    (``"llama"`` with the root's reciprocal taken by ``pow``: ``Gemma3nRMSNorm(...,
    with_scale=False)``) or ``"none"`` (everything in the input's dtype: timm's
    ``RmsNorm(..., affine=False)``) or ``"imagegpt"`` (everything in the input's dtype, dividing
    by the root: LTX-2's ``PerChannelRMSNorm`` and ``LTX2AudioPixelNorm``, over the channels,
    ``normalized_dim=1``), see :mod:`normlab.torch.casting`. Float64 input stays float64.
    ``forward(x, channel_dim=None)`` takes a ``channel_dim`` and ignores it, as LTX-2's
    ``PerChannelRMSNorm`` does (it normalizes its own axis whatever is passed).

    It runs the family's own torch operations, so its outputs and gradients are the
    family's to the bit; under ``use_path("kernel")`` it runs on the kernels instead
    (statistics in float64, within one rounding of the family's numbers).

    >>> norm = UnweightedRMSNorm(eps=0.0)
    >>> [round(v, 4) for v in norm(torch.tensor([[3., 4.]]))[0].tolist()], norm(torch.ones(2, 5)).shape
    ([0.8485, 1.1314], torch.Size([2, 5]))
    """

    _profile_name = "normlab::rms_norm"  # (torch's op for it, as torch.nn.RMSNorm's aten::rms_norm)
    normalized_dim = -1  # (modules pickled before it existed normalize the last axis)

    def __init__(self, eps: float = 1e-6, casting: str = "llama", normalized_dim: int = -1) -> None:
        super().__init__()
        if casting not in UNWEIGHTED_CASTINGS:
            raise ValueError(f"casting must be one of {', '.join(map(repr, UNWEIGHTED_CASTINGS))}, got {casting!r}")
        if isinstance(normalized_dim, bool) or not isinstance(normalized_dim, int):
            raise TypeError(f"normalized_dim must be an int (the axis normalized: -1, the last, or 1, the channels "
                            f"of (N, C, ...) input), got {normalized_dim!r}")
        self.eps, self.casting, self.normalized_dim = eps, casting, normalized_dim
        self._init_spec()

    def _init_spec(self) -> None:
        # the size is read off each input; axes before or after the normalized one, unnamed
        dim = self.normalized_dim
        kept = [f"k{i}" for i in range(dim if dim >= 0 else -dim - 1)]
        self._spec = Spec.build(" ".join([*kept, "[d]", "..."] if dim >= 0 else ["...", "[d]", *kept]), None, True)

    def extra_repr(self) -> str:
        dim = self.normalized_dim
        return f"eps={self.eps}, casting={self.casting!r}" + (f", normalized_dim={dim}" if dim != -1 else "")

    @torch.jit.unused
    def _traced_root_forward(self, proxy) -> "torch.fx.Proxy":
        """What fx records for the module as the root: the recipe's operations, where they hold
        no branch on the input's dtype (fx cannot take one), as fx traces LTX-2's norms."""
        if self.casting not in ("none", "imagegpt"):
            raise TypeError(f"torch.fx traces UnweightedRMSNorm(casting={self.casting!r}) inside a model, not as the "
                            "root module (its recipe picks the compute dtype from the input's): trace a model that "
                            "holds it, e.g. torch.nn.Sequential(norm)")
        return unweighted_rms_norm_recipe(proxy, self.eps, self.casting, self.normalized_dim)

    def forward(self, x: Tensor, channel_dim: Optional[int] = None) -> Tensor:
        if torch.jit.is_scripting():  # the family's operations, as TorchScript compiles the original
            return unweighted_rms_norm_recipe(x, self.eps, self.casting, self.normalized_dim)
        return self._eager_forward(x, channel_dim)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor, channel_dim: Optional[int] = None) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_call_module(self, x, channel_dim=channel_dim)  # (a keyword: one the original takes)
        refuse_non_tensor(self, x, "x", 1)
        if channel_dim is not None and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int)):
            # (a mask, which other twins take second: this one has none)
            raise TypeError(f"{type(self).__name__}.forward(): argument 'channel_dim' (position 2) must be int or "
                            f"None (it is ignored, as LTX-2's PerChannelRMSNorm ignores it), not "
                            f"{type(channel_dim).__name__}")
        dim = self.normalized_dim
        if x.dim() == 0:
            raise RuntimeError(f"{type(self).__name__} normalizes the last axis: expected input with at least one "
                               f"dimension, but got a 0-dimensional tensor")
        if (_choose_path(x, has_native=True) == "kernel" and _PathSwitch.path == "kernel"
                and -x.dim() <= dim < x.dim()):  # (an axis the input lacks: torch's IndexError, below)
            return _normalize(x.to(compute_dtype(x.dtype)), None, None, self._spec, float(self.eps),
                              "kernel", self)[0].to(x.dtype)
        if not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
            return profiled_recipe(self, unweighted_rms_norm_recipe, x, self.eps, self.casting, dim)
        return unweighted_rms_norm_recipe(x, self.eps, self.casting, dim)


class BiasedRMSNorm(RMSNorm):
    """:class:`~normlab.torch.RMSNorm` followed by a bias: ``y = rms_norm(x) + bias``, the
    bias added to the norm's output (with its ``casting`` recipe and weight) in the dtype
    the two promote to, as diffusers' ``RMSNorm(dim, eps, bias=True)`` adds it (Sana's and
    SANA-Video's GLUMBConv output norm, DC-AE's ``norm_out``; :func:`~normlab.torch.convert`
    turns those into this, with ``casting="t5"``, their outputs and gradients to the bit).
    ``bias=False`` is :class:`~normlab.torch.RMSNorm` itself; without
    ``elementwise_affine`` there is neither weight nor bias, as in diffusers. The bias is
    added on every path (kernels, ``mask=``, torch's), after the norm.

    >>> norm = BiasedRMSNorm(2, eps=0.0)
    >>> with torch.no_grad():
    ...     _ = norm.bias.fill_(1.0)
    >>> [round(v, 4) for v in norm(torch.tensor([[3., 4.]]))[0].tolist()], list(norm.state_dict())
    ([1.8485, 2.1314], ['weight', 'bias'])
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, casting: Optional[str] = None,
                 weight_offset: float = 0.0) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype, casting=casting,
                         weight_offset=weight_offset)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:  # (torch.nn.RMSNorm's __init__ calls this before bias exists)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias={self.bias is not None}"

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            y = self._scripted_forward(x, mask)
        else:
            if isinstance(x, torch.fx.Proxy):
                return _fx_call_module(self, x, mask=mask)  # (one leaf: its call adds the bias)
            y = self._eager_forward(x, mask)
        bias = self.bias
        return y if bias is None else y + bias

    @torch.jit.unused
    def _traced_root_forward(self, proxy) -> "torch.fx.Proxy":
        y = super()._traced_root_forward(proxy)
        return y if self.bias is None else y + self.bias


class GammaRMSNorm(RMSNorm):
    """:class:`~normlab.torch.RMSNorm` whose weight is registered as ``gamma``, its
    ``state_dict`` key, as diffusers' ``StableAudio3RMSNorm`` (Stable Audio 3's DiT) keeps it:
    :func:`~normlab.torch.convert` turns that (computed in float32, ``force_fp32=True``) into
    this with ``casting="gemma"``, and with ``force_fp32=False`` (every step in the input's
    dtype, the weight cast to it) with ``casting="input_dtype"``, its outputs and gradients to
    the bit. ``weight`` reads and
    sets ``gamma``, so everything :class:`~normlab.torch.RMSNorm` does applies.

    >>> norm = GammaRMSNorm(2, eps=0.0, casting="gemma")
    >>> [round(v, 4) for v in norm(torch.tensor([[3., 4.]]))[0].tolist()], list(norm.state_dict())
    ([0.8485, 1.1314], ['gamma'])
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, casting: Optional[str] = None, weight_offset: float = 0.0) -> None:
        nn.Module.__init__(self)  # (torch.nn.RMSNorm's would register a parameter named weight)
        self.casting = check_casting(casting)
        self.weight_offset = check_weight_offset(weight_offset)
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        if elementwise_affine:
            self.gamma = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("gamma", None)
        self.reset_parameters()
        self._init_spec()

    @property
    def weight(self) -> Optional[Tensor]:
        return self.gamma

    def __setattr__(self, name: str, value) -> None:
        # (torch.nn registers a Parameter set as norm.weight under that name, past any property)
        super().__setattr__("gamma" if name == "weight" else name, value)


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of ``(N, C, H, W)`` input, ``"b [c] h w"`` with one weight
    per channel, ``y = x / sqrt(mean_c(x²) + eps) · weight``, in timm's torch operations and
    casts: ``casting="none"``, every step in the input's dtype (timm's ``RmsNorm2d``), or
    ``"float32"``, the input and weight upcast and the output cast back once
    (``RmsNorm2dFp32``); see :mod:`normlab.torch.casting`. :func:`~normlab.torch.convert`
    turns those into this, their outputs and gradients to the bit. Its arguments and
    attributes are timm's (``channels``, ``affine``; ``normalized_shape``,
    ``elementwise_affine``). Like timm's, without a weight it takes any input of two or more
    axes, channels second; the weight multiplies as ``(1, C, 1, 1)``. No ``nn.RMSNorm``, as
    timm's is none; under ``use_path("kernel")`` it runs on the kernels (statistics in
    float64, within a rounding of timm's numbers).

    >>> norm = RMSNorm2d(2, eps=0.0)
    >>> [round(v, 4) for v in norm(torch.tensor([[[[3.]], [[4.]]]])).flatten().tolist()], list(norm.state_dict())
    ([0.8485, 1.1314], ['weight'])
    """

    _profile_name = "normlab::rms_norm"  # (torch's op for it, as torch.nn.RMSNorm's aten::rms_norm)

    def __init__(self, channels, eps: float = 1e-6, affine: bool = True, device=None, dtype=None, *,
                 casting: str = "none") -> None:
        super().__init__()
        if casting not in CHANNELS_FIRST_RMS_CASTINGS:
            raise ValueError(f"casting must be one of {', '.join(map(repr, CHANNELS_FIRST_RMS_CASTINGS))}, "
                             f"got {casting!r}")
        self.normalized_shape = (channels,) if isinstance(channels, int) else tuple(channels)
        self.eps, self.elementwise_affine, self.casting = eps, affine, casting
        if affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()
        self._init_spec()

    def _init_spec(self) -> None:
        self._spec = Spec.build("b [c] ...", None, True)  # (the weight multiplies after, as timm's does)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape[0]}, eps={self.eps}, affine={self.weight is not None}, "
                f"casting={self.casting!r}")

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # timm's operations, as TorchScript compiles the original
            return channels_first_rms_norm_recipe(x, self.weight, self.eps, self.casting)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_call_module(self, x)
        refuse_non_tensor(self, x, "x", 1)
        if x.dim() >= 2 and _choose_path(x, has_native=True) == "kernel" and _PathSwitch.path == "kernel":
            h = x.float() if self.casting == "float32" else x.to(compute_dtype(x.dtype))
            normalized = _normalize(h, None, None, self._spec, float(self.eps), "kernel", self)[0]
            if self.casting == "none":
                normalized = normalized.to(x.dtype)
            return weigh_channels(x, normalized, self.weight, self.casting)
        if not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
            return profiled_recipe(self, channels_first_rms_norm_recipe, x, self.weight, self.eps, self.casting)
        return channels_first_rms_norm_recipe(x, self.weight, self.eps, self.casting)


class _HalfPrecisionLayerNorm(LayerNorm):
    """A :class:`~normlab.torch.LayerNorm` whose original computes half-precision input (or
    parameters of another dtype than the input) otherwise than torch's layer norm: such calls
    run the subclass's ``_torch_forward``, the original's operations; the rest the kernels."""

    def _normlab_forward(self, input: Tensor) -> Tensor:
        if _upcasts(input, self.weight, self.bias):
            if not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
                # (the parameters passed: the range of the backward ends where they get their gradients)
                return profiled_recipe(self, self._torch_forward_with, input, self.weight, self.bias)
            return self._torch_forward(input)
        return super()._normlab_forward(input)


class Float32LayerNorm(_HalfPrecisionLayerNorm):
    """:class:`~normlab.torch.LayerNorm` that computes half-precision input in float32, as
    timm's ``LayerNormFp32`` does (:func:`~normlab.torch.convert` turns that into this): the
    input, weight and bias upcast, ``F.layer_norm`` there, the output cast back to the
    input's dtype once. So a bfloat16 model's outputs and its weight and bias gradients are
    the original's to the bit (torch's bfloat16 layer norm rounds the parameter gradients
    beside float32 weights, by about 1%), and parameters of another dtype than the input
    compute instead of raising "mixed dtype". Float32 and float64 input beside parameters of
    its dtype runs as :class:`~normlab.torch.LayerNorm`. An ``nn.LayerNorm``, as the original
    is; ``torch.jit.script`` compiles the upcasting forward, as it does the original's.

    >>> norm = Float32LayerNorm(3).to(torch.bfloat16)
    >>> norm(torch.tensor([[4., 3., 2.]])).dtype, isinstance(norm, torch.nn.LayerNorm)
    (torch.float32, True)
    """

    def _torch_forward(self, input: Tensor) -> Tensor:
        """The upcasting forward, which TorchScript compiles and fx records for a root module."""
        return self._torch_forward_with(input, self.weight, self.bias)

    def _torch_forward_with(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        return float32_layer_norm(input, self.normalized_shape, weight, bias, self.eps)


class Float32LayerNorm2d(LayerNorm2d):
    """:class:`~normlab.torch.LayerNorm2d` that computes half-precision input in float32, as
    timm's ``LayerNorm2dFp32`` does (:func:`~normlab.torch.convert` turns that into this),
    with :class:`Float32LayerNorm`'s casts: the original's, to the bit, where
    :class:`~normlab.torch.LayerNorm2d` would take torch's bfloat16 layer norm. Float32 and
    float64 input beside parameters of its dtype runs as :class:`~normlab.torch.LayerNorm2d`.

    >>> norm = Float32LayerNorm2d(3).to(torch.float16)
    >>> norm(torch.randn(2, 3, 4, 4)).dtype, isinstance(norm, torch.nn.LayerNorm)
    (torch.float32, True)
    """

    def _torch_forward(self, input: Tensor) -> Tensor:
        """The originals' permutes around the upcasting layer norm (TorchScript, fx's root)."""
        return self._torch_forward_with(input, self.weight, self.bias)

    def _torch_forward_with(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        return float32_layer_norm(input.permute(0, 2, 3, 1), self.normalized_shape, weight, bias,
                                  self.eps).permute(0, 3, 1, 2)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, mask: Optional[Tensor]) -> Tensor:
        if mask is None and isinstance(input, Tensor) and _upcasts(input, self.weight, self.bias):
            if not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
                # (the parameters passed: the range of the backward ends where they get their gradients)
                return profiled_recipe(self, self._torch_forward_with, input, self.weight, self.bias)
            return self._torch_forward(input)
        return super()._eager_forward(input, mask)


def _upcasts(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether a float32 layer norm upcasts for this call: half-precision input, or
    parameters of another dtype than the input."""
    return x.dtype in _LOW_PRECISION or any(p is not None and p.dtype != x.dtype for p in (weight, bias))


def float32_layer_norm(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float) -> Tensor:
    """timm's ``LayerNormFp32``: ``F.layer_norm`` on the input, weight and bias upcast to
    float32, the output cast back to the input's dtype once (torch.jit.script compiles it,
    and fx traces it: no branch on a dtype).

    >>> float32_layer_norm(torch.tensor([[1., 2., 3.]], dtype=torch.bfloat16), [3], None, None, 0.0).tolist()
    [[-1.2265625, 0.0, 1.2265625]]
    """
    if weight is not None:
        weight = weight.float()
    if bias is not None:
        bias = bias.float()
    return F.layer_norm(x.float(), normalized_shape, weight, bias, eps).to(x.dtype)


class WrittenOutLayerNorm(_HalfPrecisionLayerNorm):
    """:class:`~normlab.torch.LayerNorm` whose half-precision calls compute as a layer norm
    written out in torch operations in the input's dtype, ``(x - mean) · rsqrt(var + eps) ·
    weight + bias`` over the last axis (transformers' ``PocketTTSFlowLayerNorm`` and
    ``GradiumPhononTTSFlowLayerNorm``, which :func:`~normlab.torch.convert` turns into this):
    bfloat16 and float16 input round each step there, and parameters of another dtype
    promote the output (bfloat16 input beside float32 parameters gives float32), where torch's
    layer norm computes in float32 and keeps the input's dtype. Those calls run the written-out
    operations, so a half-precision model keeps the original's outputs and gradients to the
    bit; float32 and float64 input beside parameters of its dtype runs as
    :class:`~normlab.torch.LayerNorm`. An ``nn.LayerNorm``, as the originals are.

    >>> norm = WrittenOutLayerNorm(3)
    >>> norm(torch.tensor([[4., 3., 2.]], dtype=torch.bfloat16)).dtype, isinstance(norm, torch.nn.LayerNorm)
    (torch.float32, True)
    """

    def _torch_forward(self, input: Tensor) -> Tensor:
        """The written-out forward, which TorchScript compiles and fx records for a root module."""
        return self._torch_forward_with(input, self.weight, self.bias)

    def _torch_forward_with(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        return written_out_layer_norm(input, weight, bias, self.eps, self.elementwise_affine)


def written_out_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                           elementwise_affine: bool) -> Tensor:
    """A layer norm over the last axis in torch operations, each in the dtype torch's type
    promotion gives it, as PocketTTS's flow head writes it.

    >>> written_out_layer_norm(torch.tensor([[1., 2., 3.]], dtype=torch.bfloat16), None, None, 0.0, False).tolist()
    [[-1.2265625, 0.0, 1.2265625]]
    """
    mean = x.mean(-1, keepdim=True)
    variance = x.var(-1, unbiased=False, keepdim=True)
    x = (x - mean) * torch.rsqrt(variance + eps)
    if elementwise_affine:
        assert weight is not None and bias is not None, "the written-out layer norm adds a weight and a bias"
        x = x * weight + bias
    return x


class PerHeadLayerNorm(Norm):
    """Layer norm of each head's ``head_dim`` values with a weight and bias per head, pattern
    ``"... h [d]"``, params ``"h d"``: transformers' ``ChameleonLayerNorm`` (the QK-norm of
    Chameleon's attention), which :func:`~normlab.torch.convert` turns into this. The original
    multiplies torch's layer norm by its weight and adds its bias in torch operations, so
    parameters of a wider dtype than the input's promote its output (bfloat16 input beside
    float32 parameters, as under autocast, gives float32): those calls run its operations, and
    the rest run as :class:`~normlab.torch.Norm`.

    >>> norm = PerHeadLayerNorm(2, 3)
    >>> [round(v, 4) for v in norm(torch.tensor([[4., 3., 2.], [0., 0., 6.]]))[1].tolist()]
    [-0.7071, -0.7071, 1.4142]
    >>> norm(torch.tensor([[4., 3., 2.], [0., 0., 6.]], dtype=torch.bfloat16)).dtype
    torch.float32
    """

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__("... h [d]", "h d", eps=eps, h=heads, d=head_dim, device=device, dtype=dtype)

    @torch.jit.unused
    def _traced_root_forward(self, proxy) -> "torch.fx.Proxy":
        """What fx records for the module as the root: the original's operations."""
        return F.layer_norm(proxy, (self.sizes["d"],), None, None, self.eps) * self.weight + self.bias

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script compiles in its place: the original's forward, on these very
        parameters (no mask, as TorchScript compiles torch.nn's norms without one)."""
        return _ScriptedPerHeadLayerNorm(self)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                num_segments: Optional[int] = None, segment_axis: Optional[str] = None) -> Tensor:
        weight, bias = self.weight, self.bias
        if (mask is None and segment_ids is None and isinstance(x, Tensor) and weight is not None
                and bias is not None and torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
                != x.dtype):
            return F.layer_norm(x, x.shape[-1:], None, None, self.eps) * weight + bias
        if isinstance(x, Tensor):
            x = torch_layout(x)  # (the original's output is torch's layer norm's: contiguous on any layout)
        return super().forward(x, mask, segment_ids, num_segments, segment_axis)


class _ScriptedPerHeadLayerNorm(nn.Module):
    """:class:`PerHeadLayerNorm` as TorchScript compiles it: ``ChameleonLayerNorm``'s forward,
    torch's layer norm of each head's values times the weight plus the bias, holding the
    twin's ``weight`` and ``bias``."""

    def __init__(self, norm: PerHeadLayerNorm) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.normalized_shape: List[int] = [norm.sizes["d"]]
        self.eps = float(norm.eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, None, None, self.eps) * self.weight + self.bias


def _group_norm_lays_out_channels_last(x: Tensor) -> bool:
    """Whether diffusers' ``MiniMaxH3VideoGroupNorm``, given ``x`` of shape ``(N, C, 1, 1, 1)``,
    hands torch's group norm frames whose strides torch reads as channels-last (its
    ``is_channels_last_strides_3d``, which its CPU kernel's output follows): the frames are
    ``x`` permuted to ``(N, T, C, H, W)``, made contiguous and viewed as ``(N·T, C, 1, H, W)``,
    strides computed on a meta tensor of ``x``'s strides (nothing allocated)."""
    n, c = x.shape[0], x.shape[1]
    frames = torch.empty_strided(x.shape, x.stride(), device="meta").permute(0, 2, 1, 3, 4).contiguous()
    sizes, strides = (n, c, 1, 1, 1), frames.view(n, c, 1, 1, 1).stride()
    smallest = 0
    if strides[1] == 0:
        return False
    for axis in (1, 4, 3, 2, 0):
        if sizes[axis] == 0 or strides[axis] < smallest or (axis == 0 and smallest == strides[1]):
            return False
        smallest = strides[axis] * (sizes[axis] if sizes[axis] > 1 else 1)
    return True


class PerFrameGroupNorm(Norm):
    """Group norm of each frame of ``(N, C, T, H, W)`` input on its own, pattern
    ``"b (g [c]) t [h w]"``, params ``"(g c)"``: diffusers' ``MiniMaxH3VideoGroupNorm``
    (MiniMax-H3's video VAE), which :func:`~normlab.torch.convert` turns into this. The
    original folds the frames into the batch with a permute and a copy and permutes back
    with another, so its output is contiguous whatever the input's layout (channels_last_3d,
    a transposed view); this returns :class:`~normlab.torch.Norm`'s output made contiguous
    where it is not (where it is, no copy), so that a later ``.view`` runs as on the original's,
    and for one frame gives the axes of size 1 the original's strides, by views.

    >>> norm = PerFrameGroupNorm(1, 2, eps=0.0)
    >>> x = torch.tensor([[1., 3.], [5., 5.]]).reshape(1, 2, 2, 1, 1)  # (frame 0: 1, 5; frame 1: 3, 5)
    >>> norm(x).flatten().tolist()
    [-1.0, -1.0, 1.0, 1.0]
    >>> norm(x.to(memory_format=torch.channels_last_3d)).is_contiguous()
    True
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None) -> None:
        if num_channels % num_groups:  # (torch.nn.GroupNorm's refusal, in its words)
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        super().__init__("b (g [c]) t [h w]", "(g c)" if affine else None, eps=eps, g=num_groups,
                         c=num_channels // num_groups, device=device, dtype=dtype)

    @torch.jit.unused
    def _traced_root_forward(self, proxy) -> "torch.fx.Proxy":
        """What fx records for the module as the root: the original's operations, the frames
        folded into the batch for torch's group norm and back."""
        batch, channels, frames, height, width = proxy.shape
        x = proxy.permute(0, 2, 1, 3, 4).contiguous().view(batch * frames, channels, 1, height, width)
        y = F.group_norm(x, self.sizes["g"], self.weight, self.bias, self.eps)
        return y.view(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)  # (forward makes it contiguous)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                num_segments: Optional[int] = None, segment_axis: Optional[str] = None) -> Tensor:
        y = super().forward(x, mask, segment_ids, num_segments, segment_axis).contiguous()
        if isinstance(y, torch.fx.Proxy) or y.dim() != 5 or y.shape[2] != 1:
            return y  # (fx, the root: the original's operations, recorded)
        # One frame: the original's output is its (N, T, C, H, W) result permuted back, which is
        # contiguous as it stands, so .contiguous() keeps its strides, the frame axis' C·H·W where
        # ours is H·W (and, for a single position, torch's group norm may lay the result out
        # channels-last): the same strides, by views of ours (no copy; only the axes of size 1 differ)
        n, c, _, h, w = y.shape
        if h * w == 1 and _group_norm_lays_out_channels_last(x):
            return y.reshape(n, 1, 1, 1, c).permute(0, 4, 1, 2, 3)
        return y.view(n, 1, c, h, w).permute(0, 2, 1, 3, 4)


class MultiHeadLayerNorm(Norm):
    """Layer norm of each head's ``head_dim`` values of ``(batch, sequence, heads, head_dim)``
    input, returned with the heads merged, ``(batch, sequence, heads · head_dim)``: pattern
    ``"b s h [d]"``, a weight (and a bias where ``use_bias``) over the merged axis, params
    ``"(h d)"``. transformers' ``xLSTMMultiHeadLayerNorm`` (xLSTM's mLSTM layers), which
    :func:`~normlab.torch.convert` turns into this, normalizes in float32 where
    ``force_float32_reductions`` (in the input's dtype otherwise), casts to the input's dtype,
    and multiplies by its weight and adds its bias in torch operations: half-precision input
    rounds at each step, float64 input is normalized in float32, and parameters of a wider
    dtype promote the output. Those calls run its operations (:func:`multi_head_layer_norm`),
    and the rest run as :class:`~normlab.torch.Norm`.

    >>> norm = MultiHeadLayerNorm(2, 2)
    >>> [round(v, 4) for v in norm(torch.tensor([[[[1., 3.], [5., 5.]]]]))[0, 0].tolist()]
    [-1.0, 1.0, 0.0, 0.0]
    >>> norm(torch.randn(1, 3, 2, 2, dtype=torch.bfloat16)).shape
    torch.Size([1, 3, 4])
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, use_weight: bool = True,
                 use_bias: bool = False, force_float32_reductions: bool = True, device=None, dtype=None) -> None:
        if use_bias and not use_weight:
            raise ValueError("MultiHeadLayerNorm takes a bias beside its weight: pass use_weight=True, or "
                             "use_bias=False")
        super().__init__("b s h [d]", "(h d)", eps=eps, affine=use_weight, bias=use_bias, h=num_heads, d=head_dim,
                         device=device, dtype=dtype)
        self.num_heads, self.head_dim, self.num_features = num_heads, head_dim, num_heads * head_dim
        self.force_float32_reductions = force_float32_reductions

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                num_segments: Optional[int] = None, segment_axis: Optional[str] = None) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_call_module(self, x, mask=mask, segment_ids=segment_ids, num_segments=num_segments,
                                   segment_axis=segment_axis)
        batch, sequence, heads, head_dim = x.shape  # (the original's unpacking, and its ValueError on another rank)
        expected = f"{type(self).__name__}({self.num_heads}, {self.head_dim}) takes input of shape (batch, " \
                   f"sequence, {self.num_heads}, {self.head_dim})"
        if heads != self.num_heads:  # (the original's refusals, in its words)
            raise ValueError(f"Expected {self.num_heads} heads, got {heads}, input shape: {x.shape}; {expected}")
        if head_dim != self.head_dim:
            raise ValueError(f"Expected {self.head_dim} head dimension, got {head_dim}, input shape: {x.shape}; "
                             f"{expected}")
        if mask is None and segment_ids is None and self._rounds_as_the_original(x.dtype):
            return multi_head_layer_norm(x, self.weight, self.bias, self.eps, self.force_float32_reductions)
        return super().forward(x, mask, segment_ids, num_segments, segment_axis).reshape(batch, sequence, -1)

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script compiles in its place: the original's forward, on these very
        parameters (no mask, as TorchScript compiles torch.nn's norms without one)."""
        return _ScriptedMultiHeadLayerNorm(self)

    def _rounds_as_the_original(self, dtype: torch.dtype) -> bool:
        """Whether the original's operations round otherwise than the kernels for input of
        ``dtype``: any but float32 (float64 too, where it normalizes in float32), or parameters
        that promote the output."""
        computes_in = torch.float32 if self.force_float32_reductions else dtype
        if dtype not in (torch.float32, torch.float64) or computes_in != dtype:
            return True
        return any(p is not None and torch.promote_types(dtype, p.dtype) != dtype for p in (self.weight, self.bias))


class _ScriptedMultiHeadLayerNorm(nn.Module):
    """:class:`MultiHeadLayerNorm` as TorchScript compiles it: ``xLSTMMultiHeadLayerNorm``'s
    forward, its refusals and :func:`multi_head_layer_norm`, holding the twin's ``weight`` and
    ``bias``."""

    def __init__(self, norm: MultiHeadLayerNorm) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.num_heads, self.head_dim = norm.num_heads, norm.head_dim
        self.eps, self.force_float32_reductions = float(norm.eps), bool(norm.force_float32_reductions)

    def forward(self, x: Tensor) -> Tensor:
        heads, head_dim = x.shape[2], x.shape[3]
        if heads != self.num_heads:
            raise ValueError(f"Expected {self.num_heads} heads, got {heads}, input shape: {x.shape}")
        if head_dim != self.head_dim:
            raise ValueError(f"Expected {self.head_dim} head dimension, got {head_dim}, input shape: {x.shape}")
        return multi_head_layer_norm(x, self.weight, self.bias, self.eps, self.force_float32_reductions)


def multi_head_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                          force_float32_reductions: bool) -> Tensor:
    """transformers' ``xLSTMMultiHeadLayerNorm``, its operations: the layer norm of the last
    axis of ``(batch, sequence, heads, head_dim)`` input (in float32 where
    ``force_float32_reductions``), cast to the input's dtype, the heads merged, then
    ``· weight + bias``.

    >>> multi_head_layer_norm(torch.tensor([[[[1., 3.]]]], dtype=torch.bfloat16), None, None, 0.0, True).tolist()
    [[[-1.0, 1.0]]]
    """
    batch, sequence = x.shape[0], x.shape[1]
    h = x.float() if force_float32_reductions else x
    centered = h - h.mean(dim=-1, keepdim=True)
    y = (centered * torch.rsqrt(h.var(dim=-1, keepdim=True, unbiased=False) + eps)).to(x.dtype)
    y = y.reshape(batch, sequence, -1)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
