"""Real models, converted with ``normlab.torch.convert``, against the same models on torch.nn.

For every model this script builds one torch.nn copy and one converted copy with the
same weights (random: no downloads) and times, interleaved in one process (the two
copies take turns in rounds; the median over all calls):

* eval at batch 1 and at a typical batch (``torch.inference_mode``),
* a training step (forward, backward, SGD step),
* the same eval and training step under ``torch.compile`` (``--no-compile`` leaves it out),

and prints torch.nn time over normlab time (above 1: the converted model is faster),
plus the norm layers' share of torch.nn's training step from ``torch.profiler``.

Models: a GroupNorm U-Net and a ResNet-style CNN written here, transformers' BERT and
a small LLaMA built from config when transformers imports, and torchvision's resnet18, resnet50,
mobilenet_v3_small, convnext_tiny and vit_b_16 built with ``weights=None`` when
torchvision imports (its wheel must be built for the installed torch; otherwise the
script says so and goes on).

    python benchmarks/models.py [--models unet,bert] [--no-compile] [--rounds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse
import copy
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import normlab.torch as nt
from normlab.bench import positive_int

TRANSFORMERS_MODELS = ("BERT (6×384, LayerNorm)", "LLaMA (4×256, RMSNorm)")
TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v3_small", "convnext_tiny", "vit_b_16")


@dataclass(frozen=True)
class ModelCase:
    """A model, how to make its input at a batch size, and its typical batch."""

    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[int], object]
    batch: int

    def loss(self, output) -> torch.Tensor:
        if hasattr(output, "last_hidden_state"):
            output = output.last_hidden_state
        return output.float().square().mean()


# ---- models written here ------------------------------------------------------------------


class _UNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.body(x) + self.skip(x)


class UNet(nn.Module):
    """A small diffusion-style U-Net: GroupNorm(8) blocks, three resolutions."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down1, self.down2 = _UNetBlock(width, width), _UNetBlock(width, 2 * width)
        self.middle = _UNetBlock(2 * width, 4 * width)
        self.up2, self.up1 = _UNetBlock(6 * width, 2 * width), _UNetBlock(3 * width, width)
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x):
        a = self.down1(self.stem(x))
        b = self.down2(nn.functional.avg_pool2d(a, 2))
        m = self.middle(nn.functional.avg_pool2d(b, 2))
        b = self.up2(torch.cat([nn.functional.interpolate(m, scale_factor=2.0), b], 1))
        return self.head(self.up1(torch.cat([nn.functional.interpolate(b, scale_factor=2.0), a], 1)))


def resnet_like(width: int = 32) -> nn.Module:
    """A ResNet-style CNN: conv + BatchNorm2d + ReLU stages, strided downsampling."""
    layers = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage in range(3):
        out = width * 2 ** stage
        layers += [nn.Conv2d(channels, out, 3, stride=1 if stage == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(out), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


def _bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                        vocab_size=8192, attn_implementation="eager")
    return BertModel(config, add_pooling_layer=False)


def _llama():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=688, vocab_size=4096, attn_implementation="eager")
    return LlamaModel(config)


def _tokens(vocab: int, length: int):
    return lambda batch: torch.randint(0, vocab, (batch, length))


def _images(size: int):
    return lambda batch: torch.randn(batch, 3, size, size)


def cases(models: str | None = None) -> list[ModelCase]:
    """Every model, or those that ``models`` picks and more (:func:`select` picks them out):
    transformers and torchvision are loaded, or said to be skipped and why, only where
    ``models`` asks for one of their models."""
    found = [
        ModelCase("U-Net (GroupNorm)", UNet, _images(64), 8),
        ModelCase("ResNet-style CNN (BatchNorm)", resnet_like, _images(64), 32),
    ]
    if _picks_any(models, TRANSFORMERS_MODELS) and _transformers():
        bert, llama = TRANSFORMERS_MODELS
        found += [ModelCase(bert, _bert, _tokens(8192, 128), 8), ModelCase(llama, _llama, _tokens(4096, 128), 8)]
    vision = _torchvision() if _picks_any(models, TORCHVISION_MODELS) else None
    if vision is not None:
        for name in TORCHVISION_MODELS:
            size = 224
            found.append(ModelCase(name, lambda name=name: getattr(vision, name)(weights=None), _images(size), 8))
    return found


def _transformers() -> bool:
    """Whether transformers imports (it is not among normlab's [bench] extras); if not, a
    line saying so, rather than a traceback after the first models' timings."""
    try:
        import transformers  # noqa: F401
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"skipped BERT, LLaMA: transformers does not import here ({reason}). "
              "Install it (pip install transformers) to include them.")
        return False
    return True


def _torchvision():
    """torchvision.models, or None with a line saying why and how to get it."""
    try:
        from torchvision import models
    except Exception as error:  # ImportError, or a build for another torch failing to register its ops
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"skipped {', '.join(TORCHVISION_MODELS)}: torchvision does not load beside torch "
              f"{torch.__version__} ({reason}). Install the torchvision release built for this torch "
              "(its CPU wheel, with --no-deps so that pip keeps this torch) to include them.")
        return None
    return models


