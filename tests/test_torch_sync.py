"""SyncBatchNorm over gloo: two processes on 127.0.0.1 with unequal batch sizes give
BatchNorm's outputs, gradients and running statistics on the concatenated batch, alone and
inside DistributedDataParallel (the README's recipe) over several optimizer steps."""

import copy
import os
import re
import sys
import weakref

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests import gloo  # noqa: E402
from normlab.torch import sync  # noqa: E402

WORLD_SIZE = 2
BATCH_PER_RANK = (3, 5)  # unequal on purpose: a mean of means would be wrong
CHANNELS = 4
STEPS = 2



def _batch(step: int, dtype):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(sum(BATCH_PER_RANK), CHANNELS, 3, 3, generator=generator, dtype=dtype) * 2 + 5
    grad_y = torch.randn(x.shape, generator=generator, dtype=dtype)
    return x, grad_y


def _compare_with_single_process(rank: int, init_method: str, dtype_name: str, momentum):
    dtype = getattr(torch, dtype_name)
    tolerance = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        reference = torch.nn.BatchNorm2d(CHANNELS, momentum=momentum).to(dtype)
        with torch.no_grad():
            reference.weight.normal_()
            reference.bias.normal_()
        sync = nt.SyncBatchNorm(CHANNELS, momentum=momentum).to(dtype)
        sync.load_state_dict(reference.state_dict())
        start = sum(BATCH_PER_RANK[:rank])
        mine = slice(start, start + BATCH_PER_RANK[rank])
        for step in range(STEPS):
            x, grad_y = _batch(step, dtype)
            x.requires_grad_()
            expected = reference(x)
            (expected * grad_y).sum().backward()

            x_local = x.detach()[mine].clone().requires_grad_()
            y_local = sync(x_local)
            (y_local * grad_y[mine]).sum().backward()

            torch.testing.assert_close(y_local, expected[mine], **tolerance, msg=lambda m: f"output: {m}")
            torch.testing.assert_close(x_local.grad, x.grad[mine], **tolerance, msg=lambda m: f"input grad: {m}")
        for name in ("weight", "bias"):
            grad = getattr(sync, name).grad.clone()
            dist.all_reduce(grad)  # what DistributedDataParallel does (it averages; sum here)
            torch.testing.assert_close(grad, getattr(reference, name).grad, **tolerance, msg=lambda m: f"{name}: {m}")
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(sync.state_dict()[name], value, **tolerance, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype_name, momentum", [("float64", 0.1), ("float32", None)])
def test_sync_batch_norm_over_two_gloo_processes_with_unequal_batches_equals_batch_norm(dtype_name, momentum):
    gloo.spawn(_compare_with_single_process, dtype_name, momentum, nprocs=WORLD_SIZE)


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 5), torch.nn.BatchNorm1d(5, momentum=None))


