"""Tools a PyTorch user runs around a model, on converted models and the fused blocks:
model ensembling with ``torch.func.stack_module_state`` and ``vmap``, ``torch.jit.trace``
and the TorchScript ONNX exporter at another batch size, and more. Oracles: the same
recipe on torch.nn's own modules, transformers' norm classes and mamba_ssm's reference
formula (mirrored in test_torch_fused.py), run by torch or by ONNX Runtime."""

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap  # noqa: E402

import normlab.torch as nt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


def _cnn() -> nn.Sequential:
    """A small CNN with batch, group, instance and layer norm and running statistics that
    are not the initial ones (so that evaluation reads them)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4),
                          nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Flatten(),
                          nn.Linear(64, 8), nn.LayerNorm(8), nn.RMSNorm(8))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model


def _ensemble_outputs(models, x):
    """torch's ensembling recipe: parameters and buffers stacked, one vmapped functional_call."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return vmap(lambda p, b, inputs: functional_call(base, (p, b), (inputs,)), in_dims=(0, 0, None))(params, buffers,
                                                                                                      x)


@pytest.mark.parametrize("mode", ["eval", "train_without_running_statistics"])
def test_an_ensemble_of_converted_cnns_under_vmap_gives_the_torch_nn_ensembles_outputs_and_gradients(mode):
    torch.manual_seed(0)
    references = [_cnn() for _ in range(3)]
    if mode == "eval":
        for model in references:
            model.eval()
    else:  # (torch's documented way to vmap batch norm in training: no running statistics)
        for model in references:
            replace_all_batch_norm_modules_(model)
    twins = [nt.convert(copy.deepcopy(model)) for model in references]
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    expected = _ensemble_outputs(references, x)
    got = _ensemble_outputs(twins, x)
    torch.testing.assert_close(got, expected)
    weights = torch.randn(expected.shape)
    (want,) = torch.autograd.grad((expected * weights).sum(), x)
    (have,) = torch.autograd.grad((got * weights).sum(), x)
    torch.testing.assert_close(have, want)


# (torch.nn class, arguments): batch norm without running statistics where it trains under vmap, as torch asks
VMAPPED = [("BatchNorm2d", (3,)), ("BatchNorm2d", (3, 1e-5, 0.1, True, False)), ("GroupNorm", (1, 3)),
           ("InstanceNorm2d", (3,)), ("LayerNorm", (5,))]


@pytest.mark.parametrize("cls_name, args", VMAPPED)
@pytest.mark.parametrize("training", [False, True])
def test_vmap_over_a_stacked_batch_gives_torch_nn_outputs(cls_name, args, training):
    """vmap along axis 1 hands each norm a strided view, whose layout a vmapped tensor can
    answer only for the default memory format."""
    torch.manual_seed(0)
    reference = getattr(nn, cls_name)(*args).train(training)
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(4, 2, 3, 5, 5)
    try:
        expected = vmap(reference, in_dims=1)(x)
    except RuntimeError as error:  # (training batch norm with running statistics: torch refuses a vmapped batch)
        with pytest.raises(type(error), match="running_mean or running_var"):
            vmap(twin, in_dims=1)(x)
        return
    torch.testing.assert_close(vmap(twin, in_dims=1)(x), expected)


