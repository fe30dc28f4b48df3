r"""``cryoavg refine3d``: gold-standard 3D refinement (RELION Refine3D-like; VDAM or EM).

Example::

    cryoavg refine3d particles=Extract/job012/particles.star reference=ref.mrc \\
        output=Refine3D/job020 local_symmetry=localsym-3s13m.star tau2_fudge=13 \\
        particle_diameter=200

Continue: ``cryoavg refine3d continue_from=Refine3D/job020/run_it003_optimiser.star
iterations=6``. Everything is checked before the job directory is created, so bad input
(reference of the wrong box or pixel size, masks/operators of another pixel size, an
empty half set, ...) gives one ``error:`` line and leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from cryoavg.cli._configs import config_dir
from cryoavg.cli._jobs import check_config_types, job_directory, run_job
from cryoavg.errors import ConfigError, InputError
from cryoavg.io.mrc import read_map_3d
from cryoavg.io.particles import ParticleTable, read_particles
from cryoavg.io.stack import ImageSource
from cryoavg.io.validate import check_text_columns

log = logging.getLogger("cryoavg")


#: the type of every scalar key (checked first: one clear line for iterations=abc)
CONFIG_TYPES: dict[str, type] = {
    **dict.fromkeys(
        (
            "iterations",
            "global_iterations",
            "max_significant",
            "subset_size",
            "seed",
            "chunk_size",
            "local_symmetry_oversampling",
        ),
        int,
    ),
    **dict.fromkeys(
        (
            "tau2_fudge",
            "particle_diameter",
            "angular_step",
            "min_angular_step",
            "offset_range",
            "offset_step",
            "initial_lowpass",
            "adaptive_fraction",
            "grad_stepsize",
            "mu",
            "pixel_size",
        ),
        float,
    ),
    **dict.fromkeys(
        ("firstiter_cc", "ctf", "scale", "preread", "logger.enabled"), bool
    ),
    **dict.fromkeys(
        (
            "algorithm",
            "particles",
            "reference",
            "output",
            "local_symmetry",
            "continue_from",
            "project_dir",
        ),
        str,
    ),
}
OPTIONAL_KEYS = (
    "subset_size",
    "particle_diameter",
    "pixel_size",
    "particles",
    "reference",
    "output",
    "local_symmetry",
    "continue_from",
    "project_dir",
)


def _path(value: Any) -> str | None:
    """A file name from the config as text; ``None`` for null or empty."""
    return None if value in (None, "") else str(value)


def settings_from_config(cfg: DictConfig):
    """:class:`~cryoavg.recon.refine.RefineSettings` from the job config (validated)."""
    from cryoavg.recon.refine import RefineSettings

    settings = RefineSettings(
        n_iterations=int(cfg.iterations),
        algorithm=str(cfg.algorithm).lower(),
        tau2_fudge=float(cfg.tau2_fudge),
        particle_diameter_angstrom=None
        if cfg.particle_diameter is None
        else float(cfg.particle_diameter),
        angular_step_degrees=float(cfg.angular_step),
        min_angular_step_degrees=float(cfg.min_angular_step),
        global_iterations=int(cfg.global_iterations),
        offset_range_px=float(cfg.offset_range),
        offset_step_px=float(cfg.offset_step),
        initial_lowpass_angstrom=float(cfg.initial_lowpass),
        firstiter_cc=bool(cfg.firstiter_cc),
        adaptive_fraction=float(cfg.adaptive_fraction),
        max_significant=int(cfg.max_significant),
        grad_stepsize=float(cfg.grad_stepsize),
        mu=float(cfg.mu),
        subset_size=None if cfg.subset_size is None else int(cfg.subset_size),
        do_ctf=bool(cfg.ctf),
        do_scale=bool(cfg.scale),
        seed=int(cfg.seed),
        chunk_size=int(cfg.chunk_size),
        local_symmetry_oversampling=int(cfg.local_symmetry_oversampling),
    )
    settings.validate()
    return settings


def load_reference(path: str, box: int, pixel: float) -> torch.Tensor:
    """Read the reference map and check it against the particles' box and pixel size."""
    data, header_pixel = read_map_3d(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, f"reference must be a cubic map, got {data.shape}")
    if data.shape[0] != box:
        raise InputError(
            path,
            f"reference box {data.shape[0]} px differs from the particles' {box} px",
        )
    if header_pixel is not None and abs(header_pixel - pixel) > 0.01 * pixel:
        raise InputError(
            path,
            f"reference pixel size {header_pixel:.4f} Å differs from the particles' "
            f"{pixel:.4f} Å",
        )
    if not np.all(np.isfinite(data)):
        raise InputError(path, "reference contains NaN or infinite values")
    if float(np.abs(data).max()) == 0.0:
        raise InputError(path, "reference map is all zero")
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def load_local_symmetry(path: str, box: int, pixel: float, oversampling: int = 2):
    """Masks and operators of ``local_symmetry=...`` (checked against box and pixel),
    imposed on a grid ``oversampling`` times finer (1 = RELION's trilinear).
    """
    from cryoavg.localsym.apply import check_operators_in_sphere
    from cryoavg.localsym.io import load_masks, read_mask_info
    from cryoavg.localsym.operators import operators_to_tensors
    from cryoavg.recon.refine import LocalSymmetry

    if not Path(path).is_file():
        raise InputError(path, "file not found (local_symmetry)")
    groups = read_mask_info(path)
    if not groups:
        raise InputError(path, "no masks/operators in the local symmetry file")
    notes: list[str] = []
    masks = load_masks(groups, (box,) * 3, pixel, notes)
    for note in notes:
        log.warning(note)
    operators = []
    for group, mask in zip(groups, masks, strict=True):
        matrices, translations = operators_to_tensors(
            group.operators, pixel, torch.float64
        )
        bad = check_operators_in_sphere(mask, matrices, translations)
        if bad:
            raise InputError(
                path,
                f"an operator of mask {group.mask_name} moves the masked region out of "
                f"the {box}-px box at {pixel:.4f} Å/px (operators made for another "
                "pixel size or box?)",
            )
        operators.append((matrices.float(), translations.float()))
    return LocalSymmetry(
        masks=[m.float() for m in masks],
        operators=operators,
        oversampling=int(oversampling),
    )


