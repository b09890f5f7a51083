"""torch features on models that hold the fused blocks, against the same models built
from the classes the blocks replace (transformers' LlamaRMSNorm and MambaRMSNormGated,
torch.nn.LayerNorm, diffusers' AdaLayerNormZero) run through the same feature."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.composites import AddNorm  # noqa: E402
from tests.hf_classes import mamba_gated_norm  # noqa: E402

WIDTH = 8


class _PreNormLayer(nn.Module):
    """A pre-norm residual layer as transformers writes it: the norm's outputs unpacked."""

    def __init__(self, norm):
        super().__init__()
        self.proj, self.norm = nn.Linear(WIDTH, WIDTH), norm

    def forward(self, x, other):
        y, total = self.norm(self.proj(x), other)
        return self.proj(y) + total


class _GatedLayer(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.proj, self.norm = nn.Linear(WIDTH, WIDTH), norm

    def forward(self, x, z):
        return self.proj(self.norm(self.proj(x), z))


class _ModulatedLayer(nn.Module):
    """DiT's block entry: the modulated norm, then its gate on a projection."""

    def __init__(self, norm):
        super().__init__()
        self.proj, self.norm = nn.Linear(WIDTH, WIDTH), norm

    def forward(self, x, emb):
        y, gate_msa, _shift_mlp, _scale_mlp, _gate_mlp = self.norm(x, emb=emb)
        return x + gate_msa[:, None] * self.proj(y)


def _layers():
    """(id, the layer on a normlab block, the same layer on the class the block replaces)."""
    torch.manual_seed(0)
    mamba, group_size = mamba_gated_norm(WIDTH, 4)
    ada = pytest.importorskip("diffusers.models.normalization").AdaLayerNormZero(WIDTH)
    originals = {"FusedAddRMSNorm": (_PreNormLayer(AddNorm(LlamaRMSNorm(WIDTH, eps=1e-6))),
                                     lambda: nt.FusedAddRMSNorm(WIDTH, eps=1e-6)),
                 "FusedAddLayerNorm": (_PreNormLayer(AddNorm(nn.LayerNorm(WIDTH))),
                                       lambda: nt.FusedAddLayerNorm(WIDTH)),
                 "GatedRMSNorm": (_GatedLayer(mamba),
                                  lambda: nt.GatedRMSNorm(WIDTH, eps=1e-6, group_size=group_size,
                                                          norm_before_gate=False)),
                 "AdaLayerNorm": (_ModulatedLayer(ada), lambda: nt.AdaLayerNorm(WIDTH))}
    cases = []
    for name, (original, make) in originals.items():
        with torch.no_grad():
            for p in original.parameters():
                p.uniform_(0.5, 1.5)
        layer = copy.deepcopy(original)
        layer.norm = make()
        replaced = original.norm.norm if isinstance(original.norm, AddNorm) else original.norm
        layer.norm.load_state_dict(replaced.state_dict())
        cases.append((name, layer, original))
    return cases


NAMES = ["FusedAddRMSNorm", "FusedAddLayerNorm", "GatedRMSNorm", "AdaLayerNorm"]


def _inputs(name, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, WIDTH, generator=gen)
    other = torch.randn((batch, WIDTH) if name == "AdaLayerNorm" else (batch, 3, WIDTH), generator=gen)
    return x, other


@pytest.mark.parametrize("index", range(4), ids=NAMES)
def test_fx_traces_a_layer_holding_a_fused_block_into_one_leaf_call_with_the_replaced_classes_outputs(index):
    """The block is recorded as one call, whose tuple output the layer unpacks as it
    unpacks theirs. (fx traces through LlamaRMSNorm, torch.nn.LayerNorm and
    AdaLayerNormZero; transformers' gated norms do not trace: they read len(x.shape).)"""
    name, layer, original = _layers()[index]
    traced = torch.fx.symbolic_trace(layer)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert calls.count("norm") == 1
    for batch in (2, 5):
        x, other = _inputs(name, batch, seed=batch)
        torch.testing.assert_close(traced(x, other), original(x, other))


@pytest.mark.parametrize("index", range(4), ids=NAMES)
def test_fx_refuses_a_fused_block_as_the_root_module_with_a_type_error_saying_what_traces_it(index):
    _, layer, _ = _layers()[index]
    with pytest.raises(TypeError, match="inside a model, not as the root module"):
        torch.fx.symbolic_trace(layer.norm)



@pytest.mark.parametrize("index", range(2), ids=NAMES[:2])
@pytest.mark.parametrize("made_in_inference_mode", ["residual", "residual_and_input"])
def test_a_residual_made_in_inference_mode_trains_the_layer_as_the_composite_does(index, made_in_inference_mode):
    """Embeddings cached under torch.inference_mode() as the residual stream of a layer that
    trains: autograd cannot save an inference tensor, and the composite saves only the sum."""
    name, layer, original = _layers()[index]
    x, residual = _inputs(name)
    with torch.inference_mode():
        cached, cached_x = residual.clone(), x.clone()
    gradients = []
    for model in (layer, original):
        norm = model.norm if model is layer else model.norm.norm
        h = model.proj(x) if made_in_inference_mode == "residual" else cached_x
        y, total = model.norm(h, cached)
        loss = (y * torch.linspace(-1, 1, WIDTH)).sum() + total.pow(2).sum()
        gradients.append(torch.autograd.grad(loss, [*model.proj.parameters(), *norm.parameters()], allow_unused=True))
    torch.testing.assert_close(gradients[0], gradients[1])


class _DropConnect(nn.Module):
    """A parametrization that draws random numbers on every call and counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, value):
        self.calls += 1
        return nn.functional.dropout(value, 0.25, training=True)


@pytest.mark.parametrize("index", range(3), ids=NAMES[:3])
def test_a_parametrization_of_a_blocks_weight_runs_once_a_call_as_in_the_replaced_classes(index):
    """The classes a block replaces compute each parametrized tensor once a call: a
    parametrization that draws random numbers (DropConnect) runs as often on the block, so
    outputs, gradients and the random stream after the calls are theirs."""
    name, layer, original = _layers()[index]
    results = []
    for model, norm in ((original, original.norm.norm if name.startswith("FusedAdd") else original.norm),
                        (layer, layer.norm)):
        for tensor_name in ("weight", "bias"):
            if getattr(norm, tensor_name, None) is not None:
                nn.utils.parametrize.register_parametrization(norm, tensor_name, _DropConnect())
        torch.manual_seed(2)
        outputs = []
        for grad in (True, False):
            x, other = (t.requires_grad_(grad) for t in _inputs(name))
            with torch.set_grad_enabled(grad):
                y = model(x, other)
            if grad:
                y.square().sum().backward()
            outputs += [y.detach(), x.grad, other.grad]
        calls = [p.calls for p in norm.modules() if isinstance(p, _DropConnect)]
        results.append((outputs, [p.grad for p in model.parameters()], calls, torch.rand(2)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)  # (float32: rounded otherwise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(2), ids=NAMES[:2])
def test_the_sum_of_inputs_that_need_no_gradient_needs_none_beside_a_trained_weight(index, dtype):
    """A layer whose input and residual stream need no gradient (frozen embeddings) while
    its norm trains: ``x + residual`` needs none, as the composite's sum does, and reads
    into NumPy; the output needs one, for the weight."""
    name, layer, original = _layers()[index]
    x, residual = (t.to(dtype) for t in _inputs(name))
    y, total = layer.norm.to(dtype)(x, residual)
    want_y, want_total = original.norm.to(dtype)(x, residual)
    assert (total.requires_grad, total.grad_fn, y.requires_grad) == (False, None, True)
    assert (want_total.requires_grad, want_y.requires_grad) == (False, True)
    torch.testing.assert_close(total.numpy(), want_total.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("name, made_in_inference_mode", [
    ("FusedAddRMSNorm", "input"), ("GatedRMSNorm", "input"), ("GatedRMSNorm", "gate"),
    ("GatedRMSNorm", "input_and_gate"), ("AdaLayerNorm", "input")])
def test_inputs_made_in_inference_mode_train_the_norm_as_the_replaced_class_does(name, made_in_inference_mode):
    """Activations cached under torch.inference_mode() fed to a norm that trains: the kernels'
    backward would save them, which autograd refuses; the replaced classes save only what
    their operations make of them. (nn.LayerNorm itself refuses such an input.)"""
    _, layer, original = _layers()[NAMES.index(name)]
    x, other = _inputs(name)
    with torch.inference_mode():
        cached_x, cached_other = x.clone(), other.clone()
    x = cached_x if "input" in made_in_inference_mode else layer.proj(x)
    other = cached_other if "gate" in made_in_inference_mode else other
    gradients = []
    for norm in (layer.norm, original.norm.norm if name == "FusedAddRMSNorm" else original.norm):
        if name == "AdaLayerNorm":
            y = norm(x, emb=other)[0]
        else:
            y = norm(x) if name == "FusedAddRMSNorm" else norm(x, other)
        loss = (y * torch.linspace(-1, 1, WIDTH)).square().sum()
        gradients.append(torch.autograd.grad(loss, list(norm.parameters())))
    torch.testing.assert_close(gradients[0], gradients[1])


def test_a_training_call_of_a_fused_block_asks_once_whether_autograd_records_it(monkeypatch):
    """A small block's per-call work: the check for tensors made in inference mode and the
    kernels' call share one answer (it was asked twice, and the check ran a generator)."""
    from normlab.torch import fused as fused_module

    asked = []
    records = fused_module._records_autograd
    monkeypatch.setattr(fused_module, "_records_autograd", lambda tensors: asked.append(1) or records(tensors))
    norm = nt.FusedAddRMSNorm(WIDTH)
    x = torch.randn(2, WIDTH, requires_grad=True)
    for _ in range(2):  # (the first call of a shape builds its cached call)
        asked.clear()
        y, total = norm(x, torch.randn(2, WIDTH))
    assert len(asked) == 1 and y.requires_grad and total.requires_grad
