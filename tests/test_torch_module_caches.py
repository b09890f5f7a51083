"""What a twin caches between calls (plans per input shape, parameter tables) never
outlives what it was built for: shapes past the cache's size, dtypes and devices the
module moves to, parameters replaced, reloaded, frozen or written through ``.data``, and
grad modes alternating. Oracle: torch.nn with the same parameters and inputs."""

import copy
import gc
import tracemalloc

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from tests.twins import randomized_pair  # noqa: E402

# (class, constructor arguments, input shape for a batch of k)
CASES = [
    ("LayerNorm", (16,), lambda k: (k, 16)),
    ("RMSNorm", (16,), lambda k: (k, 3, 16)),
    ("GroupNorm", (4, 8), lambda k: (k, 8, 3)),
    ("BatchNorm1d", (8,), lambda k: (k + 1, 8)),
    ("InstanceNorm1d", (8, 1e-5, 0.1, True), lambda k: (2, 8, k + 1)),
]
IDS = [case[0] for case in CASES]


def _agree(reference, twin, x, grad: bool) -> None:
    """Forward (and with ``grad`` the gradients of x and every parameter) as torch.nn's."""
    x_ref = x.clone().requires_grad_(grad)
    x_twin = x.clone().requires_grad_(grad)
    y_ref, y_twin = reference(x_ref), twin(x_twin)
    tolerance = 1e-5 if x.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y_twin, y_ref, rtol=tolerance, atol=tolerance)
    if not grad:
        return
    grad_y = torch.randn_like(y_ref)
    wanted_ref = [x_ref] + [p for p in reference.parameters() if p.requires_grad]
    wanted_twin = [x_twin] + [p for p in twin.parameters() if p.requires_grad]
    for got, expected in zip(torch.autograd.grad(y_twin, wanted_twin, grad_y),
                             torch.autograd.grad(y_ref, wanted_ref, grad_y)):
        torch.testing.assert_close(got, expected, rtol=tolerance * 10, atol=tolerance * 10)


@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=IDS)
def test_more_shapes_than_the_cache_holds_then_alternating_ones_match_torch(cls_name, args, shape):
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    for k in list(range(1, 70)) + [1, 69, 1, 69, 2]:  # the cache keeps 64 shapes per module
        _agree(reference, twin, torch.randn(shape(k)) * 3 + 1, grad=k % 2 == 0)


@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=IDS)
def test_a_module_moved_between_dtypes_and_reloaded_matches_torch(cls_name, args, shape):
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    for convert in ("double", "float", "double", "float"):
        getattr(reference, convert)()
        getattr(twin, convert)()
        dtype = next(reference.parameters()).dtype
        for grad in (False, True):
            _agree(reference, twin, torch.randn(shape(4), dtype=dtype) * 3 + 1, grad)
    state = {name: value + 0.25 if value.is_floating_point() else value
             for name, value in reference.state_dict().items()}
    reference.load_state_dict(state)
    twin.load_state_dict(state)
    for grad in (False, True):
        _agree(reference, twin, torch.randn(shape(4)), grad)


@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=IDS)
def test_parameters_replaced_frozen_or_rewritten_between_calls_match_torch(cls_name, args, shape):
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    x = torch.randn(shape(4))
    for grad in (False, True):
        _agree(reference, twin, x, grad)
    weight = torch.rand_like(reference.weight) + 0.5
    reference.weight = torch.nn.Parameter(weight.clone())
    twin.weight = torch.nn.Parameter(weight.clone())
    for grad in (False, True):
        _agree(reference, twin, x, grad)
    for ref_param, twin_param in zip(reference.parameters(), twin.parameters()):
        value = torch.rand_like(ref_param)
        ref_param.data = value.clone()  # new storage, no version change
        twin_param.data = value.clone()
    for grad in (False, True):
        _agree(reference, twin, x, grad)
    for param in (*reference.parameters(), *twin.parameters()):
        param.requires_grad_(False)
    for grad in (False, True):
        _agree(reference, twin, x, grad)


