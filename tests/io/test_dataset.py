import sys

import lightning
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from cryoavg.io.dataset import ParticleDataModule, ParticleDataset
from cryoavg.io.particles import CTF_KEYS, read_particles
from tests.io.helpers import make_dataset


def test_item_contents(dataset):
    table = read_particles(dataset.star)
    data = ParticleDataset(table)
    assert len(data) == table.n_particles
    assert data.box_size == 16
    item = data[2]
    assert set(item) == {
        "image",
        "index",
        "optics_group",
        "group",
        "ctf",
        "pixel_size_angstrom",
    }
    assert item["image"].dtype == torch.float32
    assert item["image"].shape == (16, 16)
    np.testing.assert_array_equal(item["image"].numpy(), dataset.images[2])
    assert item["index"].dtype == torch.int64
    assert int(item["index"]) == 2
    assert int(item["optics_group"]) == int(table.optics_group_index[2])
    assert int(item["group"]) == int(table.micrograph_group_index[2])
    assert set(item["ctf"]) == set(CTF_KEYS)
    for key, value in item["ctf"].items():
        assert value.dtype == torch.float32
        assert value.shape == ()
        assert float(value) == pytest.approx(float(table.ctf_parameters()[key][2]))
    assert float(item["pixel_size_angstrom"]) == pytest.approx(1.5)


def test_default_collate_equals_get_batch(dataset):
    data = ParticleDataset(read_particles(dataset.star))
    positions = [5, 0, 3, 3]
    collated = default_collate([data[i] for i in positions])
    batch = data.get_batch(positions)
    assert batch["image"].shape == (4, 16, 16)

    def compare(left, right):
        if isinstance(left, dict):
            assert set(left) == set(right)
            for key in left:
                compare(left[key], right[key])
        else:
            assert left.dtype == right.dtype
            torch.testing.assert_close(left, right, rtol=0, atol=0)

    compare(collated, batch)
    compare(data.get_batch(torch.tensor(positions)), batch)


def test_subset_keeps_global_indices(dataset):
    table = read_particles(dataset.star)
    data = ParticleDataset(table, indices=[6, 1])
    assert len(data) == 2
    assert int(data[0]["index"]) == 6
    np.testing.assert_array_equal(data[1]["image"].numpy(), dataset.images[1])
    batch = data.get_batch([1, 0])
    assert batch["index"].tolist() == [1, 6]
    with pytest.raises(ValueError, match=r"out of range"):
        ParticleDataset(table, indices=[99])


def test_dataloader_with_default_collate(dataset):
    data = ParticleDataset(read_particles(dataset.star), preread=True)
    loader = DataLoader(data, batch_size=3, shuffle=False)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [3, 3, 1]
    assert batches[0]["ctf"]["defocus_u_angstrom"].shape == (3,)
    # the DataLoader path (__getitems__ + default collate) equals get_batch
    for number, batch in enumerate(batches):
        expected = data.get_batch(range(3 * number, min(3 * number + 3, len(data))))
        torch.testing.assert_close(batch["image"], expected["image"], rtol=0, atol=0)
        assert batch["index"].tolist() == expected["index"].tolist()
        for key in CTF_KEYS:
            torch.testing.assert_close(batch["ctf"][key], expected["ctf"][key])


def _epoch_indices(loader):
    return [int(i) for batch in loader for i in batch["index"]]


def test_datamodule_covers_every_particle_once_per_epoch(tmp_path):
    data = make_dataset(tmp_path, stack_sizes=(5, 6))
    module = ParticleDataModule(str(data.star), batch_size=4, seed=3)
    module.setup("fit")
    loader = module.train_dataloader()
    first = _epoch_indices(loader)
    second = _epoch_indices(loader)
    assert sorted(first) == list(range(11))
    assert sorted(second) == list(range(11))
    assert first != list(range(11))  # shuffled
    # the same seed gives the same order in a fresh module
    again = ParticleDataModule(str(data.star), batch_size=4, seed=3)
    again.setup()
    assert _epoch_indices(again.train_dataloader()) == first
    assert _epoch_indices(module.predict_dataloader()) == list(range(11))
    unshuffled = ParticleDataModule(str(data.star), batch_size=4, shuffle=False)
    assert _epoch_indices(unshuffled.train_dataloader()) == list(range(11))


@pytest.mark.skipif(sys.platform != "linux", reason="fork-based workers")
def test_datamodule_with_worker_processes(tmp_path):
    data = make_dataset(tmp_path)
    module = ParticleDataModule(
        str(data.star), batch_size=2, num_workers=2, shuffle=False
    )
    module.setup()
    batches = list(module.train_dataloader())
    images = torch.cat([b["image"] for b in batches]).numpy()
    np.testing.assert_array_equal(images, data.images)


class _IndexRecorder(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["index"].tolist())
        return (self.weight * batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# Lightning 2.6 with torch >= 2.10 uses a deprecated torch pytree class internally.
@pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)
def test_datamodule_in_a_lightning_trainer(tmp_path):
    data = make_dataset(tmp_path)
    module = ParticleDataModule(str(data.star), batch_size=3, seed=1)
    model = _IndexRecorder()
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=module)
    n = len(data.images)
    assert sorted(model.seen[:n]) == list(range(n))
    assert sorted(model.seen[n:]) == list(range(n))
