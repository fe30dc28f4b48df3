"""``Class2DModule``: reference-free 2D classification as a Lightning module.

One Lightning *epoch* is one RELION *iteration*: the iteration's mini-batch (VDAM) or all
particles (EM) is streamed in chunks (``training_step``), each chunk goes through the E-step and
adds to the sufficient statistics, and at the end of the epoch the statistics (and the
per-particle results) are summed over DDP ranks and the M-step optimizer
(:class:`~cryoavg.class2d.optim.VdamOptimizer` or :class:`~cryoavg.class2d.optim.EmOptimizer`)
updates the model. Iteration ``it`` uses the particle order ``randperm(seed + it)``, as RELION
re-shuffles with ``mt19937(random_seed + iter)`` (§A.5.4), so runs are reproducible and a
continued run follows the same path.

Writing RELION files, TensorBoard images and the progress bar live in
:mod:`cryoavg.class2d.callbacks`.
"""

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cryoavg.class2d.accuracy import expected_accuracies
from cryoavg.class2d.estep import (
    EStepBatch,
    StatisticsUpdate,
    expectation_step,
    prepare_estep_tables,
    statistics_update,
)
from cryoavg.class2d.guards import check_class_images, check_particle_values
from cryoavg.class2d.init import initialise_state
from cryoavg.class2d.optim import EmOptimizer, StepReport, VdamOptimizer
from cryoavg.class2d.preprocess import ctf_images, prepare_estep_batch
from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import (
    PixelSet,
    PsiGrid,
    TranslationGrid,
    coarse_image_size,
    next_perturbation,
)
from cryoavg.class2d.schedule import VdamSchedule
from cryoavg.class2d.settings import (
    MIB,
    Class2DSettings,
    EStepMemoryError,
    backed_off_budget,
    estep_bytes_per_particle,
    estep_memory_budget_bytes,
    parse_estep_memory_mib,
    parse_estep_precision,
    particles_per_pass,
    prepare_bytes_per_particle,
)
from cryoavg.class2d.state import Class2DState
from cryoavg.class2d.statistics import Class2DStatistics
from cryoavg.io.dataset import ParticleDataset

log = logging.getLogger("cryoavg")

#: what an allocation failure raises (``torch.cuda.OutOfMemoryError`` is the same class;
#: ``torch.OutOfMemoryError`` exists from PyTorch 2.5)
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

_T = TypeVar("_T")

#: per-particle result fields gathered every iteration (name -> dtype)
PARTICLE_FIELDS: dict[str, torch.dtype] = {
    "class_index": torch.int64,
    "psi_degrees": torch.float32,
    "offset_y_px": torch.float32,
    "offset_x_px": torch.float32,
    "norm_correction": torch.float32,
    "log_likelihood": torch.float64,
    "pmax": torch.float32,
    "n_significant": torch.int64,
}


@dataclass
class DataInfo:
    """What the module needs to know about the particle set."""

    n_particles: int
    box_size: int
    pixel_size_angstrom: float
    n_optics_groups: int
    n_groups: int
    optics_group: torch.Tensor  # (n,) int64
    group: torch.Tensor  # (n,) int64
    ctf_premultiplied: torch.Tensor  # (g,) bool
    has_ctf: bool


def _chunk_rows(batch: dict, start: int, stop: int) -> dict:
    """Particles ``start:stop`` of a chunk dict (recursing into the ``ctf`` dict)."""
    return {
        key: _chunk_rows(value, start, stop)
        if isinstance(value, dict)
        else value[start:stop]
        for key, value in batch.items()
    }


def iteration_subset(
    n_particles: int,
    iteration: int,
    seed: int,
    subset_size: int,
    optics_group: torch.Tensor,
) -> torch.Tensor:
    """Global indices of the particles processed in ``iteration``.

    Parameters
    ----------
    n_particles
        Size of the data set.
    iteration
        1-based iteration number.
    seed
        Random seed of the run.
    subset_size
        Mini-batch size; ``< 0`` or ``≥ n_particles`` means all particles.
    optics_group
        ``(n,)`` optics group of every particle (the subset is stably sorted by it).

    Returns
    -------
    torch.Tensor
        ``(s,)`` int64 indices.
    """
    generator = torch.Generator().manual_seed(int(seed) + int(iteration))
    order = torch.randperm(n_particles, generator=generator)
    if 0 <= subset_size < n_particles:
        order = order[:subset_size]
    ranks = torch.argsort(optics_group[order], stable=True)
    return order[ranks]