@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=IDS)
def test_parameters_given_other_strides_at_the_same_address_through_data_match_torch(cls_name, args, shape):
    """``.data`` may point a parameter at the same address with other strides (a strided
    view of a buffer that starts where the old memory did): the version counter records
    nothing, and tables kept for the old layout would read the wrong elements."""
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    x = torch.randn(shape(4))
    buffers = [torch.cat([p.detach().flatten(), torch.zeros(p.numel())]) for p in reference.parameters()]
    for buffer, param in zip(buffers, twin.parameters()):
        param.data = buffer[:param.numel()].view(param.shape)  # contiguous, at the buffer's start
    for grad in (False, True):
        _agree(reference, twin, x, grad)
    for buffer, param, ref_param in zip(buffers, twin.parameters(), reference.parameters()):
        param.data = buffer[::2].view(param.shape)  # the same address, every other element
        values = torch.rand(buffer.shape)
        buffer.copy_(values)
        ref_param.data = values[::2].clone().view(param.shape)
    for grad in (False, True):
        _agree(reference, twin, x, grad)


@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=IDS)
def test_grad_modes_alternating_on_one_module_match_torch(cls_name, args, shape):
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    x = torch.randn(shape(4))
    for _ in range(2):
        with torch.no_grad():
            _agree(reference, twin, x, grad=False)
        with torch.enable_grad():
            _agree(reference, twin, x, grad=True)
        with torch.inference_mode():
            _agree(reference, twin, torch.randn(shape(4)), grad=False)
        _agree(reference, twin, x, grad=True)


@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=IDS)
@pytest.mark.parametrize("grad", [False, True])
def test_a_module_moved_to_meta_after_calls_raises_torchs_error_for_cpu_input(cls_name, args, shape, grad):
    """The calls on the CPU cached the module's plans and parameter tables; on "meta" its
    parameters have no memory to read, and torch.nn raises its device error."""
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    for module in (reference, twin):
        for grad_before in (False, True):
            module(torch.randn(shape(4), requires_grad=grad_before))
    reference.to("meta")
    twin.to("meta")
    x = torch.randn(shape(4), requires_grad=grad)
    with pytest.raises(Exception) as expected:
        reference(x)
    with pytest.raises(type(expected.value)) as got:
        twin(x)
    assert str(got.value) == str(expected.value)
    y = copy.deepcopy(twin)(torch.randn(shape(4), device="meta"))  # meta input: a meta result, as torch's
    assert y.device.type == "meta" and y.shape == shape(4)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_loop_over_many_sequence_lengths_keeps_no_memory_that_grows_with_the_inputs(grad):
    """A variable-length loop (NLP with dynamic padding) leaves up to 64 plans in each
    norm's cache; what a plan keeps must not grow with the input's rows, as its scratch for
    the statistics nobody asked for (24 bytes a row) did: 12 MB a module after sequences
    of 64 × 100 to 163 tokens, hundreds of MB across a model's norms. torch.nn keeps nothing."""
    torch.manual_seed(0)
    reference, twin = randomized_pair("LayerNorm", (16,), torch.float32)
    inputs = [torch.randn(64, length, 16) for length in range(100, 164)]  # (64: as many as the cache holds)
    with torch.set_grad_enabled(grad):  # (Numba compiles on the first call)
        twin(inputs[-1].requires_grad_(grad))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with torch.set_grad_enabled(grad):
            for x in inputs:
                twin(x.requires_grad_(grad))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 4 << 20
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(twin(inputs[-1]), reference(inputs[-1]), rtol=1e-5, atol=1e-5)


def _prune(module, keep: list) -> None:
    """What structured pruning (torch-pruning's norm pruners, hand-written channel pruning)
    does to a norm that has run: the kept channels' parameters and running statistics as
    new tensors, the size attribute torch.nn reads (``normalized_shape``, ``num_channels``,
    ...) narrowed to match."""
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        if param is not None:
            setattr(module, name, torch.nn.Parameter(param.detach()[..., keep].clone()))
    for name in ("running_mean", "running_var"):
        buffer = getattr(module, name, None)
        if buffer is not None:
            setattr(module, name, buffer[keep].clone())
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = tuple(module.normalized_shape[:-1]) + (len(keep),)
    for name in ("num_features", "num_channels", "hidden_size"):
        if hasattr(module, name):
            setattr(module, name, len(keep))


