"""``normlab bench --case masked``: norms whose groups are decided by data, against what
users run today: a masked batch norm written in torch operations (masked sums for the
mean and variance, then normalize; autograd), PyG's ``InstanceNorm``, and a GIN training
step with PyG's ``GraphNorm``. Each row is forward+backward, the median of interleaved
rounds (the two engines take turns), float32, in one process.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

from normlab.bench import timed_rounds

GROUP = "masked"


@dataclass(frozen=True)
class MaskedCase:
    """One row: a name, the shape (full and ``--quick``), and a builder of the two calls."""

    name: str
    shape: tuple[int, ...]
    quick_shape: tuple[int, ...]
    build: Callable  # (shape) -> (normlab call, competitor call, competitor name)
    needs: tuple[str, ...] = ("torch", "torch_geometric")  # the modules build imports


def _masked_batch_norm(shape):
    import torch

    from normlab.torch.masked import normalize_masked

    batch, channels, length = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    lengths = torch.randint(int(0.4 * length), length + 1, (batch,), generator=g)  # about 30% padding
    mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, :]
    weight, bias = torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)
    grad = torch.randn(shape, generator=g)

    def ours():
        xg = x.detach().requires_grad_(True)
        y = normalize_masked(xg, "[b] c [t]", weight=weight, bias=bias, params="c", mask=mask).y
        y.backward(grad)

    def composite():
        xg = x.detach().requires_grad_(True)
        m = mask.to(x.dtype)
        count = m.sum(dim=(0, 2), keepdim=True)
        mean = (xg * m).sum(dim=(0, 2), keepdim=True) / count
        var = (((xg - mean) * m) ** 2).sum(dim=(0, 2), keepdim=True) / count
        y = (xg - mean) * torch.rsqrt(var + 1e-5) * weight[None, :, None] + bias[None, :, None]
        y.backward(grad)

    return ours, composite, "torch composite"


def _graph_batch(nodes, graphs, channels, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, graphs, (nodes,), generator=g).sort().values
    x = torch.randn(nodes, channels, generator=g)
    return x, batch, g


def _instance_norm(shape):
    import torch
    from torch_geometric.nn.norm import InstanceNorm as PygInstanceNorm

    from normlab.torch.geometric import InstanceNorm

    nodes, channels, graphs = shape
    x, batch, g = _graph_batch(nodes, graphs, channels)
    grad = torch.randn(nodes, channels, generator=g)
    ours_module, theirs_module = InstanceNorm(channels, affine=True), PygInstanceNorm(channels, affine=True)

    def run(module):
        def call():
            xg = x.detach().requires_grad_(True)
            module(xg, batch, graphs).backward(grad)
        return call

    return run(ours_module), run(theirs_module), "PyG InstanceNorm"


def _gin_step(shape):
    import torch
    from torch_geometric.nn import GINConv
    from torch_geometric.nn.norm import GraphNorm as PygGraphNorm

    from normlab.torch.geometric import GraphNorm

    nodes, channels, graphs = shape
    x, batch, g = _graph_batch(nodes, graphs, channels, seed=1)
    # edges inside each graph: every node to 4 random nodes of its own graph
    ptr = torch.searchsorted(batch, torch.arange(graphs + 1))
    start, size = ptr[batch], (ptr[batch + 1] - ptr[batch]).clamp_min(1)
    source = torch.arange(nodes).repeat_interleave(4)
    target = start.repeat_interleave(4) + (torch.rand(nodes * 4, generator=g) * size.repeat_interleave(4)).long()
    edge_index = torch.stack([source, target])

    class GIN(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.convs = torch.nn.ModuleList(GINConv(torch.nn.Sequential(
                torch.nn.Linear(channels, channels), torch.nn.ReLU(), torch.nn.Linear(channels, channels)))
                for _ in range(4))
            self.norms = torch.nn.ModuleList(norm(channels) for _ in range(4))

        def forward(self, x):
            for conv, norm in zip(self.convs, self.norms):
                x = torch.relu(norm(conv(x, edge_index), batch, graphs))
            return x

    torch.manual_seed(0)
    ours_model = GIN(GraphNorm)
    theirs_model = GIN(PygGraphNorm)
    theirs_model.load_state_dict(ours_model.state_dict())

    def run(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def call():
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        return call

    return run(ours_model), run(theirs_model), "PyG GraphNorm"


CASES: tuple[MaskedCase, ...] = (
    MaskedCase("masked batch norm, 30% padding, fwd+bwd", (64, 256, 1000), (16, 64, 500), _masked_batch_norm,
               ("torch",)),
    MaskedCase("per-graph instance norm, fwd+bwd", (200_000, 64, 2000), (20_000, 64, 200), _instance_norm),
    MaskedCase("4-layer GIN + GraphNorm, train step", (200_000, 64, 2000), (20_000, 64, 200), _gin_step),
)


def selected(filters) -> tuple[MaskedCase, ...]:
    """The cases that ``--case`` filters pick: all of them for ``masked``, and those whose
    name holds a filter that picks nothing in the regular table (``GraphNorm``, not
    ``batch norm`` or ``instance norm``, which ask for the regular table's cases)."""
    from normlab.bench import select

    if not filters:
        return ()
    if any(f.lower() == GROUP for f in filters):
        return CASES
    own = [f.lower() for f in filters if not select([f])]
    return tuple(c for c in CASES if any(f in c.name.lower() for f in own))


@dataclass(frozen=True)
class MaskedRow:
    case: MaskedCase
    shape: tuple[int, ...]
    normlab: float
    other: float
    other_name: str


def measure(cases, quick: bool, repeats: int) -> list[MaskedRow]:
    """Median seconds of each engine over ``repeats`` timed calls, taken in the rounds of
    :func:`normlab.bench.timed_rounds`: the engines take turns, each turn after a warm-up
    call (the first after two: one compiles, one builds the cached paths) and followed by
    an untimed pause, as in the regular table."""
    rows = []
    for case in cases:
        shape = case.quick_shape if quick else case.shape
        ours, theirs, name = case.build(shape)
        times = timed_rounds({"ours": ours, "theirs": theirs}, max(repeats, 1))
        rows.append(MaskedRow(case, shape, statistics.median(times["ours"]), statistics.median(times["theirs"]),
                              name))
    return rows


HEADERS = ["case", "shape", "normlab ms", "competitor", "competitor ms", "speedup"]


def table_rows(rows) -> list[list[str]]:
    return [[row.case.name, "×".join(map(str, row.shape)), f"{row.normlab * 1e3:.1f}", row.other_name,
             f"{row.other * 1e3:.1f}", f"{row.other / row.normlab:.2f}×"] for row in rows]


def markdown(rows) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m normlab.bench_masked [--quick]``: the table, in Markdown."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    print(markdown(measure(CASES, "--quick" in argv, 5)))
    return 0


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)  # a reader that stops early (| head -1) ends it quietly, as it ends the benchmark scripts
