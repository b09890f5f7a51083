"""torch.nn's errors for an input a twin refuses, in torch's words and type, followed by
the module, the shapes (or dtypes) it was given and how to fix the call. Only on the error
path: :func:`advise` runs where an exception is already on its way out of a twin."""

from __future__ import annotations

import math
import re

from torch import Tensor, nn

_RANK = re.compile(r"expected (\d)D(?: or (\d)D)? input \(got (\d+)D input\)")
_INSTANCE_CHANNELS = re.compile(r"expected input's size at dim=(\d+) to match num_features \((\d+)\), but got: (\d+)\.")
_GROUP_CHANNELS = ("Expected weight to be a vector of size equal to the number of channels in input, but got weight "
                   "of shape ")
_GROUP_DIVISIBLE = "Expected number of channels in input to be divisible by num_groups, but got input of shape "
_GROUP_RANK = re.compile(r"Expected at least 2 dimensions for input tensor but received \d+")
_MIXED = ("mixed dtype (CPU): all inputs must share same datatype.",
          "mixed dtype (CPU): expect parameter to have scalar type of ")
# torch's refusals of an integer input where it computes in floating point (a mean, a silu, a norm)
_FLOAT_ONLY = re.compile(r"mean\(\): could not infer output dtype\. Input dtype must be either a floating point or "
                         r"complex dtype\. Got: \w+|var_mean only support floating point and complex dtypes|"
                         r"\"\w+\" not implemented for '\w+'")
# torch.nn.Linear's refusal of an input of another dtype than its weight
_MATMUL_DTYPES = re.compile(r"mat1 and mat2 must have the same dtype, but got \w+ and \w+")
# the twin for each rank of input, by family: (the ranks a class takes, its name)
_BATCH_NORMS = (((2, 3), "BatchNorm1d"), ((4,), "BatchNorm2d"), ((5,), "BatchNorm3d"))
_INSTANCE_NORMS = (((2, 3), "InstanceNorm1d"), ((3, 4), "InstanceNorm2d"), ((4, 5), "InstanceNorm3d"))
_LAYOUTS = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def advise(module: nn.Module, x, error: Exception, given: str = "input", held: nn.Module = None) -> None:
    """Append to ``error`` (torch.nn's, raised for ``module`` called on ``x``) what the
    module expected, what it got and the fix, where it is one of the messages below and
    says none of that; its type, its traceback and torch's words, first, stay. ``given``
    names what ``x`` is in the call (a fused block's ``"x + residual"``); ``held``, the
    submodule whose parameters take it, where not ``module`` (AdaLayerNorm's ``linear``).

    >>> import torch
    >>> error = ValueError("expected 4D input (got 3D input)")
    >>> advise(torch.nn.BatchNorm2d(8), torch.zeros(2, 8, 3), error)
    >>> import textwrap
    >>> print(textwrap.fill(str(error), 90))
    expected 4D input (got 3D input): BatchNorm2d(8) takes input of shape (N, 8, H, W), but
    got input of shape (2, 8, 3); use BatchNorm1d(8) for 3D input
    """
    if not isinstance(x, Tensor) or x.is_nested or len(error.args) != 1 or not isinstance(error.args[0], str):
        return  # (a nested tensor's ragged size is no channel count to build a module with)
    message = error.args[0]
    advice = None
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        rank = _RANK.fullmatch(message)
        if rank is not None:
            advice = _rank_advice(module, x, tuple(int(r) for r in rank.groups()[:2] if r is not None))
        channels = _INSTANCE_CHANNELS.fullmatch(message)
        if channels is not None:
            advice = _channel_advice(module, x, int(channels.group(1)))
    elif isinstance(module, nn.GroupNorm) and (message.startswith((_GROUP_CHANNELS, _GROUP_DIVISIBLE))
                                               or _GROUP_RANK.fullmatch(message)) and not _advised(message):
        advice = _group_advice(module, x)
    if message.startswith(_MIXED) and not _advised(message):
        advice = _dtype_advice(module, x, given, held)
    elif _MATMUL_DTYPES.fullmatch(message) or (not x.is_floating_point() and not x.is_complex()
                                               and _FLOAT_ONLY.fullmatch(message)):
        advice = _dtype_advice(module, x, given, held)
    if advice is not None:
        error.args = (f"{message} {advice}" if message.endswith(".") else f"{message}: {advice}",)


def _advised(message: str) -> bool:
    return "; " in message  # (the advice's separator: torch's messages above have none)


def _name(module: nn.Module) -> str:
    return type(module).__name__


