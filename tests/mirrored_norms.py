"""Faithful copies of torchvision's and timm's norm layers and of the model parts around
them, as test oracles for ``normlab.torch.convert``.

torchvision and timm cannot be imported here: the package index's torchvision is a CUDA
build that fails beside torch's CPU wheel (``operator torchvision::nms does not exist``),
and timm depends on it. So the classes are copied from their source, with the code they run
on CPU unchanged:

* ``torchvision/models/convnext.py`` (pytorch/vision): ``LayerNorm2d``, ``CNBlock``, and
  ``Permute`` from ``torchvision/ops/misc.py``;
* ``timm/layers/norm.py`` (huggingface/pytorch-image-models): ``LayerNorm``,
  ``LayerNorm2d``, ``GroupNorm``, ``LayerNormFp32``, ``LayerNorm2dFp32``, with ``fast_layer_norm`` and
  ``fast_group_norm`` from ``timm/layers/fast_norm.py`` (without apex, which is not
  installed; fast norm is off by default, as in timm);
* ``timm/layers/norm.py`` and ``fast_norm.py``: ``RmsNorm`` with ``rms_norm`` (the eager
  path; TorchScript's branch is the same computation over the last axis);
* ``timm/layers/norm.py`` and ``fast_norm.py``: ``RmsNorm2d`` and ``RmsNorm2dFp32`` with
  ``rms_norm2d`` (channels-first, ``(N, C, H, W)``: the statistics over axis 1; RmsNorm2d's
  fast path, apex's norm or autocast's dtype, is off, as above).
"""

import numbers
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_USE_FAST_NORM = False  # timm: "defaulting to False for now"


def is_fast_norm():
    return _USE_FAST_NORM


def fast_layer_norm(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    # timm/layers/fast_norm.py without the apex branch
    if torch.jit.is_scripting():
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    if torch.is_autocast_enabled():
        dt = torch.get_autocast_gpu_dtype()
        x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt) if bias is not None else None
    with torch.amp.autocast(device_type=x.device.type, enabled=False):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)


def fast_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    eps: float = 1e-5) -> Tensor:
    if torch.jit.is_scripting():
        return F.group_norm(x, num_groups, weight, bias, eps)
    if torch.is_autocast_enabled():
        dt = torch.get_autocast_gpu_dtype()
        x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt) if bias is not None else None
    with torch.amp.autocast(device_type=x.device.type, enabled=False):
        return F.group_norm(x, num_groups, weight, bias, eps)


# --- torchvision/models/convnext.py and torchvision/ops/misc.py -----------------------------