def _train_in_ddp_like_one_process(rank: int, init_method: str):
    """The README's recipe on each rank against torch.nn on the whole batch in one process:
    DDP averages the ranks' gradients, so the reference loss is the total over ranks / 2."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        reference = _model().double()
        model = copy.deepcopy(reference)
        model = nt.SyncBatchNorm.convert_sync_batchnorm(model)
        assert type(model[1]) is nt.SyncBatchNorm and type(model[5]) is nt.SyncBatchNorm
        model = torch.nn.parallel.DistributedDataParallel(model)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, model)]
        start = sum(BATCH_PER_RANK[:rank])
        mine = slice(start, start + BATCH_PER_RANK[rank])
        tolerance = dict(atol=1e-10, rtol=1e-9)
        for step in range(STEPS + 1):
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(sum(BATCH_PER_RANK), 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1
            target = torch.randn(sum(BATCH_PER_RANK), 5, generator=generator, dtype=torch.float64)
            for optimizer in optimizers:
                optimizer.zero_grad()
            expected = reference(x)
            (((expected - target) ** 2).sum() / WORLD_SIZE).backward()
            y = model(x[mine])
            ((y - target[mine]) ** 2).sum().backward()
            for optimizer in optimizers:
                optimizer.step()
            torch.testing.assert_close(y, expected[mine], **tolerance, msg=lambda m: f"output at step {step}: {m}")
        for (name, value), (_, expected) in zip(model.module.state_dict().items(), reference.state_dict().items()):
            torch.testing.assert_close(value, expected, **tolerance, msg=lambda m: f"{name} after the steps: {m}")
    finally:
        dist.destroy_process_group()


def test_readme_recipe_trains_in_distributed_data_parallel_as_batch_norm_on_the_concatenated_batch():
    gloo.spawn(_train_in_ddp_like_one_process, nprocs=WORLD_SIZE)


def test_merge_of_count_weighted_moments_is_exact_for_unequal_counts():
    data = torch.randn(11, 3, dtype=torch.float64)
    parts = [data[:2], data[2:]]
    counts = torch.tensor([[2.0] * 3, [9.0] * 3], dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in parts])
    m2s = torch.stack([p.var(0, correction=0) * len(p) for p in parts])
    total, mean, m2 = sync._merge_moments(counts, means, m2s)
    torch.testing.assert_close(total, torch.full((3,), 11.0, dtype=torch.float64))
    torch.testing.assert_close(mean, data.mean(0))
    torch.testing.assert_close(m2 / 11, data.var(0, correction=0))


def _masked_composite(x, mask, weight, bias, eps):
    """Masked batch norm in torch operations (autograd gives its gradients): statistics of
    the counted elements over the whole batch, every element normalized."""
    m = mask.expand(x.shape).to(x.dtype)
    dims = [0, 2, 3]
    n = m.sum(dims, keepdim=True)
    mean = (m * x).sum(dims, keepdim=True) / n
    var = (m * (x - mean) ** 2).sum(dims, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def _masked_batch(dtype):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(sum(BATCH_PER_RANK), CHANNELS, 3, 3, generator=generator, dtype=dtype) * 2 + 5
    grad_y = torch.randn(x.shape, generator=generator, dtype=dtype)
    # whole positions masked (broadcast over the channels); rank 0 counts few of its own
    mask = torch.rand(sum(BATCH_PER_RANK), 1, 3, 3, generator=generator) < 0.6
    mask[: BATCH_PER_RANK[0]] &= torch.rand(BATCH_PER_RANK[0], 1, 3, 3, generator=generator) < 0.3
    return x, grad_y, mask


def _compare_masked_with_single_process(rank: int, init_method: str):
    dtype = torch.float64
    tolerance = dict(atol=1e-10, rtol=1e-9)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        sync = nt.SyncBatchNorm(CHANNELS, momentum=0.3).to(dtype)
        with torch.no_grad():
            sync.weight.normal_()
            sync.bias.normal_()
        x, grad_y, mask = _masked_batch(dtype)
        start = sum(BATCH_PER_RANK[:rank])
        mine = slice(start, start + BATCH_PER_RANK[rank])
        x_local = x[mine].clone().requires_grad_()
        y_local = sync(x_local, mask=mask[mine])
        (y_local * grad_y[mine]).sum().backward()

        # the counted positions of the whole batch, as rows: torch's batch norm on them alone
        counted = mask.expand(x.shape).permute(1, 0, 2, 3).reshape(CHANNELS, -1)
        rows = x.permute(1, 0, 2, 3).reshape(CHANNELS, -1)[counted].reshape(CHANNELS, -1).T
        running_mean, running_var = torch.zeros(CHANNELS, dtype=dtype), torch.ones(CHANNELS, dtype=dtype)
        expected_rows = torch.nn.functional.batch_norm(rows, running_mean, running_var, sync.weight.detach(),
                                                       sync.bias.detach(), training=True, momentum=0.3, eps=sync.eps)
        local_counted = mask[mine].expand(x_local.shape).permute(1, 0, 2, 3).reshape(CHANNELS, -1)
        mine_rows = y_local.detach().permute(1, 0, 2, 3).reshape(CHANNELS, -1)[local_counted].reshape(CHANNELS, -1).T
        offset = int(mask[:start].sum())
        torch.testing.assert_close(mine_rows, expected_rows[offset:offset + mine_rows.shape[0]], **tolerance)
        torch.testing.assert_close(sync.running_mean, running_mean, **tolerance)
        torch.testing.assert_close(sync.running_var, running_var, **tolerance)

        # every element (excluded ones too) and the input gradient: the torch composite
        x_ref = x.clone().requires_grad_()
        expected = _masked_composite(x_ref, mask, sync.weight.detach(), sync.bias.detach(), sync.eps)
        (expected * grad_y).sum().backward()
        torch.testing.assert_close(y_local, expected[mine], **tolerance)
        torch.testing.assert_close(x_local.grad, x_ref.grad[mine], **tolerance)

        # padding that holds inf and NaN: the counted positions and the statistics as before
        padded = nt.SyncBatchNorm(CHANNELS, momentum=0.3).to(dtype)
        padded.load_state_dict({**sync.state_dict(), "running_mean": torch.zeros(CHANNELS, dtype=dtype),
                                "running_var": torch.ones(CHANNELS, dtype=dtype), "num_batches_tracked": torch.tensor(0)})
        padding = torch.full_like(x[mine], float("nan"))
        padding[..., 0] = float("inf")
        x_padded = torch.where(mask[mine], x[mine], padding)
        y_padded = padded(x_padded, mask=mask[mine])
        torch.testing.assert_close(y_padded.permute(1, 0, 2, 3).reshape(CHANNELS, -1)[local_counted]
                                   .reshape(CHANNELS, -1).T, mine_rows, **tolerance)
        torch.testing.assert_close(padded.running_mean, running_mean, **tolerance)
        torch.testing.assert_close(padded.running_var, running_var, **tolerance)
        # and the gradients of a loss on the counted outputs alone, in a backward and one under
        # create_graph=True: those of the finite batch (torch autograd), the padding in none of them
        counted_grad = torch.where(mask, grad_y, 0)
        x_ref = x.clone().requires_grad_()
        w_ref = padded.weight.detach().clone().requires_grad_()
        expected = _masked_composite(x_ref, mask, w_ref, padded.bias.detach(), padded.eps)
        want_x, = torch.autograd.grad((expected * counted_grad).sum(), x_ref, retain_graph=True)
        want_w, = torch.autograd.grad((expected[mine] * counted_grad[mine]).sum(), w_ref)  # (DDP sums the ranks')
        for create_graph in (False, True):
            x_padded.requires_grad_()
            y_padded = padded(x_padded, mask=mask[mine])
            grad_x, grad_w = torch.autograd.grad((y_padded * counted_grad[mine]).sum(), (x_padded, padded.weight),
                                                 create_graph=create_graph)
            torch.testing.assert_close(grad_x, want_x[mine], **tolerance)
            torch.testing.assert_close(grad_w, want_w, **tolerance)

        # a channel with nothing counted on any rank: exactly bias, running statistics kept
        channel_mask = mask[mine].expand(x_local.shape).clone()
        channel_mask[:, 1] = False
        before = sync.running_mean[1].clone(), sync.running_var[1].clone()
        y = sync(x[mine], mask=channel_mask)
        assert torch.equal(y[:, 1], sync.bias.detach()[1].expand_as(y[:, 1]))
        assert torch.equal(sync.running_mean[1], before[0]) and torch.equal(sync.running_var[1], before[1])
    finally:
        dist.destroy_process_group()


def test_masked_sync_batch_norm_over_two_gloo_processes_equals_batch_norm_on_the_counted_elements():
    gloo.spawn(_compare_masked_with_single_process, nprocs=WORLD_SIZE)


def _threads() -> dict:
    """This process's threads: Linux's thread id and name of each."""
    names = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names[int(task)] = comm.read().strip()
        except FileNotFoundError:  # (a thread that ended meanwhile)
            pass
    return names


def _train_step_then_destroy_the_process_group(rank: int, init_method: str):
    """Synced steps, with and without a mask, under create_graph=True too, then inside
    DistributedDataParallel, then destroy_process_group: torch stops the group's threads
    there, as where only torch's collectives ran; a group kept alive ran its threads into
    interpreter shutdown, which aborted a rank ("terminate called without an active
    exception"). Each all-reduce's work is kept here, as gloo's worker thread keeps the last
    one until it next takes the GIL (the main thread may hold it until the process exits):
    a tensor it holds that led to the group (an output of the gradient penalty's
    differentiable all-reduce, whose node holds the group) kept the group alive past
    destroy_process_group and the caller's return."""
    before = _threads()
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    # the group's threads, by id: torch 2.12 leaves gloo's unnamed ("python"), 2.13 names them gloo_tcp_loop
    group_threads = set(_threads()) - set(before)
    kept_works, all_reduce = [], dist.all_reduce

    def all_reduce_keeping_its_work(tensor, *args, async_op=False, **kwargs):
        work = all_reduce(tensor, *args, async_op=True, **kwargs)
        kept_works.append(work)
        return work if async_op else work.wait()

    dist.all_reduce = all_reduce_keeping_its_work
    try:
        assert group_threads  # (the check sees them)
        sync = nt.SyncBatchNorm(CHANNELS).double()
        x, grad_y, mask = _masked_batch(torch.float64)
        start = sum(BATCH_PER_RANK[:rank])
        mine = slice(start, start + BATCH_PER_RANK[rank])
        for step_mask in (None, mask[mine]):
            (sync(x[mine].clone().requires_grad_(), mask=step_mask) * grad_y[mine]).sum().backward()
            x_local = x[mine].clone().requires_grad_()
            grad_x, = torch.autograd.grad((sync(x_local, mask=step_mask) * grad_y[mine]).sum(), x_local,
                                          create_graph=True)
            grad_x.square().sum().backward()
        del grad_x
        dynamo_loaded = "torch._dynamo" in sys.modules
        # the README's recipe: DistributedDataParallel's constructor imports Dynamo
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(sync))
        (model(x[mine]) * grad_y[mine]).sum().backward()
        del model
        group = weakref.ref(dist.group.WORLD)
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()
    assert len(kept_works) > 4  # (the synced steps' all-reduces went through the keeper)
    assert group() is None, "a work kept the process group alive past destroy_process_group"
    kept_works.clear()  # (their gloo context holds the transport's thread)
    alive = {tid: name for tid, name in _threads().items() if tid in group_threads}
    assert not alive, f"the process group's threads still run after destroy_process_group: {alive}"
    assert not dynamo_loaded, "a synced step imported Dynamo (1.4 s), which torch.compile alone needs"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_destroy_process_group_after_synced_steps_stops_the_gloo_threads_and_no_step_imports_dynamo():
    gloo.spawn(_train_step_then_destroy_the_process_group, nprocs=WORLD_SIZE)


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in_a_model"])
def test_scripting_sync_batch_norm_raises_a_runtime_error_as_torchs_does_and_tracing_works(alone):
    def wrap(norm):
        return norm if alone else torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), norm)

    with pytest.raises(RuntimeError):  # the oracle: torch's own cannot be scripted either
        torch.jit.script(wrap(torch.nn.SyncBatchNorm(4)))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile SyncBatchNorm.*torch.jit.trace"):
        torch.jit.script(wrap(nt.SyncBatchNorm(4)))
    model, reference = wrap(nt.SyncBatchNorm(4)).eval(), wrap(torch.nn.BatchNorm2d(4)).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3 if not alone else 4, 5, 5)
    torch.testing.assert_close(torch.jit.trace(model, x)(x), reference(x))


