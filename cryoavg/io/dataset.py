"""PyTorch Dataset and Lightning DataModule over RELION particles.

Conventions
-----------
* An item is a dict of tensors:

  - ``image``: ``float32 (h, w)``, the particle image as stored (no normalisation);
  - ``index``: ``int64 ()``, the global particle index (row of the STAR file), also
    for subsets; per-particle parameters (scales, poses) are indexed by it;
  - ``optics_group``: ``int64 ()``, 0-based optics group;
  - ``group``: ``int64 ()``, 0-based micrograph group (RELION ``rlnGroupNumber - 1``);
  - ``ctf``: dict of ``float32 ()`` tensors with the keys of
    :data:`cryoavg.io.particles.CTF_KEYS` (Å, degrees, kV, mm, Å²);
  - ``pixel_size_angstrom``: ``float32 ()``.

  PyTorch's default collate turns a list of items into the same dict with a leading
  batch dimension ``b``; :meth:`ParticleDataset.get_batch` builds that batch directly,
  reading all its images in one go (stack by stack).
* ``lightning`` is imported only in this module, and only when
  :class:`ParticleDataModule` is used.

Example
-------
>>> table = read_particles("particles.star")  # doctest: +SKIP
>>> dataset = ParticleDataset(table)  # doctest: +SKIP
>>> batch = dataset.get_batch(np.arange(64))  # doctest: +SKIP
>>> batch["image"].shape  # doctest: +SKIP
torch.Size([64, 256, 256])
>>> datamodule = ParticleDataModule("particles.star", batch_size=128)  # doctest: +SKIP
"""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cryoavg.io.particles import CTF_KEYS, ParticleTable, read_particles
from cryoavg.io.stack import ImageSource

__all__ = ["ParticleDataModule", "ParticleDataset"]


