"""``convert(model, fuse=True)`` on Hugging Face causal language models as users run them
after converting: other families of the LLaMA structure (and families of another
structure, which must stay as they are), greedy generation with the KV cache and left
padding, training gradients with and without gradient checkpointing, ``save_pretrained``,
``torch.save`` of the whole model. The oracle is always the unconverted transformers
model (built from a tiny config with random weights) on the same inputs, and torch's
autograd through it."""

import copy
import io
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from normlab.torch import FusedAddRMSNorm, GatedRMSNorm, convert  # noqa: E402
from tests.hf_classes import mamba_gated_norm, mamba_norm_keeps_groups  # noqa: E402

_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
# float32: the kernels round once from float64, transformers twice in float32
_FLOAT32 = dict(rtol=1e-5, atol=1e-5)


def _model(family: str, **extra):
    config = AutoConfig.for_model(family, **{**_TINY, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights away from their initial ones (and Gemma's zeros)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def _ids(shape=(2, 7), seed=2):
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


_NOTHING_FUSED = r"convert\(fuse=True\) fused no layer of \w+, because it holds none that fuse=True rewrites"


def _fused(model, fuses=True):
    """``convert(copy, fuse=True)``, with no warning (every norm of these families is
    converted) but, where ``fuses`` is False, the one that says nothing was fused."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = convert(copy.deepcopy(model), fuse=True)
    messages = [str(w.message) for w in caught]
    if fuses:
        assert messages == []
    else:
        assert len(messages) == 1 and re.search(_NOTHING_FUSED, messages[0]), messages
        assert type(model).__name__ in messages[0] and "LLaMA's pre-norm decoder layers" in messages[0]
    return fused


def _fused_layers(model) -> int:
    return sum(type(m).__name__.startswith("Fused") and not isinstance(m, FusedAddRMSNorm) for m in model.modules())


def _assert_same_logits(converted, model):
    """The converted model's logits are the unconverted one's: within float32 rounding, and
    bit for bit in bfloat16."""
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, **_FLOAT32)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        torch.testing.assert_close(copy.deepcopy(converted).to(torch.bfloat16)(ids).logits, bf16(ids).logits, rtol=0,
                                   atol=0)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "glm"])
def test_convert_fuse_rewrites_llama_style_families_and_keeps_their_logits(family):
    model = _model(family)
    fused = _fused(model)
    assert _fused_layers(fused) == 2
    assert fused.state_dict().keys() == model.state_dict().keys()
    _assert_same_logits(fused, model)  # (bfloat16 runs the composite with LLaMA's recipe: the same bits)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_convert_fuse_rewrites_gemma2_and_gemma3_sandwich_layers_and_keeps_logits_gradients_and_generation(family):
    # a norm on each side of attention and MLP: the add of the normed attention output
    # runs inside pre_feedforward_layernorm, with Gemma's recipe
    model = _model(family, attention_dropout=0.0)
    fused = _fused(model)
    assert _fused_layers(fused) == 2
    assert isinstance(fused.model.layers[0].pre_feedforward_layernorm, FusedAddRMSNorm)
    assert fused.state_dict().keys() == model.state_dict().keys()
    _assert_same_logits(fused, model)
    ids = _ids()
    for m in (model, fused):
        m.train()
        m(ids, labels=ids).loss.backward()
        m.eval()
    for (name, want), (_, got) in zip(model.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first sequence is left-padded
    ids[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(fused.generate(ids, **kwargs), model.generate(ids, **kwargs), rtol=0, atol=0)


def _gemma2_layer_scaling_its_attention_add(layer_class):
    """Gemma2's layer with one statement changed: the attention output added at half weight."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None, cache=None,
                **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                                          attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                          **kwargs)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states * 0.5
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states

    return type("HalfAddGemma2DecoderLayer", (layer_class,), {"forward": forward})


@pytest.mark.parametrize("family, extra", [("gemma2_half_add", {}), ("olmo2", {}), ("phi3", {}),
                                           ("granite", dict(residual_multiplier=0.5))])
def test_convert_fuse_leaves_decoder_layers_of_other_structures_unfused_and_their_logits_unchanged(family, extra):
    # a Gemma2 layer that scales its attention add, OLMo2 is post-norm, Phi3 adds through
    # dropouts, Granite scales what it adds: fusing the add into the norm would change them
    model = _model(family.replace("_half_add", ""), **extra)
    if family == "gemma2_half_add":
        for layer in model.model.layers:
            layer.__class__ = _gemma2_layer_scaling_its_attention_add(type(layer))
    fused = _fused(model, fuses=False)
    assert _fused_layers(fused) == 0
    assert not any(isinstance(m, FusedAddRMSNorm) for m in fused.modules())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_a_fused_layer_called_alone_takes_its_arguments_with_the_original_forwards_defaults(family):
    # Qwen2's and Gemma2's attention require an attention_mask, which their decoder layers
    # default to None: the fused forward must pass the default on, as the original does
    model = _model(family)
    fused = _fused(model)
    layer, fused_layer = model.model.layers[0], fused.model.layers[0]
    hidden = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(7).expand(2, 7))
    with torch.no_grad():
        want = layer(hidden, position_embeddings=position_embeddings)
        torch.testing.assert_close(fused_layer(hidden, position_embeddings=position_embeddings), want, **_FLOAT32)
        position = (position_embeddings, None) if family == "gemma2" else (None, None, None, False, position_embeddings)
        torch.testing.assert_close(fused_layer(hidden, *position), layer(hidden, *position), **_FLOAT32)
        for call in (layer, fused_layer):  # refused alike
            with pytest.raises(TypeError, match="multiple values for argument 'position_embeddings'"):
                call(hidden, *position, position_embeddings=position_embeddings)


def test_fused_model_generates_the_same_tokens_with_kv_cache_and_left_padding():
    model = _model("qwen3")
    fused = _fused(model)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first sequence is left-padded
    ids[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(fused.generate(ids, **kwargs), model.generate(ids, **kwargs), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_trains_with_the_unconverted_models_gradients(checkpointing):
    model = _model("llama", attention_dropout=0.0)
    fused = _fused(model)
    ids = _ids()
    for m in (model, fused):
        if checkpointing:
            m.gradient_checkpointing_enable()
        m.train()
        m(ids, labels=ids).loss.backward()
        m.eval()
    for (name, want), (_, got) in zip(model.named_parameters(), fused.named_parameters()):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # back in evaluation after training
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, **_FLOAT32)


def test_fused_model_round_trips_save_pretrained_into_the_original_class(tmp_path):
    model = _model("llama", tie_word_embeddings=True)
    fused = _fused(model)
    assert fused.lm_head.weight is fused.model.embed_tokens.weight
    fused.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _fused_layers(loaded) == 0 and loaded.state_dict().keys() == model.state_dict().keys()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_torch_save_of_a_fused_model_loads_back_fused_with_the_same_logits():
    model = _model("gemma")
    fused = _fused(model)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.model.layers[0]) is type(fused.model.layers[0])
    assert _fused_layers(loaded) == 2
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **_FLOAT32)