THREE_RANKS = (2, 3, 4)  # batch sizes of ranks 0, 1, 2
FLOAT64_TOLERANCE = dict(atol=1e-10, rtol=1e-9)


def _three_rank_batch(rank: int, seed: int):
    """The concatenated batch (x, grad_y, mask), the same on every rank, and this rank's slice."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(THREE_RANKS), CHANNELS, 2, 3, generator=generator, dtype=torch.float64) * 2 + 1
    grad_y = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    mask = torch.rand(sum(THREE_RANKS), 1, 2, 3, generator=generator) < 0.7
    start = sum(THREE_RANKS[:rank])
    return x, grad_y, mask, slice(start, start + THREE_RANKS[rank])


def _reference_batch_norm():
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(CHANNELS).double()
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    return reference


def _second_derivatives_are_the_concatenated_batchs(rank: int):
    """The penalty ||∂L/∂x||², each rank's share of the whole batch's, with and without a mask."""
    x, grad_y, mask, mine = _three_rank_batch(rank, 3)
    tolerance = FLOAT64_TOLERANCE
    reference = _reference_batch_norm()
    sync = nt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    x_ref = x.clone().requires_grad_()
    grad_x, = torch.autograd.grad((reference(x_ref) * grad_y).sum(), x_ref, create_graph=True)
    grad_x.square().sum().backward()
    x_local = x[mine].clone().requires_grad_()
    grad_x_local, = torch.autograd.grad((sync(x_local) * grad_y[mine]).sum(), x_local, create_graph=True)
    grad_x_local.square().sum().backward()
    torch.testing.assert_close(grad_x_local, grad_x[mine], **tolerance)
    torch.testing.assert_close(x_local.grad, x_ref.grad[mine], **tolerance)
    weight_grad = sync.weight.grad.clone()
    dist.all_reduce(weight_grad)
    torch.testing.assert_close(weight_grad, reference.weight.grad, **tolerance)

    # the same with a mask, against the masked composite's autograd
    weight, bias = reference.weight.detach(), reference.bias.detach()
    x_ref = x.clone().requires_grad_()
    expected = _masked_composite(x_ref, mask, weight, bias, sync.eps)
    grad_x, = torch.autograd.grad((expected * grad_y).sum(), x_ref, create_graph=True)
    grad_x.square().sum().backward()
    x_local = x[mine].clone().requires_grad_()
    grad_x_local, = torch.autograd.grad((sync(x_local, mask=mask[mine]) * grad_y[mine]).sum(), x_local,
                                        create_graph=True)
    grad_x_local.square().sum().backward()
    torch.testing.assert_close(grad_x_local, grad_x[mine], **tolerance)
    torch.testing.assert_close(x_local.grad, x_ref.grad[mine], **tolerance)


def _a_rank_outside_the_process_group_normalizes_its_own_batch(rank: int):
    """process_group=new_group([0, 1]): ranks 0 and 1 share statistics; rank 2, outside the
    group, normalizes its own batch (torch's SyncBatchNorm gets world size -1 there and
    falls back to batch norm)."""
    x, _, _, mine = _three_rank_batch(rank, 4)
    group = dist.new_group([0, 1])
    pair = nt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(CHANNELS).double(), process_group=group)
    alone = torch.nn.BatchNorm2d(CHANNELS).double()
    together = slice(0, THREE_RANKS[0] + THREE_RANKS[1])
    expected = alone(x[mine]) if rank == 2 else alone(x[together])[mine]
    tolerance = FLOAT64_TOLERANCE
    torch.testing.assert_close(pair(x[mine]), expected, **tolerance)
    torch.testing.assert_close(pair.running_var, alone.running_var, **tolerance)
    # a model that holds SyncBatchNorms already (built so, or converted before): rescoped
    rescoped = nt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(nt.SyncBatchNorm(CHANNELS).double()),
                                                       process_group=group)
    torch.testing.assert_close(rescoped(x[mine]), expected, **tolerance)


def _one_value_over_all_ranks_is_refused_on_every_rank(rank: int):
    with pytest.raises(ValueError, match=r"got 1 over the 3 ranks .*input size \((1|0), 4\) on this rank"):
        nt.SyncBatchNorm(CHANNELS)(torch.randn(int(rank == 0), CHANNELS))


def _a_wrong_channel_count_raises_torchs_error_and_leaves_the_running_statistics(rank: int):
    """Every rank's input has one channel too many: torch's batch norm error, in its words,
    before any collective and any change of the running statistics (torch.nn's raises
    before updating them; only num_batches_tracked counts the batch, as there)."""
    x = torch.randn(THREE_RANKS[rank], CHANNELS + 1, 2, 3)
    for build in (lambda: torch.nn.BatchNorm2d(CHANNELS), lambda: torch.nn.BatchNorm2d(CHANNELS, affine=False)):
        reference, sync = build(), nt.SyncBatchNorm.convert_sync_batchnorm(build())
        for module in (reference, sync):
            with torch.no_grad():
                module.running_mean.fill_(1.0)
        with pytest.raises(RuntimeError) as expected:
            reference(x)
        for mask in (None, torch.ones(x.shape, dtype=torch.bool)):
            with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
                sync(x, mask=mask)
            torch.testing.assert_close(sync.running_mean, reference.running_mean)


def _a_dtype_mix_torch_refuses_raises_its_error_on_every_rank(rank: int):
    """Float64 input into float32 parameters and the reverse: torch's batch norm raises
    "mixed dtype (CPU)", as normlab's does on one rank, before any collective; a bfloat16
    input beside float32 parameters, which torch takes, is synced (the oracle: torch's batch
    norm on the concatenated batch). An integer input into a batch norm without parameters
    or running statistics: torch's "not implemented for 'Long'", with a mask too (the
    masked statistics computed one)."""
    x, _, _, mine = _three_rank_batch(rank, 6)
    bare = torch.nn.BatchNorm2d(CHANNELS, affine=False, track_running_stats=False)
    integers = torch.randint(0, 5, (THREE_RANKS[rank], CHANNELS, 2, 3))
    with pytest.raises(NotImplementedError) as expected:
        bare(integers)
    for mask in (None, torch.ones(integers.shape, dtype=torch.bool)):
        with pytest.raises(NotImplementedError, match=re.escape(str(expected.value))):
            nt.SyncBatchNorm.convert_sync_batchnorm(bare)(integers, mask=mask)
    for input_dtype, module_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        reference = torch.nn.BatchNorm2d(CHANNELS).to(module_dtype)
        sync = nt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
        with pytest.raises(RuntimeError) as expected:
            reference(x.to(input_dtype))
        with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
            sync(x[mine].to(input_dtype))
        torch.testing.assert_close(sync.running_mean, reference.running_mean)
    reference = torch.nn.BatchNorm2d(CHANNELS)
    sync = nt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    x = x.to(torch.bfloat16)
    torch.testing.assert_close(sync(x[mine]), reference(x)[mine], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(sync.running_var, reference.running_var)


def _float32_far_from_zero_stays_within_1e_4_of_float64(rank: int):
    """The numerics contract at |mean|/std = 1e6 in float32, as normlab's BatchNorm2d keeps
    it: outputs and input gradients (with and without a mask) against float64 batch norm on
    the concatenated batch; exact zeros for a constant channel."""
    x, grad_y, mask, mine = _three_rank_batch(rank, 5)
    x = (x - 1) / 2 + 1e6  # std 1
    x32 = x.float()
    reference = _reference_batch_norm()
    sync = nt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference).float())
    x_ref = x32.double().requires_grad_()
    expected = reference(x_ref)
    (expected * grad_y).sum().backward()
    x_local = x32[mine].clone().requires_grad_()
    y = sync(x_local)
    (y * grad_y[mine].float()).sum().backward()
    torch.testing.assert_close(y.double(), expected[mine], atol=1e-4, rtol=0)
    torch.testing.assert_close(x_local.grad.double(), x_ref.grad[mine], atol=1e-4, rtol=1e-4)
    x_ref.grad = None
    weight, bias = reference.weight.detach(), reference.bias.detach()
    expected = _masked_composite(x_ref, mask, weight, bias, sync.eps)
    (expected * grad_y).sum().backward()
    x_local = x32[mine].clone().requires_grad_()
    y = sync(x_local, mask=mask[mine])
    (y * grad_y[mine].float()).sum().backward()
    torch.testing.assert_close(y.double(), expected[mine], atol=1e-4, rtol=0)
    torch.testing.assert_close(x_local.grad.double(), x_ref.grad[mine], atol=1e-4, rtol=1e-4)
    constant = nt.SyncBatchNorm(CHANNELS, affine=False)(torch.full((THREE_RANKS[rank], CHANNELS, 2, 3), 1e6 + 0.5))
    assert not constant.any()


def _momentum_none_under_torch_compile_keeps_batch_norms_running_statistics(rank: int):
    """torch.compile (Inductor) with momentum=None: the cumulative average over three steps,
    as torch.nn.BatchNorm1d's on the concatenated batches (Inductor compiled the update with
    the factor 1/num_batches_tracked as a dynamic float, wrong from the third step on)."""
    reference = torch.nn.BatchNorm1d(CHANNELS, momentum=None).double()
    sync = nt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    compiled = torch.compile(sync)
    for step in range(3):
        x, _, _, mine = _three_rank_batch(rank, 10 + step)
        x = x[:, :, 0] + step
        torch.testing.assert_close(compiled(x[mine]), reference(x)[mine], **FLOAT64_TOLERANCE)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[name], value, **FLOAT64_TOLERANCE, msg=lambda m: f"{name}: {m}")


def _a_transposed_input_gives_torch_nns_layout(rank: int):
    """(N, L, C) features transposed into BatchNorm1d, as sequence models feed it, with and
    without a mask: torch.nn's contiguous output (its .view works) and values; channels_last
    stays channels_last, as there."""
    x, _, mask, mine = _three_rank_batch(rank, 7)
    reference = _reference_batch_norm()
    sync = nt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    sequence = x[:, :, 0].transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L) with C innermost
    expected = torch.nn.functional.batch_norm(sequence, None, None, reference.weight, reference.bias, training=True)
    for y in (sync(sequence[mine]), sync(sequence[mine], mask=torch.ones_like(mask[mine, :, 0]))):
        assert y.stride() == expected[mine].stride()
        torch.testing.assert_close(y.view(len(y), -1), expected[mine].reshape(len(y), -1), **FLOAT64_TOLERANCE)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert sync(channels_last[mine]).is_contiguous(memory_format=torch.channels_last)


def _a_lazy_batch_norms_first_forward_is_synced(rank: int):
    """A lazy batch norm converted before its dry-run batch (DistributedDataParallel takes no
    uninitialized parameters): that first forward, too, gives batch norm's outputs, input
    gradients and running statistics on the concatenated batch (it took each rank's own),
    with mask= too."""
    x, grad_y, _, mine = _three_rank_batch(rank, 8)
    reference = torch.nn.BatchNorm2d(CHANNELS).double()
    lazy = nt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.LazyBatchNorm2d().double()))
    x_ref, x_local = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
    expected = reference(x_ref)
    (expected * grad_y).sum().backward()
    y = lazy(x_local)
    (y * grad_y[mine]).sum().backward()
    assert type(lazy[0]) is nt.SyncBatchNorm
    torch.testing.assert_close(y, expected[mine], **FLOAT64_TOLERANCE)
    torch.testing.assert_close(x_local.grad, x_ref.grad[mine], **FLOAT64_TOLERANCE)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(lazy[0].state_dict()[name], value, **FLOAT64_TOLERANCE, msg=lambda m: f"{name}: {m}")
    # a first forward with mask= (torch's lazy hook hands initialize_parameters the mask too,
    # which raised "unexpected keyword argument 'mask'")
    masked = nt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.LazyBatchNorm2d().double())
    y = masked(x[mine], mask=torch.ones(len(x[mine]), 1, 2, 3, dtype=torch.bool))
    assert type(masked) is nt.SyncBatchNorm
    torch.testing.assert_close(y, expected[mine].detach(), **FLOAT64_TOLERANCE)
    torch.testing.assert_close(masked.running_var, reference.running_var, **FLOAT64_TOLERANCE)
    # one without parameters or running statistics is lazy too (its hook raised "'SyncBatchNorm' object has
    # no attribute 'initialize_parameters'")
    bare = nt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.LazyBatchNorm2d(affine=False, track_running_stats=False))
    torch.testing.assert_close(bare(x[mine]), torch.nn.functional.batch_norm(x, None, None, training=True)[mine],
                               **FLOAT64_TOLERANCE)
    assert type(bare) is nt.SyncBatchNorm


def _an_empty_rank_and_a_rank_of_one_sample_are_synced(rank: int):
    """Batches of 0, 1 and 4 samples (torch's SyncBatchNorm lets an empty rank take part with
    a count of 0, and a rank of one sample is fine beside others), with a mask too, on a
    BatchNorm1d's (N, C) input and a channels_last one: batch norm's outputs, gradients and
    running statistics on the concatenated batch."""
    sizes = (0, 1, 4)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    generator = torch.Generator().manual_seed(9)
    for shape, layout in (((CHANNELS,), torch.contiguous_format), ((CHANNELS, 2, 3), torch.channels_last)):
        x = (torch.randn(sum(sizes), *shape, generator=generator, dtype=torch.float64) * 2 + 1).contiguous(
            memory_format=layout)
        grad_y = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        for mask in (None, torch.ones(x.shape, dtype=torch.bool)):
            reference = _reference_batch_norm() if len(shape) == 3 else torch.nn.BatchNorm1d(CHANNELS).double()
            sync = nt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
            x_ref, x_local = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
            expected = reference(x_ref)
            (expected * grad_y).sum().backward()
            y = sync(x_local) if mask is None else sync(x_local, mask=mask[mine])
            (y * grad_y[mine]).sum().backward()
            torch.testing.assert_close(y, expected[mine], **FLOAT64_TOLERANCE)
            torch.testing.assert_close(x_local.grad, x_ref.grad[mine], **FLOAT64_TOLERANCE)
            for name in ("weight", "bias"):
                grad = getattr(sync, name).grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad, getattr(reference, name).grad, **FLOAT64_TOLERANCE)
            for name, value in reference.state_dict().items():
                torch.testing.assert_close(sync.state_dict()[name], value, **FLOAT64_TOLERANCE,
                                           msg=lambda m: f"{name}: {m}")


def _three_rank_checks(rank: int, init_method: str, checks):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=3)
    try:
        for check in checks:
            check(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # (about 20 s on 2 cores: three processes, torch.compile among the checks)
def test_sync_batch_norm_over_three_gloo_ranks_follows_batch_norm_in_second_derivatives_subgroups_errors_precision_and_layout():
    checks = (_second_derivatives_are_the_concatenated_batchs,
              _a_rank_outside_the_process_group_normalizes_its_own_batch,
              _one_value_over_all_ranks_is_refused_on_every_rank,
              _a_wrong_channel_count_raises_torchs_error_and_leaves_the_running_statistics,
              _a_dtype_mix_torch_refuses_raises_its_error_on_every_rank,
              _float32_far_from_zero_stays_within_1e_4_of_float64,
              _momentum_none_under_torch_compile_keeps_batch_norms_running_statistics,
              _a_transposed_input_gives_torch_nns_layout,
              _a_lazy_batch_norms_first_forward_is_synced,
              _an_empty_rank_and_a_rank_of_one_sample_are_synced)
    gloo.spawn(_three_rank_checks, checks, nprocs=3)


_COUNTER_TOGGLES = {
    "counter set to None": lambda m: setattr(m, "num_batches_tracked", None),
    "counter None, momentum None": lambda m: (setattr(m, "num_batches_tracked", None), setattr(m, "momentum", None)),
    "statistics and counter None": lambda m: [setattr(m, name, None) for name in
                                              ("running_mean", "running_var", "num_batches_tracked")],
    "tracking off": lambda m: setattr(m, "track_running_stats", False),
}


def _tracking_turned_on(nn):
    module = nn.SyncBatchNorm(3, track_running_stats=False)
    module.track_running_stats = True  # (no counter was ever made)
    return module


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("toggle", [*_COUNTER_TOGGLES, "tracking turned on"])
def test_sync_batch_norm_with_its_counter_toggled_raises_or_computes_as_torch_nn_sync_batch_norm(toggle, training,
                                                                                                 masked):
    """torch.nn.SyncBatchNorm asserts that num_batches_tracked is not None in a training call
    that tracks running statistics (torch's BatchNorm leaves a None counter alone); the twin
    took BatchNorm's path there and computed. Each toggle, in training and evaluation, with
    mask= (all True) too: torch's exception type, or its output and running statistics."""
    torch.manual_seed(0)
    if toggle == "tracking turned on":
        reference, twin = _tracking_turned_on(torch.nn), _tracking_turned_on(nt)
    else:
        reference, twin = torch.nn.SyncBatchNorm(3), nt.SyncBatchNorm(3)
        for module in (reference, twin):
            _COUNTER_TOGGLES[toggle](module)
    reference.train(training), twin.train(training)
    x = torch.randn(4, 3, 5) * 2 + 1
    mask = {"mask": torch.ones(x.shape, dtype=torch.bool)} if masked else {}
    try:
        expected = reference(x)
    except Exception as error:  # noqa: BLE001 (the type is what is compared)
        with pytest.raises(type(error)):
            twin(x, **mask)
        return
    torch.testing.assert_close(twin(x, **mask), expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(twin, name), getattr(reference, name))



def _counted_rows(x, mask):
    """The counted positions of ``(N, C, H, W)`` as rows of ``(K, C)`` (the mask spans whole
    positions, broadcast over the channels): the batch with the masked elements removed."""
    counted = mask.expand(x.shape).permute(1, 0, 2, 3).reshape(x.shape[1], -1)
    return x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)[counted].reshape(x.shape[1], -1).T


_EMPTY_RANK_CASES = [(dtype_name, rank_one, create_graph) for dtype_name in ("float64", "float32")
                     for rank_one in ("empty", "nothing_counted") for create_graph in (False, True)]


def _masked_batch_and_torchs_sync_batch_norm(dtype, rank_one: str):
    """Rank 0's masked batch, and rank 1's: empty ((0, C, H, W), its mask (0, 1, H, W)) or one
    whose mask counts nothing; then torch.nn.SyncBatchNorm (a process without a group: the
    batch's statistics) fed the counted positions of the whole batch as rows, the masked
    elements removed, after a forward and backward there."""
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, CHANNELS, 3, 3, generator=generator, dtype=dtype) * 2 + 5
    mask0 = torch.rand(4, 1, 3, 3, generator=generator) < 0.6
    grad0 = torch.where(mask0, torch.randn(x0.shape, generator=generator, dtype=dtype), 0)  # (counted outputs alone)
    x1 = torch.randn(0 if rank_one == "empty" else 2, CHANNELS, 3, 3, generator=generator, dtype=dtype)
    batches = [(x0, mask0, grad0), (x1, torch.zeros(len(x1), 1, 3, 3, dtype=torch.bool), torch.zeros_like(x1))]
    torch.manual_seed(0)
    reference = torch.nn.SyncBatchNorm(CHANNELS, momentum=0.3).to(dtype)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    rows = _counted_rows(x0, mask0).clone().requires_grad_()
    expected = reference(rows)
    (expected * _counted_rows(grad0, mask0)).sum().backward()
    # (its state and gradients as plain tensors: a Parameter's .grad does not travel to a process)
    return batches, reference.state_dict(), (reference.weight.grad, reference.bias.grad), expected.detach(), rows.grad


