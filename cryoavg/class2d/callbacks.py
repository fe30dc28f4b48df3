"""Lightning callbacks of Class2D: RELION files, TensorBoard images and the final gallery.

:class:`RelionWriter` is a Lightning ``Checkpoint`` callback, so it runs after the module's
``on_train_epoch_end`` (the M-step) and writes ``run_itNNN_*`` files on global rank 0 only.
The ``_optimiser.star`` of an iteration is written last: its presence marks a complete
iteration that ``continue_from`` can resume from.
"""

import logging
from pathlib import Path

import lightning
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Checkpoint

from cryoavg.class2d.export import IterationChanges, SamplingInfo, write_iteration
from cryoavg.class2d.gallery import class_gallery_image, write_class_gallery_png
from cryoavg.class2d.mstep import estimated_resolution_angstrom
from cryoavg.io.atomic import atomic_path
from cryoavg.io.particles import ParticleTable

log = logging.getLogger("cryoavg")


def particles_with_results(table: ParticleTable, module) -> pd.DataFrame:
    """The input particle table with the current per-particle results of ``module``.

    Adds or updates RELION's columns (§B.4): rlnAngleRot/Tilt (0 if absent), rlnAnglePsi,
    rlnOriginXAngst/YAngst, rlnClassNumber (1-based; 0 = not yet assigned), rlnNormCorrection,
    rlnLogLikeliContribution, rlnMaxValueProbDistribution, rlnNrOfSignificantSamples,
    rlnGroupNumber.
    """
    frame = table.particles.copy()
    pixel = np.asarray(table.pixel_size_angstrom, dtype=np.float64)
    n = len(frame)
    for label in ("rlnAngleRot", "rlnAngleTilt"):
        if label not in frame:
            frame[label] = np.zeros(n)
    frame["rlnAnglePsi"] = module.particle_psi_degrees.double().numpy()
    frame["rlnOriginXAngst"] = module.particle_offset_x_px.double().numpy() * pixel
    frame["rlnOriginYAngst"] = module.particle_offset_y_px.double().numpy() * pixel
    frame = frame.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in frame])
    frame["rlnClassNumber"] = module.particle_class_index.numpy().astype(np.int64) + 1
    frame["rlnNormCorrection"] = module.particle_norm_correction.double().numpy()
    frame["rlnLogLikeliContribution"] = module.particle_log_likelihood.double().numpy()
    frame["rlnMaxValueProbDistribution"] = module.particle_pmax.double().numpy()
    frame["rlnNrOfSignificantSamples"] = module.particle_n_significant.numpy().astype(
        np.int64
    )
    frame["rlnGroupNumber"] = (
        np.asarray(table.micrograph_group_index, dtype=np.int64) + 1
    )
    return frame