class IterationSampler(Sampler[list[int]]):
    """Chunks of one iteration's particles for one DDP rank.

    Parameters
    ----------
    subset
        ``(s,)`` the iteration's particle indices (identical on every rank).
    chunk_size
        Particles per chunk.
    rank, world_size
        This process and the number of processes; rank ``r`` takes ``subset[r::world_size]``.
    """

    def __init__(
        self, subset: torch.Tensor, chunk_size: int, rank: int = 0, world_size: int = 1
    ):
        self.indices = subset[rank::world_size].tolist()
        self.chunk_size = max(1, int(chunk_size))

    def __iter__(self):
        for start in range(0, len(self.indices), self.chunk_size):
            yield self.indices[start : start + self.chunk_size]

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.chunk_size)


class _ChunkDataset(Dataset):
    """Dataset whose items are whole chunks (``dataset[list_of_indices]`` → batched dict)."""

    def __init__(self, particles: ParticleDataset) -> None:
        self.particles = particles

    def __len__(self) -> int:
        return len(self.particles)

    def __getitem__(self, indices: list[int]) -> dict:
        return self.particles.get_batch(indices)


class Class2DModule(lightning.LightningModule):
    """Reference-free 2D classification (VDAM or EM) over particle mini-batches.

    Parameters
    ----------
    settings
        Run options.
    data
        Particle-set information (sizes, groups, CTF flags).
    particles
        Dataset used to read images (initialisation and training chunks).
    initial_particle_values
        Optional per-particle starting values (``offset_y_px``, ``offset_x_px``,
        ``norm_correction``, ``psi_degrees``, ``class_index``) from the input STAR file.
    start_iteration
        Iteration of the state this module starts from (0 for a new run).
    chunk_size
        Particles per E-step chunk.
    num_workers
        DataLoader workers.
    estep_memory_mib
        Working-memory budget of one chunk's E-step in MiB, or ``"auto"`` (see
        :func:`~cryoavg.class2d.settings.estep_memory_budget_bytes`). Chunks whose
        particles would not fit are split into passes; an out-of-memory error halves the
        budget (for the rest of the run) and redoes the failed pass.
    estep_precision
        Arithmetic of the E-step's coarse-search GEMMs: ``"fp32"`` (default), ``"tf32"``
        or ``"bf16"`` (:func:`~cryoavg.class2d.estep.expectation_step`,
        docs/scaleout.md "Reduced precision").
    """

    def __init__(
        self,
        settings: Class2DSettings,
        data: DataInfo,
        particles: ParticleDataset,
        *,
        initial_particle_values: dict[str, np.ndarray] | None = None,
        start_iteration: int = 0,
        chunk_size: int = 256,
        num_workers: int = 0,
        estep_memory_mib: float | str | None = "auto",
        estep_precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.settings = settings
        self.data_info = data
        self.particles = particles
        self.start_iteration = int(start_iteration)
        self.chunk_size = int(chunk_size)
        self.num_workers = int(num_workers)
        #: the ``estep_memory_mib`` option (None = automatic)
        self.estep_memory_mib = parse_estep_memory_mib(estep_memory_mib)
        #: the E-step budget in bytes (``max_chunk_bytes``), re-measured every iteration
        self.estep_memory_bytes = estep_memory_budget_bytes(
            self.estep_memory_mib, device_type="cpu"
        )
        #: ceiling left by the out-of-memory back-off (kept for the rest of the run)
        self.estep_memory_ceiling_bytes: int | None = None
        #: number of times the back-off halved the budget
        self.estep_memory_backoffs = 0
        #: arithmetic of the coarse-search GEMMs (``estep_precision``)
        self.estep_precision = parse_estep_precision(estep_precision)
        self.state = Class2DState(
            settings.n_classes,
            data.box_size,
            data.n_optics_groups,
            data.n_groups,
            pad=settings.pad,
            sigma2_offset_angstrom2=settings.offset_prior_sigma_angstrom**2,
        )
        self.mask_radius_px = settings.mask_radius_px(
            data.box_size, data.pixel_size_angstrom
        )
        self.schedule = VdamSchedule.from_settings(settings, data.n_particles)
        n = data.n_particles
        initial = initial_particle_values or {}
        for name, dtype in PARTICLE_FIELDS.items():
            default = {"norm_correction": 1.0, "class_index": -1}.get(name, 0)
            values = torch.full((n,), default, dtype=dtype)
            if name in initial:
                values = torch.as_tensor(np.array(initial[name]), dtype=dtype)
            self.register_buffer(f"particle_{name}", values)
        self.register_buffer("initialised", torch.tensor(start_iteration > 0))
        self.register_buffer("perturbation", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("completed_iteration", torch.tensor(int(start_iteration)))
        # per-iteration working data (not checkpointed)
        self._stats: Class2DStatistics | None = None
        self._subset: torch.Tensor | None = None
        self._results: dict[str, torch.Tensor] = {}
        self._position: torch.Tensor | None = None
        self.last_report: StepReport | None = None
        self.last_changes: dict[str, float] = {}
        #: where the particles came from (set by the job; stored in checkpoints so that
        #: ``continue_from=last.ckpt`` finds them again)
        self.run_info: dict = {}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def iteration(self) -> int:
        """The iteration the current epoch runs (1-based)."""
        return self.start_iteration + int(self.current_epoch) + 1

    @property
    def n_iterations(self) -> int:
        """Last iteration of the run."""
        return self.settings.n_iterations

    def subset_size(self, iteration: int) -> int:
        """Particles processed in ``iteration`` (−1 = all)."""
        if not self.settings.is_vdam:
            return -1
        return self.schedule.subset_size(iteration)

    def is_write_iteration(self, iteration: int) -> bool:
        """Whether the RELION files are written after ``iteration``."""
        every = self.settings.write_every
        return iteration % every == 0 or iteration == self.n_iterations

    # ------------------------------------------------------------------ Lightning hooks
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the settings and the particle source with the checkpoint."""
        checkpoint["cryoavg_class2d"] = {
            **self.run_info,
            "settings": self.settings.as_dict(),
            "completed_iteration": int(self.completed_iteration),
        }

    def configure_optimizers(self):
        """The M-step optimizer of the chosen algorithm."""
        if self.settings.is_vdam:
            return VdamOptimizer(
                self.state,
                self.settings,
                mask_radius_px=self.mask_radius_px,
                schedule=self.schedule,
            )
        return EmOptimizer(
            self.state, self.settings, mask_radius_px=self.mask_radius_px
        )

    def train_dataloader(self) -> DataLoader:
        """The chunks of this epoch's iteration for this rank."""
        iteration = self.iteration
        self._subset = iteration_subset(
            self.data_info.n_particles,
            iteration,
            self.settings.seed,
            self.subset_size(iteration),
            self.data_info.optics_group,
        )
        rank = self.trainer.global_rank if self._trainer is not None else 0
        world = self.trainer.world_size if self._trainer is not None else 1
        # a chunk's images are moved to the device at once: keep them within the budget
        chunk = particles_per_pass(
            self.estep_memory_bytes,
            prepare_bytes_per_particle(self.data_info.box_size),
            self.chunk_size,
        )
        sampler = IterationSampler(self._subset, chunk, rank, world)
        return DataLoader(
            _ChunkDataset(self.particles),
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def on_fit_start(self) -> None:
        """Initialise the model (iteration 0) unless it was restored."""
        if not bool(self.initialised):
            self.initialise_model()

    @torch.no_grad()
    def initialise_model(self) -> None:
        """Noise spectra and initial class images from the first particles (§A.4)."""
        info, settings = self.data_info, self.settings
        per_group = 1000
        chosen: list[int] = []
        for g in range(info.n_optics_groups):
            members = (info.optics_group == g).nonzero().flatten()[:per_group]
            chosen.extend(members.tolist())
        if len(chosen) < 5 * settings.n_classes:
            chosen = list(
                range(min(info.n_particles, max(len(chosen), 5 * settings.n_classes)))
            )
        chosen = sorted(set(chosen))
        batch = self.particles.get_batch(chosen)
        images = batch["image"].to(self.device, torch.float32)
        ctf = None
        if settings.do_ctf and info.has_ctf:
            ctf = self._ctf(batch).to(self.device)
        counts = torch.bincount(info.group, minlength=info.n_groups).to(
            self.state.scale
        )
        initialise_state(
            self.state,
            images,
            batch["optics_group"].to(self.device),
            pixel_size=info.pixel_size_angstrom,
            mask_radius_px=self.mask_radius_px,
            tau2_fudge=1.0 if settings.is_vdam else settings.tau2_fudge,
            seed=settings.seed,
            n_particles=info.n_particles,
            ctf=ctf,
            soft_edge_px=settings.mask_edge_px,
            zero_mask=settings.zero_mask,
            scale_group_particle_count=counts,
        )
        self.initialised.fill_(True)

    def on_train_epoch_start(self) -> None:
        """Set up the iteration: grids, pixel sets, projector and empty statistics."""
        iteration, state, settings = self.iteration, self.state, self.settings
        generator = torch.Generator().manual_seed(settings.seed * 1000003 + iteration)
        perturbation = next_perturbation(
            float(self.perturbation), 0.5, generator=generator
        )
        self.perturbation.fill_(perturbation)
        self.psi_grid = PsiGrid.build(
            settings.psi_step_degrees, perturbation=perturbation
        )
        self.translation_grid = TranslationGrid.build(
            settings.offset_range_px, settings.offset_step_px, perturbation=perturbation
        )
        box = self.data_info.box_size
        current = int(state.current_size)
        if settings.highres_limit_angstrom > 0:
            strict = 2 * round(
                box
                * self.data_info.pixel_size_angstrom
                / settings.highres_limit_angstrom
            )
            current = max(2, min(current, strict))
        self.current_size = current
        self.coarse_size = min(
            current,
            coarse_image_size(
                box,
                self.data_info.pixel_size_angstrom,
                2 * self.mask_radius_px * self.data_info.pixel_size_angstrom,
                settings.psi_step_coarse_degrees,
                current,
                strict_highres_exp=settings.highres_limit_angstrom
                if settings.highres_limit_angstrom > 0
                else None,
            ),
        )
        self.pixel_set = PixelSet.for_size(box, current, device=self.device)
        self.projector = ClassProjector(
            state.class_images.detach(), pad=settings.pad, r_max=current / 2
        )
        self._stats = Class2DStatistics.zeros(
            n_classes=settings.n_classes,
            box_size=box,
            n_optics_groups=self.data_info.n_optics_groups,
            n_groups=self.data_info.n_groups,
            pad=settings.pad,
            device=self.device,
        )
        subset = (
            self._subset
            if self._subset is not None
            else torch.zeros(0, dtype=torch.int64)
        )
        self._position = torch.full(
            (self.data_info.n_particles,), -1, dtype=torch.int64
        )
        self._position[subset] = torch.arange(subset.numel())
        self._results = {
            name: torch.zeros(subset.numel(), dtype=dtype)
            for name, dtype in PARTICLE_FIELDS.items()
        }
        self._results["seen"] = torch.zeros(subset.numel(), dtype=torch.int64)
        self.noise_generator = torch.Generator().manual_seed(
            settings.seed * 7919 + iteration
        )
        if self.is_accuracy_iteration(iteration):
            self.estimate_accuracies(subset[:10], iteration)
        # the reference tables first (the largest allocations that do not scale with the
        # chunk), then the budget from the memory left
        self._retrying(self._prepare_tables)
        self.estep_memory_bytes = self._measure_estep_budget()

    def _prepare_tables(self) -> None:
        prepare_estep_tables(
            self.projector,
            self.psi_grid,
            self.translation_grid,
            self.pixel_set,
            coarse_size=self.coarse_size,
            max_chunk_bytes=self.estep_memory_bytes,
            precision=self.estep_precision,
        )

    # ------------------------------------------------------------------ memory budget
    def _measure_estep_budget(self) -> int:
        """The E-step budget of this iteration (bytes), under the back-off ceiling."""
        device = self.device
        free = None
        if device.type == "cuda" and self.estep_memory_mib is None:
            driver_free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
                device
            )
            free = int(driver_free) + max(0, int(cached))
        budget = estep_memory_budget_bytes(
            self.estep_memory_mib, device_type=device.type, free_bytes=free
        )
        if self.estep_memory_ceiling_bytes is not None:
            budget = min(budget, self.estep_memory_ceiling_bytes)
        log.debug("E-step memory budget: %.1f MiB", budget / MIB)
        return budget

    def _retrying(self, attempt: Callable[[], _T]) -> _T:
        """``attempt()``, redone with half the budget after each out-of-memory error.

        ``attempt`` must read :attr:`estep_memory_bytes` when it runs and change nothing
        outside itself before it can no longer fail (or be resumable).
        """
        while True:
            try:
                return attempt()
            except OutOfMemoryError as error:
                reason = " ".join(str(error).split())
            # outside the handler: the traceback, and with it the failed attempt's
            # tensors, is released before the cache is emptied
            self._back_off(reason)

    def _back_off(self, reason: str) -> None:
        """Halve the E-step budget after an out-of-memory error (or give up)."""
        device = self.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        old = self.estep_memory_bytes
        new = backed_off_budget(old)
        short = ". ".join(reason.split(". ")[:2])[:160]
        if new is None:
            raise EStepMemoryError(
                f"out of memory in the Class2D E-step on {device} (iteration "
                f"{self.iteration}) even with a working-memory budget of "
                f"{old / MIB:.2f} MiB ({short}); free memory on the device or lower "
                "classes, the box size or data.chunk_size"
            )
        self.estep_memory_bytes = new
        self.estep_memory_ceiling_bytes = new
        self.estep_memory_backoffs += 1
        log.warning(
            "E-step out of memory on %s with a %.2f MiB budget; redoing the chunk with "
            "%.2f MiB (%s)",
            device,
            old / MIB,
            new / MIB,
            short,
        )

    def is_accuracy_iteration(self, iteration: int) -> bool:
        """Whether ``iteration`` re-estimates the per-class accuracies (§A.5 step 5).

        EM: every iteration. VDAM: iterations ≤ 1, every 10th and the last.
        """
        if not self.settings.is_vdam:
            return True
        return iteration <= 1 or iteration % 10 == 0 or iteration == self.n_iterations

    @torch.no_grad()
    def estimate_accuracies(self, particles: torch.Tensor, iteration: int) -> None:
        """Expected rotational/translational accuracy per class (§A.10.2).

        Parameters
        ----------
        particles
            ``(n,)`` the trial particles (the first ten of the iteration's order).
        iteration
            Seeds the random choice of the shift axis.
        """
        if particles.numel() == 0:
            return
        batch = self.particles.get_batch(particles)
        settings, state = self.settings, self.state
        ctf = self._ctf(batch) if settings.do_ctf and self.data_info.has_ctf else None
        optics = batch["optics_group"].to(torch.int64)
        generator = torch.Generator().manual_seed(settings.seed * 31337 + iteration)
        along_x = torch.rand(particles.numel(), generator=generator) < 0.5
        rotations, translations = expected_accuracies(
            self.projector,
            self.pixel_set,
            psi_degrees=self.particle_psi_degrees[particles],
            sigma2_noise=state.sigma2_noise.detach()[optics.to(self.device)],
            ctf=ctf,
            shift_along_x=along_x,
            class_prior=state.class_prior,
            pixel_size_angstrom=self.data_info.pixel_size_angstrom,
        )
        state.accuracy_rotations_degrees.copy_(rotations)
        state.accuracy_translations_angstrom.copy_(translations)

    def _ctf(self, batch: dict) -> torch.Tensor:
        premultiplied = self.data_info.ctf_premultiplied[batch["optics_group"]]
        params = {key: value.to(self.device) for key, value in batch["ctf"].items()}
        return ctf_images(
            params,
            self.data_info.box_size,
            premultiplied=premultiplied.to(self.device),
            intact_first_peak=self.settings.ctf_intact_first_peak,
        )

    @torch.no_grad()
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """E-step of one chunk: preprocess, score all poses, accumulate statistics.

        The chunk is prepared in parts and scored in passes whose working memory fits
        :attr:`estep_memory_bytes` (usually one of each). An out-of-memory error halves
        the budget and redoes the step that failed: preparing (from the same state of the
        background-noise generator), scoring (nothing is added to the statistics before
        it succeeded) or adding (resumed where it stopped), so the sums are those of a run
        without the error (up to the order of summation when the halved budget splits
        the work differently; with ``zero_mask=false`` a part prepared in smaller pieces
        draws its background noise in another order).
        """
        n = int(batch["index"].shape[0])
        start = 0
        while start < n:
            state = self.noise_generator.get_state()
            count, prepared = self._retrying(
                functools.partial(self._prepare_particles, batch, start, state)
            )
            self._score_particles(prepared, batch["index"][start : start + count])
            start += count

    def _prepare_particles(
        self, batch: dict, start: int, noise_state: torch.Tensor
    ) -> tuple[int, EStepBatch]:
        """E-step inputs of particles ``start:start+count`` of the chunk (count, batch)."""
        settings, state = self.settings, self.state
        self.noise_generator.set_state(noise_state)
        count = particles_per_pass(
            self.estep_memory_bytes,
            prepare_bytes_per_particle(self.data_info.box_size),
            int(batch["index"].shape[0]) - start,
        )
        whole = start == 0 and count == int(batch["index"].shape[0])
        part = batch if whole else _chunk_rows(batch, start, start + count)
        index = part["index"].to(torch.int64)
        offsets = torch.stack(
            [self.particle_offset_y_px[index], self.particle_offset_x_px[index]], dim=1
        )
        ctf = self._ctf(part) if settings.do_ctf and self.data_info.has_ctf else None
        prepared = prepare_estep_batch(
            part["image"].to(self.device),
            index=index.to(self.device),
            optics_group=part["optics_group"].to(self.device, torch.int64),
            group=part["group"].to(self.device, torch.int64),
            offset_px=offsets.to(self.device),
            norm_correction=self.particle_norm_correction[index].to(self.device),
            ctf=ctf,
            sigma2_noise=state.sigma2_noise.detach(),
            scale=state.scale.detach()
            if settings.do_scale
            else torch.ones_like(state.scale),
            avg_norm=float(state.avg_norm),
            pixel_set=self.pixel_set,
            mask_radius_px=self.mask_radius_px,
            mask_edge_px=settings.mask_edge_px,
            zero_mask=settings.zero_mask,
            do_norm=settings.do_norm,
            noise_generator=self.noise_generator,
        )
        return count, prepared

    def _score_particles(self, prepared: EStepBatch, index: torch.Tensor) -> None:
        """E-step and statistics of prepared particles, in passes that fit the budget."""
        index = index.to(torch.int64)
        n = prepared.n_particles
        start = 0
        while start < n:
            count, result, update = self._retrying(
                functools.partial(self._score_pass, prepared, start)
            )
            rows = index[start : start + count]
            check_particle_values(
                {
                    "log-likelihood": result.log_likelihood,
                    "norm correction": update.norm_correction,
                    "offset": result.best_offset_px,
                },
                rows,
                names=lambda: self.particles.table.image_names,
                iteration=self.iteration,
            )
            self._retrying(functools.partial(self._apply_update, update))
            self._record(rows, result, update.norm_correction)
            start += count

    def _score_pass(self, prepared: EStepBatch, start: int) -> tuple:
        """E-step and statistics update of one pass (nothing is added yet)."""
        settings, state = self.settings, self.state
        budget = self.estep_memory_bytes
        n_significant = settings.effective_max_significant or 5 * settings.n_classes
        count = particles_per_pass(
            budget,
            estep_bytes_per_particle(self.pixel_set.n_pixels, n_significant),
            prepared.n_particles - start,
        )
        part = (
            prepared
            if count == prepared.n_particles
            else prepared.rows(start, start + count)
        )
        result = expectation_step(
            part,
            self.projector,
            self.psi_grid,
            self.translation_grid,
            self.pixel_set,
            class_prior=state.class_prior,
            class_offset_prior_angstrom=state.class_offset_prior_angstrom,
            sigma2_offset_angstrom2=state.sigma2_offset_angstrom2,
            pixel_size=self.data_info.pixel_size_angstrom,
            coarse_size=self.coarse_size,
            max_significant=settings.effective_max_significant or -1,
            adaptive_fraction=settings.adaptive_fraction,
            max_chunk_bytes=budget,
            precision=self.estep_precision,
        )
        update = statistics_update(
            part,
            result,
            self.projector,
            self.psi_grid,
            self.translation_grid,
            self.pixel_set,
            self._stats,
            mode="vdam" if settings.is_vdam else "em",
            class_offset_prior_angstrom=state.class_offset_prior_angstrom,
            pixel_size=self.data_info.pixel_size_angstrom,
            ssnr=state.ssnr,
            avg_norm=float(state.avg_norm),
            max_chunk_bytes=budget,
        )
        return count, result, update

    def _apply_update(self, update: StatisticsUpdate) -> None:
        update.apply_to(
            self._stats, self.projector, max_chunk_bytes=self.estep_memory_bytes
        )

    def _record(
        self, index: torch.Tensor, result, norm_correction: torch.Tensor
    ) -> None:
        """Store the per-particle results (and new norm corrections) of ``index``."""
        position = self._position[index.cpu()]
        values = {
            "class_index": result.best_class,
            "psi_degrees": result.best_psi_degrees,
            "offset_y_px": result.best_offset_px[:, 0],
            "offset_x_px": result.best_offset_px[:, 1],
            "norm_correction": norm_correction,
            "log_likelihood": result.log_likelihood,
            "pmax": result.pmax,
            "n_significant": result.n_significant,
        }
        for name, value in values.items():
            self._results[name][position] = (
                value.detach().cpu().to(PARTICLE_FIELDS[name])
            )
        self._results["seen"][position] = 1

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        """Sum over ranks, M-step, and store the per-particle results."""
        iteration = self.iteration
        stats = self._stats
        if stats is None:
            return
        stats.all_reduce()
        self._all_reduce_results()
        subset = self._subset
        seen = self._results["seen"] > 0
        rows = subset[seen]
        previous_class = self.particle_class_index[rows].clone()
        previous_psi = self.particle_psi_degrees[rows].clone()
        previous_offset = torch.stack(
            [self.particle_offset_y_px[rows], self.particle_offset_x_px[rows]], 1
        ).clone()
        for name in PARTICLE_FIELDS:
            getattr(self, f"particle_{name}")[rows] = self._results[name][seen]
        optimizer = self.optimizers()
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.last_report = inner.step(stats=stats, iteration=iteration)
        check_class_images(self.state.class_images.detach(), iteration=iteration)
        self.completed_iteration.fill_(iteration)
        self.last_changes = self._changes(
            rows, previous_class, previous_psi, previous_offset
        )
        n = max(int(seen.sum()), 1)
        metrics = {
            "train/log_likelihood": float(self.particle_log_likelihood[rows].sum()),
            "train/log_likelihood_per_particle": float(
                self.particle_log_likelihood[rows].sum()
            )
            / n,
            "train/average_pmax": float(self.particle_pmax[rows].float().mean())
            if rows.numel()
            else 0.0,
            "train/step_size": self.last_report.step_size,
            "train/tau2_fudge": self.last_report.tau2_fudge,
            "train/subset_size": float(rows.numel()),
            "train/current_size": float(self.state.current_size),
            "train/changes_classes": self.last_changes.get("classes", 0.0),
        }
        # every rank holds the same (all-reduced) values; sync_dist averages identical
        # numbers and keeps Lightning from warning about unsynchronised epoch metrics
        self.log_dict(
            metrics, on_step=False, on_epoch=True, prog_bar=False, sync_dist=True
        )
        self._stats = None

    def _all_reduce_results(self) -> None:
        """Sum the per-particle results of this iteration over DDP ranks."""
        if not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            return
        for name, tensor in self._results.items():
            reduced = tensor.to(self.device)
            if reduced.dtype == torch.int64 and reduced.device.type == "cpu":
                torch.distributed.all_reduce(reduced)
            else:
                torch.distributed.all_reduce(reduced)
            self._results[name] = reduced.cpu()

    def _changes(
        self,
        rows: torch.Tensor,
        previous_class: torch.Tensor,
        previous_psi: torch.Tensor,
        previous_offset: torch.Tensor,
    ) -> dict[str, float]:
        """RELION's 'changes' figures over the processed particles."""
        if rows.numel() == 0:
            return {}
        had = previous_class >= 0
        classes = (self.particle_class_index[rows] != previous_class)[had].float()
        dpsi = (self.particle_psi_degrees[rows] - previous_psi + 180) % 360 - 180
        offset = torch.stack(
            [self.particle_offset_y_px[rows], self.particle_offset_x_px[rows]], 1
        )
        doff = (offset - previous_offset)[had] * self.data_info.pixel_size_angstrom
        return {
            "classes": float(classes.mean()) if classes.numel() else 1.0,
            "orientations_degrees": float(dpsi[had].abs().mean())
            if had.any()
            else 999.0,
            "offsets_angstrom": float(doff.square().mean().sqrt())
            if had.any()
            else 999.0,
        }
