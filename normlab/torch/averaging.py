"""Weight averaging (SWA) on models that hold :class:`~normlab.torch.Norm` batch norms:
``torch.optim.swa_utils.update_bn`` finds the batch norms whose running statistics it
recomputes by ``isinstance(module, _BatchNorm)``, so it passes over a ``Norm`` with a batch
pattern (``"[b] c [h w]"``, ``"[b h w] c"``), whose running statistics then stay those of the
weights before averaging, and does nothing at all in a model without a torch batch norm.
:func:`update_bn` is torch's function for both."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from normlab.torch.modules import Norm
from normlab.torch.opacus_tables import spans_first_axis


def _batch_statistics_norms(model: nn.Module) -> list:
    """The modules whose running statistics ``update_bn`` recomputes: torch's batch norms
    (normlab's twins among them), and each ``Norm`` with running statistics whose pattern
    spans the batch, its first axis (an instance norm's, as torch's ``InstanceNorm`` with
    ``track_running_stats``, is left as torch leaves those)."""
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            or (isinstance(module, Norm) and module.track_running_stats and spans_first_axis(module.pattern))]


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: Optional[Union[int, torch.device]] = None) -> None:
    """``torch.optim.swa_utils.update_bn`` that recomputes the running statistics of
    :class:`~normlab.torch.Norm` batch norms too: one pass over ``loader`` in training mode
    with every batch norm's statistics reset and its momentum ``None`` (a cumulative
    average), then each momentum and the model's mode restored, as torch's does. Each batch
    is a tensor or a list or tuple whose first element is the model's input.

    >>> model = torch.nn.Sequential(Norm("[b] c", params="c", c=2, track_running_stats=True))
    >>> update_bn([torch.tensor([[1., 4.], [3., 8.]]), torch.tensor([[5., 0.], [7., 4.]])], model)
    >>> model[0].running_mean.tolist(), model[0].momentum, model.training
    ([4.0, 4.0], 0.1, True)
    """
    momenta = {}
    for module in _batch_statistics_norms(model):
        module.reset_running_stats()
        momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if device is not None:
            batch = batch.to(device)
        model(batch)
    for module, momentum in momenta.items():
        module.momentum = momentum
    model.train(was_training)
