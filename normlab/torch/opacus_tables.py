"""Opacus (differentially private training) on converted models. Its ``ModuleValidator``
finds a module's validator and fixer by exact type, so each of its entries that names a
torch.nn norm gains one naming normlab's twin: ``validate`` flags a batch norm twin, whose
outputs mix the samples of a batch (per-sample gradients, and so the privacy accounting,
would be wrong), and ``fix`` replaces it as it replaces torch.nn's (by ``GroupNorm``); an
instance norm twin with running statistics is flagged and fixed as torch.nn's is. A
:class:`~normlab.torch.Norm` whose statistics span its first axis (the batch, as Opacus
reads inputs by default) is flagged too; Opacus has no replacement for a pattern.

The other modules with parameters get a grad sampler (:func:`per_sample_gradients`),
where Opacus would take its fallback for a layer it does not know: that recomputes the
layer from its first input alone, which gives the weights of the blocks that take a
second one (the residual of :class:`~normlab.torch.FusedAddRMSNorm` and
:class:`~normlab.torch.FusedAddLayerNorm`, the gate of :class:`~normlab.torch.GatedRMSNorm`)
wrong per-sample gradients, and prepares the layer when the hooks are added, so that a
model converted after ``make_private`` (its twins keep Opacus' hooks) failed at the first
backward.

Opacus' forward hook records a layer's positional inputs alone (each must be a tensor), and
reads the batch size off the last: on these modules it is registered as a hook that sees the
keyword inputs too (:func:`_with_every_input`), so that a residual, gate, mask or segment ids
passed by keyword (or segment ids after ``mask=None``) reach the grad sampler. Opacus'
functorch mode (``grad_sample_mode="functorch"``) recomputes every layer from its first input
alone: these modules' hook gives it the grad sampler's computation instead.

Opacus may be imported before normlab.torch or after it (a model built and converted
first): the tables are filled at once where it is imported, and otherwise when it is,
by a finder on ``sys.meta_path`` that waits for the ``opacus`` package and then leaves.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

from normlab.notation import parse_pattern
from normlab.torch.fused import FusedAddLayerNorm, FusedAddRMSNorm, GatedRMSNorm
from normlab.torch.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, ChannelsFirstLayerNorm, GroupNorm,
                                   InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, LayerNorm2d, Norm, RMSNorm)
from normlab.torch.recipe_norms import (BiasedRMSNorm, Float32LayerNorm, Float32LayerNorm2d, GammaRMSNorm,
                                        MultiHeadLayerNorm, PerFrameGroupNorm, PerHeadLayerNorm, RecipeLayerNorm, RMSNorm2d,
                                        WrittenOutLayerNorm)
from normlab.torch.sync import SyncBatchNorm

_OPACUS = "opacus"  # the package, whose import fills the tables (validators and grad samplers)
_TORCH_CLASSES = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d,
                  SyncBatchNorm: nn.SyncBatchNorm, InstanceNorm1d: nn.InstanceNorm1d,
                  InstanceNorm2d: nn.InstanceNorm2d, InstanceNorm3d: nn.InstanceNorm3d}
# normlab's modules with parameters of their own that keep each sample apart (the batch norm
# twins do not, and are flagged): each gets :func:`per_sample_gradients`
_SAMPLED = (LayerNorm, GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, RMSNorm, LayerNorm2d,
            ChannelsFirstLayerNorm, Float32LayerNorm, Float32LayerNorm2d, WrittenOutLayerNorm, RecipeLayerNorm, Norm,
            FusedAddRMSNorm, FusedAddLayerNorm, GatedRMSNorm, BiasedRMSNorm, GammaRMSNorm, RMSNorm2d, PerHeadLayerNorm,
            PerFrameGroupNorm, MultiHeadLayerNorm)


def spans_first_axis(pattern: str) -> bool:
    """True where the pattern's statistics span its first axis: elements that differ only
    there share a mean and a variance.

    >>> spans_first_axis("[b h w] c"), spans_first_axis("b (g [c]) [h w]"), spans_first_axis("[...] c")
    (True, False, True)
    """
    return any(axis.reduced for axis in parse_pattern(pattern).dims[0].factors)


def _as_torch_class(function, torch_class):
    """``function`` of Opacus' tables handed a twin as an object of ``torch_class``, sharing
    its state: SyncBatchNorm's twin subclasses torch's ``_BatchNorm``, not
    ``nn.SyncBatchNorm``, which the fixer tells apart by ``isinstance``."""

    def seen_as_torch_class(module, **kwargs):
        original = torch_class.__new__(torch_class)
        original.__dict__.update(module.__dict__)
        return function(original, **kwargs)

    return seen_as_torch_class


class _Unhooked(nn.Module):
    """Calls a module's forward past its hooks (Opacus' own would fire inside a grad sampler)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs, **keyword_inputs):
        return self.module.forward(*inputs, **keyword_inputs)


@dataclass(frozen=True)
class RecordedCall:
    """A call of a normlab module as Opacus' hooks saw it, kept on the module beside Opacus'
    record of its first input (see :func:`_with_every_input`): the forward's arguments by name,
    ``None`` left out (tensors detached, the batch first), and the name of the first."""

    first: str
    arguments: tuple  # ((name, value), ...) in the forward's order


