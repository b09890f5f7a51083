"""Which torch features work on a model after ``normlab.torch.convert``, with torch.nn's
numbers as the oracle: prints one row per feature (ok, or the first line of the error).

    python benchmarks/torch_features.py

A small model with BatchNorm2d, GroupNorm, InstanceNorm2d, LayerNorm and RMSNorm is run
through each feature twice, as built and converted; a feature works when the converted
model gives the original's outputs (and gradients) to float tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import copy
import inspect
import io
import os
import tempfile
import warnings

import torch
from torch import nn

import normlab.torch as nt


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True), nn.Tanh(),
        nn.Flatten(), nn.LayerNorm(8 * 3 * 3), nn.RMSNorm(8 * 3 * 3), nn.Linear(72, 1),
    ).double()


def pair():
    reference = model()
    return reference, nt.convert(copy.deepcopy(reference))


def x_of(batch=4):
    return torch.randn(batch, 3, 5, 5, dtype=torch.float64)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def double_backward():
    grads, x = [], x_of().requires_grad_()
    for m in pair():
        (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        close(a, b)


def gradgradcheck():
    m = nt.LayerNorm(4).double()
    assert torch.autograd.gradgradcheck(lambda t: m(t), (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),))


def func_transforms():
    x = x_of()
    results = []
    for m in pair():  # evaluation mode: torch.nn's batch norm cannot update its buffers under a transform
        m.eval()
        params = dict(m.named_parameters())
        g = torch.func.grad(lambda p, x: torch.func.functional_call(m, p, (x,)).sum())(params, x)
        per_sample = torch.func.vmap(lambda xi: m(xi.unsqueeze(0)))(x)
        jac = torch.func.jacrev(lambda t: m(t))(x[:2])
        results.append((g, per_sample, jac))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def forward_ad():
    x, t = x_of(), x_of()
    results = []
    for m in pair():
        m.eval()
        _, jvp = torch.func.jvp(m, (x,), (t,))
        jf = torch.func.jacfwd(m)(x[:2])
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
        results.append((jvp, jf, dual))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def fx_trace():
    x = x_of()
    reference, converted = pair()
    close(torch.fx.symbolic_trace(converted)(x), reference(x))


def fx_fuse():
    from torch.fx.experimental.optimization import fuse

    x = x_of()
    reference, converted = pair()
    close(fuse(converted.eval())(x), reference.eval()(x))


def jit_trace_save():
    x = x_of()
    reference, converted = pair()
    traced = torch.jit.trace(converted.eval(), x)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    close(torch.jit.load(buffer)(x), reference.eval()(x))


def jit_script():
    x = x_of()
    reference, converted = pair()
    close(torch.jit.script(converted)(x), reference(x))


def compile_dynamic():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    reference, converted = pair()
    counter = CompileCounter()
    compiled = torch.compile(converted, backend=counter, dynamic=True)
    for batch in (2, 3, 5):
        x = x_of(batch)
        close(compiled(x), reference(x))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 3 batch sizes"


def export_dynamic():
    reference, converted = pair()
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(converted.eval(), (x_of(),), dynamic_shapes={"input": {0: batch}})
    x = x_of(7)
    close(exported.module()(x), reference.eval()(x))


def onnx(dynamo: bool):
    import numpy as np
    import onnxruntime

    reference, converted = pair()
    reference, converted = reference.float().eval(), converted.float().eval()
    x = x_of().float()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(converted, (x,), path, dynamo=dynamo, input_names=["x"], opset_version=18 if not dynamo else None)
        session = onnxruntime.InferenceSession(path)
        (y,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(y, reference(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def fuse_modules():
    x = x_of()
    reference, converted = pair()
    fused = torch.ao.quantization.fuse_modules(converted.eval(), [["0", "1"]])
    assert isinstance(fused[1], nn.Identity), type(fused[1])
    close(fused(x), reference.eval()(x))


def fuse_conv_bn_eval():
    x = x_of()
    reference, converted = pair()
    converted.eval()
    fused = nn.utils.fusion.fuse_conv_bn_eval(converted[0], converted[1])
    close(fused(x), reference.eval()[1](reference[0](x)))


def error_types():
    for twin, original, bad in [(nt.LayerNorm(16), nn.LayerNorm(16), torch.randn(3, 8)),
                                (nt.GroupNorm(2, 4), nn.GroupNorm(2, 4), torch.randn(2, 6, 3)),
                                (nt.BatchNorm2d(3), nn.BatchNorm2d(3), torch.randn(2, 4, 5, 5))]:
        try:
            original(bad)
        except Exception as error:  # noqa: BLE001
            expected = type(error)
        try:
            twin(bad)
        except Exception as error:  # noqa: BLE001
            assert isinstance(error, expected), f"{type(error).__name__} where torch raises {expected.__name__}"
            assert "[n0]" not in str(error) and "pattern" not in str(error), str(error).splitlines()[0]


def signatures():
    for twin in (nt.LayerNorm, nt.BatchNorm2d, nt.GroupNorm, nt.RMSNorm, nt.InstanceNorm2d):
        signature = str(inspect.signature(twin))
        assert "*args" not in signature, f"{twin.__name__}{signature}"


FEATURES = {
    "double backward (gradient penalty, parameter grads)": double_backward,
    "gradgradcheck": gradgradcheck,
    "torch.func grad/vmap/jacrev/functional_call": func_transforms,
    "forward AD: jvp, jacfwd, dual tensors": forward_ad,
    "fx.symbolic_trace": fx_trace,
    "fx fusion (optimization.fuse)": fx_fuse,
    "jit.trace + jit.save": jit_trace_save,
    "jit.script": jit_script,
    "torch.compile(dynamic=True), one graph": compile_dynamic,
    "torch.export, dynamic batch": export_dynamic,
    "onnx.export dynamo=False + onnxruntime": lambda: onnx(False),
    "onnx.export dynamo=True + onnxruntime": lambda: onnx(True),
    "ao.quantization.fuse_modules": fuse_modules,
    "nn.utils.fusion.fuse_conv_bn_eval": fuse_conv_bn_eval,
    "torch's exception types, user's terms": error_types,
    "constructor signatures": signatures,
}


def main() -> None:
    width = max(map(len, FEATURES))
    for name, run in FEATURES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
            verdict = "ok"
        except Exception as error:  # noqa: BLE001
            first = (str(error).strip().splitlines() or [""])[0]
            verdict = f"FAILS  {type(error).__name__}: {first[:110]}"
        print(f"{name:<{width}}  {verdict}", flush=True)


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