def test_convert_fuse_twice_or_on_a_submodule_fuses_each_layer_once():
    model = _model("llama")
    fused = _fused(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (layers fused before: nothing left to fuse, and no warning of it)
        convert(fused, fuse=True)
        convert(fused.model.layers[0], fuse=True)
    layer_class = type(fused.model.layers[0])
    assert layer_class.__mro__[1] is type(model.model.layers[0])  # not a fused class of a fused class
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, **_FLOAT32)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_convert_fuse_after_a_plain_convert_still_fuses_the_converted_norms(family):
    model = _model(family)
    fused = convert(convert(copy.deepcopy(model)), fuse=True)
    assert _fused_layers(fused) == 2
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, **_FLOAT32)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_fused_add_rms_norm_on_half_input_with_a_float32_weight_returns_llamas_dtype_and_values(x_dtype, w_dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    reference = LlamaRMSNorm(32, eps=1e-6).to(w_dtype)
    with torch.no_grad():
        reference.weight.normal_(generator=torch.Generator().manual_seed(0))
    ours = FusedAddRMSNorm(32, eps=1e-6).to(w_dtype)
    ours.weight = reference.weight
    gen = torch.Generator().manual_seed(1)
    x, r = (torch.randn(3, 32, generator=gen).to(x_dtype) for _ in range(2))
    y, total = ours(x, r)
    want = reference(x + r)  # weight · x̂.to(input dtype): promoted to the weight's float32
    assert y.dtype == want.dtype
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(total, x + r, rtol=0, atol=0)


def test_gated_rms_norm_on_bfloat16_input_with_a_float32_weight_matches_mamba2s_gated_norm():
    reference, group_size = mamba_gated_norm(32, 8)
    with torch.no_grad():
        reference.weight.normal_(generator=torch.Generator().manual_seed(0))
    ours = GatedRMSNorm(32, group_size=group_size, eps=1e-6, norm_before_gate=False, casting="llama")
    ours.weight = reference.weight
    gen = torch.Generator().manual_seed(1)
    x, z = (torch.randn(3, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    want = reference(x, z)
    got = ours(x, z)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


_MAMBA = {"mamba2": lambda groups: dict(num_heads=8, head_dim=8, expand=2, n_groups=groups, state_size=8,
                                         chunk_size=8),
          "falcon_h1": lambda groups: dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=groups,
                                           mamba_d_state=8, mamba_chunk_size=8, mamba_rms_norm=True)}


@pytest.mark.parametrize("family, groups", [("mamba2", 2), ("mamba2", 1), ("falcon_h1", 1)])
def test_convert_turns_the_gated_norms_of_mamba2_and_falcon_h1_into_gated_rms_norms_with_their_logits(family, groups):
    # with one group the gated norm without its gate is an RMS norm: it must not become
    # RMSNorm, whose second argument is a mask (the mixer passes the gate there)
    model = _model(family, **_MAMBA[family](groups))
    converted = _fused(model, fuses=False)  # (their mixer layers hold no residual add to fuse)
    gated = [m for m in converted.modules() if isinstance(m, GatedRMSNorm)]
    if family == "mamba2" and not mamba_norm_keeps_groups():
        groups = 1  # (this transformers release's Mamba2 norm ignores n_groups: convert() keeps that)
    assert len(gated) == 2 and all(m.hidden_size // m.group_size == groups for m in gated)
    assert converted.state_dict().keys() == model.state_dict().keys()
    _assert_same_logits(converted, model)
    if family == "mamba2" and groups == 2:
        ids = _ids()
        for m in (model, converted):
            m(ids, labels=ids).loss.backward()
        for (name, want), (_, got) in zip(model.named_parameters(), converted.named_parameters()):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gated_rms_norm_takes_the_gate_by_transformers_keyword():
    reference, _ = mamba_gated_norm(32, 8)
    ours = convert(copy.deepcopy(reference))
    assert isinstance(ours, GatedRMSNorm)
    gen = torch.Generator().manual_seed(1)
    x, z = (torch.randn(3, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(ours(x, gate=z), reference(x, gate=z), rtol=0, atol=0)
    with pytest.raises(TypeError, match="once"):
        ours(x, z, gate=z)


@pytest.mark.slow
def test_fused_model_compiles_to_one_full_graph_across_batch_sizes_with_the_unconverted_outputs():
    # transformers marks these models fullgraph-compilable; the fused blocks' torch path
    # must not break the graph (it built a plan, whose shape arithmetic dynamo cannot trace)
    model = _model("qwen3")
    compiled = torch.compile(_fused(model).model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 7), (3, 5)]:
            ids = _ids(shape)
            torch.testing.assert_close(compiled(ids).last_hidden_state, model.model(ids).last_hidden_state,
                                       **_FLOAT32)


@pytest.mark.slow
def test_gated_and_layer_norm_blocks_compile_to_one_full_graph_with_the_outputs_of_the_classes_they_replace():
    from diffusers.models.normalization import AdaLayerNormZero

    from normlab.torch import AdaLayerNorm, FusedAddLayerNorm

    gen = torch.Generator().manual_seed(3)
    x, z, emb = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen), torch.randn(2, 16)
    mamba, _ = mamba_gated_norm(16, 4)
    ada = AdaLayerNormZero(16, num_embeddings=None)
    ours_ada = AdaLayerNorm(16)
    ours_ada.load_state_dict(ada.state_dict())
    layer_norm = torch.nn.LayerNorm((4, 4))
    ours_layer_norm = FusedAddLayerNorm((4, 4))
    x4, z4 = x.reshape(2, 3, 4, 4), z.reshape(2, 3, 4, 4)
    with torch.no_grad():
        cases = [(torch.compile(convert(copy.deepcopy(mamba)), fullgraph=True)(x, z), mamba(x, z)),
                 (torch.compile(ours_ada, fullgraph=True)(x, emb=emb), ada(x, emb=emb)),
                 (torch.compile(ours_layer_norm, fullgraph=True)(x4, z4), (layer_norm(x4 + z4), x4 + z4))]
    for got, want in cases:
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, **_FLOAT32)


def test_convert_fuse_keeps_the_hooks_on_the_norms_it_replaces_and_leaves_a_hooked_post_attention_norm_unfused():
    model = _model("llama")
    seen = {}

    def record(name):
        return lambda module, inputs, output: seen.setdefault(name, []).append(output)

    layers = model.model.layers
    layers[0].post_attention_layernorm.register_forward_hook(record("post0"))
    layers[1].input_layernorm.register_forward_hook(record("in1"))
    fused = _fused(model)  # (deep-copies the model with its hooks)
    assert [type(layer).__name__.startswith("Fused") for layer in fused.model.layers] == [False, True]
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        got = fused(ids).logits
    torch.testing.assert_close(got, want, **_FLOAT32)
    assert {name: len(outputs) for name, outputs in seen.items()} == {"in1": 2, "post0": 2}  # both models ran them
    for name, (unconverted, converted) in seen.items():
        torch.testing.assert_close(converted, unconverted, **_FLOAT32, msg=name)


@pytest.mark.parametrize("family, name", [("llama", "post_attention_layernorm"),
                                          ("gemma2", "pre_feedforward_layernorm")], ids=["llama", "gemma2"])
def test_hooks_put_on_a_fused_norm_after_convert_see_its_one_input_and_output_as_on_the_unconverted_model(family,
                                                                                                         name):
    # as tensor parallelism's SequenceParallel (parallelize_module after convert) puts them: a
    # pre-hook that returns the one input it takes (fused, the residual was dropped) and a hook
    # on the output
    model = _model(family, attention_dropout=0.0)
    fused = _fused(model)
    assert isinstance(getattr(fused.model.layers[0], name), FusedAddRMSNorm)
    seen = []
    for m in (model, fused):
        norm = getattr(m.model.layers[0], name)
        norm.register_forward_pre_hook(lambda module, inputs: inputs[0] * 2)
        norm.register_forward_hook(lambda module, inputs, output: seen.append(output))
    ids = _ids()
    want, got = model(ids).logits, fused(ids).logits
    torch.testing.assert_close(got, want, **_FLOAT32)
    torch.testing.assert_close(seen[1], seen[0], **_FLOAT32)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, [getattr(fused.model.layers[0], name).weight], grad),
                               torch.autograd.grad(want, [getattr(model.model.layers[0], name).weight], grad),
                               **_FLOAT32)


