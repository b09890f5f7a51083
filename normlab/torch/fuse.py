"""``convert(model, fuse=True)``: fuse the residual adds of pre-norm decoder layers into their norms.

A Hugging Face LLaMA-style decoder layer (``LlamaDecoderLayer`` and the classes written
the same way: Mistral, Qwen2, Gemma, ...) runs::

    residual = h;  h = input_layernorm(h);  h = self_attn(h);  h = residual + h
    residual = h;  h = post_attention_layernorm(h);  h = mlp(h);  h = residual + h

The middle add and the norm after it read and write the same rows twice. Fusing
rewrites the layer to ``normed, h = post_attention_layernorm(attn, residual)`` with a
:class:`~normlab.torch.fused.FusedAddRMSNorm` that carries the norm's own casting recipe
(LLaMA's, or Gemma's ``1 + weight``). Gemma2's and Gemma3's layers put a norm on each side
of attention and MLP::

    residual = h;  h = input_layernorm(h);  h = self_attn(h);  h = post_attention_layernorm(h);  h = residual + h
    residual = h;  h = pre_feedforward_layernorm(h);  h = mlp(h);  h = post_feedforward_layernorm(h);  h = residual + h

and fuse the middle add into ``pre_feedforward_layernorm`` the same way. The layer's class
becomes a subclass with the fused forward, which binds its arguments as the original
forward's signature does (its defaults included) and hands the attention the same
keywords; its modules keep their names and Parameter objects, so ``state_dict`` and an
optimizer built before are unchanged. Layers of another structure are left alone.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Optional

from torch import nn

from normlab.torch.conversion import _named_class, _sharded_parameters, rebind_hooks, record_original
from normlab.torch.fused import FusedAddRMSNorm
from normlab.torch.modules import RMSNorm

__all__ = ["fuse_decoder_layers", "Fusing"]

_LAYER_CHILDREN = {"pre_norm": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
                   "sandwich": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                                "pre_feedforward_layernorm", "post_feedforward_layernorm"}}


@functools.lru_cache(maxsize=None)
def _source(function) -> str:
    try:
        return "".join(inspect.getsource(function).split())
    except (OSError, TypeError):
        return ""


def _recipe(norm: nn.Module):
    """``(casting, weight_offset, eps)`` of a Hugging Face RMS norm, or None when its
    forward is not one of the known recipes."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or eps is None:
        return None
    if getattr(norm, "bias", None) is not None or list(norm.children()):
        return None
    if type(norm) is RMSNorm:  # already converted (convert(model), then convert(model, fuse=True))
        if norm.casting in ("llama", "gemma") and len(norm.normalized_shape) == 1:
            return norm.casting, norm.weight_offset, float(eps)
        return None
    source = _source(type(norm).forward)
    if "self.weight*hidden_states.to(input_dtype)" in source:
        return "llama", 0.0, float(eps)
    if "output*(1.0+self.weight.float())" in source and "x.pow(2).mean(-1,keepdim=True)" in _source(type(norm)):
        return "gemma", 1.0, float(eps)
    return None


# The decoder layer forwards that fuse, statement for statement as ast.unparse writes them;
# the attention call ("ATTENTION") may pass any of the layer's arguments on by their own names.
# LlamaDecoderLayer's: the add after attention goes into post_attention_layernorm
_PRE_NORM_STATEMENTS = (
    "residual = hidden_states", "hidden_states = self.input_layernorm(hidden_states)", "ATTENTION",
    "hidden_states = residual + hidden_states", "residual = hidden_states",
    "hidden_states = self.post_attention_layernorm(hidden_states)", "hidden_states = self.mlp(hidden_states)",
    "hidden_states = residual + hidden_states", "return hidden_states")
# Gemma2DecoderLayer's (and Gemma3's), a norm on each side of attention and MLP: the add of
# the normed attention output goes into pre_feedforward_layernorm
_SANDWICH_STATEMENTS = (
    "residual = hidden_states", "hidden_states = self.input_layernorm(hidden_states)", "ATTENTION",
    "hidden_states = self.post_attention_layernorm(hidden_states)", "hidden_states = residual + hidden_states",
    "residual = hidden_states", "hidden_states = self.pre_feedforward_layernorm(hidden_states)",
    "hidden_states = self.mlp(hidden_states)", "hidden_states = self.post_feedforward_layernorm(hidden_states)",
    "hidden_states = residual + hidden_states", "return hidden_states")