def _rank_advice(module, x: Tensor, ranks: tuple) -> str:
    channels = module.num_features
    instance = isinstance(module, nn.modules.instancenorm._InstanceNorm)
    if instance:  # (with and without the batch axis)
        layouts = [_LAYOUTS[max(ranks)].replace("N, ", ""), _LAYOUTS[max(ranks)]]
    else:
        layouts = [_LAYOUTS[rank] for rank in ranks]
    layouts = " or ".join(layout.replace("C", str(channels)) for layout in layouts)
    # the class of the family that takes this rank, where the input's channels are on its channel axis
    # (axis 1; an instance norm's unbatched input: axis 0)
    fixes = [f"use {name}({channels}) for {x.dim()}D input" for taken, name in
             (_INSTANCE_NORMS if instance else _BATCH_NORMS) if x.dim() in taken and name != _name(module)
             and x.shape[x.dim() - max(taken) + 1 if instance else 1] == channels]
    if not instance and x.dim() + 1 == min(ranks) and x.shape[0] == channels:
        training = module.training or (module.running_mean is None and module.running_var is None)
        if training and math.prod(x.shape[1:]) == 1:  # (a batch axis of 1 alone: torch.nn then refuses that)
            fixes.insert(0, f"pass a batch of more than one such sample, {layouts} with N > 1: one sample has one "
                            "value per channel, which a batch norm refuses in training")
        else:
            fixes.insert(0, "add the batch axis (x.unsqueeze(0))")
    if not fixes:
        fixes = ["reshape the input to that"]
    return f"{_name(module)}({channels}) takes input of shape {layouts}, but got input of shape " \
           f"{tuple(x.shape)}; {', or '.join(fixes)}"


def _channel_advice(module, x: Tensor, axis: int) -> str:
    channels, got = module.num_features, x.shape[axis]
    expected = tuple(channels if i == axis else n for i, n in enumerate(x.shape))
    return (f"{_name(module)}({channels}) normalizes {channels} channels on axis {axis}, and expected input of shape "
            f"{expected}, but got input of shape {tuple(x.shape)}; pass {channels} channels on axis {axis}, or build "
            f"{_name(module)}({got}) for {got} channels")


def _group_advice(module: nn.GroupNorm, x: Tensor) -> str:
    groups, channels = module.num_groups, module.num_channels
    head = (f"GroupNorm({groups}, {channels}) normalizes {channels} channels on axis 1 in {groups} groups, and "
            f"expected input of shape (N, {channels}, *), but got input of shape {tuple(x.shape)}; ")
    if x.dim() < 2:
        fix = (f"add the batch axis (x.unsqueeze(0))" if x.dim() == 1 and x.shape[0] == channels
               else f"give the input a batch axis and {channels} channels on axis 1")
        return head + fix
    got = x.shape[1]
    if got == channels:  # (groups set after construction, which refuses them, or channels pruned)
        return (f"GroupNorm({groups}, {channels}): its {groups} groups do not divide its {channels} channels, so "
                f"input of shape {tuple(x.shape)} cannot be split into them; set num_groups to a divisor of "
                f"{channels}")
    fix = f"pass {channels} channels on axis 1"
    if got % groups == 0:
        fix += f", or build GroupNorm({groups}, {got}) for {got} channels"
    else:
        fix += f", or build a GroupNorm for {got} channels with a number of groups that divides {got}"
    return head + fix


def _dtype_advice(module, x: Tensor, given: str = "input", owner: nn.Module = None) -> str:
    prefix = "" if owner is None else next(name + "." for name, child in module.named_children() if child is owner)
    owner = module if owner is None else owner
    held = [(prefix + name, t.dtype) for name, t in (*owner.named_parameters(recurse=False),
                                                     *owner.named_buffers(recurse=False))
            if t is not None and t.is_floating_point() and t.dtype != x.dtype]
    if not held:
        return f"{_name(module)} got {given} of dtype {x.dtype} and shape {tuple(x.shape)}"
    dtype = held[0][1]
    names = [name for name, _ in held]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    cast = "the input (x.to({}))" if given == "input" else f"{given.replace(' + ', ' and ')} (.to({{}}))"
    return (f"{_name(module)} holds {listed} in {dtype}, but got {given} of dtype {x.dtype} and shape "
            f"{tuple(x.shape)}; cast {cast.format(dtype)}"
            # (an integer input: a module of integers computes nothing)
            + (f" or the module (module.to({x.dtype}))" if x.is_floating_point() else ""))
