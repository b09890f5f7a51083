"""convert() probes a model's many copies of one norm once: the outcome is cached per class,
plain attributes and parameter shapes, for one call. The oracles are transformers'
``LlamaRMSNorm`` and its forward's own call count, and modules whose attributes change
what they compute, which must each be converted (or left alone) by what they compute."""

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

import normlab.torch as nt  # noqa: E402


class CountedRMSNorm(LlamaRMSNorm):
    """LLaMA's RMS norm, counting the calls of its forward (the probes call it)."""

    calls = 0

    def forward(self, hidden_states):
        type(self).calls += 1
        return super().forward(hidden_states)


class MaybeCenteredRMSNorm(LlamaRMSNorm):
    """LLaMA's RMS norm, or with ``centered`` a norm that subtracts the mean first: what it
    computes depends on an attribute."""

    def __init__(self, size, eps=1e-6, centered=False):
        super().__init__(size, eps)
        self.centered = centered

    def forward(self, hidden_states):
        if self.centered:
            hidden_states = hidden_states - hidden_states.mean(-1, keepdim=True)
        return super().forward(hidden_states)


def test_a_models_many_copies_of_one_norm_are_probed_once():
    CountedRMSNorm.calls = 0
    nt.convert(CountedRMSNorm(16))
    per_module = CountedRMSNorm.calls
    assert per_module > 0
    CountedRMSNorm.calls = 0
    model = torch.nn.ModuleList(CountedRMSNorm(16) for _ in range(12))
    nt.convert(model)
    assert all(type(m) is nt.RMSNorm for m in model)
    assert CountedRMSNorm.calls == per_module
    CountedRMSNorm.calls = 0
    nt.convert(torch.nn.ModuleList([CountedRMSNorm(16), CountedRMSNorm(32)]))  # another shape: probed again
    assert CountedRMSNorm.calls == 2 * per_module


def test_copies_of_one_class_with_other_attributes_are_each_converted_by_what_they_compute():
    for order in ([False, True], [True, False]):
        model = torch.nn.ModuleList(MaybeCenteredRMSNorm(16, centered=centered) for centered in order)
        with pytest.warns(UserWarning, match="MaybeCenteredRMSNorm"):
            nt.convert(model)
        assert [type(m) is nt.RMSNorm for m in model] == [not centered for centered in order]
    model = torch.nn.ModuleList([LlamaRMSNorm(16, eps=1e-6), LlamaRMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-6)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nt.convert(model)
    assert [m.eps for m in model] == [1e-6, 1e-5, 1e-6]


def test_a_norm_holding_an_object_is_probed_on_its_own():
    class ScaledRMSNorm(LlamaRMSNorm):
        """What it computes hangs on an object no cache key can capture."""

        def forward(self, hidden_states):
            return super().forward(hidden_states) * self.scale

    norms = [ScaledRMSNorm(8), ScaledRMSNorm(8)]
    norms[0].scale, norms[1].scale = torch.tensor(1.0), torch.tensor(2.0)  # (plain tensors, not buffers)
    model = torch.nn.ModuleList(norms)
    with pytest.warns(UserWarning, match="ScaledRMSNorm"):
        nt.convert(model)
    assert type(model[0]) is nt.RMSNorm and type(model[1]) is ScaledRMSNorm