def test_a_load_state_dict_pre_hook_on_a_fused_norm_sees_it_in_loads_and_copies_as_on_the_unconverted_model():
    # register_load_state_dict_pre_hook keeps a weak reference to its module, which fusing replaces
    import gc

    seen = []
    model = _model("llama")
    model.model.layers[1].post_attention_layernorm.register_load_state_dict_pre_hook(
        lambda module, state, prefix, *args: seen.append((prefix, module)))
    fused = _fused(model)
    gc.collect()  # (the replaced norms of the copy)
    for m in (model, fused):
        seen.clear()
        m.load_state_dict(copy.deepcopy(m).state_dict())
        assert [(prefix, module is m.model.layers[1].post_attention_layernorm) for prefix, module in seen] == [
            ("model.layers.1.post_attention_layernorm.", True)]
    assert isinstance(fused.model.layers[1].post_attention_layernorm, FusedAddRMSNorm)


@pytest.mark.parametrize("hooked", [False, True], ids=["all_fused", "one_left_unfused"])
def test_accelerate_keeps_each_fused_layer_on_one_device_as_it_keeps_the_unconverted_ones(hooked):
    # accelerate reads _no_split_modules as class names: a fused layer it split over devices
    # would add its residual across them
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils.dataclasses import get_module_class_from_name

    model = _model("llama")
    if hooked:  # (a hooked post-attention norm leaves its layer unfused)
        model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *args: None)
    fused = _fused(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for memory in (size // 2, size // 3):
        maps = [accelerate.infer_auto_device_map(m, max_memory={"cpu": memory, "disk": 1 << 40},
                                                 no_split_module_classes=m._no_split_modules) for m in (model, fused)]
        assert maps[1] == maps[0]
    for name in fused._no_split_modules:  # FSDP's transformer wrap policy finds each class it names
        assert get_module_class_from_name(fused, name) is not None, name


def test_hooks_removed_after_convert_fuse_stop_running_as_on_the_unconverted_model():
    # the hooks carried over to the fused norms must stay in the dicts their handles remove them from
    runs = {}
    for fuse in (False, True):
        model = _model("llama")
        calls = runs[fuse] = []
        norm = model.model.layers[1].input_layernorm
        handles = [norm.register_forward_pre_hook(lambda *args: calls.append("pre")),
                   norm.register_forward_hook(lambda *args: calls.append("forward")),
                   norm.register_forward_hook(lambda *args, **kwargs: calls.append("kwargs"), with_kwargs=True)]
        if fuse:
            assert _fused_layers(convert(model, fuse=True)) == 2
        with torch.no_grad():
            model(_ids())
            for handle in handles:
                handle.remove()
            model(_ids())
    assert runs[True] == runs[False] == ["pre", "forward", "kwargs"]


def test_convert_fuse_on_a_diffusers_model_warns_that_it_fused_nothing_and_converts_as_without_it():
    """A diffusers transformer holds no decoder layer that fuse=True rewrites: convert(fuse=True)
    fused nothing and said nothing, where the user asked for fusion. It now warns, naming the
    model and what fuse=True rewrites, and converts the norms as convert(model) does. Oracle:
    the model never converted (Wan's transformer, a tiny config with random weights)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    original = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4, text_dim=8,
        freq_dim=16, ffn_dim=16, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=8).eval()
    fused = _fused(original, fuses=False)
    plain = convert(copy.deepcopy(original))
    assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]
    assert {"RMSNorm", "Float32LayerNorm"} <= {type(m).__name__ for m in fused.modules()
                                               if type(m).__module__.startswith("normlab.")}
    inputs = dict(hidden_states=torch.randn(1, 4, 1, 4, 4), timestep=torch.tensor([3]),
                  encoder_hidden_states=torch.randn(1, 3, 8))
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs).sample, original(**inputs).sample, **_FLOAT32)
