"""The fused-block group of ``normlab bench`` (``--case fused``): normlab's fused torch
modules against the eager torch code that models run, and against ``torch.compile`` of it.

Cases: residual add + RMS norm (LLaMA), AdaLN-Zero's modulated layer norm (DiT-XL),
gated RMS norm with 8 groups (Mamba2), and a small LLaMA-style decoder with
``convert(model, fuse=True)`` against the unconverted Hugging Face model, in float32 and
in bfloat16 (rows marked ``bf16``: inputs, parameters and models in bfloat16). Engines take
turns in rounds as in :func:`normlab.bench.measure`; the table gives medians and ratios.
For the decoder, "norm share" is the time the unconverted model spends inside its RMS
norms' forward calls (timed by hooks), as a share of its whole time: about what fusing
them can save (the backward of the norms and the residual adds are not counted).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from normlab.bench import timed_rounds

__all__ = ["FUSED_CASES", "FusedCase", "select", "measure", "markdown"]


@dataclass(frozen=True)
class FusedCase:
    """One row: a fused block, its mode (``"fwd"``, ``"fwd+bwd"``, ``"train step"``) and shapes."""

    name: str
    block: str  # add_rms, adaln, gated, decoder
    mode: str
    shape: tuple[int, ...]
    quick_shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def needs(self) -> tuple[str, ...]:
        """The modules the case imports: transformers' LlamaRMSNorm and LlamaModel for two blocks."""
        return ("torch", "transformers") if self.block in ("add_rms", "decoder") else ("torch",)

    @property
    def label(self) -> str:
        return f"fused {self.name} {self.mode}" + (" bf16" if self.dtype == "bfloat16" else "")


_FLOAT32_CASES = (
    FusedCase("add + RMS norm", "add_rms", "fwd+bwd", (8, 512, 4096), (2, 64, 512)),
    FusedCase("AdaLN-Zero layer norm", "adaln", "fwd", (8, 1024, 1152), (2, 64, 288)),
    FusedCase("AdaLN-Zero layer norm", "adaln", "fwd+bwd", (8, 1024, 1152), (2, 64, 288)),
    FusedCase("gated RMS norm g=8", "gated", "fwd+bwd", (8, 512, 4096), (2, 64, 512)),
    FusedCase("LLaMA decoder 4×1024", "decoder", "fwd", (2, 256, 1024), (1, 16, 128)),
    FusedCase("LLaMA decoder 4×1024", "decoder", "train step", (2, 256, 1024), (1, 16, 128)),
)
FUSED_CASES: tuple[FusedCase, ...] = _FLOAT32_CASES + tuple(
    FusedCase(c.name, c.block, c.mode, c.shape, c.quick_shape, "bfloat16") for c in _FLOAT32_CASES)


def select(filters) -> tuple[FusedCase, ...]:
    """The fused cases a ``--case`` filter asks for: only filters that say ``fused``."""
    wanted = [f.lower() for f in (filters or ()) if "fused" in f.lower()]
    return tuple(c for c in FUSED_CASES if any(f in c.label.lower() for f in wanted))


# --- engines: each builder returns {engine: zero-argument callable} ---------------------------

