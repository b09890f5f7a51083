"""normlab.torch.unconvert: a converted model back to the classes it was converted from, for
the tools that find layers by exact class through tables normlab cannot add to (FX graph
mode quantization). Oracles: torch's FX quantization of the model never converted, and the
original modules' classes, state and outputs."""

import copy
import io
import pickle
import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.test_convert_models import unconvert_exactly  # noqa: E402


class _Network(nn.Module):
    """Every norm that torch's FX quantization maps to a quantized module, and an RMS norm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.group_norm = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.instance_norm, self.layer_norm = nn.InstanceNorm2d(8, affine=True), nn.LayerNorm([8, 6, 6])
        self.linear, self.rms_norm = nn.Linear(8 * 36, 5), nn.RMSNorm(5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.layer_norm(self.instance_norm(self.group_norm(self.conv2(x))))
        return self.rms_norm(self.linear(x.flatten(1)))


def inputs(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _trained_network() -> nn.Module:
    torch.manual_seed(0)
    network = _Network()
    network(inputs((4, 3, 6, 6)))  # running statistics to fold
    return network.eval()


def _quantize_fx(model: nn.Module, flow: str, x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_fx, prepare_qat_fx

    model = copy.deepcopy(model)
    if flow == "fuse_fx":
        return fuse_fx(model)
    if flow == "prepare_fx":
        prepared = prepare_fx(model, get_default_qconfig_mapping("fbgemm"), (x,))
    else:
        torch.manual_seed(0)
        prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("fbgemm"), (x,))
    prepared(x)
    return convert_fx(prepared.eval())


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="needs the fbgemm engine")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # (torch.ao's own, about itself)
@pytest.mark.parametrize("flow", ["prepare_fx", "prepare_qat_fx", "fuse_fx"])
def test_fx_graph_mode_quantization_of_an_unconverted_model_is_torchs_of_the_original(flow):
    """FX graph mode quantization matches torch.nn's exact classes: unconverted, a converted
    model is fused and quantized as the original (the same modules, the same outputs)."""
    original = _trained_network()
    x = inputs((4, 3, 6, 6), seed=2)
    restored = nt.unconvert(nt.convert(copy.deepcopy(original)))
    expected, actual = _quantize_fx(original, flow, x), _quantize_fx(restored, flow, x)
    # (the root is a GraphModule class made per call)
    assert [type(m) for m in list(actual.modules())[1:]] == [type(m) for m in list(expected.modules())[1:]]
    torch.testing.assert_close(actual(x), expected(x), rtol=0, atol=0)


def test_unconvert_keeps_the_parameters_buffers_and_hooks():
    """The restored modules hold the twins' Parameter and buffer objects (an optimizer built
    on the converted model trains the restored one) and their hooks, and nothing of normlab's."""
    original = _trained_network()
    converted = nt.convert(copy.deepcopy(original))
    parameters, buffers = list(converted.parameters()), list(converted.buffers())
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    calls = []
    handle = converted.bn.register_forward_hook(lambda *args: calls.append(1))
    restored = nt.unconvert(converted)
    assert restored is converted
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    assert all(a is b for a, b in zip(restored.parameters(), parameters))
    assert all(a is b for a, b in zip(restored.buffers(), buffers))
    for module, expected in zip(restored.modules(), original.modules()):
        assert set(vars(module)) == set(vars(expected))
    x = inputs((4, 3, 6, 6), seed=3)
    torch.testing.assert_close(restored(x), original(x), rtol=0, atol=0)
    assert calls == [1]
    handle.remove()
    restored(x)
    assert calls == [1]
    restored.train()
    restored(x).square().sum().backward()
    before = restored.linear.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(restored.linear.weight, before)
    assert b"normlab" not in pickle.dumps(restored)


def test_a_twin_unconverts_to_its_torch_class_with_its_parametrization():
    torch.manual_seed(0)
    norm = nn.LayerNorm(6)
    parametrize.register_parametrization(norm, "weight", _Doubled())
    twin = nt.convert(copy.deepcopy(norm))
    restored = nt.unconvert(twin)
    assert isinstance(restored, nn.LayerNorm) and parametrize.is_parametrized(restored, "weight")
    assert type(restored).__bases__[0] is nn.LayerNorm
    x = inputs((3, 6))
    torch.testing.assert_close(restored(x), norm(x), rtol=0, atol=0)


class _Doubled(nn.Module):
    def forward(self, weight):
        return weight * 2


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))


def test_a_converted_transformers_model_gets_its_own_norm_classes_back():
    original = _llama()
    restored = nt.unconvert(nt.convert(copy.deepcopy(original)))
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    assert "_init_weights" not in vars(restored)
    torch.testing.assert_close(restored(IDS).logits, original(IDS).logits, rtol=0, atol=0)


