"""Sparse and MKL-DNN tensors into the twins: what torch.nn computes (an MKL-DNN batch norm
in training or evaluation) the twin computes, and where torch.nn raises, the twin raises
the same exception type; never NumPy's TypeError about a layout it cannot see. The
module has run on dense input first, so its cached calls for that shape are in place.
Oracle: torch.nn on the same input and state."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from tests.twins import randomized_pair  # noqa: E402

CASES = [
    ("LayerNorm", (4,), (3, 4)),
    ("RMSNorm", (4,), (3, 4)),
    ("GroupNorm", (2, 4), (3, 4, 5, 5)),
    ("BatchNorm1d", (4,), (3, 4)),
    ("BatchNorm2d", (4,), (3, 4, 5, 5)),
    ("InstanceNorm2d", (4,), (3, 4, 5, 5)),
]
LAYOUTS = {"sparse": lambda x: x.to_sparse(), "mkldnn": lambda x: x.to_mkldnn()}


def _outcome(module, x):
    try:
        y = module(x)
    except Exception as error:  # noqa: BLE001 (the exception type is what is compared)
        return type(error), None
    return None, y.to_dense()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=[c[0] for c in CASES])
def test_a_tensor_of_another_layout_meets_torchs_outcome(cls_name, args, shape, mode, layout, grad):
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    for module in (reference, twin):
        getattr(module, mode)()
    for _ in range(2):  # dense calls first: the twin keeps what they planned
        dense = torch.randn(shape)
        for module in (reference, twin):
            module(dense)
    x = LAYOUTS[layout](torch.randn(shape) * 2 + 1)
    with torch.set_grad_enabled(grad):
        expected_error, expected = _outcome(reference, x)
        error, got = _outcome(twin, x)
    assert error is expected_error
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(twin.state_dict()[name], value, rtol=1e-5, atol=1e-5)