class TorchvisionLayerNorm2d(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class Permute(torch.nn.Module):
    def __init__(self, dims: List[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block (StochasticDepth left out: its probability is 0 here,
    where it is the identity)."""

    def __init__(self, dim, layer_scale: float, norm_layer=None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731  (partial(nn.LayerNorm, eps=1e-6))
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            norm_layer(dim),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result += input
        return result


# --- timm/layers/norm.py ----------------------------------------------------------------

class TimmGroupNorm(nn.GroupNorm):
    _fast_norm: torch.jit.Final[bool]

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True, **kwargs):
        # NOTE num_channels is swapped to first arg for consistency in swapping norm layers with BN
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kwargs)
        self._fast_norm = is_fast_norm()

    def forward(self, x):
        if self._fast_norm:
            return fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class TimmLayerNorm(nn.LayerNorm):
    """ LayerNorm w/ fast norm option
    """
    _fast_norm: torch.jit.Final[bool]

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)
        self._fast_norm = is_fast_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x


class TimmLayerNormFp32(nn.LayerNorm):
    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        return x


class TimmLayerNorm2dFp32(nn.LayerNorm):
    """ LayerNorm for channels of '2D' spatial NCHW tensors """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        x = x.permute(0, 3, 1, 2)
        return x


class TimmLayerNorm2d(nn.LayerNorm):
    """ LayerNorm for channels of '2D' spatial NCHW tensors """
    _fast_norm: torch.jit.Final[bool]

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)
        self._fast_norm = is_fast_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


def rms_norm(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None, eps: float = 1e-5):
    # timm/layers/fast_norm.py
    norm_ndim = len(normalized_shape)
    v = x.pow(2)
    if torch.jit.is_scripting():
        assert norm_ndim == 1
        v = torch.mean(v, dim=-1).unsqueeze(-1)  # ts crashes with -ve dim + keepdim=True
    else:
        dims = tuple(range(-1, -norm_ndim - 1, -1))
        v = torch.mean(v, dim=dims, keepdim=True)
    x = x * torch.rsqrt(v + eps)
    if weight is not None:
        x = x * weight
    return x


class TimmRmsNorm(nn.Module):
    """ RmsNorm w/ fast (apex) norm if available
    """
    __constants__ = ['normalized_shape', 'eps', 'elementwise_affine', '_fast_norm']
    normalized_shape: Tuple[int, ...]
    eps: float
    elementwise_affine: bool
    _fast_norm: bool

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        normalized_shape = channels
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = affine
        self._fast_norm = is_fast_norm()

        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **dd))
        else:
            self.register_parameter('weight', None)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the fast path, apex's RMS norm, is off: apex is not installed and fast norm is off)
        x = rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return x


def rms_norm2d(x: torch.Tensor, normalized_shape: List[int], weight: Optional[torch.Tensor] = None,
               eps: float = 1e-5):
    # timm/layers/fast_norm.py
    assert len(normalized_shape) == 1
    v = x.pow(2)
    v = torch.mean(v, dim=1, keepdim=True)
    x = x * torch.rsqrt(v + eps)
    if weight is not None:
        x = x * weight.reshape(1, -1, 1, 1)
    return x


class TimmRmsNorm2d(nn.Module):
    """ RmsNorm2D for NCHW tensors, w/ fast apex or cast norm if available
    """
    __constants__ = ['normalized_shape', 'eps', 'elementwise_affine', '_fast_norm']
    normalized_shape: Tuple[int, ...]
    eps: float
    elementwise_affine: bool
    _fast_norm: bool

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        normalized_shape = channels
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = affine
        self._fast_norm = is_fast_norm()

        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **dd))
        else:
            self.register_parameter('weight', None)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (fast_rms_norm2d, apex's norm or autocast's dtype, is off: apex is not installed and fast norm is off)
        x = rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        return x


class TimmRmsNorm2dFp32(nn.Module):
    """ RmsNorm2D for NCHW tensors, w/ fast apex or cast norm if available
    """
    __constants__ = ['normalized_shape', 'eps', 'elementwise_affine']
    normalized_shape: Tuple[int, ...]
    eps: float
    elementwise_affine: bool

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        normalized_shape = channels
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = affine

        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **dd))
        else:
            self.register_parameter('weight', None)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        x = rms_norm2d(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)
        return x


# --- small models built from them -------------------------------------------------------

def convnext_like(layer_norm_2d, block_norm=None, widths=(8, 16)) -> nn.Module:
    """torchvision's ConvNeXt layout in miniature: a patchify stem with a channels-first
    norm, ConvNeXt blocks (channels-last norm), a downsampling norm + conv, and the
    classifier's norm on the pooled features."""
    norm = lambda channels: layer_norm_2d(channels, eps=1e-6)  # noqa: E731  (partial(LayerNorm2d, eps=1e-6))
    first, second = widths
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, first, kernel_size=4, stride=4), norm(first)),
        nn.Sequential(CNBlock(first, 0.5, block_norm)),
        nn.Sequential(norm(first), nn.Conv2d(first, second, kernel_size=2, stride=2)),
        nn.Sequential(CNBlock(second, 0.5, block_norm)),
        nn.AdaptiveAvgPool2d(1),
        nn.Sequential(norm(second), nn.Flatten(1), nn.Linear(second, 10)),
    )


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """timm's pre-norm ViT block: x + attn(norm1(x)), x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = norm_layer(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VitLike(nn.Module):
    """A ViT in miniature with timm's norm layers: patch embedding, pre-norm blocks, a
    final norm and a linear head on the mean token."""

    def __init__(self, dim: int = 16, depth: int = 2, heads: int = 2, norm_layer=TimmLayerNorm):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.Sequential(*[Block(dim, heads, norm_layer) for _ in range(depth)])
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))
