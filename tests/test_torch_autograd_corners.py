"""The twins under autograd's less common entry points: batched gradients (the vectorized
jacobian and hessian of ``torch.autograd.functional``, ``is_grads_batched``, ``vmap`` over
a backward pass), double backward and functorch transforms of the fused blocks. Oracles:
torch.nn's modules, and the blocks' definitions in torch.nn.functional, differentiated by
torch's autograd in float64; gradgradcheck."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.autograd import forward_ad  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.twins import randomized_pair  # noqa: E402

D = torch.float64

# (torch.nn class, constructor arguments, input shape, training): each kernel path's backward
TWINS = [
    ("LayerNorm", (6,), (2, 3, 6), True),  # the cached row path
    ("RMSNorm", (6,), (2, 3, 6), True),
    ("GroupNorm", (2, 4), (2, 4, 3), True),
    ("BatchNorm1d", (4,), (5, 4), True),  # batch norm's training kernels
    ("InstanceNorm1d", (4,), (2, 4, 5), True),  # the custom op's eager path
]


def _pair(cls_name, args, train):
    reference, twin = randomized_pair(cls_name, args, D)
    return reference.train(train), twin.train(train)


@pytest.mark.parametrize("cls_name, args, shape, train", TWINS)
def test_vectorized_jacobian_and_hessian_of_each_twin_match_torch_nn(cls_name, args, shape, train):
    torch.manual_seed(0)
    reference, twin = _pair(cls_name, args, train)
    x = torch.randn(shape, dtype=D)
    expected = torch.autograd.functional.jacobian(reference, x)
    torch.testing.assert_close(torch.autograd.functional.jacobian(twin, x, vectorize=True), expected)
    # (torch.nn.GroupNorm's own vectorized hessian fails in torch 2.13: the oracle loops)
    expected = torch.autograd.functional.hessian(lambda t: reference(t).pow(3).sum(), x)
    got = torch.autograd.functional.hessian(lambda t: twin(t).pow(3).sum(), x, vectorize=True)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("cls_name, args, shape, train", TWINS)
def test_batched_gradients_through_each_twin_match_torch_nn(cls_name, args, shape, train):
    torch.manual_seed(0)
    reference, twin = _pair(cls_name, args, train)
    x0 = torch.randn(shape, dtype=D)
    grads = torch.randn((3, *shape), dtype=D)
    results = []
    for module in (reference, twin):
        x = x0.clone().requires_grad_()
        y = module(x)
        inputs = (x, *module.parameters())
        batched = torch.autograd.grad(y, inputs, grads, retain_graph=True, is_grads_batched=True)
        mapped = torch.func.vmap(lambda g: torch.autograd.grad(y, inputs, g, retain_graph=True))(grads)
        results.append((batched, mapped))
    torch.testing.assert_close(results[1], results[0])


def _fused_cases():
    """(name, the block, its definition in torch.nn.functional, weight): block(x, other)."""
    torch.manual_seed(0)
    add_rms = nt.FusedAddRMSNorm(6, dtype=D)
    add_ln = nt.FusedAddLayerNorm(6, dtype=D)
    gated = nt.GatedRMSNorm(6, dtype=D)
    with torch.no_grad():
        for m in (add_rms, add_ln, gated):
            for p in m.parameters():
                p.uniform_(0.5, 1.5)
    return [
        ("FusedAddRMSNorm", add_rms, lambda x, r: (F.rms_norm(x + r, (6,), add_rms.weight, 1e-6), x + r)),
        ("FusedAddRMSNorm without residual", lambda x, r: add_rms(x),
         lambda x, r: F.rms_norm(x, (6,), add_rms.weight, 1e-6)),
        ("FusedAddLayerNorm", add_ln, lambda x, r: (F.layer_norm(x + r, (6,), add_ln.weight, add_ln.bias), x + r)),
        ("GatedRMSNorm", gated, lambda x, z: F.rms_norm(x, (6,), gated.weight, 1e-5) * F.silu(z)),
    ]


FUSED = _fused_cases()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _second_derivatives(block, x0, other0):
    x, other = x0.clone().requires_grad_(), other0.clone().requires_grad_()
    grad_x, = torch.autograd.grad(_first(block(x, other)).pow(3).sum(), x, create_graph=True)
    return (grad_x, *torch.autograd.grad(grad_x.square().sum(), (x, other), materialize_grads=True))


def _transforms(block, x, other):
    with forward_ad.dual_level():
        dual = _first(block(forward_ad.make_dual(x, torch.cos(x)), other))
        primal, tangent = forward_ad.unpack_dual(dual)
        forward_mode = (primal.clone(), tangent.clone())
    one, other_one = x[:1], other[:1]
    return {
        "forward-mode AD": forward_mode,
        "vmap": torch.func.vmap(block)(x, other),
        "grad": torch.func.grad(lambda t: _first(block(t, other)).sin().sum())(x),
        "jacrev": torch.func.jacrev(lambda t: block(t, other_one))(one),
        "jacfwd": torch.func.jacfwd(lambda t: block(t, other_one))(one),
        "vectorized jacobian": torch.autograd.functional.jacobian(lambda t: _first(block(t, other_one)), one,
                                                                  vectorize=True),
    }


@pytest.mark.parametrize("name, block, definition", FUSED, ids=[case[0] for case in FUSED])
def test_fused_blocks_second_derivatives_and_transforms_match_their_definition(name, block, definition):
    torch.manual_seed(1)
    x, other = torch.randn(3, 4, 6, dtype=D), torch.randn(3, 4, 6, dtype=D)
    torch.testing.assert_close(_second_derivatives(block, x, other), _second_derivatives(definition, x, other))
    got, expected = _transforms(block, x, other), _transforms(definition, x, other)
    for transform in expected:
        torch.testing.assert_close(got[transform], expected[transform], msg=lambda m: f"{transform}: {m}")


@pytest.mark.parametrize("name, block, definition", FUSED[:1] + FUSED[3:], ids=["FusedAddRMSNorm", "GatedRMSNorm"])
def test_fused_blocks_pass_gradgradcheck(name, block, definition):
    torch.manual_seed(2)
    inputs = (torch.randn(2, 6, dtype=D, requires_grad=True), torch.randn(2, 6, dtype=D, requires_grad=True))
    assert torch.autograd.gradgradcheck(lambda x, other: block(x, other), inputs)


RESIDUAL_BLOCKS = [FUSED[0], FUSED[2]]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("name, block, definition", RESIDUAL_BLOCKS, ids=[case[0] for case in RESIDUAL_BLOCKS])
def test_batched_gradients_of_the_sum_alone_match_the_definition(name, block, definition, strided):
    # where only x + residual is used, autograd hands the block unbatched zeros for y beside
    # the batched gradient of the sum (contiguous x: the cached call; transposed: the general one)
    torch.manual_seed(4)
    x0, r0 = torch.randn(4, 3, 6, dtype=D), torch.randn(3, 4, 6, dtype=D)
    grads = torch.randn(5, 3, 4, 6, dtype=D)
    results = []
    for f in (block, definition):
        x = (x0.transpose(0, 1) if strided else x0.transpose(0, 1).contiguous()).requires_grad_()
        r = r0.clone().requires_grad_()
        results.append(torch.autograd.grad(f(x, r)[1], (x, r), grads, is_grads_batched=True))
    torch.testing.assert_close(results[0], results[1])
    one, r_one = x0[:1].transpose(0, 1).contiguous(), r0[:, :1]
    torch.testing.assert_close(
        torch.autograd.functional.jacobian(lambda t: block(t, r_one)[1], one, vectorize=True),
        torch.autograd.functional.jacobian(lambda t: definition(t, r_one)[1], one))


def test_ada_layer_norm_second_derivative_matches_its_definition():
    torch.manual_seed(3)
    block = nt.AdaLayerNorm(6).double()
    x0, emb0 = torch.randn(2, 3, 6, dtype=D), torch.randn(2, 6, dtype=D)

    def definition(x, emb):
        shift, scale, *_ = block.linear(F.silu(emb)).chunk(6, dim=1)
        return F.layer_norm(x, (6,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    results = [_second_derivatives(f, x0, emb0) for f in (lambda x, emb: block(x, emb=emb)[0], definition)]
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("track", [True, False])
def test_instance_norm_with_eps_zero_gives_a_constant_channel_torch_nn_s_zeros(track):
    x0 = torch.randn(2, 3, 4, dtype=D)
    x0[:, 1] = 2.5  # a constant channel: variance 0, and eps = 0
    results = []
    for cls in (torch.nn.InstanceNorm1d, nt.InstanceNorm1d):
        module = cls(3, eps=0.0, affine=True, track_running_stats=track, dtype=D).train(track)
        x = x0.clone().requires_grad_()
        y = module(x)
        y.backward(torch.randn(y.shape, dtype=D, generator=torch.Generator().manual_seed(0)))
        results.append((y, x.grad, module.weight.grad, module.running_var))
    torch.testing.assert_close(results[1], results[0])


def _masked_layer_norm_definition(x, mask, weight, bias, eps=1e-5):
    """Layer norm with statistics over the counted (mask True) elements, in torch operations."""
    counted = mask.to(x.dtype)
    n = counted.sum(-1, keepdim=True)
    mean = (x * counted).sum(-1, keepdim=True) / n
    var = ((x - mean).square() * counted).sum(-1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


def test_masked_twin_second_derivatives_and_transforms_match_the_masked_definition():
    torch.manual_seed(4)
    norm = nt.LayerNorm(6, dtype=D)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x, mask = torch.randn(3, 4, 6, dtype=D), torch.rand(3, 4, 6) > 0.3
    mask[..., :2] = True  # at least two counted per row

    def twin(t, _=None):
        return norm(t, mask=mask)

    def definition(t, _=None):
        return _masked_layer_norm_definition(t, mask, norm.weight, norm.bias)

    torch.testing.assert_close(_second_derivatives(twin, x, x), _second_derivatives(definition, x, x))
    with forward_ad.dual_level():
        dual = [forward_ad.unpack_dual(f(forward_ad.make_dual(x, torch.cos(x)))) for f in (twin, definition)]
        torch.testing.assert_close(tuple(dual[0]), tuple(dual[1]))
    for transform in (lambda f: torch.func.grad(lambda t: f(t).sin().sum())(x),
                      lambda f: torch.autograd.functional.jacobian(f, x, vectorize=True)):
        torch.testing.assert_close(transform(twin), transform(definition))


class _Positive(torch.nn.Module):
    def forward(self, weight):
        return weight.abs() + 0.5


@pytest.mark.parametrize("cls_name, args, shape", [("LayerNorm", (6,), (4, 3, 6)), ("GroupNorm", (2, 6), (4, 6, 3)),
                                                   ("BatchNorm1d", (6,), (4, 6, 3))])
def test_converted_layer_with_a_parametrized_weight_computes_and_differentiates_as_torch_nn(cls_name, args, shape):
    """torch.nn.utils.parametrize on a norm layer's weight, then convert."""
    from torch.nn.utils import parametrize

    reference = getattr(torch.nn, cls_name)(*args, dtype=D)
    torch.nn.init.uniform_(reference.weight, -1, 1)
    parametrize.register_parametrization(reference, "weight", _Positive())
    twin = nt.convert(copy.deepcopy(reference))
    assert isinstance(twin, getattr(nt, cls_name))
    x = torch.randn(shape, dtype=D)
    results = []
    for module in (reference, twin):
        y = module(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), module.parametrizations.weight.original)))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("cls_name, args, shape", [
    ("RMSNorm", (6,), (3, 6)), ("LayerNorm", (6,), (3, 6)), ("GroupNorm", (2, 6), (3, 6)),
    ("BatchNorm1d", (6,), (3, 6)), ("InstanceNorm1d", (6, 1e-5, 0.1, True, True), (3, 6, 4))])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_input_made_in_inference_mode_trains_or_raises_as_in_torch_nn(cls_name, args, shape, train):
    """Features computed under torch.inference_mode feeding a norm layer whose parameters
    train: torch.nn.RMSNorm's operations save no inference tensor and train; the others
    raise torch's RuntimeError, leaving the running statistics as they were (in evaluation
    too, where the batch and instance norms normalize with them)."""
    reference, twin = _pair(cls_name, args, train=train)
    with torch.inference_mode():
        x = torch.randn(shape, dtype=D)
    outcomes = []
    for module in (reference, twin):
        try:
            y = module(x)
            outcomes.append((y, *torch.autograd.grad(y.square().sum(), module.weight)))
        except RuntimeError as error:
            outcomes.append(("RuntimeError", "Inference tensors" in str(error)))
        outcomes[-1] += tuple(module.buffers())
    assert type(outcomes[1][0]) is type(outcomes[0][0])
    torch.testing.assert_close(outcomes[1][1:], outcomes[0][1:])
    if isinstance(outcomes[0][0], Tensor):
        torch.testing.assert_close(outcomes[1][0], outcomes[0][0])