def _fused_cases():
    """(name, fused block, the classes it replaces on the same state as a function of the
    block's inputs, inputs at one batch size): transformers' LlamaRMSNorm and
    MambaRMSNormGated, torch.nn.LayerNorm."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tests.hf_classes import mamba_gated_norm

    torch.manual_seed(0)
    (mamba, group_size), llama, layer = mamba_gated_norm(8, 4), LlamaRMSNorm(8, eps=1e-6), nn.LayerNorm(8)
    for module in (llama, layer, mamba):
        with torch.no_grad():
            for p in module.parameters():
                p.uniform_(0.5, 1.5)
    add_rms, add_layer = nt.FusedAddRMSNorm(8, eps=1e-6), nt.FusedAddLayerNorm(8)
    gated = nt.GatedRMSNorm(8, eps=1e-6, group_size=group_size, norm_before_gate=False)
    for block, original in ((add_rms, llama), (add_layer, layer), (gated, mamba)):
        block.load_state_dict(original.state_dict())
    return [("FusedAddRMSNorm", add_rms, lambda x, r: (llama(x + r), x + r)),
            ("FusedAddLayerNorm", add_layer, lambda x, r: (layer(x + r), x + r)),
            ("GatedRMSNorm", gated, lambda x, z: (mamba(x, z),))]


def _pair_of_inputs(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, generator=gen), torch.randn(batch, 3, 8, generator=gen)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("index", range(3), ids=["FusedAddRMSNorm", "FusedAddLayerNorm", "GatedRMSNorm"])
def test_a_traced_fused_block_takes_another_batch_size_as_the_classes_it_replaces(index):
    """torch.jit.trace records the shapes an input comes with as the input's own sizes:
    the traced block then runs at any batch size, as a traced LlamaRMSNorm does."""
    _, block, original = _fused_cases()[index]
    traced = torch.jit.trace(block, _pair_of_inputs(2, seed=1))
    x, other = _pair_of_inputs(5, seed=2)
    with torch.no_grad():
        for got, want in zip(_as_tuple(traced(x, other)), original(x, other)):
            torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("index", range(3), ids=["FusedAddRMSNorm", "FusedAddLayerNorm", "GatedRMSNorm"])
def test_a_fused_block_exported_with_a_dynamic_batch_runs_in_onnxruntime_at_another_batch_size(index, tmp_path):
    """The TorchScript exporter (``dynamo=False``) with ``dynamic_axes``: ONNX Runtime
    computes at a batch size other than the example's what the replaced classes compute."""
    onnxruntime = pytest.importorskip("onnxruntime")
    _, block, original = _fused_cases()[index]
    path = str(tmp_path / "block.onnx")
    outputs = ["y", "total"][:len(original(*_pair_of_inputs(1, seed=0)))]
    torch.onnx.export(block.eval(), _pair_of_inputs(2, seed=1), path, dynamo=False, input_names=["x", "other"],
                      output_names=outputs, dynamic_axes={name: {0: "batch"} for name in ["x", "other", *outputs]})
    x, other = _pair_of_inputs(5, seed=2)
    got = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy(), "other": other.numpy()})
    with torch.no_grad():
        for have, want in zip(got, original(x, other)):
            torch.testing.assert_close(torch.from_numpy(have), want)


class _FrozenEmbeddingThenNorm(nn.Module):
    """An embedding that does not train, then an RMS norm whose weight does (its input
    needs no gradient), as in fine-tuning with frozen embeddings."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8).requires_grad_(False)
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("first", ["rms_norm_first", "after_a_frozen_embedding"])
def test_an_rms_norm_on_an_input_without_gradient_exports_with_the_torchscript_exporter(first, tmp_path):
    """The TorchScript exporter has no aten::rms_norm: a converted RMSNorm exports as plain
    ONNX ops, also where its input needs no gradient and its weight does; ONNX Runtime
    gives torch.nn's outputs at another batch size."""
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    reference = (nn.Sequential(nn.RMSNorm(8), nn.Linear(8, 3)) if first == "rms_norm_first"
                 else _FrozenEmbeddingThenNorm())
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    converted = nt.convert(copy.deepcopy(reference))

    def example(batch):
        gen = torch.Generator().manual_seed(batch)
        return (torch.randn(batch, 4, 8, generator=gen) if first == "rms_norm_first"
                else torch.randint(0, 10, (batch, 4), generator=gen))

    path = str(tmp_path / "model.onnx")
    torch.onnx.export(converted, (example(2),), path, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    x = example(5)
    (y,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), reference(x))


def _rms_variant(variant, reference):
    """The twin of ``reference`` (a torch.nn.RMSNorm with eps=None) for ``variant``, and a
    function giving its output and torch.nn's (or transformers') on ``h``."""
    if variant == "masked_padding":
        twin = nt.convert(copy.deepcopy(reference))

        def run(h):
            counted = torch.ones(h.shape[:-1] + (1,), dtype=torch.bool)
            counted[:, -1] = False  # the last token is padding: it gives zeros, the others torch.nn's values
            y = twin(h, mask=counted)
            assert torch.equal(y[:, -1], torch.zeros_like(y[:, -1]))
            return y[:, :-1], reference(h)[:, :-1]
        return run
    if variant == "weight_offset":  # Gemma's (1 + weight), against the same weight plus one
        twin = nt.RMSNorm(reference.normalized_shape, weight_offset=1.0)
        with torch.no_grad():
            twin.weight.copy_(reference.weight - 1)
        return lambda h: (twin(h), reference(h))
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # LlamaRMSNorm computes in float32: torch's eps=None is float32's machine epsilon there too
    llama = LlamaRMSNorm(reference.normalized_shape[0], eps=torch.finfo(torch.float32).eps)
    llama.load_state_dict(reference.state_dict())
    twin = nt.RMSNorm(reference.normalized_shape, casting="llama")
    twin.load_state_dict(reference.state_dict())
    return lambda h: (twin(h), llama(h))


