"""PyTorch front end: drop-in ``torch.nn`` normalization modules on normlab's engine.

Swap a model's norm layers in one call and keep its parameters, buffers and outputs::

    >>> import torch
    >>> from normlab.torch import convert
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model = convert(model)
    >>> type(model[1]).__module__, model(torch.randn(2, 3, 8, 8)).shape
    ('normlab.torch', torch.Size([2, 8, 6, 6]))

Each module subclasses its ``torch.nn`` namesake, so constructor arguments, defaults,
attributes, ``state_dict`` keys, ``reset_parameters()``, ``extra_repr()`` and
``isinstance(m, torch.nn.BatchNorm2d)`` checks are torch's own; only ``forward`` differs.
The one exception is :class:`SyncBatchNorm`: it subclasses torch's ``_BatchNorm``, because
``DistributedDataParallel`` refuses subclasses of ``torch.nn.SyncBatchNorm`` on CPU.
:class:`Norm` takes any pattern.

**Momentum**, as torch defines it (frameworks disagree)::

    running = (1 − momentum) · running + momentum · batch          (momentum=0.1)
    running = running + (batch − running) / num_batches_tracked    (momentum=None)

``running_var`` stores the *unbiased* batch variance ``n/(n − 1)·var``; the batch is
normalized with the biased one.

**Paths.** Each forward takes one of three paths:

* ``"kernel"``: CPU float32/float64 tensors go zero-copy (contiguous, or any dense
  permutation such as channels_last) into :func:`normlab.normalize` through an
  ``autograd.Function`` (or the custom op ``torch.ops.normlab.normalize``, registered
  with ``torch.library`` with a fake kernel and an autograd formula, for tensor
  subclasses, and under ``torch.compile`` when :func:`use_path` forces ``"kernel"``);
* ``"native"``: torch's own op (``F.batch_norm``, ``F.layer_norm``, ...) for other
  devices and dtypes, where the pattern has one;
* ``"composite"``: the same math written in torch operations, for any pattern.

``"auto"`` picks in that order, except where only torch's operations can run: fx
tracing, ``torch.jit``, ``torch.compile``, ``torch.export``, ONNX export and functorch
transforms take the native path (the composite where torch has no op); forward-mode AD
(dual tensors, ``torch.func.jvp``) takes the composite, whose tangent's gradient is right
where torch's layer and batch norms' is not (pytorch#196700). A double backward
differentiates the composite. :func:`use_path` forces a path
(tests use it on CPU).
"""

import re

try:
    import torch  # noqa: F401  (also the namespace of the class doctests)
except ImportError as _missing:
    raise ImportError(
        'normlab.torch needs PyTorch, which does not import here; install it with pip install "normlab[torch]" '
        "(or pip install torch; the NumPy API, import normlab, works without it)"
    ) from _missing

# the oldest PyTorch the twins run on (tried: 2.12.0, 2.13.0 and 2.14.1): torch.nn's
# constructors take what they take from it on (BatchNorm's bias=, which 2.11 lacks), and the
# masked op's shape hints need its optimization_hint
_OLDEST_TORCH = (2, 12)
if tuple(map(int, re.match(r"(\d+)\.(\d+)", torch.__version__).groups())) < _OLDEST_TORCH:
    raise ImportError(
        f"normlab.torch needs PyTorch {_OLDEST_TORCH[0]}.{_OLDEST_TORCH[1]} or newer, and this is {torch.__version__}; "
        f'upgrade it with pip install "torch>={_OLDEST_TORCH[0]}.{_OLDEST_TORCH[1]}" (the NumPy API, import normlab, '
        "works with any)"
    )

from normlab.kernels import threads as _threads
from normlab.torch.averaging import update_bn
from normlab.torch.compute import normalize
from normlab.torch.conversion import convert
from normlab.torch.fused import AdaLayerNorm, FusedAddLayerNorm, FusedAddRMSNorm, GatedRMSNorm
from normlab.torch.fuser_mappings import register_fusers, register_quantized_twins
from normlab.torch.modules import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d, ChannelsFirstLayerNorm, GroupNorm, InstanceNorm1d, InstanceNorm2d,
    InstanceNorm3d, LayerNorm, LayerNorm2d, Norm, RMSNorm,
)
from normlab.torch.opacus_tables import register_with_opacus
from normlab.torch.paths import PATHS, use_path
from normlab.torch.recipe_norms import (BiasedRMSNorm, Float32LayerNorm, Float32LayerNorm2d, GammaRMSNorm,
                                        MultiHeadLayerNorm, PerFrameGroupNorm, PerHeadLayerNorm, RecipeLayerNorm,
                                        RMSNorm2d, UnweightedRMSNorm, WrittenOutLayerNorm)
from normlab.torch.restore import unconvert
from normlab.torch.sync import SyncBatchNorm

# the kernels use at most torch.get_num_threads() threads: torch.set_num_threads governs
# normlab too, and DataLoader workers (which set 1) run the serial kernels
_threads.limit_by(torch.get_num_threads)
# (and run on torch's own OpenMP threads where torch has them: see normlab.kernels.threads)

for _public in (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
                LayerNorm, LayerNorm2d, ChannelsFirstLayerNorm, Norm, RMSNorm, SyncBatchNorm, convert, unconvert,
                normalize, use_path, FusedAddRMSNorm, FusedAddLayerNorm, GatedRMSNorm, AdaLayerNorm, RecipeLayerNorm,
                UnweightedRMSNorm, BiasedRMSNorm, GammaRMSNorm, RMSNorm2d, Float32LayerNorm, Float32LayerNorm2d,
                WrittenOutLayerNorm, PerHeadLayerNorm, PerFrameGroupNorm, MultiHeadLayerNorm):
    _public.__module__ = __name__  # users (and pickles) name them normlab.torch.X, wherever they live
register_fusers()  # torch.ao.quantization.fuse_modules finds fusers for (Conv2d, normlab BatchNorm2d)
register_quantized_twins()  # and torch.ao.quantization.convert the quantized modules of the twins
register_with_opacus()  # Opacus' ModuleValidator flags and fixes the batch norm twins as torch.nn's

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "LayerNorm2d", "ChannelsFirstLayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "SyncBatchNorm", "Norm", "convert", "unconvert",
    "normalize", "use_path", "PATHS", "FusedAddRMSNorm", "FusedAddLayerNorm", "GatedRMSNorm", "AdaLayerNorm",
    "RecipeLayerNorm", "UnweightedRMSNorm", "BiasedRMSNorm", "GammaRMSNorm", "RMSNorm2d", "Float32LayerNorm",
    "Float32LayerNorm2d", "WrittenOutLayerNorm", "PerHeadLayerNorm", "PerFrameGroupNorm", "MultiHeadLayerNorm",
    "update_bn",
]