class RelionWriter(Checkpoint):
    """Write the RELION files of iteration 0, every ``write_every`` iterations and the last.

    Parameters
    ----------
    root
        Output root, e.g. ``Class2D/job013/run`` (files ``run_itNNN_*``).
    table
        The input particles.
    command_line
        Written as the second line of every ``_optimiser.star``.
    write_tensorboard
        Also log a class gallery image to TensorBoard at each written iteration.
    """

    def __init__(
        self,
        root: Path,
        table: ParticleTable,
        command_line: str,
        *,
        write_tensorboard: bool = True,
        checkpoint_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.table = table
        self.command_line = command_line
        self.write_tensorboard = write_tensorboard
        self.checkpoint_path = checkpoint_path
        self.written: list[int] = []

    def on_train_start(self, trainer: lightning.Trainer, pl_module) -> None:
        """Write iteration 0 of a new run (after initialisation)."""
        if pl_module.start_iteration == 0 and int(pl_module.completed_iteration) == 0:
            self._write(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module) -> None:
        """Write the iteration just completed by the module's M-step, if it is due."""
        iteration = int(pl_module.completed_iteration)
        if (
            iteration > 0
            and pl_module.is_write_iteration(iteration)
            and iteration not in self.written
        ):
            self._write(trainer, pl_module, iteration)

    def _write(self, trainer: lightning.Trainer, pl_module, iteration: int) -> None:
        if trainer.is_global_zero:
            self.write_files(pl_module, iteration)
            if self.write_tensorboard and trainer.logger is not None:
                self._log_images(trainer, pl_module, iteration)
        if self.checkpoint_path is not None and iteration > 0:
            if trainer.is_global_zero:
                # Lightning's own "atomic" save moves a temporary file from the system
                # temp directory: a copy, not a rename, across file systems, and not
                # fsync-ed. Publish it with our write-fsync-rename instead.
                with atomic_path(self.checkpoint_path) as temp:
                    trainer.save_checkpoint(temp, weights_only=False)
            else:  # the other ranks take part in the collective save, rank 0 writes
                trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
        trainer.strategy.barrier("relion_writer")
        self.written.append(iteration)

    def write_files(self, pl_module, iteration: int) -> None:
        """Write ``run_itNNN_*`` for ``iteration`` (rank 0)."""
        settings = pl_module.settings
        table = self.table
        info = pl_module.data_info
        sampling = SamplingInfo.from_settings(
            settings, perturbation=float(pl_module.perturbation)
        )
        changes_values = pl_module.last_changes or {}
        changes = (
            IterationChanges(
                orientations_degrees=changes_values.get("orientations_degrees", 999.0),
                offsets_angstrom=changes_values.get("offsets_angstrom", 999.0),
                classes=changes_values.get("classes", 1.0),
            )
            if iteration > 0
            else None
        )
        counts = np.bincount(
            np.asarray(table.micrograph_group_index), minlength=info.n_groups
        )
        report = pl_module.last_report
        unmasked = None
        if iteration > 0 and report is not None and not settings.is_vdam:
            unmasked = report.unmasked_class_images
        write_iteration(
            self.root,
            iteration,
            state=pl_module.state,
            particles=particles_with_results(table, pl_module),
            optics=table.optics_table()
            if hasattr(table, "optics_table")
            else table.optics,
            group_names=list(table.group_names),
            group_particle_counts=counts,
            settings=settings,
            sampling=sampling if iteration > 0 else None,
            command_line=self.command_line,
            pixel_size_angstrom=info.pixel_size_angstrom,
            n_particles_total=info.n_particles,
            changes=changes,
            subset_size=pl_module.subset_size(iteration) if iteration > 0 else None,
            input_columns=list(table.particles.columns),
            unmasked_class_images=unmasked,
            accuracy_rotations_degrees=pl_module.state.accuracy_rotations_degrees,
            accuracy_translations_angstrom=pl_module.state.accuracy_translations_angstrom,
        )
        log.info("iteration %03d written: %s_it%03d_*", iteration, self.root, iteration)

    def _log_images(
        self, trainer: lightning.Trainer, pl_module, iteration: int
    ) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        state = pl_module.state
        resolution = estimated_resolution_angstrom(
            state.ssnr,
            pl_module.data_info.box_size,
            pl_module.data_info.pixel_size_angstrom,
        )
        image = class_gallery_image(
            state.class_images.detach().cpu(),
            state.class_prior.detach().cpu(),
            resolution.cpu(),
        )
        experiment.add_image(
            "classes/gallery", image, global_step=iteration, dataformats="HW"
        )
        experiment.add_histogram(
            "classes/distribution",
            state.class_prior.detach().cpu(),
            global_step=iteration,
        )
        finite = torch.where(torch.isfinite(resolution), resolution, torch.nan)
        for k, value in enumerate(finite.tolist()):
            if value == value:  # not NaN
                experiment.add_scalar(
                    f"resolution_angstrom/class_{k + 1:03d}", value, iteration
                )

    def on_train_end(self, trainer: lightning.Trainer, pl_module) -> None:
        """PNG gallery of the final classes, sorted by size (rank 0)."""
        if not trainer.is_global_zero:
            return
        state = pl_module.state
        resolution = estimated_resolution_angstrom(
            state.ssnr,
            pl_module.data_info.box_size,
            pl_module.data_info.pixel_size_angstrom,
        )
        counts = torch.bincount(
            pl_module.particle_class_index.clamp_min(0),
            minlength=pl_module.settings.n_classes,
        )
        write_class_gallery_png(
            self.root.parent / "classes_gallery.png",
            state.class_images.detach().cpu(),
            counts.cpu(),
            resolution.cpu(),
            title=f"{self.root.parent} iteration {int(pl_module.completed_iteration)}",
        )

    # Checkpoint API (nothing to restore: the files on disk are the record)
    def state_dict(self) -> dict:
        """Iterations written so far."""
        return {"written": list(self.written)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the list of written iterations."""
        self.written = list(state_dict.get("written", []))
