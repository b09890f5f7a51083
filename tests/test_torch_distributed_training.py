"""A converted model in the training flows users run over gloo on CPU: DistributedDataParallel's
options (unused parameters, a static graph, gradients as bucket views, small buckets, buffers
not broadcast, frozen norm parameters, ``no_sync`` accumulation), ``Join`` over uneven inputs
with a rank's batch of one and ``ZeroRedundancyOptimizer``, and a ``torch.distributed.checkpoint``
of an FSDP2 model and its optimizer loaded into the unconverted model and back. Oracle: the
same model with torch.nn's norms through the same steps."""

import copy

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests import gloo  # noqa: E402



class _Net(torch.nn.Module):
    """Every norm family, and a LayerNorm that only some steps use (for find_unused_parameters)."""

    def __init__(self, with_sometimes: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        self.bn, self.gn = torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8)
        self.instance = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.fc = torch.nn.Linear(8, 8)
        self.ln, self.rms = torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)
        self.sometimes = torch.nn.LayerNorm(8) if with_sometimes else None
        with torch.no_grad():
            for module in (self.bn, self.gn, self.instance, self.ln, self.rms):
                module.weight.uniform_(0.5, 1.5)

    def forward(self, x, use_sometimes: bool = False):
        h = self.instance(self.gn(torch.relu(self.bn(self.conv(x))))).mean((2, 3))
        h = self.ln(self.fc(h))
        return self.rms(self.sometimes(h) if use_sometimes else h)


def _batch(step: int, rank: int, size: int):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return (torch.randn(size, 3, 5, 5, generator=generator, dtype=torch.float64),
            torch.randn(size, 8, generator=generator, dtype=torch.float64))


def _assert_same_state(model, reference, what: str) -> None:
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        if hasattr(value, "full_tensor"):
            value, expected = value.full_tensor(), expected.full_tensor()
        torch.testing.assert_close(value, expected, msg=lambda m: f"{what}, {name}: {m}")


def _ddp_options_train_as_torch_nn(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    options = [dict(find_unused_parameters=True), dict(static_graph=True),
               dict(gradient_as_bucket_view=True, bucket_cap_mb=1e-4), dict(broadcast_buffers=False)]
    for index, option in enumerate(options):
        torch.manual_seed(index)
        reference = _Net(with_sometimes="find_unused_parameters" in option).double()
        if index == 1:  # (the static graph's model has frozen norm parameters)
            for p in (*reference.bn.parameters(), reference.ln.weight, *reference.rms.parameters()):
                p.requires_grad_(False)
        twin = nt.convert(copy.deepcopy(reference))
        assert all(type(m).__module__.startswith("normlab") for m in (twin.bn, twin.gn, twin.instance, twin.rms))
        models = [DistributedDataParallel(m, **option) for m in (reference, twin)]
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
        for step in range(2):
            use_sometimes = "find_unused_parameters" in option and step == 1
            outputs = []
            for model, optimizer in zip(models, optimizers):
                optimizer.zero_grad()
                if "static_graph" not in option:  # (torch refuses no_sync in a static graph's first step)
                    with model.no_sync():
                        x, target = _batch(step + 10, rank, 2)
                        (model(x, use_sometimes) - target).square().mean().backward()
                x, target = _batch(step, rank, 3 + rank)
                y = model(x, use_sometimes)
                (y - target).square().mean().backward()
                optimizer.step()
                outputs.append(y.detach())
            torch.testing.assert_close(outputs[1], outputs[0], msg=lambda m: f"{option}, step {step}: {m}")
        _assert_same_state(models[1].module, models[0].module, str(option))


def _join_with_uneven_inputs_and_zero_trains_as_torch_nn(rank: int) -> None:
    from torch.distributed.algorithms.join import Join
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    reference = _Net().double()
    models = [DistributedDataParallel(m) for m in (reference, nt.convert(copy.deepcopy(reference)))]
    outputs = []
    for model in models:
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
        outputs.append([])
        with Join([model, optimizer]):
            for step in range(2 + 2 * rank):  # rank 1 runs two more steps, the first on a batch of one
                x, target = _batch(step, rank, 1 if (rank, step) == (1, 2) else 3)
                optimizer.zero_grad()
                y = model(x)
                (y - target).square().sum().backward()
                optimizer.step()
                outputs[-1].append(y.detach())
    for step, (y, expected) in enumerate(zip(*reversed(outputs))):
        torch.testing.assert_close(y, expected, msg=lambda m: f"Join, step {step}: {m}")
    _assert_same_state(models[1].module, models[0].module, "Join")


def _checkpoint_of_a_converted_fsdp2_model_loads_into_torch_nn_and_back(rank: int, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def sharded(model):
        for layer in (model.conv, model.bn, model.gn, model.instance, model.ln):
            fully_shard(layer)
        return fully_shard(model)

    def train(model, optimizer):
        for step in range(2):  # (the same batch on each rank: the buffers, saved once, agree)
            x, target = _batch(step, 0, 3)
            optimizer.zero_grad()
            (model(x) - target).square().mean().backward()
            optimizer.step()

    def load(model, optimizer, path):
        state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    torch.manual_seed(0)
    reference = _Net().double()
    twin = nt.convert(copy.deepcopy(reference))
    models = [sharded(m) for m in (reference, twin)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for model, optimizer in zip(models, optimizers):
        train(model, optimizer)
    for source, target, name in ((twin, _Net().double(), "converted into torch.nn"),
                                 (reference, nt.convert(_Net().double()), "torch.nn into converted")):
        optimizer = optimizers[source is twin]
        path = f"{directory}/{name.replace(' ', '_')}"
        dcp.save(dict(zip(("model", "optim"), get_state_dict(source, optimizer))), checkpoint_id=path)
        target = sharded(target)
        target_optimizer = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
        load(target, target_optimizer, path)
        _assert_same_state(target, source, name)
        train(target, target_optimizer)  # (the momentum buffers came along: the next steps agree too)
        train(source, optimizer)
        _assert_same_state(target, source, f"{name}, trained on")


def _run(rank: int, init_method: str, directory: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        _ddp_options_train_as_torch_nn(rank)
        _join_with_uneven_inputs_and_zero_trains_as_torch_nn(rank)
        _checkpoint_of_a_converted_fsdp2_model_loads_into_torch_nn_and_back(rank, directory)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_converted_model_trains_as_torch_nn_under_ddp_options_join_zero_and_a_distributed_checkpoint(tmp_path):
    gloo.spawn_and_exit(_run, str(tmp_path), nprocs=2)
