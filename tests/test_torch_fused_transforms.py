"""The fused blocks (add + RMS and layer norm, Gemma's offset, the gated norm over groups
with the gate on either side, AdaLN-Zero) under the torch.func uses that
tests/test_torch_autograd_corners.py leaves out: ``vmap`` with ``in_dims`` batching the
residual, gate or conditioning embedding alone, ``hessian``, and ``functional_call`` with
replaced parameters (a model ensemble's stacked parameters under ``vmap`` too). Oracles:
the blocks' definitions in torch operations and diffusers' ``AdaLayerNormZero`` on the
same parameters, differentiated by torch in float64."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, hessian, vmap  # noqa: E402

import normlab.torch as nt  # noqa: E402

D = torch.float64


class _Definition(torch.nn.Module):
    """A block's definition in torch operations, holding the block's own parameters."""

    def __init__(self, block, forward):
        super().__init__()
        self.block, self.definition = block, forward

    def forward(self, x, other):
        return self.definition(self.block, x, other)


def _grouped_rms_norm(x, weight, groups, eps):
    rows = x.unflatten(-1, (groups, -1))
    return (rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight


def _cases():
    """name -> (block, its definition, the companion's shape for (batch, tokens, width))."""
    torch.manual_seed(0)
    blocks = {
        "FusedAddRMSNorm": (nt.FusedAddRMSNorm(6, dtype=D),
                            lambda b, x, r: (F.rms_norm(x + r, (6,), b.weight, 1e-6), x + r)),
        "FusedAddRMSNorm gemma": (nt.FusedAddRMSNorm(6, casting="gemma", weight_offset=1.0, dtype=D),
                                  lambda b, x, r: (F.rms_norm(x + r, (6,), 1 + b.weight, 1e-6), x + r)),
        "FusedAddLayerNorm": (nt.FusedAddLayerNorm(6, dtype=D),
                              lambda b, x, r: (F.layer_norm(x + r, (6,), b.weight, b.bias), x + r)),
        "GatedRMSNorm groups": (nt.GatedRMSNorm(6, group_size=3, dtype=D),
                                lambda b, x, z: _grouped_rms_norm(x, b.weight, 2, 1e-5) * F.silu(z)),
        "GatedRMSNorm gate first": (nt.GatedRMSNorm(6, group_size=3, norm_before_gate=False, dtype=D),
                                    lambda b, x, z: _grouped_rms_norm(x * F.silu(z), b.weight, 2, 1e-5)),
    }
    cases = {}
    for name, (block, definition) in blocks.items():
        with torch.no_grad():
            for p in block.parameters():
                p.uniform_(0.5, 1.5)
        cases[name] = (block, _Definition(block, definition))
    diffusers = pytest.importorskip("diffusers.models.normalization")
    original = diffusers.AdaLayerNormZero(6).double()
    ada = nt.AdaLayerNorm(6).double()
    ada.load_state_dict(original.state_dict())

    class Conditioned(torch.nn.Module):  # block(x, emb) for either, as DiT calls them
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x, emb):
            return self.norm(x, emb=emb)

    cases["AdaLayerNorm"] = (Conditioned(ada), Conditioned(original))
    return cases


CASES = _cases()


def _inputs(name, batch=3):
    torch.manual_seed(1)
    x = torch.randn(batch, 4, 6, dtype=D)
    return x, torch.randn((batch, 6) if name == "AdaLayerNorm" else (batch, 4, 6), dtype=D)


def _parameters(module):
    """The parameters that functional_call replaces, by the name both modules give them."""
    return {name.removeprefix("block."): p for name, p in module.named_parameters()}


def _call(module, parameters, x, other):
    if isinstance(module, _Definition):
        parameters = {f"block.{name}": p for name, p in parameters.items()}
    return functional_call(module, parameters, (x, other))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_batching_the_companion_alone_gives_the_definitions_outputs(name):
    block, definition = CASES[name]
    x, other = _inputs(name)
    if name == "AdaLayerNorm":  # each embedding conditions the whole batch of x
        x, other = x, other[:, None]
    else:
        x = x[0]
    torch.testing.assert_close(vmap(block, in_dims=(None, 0))(x, other), vmap(definition, in_dims=(None, 0))(x, other))


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_of_a_block_matches_its_definitions(name):
    block, definition = CASES[name]
    x, other = _inputs(name, batch=1)
    x, other = x[:, :2], other if name == "AdaLayerNorm" else other[:, :2]
    for argnums in (0, 1):  # the input's and the companion's (residual, gate or embedding)
        got = hessian(lambda *a: _first(block(*a)).sin().sum(), argnums=argnums)(x, other)
        expected = hessian(lambda *a: _first(definition(*a)).sin().sum(), argnums=argnums)(x, other)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_functional_call_with_replaced_parameters_gives_the_definitions_outputs_and_gradients(name):
    block, definition = CASES[name]
    x, other = _inputs(name)
    torch.manual_seed(2)
    replaced = {key: torch.randn_like(p) for key, p in _parameters(block).items()}

    def loss(module):
        return lambda parameters: sum(t.sin().sum() for t in _call(module, parameters, x, other))

    torch.testing.assert_close(_call(block, replaced, x, other), _call(definition, replaced, x, other))
    torch.testing.assert_close(grad(loss(block))(replaced), grad(loss(definition))(replaced))
    stacked = {key: torch.stack([p, p.flip(0)]) for key, p in replaced.items()}  # an ensemble of two
    torch.testing.assert_close(vmap(lambda p: _call(block, p, x, other))(stacked),
                               vmap(lambda p: _call(definition, p, x, other))(stacked))
