"""The drop-in modules: twins of torch.nn's norm layers, and :class:`Norm` for any pattern."""

import inspect
import math
import types
from typing import Mapping, Optional

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import functional as F

from normlab.errors import ParamsError, ShapeError
from normlab.notation import parse_params, parse_pattern
from normlab.plan import merge_sizes
from normlab.torch.compute import (_apply_stats, _average_factor, _batch_norm_forward, _batch_variance,
                                   _channel_shape, _check_batch, _dtypes_refused, _expanded_param, _fast_rows,
                                   _needs_grad, _normalize, _params_misfit, _torch_instance_norm,
                                   _update_instance_running, _update_running)
from normlab.torch.casting import (TransformersEpsName, apply_recipe_scale, check_casting, check_weight_offset,
                                   compute_dtype, rms_norm_recipe)
from normlab.torch.advice import advise
from normlab.torch.masked_modules import masked_forward
from normlab.torch.paths import (_LOW_PRECISION, PLAIN_PARAMETERS, _PathSwitch, _choose_path,
                                 _holds_expanded_weights, _profiler, expanded_weights_refusal, profiled_recipe,
                                 warn_if_fx_quantizing)
from normlab.torch.spec import (_RMS_DEFAULT_EPS, Spec, Unscriptable, affine_parameters, module_buffer,
                                parametrizations_computed, rms_default_eps, torch_layout, elementwise_layout)


def _torch_method(function):
    """torch.nn's forward, as a method named ``_torch_forward``: TorchScript compiles a
    method under its function's name, and ``forward`` is the twin's own."""
    method = types.FunctionType(function.__code__, function.__globals__, "_torch_forward", function.__defaults__,
                                function.__closure__)
    method.__qualname__, method.__annotations__ = function.__qualname__, function.__annotations__
    return method


def _batch_norm_spec() -> Spec:
    return Spec.build("[b] c [...]", "c")


def _refuse_scripted_mask() -> None:
    """Under ``torch.jit.script`` the twins run torch.nn's forward, which has no mask: refuse
    a mask rather than normalize as if every element counted."""
    raise RuntimeError("mask= does not run under torch.jit.script, which compiles torch.nn's forward (no mask): "
                       "call the module eagerly, or use torch.compile or torch.export, which keep mask=")


def _refuse_mask_on_plain_state(module: nn.Module) -> bool:
    """A twin whose running statistic was deleted and set again as a plain tensor (not
    ``register_buffer``) runs torch.nn's forward, which has no mask: raise torch.nn's
    AttributeError where a name is still deleted, and refuse the mask otherwise, rather than
    normalize as if every element counted. Nothing where no state is deleted (a shape torch
    constructs and refuses at forward: its error). True where the one name deleted is the
    counter, ``num_batches_tracked``, still deleted, and torch.nn's forward does not read it in
    this call (only a batch norm's training call that tracks statistics does): the masked
    forward, which does not read it either, computes, as torch.nn's computes."""
    deleted = sorted(module.__dict__.get("_deleted_state", ()))
    if not deleted:
        return False
    reads_counter = module.training and module.track_running_stats and not isinstance(
        module, nn.modules.instancenorm._InstanceNorm)  # (instance norm's forward never reads it)
    if (deleted == ["num_batches_tracked"] and not reads_counter
            and "num_batches_tracked" not in module._buffers and "num_batches_tracked" not in module.__dict__):
        return True
    for name in deleted:
        getattr(module, name)  # (torch.nn's AttributeError, in its words, where one is still deleted)
    raise RuntimeError(
        f"{type(module).__name__}: mask= needs {', '.join(deleted)} registered with the module, but "
        f"{'they were' if len(deleted) > 1 else 'it was'} deleted and set again as a plain tensor, which only "
        f"torch.nn's forward (no mask) reads: register it again (tensor = module.{deleted[0]}; "
        f"del module.{deleted[0]}; module.register_buffer({deleted[0]!r}, tensor)) "
        "or call without mask=")


def _fx_call_module(module: nn.Module, proxy, **kwargs) -> "torch.fx.Proxy":
    """Under ``torch.fx.symbolic_trace``: record the module as one ``call_module`` node, as
    fx does for torch.nn's norms (a leaf; the traced graph then runs it as it is), with the
    keyword arguments given (``mask=``). The root module itself is traced through, as fx
    traces a torch.nn root: torch's forward."""
    path = proxy.tracer.path_of_module(module)
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    if not path:
        root = getattr(module, "_traced_root_forward", None)
        # fx makes the root's optional arguments (mask=None) placeholders: torch.nn's forward
        # has none, and neither has its graph (a mask passed to it is then a TypeError)
        unset = [value.node for value in kwargs.values() if _unset_placeholder(value)]
        if root is None or len(unset) != len(kwargs):
            raise TypeError(f"torch.fx traces {type(module).__name__} inside a model, not as the root module: "
                            "trace a model that holds it, e.g. torch.nn.Sequential(norm)")
        for node in unset:
            proxy.tracer.graph.erase_node(node)
        return root(proxy)
    warn_if_fx_quantizing(module, proxy.tracer, proxy)
    return proxy.tracer.create_proxy("call_module", path, (proxy,), kwargs)


def _unset_placeholder(value) -> bool:
    """An fx placeholder of the root's signature left at its default, None, used by nothing."""
    return (isinstance(value, torch.fx.Proxy) and value.node.op == "placeholder" and value.node.args == (None,)
            and not value.node.users)