def _grouped_rms_norm(module, x):
    """mamba_ssm's grouped RMS norm (groups of 2 channels, no gate) in torch.nn.functional."""
    return torch.nn.functional.rms_norm(x.unflatten(-1, (-1, 2)), (2,), eps=module.eps).flatten(-2) * module.weight


_nt = pytest.importorskip("normlab.torch")
_nn = torch.nn
# (id, twin, torch.nn module with its parameters, input shape for C channels, twin call, torch call)
PRUNED = [
    ("layer_norm", lambda: _nt.LayerNorm(8), lambda: _nn.LayerNorm(8), lambda c: (3, 5, c), None, None),
    ("layer_norm_two_axes", lambda: _nt.LayerNorm((3, 8)), lambda: _nn.LayerNorm((3, 8)), lambda c: (2, 3, c),
     None, None),
    ("rms_norm", lambda: _nt.RMSNorm(8), lambda: _nn.RMSNorm(8), lambda c: (3, 5, c), None, None),
    ("group_norm", lambda: _nt.GroupNorm(2, 8), lambda: _nn.GroupNorm(2, 8), lambda c: (3, c, 5), None, None),
    ("batch_norm_2d", lambda: _nt.BatchNorm2d(8), lambda: _nn.BatchNorm2d(8), lambda c: (3, c, 4, 4), None, None),
    ("layer_norm_2d", lambda: _nt.LayerNorm2d(8, eps=1e-5), lambda: _nn.LayerNorm(8), lambda c: (2, c, 3, 3), None,
     lambda m, x, r: m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)),
    ("fused_add_layer_norm", lambda: _nt.FusedAddLayerNorm(8), lambda: _nn.LayerNorm(8), lambda c: (3, 5, c),
     lambda m, x, r: m(x, r)[0], lambda m, x, r: m(x + r)),
    ("fused_add_rms_norm", lambda: _nt.FusedAddRMSNorm(8), lambda: _nn.RMSNorm(8, eps=1e-6), lambda c: (3, 5, c),
     lambda m, x, r: m(x, r)[0], lambda m, x, r: m(x + r)),
    ("gated_rms_norm", lambda: _nt.GatedRMSNorm(8, group_size=2), lambda: _nn.RMSNorm(8, eps=1e-5),
     lambda c: (3, 5, c), None, lambda m, x, r: _grouped_rms_norm(m, x)),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("build, build_torch, shape, call, call_torch", [case[1:] for case in PRUNED],
                         ids=[case[0] for case in PRUNED])
def test_a_norm_pruned_to_fewer_channels_after_calls_computes_as_torch_nn(build, build_torch, shape, call,
                                                                          call_torch, training, grad):
    """Structured pruning after training or evaluation calls (torch-pruning's LayerNorm
    pruner sets ``normalized_shape`` and the narrowed weight and bias): the next calls,
    on inputs of the new width, are torch.nn's, as its forward reads those attributes on
    every call; the twin's pattern was still that of the old width ("axis n0 has size 4,
    not 8")."""
    torch.manual_seed(0)
    twin, reference = build(), build_torch()
    with torch.no_grad():
        for param in reference.parameters():
            param.uniform_(0.5, 1.5)
    twin.load_state_dict(reference.state_dict())
    call = call or (lambda m, x, r: m(x))
    call_torch = call_torch or (lambda m, x, r: m(x))
    for width, keep in ((8, None), (6, [0, 2, 3, 5, 6, 7]), (4, [0, 1, 3, 4])):
        if keep is not None:
            _prune(twin, keep)
            _prune(reference, keep)
        twin.train(training)
        reference.train(training)
        x, residual = torch.randn(shape(width)) * 2 + 1, torch.randn(shape(width))
        x_twin, x_ref = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y_twin, y_ref = call(twin, x_twin, residual), call_torch(reference, x_ref, residual)
        torch.testing.assert_close(y_twin, y_ref, rtol=1e-5, atol=1e-5)
        if grad:
            grad_y = torch.randn_like(y_ref)
            wanted_twin, wanted_ref = [x_twin, *twin.parameters()], [x_ref, *reference.parameters()]
            for got, expected in zip(torch.autograd.grad(y_twin, wanted_twin, grad_y),
                                     torch.autograd.grad(y_ref, wanted_ref, grad_y)):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(twin.get_buffer(name), buffer, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "mask"])