@dataclass(frozen=True)
class _Call:
    """How a layer's forward takes its arguments and what its attention call passes on:
    the fused forward binds a call as the original's signature does (its defaults
    included) and hands ``self_attn`` the same keywords. (Not ``inspect.Signature.bind``:
    under ``torch.compile(fullgraph=True)`` Dynamo cannot trace it through the signature's
    mapping proxy, and the whole model would fail to compile.)"""

    positional: tuple[str, ...]  # the parameters after self that a positional argument may fill, in order
    names: frozenset  # every named parameter
    defaults: tuple[tuple[str, object], ...]
    passed: tuple[str, ...]  # what the attention call passes as name=name, hidden_states aside
    passes_var_keyword: bool  # ... and whether it passes **kwargs on
    takes_var_keyword: bool

    def attention_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """``(hidden_states, the keywords the original forward gives self_attn)`` for a call
        ``forward(*args, **kwargs)``; TypeError where the original's signature refuses it."""
        if len(args) > len(self.positional):
            raise TypeError(f"forward() takes {len(self.positional)} positional arguments after self, "
                            f"{len(args)} were given")
        values = dict(self.defaults)
        values.update(zip(self.positional, args))
        extra = {}
        for name, value in kwargs.items():
            if name in self.names:
                if name in self.positional[:len(args)]:
                    raise TypeError(f"forward() got multiple values for argument {name!r}")
                values[name] = value
            elif self.takes_var_keyword:
                extra[name] = value
            else:
                raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
        missing = [name for name in self.names if name not in values]
        if missing:
            raise TypeError(f"forward() missing required argument(s): {', '.join(sorted(missing))}")
        keywords = {name: values[name] for name in self.passed}
        if self.passes_var_keyword:
            keywords.update(extra)
        return values["hidden_states"], keywords


def _attention_keywords(statement: ast.stmt, function: ast.FunctionDef) -> Optional[tuple[tuple[str, ...], bool]]:
    """``hidden_states, _ = self.self_attn(hidden_states=hidden_states, name=name, ..., **kwargs)``,
    each name one of the forward's parameters: ``(the names, whether **kwargs is passed on)``;
    None for another statement."""
    if not (isinstance(statement, ast.Assign) and ast.unparse(statement.targets) == "(hidden_states, _)"
            and isinstance(statement.value, ast.Call) and ast.unparse(statement.value.func) == "self.self_attn"
            and not statement.value.args):
        return None
    arguments = function.args
    parameters = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    var_keyword = arguments.kwarg.arg if arguments.kwarg is not None else None
    names, passes_var_keyword = [], False
    for keyword in statement.value.keywords:
        if keyword.arg is None and isinstance(keyword.value, ast.Name) and keyword.value.id == var_keyword:
            passes_var_keyword = True
        elif isinstance(keyword.value, ast.Name) and keyword.value.id == keyword.arg and keyword.arg in parameters:
            names.append(keyword.arg)
        else:
            return None
    if "hidden_states" not in names:
        return None
    return tuple(n for n in names if n != "hidden_states"), passes_var_keyword


