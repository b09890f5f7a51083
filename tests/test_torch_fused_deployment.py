"""The fused blocks (those of tests/test_torch_fused_transforms.py) on the way to deployment:
``torch.export`` strict and non-strict with a dynamic batch and length, saved, loaded and
run at other sizes; the dynamo ONNX exporter run in ONNX Runtime; ``torch.compile`` with
``fullgraph=True`` compiling no more graphs than their definitions do as the batch and then
the length change. Oracles: the blocks' definitions in torch operations and diffusers'
``AdaLayerNormZero``, run eagerly or compiled by torch, and ONNX Runtime."""

import copy

import pytest

torch = pytest.importorskip("torch")

from tests.test_torch_fused_transforms import CASES  # noqa: E402

F32 = torch.float32


def _pair(name):
    """The block and its definition in float32, in evaluation mode."""
    block, definition = (copy.deepcopy(m).to(F32).eval() for m in CASES[name])
    return block, definition


def _inputs(name, batch, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 6, generator=gen)
    return x, torch.randn((batch, 6) if name == "AdaLayerNorm" else (batch, length, 6), generator=gen)


def _dynamic(name):
    batch, length = torch.export.Dim("batch", min=2, max=256), torch.export.Dim("length", min=2, max=256)
    return ({0: batch, 1: length}, {0: batch} if name == "AdaLayerNorm" else {0: batch, 1: length})


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("name", list(CASES))
def test_an_exported_block_saved_and_loaded_runs_at_another_batch_and_length_as_its_definition(name, strict,
                                                                                             tmp_path):
    block, definition = _pair(name)
    program = torch.export.export(block, _inputs(name, 2, 3), dynamic_shapes=_dynamic(name), strict=strict)
    torch.export.save(program, tmp_path / "block.pt2")
    loaded = torch.export.load(tmp_path / "block.pt2").module()
    other = _inputs(name, 5, 7, seed=1)
    torch.testing.assert_close(_flat(loaded(*other)), _flat(definition(*other)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_block_exported_to_onnx_runs_in_onnx_runtime_at_another_batch_and_length_as_its_definition(name, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    block, definition = _pair(name)
    path = str(tmp_path / "block.onnx")
    torch.onnx.export(block, _inputs(name, 2, 3), path, dynamo=True, verbose=False, dynamic_shapes=_dynamic(name))
    session = onnxruntime.InferenceSession(path)
    other = _inputs(name, 5, 7, seed=1)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), other)})
    torch.testing.assert_close([torch.from_numpy(a) for a in got], _flat(definition(*other)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_compiled_block_takes_new_batches_and_lengths_with_no_more_graphs_than_its_definition(name):
    from torch._dynamo.testing import CompileCounter

    block, definition = _pair(name)
    counts = []
    for module in (block, definition):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(module, backend=counter, fullgraph=True)
        for batch, length in [(2, 3), (3, 3), (4, 3), (4, 5), (4, 7)]:  # the batch changes, then the length
            x, other = (t.requires_grad_() for t in _inputs(name, batch, length, seed=batch + length))
            got, expected = _flat(compiled(x, other)), _flat(definition(x, other))
            torch.testing.assert_close(got, expected)
            torch.testing.assert_close(torch.autograd.grad(sum(t.sin().sum() for t in got), (x, other)),
                                       torch.autograd.grad(sum(t.sin().sum() for t in expected), (x, other)))
        counts.append(counter.frame_count)
    assert counts[0] <= counts[1], counts