def test_a_converted_diffusers_model_gets_its_own_norm_classes_back():
    """unconvert left a diffusers model's FP32LayerNorm, RMSNorm and MochiRMSNorm as normlab's
    Float32LayerNorm and RMSNorm, warning that they had no class of the model to go back to:
    a whole-model torch.save of the restored model still needed normlab to load. Oracle: the
    model never converted (Wan's and Mochi's transformers, tiny configs)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4,
                                          in_channels=4, out_channels=4, text_dim=8, freq_dim=16, ffn_dim=16,
                                          num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          rope_max_seq_len=8).eval()
    mochi = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                              pooled_projection_dim=8, in_channels=4, qk_norm="rms_norm",
                                              text_embed_dim=8, time_embed_dim=4, max_sequence_length=4).eval()
    wan_inputs = dict(hidden_states=torch.randn(1, 4, 1, 4, 4), timestep=torch.tensor([3]),
                      encoder_hidden_states=torch.randn(1, 3, 8))
    mochi_inputs = dict(hidden_states=torch.randn(1, 4, 1, 4, 4), timestep=torch.tensor([3]),
                        encoder_hidden_states=torch.randn(1, 4, 8),
                        encoder_attention_mask=torch.ones(1, 4, dtype=torch.bool))
    for original, twins, inputs in ((wan, {"Float32LayerNorm", "RMSNorm"}, wan_inputs),
                                    (mochi, {"RMSNorm", "UnweightedRMSNorm"}, mochi_inputs)):
        converted = nt.convert(copy.deepcopy(original))
        assert twins <= {type(m).__name__ for m in converted.modules() if type(m).__module__.startswith("normlab.")}
        restored = unconvert_exactly(converted, original)
        with torch.no_grad():
            torch.testing.assert_close(restored(**inputs).sample, original(**inputs).sample, rtol=0, atol=0)
        saved = io.BytesIO()
        torch.save(restored, saved)
        assert b"normlab" not in saved.getvalue()


def _gemma2():
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("make, fused_name, eps_name", [(_llama, "post_attention_layernorm", "variance_epsilon"),
                                                        (_gemma2, "pre_feedforward_layernorm", "eps")],
                         ids=["llama", "gemma2"])
def test_the_layers_that_convert_fused_get_their_own_classes_back(make, fused_name, eps_name):
    """unconvert left the decoder layers that convert(model, fuse=True) fused, and their
    FusedAddRMSNorms, with a warning that they had no class to go back to: a whole-model
    torch.save of the restored model still needed normlab to load. Oracle: the model never
    converted, its fused norm's epsilon changed as the fused one's was."""
    original = make()
    converted = nt.convert(copy.deepcopy(original), fuse=True)
    assert isinstance(getattr(converted.model.layers[0], fused_name), nt.FusedAddRMSNorm)
    getattr(converted.model.layers[0], fused_name).eps = 0.5
    setattr(getattr(original.model.layers[0], fused_name), eps_name, 0.5)
    parameters = list(converted.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = nt.unconvert(converted)
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    assert all(a is b for a, b in zip(restored.parameters(), parameters, strict=True))
    assert ([m.__dict__.get("_no_split_modules") for m in restored.modules()]
            == [m.__dict__.get("_no_split_modules") for m in original.modules()])
    torch.testing.assert_close(restored(IDS).logits, original(IDS).logits, rtol=0, atol=0)
    saved = io.BytesIO()
    torch.save(restored, saved)
    assert b"normlab" not in saved.getvalue()


def test_modules_no_torch_class_computes_stay_with_a_warning():
    model = nn.Sequential(nt.Norm("b [c] t", params="c", c=4), nt.LayerNorm2d(4), nt.RMSNorm(4, casting="gemma"),
                          nt.FusedAddRMSNorm(4), nt.LayerNorm(4))
    kept = list(model)[:4]
    with pytest.warns(UserWarning, match=r"left 4 module\(s\) as they are.*0 \(Norm\), 1 \(LayerNorm2d\)"):
        nt.unconvert(model)
    assert list(model)[:4] == kept
    assert type(model[4]) is nn.LayerNorm


def test_a_model_with_nothing_converted_unconverts_without_a_warning():
    model = _trained_network()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nt.unconvert(model) is model


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # (torch.ao's own, about itself)
def test_dynamic_quantization_of_a_converted_model_is_torchs_of_the_original():
    """quantize_dynamic quantizes the linear layers and keeps every norm in float: a converted
    model needs no unconvert, and keeps its twins."""
    from torch.ao.quantization import quantize_dynamic

    original = _trained_network()
    converted = nt.convert(copy.deepcopy(original))
    expected = quantize_dynamic(original, {nn.Linear}, dtype=torch.qint8)
    actual = quantize_dynamic(converted, {nn.Linear}, dtype=torch.qint8)
    assert type(actual.linear) is type(expected.linear) and type(actual.bn) is nt.BatchNorm2d
    x = inputs((4, 3, 6, 6), seed=4)
    torch.testing.assert_close(actual(x), expected(x))  # (the kernels round float32 once: within an ulp of torch's)


@pytest.mark.slow  # (torchao's import and the exports: over a minute)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("qat", [False, True], ids=["post_training", "qat"])
def test_pt2e_quantization_of_an_unconverted_model_is_torchaos_of_the_original(qat):
    """pt2e quantization (torchao's since torch 2.13 dropped torch.ao's) finds a batch norm by the
    class name torch.export records for it: X86InductorQuantizer's QAT leaves a converted
    model's conv and batch norm unfolded (0.04 off here); unconverted before the export, the
    model is quantized as the original."""
    pytest.importorskip("torchao", reason="pt2e quantization lives in torchao: pip install torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    original = _trained_network()
    x = inputs((4, 3, 6, 6), seed=2)
    outputs = []
    for model in (original, nt.unconvert(nt.convert(copy.deepcopy(original)))):
        exported = torch.export.export(copy.deepcopy(model).train(qat), (x,)).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=qat))
        torch.manual_seed(0)
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(exported, quantizer)
        prepared(x)
        outputs.append(convert_pt2e(prepared)(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


class _WithBlock(nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network, self.block = network, nt.FusedAddRMSNorm(5)

    def forward(self, x):
        return self.block(self.network(x), x[:, 0, 0, :5])[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.ao's own, about itself)
@pytest.mark.parametrize("prepare", ["prepare_fx", "prepare_qat_fx"])
def test_fx_graph_mode_quantization_of_a_converted_model_warns_and_names_unconvert(prepare):
    """Without unconvert, FX leaves the twins in float: each says so, once, and names the fix."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization import quantize_fx

    converted = _WithBlock(nt.convert(_trained_network())).train(prepare == "prepare_qat_fx")
    mapping = (get_default_qconfig_mapping if prepare == "prepare_fx" else get_default_qat_qconfig_mapping)("fbgemm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(quantize_fx, prepare)(converted, mapping, (inputs((4, 3, 6, 6)),))
    named = sorted(str(w.message).split("normlab's ")[1].split(" ")[0] for w in caught
                   if "call normlab.torch.unconvert(model) before prepare_fx" in str(w.message))
    assert named == ["BatchNorm2d", "FusedAddRMSNorm", "GroupNorm", "InstanceNorm2d", "LayerNorm", "RMSNorm"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.ao's own, about itself)
def test_fuse_fx_of_a_converted_model_warns_and_names_unconvert():
    """fuse_fx traces with torch.fx's own tracer and leaves the twins unfused, as prepare_fx
    does: each says so, once, and names the fix."""
    from torch.ao.quantization.quantize_fx import fuse_fx

    converted = _WithBlock(nt.convert(_trained_network())).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse_fx(converted)
    named = sorted(str(w.message).split("normlab's ")[1].split(" ")[0] for w in caught
                   if "call normlab.torch.unconvert(model) before fuse_fx" in str(w.message))
    assert named == ["BatchNorm2d", "FusedAddRMSNorm", "GroupNorm", "InstanceNorm2d", "LayerNorm", "RMSNorm"]
    assert isinstance(fused.network.bn, nt.BatchNorm2d)  # (what the warning says: left unfused)


def test_fx_symbolic_trace_of_a_converted_model_gives_no_quantization_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.fx.symbolic_trace(nt.convert(_trained_network()))


def _tiny_sd3():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                           caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                           qk_norm="rms_norm")


def _tiny_mochi():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                             pooled_projection_dim=8, in_channels=4, qk_norm="rms_norm",
                                             text_embed_dim=8, time_embed_dim=4, max_sequence_length=4)