@pytest.mark.parametrize("variant", ["masked_padding", "weight_offset", "llama_casting"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_rms_norm_with_the_default_eps_on_small_half_precision_activations_gives_torch_nn_s_values(dtype,
                                                                                                   variant):
    """torch.nn.RMSNorm's ``eps=None`` is the machine epsilon of the dtype it computes in:
    float32's for bfloat16 and float16 input (bfloat16's own, 0.0078, would swamp the mean
    square of activations of size 0.02). Under CPU autocast a projection hands the norm
    such activations in half precision."""
    torch.manual_seed(0)
    projection = nn.Linear(16, 16)
    with torch.no_grad():
        projection.weight.mul_(0.05)
        projection.bias.zero_()
    reference = nn.RMSNorm(16)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    run = _rms_variant(variant, reference)
    with torch.autocast("cpu", dtype=dtype):
        h = projection(torch.randn(3, 5, 16))
        got, expected = run(h)
    assert h.dtype == dtype and h.float().square().mean() < 1e-2  # (bfloat16's own epsilon would count as much)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("lazy, shape", [(nn.LazyBatchNorm1d, (5, 4)), (nn.LazyBatchNorm2d, (5, 4, 3, 3))])
def test_convert_sync_batchnorm_of_a_lazy_batch_norm_makes_it_sync_batch_norm_at_its_first_forward(lazy, shape):
    """A model with a lazy batch norm goes through ``convert_sync_batchnorm`` before its
    dummy forward (DistributedDataParallel takes no uninitialized parameters): the first
    forward infers the channels, as torch's lazy module does, and the layer then is a
    SyncBatchNorm with torch.nn's outputs and running statistics (one process: batch norm)."""
    reference = nn.Sequential(lazy(momentum=0.3))
    model = nt.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(lazy(momentum=0.3)))
    for step in range(3):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(step)) * 2 + 1
        torch.testing.assert_close(model(x), reference(x))
    assert type(model[0]) is nt.SyncBatchNorm and model[0].process_group is None
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, msg=name)


# (normlab class, its torch.nn namesake, constructor arguments)
SKIP_INIT = [("LayerNorm", "LayerNorm", (8,)), ("RMSNorm", "RMSNorm", (8,)), ("GroupNorm", "GroupNorm", (2, 4)),
             ("BatchNorm2d", "BatchNorm2d", (4,)), ("InstanceNorm2d", "InstanceNorm2d", (4, 1e-5, 0.1, True)),
             ("SyncBatchNorm", "SyncBatchNorm", (4,)), ("FusedAddLayerNorm", "LayerNorm", (8,))]


@pytest.mark.parametrize("name, torch_name, args", SKIP_INIT, ids=[case[0] for case in SKIP_INIT])
def test_skip_init_and_the_constructor_signature_are_torch_nn_s(name, torch_name, args):
    """``torch.nn.utils.skip_init`` (which reads ``device`` off the signature) builds the
    module with its parameters and buffers uninitialized on the CPU, as for torch.nn's
    class, whose signature the twin's begins with."""
    import inspect

    theirs, ours = getattr(nn, torch_name), getattr(nt, name)
    assert list(inspect.signature(ours).parameters)[:len(inspect.signature(theirs).parameters)] == list(
        inspect.signature(theirs).parameters)
    expected, module = nn.utils.skip_init(theirs, *args), nn.utils.skip_init(ours, *args)
    assert [(n, t.shape, t.device) for n, t in module.state_dict().items()] == [
        (n, t.shape, t.device) for n, t in expected.state_dict().items()]


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaModel(config).eval(), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "convert_fuse"])
def test_a_model_offloaded_by_accelerate_and_then_converted_keeps_its_norms_and_outputs_and_says_why(fuse):
    # accelerate's hooks replace each module's forward on the instance with one that calls the
    # original's code; a twin would copy it and run that code, so nothing would be converted
    accelerate = pytest.importorskip("accelerate")
    model, ids = _tiny_llama()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"forward is replaced on the instance .* convert the model before"):
        converted = nt.convert(offloaded, fuse=fuse)
    assert type(converted.norm) is type(model.norm) and type(converted.layers[0]) is type(model.layers[0])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).last_hidden_state, expected, rtol=0, atol=0)


def test_a_model_converted_and_then_offloaded_by_accelerate_gives_the_unconverted_outputs():
    accelerate = pytest.importorskip("accelerate")
    model, ids = _tiny_llama()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    converted = accelerate.cpu_offload(nt.convert(copy.deepcopy(model), fuse=True), execution_device=torch.device("cpu"))
    assert type(converted.norm) is nt.RMSNorm and type(converted.layers[0]).__name__.startswith("Fused")
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).last_hidden_state, expected)
