"""convert() on transformers' vision and speech families, as their users train them: Wav2Vec2's
feature extractor (a GroupNorm over time, one group per channel) and its stable layer-norm
variant (a LayerNorm on transposed features), Wav2Vec2-Conformer's BatchNorm1d over time,
LeViT's BatchNorm1d over tokens, ConvNeXt V2's channels-first layer norms on a channels_last
model, MobileViT's BatchNorm2d and LayerNorm on unfolded patches, Swin's patch merging on an
image its windows must pad, and BiT's group norms (those followed by an activation are left
alone, with a warning, as are Gemma3n's and WavTokenizer's audio norms). The oracle is the unconverted model (transformers' classes, torch.nn's
norms and torch's autograd), run in float64 on the same inputs and random masks."""

import copy
import random
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import normlab.torch as nt  # noqa: E402

_AUDIO = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
              mask_time_prob=0.3, mask_time_length=2)


def _tiny(kind: str):
    """A small model of ``kind`` with random weights, and its input (batch 3)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    audio = torch.randn(3, 1000, generator=generator)
    image = torch.randn(3, 3, 32, 32, generator=generator)
    if kind == "wav2vec2_group_norm":
        return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(feat_extract_norm="group", **_AUDIO)), audio
    if kind == "wav2vec2_stable_layer_norm":
        config = transformers.Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True, **_AUDIO)
        return transformers.Wav2Vec2Model(config), audio
    if kind == "wav2vec2_conformer":
        config = transformers.Wav2Vec2ConformerConfig(conv_depthwise_kernel_size=3, **_AUDIO)
        return transformers.Wav2Vec2ConformerModel(config), audio
    if kind == "levit":
        config = transformers.LevitConfig(image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2],
                                          depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16)
        return transformers.LevitModel(config), image
    if kind == "convnextv2_channels_last":
        config = transformers.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        return (transformers.ConvNextV2Model(config).to(memory_format=torch.channels_last),
                image.contiguous(memory_format=torch.channels_last))
    if kind == "mobilevit":
        config = transformers.MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32],
                                              neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32])
        return transformers.MobileViTModel(config), image
    if kind == "swin_padded_windows":
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[2, 4],
                                         window_size=2)
        return transformers.SwinModel(config), torch.randn(3, 3, 36, 44, generator=generator)
    config = transformers.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=4,
                                    layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True)
    return transformers.BitModel(config), image


KINDS = ["wav2vec2_group_norm", "wav2vec2_stable_layer_norm", "wav2vec2_conformer", "levit",
         "convnextv2_channels_last", "mobilevit", "swin_padded_windows", "bit_bottleneck"]


def _train_step(model, x, projection):
    """Output and parameter gradients of one training step, the random masks (SpecAugment's
    NumPy ones too) and drop paths drawn alike, and the model's buffers after it."""
    model.train()
    model.zero_grad()
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    input_name = "input_values" if x.dim() == 2 else "pixel_values"
    output = model(**{input_name: x}).last_hidden_state
    (output * projection(output)).sum().backward()
    return output.detach(), {name: p.grad for name, p in model.named_parameters()}, dict(model.named_buffers())