def _tiny_wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4,
                                           in_channels=4, out_channels=4, text_dim=8, freq_dim=16, ffn_dim=16,
                                           num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                           rope_max_seq_len=8)


def _tiny_transformers(name):
    def make():
        transformers = pytest.importorskip("transformers")
        config = getattr(transformers, f"{name}Config")(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        return getattr(transformers, f"{name}Model")(config).eval()
    return make


def _pyg_norms():
    pyg_norm = pytest.importorskip("torch_geometric.nn.norm")
    return nn.ModuleList([pyg_norm.InstanceNorm(4), pyg_norm.InstanceNorm(4, affine=True, track_running_stats=True),
                          pyg_norm.LayerNorm(4), pyg_norm.LayerNorm(4, affine=False, mode="node"),
                          pyg_norm.GraphNorm(4)])


def _torch_norms():
    return nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4, bias=False), nn.RMSNorm(4, eps=1e-3), nn.BatchNorm1d(4),
                         nn.BatchNorm2d(4, track_running_stats=False), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4),
                         nn.InstanceNorm1d(4, affine=True, track_running_stats=True), nn.SyncBatchNorm(4))


@pytest.mark.filterwarnings("ignore::UserWarning")  # (transformers' own, about the tiny configs)
@pytest.mark.parametrize("make, fuse", [
    (_torch_norms, False), (_pyg_norms, False), (_tiny_sd3, False), (_tiny_mochi, False), (_tiny_wan, False),
    (_tiny_transformers("Llama"), False), (_tiny_transformers("Llama"), True), (_tiny_transformers("Gemma2"), True),
    (_tiny_transformers("Olmo"), False), (_tiny_transformers("Cohere"), False),
    (_tiny_transformers("Qwen3Next"), False)],
    ids=["torch", "pyg", "sd3", "mochi", "wan", "llama", "llama_fused", "gemma2_fused", "olmo", "cohere", "qwen3_next"])
