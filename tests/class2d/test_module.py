"""Unit tests of the Lightning pieces of Class2D: mini-batch order, DDP sampling, pickling for
spawned ranks, checkpoint contents, rank-0-only writing and the Lightning noise filter."""

import logging
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cryoavg.class2d.callbacks import RelionWriter
from cryoavg.class2d.module import (
    Class2DModule,
    IterationSampler,
    iteration_subset,
)
from cryoavg.class2d.settings import Class2DSettings
from cryoavg.class2d.strategy import (
    LIGHTNING_LOGGERS,
    StatisticsDDPStrategy,
    quiet_lightning,
)
from cryoavg.cli.class2d import data_info
from cryoavg.io.dataset import ParticleDataset
from cryoavg.io.particles import read_particles
from cryoavg.io.stack import ImageSource


def _module(star: Path, **settings) -> Class2DModule:
    table = read_particles(star)
    source = ImageSource.from_table(table)
    options = Class2DSettings(n_classes=3, n_iterations=4, **settings)
    info = data_info(table, source, options)
    return Class2DModule(options, info, ParticleDataset(table, source))


# ---------------------------------------------------------------- mini-batches and ranks


def test_iteration_subset_is_a_seeded_permutation_sorted_by_optics_group():
    groups = torch.tensor([1, 0, 1, 0, 2, 1, 0, 2, 2, 0])
    everything = iteration_subset(10, 3, 7, -1, groups)
    assert sorted(everything.tolist()) == list(range(10))
    assert torch.all(groups[everything].diff() >= 0)
    # randperm(seed + iteration): the same for the same seed + iteration, new each iteration
    assert torch.equal(everything, iteration_subset(10, 3, 7, -1, groups))
    assert torch.equal(everything, iteration_subset(10, 4, 6, -1, groups))
    orders = {
        tuple(iteration_subset(10, it, 7, -1, groups).tolist()) for it in range(8)
    }
    assert len(orders) > 1
    part = iteration_subset(10, 3, 7, 4, groups)
    assert part.numel() == 4
    assert len(set(part.tolist())) == 4


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_iteration_sampler_splits_the_subset_over_ranks(world_size):
    subset = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    seen = []
    for rank in range(world_size):
        sampler = IterationSampler(
            subset, chunk_size=4, rank=rank, world_size=world_size
        )
        chunks = list(sampler)
        assert len(chunks) == len(sampler)
        assert all(0 < len(chunk) <= 4 for chunk in chunks)
        seen += [i for chunk in chunks for i in chunk]
    assert sorted(seen) == sorted(subset.tolist())  # every particle once, on one rank


# ---------------------------------------------------------------- spawn and checkpoints


def test_module_pickles_for_spawned_ranks(tiny_simulation):
    """ddp_spawn pickles the module, memory-mapped image stacks included."""
    module = _module(tiny_simulation / "particles.star", do_ctf=False)
    module.particles.get_batch([0, 1])  # open the memory maps first
    clone = pickle.loads(pickle.dumps(module))
    a = module.particles.get_batch([0, 7, 119])["image"]
    b = clone.particles.get_batch([0, 7, 119])["image"]
    assert torch.equal(a, b)
    state, state_clone = module.state_dict(), clone.state_dict()
    assert state.keys() == state_clone.keys()
    assert all(torch.equal(state[k], state_clone[k]) for k in state)


def test_checkpoint_stores_settings_and_particle_source(tiny_simulation):
    module = _module(tiny_simulation / "particles.star", do_ctf=False)
    module.run_info = {"particles": "/x/particles.star", "n_particles": 120}
    module.completed_iteration.fill_(3)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    info = checkpoint["cryoavg_class2d"]
    assert info["particles"] == "/x/particles.star"
    assert info["completed_iteration"] == 3
    assert Class2DSettings.from_dict(info["settings"]) == module.settings


# ---------------------------------------------------------------- rank-0-only writing


class _FakeTrainer:
    def __init__(self, rank: int) -> None:
        self.is_global_zero = rank == 0
        self.logger = None
        self.barriers: list[str] = []
        self.saved: list[Path] = []
        self.strategy = SimpleNamespace(barrier=self.barriers.append)

    def save_checkpoint(self, path, weights_only=None):
        assert weights_only is False  # keeps Lightning from logging its default
        self.saved.append(Path(path))
        if self.is_global_zero:  # Lightning writes the file on rank 0 only
            Path(path).write_bytes(b"checkpoint")


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_writes_files(tmp_path, rank, monkeypatch):
    writer = RelionWriter(
        tmp_path / "run",
        table=None,
        command_line="cryoavg class2d",
        write_tensorboard=False,
        checkpoint_path=tmp_path / "last.ckpt",
    )
    calls = []
    monkeypatch.setattr(writer, "write_files", lambda module, it: calls.append(it))
    module = SimpleNamespace(
        completed_iteration=torch.tensor(2),
        is_write_iteration=lambda it: it % 2 == 0,
    )
    trainer = _FakeTrainer(rank)
    writer.on_train_epoch_end(trainer, module)
    writer.on_train_epoch_end(trainer, module)  # already written: not again
    assert calls == ([2] if rank == 0 else [])
    # every rank takes part in the checkpoint (Lightning saves on rank 0) and the barrier;
    # rank 0 writes a temporary file and renames it into place (atomic)
    assert len(trainer.saved) == 1
    if rank == 0:
        assert trainer.saved[0] != tmp_path / "last.ckpt"
        assert (tmp_path / "last.ckpt").read_bytes() == b"checkpoint"
        assert not trainer.saved[0].exists()
    else:
        assert trainer.saved == [tmp_path / "last.ckpt"]
    assert trainer.barriers == ["relion_writer"]
    assert writer.written == [2]
    assert writer.state_dict() == {"written": [2]}


# ---------------------------------------------------------------- Lightning noise


def test_quiet_lightning_is_scoped():
    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with quiet_lightning():
            for name in LIGHTNING_LOGGERS:
                assert logging.getLogger(name).level == logging.WARNING
            warnings.warn(leaf, FutureWarning, stacklevel=1)  # ignored
            with pytest.raises(UserWarning):  # other warnings still surface
                warnings.warn("something else", UserWarning, stacklevel=1)
        with pytest.raises(FutureWarning):
            warnings.warn(leaf, FutureWarning, stacklevel=1)
    assert {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS} == levels


def test_strategy_keeps_the_module_unwrapped():
    strategy = StatisticsDDPStrategy(start_method="spawn")
    sentinel = object()
    strategy.model = sentinel
    strategy.configure_ddp()
    assert strategy.model is sentinel