def _close(actual, expected, what, scale=None):
    """Equal up to float64 rounding, relative to ``scale`` (by default the largest value)."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_vision_and_speech_models_train_a_step_with_the_originals_outputs_gradients_and_statistics(kind):
    original, x = _tiny(kind)
    original.double()
    x = x.double()
    converted = copy.deepcopy(original)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nt.convert(converted)
    left_alone = [m for m in converted.modules() if type(m).__name__ == "BitGroupNormActivation"]
    if kind == "bit_bottleneck":  # group norm then ReLU: left alone; group norm then Identity: a GroupNorm
        assert len(caught) == 1 and "BitGroupNormActivation (embedder.norm" in str(caught[0].message)
        assert left_alone and all(not isinstance(m.activation, torch.nn.Identity) for m in left_alone)
        assert sum(isinstance(m, nt.GroupNorm) for m in converted.modules()) == 4
    else:
        assert not caught, [str(w.message) for w in caught]
    torch_norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
    unconverted = [name for name, m in converted.named_modules()
                   if isinstance(m, torch_norms) and not type(m).__module__.startswith("normlab.")
                   and type(m).__name__ != "BitGroupNormActivation"]
    assert not unconverted
    assert list(converted.state_dict()) == list(original.state_dict())

    weights = {}

    def projection(output):  # (a loss whose gradient no norm's backward cancels)
        key = tuple(output.shape)
        if key not in weights:
            weights[key] = torch.randn(key, dtype=output.dtype, generator=torch.Generator().manual_seed(3))
        return weights[key]

    expected, expected_grads, expected_buffers = _train_step(original, x, projection)
    actual, actual_grads, actual_buffers = _train_step(converted, x, projection)
    _close(actual, expected, "training output")
    assert actual.stride() == expected.stride()
    # a gradient that is zero but for rounding (a key projection's bias under softmax, a batch
    # norm's bias before another batch norm) is held to the rounding of the model's largest ones
    largest = max(grad.abs().max().item() for grad in expected_grads.values() if grad is not None)
    for name, grad in expected_grads.items():
        assert (actual_grads[name] is None) == (grad is None), name
        if grad is not None:
            _close(actual_grads[name], grad, name, scale=largest)
    for name, buffer in expected_buffers.items():
        if buffer.is_floating_point():  # (a running mean of a batch normalized before: zero but for rounding)
            _close(actual_buffers[name], buffer, name, scale=max(buffer.abs().max().item(), 1.0))
        else:
            assert torch.equal(actual_buffers[name], buffer), name
    original.eval(), converted.eval()
    input_name = "input_values" if x.dim() == 2 else "pixel_values"
    with torch.no_grad():
        _close(converted(**{input_name: x}).last_hidden_state, original(**{input_name: x}).last_hidden_state,
               "evaluation output")


def test_the_speech_norms_the_readme_lists_as_left_alone_are_left_alone_with_one_warning():
    # README: Gemma3n's cumulative group norm over time and WavTokenizer's layer norm modulated
    # by embeddings of a condition id compute what no normlab module does
    # (older transformers releases lack WavTokenizer)
    Gemma3nAudioCumulativeGroupNorm = pytest.importorskip(
        "transformers.models.gemma3n.modeling_gemma3n").Gemma3nAudioCumulativeGroupNorm
    WavTokenizerAdaLayerNorm = pytest.importorskip(
        "transformers.models.wavtokenizer.modeling_wavtokenizer").WavTokenizerAdaLayerNorm

    config = transformers.WavTokenizerConfig(decoder_hidden_size=8, decoder_attention_num_groups=2, adanorm_num_embeddings=2)
    model = torch.nn.ModuleDict(dict(cumulative=Gemma3nAudioCumulativeGroupNorm(8, (4,)),
                                     adaptive=WavTokenizerAdaLayerNorm(config)))
    with pytest.warns(UserWarning) as record:
        converted = nt.convert(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "left 2 norm layer(s) unconverted" in message
    assert "Gemma3nAudioCumulativeGroupNorm (cumulative)" in message and "WavTokenizerAdaLayerNorm (adaptive)" in message
    assert converted["cumulative"] is model["cumulative"] and converted["adaptive"] is model["adaptive"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("family, name", [("gemma3n", "Gemma3nRMSNorm"), ("gemma4", "Gemma4RMSNorm")])
def test_gemma3ns_rms_norm_gives_its_outputs_and_gradients_to_the_bit(family, name, with_scale, dtype):
    # Gemma3nRMSNorm (and Gemma 4's copy) takes the root's reciprocal as pow(mean(x²) + eps, -0.5):
    # the outputs of rsqrt, but pow's backward rounds the float32 input gradient otherwise (in
    # about one element in six), so the "gemma" and "llama" recipes gave other gradients
    cls = getattr(pytest.importorskip(f"transformers.models.{family}.modeling_{family}"), name)
    torch.manual_seed(0)
    original = cls(48, eps=1e-6, with_scale=with_scale)
    if with_scale:
        with torch.no_grad():
            original.weight.normal_()
    original.to(dtype)
    converted = nt.convert(copy.deepcopy(original))
    assert isinstance(converted, nt.RMSNorm if with_scale else nt.UnweightedRMSNorm)
    x = (torch.randn(4, 7, 48, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    grad = torch.randn(4, 7, 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    outputs = [module(leaf) for module, leaf in zip((original, converted), leaves)]
    for output in outputs:
        output.backward(grad)
    assert torch.equal(outputs[1], outputs[0])
    assert torch.equal(leaves[1].grad, leaves[0].grad)
    if with_scale:
        assert torch.equal(converted.weight.grad, original.weight.grad)


def test_a_converted_gemma3n_audio_encoder_trains_with_the_originals_gradients_to_the_bit():
    modeling = pytest.importorskip("transformers.models.gemma3n.modeling_gemma3n")
    config = transformers.Gemma3nAudioConfig(input_feat_size=16, hidden_size=32, conf_num_attention_heads=2,
                                             conf_num_hidden_layers=2, sscp_conv_channel_size=[8, 8],
                                             conf_attention_chunk_size=4, conf_attention_context_left=5)
    torch.manual_seed(0)
    original = modeling.Gemma3nAudioEncoder(config)
    with pytest.warns(UserWarning, match="Gemma3nAudioCumulativeGroupNorm"):  # (its group norms: left alone)
        converted = nt.convert(copy.deepcopy(original))
    assert sum(isinstance(m, nt.RMSNorm) for m in converted.modules()) == 18
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 40, 16, generator=generator)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[1, 30:] = True
    for model in (original, converted):
        model.train()
        output = model(features, padding).last_hidden_state
        (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for (name, expected), (_, actual) in zip(original.named_parameters(), converted.named_parameters()):
        assert torch.equal(actual.grad, expected.grad), name


def _readme_block(containing: str) -> str:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M) if containing in b]
    assert len(blocks) == 1, f"README has {len(blocks)} Python blocks with {containing!r}"
    return blocks[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["Wav2Vec2", "Hubert", "WavLM"])
def test_the_readmes_mask_hook_makes_each_padded_clip_of_a_converted_speech_model_come_out_as_alone(family):
    """The README's forward pre-hook, run as written (HuBERT and WavLM by their class names,
    as its comment says), against the original transformers model on each clip without its
    padding: the original itself gives otherwise on the padded batch."""
    block = _readme_block("register_forward_pre_hook")
    block = block.replace("Wav2Vec2Config", f"{family}Config").replace("Wav2Vec2Model", f"{family}Model")
    torch.manual_seed(0)
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "README.md block", "exec"), scope)
        original = getattr(transformers, f"{family}Model")(scope["config"]).eval()
        original.load_state_dict(scope["model"].state_dict())
        with torch.no_grad():
            padded = original(scope["audio"], attention_mask=scope["real"].long()).last_hidden_state
            for clip, length in enumerate(scope["lengths"].tolist()):
                alone = original(scope["audio"][clip:clip + 1, :length]).last_hidden_state[0]
                torch.testing.assert_close(scope["hidden"][clip, :len(alone)], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(padded[1, :len(alone)], alone, atol=1e-2)  # what the hook is for


_SPEECH = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
               conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
               hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
               layerdrop=0.0, mask_time_prob=0.0)


@pytest.mark.parametrize("family", ["Wav2Vec2", "Hubert", "WavLM", "UniSpeech", "UniSpeechSat"])
def test_a_padded_batch_through_the_readmes_mask_hook_trains_each_clip_as_the_original_trains_it_alone(family):
    """README's hook in training (dropout and SpecAugment off), a hypothesis property over the
    clips' lengths: the padded batch's outputs and every parameter's gradient equal those of the
    original transformers model run on each clip without its padding, in float64."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    config = getattr(transformers, f"{family}Config")(feat_extract_norm="group", **_SPEECH)
    torch.manual_seed(0)
    original = getattr(transformers, f"{family}Model")(config).double().train()
    converted = nt.convert(copy.deepcopy(original))
    lengths = torch.zeros(0, dtype=torch.long)

    def pass_mask(norm, args, kwargs):  # as README's, the frames of real samples counted
        frames = (lengths - config.conv_kernel[0]) // config.conv_stride[0] + 1
        kwargs["mask"] = (torch.arange(args[0].shape[-1]) < frames[:, None])[:, None, :]
        return args, kwargs

    converted.feature_extractor.conv_layers[0].layer_norm.register_forward_pre_hook(pass_mask, with_kwargs=True)

    @settings(max_examples=6)
    @given(st.lists(st.integers(40, 400), min_size=1, max_size=3), st.integers(0, 2**16))
    def padded_batch_trains_as_each_clip_alone(clip_lengths, seed):
        nonlocal lengths
        lengths = torch.tensor(clip_lengths)
        generator = torch.Generator().manual_seed(seed)
        real = torch.arange(max(clip_lengths)) < lengths[:, None]
        audio = torch.randn(real.shape, generator=generator, dtype=torch.float64) * real
        frames = converted._get_feat_extract_output_lengths(lengths).tolist()
        projections = [torch.randn(n, config.hidden_size, generator=generator, dtype=torch.float64) for n in frames]
        for model in (original, converted):
            model.zero_grad(set_to_none=True)
        padded = converted(audio, attention_mask=real.long()).last_hidden_state
        sum((padded[clip, :n] * projection).sum() for clip, (n, projection) in enumerate(zip(frames, projections))
            ).backward()
        for clip, (length, projection) in enumerate(zip(clip_lengths, projections)):
            alone = original(audio[clip:clip + 1, :length]).last_hidden_state[0]
            (alone * projection).sum().backward()
            torch.testing.assert_close(padded[clip, :len(alone)].detach(), alone.detach(), rtol=1e-9, atol=1e-9)
        largest = max(p.grad.abs().max().item() for p in original.parameters() if p.grad is not None)
        for (name, expected), actual in zip(original.named_parameters(), converted.parameters()):
            assert (actual.grad is None) == (expected.grad is None), name
            if expected.grad is not None:
                torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-7, atol=1e-9 * largest,
                                           msg=lambda m: f"{name}: {m}")

    padded_batch_trains_as_each_clip_alone()


