"""The bfloat16 kernels of the fused RMS blocks (normlab.kernels.fused_half), on inputs
large enough to take them, against the classes they replace: transformers'
LlamaRMSNorm, GemmaRMSNorm, MambaRMSNormGated and FalconH1RMSNormGated, and
mamba_ssm's gated-norm reference.

The kernels keep the recipes' roundings but take the statistics in float64 where the
replaced code keeps float32: an output may then round to the neighbouring bfloat16
value (one unit in the last place) where the float32 x̂ lies within its own error of a
rounding midpoint. Under the llama recipe that x̂ is rounded and then weighted, and
one unit of x̂ is up to two of the product. The gradients are rounded once (computed in
float32 with float64 sums), so they
are held to the float64 gradient of the same class: never farther from it than the
class's own bfloat16 autograd.
"""

import inspect
import sys
import weakref

import pytest

torch = pytest.importorskip("torch")

pytest.importorskip("transformers")
from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from normlab.kernels import fused_half  # noqa: E402
from normlab.torch.fused import FusedAddRMSNorm, GatedRMSNorm  # noqa: E402

blocks = sys.modules["normlab.torch.fused"]
BF16 = torch.bfloat16
SHAPE = (2, 256, 1024)  # 2^19 elements: the smallest input the kernels take


def _kernel_ran(output) -> bool:
    return type(output.grad_fn).__name__ == "_CachedFusedFunctionBackward"


def _inputs(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 2).to(BF16).requires_grad_() for s in shapes]