class ParticleDataset(Dataset):
    """Particles of a :class:`~cryoavg.io.particles.ParticleTable` as a torch Dataset.

    Parameters
    ----------
    table
        The particles.
    source
        Image source for the table (default: ``ImageSource.from_table(table)``).
    indices
        Global particle indices making up this dataset (default: all, in file order).
        Item ``i`` is particle ``indices[i]``.
    preread
        With the default source: read all images into memory up front.

    Raises
    ------
    InputError
        The stacks are missing or invalid (see :class:`~cryoavg.io.stack.ImageSource`).
    ValueError
        ``source`` does not match the table, or ``indices`` are out of range.
    """

    def __init__(
        self,
        table: ParticleTable,
        source: ImageSource | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        preread: bool = False,
    ) -> None:
        self.table = table
        self.source = (
            source
            if source is not None
            else ImageSource.from_table(table, preread=preread)
        )
        if len(self.source) != table.n_particles:
            raise ValueError(
                f"image source has {len(self.source)} images "
                f"for {table.n_particles} particles"
            )
        n = table.n_particles
        if indices is None:
            self.indices = np.arange(n, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if self.indices.size and (
                self.indices.min() < 0 or self.indices.max() >= n
            ):
                raise ValueError(f"particle indices out of range for {n} particles")
        ctf = table.ctf_parameters()
        self._ctf = {
            key: torch.from_numpy(np.array(ctf[key], dtype=np.float32))
            for key in CTF_KEYS
        }
        self._optics_group = torch.from_numpy(table.optics_group_index)
        self._group = torch.from_numpy(table.micrograph_group_index)
        self._pixel_size = torch.from_numpy(
            table.pixel_size_angstrom.astype(np.float32)
        )

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def box_size(self) -> int:
        """Box size of the images in pixels."""
        return self.source.box_size

    def _metadata(self, particles: torch.Tensor) -> dict[str, Any]:
        return {
            "index": particles,
            "optics_group": self._optics_group[particles],
            "group": self._group[particles],
            "ctf": {key: values[particles] for key, values in self._ctf.items()},
            "pixel_size_angstrom": self._pixel_size[particles],
        }

    def __getitem__(self, item: int) -> dict[str, Any]:
        """Return particle ``indices[item]`` as a dict of tensors (see the module)."""
        particle = int(self.indices[item])
        image = torch.from_numpy(self.source[particle])
        return {
            "image": image,
            **self._metadata(torch.tensor(particle, dtype=torch.int64)),
        }

    def __getitems__(self, items: list[int]) -> list[dict[str, Any]]:
        """Items for a DataLoader batch, with all images read in one go.

        PyTorch's DataLoader calls this instead of :meth:`__getitem__` per item; the
        default collate then stacks the items as usual.
        """
        batch = self.get_batch(items)
        return [_select_item(batch, position) for position in range(len(items))]

    def get_batch(
        self, items: Sequence[int] | np.ndarray | torch.Tensor
    ) -> dict[str, Any]:
        """Return several items already batched, reading their images in one go.

        Parameters
        ----------
        items
            Positions in this dataset (not global indices), any order.

        Returns
        -------
        dict
            Same keys as an item, each with a leading batch dimension ``b``
            (``image``: ``float32 (b, h, w)``), equal to default-collating
            ``[self[i] for i in items]``.
        """
        if isinstance(items, torch.Tensor):
            items = items.cpu().numpy()
        positions = np.asarray(items, dtype=np.int64).reshape(-1)
        particles = self.indices[positions]
        images = torch.from_numpy(self.source.images(particles))
        return {"image": images, **self._metadata(torch.from_numpy(particles))}


def _select_item(batch: dict[str, Any], position: int) -> dict[str, Any]:
    """Item ``position`` of a batch dict (recursing into the ``ctf`` dict)."""
    return {
        key: _select_item(value, position)
        if isinstance(value, dict)
        else value[position]
        for key, value in batch.items()
    }


class ParticleDataModule(lightning.LightningDataModule):
    """Lightning DataModule that serves the particles of a STAR file.

    Parameters
    ----------
    particles_star
        RELION particles STAR file (3.0 or 3.1+).
    batch_size
        Particles per batch (per device under DDP).
    num_workers
        DataLoader worker processes (0: load in the main process).
    preread
        Read all images into memory in :meth:`setup`.
    pixel_size_angstrom
        Pixel size in Å overriding the STAR file (required when it has none).
    project_dir
        RELION project directory for relative stack paths (default: current directory).
    shuffle
        Shuffle particles every epoch in :meth:`train_dataloader`.
    seed
        Seed of the shuffling generator (the order is reproducible).
    drop_last
        Drop the last incomplete batch of an epoch.

    Notes
    -----
    Under DDP, Lightning replaces the sampler by a ``DistributedSampler`` itself; this
    module does not disable that.
    """

    def __init__(
        self,
        particles_star: str,
        batch_size: int = 256,
        num_workers: int = 0,
        preread: bool = False,
        pixel_size_angstrom: float | None = None,
        project_dir: str | os.PathLike[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.particles_star = str(particles_star)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.preread = bool(preread)
        self.pixel_size_angstrom = pixel_size_angstrom
        self.project_dir = project_dir
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.table: ParticleTable | None = None
        self.dataset: ParticleDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the particles and open the stacks (once; later calls do nothing).

        Parameters
        ----------
        stage
            Lightning stage (``"fit"``, ``"predict"``, ...); ignored.

        Raises
        ------
        InputError
            The STAR file or a stack is missing or invalid.
        """
        if self.dataset is not None:
            return
        project = (
            None if self.project_dir is None else Path(os.fspath(self.project_dir))
        )
        self.table = read_particles(
            self.particles_star,
            pixel_size_angstrom=self.pixel_size_angstrom,
            project_dir=project,
        )
        self.dataset = ParticleDataset(self.table, preread=self.preread)

    def _require_dataset(self) -> ParticleDataset:
        if self.dataset is None:
            self.setup()
        if self.dataset is None:  # pragma: no cover - setup always sets it
            raise RuntimeError("ParticleDataModule.setup() did not create a dataset")
        return self.dataset

    def _loader(self, *, shuffle: bool, drop_last: bool) -> DataLoader:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return DataLoader(
            self._require_dataset(),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) batches over all particles, each once per epoch."""
        return self._loader(shuffle=self.shuffle, drop_last=self.drop_last)

    def predict_dataloader(self) -> DataLoader:
        """Batches over all particles in file order (e.g. for a final full E-step)."""
        return self._loader(shuffle=False, drop_last=False)
