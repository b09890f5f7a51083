"""torch's transforms and module features on the twins that convert() makes of the newer
norm classes (ConvNeXt's and timm's channels-first layer norms, VitDet's, the recipe norms
of transformers and diffusers, the per-head, multi-head and per-frame pattern norms, the
gated, fused and PyG norms). Oracle: the original class,
built from its source, under the same feature on the same parameters and input."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from tests import mirrored_norms  # noqa: E402


def _converted(original):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in original.parameters():
            p.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (each is converted)
        return nt.convert(copy.deepcopy(original))


def _image(dtype=torch.float32):
    return torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)


CHANNELS_FIRST = {  # name -> (the original, the twin's class)
    "torchvision LayerNorm2d": (lambda: mirrored_norms.TorchvisionLayerNorm2d(4, eps=1e-6), "LayerNorm2d"),
    "timm LayerNorm2dFp32": (lambda: mirrored_norms.TimmLayerNorm2dFp32(4), "Float32LayerNorm2d"),
}


@pytest.mark.parametrize("name", list(CHANNELS_FIRST))
def test_jacfwd_of_a_channels_first_layer_norm_gives_the_originals_jacobian(name):
    """jacfwd runs forward-mode AD inside vmap, where a tensor takes no channels_last memory
    format: the twin raised torch's "NYI: Tensor.clone(memory_format) inside vmap"."""
    make, twin_class = CHANNELS_FIRST[name]
    original = make()
    twin = _converted(original)
    assert type(twin).__name__ == twin_class
    x = _image()
    torch.testing.assert_close(torch.func.jacfwd(twin)(x), torch.func.jacfwd(original)(x))


def test_vmap_of_vitdets_layer_norm_gives_the_originals_outputs():
    """Under vmap the twin (a ChannelsFirstLayerNorm) takes torch's operations; it then
    copied their output into a new tensor of the input's strides, which vmap refuses
    ("vmap: inplace arithmetic(self, *extra_args) is not possible")."""
    vitdet = pytest.importorskip("transformers.models.vitdet.modeling_vitdet")
    original = vitdet.VitDetLayerNorm(4)
    twin = _converted(original)
    assert type(twin).__name__ == "ChannelsFirstLayerNorm"
    x = _image()
    found = [torch.func.vmap(lambda image: module(image.unsqueeze(0)).squeeze(0))(x) for module in (original, twin)]
    torch.testing.assert_close(found[1], found[0])