@functools.lru_cache(maxsize=None)
def _structure_of(cls: type) -> Optional[tuple[str, _Call]]:
    """``("pre_norm" or "sandwich", the layer's _Call)`` when ``cls.forward`` is
    LlamaDecoderLayer's or Gemma2DecoderLayer's, statement for statement, with its
    arguments named (no ``*args``); None otherwise (a ``residual + hidden_states *
    self.residual_multiplier`` (Granite), a post-norm (OLMo2) or a dropout before an add
    is another structure)."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
        signature = inspect.signature(cls.forward)
    except (OSError, TypeError, SyntaxError, IndexError, ValueError):
        return None
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    parameters = list(signature.parameters.values())[1:]
    if (not parameters or parameters[0].name != "hidden_states"
            or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
            or {p.name for p in parameters} != {a.arg for a in function.args.posonlyargs + function.args.args[1:]
                                                + function.args.kwonlyargs}
            | ({function.args.kwarg.arg} if function.args.kwarg else set())):
        return None  # (a decorator that changed the signature)
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    for name, statements in (("pre_norm", _PRE_NORM_STATEMENTS), ("sandwich", _SANDWICH_STATEMENTS)):
        if len(body) != len(statements):
            continue
        attention = [_attention_keywords(s, function) for s, e in zip(body, statements) if e == "ATTENTION"]
        if attention[0] is None or not all(ast.unparse(s) == e for s, e in zip(body, statements) if e != "ATTENTION"):
            continue
        named = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
        call = _Call(
            positional=tuple(p.name for p in named if p.kind is not inspect.Parameter.KEYWORD_ONLY),
            names=frozenset(p.name for p in named),
            defaults=tuple((p.name, p.default) for p in named if p.default is not inspect.Parameter.empty),
            passed=attention[0][0], passes_var_keyword=attention[0][1],
            takes_var_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters))
        return name, call
    return None


def _fused_norm_name(layer: nn.Module) -> Optional[str]:
    """The name of the norm that takes the residual add in ``layer``, a decoder layer of one
    of the fused structures with exactly its modules; None for any other module."""
    structure = _structure_of(type(layer))
    if structure is None or {name for name, _ in layer.named_children()} != _LAYER_CHILDREN[structure[0]]:
        return None
    return "post_attention_layernorm" if structure[0] == "pre_norm" else "pre_feedforward_layernorm"


def _arguments(self, args: tuple, kwargs: dict) -> tuple:
    if "past_key_values" in kwargs and "cache" in self._call.names:  # the name the deprecation shim maps to cache
        kwargs = dict(kwargs)
        kwargs["cache"] = kwargs.pop("past_key_values")
    return self._call.attention_inputs(args, kwargs)


def _fused_pre_norm_forward(self, *args, **kwargs):
    """LlamaDecoderLayer's forward with the post-attention add fused into its norm."""
    hidden_states, keywords = _arguments(self, args, kwargs)
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **keywords)
    normed, residual = _add_and_norm(self.post_attention_layernorm, attended, hidden_states)
    return residual + self.mlp(normed)


def _fused_sandwich_forward(self, *args, **kwargs):
    """Gemma2DecoderLayer's forward with the add of the normed attention output fused into
    the pre-feedforward norm."""
    hidden_states, keywords = _arguments(self, args, kwargs)
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **keywords)
    normed, residual = _add_and_norm(self.pre_feedforward_layernorm, self.post_attention_layernorm(attended),
                                     hidden_states)
    return residual + self.post_feedforward_layernorm(self.mlp(normed))


def _add_and_norm(norm: nn.Module, x, residual) -> tuple:
    """``(norm(residual + x), residual + x)``: the fused call, or the add and then the norm
    where hooks were put on the norm after fusing (tensor parallelism's ``SequenceParallel``:
    its hooks take the norm's one input and would drop the residual), as the layer's own
    forward calls it."""
    if _has_call_hooks(norm):
        total = residual + x
        return norm(total), total
    return norm(x, residual)


def _fused_instance(cls: type) -> nn.Module:
    """An empty instance of ``cls``'s fused class, for pickle to fill with the layer's state."""
    fused_cls = _fused_class(cls)
    return fused_cls.__new__(fused_cls)


def _reduce_ex(self, protocol):
    # pickle finds a class by its module and name, and the fused class is made at run time:
    # name the layer's own class instead, so torch.save(model) and torch.load work
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    return (_fused_instance, (self._unfused_class,), *rest)


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    structure, call = _structure_of(cls)
    forward = {"pre_norm": _fused_pre_norm_forward, "sandwich": _fused_sandwich_forward}[structure]
    return type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_call": call, "_unfused_forward": cls.forward,
                                                  "_unfused_class": cls, "__reduce_ex__": _reduce_ex,
                                                  "__module__": cls.__module__})


