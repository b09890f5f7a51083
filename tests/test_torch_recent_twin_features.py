"""torch's transforms and module features on the twins that convert() makes of the newer
norm classes (ConvNeXt's and timm's channels-first layer norms, VitDet's, the recipe norms
of transformers and diffusers, the gated, fused and PyG norms). Oracle: the original class,
built from its source, under the same feature on the same parameters and input."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from tests import mirrored_norms  # noqa: E402


def _converted(original):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in original.parameters():
            p.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (each is converted)
        return nt.convert(copy.deepcopy(original))


def _image(dtype=torch.float32):
    return torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)


CHANNELS_FIRST = {  # name -> (the original, the twin's class)
    "torchvision LayerNorm2d": (lambda: mirrored_norms.TorchvisionLayerNorm2d(4, eps=1e-6), "LayerNorm2d"),
    "timm LayerNorm2dFp32": (lambda: mirrored_norms.TimmLayerNorm2dFp32(4), "Float32LayerNorm2d"),
}


@pytest.mark.parametrize("name", list(CHANNELS_FIRST))
def test_jacfwd_of_a_channels_first_layer_norm_gives_the_originals_jacobian(name):
    """jacfwd runs forward-mode AD inside vmap, where a tensor takes no channels_last memory
    format: the twin raised torch's "NYI: Tensor.clone(memory_format) inside vmap"."""
    make, twin_class = CHANNELS_FIRST[name]
    original = make()
    twin = _converted(original)
    assert type(twin).__name__ == twin_class
    x = _image()
    torch.testing.assert_close(torch.func.jacfwd(twin)(x), torch.func.jacfwd(original)(x))


def test_vmap_of_vitdets_layer_norm_gives_the_originals_outputs():
    """Under vmap the twin (a ChannelsFirstLayerNorm) takes torch's operations; it then
    copied their output into a new tensor of the input's strides, which vmap refuses
    ("vmap: inplace arithmetic(self, *extra_args) is not possible")."""
    vitdet = pytest.importorskip("transformers.models.vitdet.modeling_vitdet")
    original = vitdet.VitDetLayerNorm(4)
    twin = _converted(original)
    assert type(twin).__name__ == "ChannelsFirstLayerNorm"
    x = _image()
    found = [torch.func.vmap(lambda image: module(image.unsqueeze(0)).squeeze(0))(x) for module in (original, twin)]
    torch.testing.assert_close(found[1], found[0])


def test_vitdets_layer_norm_exported_with_a_dynamic_batch_gives_the_originals_outputs_and_strides():
    """torch.export (non-strict) hands the twin symbolic sizes, which its cached look-up of the
    output's strides could not hash ("unhashable type: non-nested SymInt")."""
    vitdet = pytest.importorskip("transformers.models.vitdet.modeling_vitdet")
    original = vitdet.VitDetLayerNorm(4)
    twin = _converted(original)
    batch = torch.export.Dim("batch", min=2, max=16)
    x, other = _image().transpose(2, 3), torch.randn(5, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    exported = torch.export.export(twin, (x,), dynamic_shapes=({0: batch},))
    expected = original(other.transpose(2, 3))
    for program in (exported, exported.run_decompositions()):
        y = program.module()(other.transpose(2, 3))
        torch.testing.assert_close(y, expected)
        assert y.stride() == expected.stride()
