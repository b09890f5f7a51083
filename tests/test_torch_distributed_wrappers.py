"""The twins inside torch's distributed wrappers beyond DistributedDataParallel, on CPU with
gloo: FSDP2 (``fully_shard``) frees and refills its unsharded parameters' storage around
every forward and backward. Oracle: the same model with torch.nn's norms under the same
wrapper."""

import copy

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests import gloo  # noqa: E402
from tests.twins import randomized_pair  # noqa: E402

# (class, constructor arguments, input shape, keyword arguments of the call)
CASES = [
    ("LayerNorm", (8,), (4, 3, 8), {}),
    ("RMSNorm", (8,), (4, 3, 8), {}),
    ("GroupNorm", (2, 8), (4, 8, 3), {}),
    ("BatchNorm2d", (8,), (4, 8, 3, 3), {}),
    ("InstanceNorm1d", (8, 1e-5, 0.1, True), (4, 8, 3), {}),
    ("LayerNorm", (8,), (4, 3, 8), {"mask": torch.ones(4, 3, 1, dtype=torch.bool)}),
]
IDS = ["LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm2d", "InstanceNorm1d", "LayerNorm_masked"]


def _refill(module, seed: int) -> None:
    """What FSDP2 does to a parameter between calls: its storage freed (``resize_(0)``),
    allocated again and filled with the gathered values, its version counter kept."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        storage = p.untyped_storage()
        size = storage.nbytes()
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(p):
            storage.resize_(0)
            storage.resize_(size)
            p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cls_name, args, shape, kwargs", CASES, ids=IDS)
def test_parameters_freed_and_refilled_between_calls_as_fsdp2_does_give_torch_nns_results(cls_name, args, shape,
                                                                                        kwargs, dtype):
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, dtype)
    for step in range(3):
        x = torch.randn(shape, dtype=dtype) * 2 + 1
        x_ref, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, y = reference(x_ref), twin(x_twin, **kwargs)
        torch.testing.assert_close(y, expected)
        grad_y = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, [x_twin, *twin.parameters()], grad_y),
                                   torch.autograd.grad(expected, [x_ref, *reference.parameters()], grad_y))
        # (torch.nn's parameters refilled alike, so that both hold the same values)
        _refill(twin, step)
        _refill(reference, step)



def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        torch.nn.GroupNorm(2, 8), torch.nn.Flatten(), torch.nn.Linear(8 * 2 * 2, 8), torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 4), torch.nn.Unflatten(1, (1, 4)), torch.nn.RMSNorm(4))


def _train_under_fully_shard_as_torch_nn(rank: int, init_method: str):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        reference = _model()
        model = nt.convert(copy.deepcopy(reference))
        for m in (reference, model):
            for layer in (m[0], m[1], m[4], m[7]):  # (each resharded after its forward)
                fully_shard(layer)
            fully_shard(m)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, model)]
        for step in range(3):
            x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(10 * step + rank))
            outputs = []
            for m, optimizer in zip((reference, model), optimizers):
                optimizer.zero_grad()
                y = m(x)
                y.square().mean().backward()
                optimizer.step()
                outputs.append(y.detach())
            torch.testing.assert_close(outputs[1], outputs[0], msg=lambda m: f"step {step}: {m}")
        for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
            if hasattr(value, "full_tensor"):
                value, expected = value.full_tensor(), expected.full_tensor()
            torch.testing.assert_close(value, expected, msg=lambda m: f"{name}: {m}")

    finally:
        dist.destroy_process_group()


def test_a_converted_model_trains_under_fully_shard_over_two_gloo_processes_as_torch_nn():
    gloo.spawn_and_exit(_train_under_fully_shard_as_torch_nn, nprocs=2)


def test_convert_after_fully_shard_leaves_the_norms_it_holds_alone_with_a_warning():
    """Converted after fully_shard, a twin (or a fused block) kept the sharded parameters:
    "got mixed torch.Tensor and DTensor" at the next forward. One rank in this process shows
    it (the parameters are DTensors on any number of ranks), without spawning two."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
        late = _model()
        fully_shard(late[1])
        fully_shard(late)
        with pytest.warns(UserWarning, match=r"left 4 norm layer\(s\) unconverted, because FSDP.*convert the model "
                                             "before fully_shard"):
            nt.convert(late)
        assert not any(type(m).__module__.startswith("normlab") for m in late.modules())
        late(x).sum().backward()
        # and with fuse=True: a sharded LLaMA's decoder layers stay unfused (the fused norms kept the sharded weights)
        try:
            import transformers
        except ImportError:  # (the fuse=True check needs a LLaMA; the rest has run)
            return
        config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1)
        llama = transformers.AutoModel.from_config(config)
        fully_shard(llama.layers[0])
        fully_shard(llama)
        with pytest.warns(UserWarning, match=r"left 3 norm layer\(s\) unconverted, because FSDP"):
            nt.convert(llama, fuse=True)
        assert not any(type(m).__module__.startswith("normlab") for m in llama.modules())
        llama(torch.tensor([[1, 2, 3]])).last_hidden_state.sum().backward()
    finally:
        dist.destroy_process_group()