class _Twin:
    """Mixin of every torch.nn twin. ``torch.jit.script`` compiles torch's own forward
    (``_torch_forward``, the torch.nn class's); fx records the twin as one leaf call; the
    rest runs ``_normlab_forward``, which itself takes torch's forward where only torch's
    operations can run (see :func:`normlab.torch.paths._needs_torch_ops`) or where the
    input does not fit, so that torch raises its own error in its own words."""

    # the attribute whose value the spec is built from (normalized_shape, num_groups), where
    # there is one: torch.nn reads it on every call, and users set it after construction
    # (structured pruning narrows normalized_shape with the weight), so the twin builds its
    # spec again when it changes; _spec_source is its value at the last build
    _spec_from: Optional[str] = None
    _spec_source = None
    # what torch's profiler lists the kernels' call as, beside torch.nn's aten::layer_norm, ...
    _profile_name = "normlab::normalize"

    @torch.jit.unused
    def _traced_root_forward(self, proxy) -> "torch.fx.Proxy":
        """What fx records for the twin as the root module: torch.nn's forward."""
        return self._torch_forward(proxy)

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask`` (bool, broadcasts to the input): the elements that count toward the
        statistics, and the running ones; every element is normalized."""
        if torch.jit.is_scripting():
            if mask is not None:  # torch.nn's forward, which TorchScript compiles, has no mask
                _refuse_scripted_mask()
            return self._torch_forward(input)
        return self._eager_forward(input, mask)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _fx_call_module(self, input, mask=mask)
        try:  # (no cost on a call that raises nothing)
            if self._spec_from is not None and getattr(self, self._spec_from) != self._spec_source:
                _spec_changed(self)
            if getattr(self, "_spec", 0) is None and not _state_restored(self):
                # a shape torch constructs and refuses at forward, or state deleted: torch's forward, in its words
                if mask is not None and _refuse_mask_on_plain_state(self):
                    return masked_forward(self, input, mask)
                return self._torch_forward(input)
            if "parametrizations" in self._modules:  # (a lookup: most modules have none, and make no call for them)
                stand_in = parametrizations_computed(self)
                if stand_in is not None:  # (each parametrized tensor computed once, as torch.nn's forward does)
                    return stand_in._eager_forward(input, mask)
            if mask is not None:
                return masked_forward(self, input, mask)
            parameters = self._parameters  # (two dict lookups a call; the Python check only past them)
            if ((type(parameters.get("weight")) not in PLAIN_PARAMETERS
                 or type(parameters.get("bias")) not in PLAIN_PARAMETERS) and _holds_expanded_weights(self)):
                return self._torch_forward(input)
            return self._normlab_forward(input)
        except (ValueError, RuntimeError) as error:
            if not torch.compiler.is_compiling():  # (Dynamo sets no exception's args: torch.nn's words alone)
                advise(self, input, error)  # torch.nn's refusal goes on with the shapes and the fix
            raise


    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name in _FORWARD_STATE:
            # torch.nn's forward reads it as an attribute, and raises AttributeError without it
            # (del norm.bias): the twin takes that forward until the name is set again
            self.__dict__.setdefault("_deleted_state", set()).add(name)
            self._spec = None
            self.__dict__.pop("_normlab_fast", None)


# the state torch.nn's norm forwards read as attributes
_FORWARD_STATE = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_AFFINE = frozenset({"weight", "bias"})  # (read as attributes by the twins' own forwards too)


def _state_restored(module) -> bool:
    """Whether every name deleted from the module (see ``_Twin.__delattr__``) is set again
    where the twin reads it (a new Parameter, ``register_buffer``, ``norm.bias = None``, a
    parametrization of ``torch.nn.utils.parametrize``, which deletes the tensor it replaces, a
    weight or bias set as a plain tensor, as ``torch.nn.utils.spectral_norm``'s hook sets the
    weight it deleted, which the twin reads as torch.nn's forward does): the spec is then built
    again, and True where the twin computes. (A running statistic set as a plain tensor keeps
    torch's forward, which updates that tensor.)"""
    deleted = module.__dict__.get("_deleted_state")
    parametrizations = module._modules.get("parametrizations", ())
    if not deleted or any(name not in module._parameters and name not in module._buffers
                          and module.__dict__.get(name, 0) is not None and name not in parametrizations
                          and not (name in _AFFINE and isinstance(module.__dict__.get(name), Tensor))
                          for name in deleted):
        return False
    del module.__dict__["_deleted_state"]
    _spec_changed(module)
    return module._spec is not None


def _spec_changed(module) -> None:
    """The spec built again from the attribute it is built from, set since the last build,
    and the calls planned for the old one dropped (none while state is deleted: see
    ``_Twin.__delattr__``)."""
    module._init_spec()
    module.__dict__.pop("_normlab_fast", None)
    if module.__dict__.get("_deleted_state"):
        module._spec = None


class _BatchNormForward(_Twin):
    """Mixin: the normlab forward for the three BatchNorm ranks (torch checks the rank)."""

    _profile_name = "normlab::batch_norm"

    _torch_forward = _torch_method(nn.modules.batchnorm._BatchNorm.forward)

    def _init_spec(self) -> None:
        self._spec = _batch_norm_spec()

    def _normlab_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on normlab: pattern ``"[b] c [...]"``, per-channel weight.

    >>> m = BatchNorm1d(3)
    >>> y = m(torch.tensor([[4., 3., 2.], [3., 3., 2.], [2., 2., 2.]]))
    >>> [round(v, 4) for v in y[:, 0].tolist()], [round(v, 4) for v in m.running_mean.tolist()]
    ([1.2247, 0.0, -1.2247], [0.3, 0.2667, 0.2])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._init_spec()


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on normlab; channels_last input stays channels_last.

    >>> x = torch.randn(4, 3, 5, 5)
    >>> torch.allclose(BatchNorm2d(3)(x), torch.nn.BatchNorm2d(3)(x), atol=1e-5)
    True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._init_spec()


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on normlab.

    >>> BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._init_spec()


def _trailing_fits(x: Tensor, normalized_shape: tuple[int, ...]) -> bool:
    rank = len(normalized_shape)
    return x.dim() >= rank and tuple(x.shape[x.dim() - rank:]) == tuple(normalized_shape)


class LayerNorm(_Twin, nn.LayerNorm):
    """``torch.nn.LayerNorm`` on normlab: pattern ``"... [n0 n1 ...]"`` over the trailing
    ``normalized_shape``, elementwise weight and bias.

    >>> [round(v, 4) for v in LayerNorm(3)(torch.tensor([[4., 3., 2.]]))[0].tolist()]
    [1.2247, 0.0, -1.2247]
    """

    _profile_name = "normlab::layer_norm"

    _torch_forward = _torch_method(nn.LayerNorm.forward)
    _spec_from = "normalized_shape"

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._init_spec()

    def _init_spec(self) -> None:
        self._spec = _trailing_spec(self.normalized_shape, rms=False)
        self._spec_source = self.normalized_shape

    def _normlab_forward(self, input: Tensor) -> Tensor:
        y = _fast_rows(self, input, self.eps)
        if y is not None:
            return y
        path = _choose_path(input, has_native=True)
        if (path == "native" or not _trailing_fits(input, self.normalized_shape)
                or _params_misfit(self, tuple(self.normalized_shape))
                or _dtypes_refused(input, self.weight, self.bias)):
            return nn.LayerNorm.forward(self, input)
        return _normalize(torch_layout(input), self.weight, self.bias, self._spec, self.eps, path, self)[0]


def _trailing_spec(normalized_shape, rms: bool) -> Optional[Spec]:
    """The spec of a norm over the trailing ``normalized_shape``; None for an empty one,
    which torch.nn constructs and refuses at forward ("Expected normalized_shape to be at
    least 1-dimensional")."""
    if len(normalized_shape) == 0:
        return None
    names = [f"n{i}" for i in range(len(normalized_shape))]
    # a zero size (torch takes it; only empty inputs fit) is left for the plan to read off the input
    return Spec.build("... [" + " ".join(names) + "]", " ".join(names), rms,
                      **{name: int(size) for name, size in zip(names, normalized_shape) if size})


class RMSNorm(TransformersEpsName, _Twin, nn.RMSNorm):
    """``torch.nn.RMSNorm`` on normlab: ``y = x / sqrt(mean(x²) + eps) · weight`` over the
    trailing ``normalized_shape``; ``eps=None`` is torch's: the machine epsilon of the dtype it computes in
    (float32's for bfloat16 and float16 input).

    ``casting`` picks where low-precision input rounds, as a model family does it
    (:mod:`normlab.torch.casting`): ``None`` is torch.nn.RMSNorm's own, ``"llama"`` casts
    before the weight, ``"gemma"`` after it, ``"t5"`` to the weight's dtype, ``"none"``
    computes in the input's dtype, ``"input_dtype"`` too with the weight cast to it, ``"imagegpt"`` too, dividing by the root, ``"mochi"`` is
    ``"gemma"`` with the input itself scaled, as ``"t5"``'s, ``"gemma3n"`` is ``"gemma"`` with the
    root's reciprocal taken by ``pow``. ``weight_offset`` multiplies by ``(weight_offset + weight)``,
    Gemma's ``1 + weight`` with ``weight_offset=1.0`` (the weight then starts at zeros).
    A recipe runs as the model family's own torch operations, so a converted
    ``LlamaRMSNorm`` gives its numbers to the bit in every dtype; under
    ``use_path("kernel")`` it runs on the kernels instead (statistics in float64: several
    times faster on CPU, and within one rounding in x's dtype of the family's numbers;
    ``"none"``, ``"input_dtype"`` and ``"imagegpt"``, which round every step in x's dtype, up to 3 of its
    units away).

    >>> [round(v, 4) for v in RMSNorm(2, eps=0.0)(torch.tensor([[3., 4.]]))[0].tolist()]
    [0.8485, 1.1314]
    >>> gemma = RMSNorm(2, eps=1e-6, casting="gemma", weight_offset=1.0)
    >>> gemma.weight.tolist(), gemma(torch.tensor([[3., 4.]], dtype=torch.bfloat16)).tolist()
    ([0.0, 0.0], [[0.84765625, 1.1328125]])
    """

    _profile_name = "normlab::rms_norm"

    _torch_forward = _torch_method(nn.RMSNorm.forward)
    _spec_from = "normalized_shape"

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, casting: Optional[str] = None, weight_offset: float = 0.0) -> None:
        self.casting = check_casting(casting)
        self.weight_offset = check_weight_offset(weight_offset)
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self._init_spec()

    def _init_spec(self) -> None:
        self._spec = _trailing_spec(self.normalized_shape, rms=True)
        self._spec_source = self.normalized_shape
        self.__dict__.setdefault("casting", None)  # a converted torch.nn.RMSNorm: torch's semantics
        self.__dict__.setdefault("weight_offset", 0.0)

    def reset_parameters(self) -> None:
        if self.elementwise_affine:  # so that offset + weight starts at 1
            nn.init.constant_(self.weight, 1.0 - getattr(self, "weight_offset", 0.0))

    def extra_repr(self) -> str:
        recipe = getattr(self, "casting", None)
        offset = getattr(self, "weight_offset", 0.0)
        return (super().extra_repr() + (f", casting={recipe!r}" if recipe is not None else "")
                + (f", weight_offset={offset}" if offset else ""))

    def __prepare_scriptable__(self):
        if getattr(self, "casting", None) is None and getattr(self, "weight_offset", 0.0):
            raise RuntimeError("torch.jit.script compiles an RMSNorm's casting recipe, or without one torch.nn.RMSNorm's "
                               "forward, which has no weight_offset; give this module a casting recipe (Gemma's: "
                               "casting='gemma'), or use torch.jit.trace, torch.export or torch.compile")
        self.__dict__.setdefault("casting", None)  # (absent on modules pickled before it existed)
        self.__dict__.setdefault("weight_offset", 0.0)
        return self

    @torch.jit.unused
    def _traced_root_forward(self, proxy) -> "torch.fx.Proxy":
        casting, offset = getattr(self, "casting", None), getattr(self, "weight_offset", 0.0)
        if casting in _ROOT_TRACED_CASTINGS and self.eps is not None:
            # the recipe's operations, as fx traces the family's class (StableAudio3RMSNorm's)
            return rms_norm_recipe(proxy, self.weight, self.eps, casting, offset, len(self.normalized_shape))
        if casting is not None or offset:
            raise TypeError("torch.fx traces an RMSNorm with a casting recipe or weight_offset inside a model, not as "
                            "the root module (torch.nn.RMSNorm's forward, which fx traces for a root, has neither; "
                            f"as the root, fx traces the recipes {', '.join(map(repr, _ROOT_TRACED_CASTINGS))} with "
                            "an eps, whose operations hold no branch on the input's dtype): trace a model that holds "
                            "it, e.g. torch.nn.Sequential(norm)")
        return self._torch_forward(proxy)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:  # torch.nn.RMSNorm names its input x
        if torch.jit.is_scripting():
            return self._scripted_forward(x, mask)
        return self._eager_forward(x, mask)

    def _scripted_forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """What TorchScript compiles for :meth:`forward` (here and in the subclasses that add to
        it: TorchScript has no ``super()``): the recipe's operations, or torch.nn.RMSNorm's."""
        if mask is not None:
            _refuse_scripted_mask()
        casting = self.casting
        if casting is not None:  # the family's operations, as TorchScript compiles LlamaRMSNorm's
            eps = self.eps
            if eps is None:  # (torch.nn.RMSNorm's: the machine epsilon of the dtype it computes in)
                eps = 2.0 ** -52 if x.dtype == torch.float64 else 2.0 ** -23  # (torch.finfo does not script)
            return rms_norm_recipe(x, self.weight, eps, casting, self.weight_offset, len(self.normalized_shape))
        return self._torch_forward(x)

    def _normlab_forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):  # (a list, an array: torch.nn's TypeError, in its words)
            return self._torch_forward(x)
        casting = getattr(self, "casting", None)  # absent on modules pickled before it existed
        offset = getattr(self, "weight_offset", 0.0)
        eps = self.eps if self.eps is not None else _RMS_DEFAULT_EPS.get(x.dtype)  # (torch.finfo costs a microsecond)
        if casting is not None and eps is not None and _PathSwitch.path != "kernel":
            # a casting recipe runs its model family's torch operations on every path but the
            # forced kernels (which round differently; below): straight after torch's shape
            # checks, with no more Python than the family's own class (a decoding step's token)
            if torch.jit.is_tracing() or (_trailing_fits(x, self.normalized_shape)
                                          and not _params_misfit(self, tuple(self.normalized_shape))):
                if not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
                    return profiled_recipe(self, rms_norm_recipe, x, self.weight, eps, casting, offset,
                                           len(self.normalized_shape))
                return rms_norm_recipe(x, self.weight, eps, casting, offset, len(self.normalized_shape))
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not x.requires_grad and casting is None
                and not offset and self.weight is not None and self.weight.requires_grad
                and not torch.jit.is_tracing()):  # (the TorchScript ONNX exporter needs the path below)
            # only the weight needs its gradient: torch's operations save x·rstd, not x or the
            # weight, so x and the weight may change in place before backward (an inference
            # tensor x, made in inference_mode, cannot be saved at all); the kernels' autograd
            # saves both, and would raise
            return nn.RMSNorm.forward(self, x)
        if casting is None and not offset and eps is not None:
            y = _fast_rows(self, x, eps, with_bias=False)  # (a shape that does not fit: None)
            if y is not None:
                return y
        if not torch.jit.is_tracing() and (not _trailing_fits(x, self.normalized_shape)
                                           or _params_misfit(self, tuple(self.normalized_shape))):
            if (casting is not None or offset) and _follows_pruned_weight(self):
                return self._normlab_forward(x)  # (once: normalized_shape is now the weight's)
            # torch raises its own error (under torch.jit.trace sizes are traced tensors, which
            # these checks would turn into Python bools, with a TracerWarning each)
            return nn.RMSNorm.forward(self, x)
        if eps is None:  # (a dtype without a table entry)
            if not x.is_floating_point():  # (integers have no machine epsilon): torch's forward, and its error
                return nn.RMSNorm.forward(self, x)
            eps = rms_default_eps(x.dtype)
        path = _choose_path(x, has_native=True)
        if path == "native" and torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
            path = "composite"  # the TorchScript ONNX exporter has no aten::rms_norm: plain ONNX ops
        if casting is not None:
            if not (path == "kernel" and _PathSwitch.path == "kernel"):  # the kernels round differently
                if not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
                    return profiled_recipe(self, rms_norm_recipe, x, self.weight, eps, casting, offset,
                                           len(self.normalized_shape))
                return rms_norm_recipe(x, self.weight, eps, casting, offset, len(self.normalized_shape))
            upcast = x.to(compute_dtype(x.dtype))
            normalized = _normalize(upcast, None, None, self._spec, eps, path, self)[0]
            return apply_recipe_scale(x, normalized, self.weight, casting, offset)
        if path == "native" and not offset:
            return nn.RMSNorm.forward(self, x)
        weight = self.weight if self.weight is None or not offset else offset + self.weight
        if path == "native":
            return F.rms_norm(x, self.normalized_shape, weight, eps)
        return _normalize(torch_layout(x, keeps_channels_last=True), weight, None, self._spec, eps, path, self)[0]


