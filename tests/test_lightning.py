"""A converted model trained by PyTorch Lightning, against the same LightningModule around the
torch.nn model: single-process fit, checkpoint and reload, and the README's recipe for synced
batch norm over two gloo processes (Lightning's ``sync_batchnorm=True`` swaps in torch's
SyncBatchNorm, which is CUDA-only)."""

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from normlab.torch import SyncBatchNorm, convert  # noqa: E402

BATCH, HALF, STEPS = 8, 4, 3
TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               precision="64-true", max_steps=STEPS)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _samples():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * STEPS, 3, 6, 6, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 4, (BATCH * STEPS,), generator=generator))


class HalfOfEachBatch(torch.utils.data.Dataset):
    """Rank r's batch i is the r-th half of the single process' batch i."""

    def __len__(self):
        return HALF * STEPS

    def __getitem__(self, index):
        step, within = divmod(index, HALF)
        return _samples()[step * BATCH + dist.get_rank() * HALF + within]


def _assert_same_state(trained, expected):
    assert trained.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key].to(trained[key].dtype), rtol=1e-12, atol=1e-12,
                                   msg=key)


def _fit_torch_nn_on_whole_batches():
    module = Classifier(_cnn())
    L.Trainer(enable_checkpointing=False, **TRAINER).fit(module, torch.utils.data.DataLoader(_samples(), BATCH))
    return module.state_dict()


def test_a_converted_model_fits_checkpoints_and_reloads_in_lightning_as_torch_nn(tmp_path):
    expected = _fit_torch_nn_on_whole_batches()
    module = Classifier(convert(_cnn(), fuse=True))
    trainer = L.Trainer(default_root_dir=tmp_path, **TRAINER)
    trainer.fit(module, torch.utils.data.DataLoader(_samples(), BATCH))
    _assert_same_state(module.state_dict(), expected)
    reloaded = Classifier.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, net=convert(_cnn()))
    _assert_same_state(reloaded.state_dict(), expected)


@pytest.mark.slow
def test_readme_recipe_syncs_batch_norm_over_two_gloo_processes_in_lightning_ddp_as_one_process():
    expected = _fit_torch_nn_on_whole_batches()
    module = Classifier(SyncBatchNorm.convert_sync_batchnorm(convert(_cnn())))
    trainer = L.Trainer(strategy="ddp_spawn", devices=2, use_distributed_sampler=False, enable_checkpointing=False,
                        **TRAINER)
    trainer.fit(module, torch.utils.data.DataLoader(HalfOfEachBatch(), HALF))
    # ddp_spawn hands rank 0's parameters and buffers back to this process
    _assert_same_state(module.state_dict(), expected)
