"""``convert(model, fuse=True)``: fuse the residual adds of pre-norm decoder layers into their norms.

A Hugging Face LLaMA-style decoder layer (``LlamaDecoderLayer`` and the classes written
the same way: Mistral, Qwen2, Gemma, ...) runs::

    residual = h;  h = input_layernorm(h);  h = self_attn(h);  h = residual + h
    residual = h;  h = post_attention_layernorm(h);  h = mlp(h);  h = residual + h

The middle add and the norm after it read and write the same rows twice. Fusing
rewrites the layer to ``normed, h = post_attention_layernorm(attn, residual)`` with a
:class:`~normlab.torch.fused.FusedAddRMSNorm` that carries the norm's own casting recipe
(LLaMA's, or Gemma's ``1 + weight``). The layer's class becomes a subclass with that
forward; its modules keep their names and Parameter objects, so ``state_dict`` and an
optimizer built before are unchanged. Layers of another structure are left alone.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

from normlab.torch.fused import FusedAddRMSNorm
from normlab.torch.modules import RMSNorm

__all__ = ["fuse_decoder_layers"]

_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


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


# LlamaDecoderLayer.forward's statements, as ast.unparse writes them; the attention call
# ("ATTENTION") may pass any of the layer's arguments on by their own names
_PRE_NORM_STATEMENTS = (
    "residual = hidden_states", "hidden_states = self.input_layernorm(hidden_states)", "ATTENTION",
    "hidden_states = residual + hidden_states", "residual = hidden_states",
    "hidden_states = self.post_attention_layernorm(hidden_states)", "hidden_states = self.mlp(hidden_states)",
    "hidden_states = residual + hidden_states", "return hidden_states")


def _passes_its_arguments_on(statement: ast.stmt) -> bool:
    """``hidden_states, _ = self.self_attn(hidden_states=hidden_states, name=name, ..., **kwargs)``:
    what the fused forward's ``self.self_attn(hidden_states=..., **kwargs)`` reproduces."""
    if not (isinstance(statement, ast.Assign) and ast.unparse(statement.targets) == "(hidden_states, _)"
            and isinstance(statement.value, ast.Call) and ast.unparse(statement.value.func) == "self.self_attn"
            and not statement.value.args):
        return False
    return all(k.arg is None or (isinstance(k.value, ast.Name) and k.value.id == k.arg)
               for k in statement.value.keywords)


@functools.lru_cache(maxsize=None)
def _has_pre_norm_forward(cls: type) -> bool:
    """Whether ``cls.forward`` is LlamaDecoderLayer's, statement for statement (a
    ``residual + hidden_states * self.residual_multiplier`` (Granite), a norm of the
    attention output (Gemma2) or a dropout before an add is another structure)."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    arguments = [a.arg for a in function.args.args]
    return (len(body) == len(_PRE_NORM_STATEMENTS) and arguments[1:2] == ["hidden_states"]
            and all(_passes_its_arguments_on(s) if expected == "ATTENTION" else ast.unparse(s) == expected
                    for s, expected in zip(body, _PRE_NORM_STATEMENTS)))


def _is_pre_norm_layer(layer: nn.Module) -> bool:
    return ({name for name, _ in layer.named_children()} == _LAYER_CHILDREN
            and _has_pre_norm_forward(type(layer)))


def _fused_forward(self, hidden_states, *args, **kwargs):
    """The layer's forward with the post-attention add fused into its norm."""
    if args:  # positional extras: the original forward knows where they go
        return self._unfused_forward(hidden_states, *args, **kwargs)
    if "past_key_values" in kwargs:  # the name the layer's deprecation shim maps to ``cache``
        kwargs["cache"] = kwargs.pop("past_key_values")
    residual = hidden_states
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    normed, residual = self.post_attention_layernorm(attended, residual)
    return residual + self.mlp(normed)


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
    return type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, "_unfused_forward": cls.forward,
                                                  "_unfused_class": cls, "__reduce_ex__": _reduce_ex,
                                                  "__module__": cls.__module__})


def _fused_norm(norm: nn.Module, recipe) -> FusedAddRMSNorm:
    casting, offset, eps = recipe
    fused = FusedAddRMSNorm.__new__(FusedAddRMSNorm)
    nn.Module.__init__(fused)
    fused.hidden_size = norm.weight.shape[0]
    fused.eps, fused.casting, fused.weight_offset = eps, casting, offset
    fused.weight = norm.weight  # the same Parameter object
    fused.train(norm.training)
    fused._init_block()
    for name, hooks in vars(norm).items():  # its hooks (forward, backward, state_dict, ...) go along
        if name.startswith("_") and "hooks" in name and isinstance(hooks, dict):
            setattr(fused, name, type(hooks)(hooks))
    return fused


def _has_call_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def fuse_decoder_layers(model: nn.Module) -> int:
    """Fuse every pre-norm decoder layer of ``model`` in place; returns how many were fused."""
    count = 0
    for layer in list(model.modules()):
        if isinstance(layer, FusedAddRMSNorm) or type(layer).__name__.startswith("Fused"):
            continue
        if not _is_pre_norm_layer(layer):
            continue
        recipes = [_recipe(layer.input_layernorm), _recipe(layer.post_attention_layernorm)]
        if None in recipes or _has_call_hooks(layer.post_attention_layernorm):
            continue  # (a hook on that norm expects its one input and one output, not the fused call's)
        layer.input_layernorm = _fused_norm(layer.input_layernorm, recipes[0])
        layer.post_attention_layernorm = _fused_norm(layer.post_attention_layernorm, recipes[1])
        layer.__class__ = _fused_class(type(layer))
        count += 1
    return count