@pytest.mark.parametrize("cls_name, args, shape", [("LayerNorm", (6,), (3, 4, 6)), ("RMSNorm", (6,), (3, 4, 6)),
                                                   ("GroupNorm", (2, 4), (3, 4, 6))])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_backward_reads_the_input_that_saved_tensor_hooks_give_back(cls_name, args, shape, strided):
    """Saved-tensor hooks (activation offloading, checkpointing) own what backward reads:
    here they keep a copy, and the input then changes in place; torch.nn's gradients come
    from the copy."""
    reference, twin = _pair(cls_name, args, train=True)
    x0 = torch.randn(shape[:-1] + (2 * shape[-1],), dtype=D, requires_grad=True)
    grads = []
    for module in (reference, twin):
        x = x0 * 1
        x = x[..., ::2] if strided else x[..., :shape[-1]].contiguous()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            y = module(x)
        with torch.no_grad():
            x.mul_(3)
        grads.append(torch.autograd.grad(y.pow(3).sum(), (x0, module.weight)))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("cls_name, args, shape, train", TWINS)
def test_a_checkpoint_whose_recomputation_draws_new_dropout_masks_gives_torch_nn_s_gradients(cls_name, args, shape,
                                                                                              train):
    """``torch.utils.checkpoint`` with ``use_reentrant=False`` and ``preserve_rng_state=False``
    recomputes the forward in backward with other dropout masks: torch.nn's norms then
    differentiate at the recomputed input with the statistics recomputed with it (the
    kernels' twins took the recomputed input with their first forward's statistics)."""
    from torch.utils.checkpoint import checkpoint

    reference, twin = _pair(cls_name, args, train)
    x0 = torch.randn(shape, dtype=D)
    grads = []
    for module in (reference, twin):
        torch.manual_seed(0)
        x = x0.clone().requires_grad_()
        y = checkpoint(lambda a: module(F.dropout(a, 0.5)), x, use_reentrant=False, preserve_rng_state=False)
        grads.append(torch.autograd.grad(y.pow(3).sum(), (x, *module.parameters())))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("name, block, definition", FUSED, ids=[case[0] for case in FUSED])