def _randomize(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (0 if isinstance(module, GemmaRMSNorm) else 1))
    return module


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 steps lie between finite a and b (-0 and +0 are one value)."""
    def ordered(t):
        bits = t.detach().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def _assert_rounding_of_the_same_value(got, want, ulps=1):
    assert got.dtype == want.dtype == BF16
    apart = _ulps_apart(got, want)
    assert apart.max() <= ulps, f"{apart.max()} ulps apart"
    assert (apart > 0).float().mean() < 1e-3  # a few in 100,000 lie at a midpoint


def _grads(outputs, inputs, seed=5):
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, cotangents)


def _assert_gradients_no_farther(got, replaced, exact):
    for a, b, e in zip(got, replaced, exact):
        assert a.dtype == b.dtype
        ours, theirs = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert ours <= theirs, f"{ours} from the float64 gradient, the replaced code {theirs}"


def _float64_twin(module):
    twin = type(module).__new__(type(module))
    twin.__dict__ = dict(module.__dict__, _parameters=dict(module._parameters))
    return twin


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_fused_add_rms_norm_is_the_hf_norm_of_the_sum_in_bfloat16(family):
    hf = _randomize(LlamaRMSNorm(SHAPE[-1], eps=1e-6) if family == "llama" else GemmaRMSNorm(SHAPE[-1], eps=1e-6))
    hf = hf.to(BF16)
    ours = FusedAddRMSNorm(SHAPE[-1], eps=1e-6, casting=family, weight_offset=1.0 if family == "gemma" else 0.0)
    ours = ours.to(BF16)
    ours.load_state_dict(hf.state_dict())
    x, r = _inputs(SHAPE, SHAPE)
    y, total = ours(x, r)
    assert _kernel_ran(y)
    want_total = x + r
    want = hf(want_total)
    assert torch.equal(total, want_total)
    _assert_rounding_of_the_same_value(y, want, ulps=2 if family == "llama" else 1)

    got = _grads([y, total], [x, r, ours.weight])
    replaced = _grads([want, want_total], [x, r, hf.weight])
    hf64 = (LlamaRMSNorm if family == "llama" else GemmaRMSNorm)(SHAPE[-1], eps=1e-6).double()
    hf64.weight.data.copy_(hf.weight.double())
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, r))
    total64 = x64 + r64
    exact = _grads([hf64(total64), total64], [x64, r64, hf64.weight])
    _assert_gradients_no_farther(got, replaced, exact)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_is_falcon_h1s_gated_norm_in_bfloat16(norm_before_gate):
    falcon = _randomize(FalconH1RMSNormGated(SHAPE[-1], eps=1e-6, n_groups=8, norm_before_gate=norm_before_gate))
    falcon = falcon.to(BF16)
    ours = GatedRMSNorm(SHAPE[-1], eps=1e-6, group_size=SHAPE[-1] // 8, norm_before_gate=norm_before_gate,
                        casting="gemma").to(BF16)
    ours.load_state_dict(falcon.state_dict())
    x, z = _inputs(SHAPE, SHAPE)
    y = ours(x, z)
    assert _kernel_ran(y)
    want = falcon(x, z)
    _assert_rounding_of_the_same_value(y, want)

    falcon64 = FalconH1RMSNormGated(SHAPE[-1], eps=1e-6, n_groups=8, norm_before_gate=norm_before_gate).double()
    falcon64.weight.data.copy_(falcon.weight.double())
    x64, z64 = (t.detach().double().requires_grad_() for t in (x, z))
    _assert_gradients_no_farther(_grads([y], [x, z, ours.weight]), _grads([want], [x, z, falcon.weight]),
                                 _grads([falcon64(x64, z64)], [x64, z64, falcon64.weight]))


def test_gated_rms_norm_with_the_llama_recipe_is_mamba2s_gated_norm_in_bfloat16():
    # transformers' Mamba2 gates first and rounds x̂ before its weight, as "llama" does
    # (transformers before 5.24 normalizes the whole row and takes no group_size)
    groups = {"group_size": SHAPE[-1]} if "group_size" in inspect.signature(MambaRMSNormGated).parameters else {}
    mamba = _randomize(MambaRMSNormGated(SHAPE[-1], eps=1e-6, **groups)).to(BF16)
    ours = GatedRMSNorm(SHAPE[-1], eps=1e-6, norm_before_gate=False, casting="llama").to(BF16)
    ours.load_state_dict(mamba.state_dict())
    x, z = _inputs(SHAPE, SHAPE)
    y = ours(x, z)
    assert _kernel_ran(y)
    _assert_rounding_of_the_same_value(y, mamba(x, z), ulps=2)


@pytest.mark.parametrize("activation", ["sigmoid", "gelu"])
def test_gated_rms_norm_other_activations_in_bfloat16_against_the_float64_formula(activation):
    ours = _randomize(GatedRMSNorm(SHAPE[-1], eps=1e-6, group_size=128, gate_activation=activation)).to(BF16)
    x, z = _inputs(SHAPE, SHAPE)
    y = ours(x, z)
    assert _kernel_ran(y)
    act = torch.sigmoid if activation == "sigmoid" else torch.nn.functional.gelu
    groups = x.detach().double().unflatten(-1, (-1, 128))
    normed = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + 1e-6)).flatten(-2)
    exact = normed * ours.weight.detach().double() * act(z.detach().double())
    # "gemma" rounds once: the nearest bfloat16 to the exact value, or a neighbour of it
    assert _ulps_apart(y, exact.to(BF16)).max() <= 1


def test_nan_and_inf_stay_in_their_row_in_bfloat16():
    ours = _randomize(FusedAddRMSNorm(SHAPE[-1], eps=1e-6)).to(BF16)
    x, r = _inputs(SHAPE, SHAPE)
    clean_y, clean_total = ours(x, r)
    bad = x.detach().clone()
    bad[0, 3, 7] = float("nan")
    bad[1, 5, 0] = float("inf")
    y, total = ours(bad, r)
    assert _kernel_ran(y)
    rows = torch.ones(SHAPE[:-1], dtype=torch.bool)
    rows[0, 3] = rows[1, 5] = False
    assert torch.equal(y[rows], clean_y[rows]) and torch.equal(total[rows], clean_total[rows])
    assert y[0, 3].isnan().all() and y[1, 5].isnan().all()  # inf/inf in its own row
    assert total[0, 3, 7].isnan() and total[1, 5, 0].isinf()


def test_bfloat16_kernels_give_the_same_bits_on_one_thread_and_two():
    ours = _randomize(GatedRMSNorm(SHAPE[-1], eps=1e-6, group_size=256)).to(BF16)
    x, z = _inputs(SHAPE, SHAPE)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y = ours(x, z)
            results.append((y, *_grads([y], [x, z, ours.weight])))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_forward_alone_takes_the_kernels_from_its_own_size(monkeypatch):
    # without autograd the recipe's operations are faster up to 2^21 elements (measured)
    hf = _randomize(LlamaRMSNorm(1024, eps=1e-6)).to(BF16)
    ours = FusedAddRMSNorm(1024, eps=1e-6).to(BF16)
    ours.load_state_dict(hf.state_dict())
    calls = []
    forward = blocks._Call.forward  # (every kernel call of the blocks, with autograd or without)
    monkeypatch.setattr(blocks._Call, "forward", lambda *a: calls.append(1) or forward(*a))
    for shape, kernels in (((2, 256, 1024), False), ((2, 1024, 1024), True)):
        x, r = (t.detach() for t in _inputs(shape, shape))
        with torch.no_grad():
            y, total = ours(x, r)
            want = hf(x + r)
        assert bool(calls) == kernels
        if kernels:
            _assert_rounding_of_the_same_value(y, want, ulps=2)
        else:
            assert torch.equal(y, want)


def test_small_bfloat16_inputs_run_the_recipe_bit_for_bit():
    hf = _randomize(LlamaRMSNorm(64, eps=1e-6)).to(BF16)
    ours = FusedAddRMSNorm(64, eps=1e-6).to(BF16)
    ours.load_state_dict(hf.state_dict())
    x, r = _inputs((3, 5, 64), (3, 5, 64))
    y, _ = ours(x, r)
    assert not _kernel_ran(y)
    assert torch.equal(y, hf(x + r))


def test_the_recipe_codes_agree_with_the_kernels():
    assert (blocks._ROUND_ONCE, blocks._ROUND_STEPS) == (fused_half.ROUND_ONCE, fused_half.ROUND_STEPS)


def test_a_nan_with_any_payload_stays_nan_in_bfloat16():
    # a float32 weight (the gemma recipe takes one) whose NaN has every payload bit set:
    # rounding its bits to bfloat16 without torch's NaN check would carry into the sign
    ours = FusedAddRMSNorm(SHAPE[-1], eps=1e-6, casting="gemma")
    with torch.no_grad():
        ours.weight.view(torch.int32)[5] = 0x7FFFFFFF
    assert ours.weight[5].isnan()
    x, r = (t.detach() for t in _inputs(SHAPE, SHAPE))
    y, _ = ours(x, r)
    assert y.dtype == BF16 and _kernel_ran(ours(x.requires_grad_(), r)[0])
    assert y[..., 5].isnan().all()
    assert not y[..., :5].isnan().any()


@pytest.mark.parametrize("block", ["add", "gated"])
def test_inputs_made_in_inference_mode_train_the_weight_as_the_hf_norms_do(block):
    # the recipe's first cast (to float32) makes a normal tensor, so LlamaRMSNorm and
    # FalconH1RMSNormGated train on inputs made in inference_mode; the kernels would save them
    hf = LlamaRMSNorm(SHAPE[-1], eps=1e-6) if block == "add" else FalconH1RMSNormGated(SHAPE[-1], eps=1e-6)
    hf = _randomize(hf).to(BF16)
    ours = (FusedAddRMSNorm(SHAPE[-1], eps=1e-6) if block == "add"
            else GatedRMSNorm(SHAPE[-1], eps=1e-6, casting="gemma")).to(BF16)
    ours.load_state_dict(hf.state_dict())
    with torch.inference_mode():
        x, z = (t.detach().clone() for t in _inputs(SHAPE, SHAPE))
    got, want = ours(x) if block == "add" else ours(x, z), hf(x) if block == "add" else hf(x, z)
    assert torch.equal(got, want)
    assert torch.equal(*(_grads([y], [m.weight])[0] for y, m in ((got, ours), (want, hf))))


@pytest.mark.parametrize("block", ["add", "gated"])
def test_bfloat16_blocks_compile_to_one_full_graph_when_autograd_records(block):
    # the half kernels' size check asked is_inference_mode_enabled, which Dynamo cannot trace
    hf = LlamaRMSNorm(64, eps=1e-6) if block == "add" else FalconH1RMSNormGated(64, eps=1e-6)
    hf = _randomize(hf).to(BF16)
    ours = (FusedAddRMSNorm(64, eps=1e-6) if block == "add" else GatedRMSNorm(64, eps=1e-6, casting="gemma")).to(BF16)
    ours.load_state_dict(hf.state_dict())
    x, z = _inputs((2, 3, 64), (2, 3, 64))
    torch._dynamo.reset()
    got = torch.compile(ours, fullgraph=True, backend="aot_eager")(x, z)
    want = (hf(x + z), x + z) if block == "add" else hf(x, z)
    for a, b in zip(got if block == "add" else [got], want if block == "add" else [want]):
        assert torch.equal(a, b)
    assert all(g is not None for g in _grads([got[0] if block == "add" else got], [x, z, ours.weight]))


class _LiveBytes(TorchDispatchMode):
    """The most bytes that the tensors torch's operations made inside the block held at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.storages:
                address, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.storages.add(address)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._freed, address, size)
        return out

    def _freed(self, address, size):
        self.live -= size
        self.storages.discard(address)