@pytest.mark.parametrize("family", ["SEW", "SEWD", "Data2VecAudio", "SpeechT5"])
def test_the_speech_families_the_readme_says_no_mask_serves_give_otherwise_on_a_padded_batch_with_layer_norms(family):
    # README: their pooling or positional convolutions read the padded frames, so even with a
    # norm of each frame alone (feat_extract_norm="layer") a padded clip comes out otherwise
    extra = dict(squeeze_factor=2, position_buckets=8, max_relative_positions=16) if family == "SEWD" else \
        dict(squeeze_factor=2) if family == "SEW" else {}
    if family == "SpeechT5":
        extra = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_max_relative_position=16)
    config = getattr(transformers, f"{family}Config")(feat_extract_norm="layer", **_SPEECH, **extra)
    torch.manual_seed(0)
    if family == "SpeechT5":
        model = transformers.SpeechT5ForSpeechToText(config).speecht5.encoder
    else:
        model = getattr(transformers, f"{family}Model")(config)
    model = model.double().eval()
    lengths = torch.tensor([400, 241])
    real = torch.arange(400) < lengths[:, None]
    audio = torch.randn(real.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * real
    with torch.no_grad():
        padded = model(audio, attention_mask=real.long()).last_hidden_state
        first, second = (model(audio[clip:clip + 1, :length]).last_hidden_state[0]
                         for clip, length in enumerate(lengths.tolist()))
    torch.testing.assert_close(padded[0], first, rtol=1e-9, atol=1e-9)  # (a clip without padding: as alone)
    assert not torch.allclose(padded[1, :len(second)], second, atol=1e-3)


def test_the_readmes_masked_normalization_of_raw_audio_is_wav2vec2s_feature_extractor_normalization():
    """README's block, run as written, then a hypothesis property over clip lengths and levels:
    normalize(audio, "b [t]", mask=real, eps=1e-7) with the padding set to 0 is
    Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, transformers' per-clip NumPy loop."""
    from hypothesis import given
    from hypothesis import strategies as st

    import normlab

    normalize_clips = transformers.Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
    scope = {}
    exec(compile(_readme_block('"b [t]", mask=real, eps=1e-7'), "README.md block", "exec"), scope)
    expected = normalize_clips(list(scope["audio"]), scope["real"].astype(np.int32), padding_value=0.0)
    np.testing.assert_allclose(scope["input_values"], np.stack(expected), rtol=1e-5, atol=1e-5)

    @given(st.lists(st.integers(2, 300), min_size=1, max_size=4), st.floats(-1e3, 1e3), st.floats(1e-2, 1e2),
           st.integers(0, 2**16))
    def each_clip_as_the_feature_extractor_normalizes_it(lengths, level, spread, seed):
        real = np.arange(max(lengths)) < np.array(lengths)[:, None]
        noise = np.random.default_rng(seed).standard_normal(real.shape)
        audio = np.where(real, level + spread * noise, 0).astype(np.float32)
        actual = np.where(real, normlab.normalize(audio, "b [t]", mask=real, eps=1e-7), 0)
        assert actual.dtype == np.stack(normalize_clips(list(audio), real.astype(np.int32), padding_value=0.0)).dtype
        # the feature extractor's loop on the same samples in float64: run on float32 it sums in
        # float32, whose mean is off by 3e-4 of a clip's spread at a level 1400 spreads from zero
        # (lengths=[2], level=256, spread=0.1875), where normlab keeps float32's accuracy
        expected = np.stack(normalize_clips(list(audio.astype(np.float64)), real.astype(np.int32), padding_value=0.0))
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    each_clip_as_the_feature_extractor_normalizes_it()