def _record_call(module: nn.Module, args: tuple, kwargs: dict, batch_first: bool) -> Optional[RecordedCall]:
    """The call ``module(*args, **kwargs)`` by name, or ``None`` where its first argument is
    no tensor (Opacus then sees the call as it was made). Where the batch is the second axis
    (``batch_first=False``), each tensor of two axes or more has it moved to the front, as
    Opacus moves it in its record of the first input."""
    bound = _forward_signature(type(module)).bind(module, *args, **kwargs).arguments
    named = [(name, value) for name, value in list(bound.items())[1:] if value is not None]  # (self left out)
    if not named or not isinstance(named[0][1], Tensor):
        return None

    def recorded(value):
        if not isinstance(value, Tensor):
            return value
        return value.detach() if batch_first or value.dim() < 2 else value.detach().movedim(1, 0)

    return RecordedCall(named[0][0], tuple((name, recorded(value)) for name, value in named))


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _with_every_input(capture_activations: Callable, module: nn.Module) -> Callable:
    """Opacus' forward hook ``capture_activations`` (which records the positional inputs,
    each a tensor) as a hook of ``module`` that sees the keyword inputs too: Opacus records the
    first input alone, and the whole call (:class:`RecordedCall`) waits beside that record.
    An input given by keyword, or ``segment_ids`` after ``mask=None``, so reaches
    :func:`per_sample_gradients`; the batch size Opacus reads off its record is the first
    input's, not that of a mask or residual that broadcasts."""
    owner = capture_activations.__self__
    batch_first = getattr(owner, "batch_first", True)

    def capture_every_input(hooked: nn.Module, args: tuple, kwargs: dict, output) -> None:
        call = _record_call(hooked, args, kwargs, batch_first)
        records = hooked.__dict__.get("activations")
        before = len(records) if records is not None else 0
        capture_activations(hooked, args if call is None else (args[0] if args else kwargs[call.first],), output)
        records = hooked.__dict__.get("activations")
        if records is None or len(records) == before:  # (Opacus recorded nothing: evaluation, no_grad)
            return
        # Opacus hands the grad sampler its record, or a copy (the batch moved to the front, or cast
        # to the gradient's dtype in functorch mode): the call waits on the module, popped in the
        # order Opacus pops its records (a fresh list where Opacus' is)
        waiting = hooked.__dict__.setdefault("normlab_calls", [])
        if before == 0:
            waiting.clear()
        waiting.append(call)

    if getattr(owner, "force_functorch", False):  # Opacus' functorch mode: its fallback takes the first input alone
        module.ft_compute_sample_grad = _functorch_stand_in(module)
    return capture_every_input


def _functorch_stand_in(module: nn.Module) -> Callable:
    """What Opacus' functorch mode calls for each layer, ``layer.ft_compute_sample_grad(parameters,
    first_input, backprops)`` (every parameter's per-sample gradients, in order; Opacus prepares
    it from the layer's first input alone), computed as :func:`per_sample_gradients` does, from
    the whole call."""

    def ft_compute_sample_grad(parameters, first_input, backprops) -> tuple:
        grads = _per_sample(module, [first_input], backprops, trainable_only=False)
        return tuple(grads[parameter] for parameter in parameters)

    return ft_compute_sample_grad


def _register_forward_hook(self, hook, *, prepend: bool = False, with_kwargs: bool = False,
                           always_call: bool = False):
    """``nn.Module.register_forward_hook`` of the modules of :data:`_SAMPLED`, where Opacus'
    hook that records a layer's inputs becomes :func:`_with_every_input`'s."""
    if (not with_kwargs and type(self) in _SAMPLED and getattr(hook, "__name__", None) == "capture_activations_hook"
            and isinstance(getattr(hook, "__self__", None), _opacus_hooks_class())):
        hook, with_kwargs = _with_every_input(hook, self), True
    return nn.Module.register_forward_hook(self, hook, prepend=prepend, with_kwargs=with_kwargs,
                                           always_call=always_call)


def _opacus_hooks_class() -> type:
    from opacus.grad_sample.gsm_base import AbstractGradSampleHooks

    return AbstractGradSampleHooks


def per_sample_gradients(block: nn.Module, activations: list, backprops) -> dict:
    """Opacus' grad sampler for a normlab module: torch.func's per-sample gradients of its
    trainable parameters through its first output (the normalized one, whose gradient is
    ``backprops``), recomputed from every input of the call (a block's residual or gate, a
    mask, segment ids: by position or by keyword, as :func:`_with_every_input` records them;
    else the positional ``activations``). An input without the batch's leading size (a
    residual that broadcasts) is shared by all samples.

    >>> import torch
    >>> block = FusedAddRMSNorm(4)
    >>> x, residual = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    >>> per_sample_gradients(block, [x, residual], torch.ones(3, 2, 4))[block.weight].shape
    torch.Size([3, 4])
    """
    return _per_sample(block, activations, backprops, trainable_only=True)