def test_unconvert_gives_back_exactly_the_modules_convert_took(make, fuse):
    """A restored norm kept what its twin added (diffusers' RMSNorm a ``normalized_shape``,
    LLaMA's norm an ``eps`` beside its ``variance_epsilon``, OLMo's ``weight = None`` in its
    parameters), and a fused norm lost what transformers set (``_is_hf_initialized``).
    Oracle: each module's own attributes before convert (the same values, the same Parameter
    and buffer objects, the same hooks), its ``state_dict`` keys and its ``repr``."""
    model = make()
    first_norm = next(m for m in model.modules() if "norm" in type(m).__name__.lower() and m is not model)
    first_norm.register_forward_hook(_kept_hook)
    before = [(name, type(m), dict(vars(m)), repr(m), list(m.state_dict())) for name, m in model.named_modules()]
    tables = ("_parameters", "_buffers", "_modules")
    before = [(name, cls, {key: dict(value) if key in tables or "hooks" in key else value
                           for key, value in attributes.items()}, text, keys)
              for name, cls, attributes, text, keys in before]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = nt.convert(model, fuse=fuse)
    assert any(type(m).__module__.startswith("normlab.") for m in converted.modules())
    restored = nt.unconvert(converted)
    after = list(restored.named_modules())
    assert [name for name, _ in after] == [name for name, *_ in before]
    for (name, module), (_, cls, attributes, text, keys) in zip(after, before):
        assert _class_of_restored(module) is cls, name
        assert set(vars(module)) == set(attributes), (name, set(vars(module)) ^ set(attributes))
        for key, value in attributes.items():
            if key in ("_parameters", "_buffers"):
                assert list(getattr(module, key)) == list(value), (name, key)
                assert all(getattr(module, key)[k] is v for k, v in value.items()), (name, key)
            elif key == "_modules":
                assert list(module._modules) == list(value), name
            elif "hooks" in key:
                assert list(getattr(module, key)) == list(value), (name, key)
            else:
                assert type(vars(module)[key]) is type(value) and vars(module)[key] == value, (name, key)
        assert repr(module) == text, name
        assert list(module.state_dict()) == keys, name
    saved = io.BytesIO()
    torch.save(restored, saved)
    assert b"normlab" not in saved.getvalue()


def _kept_hook(module, args, output):
    return None


def _class_of_restored(module):
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


@pytest.mark.parametrize("norm", ["instance_norm", "layer_norm", "graph_norm"])
def test_a_converted_pyg_network_that_has_trained_gets_pygs_norm_classes_back(norm):
    """PyG's twins were left, with a warning that no class could take them back, where PyG's
    own classes compute them. Oracle: PyG's GIN never converted, trained by the same steps."""
    models = pytest.importorskip("torch_geometric.nn.models")
    torch.manual_seed(0)
    original = models.GIN(5, 8, 2, 3, norm=norm, norm_kwargs={"affine": True} if norm == "instance_norm" else None)
    converted = nt.convert(copy.deepcopy(original))
    x, edges, batch = inputs((7, 5)), torch.tensor([[0, 1, 2, 4, 5], [1, 2, 0, 5, 6]]), torch.tensor([0, 0, 0, 1, 2, 2, 2])
    for model in (original, converted):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x, edges, batch=batch).square().sum().backward()
        optimizer.step()
    restored = unconvert_exactly(converted, original)
    with torch.no_grad():
        torch.testing.assert_close(restored(x, edges, batch=batch), original(x, edges, batch=batch))
    saved = io.BytesIO()
    torch.save(restored, saved)
    assert b"normlab" not in saved.getvalue()