def _fused_norm(norm: nn.Module, recipe) -> FusedAddRMSNorm:
    casting, offset, eps = recipe
    fused = FusedAddRMSNorm.__new__(FusedAddRMSNorm)
    nn.Module.__init__(fused)
    fused.hidden_size = norm.weight.shape[0]
    fused.eps, fused.casting, fused.weight_offset = eps, casting, offset
    if "variance_epsilon" in vars(norm):  # (LLaMA's name for eps, kept as eps is: unconvert gives it back)
        fused.__dict__["variance_epsilon"] = eps
    fused.weight = norm.weight  # the same Parameter object
    original = getattr(norm, "_original_class", None) or _named_class(type(norm))  # (what transformers' init reads)
    if original is not None:
        fused._original_class = original
    fused.train(norm.training)
    fused._init_block()
    for name, hooks in vars(norm).items():  # its hooks (forward, backward, state_dict, ...) go along,
        if name.startswith("_") and "hooks" in name and isinstance(hooks, dict):
            setattr(fused, name, hooks)  # the same dicts, which the hooks' handles remove them from
    rebind_hooks(norm, fused)
    record_original(norm, fused)
    return fused


def _has_call_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _keep_fused_layers_whole(model: nn.Module, fused_names: dict) -> None:
    """Name the fused classes in the ``_no_split_modules`` of ``model``'s transformers models
    (the layers that accelerate's device maps keep on one device and FSDP wraps, matched by
    class name), in place of their originals' names where no unfused layer of that class is
    left: a fused layer split over devices would add its residual across them."""
    present = {type(module).__name__ for module in model.modules()}
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if not isinstance(names, (list, tuple, set)) or not set(fused_names) & set(names):
            continue
        kept = [name for name in names if name not in fused_names or name in present]
        kept += [fused_names[name] for name in names if name in fused_names and fused_names[name] not in kept]
        module._no_split_modules = type(names)(kept)


@dataclass(frozen=True)
class Fusing:
    """What :func:`fuse_decoder_layers` did to a model."""

    fused: int  # the decoder layers it fused
    # the layers of a fused structure whose norms it fuses: those it fused, those fused before,
    # and those left for a hook, a forward replaced on the instance or fully_shard
    found: int


# what fuse=True rewrites, as its warning names it
FUSED_STRUCTURES = ("LLaMA's pre-norm decoder layers and those written as they are (Mistral, Qwen2, Qwen3, ...), and "
                    "Gemma2's and Gemma3's with a norm on each side of attention and MLP, whose norms are LLaMA's or "
                    "Gemma's RMS norms: it adds the residual after attention inside the next norm")


def fuse_decoder_layers(model: nn.Module, sharded: Optional[frozenset] = None) -> Fusing:
    """Fuse every decoder layer of ``model`` of a fused structure in place; returns how many were
    fused, and found. ``sharded``: the ids of the parameters fully_shard holds, where the caller
    has them."""
    count = found = 0
    fused_names = {}
    if sharded is None:
        sharded = _sharded_parameters(model)
    for layer in list(model.modules()):
        if getattr(type(layer), "_unfused_class", None) is not None:
            found += 1  # (fused before: convert(model, fuse=True) twice)
            continue
        if isinstance(layer, FusedAddRMSNorm) or type(layer).__name__.startswith("Fused"):
            continue
        fused_name = _fused_norm_name(layer)
        if fused_name is None:
            continue
        norms = sorted(name for name in _LAYER_CHILDREN[_structure_of(type(layer))[0]] if name.endswith("layernorm"))
        recipes = {name: _recipe(getattr(layer, name)) for name in norms}
        if None in recipes.values():
            continue
        found += 1
        if _has_call_hooks(getattr(layer, fused_name)):
            continue  # (a hook on that norm expects its one input and one output, not the fused call's)
        if any("forward" in module.__dict__ for module in (layer, *(getattr(layer, name) for name in norms))):
            continue  # (a forward replaced on the instance, as accelerate's hooks do, runs the original's code)
        if sharded and any(id(p) in sharded for name in norms for p in getattr(layer, name).parameters()):
            continue  # (fully_shard swaps these on the norms it was given; convert() warns of them)
        for name, recipe in recipes.items():
            setattr(layer, name, _fused_norm(getattr(layer, name), recipe))
        fused_names[type(layer).__name__] = _fused_class(type(layer)).__name__
        layer.__class__ = _fused_class(type(layer))
        count += 1
    if fused_names:
        _keep_fused_layers_whole(model, fused_names)
    return Fusing(fused=count, found=found)