# the casting recipes whose torch operations hold no branch on the input's dtype (the others
# pick float32 or float64 from it), so that fx traces them for an RMSNorm as the root module
_ROOT_TRACED_CASTINGS = ("input_dtype", "none", "imagegpt")


def _follows_pruned_weight(module: RMSNorm) -> bool:
    """A model family's RMS norm (a casting recipe or weight offset: transformers'
    ``LlamaRMSNorm``, ``GemmaRMSNorm``, ``T5LayerNorm``, ... converted) has no
    ``normalized_shape``: its forward multiplies by its weight, whatever the weight's width,
    and structured pruning narrows that weight alone. Where the 1-D weight's width differs
    from ``normalized_shape``, it becomes ``normalized_shape`` (and the spec is built
    again), so the twin computes as the original does; True where it did."""
    weight = module.weight
    if not (isinstance(weight, Tensor) and weight.dim() == 1 and len(module.normalized_shape) == 1
            and (weight.shape[0],) != tuple(module.normalized_shape)):
        return False
    module.normalized_shape = (weight.shape[0],)
    _spec_changed(module)
    return True


class _ChannelsFirstForward:
    """Mixin: layer norm over the channels of ``(N, C, H, W)`` input, pattern ``"b [c] h w"``
    with ``params="c"``, no permutes; reads ``normalized_shape``, ``weight``, ``bias`` and ``eps``."""

    _spec_source = None  # (the normalized_shape of the spec's last build)
    # whether the output is channels_last for any input, as the originals' permutes around
    # torch's layer norm make it (LayerNorm2d), or laid out as the input (VitDet's, elementwise)
    _channels_last_output = False
    _profile_name = "normlab::layer_norm"

    def _init_spec(self) -> None:
        self._spec = Spec.build("b [c] h w", "c", c=int(self.normalized_shape[0]))
        self._spec_source = self.normalized_shape  # (set after construction: see _Twin._spec_from)

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask`` (bool, broadcasts to the input): the elements that count toward each
        position's statistics over the channels; every element is normalized."""
        if torch.jit.is_scripting():  # what the originals compute (TorchScript cannot call the kernels)
            if mask is not None:
                _refuse_scripted_mask()
            return self._torch_forward(input)
        return self._eager_forward(input, mask)

    def _torch_forward(self, input: Tensor) -> Tensor:
        """What the originals compute, their permutes and torch's layer norm: what TorchScript
        compiles and fx records for it as the root module."""
        return F.layer_norm(input.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)

    @torch.jit.unused
    def _traced_root_forward(self, proxy) -> "torch.fx.Proxy":
        return self._torch_forward(proxy)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, mask: Optional[Tensor]) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _fx_call_module(self, input, mask=mask)
        if self.normalized_shape != self._spec_source:
            _spec_changed(self)
        stand_in = parametrizations_computed(self)
        if stand_in is not None:
            return stand_in._eager_forward(input, mask)
        if mask is not None:
            return masked_forward(self, input, mask)
        parameters = self._parameters
        if ((type(parameters.get("weight")) not in PLAIN_PARAMETERS
             or type(parameters.get("bias")) not in PLAIN_PARAMETERS) and _holds_expanded_weights(self)):
            return self._torch_forward(input)
        channels = self.normalized_shape[0]
        # (under torch.jit.trace sizes are traced tensors, which a check would turn into bools with
        # a TracerWarning each; the originals' permute and layer norm, taken there, check them)
        if input.dim() != 4 or (not torch.jit.is_tracing() and input.shape[1] != channels):
            raise RuntimeError(f"{type(self).__name__}({channels}) expects input of shape (N, {channels}, H, W), "
                               f"got {tuple(input.shape)}")
        path = _choose_path(input, has_native=True)
        if path == "native" or _dtypes_refused(input, self.weight, self.bias):  # what the originals do (or raise)
            y = self._torch_forward(input)
            return y if self._channels_last_output else elementwise_layout(y, input)  # (see below)
        if self._channels_last_output:
            # the originals normalize the channels-last permute and permute back: their output is
            # channels_last whatever the input's layout, and so is this one (a contiguous input is
            # copied, as torch's layer norm copies their permuted view), so that a view of theirs
            # (y.permute(0, 2, 3, 1).view(N, H * W, C)) works on this one too. Under jacfwd (forward
            # AD inside vmap, on the composite) a vmapped tensor takes no memory format: torch's
            # ops lay out their output there, as in spec.torch_layout
            if path == "composite" and torch._C._are_functorch_transforms_active():
                return _normalize(input, self.weight, self.bias, self._spec, self.eps, path, self)[0]
            return _normalize(input.contiguous(memory_format=torch.channels_last), self.weight, self.bias, self._spec,
                              self.eps, path, self)[0]
        if input.is_contiguous():  # (first: the common call, which torch_layout would ask again)
            return _normalize(input, self.weight, self.bias, self._spec, self.eps, path, self)[0]
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return _normalize(torch_layout(input, keeps_channels_last=True), self.weight, self.bias, self._spec,
                              self.eps, path, self)[0]
        # the originals' elementwise operations keep a permuted input's order of strides (a slice's
        # too, densely): so does this output, so that a view of theirs works on this one
        x = elementwise_layout(input, input)
        return elementwise_layout(_normalize(x, self.weight, self.bias, self._spec, self.eps, path, self)[0], input)