def _fwd_bwd(forward, inputs, grads_out, mode):
    import torch

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward(*inputs)

        return run

    def run():
        outputs = forward(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.autograd.grad(outputs, inputs, grads_out[:len(outputs)])

    return run


def _block_engines(case: FusedCase, shape):
    import torch
    import torch.nn.functional as F

    from normlab.torch import AdaLayerNorm, FusedAddRMSNorm, GatedRMSNorm

    gen = torch.Generator().manual_seed(0)
    b, t, d = shape
    dtype = getattr(torch, case.dtype)

    def leaf(*s):
        return torch.randn(s, generator=gen).to(dtype).requires_grad_()

    x, r = leaf(b, t, d), leaf(b, t, d)
    grads = (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
    if case.block == "add_rms":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        hf = LlamaRMSNorm(d, eps=1e-6).to(dtype)
        ours = FusedAddRMSNorm(d, eps=1e-6, dtype=dtype)
        weight = hf.weight

        def eager(x, r, weight):
            total = x + r
            return hf(total), total

        def fused(x, r, weight):
            return ours(x, r)

        ours.weight = weight
        inputs = (x, r, weight)
    elif case.block == "adaln":
        scale, shift = leaf(b, d), leaf(b, d)
        module = AdaLayerNorm(d).to(dtype)

        def eager(x, scale, shift):
            return F.layer_norm(x, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

        def fused(x, scale, shift):
            from normlab.torch.fused import fused_normalize

            return fused_normalize(x, module._block, scale=scale, shift=shift)

        inputs = (x, scale, shift)
    else:  # gated, mamba_ssm's rms_norm_ref (groups of d/8, gate after the norm)
        ours = GatedRMSNorm(d, eps=1e-5, group_size=d // 8, dtype=dtype)
        weight = ours.weight

        def eager(x, z, weight):
            x32, z32 = x.float(), z.float()
            group = x32.reshape(b, t, 8, d // 8)
            rstd = 1 / torch.sqrt(group.square().mean(dim=-1, keepdim=True) + 1e-5)
            out = (group * rstd).reshape(b, t, d) * weight.float()
            return (out * F.silu(z32)).to(x.dtype)

        def fused(x, z, weight):
            return ours(x, z)

        inputs = (x, r, weight)
    engines = {"normlab": _fwd_bwd(fused, inputs, grads, case.mode), "eager": _fwd_bwd(eager, inputs, grads, case.mode)}
    compiled = torch.compile(eager)
    engines["compile"] = _fwd_bwd(compiled, inputs, grads, case.mode)
    return engines, None


def _decoder(shape):
    import torch
    from transformers import LlamaConfig, LlamaModel

    batch, tokens, hidden = shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), num_hidden_layers=4, vocab_size=1000,
                         max_position_embeddings=max(2048, tokens))
    torch.manual_seed(0)
    return LlamaModel(config)


def _decoder_engines(case: FusedCase, shape):
    import copy

    import torch

    from normlab.torch import convert

    hf = _decoder(shape).to(getattr(torch, case.dtype))
    ours = convert(copy.deepcopy(hf), fuse=True)
    batch, tokens, hidden = shape
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(1))

    def step(model):
        if case.mode == "fwd":
            def run():
                with torch.no_grad():
                    return model(ids).last_hidden_state

            return run
        parameters = [p for p in model.parameters() if p.requires_grad]

        def run():
            out = model(ids).last_hidden_state
            return torch.autograd.grad(out.square().mean(), parameters)

        return run

    # the norm share: time inside the unconverted model's RMS norms' forward, over its whole time
    import time

    clock = {"norm": 0.0, "total": 0.0, "started": 0.0}

    def before(module, args):
        clock["started"] = time.perf_counter()

    def after(module, args, output):
        clock["norm"] += time.perf_counter() - clock["started"]

    for module in hf.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)
    eager = step(hf)

    def timed_eager():
        started = time.perf_counter()
        result = eager()
        clock["total"] += time.perf_counter() - started
        return result

    return {"normlab": step(ours), "eager": timed_eager, "compile": None}, clock


def _engines(case: FusedCase, shape):
    return _decoder_engines(case, shape) if case.block == "decoder" else _block_engines(case, shape)


@dataclass(frozen=True)
class FusedRow:
    case: FusedCase
    shape: tuple[int, ...]
    seconds: dict
    norm_share: float | None


ENGINES = ("normlab", "eager", "compile")


def measure(cases, quick: bool, repeats: int, progress=None) -> list[FusedRow]:
    """Time the engines of every case in rounds (see :func:`normlab.bench.measure`)."""
    if not cases:
        return []  # without importing torch: the regular table needs none
    import torch

    rows = []
    for case in cases:
        shape = case.quick_shape if quick else case.shape
        calls, clock = _engines(case, shape)
        timed = timed_rounds(calls, repeats, progress and (lambda engine: engine in ENGINES and progress(
            f"{case.label}: {engine}")))
        seconds = {engine: statistics.median(v) if v else None for engine, v in timed.items()}
        share = None if clock is None else clock["norm"] / clock["total"]
        rows.append(FusedRow(case, shape, seconds, share))
        torch._dynamo.reset()
    return rows


HEADERS = ["case", "shape", "normlab ms", "eager ms", "compile ms", "vs eager", "vs compile", "norm share"]


def table_rows(rows: list[FusedRow]) -> list[list[str]]:
    from normlab.bench import _ms, _ratio

    return [[row.case.label, "×".join(map(str, row.shape)), _ms(row.seconds["normlab"]), _ms(row.seconds["eager"]),
             _ms(row.seconds["compile"]), _ratio(row.seconds["eager"], row.seconds["normlab"]),
             _ratio(row.seconds["compile"], row.seconds["normlab"]),
             "–" if row.norm_share is None else f"{row.norm_share:.0%}"] for row in rows]


def markdown(rows: list[FusedRow]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)])