def test_convert_sync_batchnorm_after_fully_shard_leaves_the_batch_norms_it_holds_alone_with_a_warning():
    """SyncBatchNorm.convert_sync_batchnorm after fully_shard, silently, gave a SyncBatchNorm the
    sharded parameters: "got mixed torch.Tensor and DTensor" at the next forward (torch's own
    conversion moves them alike, into a module FSDP's hooks never see). Those batch norms are
    left alone with nt.convert's warning; the model computes as the unsharded torch.nn one."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        reference = _model()
        late = copy.deepcopy(reference)
        fully_shard(late[1])
        fully_shard(late)
        with pytest.warns(UserWarning, match=r"convert_sync_batchnorm left 1 batch norm layer\(s\) unconverted, "
                                             r"because FSDP.*: 1 \(FSDPBatchNorm2d\); convert the model before "
                                             "fully_shard"):
            converted = nt.SyncBatchNorm.convert_sync_batchnorm(late)
        assert converted is late and not any(type(m).__module__.startswith("normlab") for m in late.modules())
        y = late(x)
        torch.testing.assert_close(y, reference(x))
        y.sum().backward()
    finally:
        dist.destroy_process_group()


def test_a_weight_with_torch_s_negative_bit_set_normalizes_as_torch_reads_it():
    """``z.conj().imag`` is a real tensor whose memory holds the opposites of its values
    (torch's negative bit); the view of the parameters' memory read it unresolved, and the
    output came out with the weight's sign flipped. Oracle: torch's layer_norm."""
    from normlab.torch.masked import normalize_masked

    weight = torch.complex(torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 4.0])).conj().imag
    assert weight.is_neg()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    expected = torch.nn.functional.layer_norm(x, (4,), weight.resolve_neg())
    torch.testing.assert_close(nt.normalize(x, "b [c]", weight=weight, params="c"), expected)
    torch.testing.assert_close(normalize_masked(x, "b [c]", weight=weight, params="c").y, expected)


class _SequenceParallelBlock(torch.nn.Module):
    """A transformer block's shape under tensor parallelism: norm, MLP, residual, norm."""

    def __init__(self, norm):
        super().__init__()
        self.norm, self.up, self.down, self.norm2 = norm, torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), copy.deepcopy(norm)

    def forward(self, x):
        return self.norm2(x + self.down(torch.relu(self.up(self.norm(x)))))


def _train_under_sequence_parallel_as_torch_nn(rank: int, init_method: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        plan = {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
                "down": RowwiseParallel(output_layouts=Shard(1)), "norm2": SequenceParallel()}
        for norm in (torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)):
            # DTensors outside any plan: replicated parameters, the input sharded on the batch or replicated
            torch.manual_seed(0)
            reference = copy.deepcopy(norm)
            with torch.no_grad():
                reference.weight.uniform_(0.5, 1.5)
            twin = nt.convert(copy.deepcopy(reference))
            for m in (reference, twin):
                distribute_module(m, mesh)
            for placement in (Shard(0), Replicate()):
                x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
                x_ref, x_twin = (distribute_tensor(x, mesh, [placement]).requires_grad_() for _ in range(2))
                expected, y = reference(x_ref), twin(x_twin)
                assert isinstance(y, DTensor) and y.placements == expected.placements
                torch.testing.assert_close(y.full_tensor(), expected.full_tensor())
                grad_y = torch.randn_like(expected)
                torch.testing.assert_close(torch.autograd.grad(y, [x_twin, twin.weight], grad_y),
                                           torch.autograd.grad(expected, [x_ref, reference.weight], grad_y))

            # converted before the plan (SequenceParallel shards the norms' input on the sequence and
            # replicates their weights) and after it: torch.nn's outputs and parameters over AdamW steps
            torch.manual_seed(0)
            reference = _SequenceParallelBlock(copy.deepcopy(norm))
            single = copy.deepcopy(reference)
            before = nt.convert(copy.deepcopy(reference))
            for m in (reference, before):
                parallelize_module(m, mesh, plan)
            after = parallelize_module(copy.deepcopy(single), mesh, plan)
            after = nt.convert(after)
            models = (reference, before, after)
            for m in models[1:]:
                assert type(m.norm).__module__.startswith("normlab"), type(m.norm)
            optimizers = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in models]
            for step in range(3):
                x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(step))
                outputs = []
                for m, optimizer in zip(models, optimizers):
                    optimizer.zero_grad()
                    y = m(x.chunk(2, dim=1)[rank]).full_tensor()
                    y.square().mean().backward()
                    optimizer.step()
                    outputs.append(y.detach())
                if step == 0:
                    torch.testing.assert_close(outputs[0], single(x))
                for y in outputs[1:]:
                    torch.testing.assert_close(y, outputs[0], msg=lambda m: f"{norm}, step {step}: {m}")
            for m in models[1:]:
                for (name, value), expected in zip(m.state_dict().items(), reference.state_dict().values()):
                    torch.testing.assert_close(value.full_tensor(), expected.full_tensor(), msg=name)
    finally:
        dist.destroy_process_group()


def test_converted_norms_train_under_tensor_parallel_sequence_parallel_as_torch_nn():
    gloo.spawn_and_exit(_train_under_sequence_parallel_as_torch_nn, nprocs=2)