@pytest.mark.slow  # (about 8 s on one core: torch.export and run_decompositions)
def test_vitdets_layer_norm_exported_with_a_dynamic_batch_gives_the_originals_outputs_and_strides():
    """torch.export (non-strict) hands the twin symbolic sizes, which its cached look-up of the
    output's strides could not hash ("unhashable type: non-nested SymInt")."""
    vitdet = pytest.importorskip("transformers.models.vitdet.modeling_vitdet")
    original = vitdet.VitDetLayerNorm(4)
    twin = _converted(original)
    batch = torch.export.Dim("batch", min=2, max=16)
    x, other = _image().transpose(2, 3), torch.randn(5, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    exported = torch.export.export(twin, (x,), dynamic_shapes=({0: batch},))
    expected = original(other.transpose(2, 3))
    for program in (exported, exported.run_decompositions()):
        y = program.module()(other.transpose(2, 3))
        torch.testing.assert_close(y, expected)
        assert y.stride() == expected.stride()


def _recent_original(name):
    """The original of a class convert() has learnt lately, and its inputs; skipped where the
    installed transformers or diffusers lacks it (Python 3.10 gets an older transformers)."""
    from tests.hf_classes import mamba_gated_norm
    from tests.mirrored_norms import TimmRmsNorm2d, TorchvisionLayerNorm2d

    def load(module, cls):
        return getattr(pytest.importorskip(module), cls)

    def mamba():  # (transformers 5.20, Python 3.10's, has no group_size: whole rows, as convert() keeps them)
        pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
        return mamba_gated_norm(8, group_size=4)[0]

    generator = torch.Generator().manual_seed(3)
    tokens, image = torch.randn(3, 4, 8, generator=generator), torch.randn(2, 4, 3, 5, generator=generator)
    gate = torch.randn(3, 4, 8, generator=generator)
    heads, video = torch.randn(2, 3, 4, 8, generator=generator), torch.randn(2, 4, 3, 2, 3, generator=generator)
    models, normalization = "transformers.models", "diffusers.models.normalization"
    builders = {
        "GemmaRMSNorm": lambda: (load(f"{models}.gemma.modeling_gemma", "GemmaRMSNorm")(8, eps=1e-6), (tokens,)),
        "T5LayerNorm": lambda: (load(f"{models}.t5.modeling_t5", "T5LayerNorm")(8), (tokens,)),
        "CohereLayerNorm": lambda: (load(f"{models}.cohere.modeling_cohere", "CohereLayerNorm")(8), (tokens,)),
        "DebertaLayerNorm": lambda: (load(f"{models}.deberta.modeling_deberta", "DebertaLayerNorm")(8), (tokens,)),
        "Llama4TextL2Norm": lambda: (load(f"{models}.llama4.modeling_llama4", "Llama4TextL2Norm")(1e-6), (tokens,)),
        "diffusers RMSNorm with bias": lambda: (load(normalization, "RMSNorm")(8, eps=1e-6, elementwise_affine=True,
                                                                               bias=True), (tokens,)),
        "diffusers FP32LayerNorm": lambda: (load(normalization, "FP32LayerNorm")(8), (tokens,)),
        "PocketTTSFlowLayerNorm": lambda: (load(f"{models}.pocket_tts.modeling_pocket_tts",
                                                "PocketTTSFlowLayerNorm")(8), (tokens,)),
        "MambaRMSNormGated": lambda: (mamba(), (tokens, gate)),
        "timm RmsNorm2d": lambda: (TimmRmsNorm2d(4), (image,)),
        "torchvision LayerNorm2d": lambda: (TorchvisionLayerNorm2d(4, eps=1e-6), (image,)),
        "VitDetLayerNorm": lambda: (load(f"{models}.vitdet.modeling_vitdet", "VitDetLayerNorm")(4), (image,)),
        "ChameleonLayerNorm": lambda: (load(f"{models}.chameleon.modeling_chameleon", "ChameleonLayerNorm")((4, 8)),
                                       (heads,)),
        "xLSTMMultiHeadLayerNorm": lambda: (load(f"{models}.xlstm.modeling_xlstm", "xLSTMMultiHeadLayerNorm")(
            4, 8, eps=1e-5, use_bias=True), (heads,)),
        "EsmFold2LayerNorm": lambda: (load(f"{models}.esmfold2.modeling_esmfold2", "EsmFold2LayerNorm")(8), (tokens,)),
        "MiniMaxH3VideoGroupNorm": lambda: (load("diffusers.models.autoencoders.autoencoder_kl_minimax_h3",
                                                 "MiniMaxH3VideoGroupNorm")(2, 4, eps=1e-6), (video,)),
        "LTX2AudioPixelNorm": lambda: (load("diffusers.models.autoencoders.autoencoder_kl_ltx2_audio",
                                            "LTX2AudioPixelNorm")(dim=1, eps=1e-6), (image,)),
        "StableAudio3RMSNorm in the input's dtype": lambda: (load(
            "diffusers.models.transformers.transformer_stable_audio3", "StableAudio3RMSNorm")(8, force_fp32=False),
            (tokens,)),
    }
    return builders[name]()


def _module_features(module, inputs):
    """What hooks see, activation checkpointing (both modes), inference mode and a build on
    the meta device materialized with to_empty: outputs and gradients."""
    seen = []
    handles = [module.register_forward_hook(lambda m, args, out: seen.append(out.clone())),
               module.register_full_backward_hook(
                   lambda m, grad_in, grad_out: seen.append((grad_in, grad_out)))]
    leaves = [x.clone().requires_grad_() for x in inputs]
    module(*leaves).sin().sum().backward()
    for handle in handles:
        handle.remove()
    found = [seen, [x.grad for x in leaves], [p.grad for p in module.parameters()]]
    for reentrant in (True, False):
        module.zero_grad()
        leaves = [x.clone().requires_grad_() for x in inputs]
        y = torch.utils.checkpoint.checkpoint(module, *leaves, use_reentrant=reentrant)
        y.sin().sum().backward()
        found.append([y, [x.grad for x in leaves], [p.grad for p in module.parameters()]])
    with torch.inference_mode():
        y = module(*inputs)
    found.append((y, y.is_inference()))
    on_meta = copy.deepcopy(module).to("meta")
    found.append(on_meta(*(x.to("meta") for x in inputs)).shape)
    materialized = on_meta.to_empty(device="cpu")
    materialized.load_state_dict(module.state_dict(), strict=True)
    found.append(materialized(*inputs))
    return found


@pytest.mark.parametrize("name", ["GemmaRMSNorm", "T5LayerNorm", "CohereLayerNorm", "DebertaLayerNorm",
                                  "Llama4TextL2Norm", "diffusers RMSNorm with bias", "diffusers FP32LayerNorm",
                                  "PocketTTSFlowLayerNorm", "MambaRMSNormGated", "timm RmsNorm2d",
                                  "torchvision LayerNorm2d", "VitDetLayerNorm", "ChameleonLayerNorm",
                                  "xLSTMMultiHeadLayerNorm", "EsmFold2LayerNorm", "MiniMaxH3VideoGroupNorm",
                                  "LTX2AudioPixelNorm", "StableAudio3RMSNorm in the input's dtype"])
def test_hooks_checkpointing_inference_mode_and_meta_builds_meet_the_originals(name):
    original, inputs = _recent_original(name)
    twin = _converted(original)
    assert type(twin).__module__ == "normlab.torch"
    torch.testing.assert_close(_module_features(twin, inputs), _module_features(original, inputs))
