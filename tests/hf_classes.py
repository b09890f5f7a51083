"""transformers' classes whose signature changed between the releases a user may get
(Python 3.10 gets transformers 5.20, the last release that supports it; newer Pythons
get the newest): the tests build them through here."""

from __future__ import annotations

import inspect


def mamba_norm_keeps_groups() -> bool:
    """Whether transformers' ``MambaRMSNormGated`` normalizes groups of ``group_size``. Its
    releases before that argument normalize whole rows whatever the model's ``n_groups``
    (transformers#35943), and convert() then keeps their whole-row statistics."""
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    return "group_size" in inspect.signature(MambaRMSNormGated.__init__).parameters


def mamba_gated_norm(hidden_size: int, group_size: int, eps: float = 1e-6):
    """transformers' Mamba2 gated RMS norm over groups of ``group_size``, and the group
    size it computes (``hidden_size`` on releases that normalize whole rows): the size a
    twin must be given to compute what it computes."""
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    if mamba_norm_keeps_groups():
        return MambaRMSNormGated(hidden_size, group_size=group_size, eps=eps), group_size
    return MambaRMSNormGated(hidden_size, eps=eps), hidden_size