def _refine_data(table: ParticleTable, source: ImageSource, halves: np.ndarray):
    from cryoavg.recon.refine import RefineData

    n = table.n_particles
    ctf = None
    if table.has_ctf:
        ctf = {
            k: torch.tensor(np.asarray(v, dtype=np.float32))
            for k, v in table.ctf_parameters().items()
        }
    premult_groups = np.asarray(table.ctf_premultiplied, dtype=bool).reshape(-1)
    optics = np.asarray(table.optics_group_index, dtype=np.int64)
    return RefineData(
        read_images=lambda idx: torch.from_numpy(
            np.asarray(source.images(np.asarray(idx)), dtype=np.float32)
        ),
        n_particles=n,
        box_size=int(source.box_size),
        pixel_size_angstrom=float(np.asarray(table.pixel_size_angstrom)[0]),
        halves=torch.as_tensor(halves, dtype=torch.int64),
        optics_group=torch.tensor(optics),
        group=torch.as_tensor(
            np.asarray(table.micrograph_group_index), dtype=torch.int64
        ),
        ctf_parameters=ctf,
        ctf_premultiplied=torch.tensor(premult_groups[optics]),
    )


def _initial_poses(table: ParticleTable, pixel: float):
    frame = table.particles

    def numbers(columns: list[str]) -> np.ndarray:  # text: NaN, refused below
        table = frame[columns].apply(pd.to_numeric, errors="coerce")
        return table.to_numpy(np.float64, copy=True)

    angles = None
    if all(c in frame for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        angles = torch.as_tensor(
            numbers(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
        )
    offsets = None
    if "rlnOriginXAngst" in frame and "rlnOriginYAngst" in frame:
        offsets = torch.as_tensor(
            numbers(["rlnOriginYAngst", "rlnOriginXAngst"]) / pixel
        )
    for name, value in (("angles", angles), ("origins", offsets)):
        if value is not None and not bool(torch.isfinite(value).all()):
            raise InputError(table.path, f"non-finite particle {name}")
    return angles, offsets


def _tensorboard(job_dir: Path, enabled: bool):
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(job_dir / "tensorboard"))


def _log_tensorboard(writer, state, pixel: float) -> None:
    if writer is None:
        return
    it = state.iteration
    writer.add_scalar("resolution_angstrom", state.resolution_angstrom, it)
    writer.add_scalar("ave_pmax", state.ave_pmax, it)
    writer.add_scalar(
        "angular_step_degrees", state.history[-1]["angular_step_degrees"], it
    )
    for shell, value in enumerate(state.fsc.tolist()):
        writer.add_scalar(f"fsc/iteration_{it:03d}", value, shell)
    volume = state.references[0] if state.final_map is None else state.final_map
    c = volume.shape[0] // 2
    slices = torch.cat([volume[c], volume[:, c], volume[:, :, c]], dim=1)
    lo, hi = float(slices.min()), float(slices.max())
    image = (slices - lo) / max(hi - lo, 1e-12)
    writer.add_image("central_slices_zyx", image[None], it)
    writer.flush()


def run_refine3d(cfg: DictConfig) -> dict[str, Any]:
    """Run a Refine3D job (testable entry point).

    Returns
    -------
    dict
        ``job_dir``, ``state``, ``resolution_angstrom``, ``paths`` (final files).
    """
    from cryoavg.recon.halves import half_sets
    from cryoavg.recon.refine import RefineSettings, initial_state, refine_iteration
    from cryoavg.recon.refine_outputs import (
        read_continuation,
        write_final,
        write_iteration,
    )

    check_config_types(cfg, CONFIG_TYPES, optional=OPTIONAL_KEYS)
    # file names as text (a number such as particles=-1 is a name too)
    continue_from, project_dir = _path(cfg.continue_from), _path(cfg.project_dir)
    continuation = None
    if continue_from:
        continuation = read_continuation(Path(continue_from))
        settings = RefineSettings(**continuation["settings"])
        settings.n_iterations = int(cfg.iterations)
        settings.validate()
        extra = continuation["extra"]
        particles = _path(cfg.particles) or extra.get("particles")
        local_symmetry_path = extra.get("local_symmetry")
        if settings.n_iterations <= continuation["state"].iteration:
            raise ConfigError(
                f"iterations={settings.n_iterations} but the run is already at "
                f"iteration {continuation['state'].iteration}; ask for more"
            )
    else:
        settings = settings_from_config(cfg)
        particles = _path(cfg.particles)
        local_symmetry_path = _path(cfg.local_symmetry)
        if not particles:
            raise ConfigError("the key 'particles' is required: add particles=...")
        if not cfg.reference:
            raise ConfigError("the key 'reference' is required: add reference=...")
    table = read_particles(
        particles,
        pixel_size_angstrom=None if cfg.pixel_size is None else float(cfg.pixel_size),
        project_dir=project_dir,
    )
    if table.n_particles == 0:
        raise InputError(particles, "no particles")
    check_text_columns(table)
    if table.has_mixed_pixel_sizes:
        raise InputError(particles, "optics groups have different pixel sizes")
    if settings.do_ctf and not table.has_ctf:
        raise InputError(particles, "ctf=true but the STAR file has no CTF columns")
    if settings.do_ctf:
        table.check_ctf()
    source = ImageSource.from_table(table, preread=bool(cfg.preread))
    box = int(source.box_size)
    pixel = float(np.asarray(table.pixel_size_angstrom)[0])
    if continuation is not None:
        halves = continuation["halves"]
        if halves.shape[0] != table.n_particles:
            raise InputError(
                particles, "particle count differs from the continued run's"
            )
        state = continuation["state"]
    else:
        halves, _ = half_sets(table, seed=int(cfg.seed))
    for h in (1, 2):
        if not np.any(halves == h):
            raise InputError(
                particles, f"no particles in half set {h} (rlnRandomSubset)"
            )
    local_symmetry = (
        load_local_symmetry(
            str(local_symmetry_path),
            box,
            pixel,
            oversampling=settings.local_symmetry_oversampling,
        )
        if local_symmetry_path
        else None
    )
    data = _refine_data(table, source, halves)
    if continuation is None:
        reference = load_reference(str(cfg.reference), box, pixel)
        angles, offsets = _initial_poses(table, pixel)
        state = initial_state(
            reference, data, settings, angles_degrees=angles, offsets_px=offsets
        )
    output = _path(cfg.output)
    if output is None and continuation is not None:
        output = str(Path(continue_from).parent)
    extra = {
        "particles": str(Path(particles).resolve()),
        "local_symmetry": None
        if not local_symmetry_path
        else str(Path(local_symmetry_path).resolve()),
    }
    started = time.perf_counter()
    paths: dict[str, Path] = {}
    with job_directory(
        output, "Refine3D", cfg, keep_if="*_it[0-9][0-9][0-9]_optimiser.star"
    ) as job_dir:
        root = job_dir / "run"
        writer = _tensorboard(job_dir, bool(cfg.logger.enabled))
        try:
            while state.iteration < settings.n_iterations:
                refine_iteration(
                    state,
                    data,
                    settings,
                    local_symmetry=local_symmetry,
                    log=log.info,
                )
                write_iteration(
                    root, state, settings, table, halves, pixel, extra=extra
                )
                _log_tensorboard(writer, state, pixel)
            paths = write_final(root, state, settings, table, halves, pixel)
        finally:
            if writer is not None:
                writer.close()
    log.info(
        "Refine3D finished in %.1f s: resolution %.2f Å, %s",
        time.perf_counter() - started,
        state.resolution_angstrom,
        paths.get("map"),
    )
    return {
        "job_dir": job_dir,
        "state": state,
        "resolution_angstrom": state.resolution_angstrom,
        "paths": paths,
    }


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="refine3d")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``cryoavg refine3d``."""
    run_job(run_refine3d, cfg)