def _peak_bytes(call) -> int:
    with torch.no_grad(), _LiveBytes() as mode:
        out = call()
    del out
    return mode.peak


def _replaced_and_ours(kind):
    """(the class a block or twin replaces, called as models call it; ours, called alike)."""
    import normlab.torch as nt

    if kind in ("llama twin", "gemma twin", "llama add", "gemma add"):
        family = kind.split()[0]
        cls = LlamaRMSNorm if family == "llama" else GemmaRMSNorm
        replaced = cls(1024, eps=1e-6).to(BF16)
        if kind.endswith("twin"):
            twin = nt.convert(torch.nn.Sequential(cls(1024, eps=1e-6))).to(BF16)[0]
            return (lambda x, r: replaced(x)), (lambda x, r: twin(x))
        ours = FusedAddRMSNorm(1024, eps=1e-6, casting=family, weight_offset=float(family == "gemma")).to(BF16)
        return (lambda x, r: (replaced(x + r), x + r)), (lambda x, r: ours(x, r))
    if kind == "mamba2 gated":
        groups = {"group_size": 128} if "group_size" in inspect.signature(MambaRMSNormGated).parameters else {}
        replaced = MambaRMSNormGated(1024, eps=1e-6, **groups).to(BF16)
        ours = GatedRMSNorm(1024, eps=1e-6, group_size=groups.get("group_size", 1024), norm_before_gate=False,
                            casting="llama").to(BF16)
    elif kind == "falcon_h1 gated":
        replaced = FalconH1RMSNormGated(1024, eps=1e-6, n_groups=8, norm_before_gate=True).to(BF16)
        ours = GatedRMSNorm(1024, eps=1e-6, group_size=128, casting="gemma").to(BF16)
    else:  # AdaLN-Zero, emb from the residual's first row
        normalization = pytest.importorskip("diffusers.models.normalization")
        replaced = normalization.AdaLayerNormZero(1024).to(BF16)
        ours = nt.AdaLayerNorm(1024).to(BF16)
        ours.load_state_dict(replaced.state_dict())
        return (lambda x, r: replaced(x[None], emb=r[:1])), (lambda x, r: ours(x[None], emb=r[:1]))
    return replaced, ours


@pytest.mark.parametrize("kind", ["llama twin", "gemma twin", "llama add", "gemma add", "mamba2 gated",
                                  "falcon_h1 gated", "adaln"])
def test_small_bfloat16_inputs_hold_no_more_temporaries_than_the_classes_they_replace(kind):
    # the recipes' float32 copy or x̂ held to the end was an input-sized tensor more (gemma's
    # x̂ held through its final cast, the gated composite's float32 copy of the input)
    x, other = (t.detach() for t in _inputs((64, 1024), (64, 1024)))
    replaced, ours = _replaced_and_ours(kind)
    assert _peak_bytes(lambda: ours(x, other)) < _peak_bytes(lambda: replaced(x, other)) + x.nbytes // 2