class LayerNorm2d(_ChannelsFirstForward, nn.LayerNorm):
    """Layer norm over the channels of ``(N, C, H, W)`` input, ConvNeXt's ``LayerNorm2d``
    (torchvision's and timm's, which permute to channels-last, call ``F.layer_norm`` and
    permute back): pattern ``"b [c] h w"`` with ``params="c"``, no permutes. Its
    ``state_dict`` holds ``weight`` and ``bias`` of shape ``(C,)``, as theirs does.

    >>> x = torch.randn(2, 3, 4, 4)
    >>> expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (3,), eps=1e-6).permute(0, 3, 1, 2)
    >>> torch.allclose(LayerNorm2d(3)(x), expected, atol=1e-5)
    True
    """

    _channels_last_output = True

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, *, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, bias=bias, device=device, dtype=dtype)
        self._init_spec()


class ChannelsFirstLayerNorm(_ChannelsFirstForward, nn.Module):
    """:class:`LayerNorm2d`'s computation in a module that is no ``nn.LayerNorm``: what
    :func:`~normlab.torch.convert` makes of channels-first layer norms that are none
    (VitDet's ``VitDetLayerNorm``), so that code choosing layers by ``isinstance`` treats
    the converted model as the original (transformers' Trainer keeps weight decay off
    ``nn.LayerNorm`` parameters, and decays VitDet's). Its output is laid out as theirs, a
    mean and elementwise operations, lay it out: in the input's order of strides (a
    transposed input gives a transposed output), where LayerNorm2d's is channels_last.

    >>> x, norm = torch.randn(2, 3, 4, 4), ChannelsFirstLayerNorm(3)
    >>> isinstance(norm, torch.nn.LayerNorm), torch.equal(norm(x), LayerNorm2d(3)(x))
    (False, True)
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        self.eps, self.normalized_shape = eps, (num_channels,)
        self._init_spec()

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}"


class GroupNorm(_Twin, nn.GroupNorm):
    """``torch.nn.GroupNorm`` on normlab: pattern ``"b (g [c]) [...]"`` with
    ``g=num_groups``, per-channel weight (``params="(g c)"``).

    >>> x = torch.arange(8.).reshape(1, 4, 2)
    >>> [round(v, 4) for v in GroupNorm(2, 4)(x)[0, :2].flatten().tolist()]
    [-1.3416, -0.4472, 0.4472, 1.3416]
    """

    _profile_name = "normlab::group_norm"

    _torch_forward = _torch_method(nn.GroupNorm.forward)
    _spec_from = "num_groups"

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._init_spec()

    def _init_spec(self) -> None:
        # (None where groups set after construction do not divide the channels: torch.nn's
        # forward raises its error)
        fits = self.num_groups > 0 and self.num_channels % self.num_groups == 0
        self._spec = Spec.build("b (g [c]) [...]", "(g c)", g=self.num_groups) if fits else None
        self._spec_source = self.num_groups

    def _normlab_forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # torch's forward, as the path below would take, without checks on traced sizes
            return nn.GroupNorm.forward(self, input)
        if input.numel() == self.num_groups:  # one value in all: torch raises its ValueError, as for batch norm
            return nn.GroupNorm.forward(self, input)
        if self.num_channels % self.num_groups:  # (channels pruned since the spec was built): torch's error
            return nn.GroupNorm.forward(self, input)
        if input.dim() >= 2 and input.shape[1] == self.num_channels:
            y = _fast_rows(self, input, self.eps)  # (None for parameters of another shape, which it checks)
            if y is not None:
                return y
        path = _choose_path(input, has_native=True)
        if (path == "native" or input.dim() < 2 or input.shape[1] != self.num_channels or 0 in input.shape[1:]
                or _params_misfit(self, (self.num_channels,)) or _dtypes_refused(input, self.weight, self.bias)):
            # (no channels or no positions, on a forced path too: torch 2.14 refuses them, where
            # 2.13 gives an empty output; torch's op says which)
            return nn.GroupNorm.forward(self, input)
        return _normalize(torch_layout(input, keeps_channels_last=True), self.weight, self.bias, self._spec, self.eps,
                          path, self)[0]


class _InstanceNormForward(_Twin):
    """Mixin: the normlab forward for the three InstanceNorm ranks: pattern ``"b c [...]"``;
    running statistics average the per-instance ones over the batch, as torch does."""

    _profile_name = "normlab::instance_norm"

    _torch_forward = _torch_method(nn.modules.instancenorm._InstanceNorm.forward)

    def _init_spec(self) -> None:
        self._spec = Spec.build("b c [...]", "c")

    def _normlab_forward(self, input: Tensor) -> Tensor:
        path = _choose_path(input, has_native=True)
        self._check_input_dim(input)
        unbatched = input.dim() == self._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        use_input_stats = self.training or not self.track_running_stats
        weight, bias = affine_parameters(self)
        running_mean, running_var = module_buffer(self, "running_mean"), module_buffer(self, "running_var")
        if (path == "native" or x.shape[1] != self.num_features
                or _params_misfit(self, (self.num_features,), weight, bias)
                or _dtypes_refused(x, weight, bias, running_mean, running_var)
                or (running_mean is None) != (running_var is None) or (running_mean is None and not use_input_stats)
                or not 0.0 < self.eps < math.inf
                or (not torch.compiler.is_compiling() and x.is_inference() and _needs_grad(x, weight, bias))
                or _needs_grad(running_mean, running_var)):
            # (torch refuses half a pair of running statistics, evaluation on ones set to None, and
            # ones that require grad, as functional_call may hand them in; with eps <= 0 its op
            # gives a constant channel zeros, where rsqrt(0) would give NaN;
            # an inference tensor where autograd records the call: torch's op saves it and raises,
            # in evaluation too, where the composite below saves only x - mean)
            return _torch_instance_norm(self, input)
        x = torch_layout(x)  # (torch.nn's output is contiguous)
        batch, channels = x.shape[:2]
        if _needs_grad(weight, bias):
            # torch's instance norm reads the parameters through weight.repeat(batch), and
            # autograd saves that copy: a change of the parameters in place between forward
            # and backward (a GAN's discriminator step before the generator's backward through
            # it) is allowed there, the backward using the values of the forward
            weight, bias = (None if t is None else t.clone() for t in (weight, bias))
        if use_input_stats:
            count = math.prod(x.shape[2:])
            if count == 1:  # torch raises its error, in its words (one spatial element: a larger batch won't help)
                return nn.modules.instancenorm._InstanceNorm.forward(self, input)
            y, mean, rstd = _normalize(x, weight, bias, self._spec, self.eps, path, self)
            if running_mean is not None:  # torch updates them whenever it uses the instances' statistics,
                # in evaluation too where track_running_stats was turned off after construction
                factor = 0.0 if self.momentum is None else self.momentum
                if forward_ad._current_level >= 0:
                    # forward-mode AD (dual tensors, torch.func.jvp and jacfwd): torch's op updates them
                    # from the primal values, as torch.nn does; the statistics above carry tangents, which
                    # a buffer must not take (torch.func.jvp refuses to copy them into one)
                    with torch.no_grad():
                        F.instance_norm(x, running_mean, running_var, None, None, True, factor, self.eps)
                else:
                    var = _batch_variance(x, self._spec, rstd, self.eps)
                    _update_instance_running(self, mean.reshape(batch, channels), var.reshape(batch, channels),
                                             count, factor)
        else:
            y = _apply_stats(x, running_mean, running_var, weight, bias, self.eps, _channel_shape(x))
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` on normlab (``affine`` and ``track_running_stats`` off by default).

    >>> [round(v, 4) for v in InstanceNorm1d(2)(torch.tensor([[[1., 4., 7.], [0., 2., 4.]]]))[0, 0].tolist()]
    [-1.2247, 0.0, 1.2247]
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._init_spec()


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` on normlab.

    >>> InstanceNorm2d(3, affine=True)(torch.randn(2, 3, 4, 4)).shape
    torch.Size([2, 3, 4, 4])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._init_spec()


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` on normlab.

    >>> InstanceNorm3d(1)(torch.randn(1, 1, 2, 2, 2)).shape
    torch.Size([1, 1, 2, 2, 2])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._init_spec()


class PatternShapeError(ShapeError, RuntimeError):
    """An input that does not fit a :class:`Norm`'s pattern: normlab's :class:`ShapeError`
    (a ``ValueError``) that is also a ``RuntimeError``, as torch's shape errors are, so
    either ``except`` catches it."""


class Norm(Unscriptable, nn.Module):
    """Any normalization, written as a pattern, with optional affine parameters and
    running statistics.

    ``params`` names the axes ``weight`` and ``bias`` span; their sizes must be given
    (``c=64``, or ``sizes={"eps": 64}`` for an axis named like an argument of this
    class). With ``track_running_stats=True`` the running statistics span
    ``running_axes`` (default: the kept axes that ``params`` names), averaged over the
    other kept axes; in evaluation they normalize, as batch norm does. ``rms=True`` has a
    weight and no bias, as RMSNorm, and keeps the batch's mean square as ``running_var``
    (no mean is estimated, so no ``n/(n − 1)``). Momentum follows
    torch (see the module docstring). A bad pattern fails here, not in the first forward.

    Channels-last batch norm and a group norm with per-group parameters:

    >>> x = torch.randn(4, 5, 5, 8)
    >>> bn = Norm("[b h w] c", params="c", c=8, track_running_stats=True)
    >>> y = bn(x); bn.running_mean.shape, float(y.detach().mean(dim=(0, 1, 2)).abs().max()) < 1e-5
    (torch.Size([8]), True)
    >>> Norm("b (g [c]) [h w]", params="g", g=2)(torch.randn(2, 4, 3, 3)).shape
    torch.Size([2, 4, 3, 3])
    >>> Norm("b [c", params="c")
    Traceback (most recent call last):
    ...
    normlab.errors.PatternSyntaxError: ...
    """

    def __init__(self, pattern: str, params: Optional[str] = None, *, eps: float = 1e-5, rms: bool = False,
                 affine: bool = True, bias: bool = True, momentum: Optional[float] = 0.1,
                 track_running_stats: bool = False, running_axes: Optional[str] = None,
                 device=None, dtype=None, sizes: Optional[Mapping[str, int]] = None, **axis_sizes: int):
        super().__init__()
        sizes = merge_sizes(pattern, sizes, axis_sizes)
        self._spec = Spec.build(pattern, params, rms, **sizes)
        parsed = parse_pattern(pattern)
        self.pattern, self.params, self.sizes = pattern, params, dict(sizes)
        self.eps, self.rms, self.momentum = eps, rms, momentum
        self.affine = affine and params is not None
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        param_shape = self._shape_of(parse_params(params) if params is not None else (), sizes, "params")
        if self.affine:
            self.weight = nn.Parameter(torch.empty(param_shape, **factory))
            if bias and not rms:
                self.bias = nn.Parameter(torch.empty(param_shape, **factory))
            else:  # (registered as None, as torch.nn's norms do; assigning None first makes a plain attribute)
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        kept = [a.name for d in parsed.dims if not d.is_ellipsis for a in d.factors if not a.reduced]
        if running_axes is None:
            named = {n for item in (parse_params(params) if params else ()) for n in item}
            running_names = [n for n in kept if n in named]
        else:
            running_names = running_axes.split()
            wrong = [n for n in running_names if n not in kept]
            if wrong:
                raise ParamsError(f"running_axes {running_axes!r} names {', '.join(wrong)}, which pattern "
                                  f"{pattern!r} does not keep; name kept (unbracketed) axes: {', '.join(kept)}")
        self._running_names = tuple(n for n in kept if n in running_names)  # in pattern order
        if track_running_stats:
            shape = self._shape_of(tuple((n,) for n in self._running_names), sizes, "running_axes")
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _shape_of(self, items, sizes: dict, what: str) -> tuple[int, ...]:
        missing = [n for item in items for n in item if n not in sizes]
        if missing:
            raise ShapeError(f"pattern {self.pattern!r}: the {what} axes need their sizes at construction; "
                             f"pass {', '.join(f'{n}=...' for n in missing)}")
        return tuple(math.prod(sizes[n] for n in item) for item in items)

    # torch.nn's batch norms' state-dict version: version 2 added num_batches_tracked, so a
    # checkpoint of an earlier version (or none) loads with 0 batches counted, as into theirs
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        version, key = local_metadata.get("version"), prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            tracked = self.num_batches_tracked
            state_dict[key] = (tracked if tracked is not None and tracked.device.type != "meta"
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        named = all(k.isidentifier() and k not in _NORM_ARGUMENTS for k in self.sizes)
        sizes = "".join(f", {k}={v}" for k, v in self.sizes.items()) if named else f", sizes={self.sizes!r}"
        return (f"{self.pattern!r}, params={self.params!r}{sizes}, eps={self.eps}, rms={self.rms}, "
                f"affine={self.affine}, momentum={self.momentum}, track_running_stats={self.track_running_stats}")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                num_segments: Optional[int] = None, segment_axis: Optional[str] = None) -> Tensor:
        """``mask`` (bool, broadcasts to x): the elements that count toward the statistics;
        ``segment_ids`` split groups along ``segment_axis`` as :func:`normlab.normalize` does."""
        if isinstance(x, torch.fx.Proxy):
            return _fx_call_module(self, x, mask=mask, segment_ids=segment_ids, num_segments=num_segments,
                                   segment_axis=segment_axis)
        if mask is not None or segment_ids is not None:
            return masked_forward(self, x, mask, segment_ids, num_segments, segment_axis)
        try:
            if not self.track_running_stats:  # row patterns without running statistics: the cached kernel calls
                y = _fast_rows(self, x, self.eps)
                if y is not None:
                    return y
            try:
                plan = self._spec.plan(x.shape)
            except ShapeError as error:
                raise PatternShapeError(str(error)) from None
            path = _choose_path(x, has_native=False)
            factor = _average_factor(self) if self.track_running_stats else 0.0
            running_shape = tuple(s if n in self._running_names else 1 for n, s in zip(plan.axis_names, plan.axis_sizes))
            if self.training or not self.track_running_stats:
                if self.training and self.track_running_stats:
                    _check_batch(x, plan.group_size)
                y, mean, rstd = _normalize(x, self.weight, self.bias, self._spec, self.eps, path, self)
                if self.training and self.track_running_stats:
                    # average over the kept axes the running statistics do not span
                    other = tuple(i for i, (n, r) in enumerate(zip(plan.axis_names, plan.reduced))
                                  if not r and n not in self._running_names)
                    var = _batch_variance(x, self._spec, rstd, self.eps)
                    if other:
                        mean, var = mean.mean(dim=other, keepdim=True), var.mean(dim=other, keepdim=True)
                    n = plan.group_size
                    _update_running(self, mean.reshape(self.running_mean.shape), var.reshape(self.running_var.shape),
                                    n, factor, centered=not self.rms)
                return y
            # evaluation with running statistics: one scale and shift on the expanded view
            view = x.reshape(plan.axis_sizes)
            mean = self.running_mean.reshape(running_shape)
            var = self.running_var.reshape(running_shape)
            weight = _expanded_param(self.weight, plan)
            bias = _expanded_param(self.bias, plan)
            compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
            y = (view.to(compute) - mean.to(compute)) * torch.rsqrt(var.to(compute) + self.eps)
            if weight is not None:
                y = y * weight.to(compute)
            if bias is not None:
                y = y + bias.to(compute)
            return y.reshape(x.shape).to(x.dtype)
        except RuntimeError:
            if _holds_expanded_weights(self):
                raise expanded_weights_refusal(self) from None
            raise


# Norm's own arguments: axes named so are sized through sizes= (in its repr too)
_NORM_ARGUMENTS = frozenset(inspect.signature(Norm.__init__).parameters)