def _compare_masked_with_an_empty_rank(rank: int, init_method: str, references: list):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        for (dtype_name, rank_one, create_graph), (batches, state, grads, expected, expected_grad) in zip(
                _EMPTY_RANK_CASES, references):
            case = f"{dtype_name}, rank 1 {rank_one}, create_graph={create_graph}"
            dtype = getattr(torch, dtype_name)
            tolerance = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
            x, mask, grad_y = batches[rank]
            sync = nt.SyncBatchNorm(CHANNELS, momentum=0.3).to(dtype)
            sync.load_state_dict({**state, "running_mean": torch.zeros(CHANNELS, dtype=dtype),
                                  "running_var": torch.ones(CHANNELS, dtype=dtype),
                                  "num_batches_tracked": torch.tensor(0)})
            x_local = x.clone().requires_grad_()
            y = sync(x_local, mask=mask)
            assert y.shape == x.shape and y.dtype == dtype, case
            grad_x, grad_w, grad_b = torch.autograd.grad((y * grad_y).sum(), (x_local, sync.weight, sync.bias),
                                                         create_graph=create_graph)
            assert grad_x.shape == x.shape, case
            if rank == 0:
                torch.testing.assert_close(_counted_rows(y.detach(), mask), expected, **tolerance,
                                           msg=lambda m: f"{case}, output: {m}")
                torch.testing.assert_close(_counted_rows(grad_x.detach(), mask), expected_grad, **tolerance,
                                           msg=lambda m: f"{case}, input grad: {m}")
            for name, grad, want in zip(("weight", "bias"), (grad_w.detach().clone(), grad_b.detach().clone()), grads):
                dist.all_reduce(grad)  # (DistributedDataParallel sums the ranks', then averages)
                torch.testing.assert_close(grad, want, **tolerance, msg=lambda m: f"{case}, {name} grad: {m}")
            for name, value in state.items():
                torch.testing.assert_close(sync.state_dict()[name], value, **tolerance,
                                           msg=lambda m: f"{case}, {name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # (about 10 s on 2 cores: two processes)
def test_masked_sync_batch_norm_with_an_empty_rank_equals_torchs_on_the_counted_elements():
    """torch.nn.SyncBatchNorm runs on CPU without a process group alone: its numbers are taken
    here, before the processes meet, on the whole batch's counted positions."""
    references = [_masked_batch_and_torchs_sync_batch_norm(getattr(torch, dtype_name), rank_one)
                  for dtype_name, rank_one, _ in _EMPTY_RANK_CASES]
    gloo.spawn(_compare_masked_with_an_empty_rank, references, nprocs=WORLD_SIZE)
