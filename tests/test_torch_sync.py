"""SyncBatchNorm over gloo: two processes on 127.0.0.1 with unequal batch sizes give
BatchNorm's outputs, gradients and running statistics on the concatenated batch."""

import socket

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import normlab.torch as nt  # noqa: E402
from normlab.torch import sync  # noqa: E402

WORLD_SIZE = 2
BATCH_PER_RANK = (3, 5)  # unequal on purpose: a mean of means would be wrong
CHANNELS = 4
STEPS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(step: int, dtype):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(sum(BATCH_PER_RANK), CHANNELS, 3, 3, generator=generator, dtype=dtype) * 2 + 5
    grad_y = torch.randn(x.shape, generator=generator, dtype=dtype)
    return x, grad_y


def _compare_with_single_process(rank: int, port: int, dtype_name: str, momentum):
    dtype = getattr(torch, dtype_name)
    tolerance = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
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
    mp.spawn(_compare_with_single_process, args=(_free_port(), dtype_name, momentum), nprocs=WORLD_SIZE,
             join=True)


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