def test_a_fused_block_under_a_checkpoint_that_draws_new_dropout_masks_gives_its_definition_s_gradients(name, block,
                                                                                                         definition):
    """As above, for the fused blocks' kernels, against their definitions in torch
    operations under the same checkpoint."""
    from torch.utils.checkpoint import checkpoint

    weights = [p for p in (getattr(block, "weight", None), getattr(block, "bias", None)) if p is not None]
    x0, other0 = torch.randn(2, 3, 6, dtype=D), torch.randn(2, 3, 6, dtype=D)
    grads = []
    for function in (definition, block):
        torch.manual_seed(0)
        x, other = x0.clone().requires_grad_(), other0.clone().requires_grad_()
        y = checkpoint(lambda a, b: _first(function(F.dropout(a, 0.5), b)), x, other, use_reentrant=False,
                       preserve_rng_state=False)
        grads.append(torch.autograd.grad(y.pow(3).sum(), (x, other, *weights), materialize_grads=True))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("make, shape", [
    (lambda: torch.nn.BatchNorm1d(4), (6, 4)), (lambda: torch.nn.BatchNorm2d(4), (16, 4, 8, 8)),
    (lambda: torch.nn.InstanceNorm1d(4, track_running_stats=True), (3, 4, 5)),
], ids=["BatchNorm1d", "BatchNorm2d", "InstanceNorm1d"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_running_statistics_handed_in_requiring_grad_raise_torch_nn_s_error(make, shape, train):
    """``functional_call`` may hand a norm running statistics that require grad: torch's
    batch norm op is not differentiable in them and refuses them; the twins updated them in
    place in training, and differentiated them in an instance norm's evaluation."""
    reference = make().double().train(train)
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, dtype=D)
    for module in (reference, twin):
        buffers = {"running_mean": module.running_mean.clone().requires_grad_(),
                   "running_var": module.running_var.clone().requires_grad_()}
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            torch.func.functional_call(module, buffers, (x,))


def test_a_norm_layer_held_in_two_places_stays_one_layer_after_convert():
    """A shared layer (``[block] * n``, one norm at two places of a Sequential) is one module
    in torch.nn; after convert it must be one twin in both places (the second place kept
    torch's layer, whose running statistics a dtype change then untied from the twin's)."""
    torch.manual_seed(5)
    norm = torch.nn.BatchNorm1d(4)
    reference = torch.nn.Sequential(norm, torch.nn.Linear(4, 4), norm)
    model = nt.convert(copy.deepcopy(reference))
    assert len(list(model.modules())) == len(list(reference.modules()))
    reference.double()
    model.double()
    x = torch.randn(8, 4, dtype=D)
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


@pytest.mark.parametrize("track, train", [(False, True), (False, False), (True, True)])
def test_instance_norm_of_one_spatial_element_raises_torch_nn_s_error(track, train):
    x = torch.randn(4, 3, 1)
    errors = []
    for cls in (torch.nn.InstanceNorm1d, nt.InstanceNorm1d):
        with pytest.raises(ValueError) as error:
            cls(3, track_running_stats=track).train(train)(x)
        errors.append(str(error.value))
    assert errors[1] == errors[0]



@pytest.mark.parametrize("cls_name, args, shape", [t[:3] for t in TWINS] + [("LayerNorm2d", (4,), (2, 4, 3, 2))],
                         ids=[t[0] for t in TWINS] + ["LayerNorm2d"])
def test_gradients_through_a_forward_mode_tangent_pass_gradcheck(cls_name, args, shape):
    # torch's layer_norm and batch_norm (instance norm's too) give the right tangent but a
    # wrong gradient of it (pytorch#196700), which training through a JVP differentiates
    torch.manual_seed(0)
    twin = nt.LayerNorm2d(*args, dtype=D) if cls_name == "LayerNorm2d" else randomized_pair(cls_name, args, D)[1]
    tangent, weight = torch.randn(shape, dtype=D), torch.rand(shape, dtype=D)

    def dual_tangent(x):  # in training: batch statistics
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(twin.train()(forward_ad.make_dual(x, tangent))).tangent * weight

    def jvp_tangent(x):  # (torch.func.jvp in evaluation: no running statistics to update)
        return torch.func.jvp(twin.eval(), (x,), (tangent,))[1] * weight

    x = torch.randn(shape, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(dual_tangent, (x,))
    assert torch.autograd.gradcheck(jvp_tangent, (x,))


def test_batch_norm_training_under_torch_func_jvp_raises_torchs_error_as_torch_nn_does():
    x = torch.randn(4, 3, dtype=D)
    for model in randomized_pair("BatchNorm1d", (3,), D):
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            torch.func.jvp(model.train(), (x,), (x,))


@pytest.mark.parametrize("cls_name, args, shape, train", TWINS)
def test_a_layer_called_twice_has_torch_nn_s_second_derivatives(cls_name, args, shape, train):
    """One layer applied twice (its weight shared by both calls), then a gradient penalty: each
    call's create_graph backward must give its own partial derivatives. Taken at the saved
    input itself, torch's engine went on up its history to the earlier call of the same
    weight and added that gradient in again."""
    torch.manual_seed(6)
    reference, twin = _pair(cls_name, args, train)
    x = torch.randn(shape, dtype=D, requires_grad=True)

    def gradients(module):
        inputs = (x, *module.parameters())
        y = module(module(x))
        first = torch.autograd.grad(y.sin().sum(), inputs, create_graph=True)
        return (*first, *torch.autograd.grad(sum(g.square().sum() for g in first), inputs))

    for mine, theirs in zip(gradients(twin), gradients(reference)):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("transform", ["eager", "composite", "vmap", "jvp", "compile"])
def test_float32_input_with_float64_parameters_gives_float32_on_every_path(transform):
    """The output has the input's dtype (README, numerics): the kernels give float32 for a
    float32 input beside float64 parameters, and so must the composite that functorch's
    transforms, forward-mode AD and torch.compile take (it gave float64 there: torch's
    promotion of x̂ · weight)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    weight, bias = torch.randn(4, dtype=D, requires_grad=True), torch.randn(4, dtype=D, requires_grad=True)

    def function(x):
        return nt.normalize(x, "b t [d]", weight=weight, bias=bias, params="d")

    expected = function(x)
    if transform == "composite":
        with nt.use_path("composite"):
            y = function(x)
    elif transform == "vmap":
        y = torch.func.vmap(function)(x.unsqueeze(1)).squeeze(1)
    elif transform == "jvp":
        y, tangent = torch.func.jvp(function, (x,), (torch.randn_like(x),))
        assert tangent.dtype == torch.float32
    elif transform == "compile":
        torch._dynamo.reset()
        y = torch.compile(function, backend="aot_eager")(x)
    else:
        y = expected
    assert expected.dtype == y.dtype == torch.float32
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y.sum(), (weight, bias))
    assert [g.dtype for g in grads] == [D, D]