def test_a_group_norm_pruned_to_channels_its_groups_do_not_divide_raises_torch_nn_s_error(training, masked):
    """Pruning a GroupNorm's channels alone (``num_channels`` and the parameters narrowed,
    ``num_groups`` kept) to a count its groups do not divide: torch.nn's forward raises
    its RuntimeError ("Expected number of channels in input to be divisible by
    num_groups"); the twin gave normlab's ShapeError, a ValueError that no ``except
    RuntimeError`` written for torch.nn catches."""
    twin, reference = _nt.GroupNorm(4, 8), _nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 3)
    twin(x), reference(x)
    for module in (twin, reference):
        _prune(module, [0, 1, 2, 3, 4, 5])
        module.train(training)
    narrowed = torch.randn(2, 6, 3)
    with pytest.raises(Exception) as expected:
        reference(narrowed)
    with pytest.raises(RuntimeError) as got:
        twin(narrowed, mask=torch.ones(2, 6, 3, dtype=torch.bool)) if masked else twin(narrowed)
    if not masked:  # (torch.nn has no mask: its error, where the twin can give it, is the oracle's, words first)
        assert type(got.value) is type(expected.value) and str(got.value).startswith(str(expected.value))


def _family_rms_norms():
    """transformers' RMS norms that convert() turns into RMSNorm with a recipe (and
    Qwen3-Next's ``1 + weight`` one, with a weight offset), by name."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    del transformers
    return {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "t5": T5LayerNorm, "qwen3_next": Qwen3NextRMSNorm}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["auto", "kernel"])
@pytest.mark.parametrize("family", ["llama", "gemma", "t5", "qwen3_next"])
def test_a_family_rms_norm_pruned_by_its_weight_alone_computes_as_the_original(family, path, dtype):
    """Pruners narrow the weight alone of a norm class without ``normalized_shape``
    (transformers' RMS norms multiply by their weight, whatever its width): the original
    then computes on inputs of the new width; its converted RMSNorm raised torch.nn's
    "Expected weight to be of same shape as normalized_shape". On an input of the old
    width both raise a RuntimeError."""
    torch.manual_seed(0)
    original = _family_rms_norms()[family](8, eps=1e-6)
    with torch.no_grad():
        original.weight.uniform_(-0.5, 1.5)
    converted = _nt.convert(torch.nn.Sequential(copy.deepcopy(original)))[0]
    assert isinstance(converted, _nt.RMSNorm)
    original.to(dtype), converted.to(dtype)
    with _nt.use_path(path):
        converted(torch.randn(3, 8, dtype=dtype))
    keep = [0, 2, 3, 5, 6]
    for module in (original, converted):
        module.weight = torch.nn.Parameter(module.weight.detach()[keep].clone())
    x = torch.randn(2, 3, 5) * 2 + 1
    x_ref, x_twin = (x.to(dtype).requires_grad_() for _ in range(2))
    grad_y = torch.randn(2, 3, 5).to(dtype)
    with _nt.use_path(path):
        y_twin = converted(x_twin)
    y_ref = original(x_ref)
    tolerance = {} if path == "auto" else dict(rtol=2e-2, atol=2e-2)  # (the kernels round once: see RMSNorm)
    torch.testing.assert_close(y_twin, y_ref, **(tolerance or dict(rtol=0, atol=0)))
    for got, expected in zip(torch.autograd.grad(y_twin, (x_twin, converted.weight), grad_y),
                             torch.autograd.grad(y_ref, (x_ref, original.weight), grad_y)):
        torch.testing.assert_close(got, expected, **(tolerance or dict(rtol=0, atol=0)))
    old_width = torch.randn(2, 8, dtype=dtype)
    with pytest.raises(RuntimeError):
        original(old_width)
    with pytest.raises(RuntimeError), _nt.use_path(path):
        converted(old_width)


def _prune_as_the_original_reads(module, keep: list) -> None:
    """A family layer norm pruned as pruners prune these classes: its own weight and bias
    narrowed, and ``normalized_shape`` where the module keeps one (OLMo's). Unlike
    :func:`_prune`, nothing the twin alone has (``hidden_size``) is set: the twin must follow."""
    for name in ("weight", "bias"):
        parameter = module._parameters.get(name)
        if parameter is not None:
            setattr(module, name, torch.nn.Parameter(parameter.detach()[..., keep].clone()))
    if "normalized_shape" in vars(module):
        module.normalized_shape = (len(keep),)


def _family_layer_norms():
    """transformers' layer norms that convert() turns into RecipeLayerNorm, by name, with
    what a pruner narrows on each (the weight and bias; OLMo's, which has none, its
    ``normalized_shape``)."""
    pytest.importorskip("transformers")
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.deberta.modeling_deberta import DebertaLayerNorm
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    return {"cohere": lambda: CohereLayerNorm(8), "cohere_qk_heads": lambda: CohereLayerNorm((3, 8)),
            "olmo": lambda: OlmoLayerNorm(8), "deberta": lambda: DebertaLayerNorm(8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["cohere", "cohere_qk_heads", "olmo", "deberta"])
def test_a_converted_recipe_layer_norm_pruned_as_its_original_computes_as_the_original(family, dtype):
    """The originals have no ``hidden_size``: Cohere's and DeBERTa's multiply by their weight
    (and add their bias) whatever its width, OLMo's reads ``normalized_shape``; pruners
    narrow those, and the original computes on inputs of the new width. The converted
    RecipeLayerNorm checked inputs against its ``hidden_size`` and raised."""
    torch.manual_seed(0)
    original = _family_layer_norms()[family]()
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.uniform_(-0.5, 1.5)
    converted = _nt.convert(torch.nn.Sequential(copy.deepcopy(original)))[0]
    assert isinstance(converted, _nt.RecipeLayerNorm)
    original.to(dtype), converted.to(dtype)
    converted(torch.randn(2, 3, 8, dtype=dtype))
    keep = [0, 2, 3, 5, 6]
    for module in (original, converted):
        _prune_as_the_original_reads(module, keep)
    x = torch.randn(2, 3, 5) * 2 + 1
    x_ref, x_twin = (x.to(dtype).requires_grad_() for _ in range(2))
    grad_y = torch.randn(2, 3, 5).to(dtype)
    y_twin, y_ref = converted(x_twin), original(x_ref)
    torch.testing.assert_close(y_twin, y_ref, rtol=0, atol=0)
    for got, expected in zip(torch.autograd.grad(y_twin, (x_twin, *converted.parameters()), grad_y),
                             torch.autograd.grad(y_ref, (x_ref, *original.parameters()), grad_y)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    old_width = torch.randn(2, 3, 8, dtype=dtype)
    with pytest.raises(RuntimeError):
        original(old_width)
    with pytest.raises(RuntimeError):
        converted(old_width)


@pytest.mark.parametrize("path", ["auto", "kernel"])
@pytest.mark.parametrize("family", ["cohere", "cohere_qk_heads", "olmo", "deberta"])
def test_a_converted_recipe_layer_norm_pruned_refuses_the_old_width_on_its_first_call_as_the_original(family, path):
    """Right after pruning, the first call on an input of the old width: the original raises
    (OLMo's ``F.layer_norm`` reads the new ``normalized_shape``, the others broadcast the
    narrowed weight). The twin followed the pruning only once an input of the new width
    came, so OLMo's computed on the old width, and Cohere's under the kernels raised
    normlab's ParamsError, a ValueError, where the original raises a RuntimeError."""
    torch.manual_seed(0)
    original = _family_layer_norms()[family]()
    converted = _nt.convert(torch.nn.Sequential(copy.deepcopy(original)))[0]
    old_width = torch.randn(2, 3, 8)
    converted(old_width)
    keep = [0, 2, 3, 5, 6]
    for module in (original, converted):
        _prune_as_the_original_reads(module, keep)
    with pytest.raises(RuntimeError):
        original(old_width)
    with pytest.raises(RuntimeError), _nt.use_path(path):
        converted(old_width)
    x = torch.randn(2, 3, len(keep))
    with _nt.use_path(path):
        torch.testing.assert_close(converted(x), original(x), **({} if path == "auto" else dict(rtol=1e-5, atol=1e-5)))



@pytest.mark.parametrize("path", ["auto", "kernel"])
@pytest.mark.parametrize("family", ["cohere", "cohere_qk_heads", "deberta"])
def test_a_converted_recipe_layer_norm_pruned_in_place_refuses_the_old_width_as_the_original(family, path):
    """A pruner that narrows the parameters in place (``weight.data = weight.data[..., keep]``)
    sets no attribute of the module: the twin's check still passed the old width, and its
    kernels raised normlab's ParamsError, a ValueError, where the original raises a
    RuntimeError; the new width computes as the original."""
    torch.manual_seed(0)
    original = _family_layer_norms()[family]()
    converted = _nt.convert(torch.nn.Sequential(copy.deepcopy(original)))[0]
    old_width = torch.randn(2, 3, 8)
    converted(old_width)
    keep = [0, 2, 3, 5, 6]
    for module in (original, converted):
        for parameter in module.parameters():
            parameter.data = parameter.data[..., keep].clone()
    with pytest.raises(RuntimeError):
        original(old_width)
    with _nt.use_path(path):
        with pytest.raises(RuntimeError) as raised:
            converted(old_width)
        assert not isinstance(raised.value, ValueError)
        x = torch.randn(2, 3, len(keep))
        torch.testing.assert_close(converted(x), original(x), **({} if path == "auto" else dict(rtol=1e-5, atol=1e-5)))


def _restorations(module, name):
    """Ways to set ``name`` again after ``del module.<name>``: its old value (a Parameter
    registers again; a buffer's tensor becomes a plain attribute, which torch.nn's forward
    reads), the buffer registered again, and None."""
    return ["old_value", "registered", "none"] if name in module._buffers else ["old_value", "none"]


DELETABLE = [
    ("LayerNorm", lambda nn: nn.LayerNorm(6), (3, 6)),
    ("GroupNorm", lambda nn: nn.GroupNorm(2, 6), (3, 6, 4)),
    ("BatchNorm1d", lambda nn: nn.BatchNorm1d(6), (5, 6)),
    ("BatchNorm2d", lambda nn: nn.BatchNorm2d(6), (3, 6, 2, 2)),
    ("InstanceNorm1d", lambda nn: nn.InstanceNorm1d(6, affine=True, track_running_stats=True), (3, 6, 5)),
    ("RMSNorm", lambda nn: nn.RMSNorm(6), (3, 6)),
    ("SyncBatchNorm", lambda nn: nn.SyncBatchNorm(6), (3, 6, 4)),  # (one process: torch's is batch norm)
]


_DELETIONS = [(case[1:], name) for case in DELETABLE
              for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
              if getattr(case[1](_nn), name, None) is not None]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case, name", _DELETIONS,
                         ids=[f"{case[0]}-{name}" for case in DELETABLE
                              for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                              if getattr(case[1](_nn), name, None) is not None])
def test_a_twin_with_a_parameter_or_buffer_deleted_does_what_torch_nn_does_and_again_once_it_is_set(case, name,
                                                                                                     training):
    """``del norm.bias`` (or the weight, a running statistic, the batch counter) after
    calls: torch.nn's forward reads it as an attribute and raises AttributeError; the twin
    read its parameter table, found nothing and normalized without it. Set again (its old
    value, registered again, or None), both compute the same."""
    build, shape = case
    reference = build(_nn)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.uniform_(0.5, 1.5)
    for restoration in _restorations(reference, name):
        if isinstance(reference, _nn.SyncBatchNorm) and name == "num_batches_tracked" and restoration == "none":
            continue  # (torch's SyncBatchNorm asserts a counter in training, where its twin counts none)
        twin, expected = _nt.convert(copy.deepcopy(reference)), copy.deepcopy(reference)
        outcomes = []
        for module in (expected, twin):
            module.train(training)
            module(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
            saved = getattr(module, name)
            delattr(module, name)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
            try:
                first = module(x)
            except Exception as error:  # (the oracle's type, below)
                first = type(error)
            if restoration == "registered":
                module.register_buffer(name, saved)
            else:
                setattr(module, name, saved if restoration == "old_value" else None)
            try:
                again = module(x)
            except Exception as error:
                again = type(error)
            outcomes.append((first, again, {k: v.clone() for k, v in module.state_dict().items()},
                             getattr(module, name, None)))
        for got, want in zip(outcomes[1][:2], outcomes[0][:2]):
            if isinstance(want, type):
                assert got is want, f"{restoration}: torch.nn raises {want.__name__}, the twin gives {got!r}"
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=restoration)
        torch.testing.assert_close(outcomes[1][2], outcomes[0][2], rtol=1e-5, atol=1e-5, msg=restoration)
        torch.testing.assert_close(outcomes[1][3], outcomes[0][3], rtol=1e-5, atol=1e-5, msg=restoration)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_an_ada_layer_norm_pruned_with_its_modulation_computes_as_diffusers_ada_layer_norm_zero(grad):
    """Structured pruning of DiT's AdaLN-Zero narrows the modulation's ``linear`` (each of
    its six chunks) and the input with it; diffusers' ``AdaLayerNormZero`` then computes on
    inputs of the new width (its pruner sets its layer norm's ``normalized_shape``). The
    twin kept ``embedding_dim`` and raised "expected input with shape [*, 8]"."""
    AdaLayerNormZero = pytest.importorskip("diffusers.models.normalization").AdaLayerNormZero
    torch.manual_seed(0)
    reference, twin = AdaLayerNormZero(8), _nt.AdaLayerNorm(8)
    twin.load_state_dict(reference.state_dict())
    for width, keep in ((8, None), (5, [0, 1, 3, 4, 6]), (3, [0, 2, 4])):
        if keep is not None:
            rows = torch.tensor([k + reference.linear.out_features // 6 * chunk for chunk in range(6) for k in keep])
            for module in (reference, twin):
                narrowed = torch.nn.Linear(len(keep), 6 * len(keep))
                with torch.no_grad():
                    narrowed.weight.copy_(module.linear.weight[rows][:, keep])
                    narrowed.bias.copy_(module.linear.bias[rows])
                module.linear = narrowed
            reference.norm.normalized_shape = (len(keep),)
        x, emb = torch.randn(2, 3, width) * 2 + 1, torch.randn(2, width)
        x_twin, x_ref = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            got, expected = twin(x_twin, emb=emb), reference(x_ref, emb=emb)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if grad:
            grads = [torch.randn(t.shape) for t in expected]
            for a, b in zip(torch.autograd.grad(got, [x_twin, *twin.parameters()], grads),
                            torch.autograd.grad(expected, [x_ref, *reference.parameters()], grads)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_a_twin_under_spectral_norms_hook_counts_only_the_masked_elements(kind):
    """``torch.nn.utils.spectral_norm`` deletes the weight Parameter and sets the weight as a
    plain tensor before each forward: the twin then took torch.nn's forward for good, which has
    no mask, and normalized over every element, silently. Oracles: torch.nn's module under the
    same hook without a mask, and the masked statistics in torch operations."""
    reference = _nn.LayerNorm(8) if kind == "LayerNorm" else _nn.RMSNorm(8)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.uniform_(0.5, 1.5)
    twin = _nt.convert(copy.deepcopy(reference))
    for module in (reference, twin):
        torch.manual_seed(0)  # (the hook's random start vector)
        _nn.utils.spectral_norm(module, "weight", dim=0)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    x[:, 4:] += 100.0
    torch.testing.assert_close(twin(x), reference(x))
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :4] = True
    y = twin(x, mask=mask)
    counted = x[:, :4]
    if kind == "LayerNorm":
        mean, var = counted.mean(1, keepdim=True), counted.var(1, unbiased=False, keepdim=True)
        expected = (x - mean) / torch.sqrt(var + reference.eps) * reference.weight + reference.bias
    else:
        eps = torch.finfo(x.dtype).eps
        expected = x / torch.sqrt(counted.pow(2).mean(1, keepdim=True) + eps) * reference.weight
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("kind", ["BatchNorm1d", "SyncBatchNorm"])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_a_batch_norm_whose_running_statistic_is_set_again_as_a_plain_tensor_refuses_mask_rather_than_drop_it(name,
                                                                                                            kind):
    """A running statistic deleted and set again as a plain tensor (not ``register_buffer``)
    sends the twin to torch.nn's forward, which has no mask: it normalized over every element,
    silently. Oracles: torch.nn's BatchNorm1d under the same steps without a mask, and
    torch.nn's AttributeError while the name is still deleted."""
    reference = getattr(_nn, kind)(4)
    twin = _nt.convert(copy.deepcopy(reference))
    assert type(twin) is getattr(_nt, kind)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    x[3:] += 50.0
    mask = torch.zeros(6, 1, dtype=torch.bool)
    mask[:3] = True
    for module in (reference, twin):
        kept = getattr(module, name)
        delattr(module, name)
    with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
        reference(x)
    with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
        twin(x, mask=mask)
    for module in (reference, twin):
        setattr(module, name, kept.clone())
    torch.testing.assert_close(twin(x), reference(x))
    torch.testing.assert_close(getattr(twin, name), getattr(reference, name))
    with pytest.raises(RuntimeError, match=f"mask= needs {name} registered.*register_buffer"):
        twin(x, mask=mask)
    tensor = getattr(twin, name)  # (the message's recipe)
    delattr(twin, name)
    twin.register_buffer(name, tensor)
    counted = x[:3]
    expected = (x - counted.mean(0)) / torch.sqrt(counted.var(0, unbiased=False) + twin.eps) * twin.weight + twin.bias
    torch.testing.assert_close(twin(x, mask=mask), expected)


@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, shape", [("BatchNorm1d", (5, 3)), ("BatchNorm2d", (4, 3, 2, 2)),
                                         ("SyncBatchNorm", (4, 3, 5)), ("InstanceNorm1d", (4, 3, 5))])
def test_a_mask_call_with_the_counter_deleted_computes_where_torch_nn_does_not_read_it(name, shape, training,
                                                                                       tracking):
    """``del norm.num_batches_tracked``: torch.nn's batch norm reads the counter only in a
    training call that tracks statistics (AttributeError there), its instance norm never; the
    twins given mask= read every deleted name, so an evaluation call (or an untracked one)
    raised AttributeError where torch.nn computes. With an all-True mask: torch.nn's exception
    type, or its output (and a batch norm's running statistics)."""
    extra = {"affine": True, "track_running_stats": True} if name.startswith("Instance") else {}
    torch.manual_seed(0)
    reference, twin = getattr(torch.nn, name)(3, **extra), getattr(_nt, name)(3, **extra)
    for module in (reference, twin):
        del module.num_batches_tracked
        module.track_running_stats = tracking
        module.train(training)
    x = torch.randn(shape) * 2 + 1
    try:
        expected = reference(x)
    except AttributeError:
        with pytest.raises(AttributeError, match="num_batches_tracked"):
            twin(x, mask=torch.ones(shape, dtype=torch.bool))
        return
    torch.testing.assert_close(twin(x, mask=torch.ones(shape, dtype=torch.bool)), expected)
    if not name.startswith("Instance"):
        torch.testing.assert_close(twin.running_mean, reference.running_mean)
        torch.testing.assert_close(twin.running_var, reference.running_var)