def _per_sample(block: nn.Module, activations: list, backprops, trainable_only: bool) -> dict:
    from torch.func import functional_call, grad, vmap

    names = [name for name, parameter in block.named_parameters() if parameter.requires_grad or not trainable_only]
    params = {f"module.{name}": block.get_parameter(name).detach() for name in names}
    unhooked = _Unhooked(block)
    waiting = block.__dict__.get("normlab_calls")
    call = waiting.pop() if waiting else None
    if call is None:
        keys, inputs = (None,) * len(activations), list(activations)
    else:  # (Opacus' record of the first input may be a copy cast to the gradient's dtype: the call's own)
        keys, inputs = tuple(name for name, _ in call.arguments), [value for _, value in call.arguments]
    tensors = [i for i, value in enumerate(inputs) if isinstance(value, Tensor)]
    batch = backprops.shape[0]
    per_sample = tuple(0 if inputs[i].dim() and inputs[i].shape[0] == batch else None for i in tensors)

    def output_dot_backprop(params, backprop, *batched):
        values = list(inputs)
        for i, value, axis in zip(tensors, batched, per_sample):
            values[i] = value.unsqueeze(0) if axis == 0 else value
        positional = [value for key, value in zip(keys, values) if key is None]
        keyword = {key: value for key, value in zip(keys, values) if key is not None}
        output = functional_call(unhooked, params, tuple(positional), keyword)
        return ((output[0] if isinstance(output, tuple) else output) * backprop.unsqueeze(0)).sum()

    grads = vmap(grad(output_dot_backprop), in_dims=(None, 0) + per_sample)(
        params, backprops, *(inputs[i] for i in tensors))
    return {block.get_parameter(name): grads[f"module.{name}"] for name in names}


def _fill_tables() -> None:
    """Add the twins and :class:`Norm` to Opacus' validator and fixer tables, and the
    modules of :data:`_SAMPLED` to its grad samplers (idempotent)."""
    from opacus.grad_sample import GradSampleModule, register_grad_sampler
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import ShouldReplaceModuleError

    register_grad_sampler([cls for cls in _SAMPLED if cls not in GradSampleModule.GRAD_SAMPLERS])(per_sample_gradients)
    for cls in _SAMPLED:  # (Opacus' forward hook then records keyword inputs too: _with_every_input)
        cls.register_forward_hook = _register_forward_hook

    for twin, torch_class in _TORCH_CLASSES.items():
        for table in (ModuleValidator.VALIDATORS, ModuleValidator.FIXERS):
            function = table.get(torch_class)
            if function is not None:
                table.setdefault(twin, function if issubclass(twin, torch_class)
                                 else _as_torch_class(function, torch_class))
    validate_instance_norm = ModuleValidator.VALIDATORS.get(nn.InstanceNorm1d, lambda module: [])

    def validate_norm(module: Norm) -> list:
        if spans_first_axis(module.pattern):
            return [ShouldReplaceModuleError(
                f"Norm({module.pattern!r}) shares its statistics across the first axis, the batch: each sample's "
                "output then depends on the others in its batch, which differential privacy cannot allow. Bracket "
                "only axes within a sample, e.g. Norm('b (g [c]) [h w]', params='(g c)', g=...) (group norm) or "
                "Norm('b [c h w]', params='c') (layer norm)")]
        return validate_instance_norm(module)  # (running statistics: torch.nn's instance norm's verdict)

    ModuleValidator.VALIDATORS.setdefault(Norm, validate_norm)


class _WhenImported:
    """A ``sys.meta_path`` finder that runs ``then()`` after the module ``name`` executes,
    however it comes to be imported, and then leaves ``sys.meta_path``. A look-up alone
    (``importlib.util.find_spec``, as availability checks do) executes nothing: it stays."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then, self.finding = name, then, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self.finding:
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(fullname)  # (the other finders: this one answers None meanwhile)
        finally:
            self.finding = False
        loader = None if spec is None else spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            execute = loader.exec_module

            def execute_then(module):
                execute(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                self.then()

            loader.exec_module = execute_then  # (the loader a finder makes for this module alone)
        return spec


def _fill_tables_or_warn() -> None:
    """:func:`_fill_tables`, whose failure (an Opacus that renamed its tables) warns: it runs
    inside ``import normlab.torch`` or the user's ``import opacus``, which must not fail for it."""
    try:
        _fill_tables()
    except Exception as error:  # noqa: BLE001 - any Opacus internals may have moved
        warnings.warn(f"normlab could not add its modules to Opacus' tables ({type(error).__name__}: {error}): "
                      "Opacus' ModuleValidator will not flag or fix normlab's batch norms. Convert after "
                      "ModuleValidator.fix(model), or use a version of Opacus normlab supports (1.5 or newer).",
                      RuntimeWarning, stacklevel=2)


def register_with_opacus() -> None:
    """Fill Opacus' tables (:func:`_fill_tables`) now where Opacus is imported, or when it is."""
    if sys.modules.get(_OPACUS) is not None:  # (None: an import blocked on purpose, which then fails)
        _fill_tables_or_warn()
    elif not any(isinstance(finder, _WhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported(_OPACUS, _fill_tables_or_warn))
