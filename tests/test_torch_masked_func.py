"""``mask=`` under torch.func, as torch users train with it: ``grad`` of a
``functional_call`` handed the parameters and the buffers (so that batch norm in
training may update its running statistics), and ``vmap`` over per-sample padding
masks. Oracle: torch.nn's own modules on the data with the padding removed, through the
same transform. And ``vmap`` over per-sample ``segment_ids`` (a batch of graph batches),
against a Python loop over the samples."""

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import normlab.torch as nt  # noqa: E402

_BATCH_NORMS = {
    "BatchNorm2d": lambda: nt.BatchNorm2d(3),
    "Norm": lambda: nt.Norm("[b] c [h w]", params="c", c=3, track_running_stats=True),
}


def _state(module):
    """Parameters and buffers as torch.func takes them, copies the call may update."""
    return ({name: p.detach().clone() for name, p in module.named_parameters()},
            {name: b.clone() for name, b in module.named_buffers()})


@pytest.mark.parametrize("name", sorted(_BATCH_NORMS))
def test_func_grad_of_a_masked_batch_norm_in_training_gives_torch_nn_gradients_and_running_statistics(name):
    """The mask leaves out the last sample; torch.nn.BatchNorm2d sees the first three alone."""
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    twin = _BATCH_NORMS[name]().double()
    twin.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    mask = torch.tensor([True, True, True, False]).reshape(4, 1, 1, 1)

    def loss(module, params, buffers, inputs, **kwargs):
        return functional_call(module, (params, buffers), (inputs,), kwargs)[:3].pow(3).sum()

    params, buffers = _state(reference)
    want = grad(loss, argnums=(1, 3))(reference, params, buffers, x[:3])
    twin_params, twin_buffers = _state(twin)
    have = grad(loss, argnums=(1, 3))(twin, twin_params, twin_buffers, x, mask=mask)
    torch.testing.assert_close(have[0], want[0])
    torch.testing.assert_close(have[1][:3], want[1])
    torch.testing.assert_close(twin_buffers, buffers)


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(3), lambda: nn.InstanceNorm2d(3, track_running_stats=True),
                                  lambda: nn.SyncBatchNorm(3)], ids=["BatchNorm2d", "InstanceNorm2d", "SyncBatchNorm"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_masked_call_handed_running_statistics_requiring_grad_raises_torch_nn_s_error(make, train):
    """Running statistics that require grad, as functional_call may hand them in: torch.nn
    on the unpadded data raises (its batch norm op is not differentiable in them), and so
    must the masked call, which computed."""
    reference = make().double().train(train)
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    mask = torch.tensor([True, True, True, False]).reshape(4, 1, 1, 1)
    for module, inputs, kwargs in ((reference, x[:3], {}), (twin, x, {"mask": mask})):
        buffers = {"running_mean": module.running_mean.clone().requires_grad_(),
                   "running_var": module.running_var.clone().requires_grad_()}
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            functional_call(module, buffers, (inputs,), kwargs)


def test_vmap_over_per_sample_padding_masks_gives_each_sample_torch_nn_s_unpadded_batch_norm():
    """Batch norm without running statistics, which torch vmaps in training: each vmapped
    batch has its own length, and torch.nn.BatchNorm1d sees that batch cut to its length."""
    torch.manual_seed(1)
    reference = nn.BatchNorm1d(3, track_running_stats=False).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    twin = nt.convert(copy.deepcopy(reference))
    lengths = [4, 7, 2]
    x = torch.randn(len(lengths), 4, 3, 7, dtype=torch.float64)
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).reshape(len(lengths), 1, 1, 7).expand(-1, 4, -1, -1)
    y = vmap(lambda inputs, counted: twin(inputs, mask=counted))(x, mask)
    weights = torch.randn(x.shape, dtype=torch.float64)
    gradients = vmap(grad(lambda inputs, counted, w: (twin(inputs, mask=counted) * w * counted).sum()))(x, mask,
                                                                                                      weights)
    for i, length in enumerate(lengths):
        unpadded = x[i, ..., :length].clone().requires_grad_()
        expected = reference(unpadded)
        torch.testing.assert_close(y[i, ..., :length], expected)
        (expected * weights[i, ..., :length]).sum().backward()
        torch.testing.assert_close(gradients[i, ..., :length], unpadded.grad)
        torch.testing.assert_close(gradients[i, ..., length:], torch.zeros_like(gradients[i, ..., length:]))


# three graph batches of six nodes, each with its own batch vector (graph 2 of the last is empty)
_IDS = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1]])


def _segmented_calls():
    from normlab.torch import geometric
    from normlab.torch.masked import normalize_masked

    torch.manual_seed(2)
    twins = {name: getattr(geometric, name)(4).double() for name in ("InstanceNorm", "LayerNorm", "GraphNorm")}
    calls = {name: (lambda twin: lambda x, ids, count: twin(x, ids, batch_size=count))(twin)
             for name, twin in twins.items()}
    calls["normalize_masked"] = lambda x, ids, count: torch.cat(normalize_masked(
        x, "[n] c", segment_ids=ids, num_segments=count)[:3], dim=0)  # y and the (count, c) statistics
    calls["Norm"] = lambda x, ids, count: nt.Norm("[n] c")(x, segment_ids=ids, num_segments=count)
    return calls


@pytest.mark.parametrize("name", ["normalize_masked", "Norm", "InstanceNorm", "LayerNorm", "GraphNorm"])
def test_vmap_over_per_sample_segment_ids_with_their_count_gives_a_python_loop_s_outputs_and_gradients(name):
    call = _segmented_calls()[name]
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    weights = torch.randn(3, 6, 4, dtype=torch.float64)
    y = vmap(lambda inputs, ids: call(inputs, ids, 3))(x, _IDS)
    torch.testing.assert_close(y, torch.stack([call(x[i], _IDS[i], 3) for i in range(3)]))
    loss = grad(lambda inputs, ids, w: (call(inputs, ids, 3)[:6] * w).sum())
    torch.testing.assert_close(vmap(loss)(x, _IDS, weights),
                               torch.stack([loss(x[i], _IDS[i], weights[i]) for i in range(3)]))


@pytest.mark.parametrize("name", ["normalize_masked", "Norm", "InstanceNorm", "LayerNorm", "GraphNorm"])
def test_vmap_over_per_sample_segment_ids_without_their_count_says_to_pass_it(name):
    """vmap cannot read max(ids) + 1 off batched ids (torch said only "calling .item()")."""
    call = _segmented_calls()[name]
    keyword = "num_segments" if name in ("normalize_masked", "Norm") else "batch_size"
    with pytest.raises(RuntimeError, match=f"batched by torch.func.vmap need {keyword}=: .*loop over the batch"):
        vmap(lambda inputs, ids: call(inputs, ids, None))(torch.randn(3, 6, 4, dtype=torch.float64), _IDS)