# ---- timing -------------------------------------------------------------------------------


def _eval_call(model, x):
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def _train_call(model, x, case: ModelCase):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        case.loss(model(x)).backward()
        optimizer.step()

    return run


def _interleaved(calls: dict, rounds: int, per_round: int) -> dict:
    """Median seconds per call; the calls take turns in ``rounds`` rounds."""
    timed = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()  # warm-up
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                timed[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timed.items()}


def norm_share(model, x, case: ModelCase) -> float | None:
    """The norm operators' share of a training step's CPU time, from torch.profiler; None
    where no operator is named ``*norm*`` (a norm written as ``pow``, ``mean`` and ``rsqrt``,
    as transformers' LLaMA RMS norm is, which the profiler cannot tell from other operators)."""
    from torch.profiler import ProfilerActivity, profile

    step = _train_call(model, x, case)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    norms = sum(e.self_cpu_time_total for e in events if "norm" in e.key.lower())
    return norms / total if norms else None


@dataclass(frozen=True)
class Result:
    name: str
    converted: int
    ratios: dict  # column -> torch.nn time / normlab time, or an error text
    share: float | None  # None: not measurable (see norm_share)


def _pair(case: ModelCase):
    torch.manual_seed(0)
    reference = case.build()
    twin = copy.deepcopy(reference)
    before = sum(1 for m in twin.modules() if type(m).__module__.startswith("normlab"))
    nt.convert(twin)
    converted = sum(1 for m in twin.modules() if type(m).__module__.startswith("normlab")) - before
    return reference, twin, converted


def measure(case: ModelCase, rounds: int, compile: bool) -> Result:
    reference, twin, converted = _pair(case)
    ratios = {}
    # one set of columns for every model (the README's); the typical batch goes with the model's name
    for column, compiled_column, batch, train in (
            ("eval batch 1", "compiled eval batch 1", 1, False),
            ("eval typical batch", "compiled eval typical", case.batch, False),
            ("train step", "compiled train", case.batch, True)):
        x = case.make_input(batch)
        for model in (reference, twin):
            model.train(train)
        make = (lambda m: _train_call(m, x, case)) if train else (lambda m: _eval_call(m, x))
        seconds = _interleaved({"torch": make(reference), "normlab": make(twin)}, rounds, 2 if train else 3)
        ratios[column] = seconds["torch"] / seconds["normlab"]
        if compile:
            try:
                calls = {"torch": make(torch.compile(reference)), "normlab": make(torch.compile(twin))}
                seconds = _interleaved(calls, rounds, 2 if train else 3)
                ratios[compiled_column] = seconds["torch"] / seconds["normlab"]
            except Exception as error:  # report and go on: one model's failure is a result too
                ratios[compiled_column] = f"failed ({type(error).__name__})"
    reference.train()
    share = norm_share(reference, case.make_input(case.batch), case)
    return Result(f"{case.name}, batch {case.batch}", converted, ratios, share)


def markdown(results: list[Result]) -> str:
    columns = list(dict.fromkeys(c for r in results for c in r.ratios))
    columns.sort(key=lambda column: column.startswith("compiled"))  # eager columns first, as in the README
    lines = ["| model | norm layers | " + " | ".join(columns) + " | norm share of torch.nn step |",
             "|" + "---|" * (len(columns) + 3)]
    for r in results:
        cells = [v if isinstance(v, str) else f"{v:.2f}" for v in (r.ratios.get(c, "–") for c in columns)]
        share = "–" if r.share is None else f"{r.share:.0%}"
        lines.append(f"| {r.name} | {r.converted} | " + " | ".join(cells) + f" | {share} |")
    return "\n".join(lines)


def _letters(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def select(found: list[ModelCase], models: str | None) -> list[ModelCase]:
    """The cases whose name contains one of the comma-separated fragments of ``models``,
    ignoring case and punctuation ("unet" picks "U-Net (GroupNorm)"); all for None."""
    if models is None:
        return found
    return [c for c in found if _picks_any(models, (c.name,))]


def _picks_any(models: str | None, names) -> bool:
    """Whether ``--models`` (None: all) picks any of ``names``."""
    if models is None:
        return True
    fragments = [_letters(f) for f in models.split(",") if _letters(f)]
    return any(f in _letters(name) for f in fragments for name in names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated name fragments (default: all)")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile columns")
    args = parser.parse_args(argv)
    found = cases(args.models)
    selected = select(found, args.models)
    if not selected:
        names = dict.fromkeys([c.name for c in found] + [*TRANSFORMERS_MODELS, *TORCHVISION_MODELS])
        parser.error(f"--models {args.models!r} names no model; models: {', '.join(names)}")
    results = []
    for case in selected:
        result = measure(case, args.rounds, not args.no_compile)
        results.append(result)
        print(f"{case.name}: " + ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.2f}'}"
                                           for k, v in result.ratios.items()), flush=True)
    print()
    print("torch.nn time over normlab time (above 1: the converted model is faster); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
