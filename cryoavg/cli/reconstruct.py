r"""``cryoavg reconstruct``: gold-standard 3D reconstruction from particles with poses.

Keys (see ``configs/reconstruct.yaml``): ``particles``, ``output``, ``mask_diameter`` (Å),
``ctf``, ``tau2_fudge``, ``pad``, ``batch_size``, ``subset`` (half1 | half2 | both),
``maxres`` (Å), ``angpix``, ``local_symmetry`` (operator STAR), ``seed``, ``device``.
Example::

    cryoavg reconstruct particles=Refine3D/job010/run_data.star \\
        output=Reconstruct/job011 mask_diameter=200 local_symmetry=ops.star

Writes ``run_half1_class001_unfil.mrc``, ``run_half2_class001_unfil.mrc``,
``run_class001.mrc``, ``run_fsc.star`` and ``run_data.star`` (see
:mod:`cryoavg.recon.outputs`). Every input is checked before any computation and all
outputs are written only at the end, so bad input leaves nothing behind.
"""

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from cryoavg.cli._configs import config_dir
from cryoavg.cli._jobs import (
    check_config_types,
    job_directory,
    run_job,
    torch_device,
)
from cryoavg.errors import ConfigError, InputError
from cryoavg.io import star as labels
from cryoavg.io.dataset import ParticleDataset
from cryoavg.io.particles import ParticleTable, read_particles, write_particles
from cryoavg.io.star import read_star
from cryoavg.io.validate import check_text_columns
from cryoavg.localsym.apply import apply_local_symmetry
from cryoavg.localsym.io import load_masks, read_mask_info
from cryoavg.localsym.operators import MaskOperators, operators_to_tensors
from cryoavg.recon.halves import half_sets, particle_poses
from cryoavg.recon.outputs import map_names, write_fsc_star, write_maps
from cryoavg.recon.reconstruct import (
    ReconstructionSettings,
    backproject_dataset,
    reconstruct_gold_standard,
    soft_sphere_mask,
    wiener_reconstruct,
)

log = logging.getLogger("cryoavg")

SUBSETS = ("half1", "half2", "both")
#: labels that may carry a pixel size / box in an operator STAR file
_OPERATOR_PIXEL_LABELS = (labels.PIXEL_SIZE, labels.IMAGE_PIXEL_SIZE)
_OPERATOR_BOX_LABELS = (labels.IMAGE_SIZE,)


#: the type of every scalar key (checked first: one clear line for batch_size=abc)
CONFIG_TYPES: dict[str, type] = {
    **dict.fromkeys(("batch_size", "min_regularised_shell", "seed"), int),
    **dict.fromkeys(
        ("mask_diameter", "mask_soft_edge", "tau2_fudge", "pad", "maxres", "angpix"),
        float,
    ),
    **dict.fromkeys(("ctf", "preread"), bool),
    **dict.fromkeys(("particles", "output", "subset", "local_symmetry", "device"), str),
}
OPTIONAL_KEYS = (
    "mask_diameter",
    "maxres",
    "angpix",
    "particles",
    "output",
    "local_symmetry",
)


def _positive(cfg: DictConfig, key: str, allow_none: bool = False) -> float | None:
    value = cfg.get(key)
    if value is None and allow_none:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} must be a number, got {value!r}") from err
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{key} must be > 0, got {value}")
    return number


def settings_from_config(cfg: DictConfig) -> ReconstructionSettings:
    """Validated :class:`ReconstructionSettings` from the job config."""
    check_config_types(cfg, CONFIG_TYPES, optional=OPTIONAL_KEYS)
    pad = _positive(cfg, "pad")
    if pad is None or pad < 1:
        raise ConfigError(f"pad must be >= 1, got {cfg.pad}")
    batch = int(cfg.batch_size)
    if batch < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if str(cfg.subset) not in SUBSETS:
        raise ConfigError(
            f"subset must be one of {', '.join(SUBSETS)}, got {cfg.subset}"
        )
    if int(cfg.seed) < 0:
        raise ConfigError(f"seed must be >= 0, got {cfg.seed}")
    edge = float(cfg.mask_soft_edge)
    if not (math.isfinite(edge) and edge >= 0):
        raise ConfigError(f"mask_soft_edge must be >= 0, got {cfg.mask_soft_edge}")
    return ReconstructionSettings(
        pad_factor=pad,
        tau2_fudge=float(_positive(cfg, "tau2_fudge") or 1.0),
        use_ctf=bool(cfg.ctf),
        max_resolution_angstrom=_positive(cfg, "maxres", allow_none=True),
        mask_diameter_angstrom=_positive(cfg, "mask_diameter", allow_none=True),
        mask_soft_edge_px=edge,
        min_regularised_shell=int(cfg.min_regularised_shell),
        batch_size=batch,
    )


def _single_pixel_size(table: ParticleTable) -> float:
    pixels = np.asarray(table.pixel_size_angstrom, dtype=np.float64)
    if np.ptp(pixels) > 1e-4 * pixels.max():
        raise InputError(
            table.path,
            f"particles have different pixel sizes ({pixels.min():.4f}-"
            f"{pixels.max():.4f} Å); reconstruct needs one (or give angpix=...)",
        )
    return float(pixels[0])


def _ctf_premultiplied(table: ParticleTable) -> bool:
    flags = np.asarray(table.ctf_premultiplied, dtype=bool)
    if flags.any() and not flags.all():
        raise InputError(
            table.path,
            "optics groups mix CTF-premultiplied and plain images; split the file",
        )
    return bool(flags.all()) if flags.size else False


def _check_operator_file_geometry(path: Path, pixel: float, box: int) -> None:
    """Compare pixel size / box stored in an operator STAR file (if any) with the map."""
    if path.suffix.lower() != ".star":
        return
    for block in read_star(path).values():
        rows = (
            [dict(block.iloc[i]) for i in range(len(block))]
            if isinstance(block, pd.DataFrame)
            else [dict(block)]
        )
        for row in rows:
            for label in _OPERATOR_PIXEL_LABELS:
                if label in row:
                    value = _operator_file_number(path, row, label)
                    if not abs(value - pixel) <= 0.01 * pixel:
                        raise InputError(
                            path,
                            f"operators are for pixel size {value:.4f} Å but the "
                            f"particles have {pixel:.4f} Å",
                        )
            for label in _OPERATOR_BOX_LABELS:
                if label in row:
                    value = _operator_file_number(path, row, label)
                    if value != box:
                        raise InputError(
                            path,
                            f"operators are for a {value:g} px box but the particles "
                            f"are {box} px",
                        )


def _operator_file_number(path: Path, row: dict[str, Any], label: str) -> float:
    value = float(pd.to_numeric(row[label], errors="coerce"))
    if not math.isfinite(value):
        raise InputError(path, f"{label} is not a finite number ({row[label]})")
    return value


def _resolve_mask_names(
    groups: list[MaskOperators], operator_file: Path
) -> list[MaskOperators]:
    """Mask names as written, else relative to the operator file's directory."""
    resolved = []
    for group in groups:
        name = Path(group.mask_name)
        if not name.is_absolute() and not name.exists():
            beside = operator_file.parent / name
            if beside.exists():
                name = beside
        resolved.append(MaskOperators(str(name), list(group.operators)))
    return resolved


def local_symmetry_function(
    operator_file: str, box: int, pixel: float, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, int]:
    """Read and validate local-symmetry operators and masks for a ``box``-pixel map.

    Returns
    -------
    tuple
        ``(map -> symmetrised map, n_masks, n_operators)``.
    """
    path = Path(operator_file)
    if not path.is_file():
        raise InputError(path, "local symmetry operator file not found")
    _check_operator_file_geometry(path, pixel, box)
    groups = _resolve_mask_names(read_mask_info(path), path)
    notes: list[str] = []
    masks = [m.to(device) for m in load_masks(groups, (box,) * 3, pixel, notes)]
    for note in notes:
        log.warning(note)
    operators = [
        operators_to_tensors(g.operators, pixel, torch.float32, device) for g in groups
    ]

    def symmetrise(volume: torch.Tensor) -> torch.Tensor:
        return apply_local_symmetry(volume, masks, operators)

    return symmetrise, len(groups), sum(len(g.operators) for g in groups)


def run_reconstruct(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the reconstruction job (testable entry point).

    Parameters
    ----------
    cfg
        Composed ``reconstruct`` config.

    Returns
    -------
    tuple
        ``(metrics, objects)``: resolution and particle counts; the job directory and
        the maps.
    """
    settings = settings_from_config(cfg)
    angpix = _positive(cfg, "angpix", allow_none=True)
    device = torch_device(cfg.device)
    table = read_particles(str(cfg.particles), pixel_size_angstrom=angpix)
    check_text_columns(table)
    angles, shifts_px, has_origins = particle_poses(table)
    if not has_origins:
        log.warning("%s: no origin columns; particles are taken as centred", table.path)
    pixel = _single_pixel_size(table)
    if settings.use_ctf and not table.has_ctf:
        raise InputError(
            table.path, "no CTF parameters (rlnDefocusU/V/Angle, ...); set ctf=false"
        )
    if settings.use_ctf:
        table.check_ctf()
    premultiplied = _ctf_premultiplied(table) if settings.use_ctf else False
    halves, assigned = half_sets(table, int(cfg.seed))
    subset = str(cfg.subset)
    wanted = {"half1": (1,), "half2": (2,), "both": (1, 2)}[subset]
    counts = {h: int((halves == h).sum()) for h in (1, 2)}
    for half in wanted:
        if counts[half] == 0:
            raise InputError(
                table.path,
                f"no particles in half {half} (rlnRandomSubset); need particles in "
                f"{' and '.join(f'half {h}' for h in wanted)}",
            )
    dataset = ParticleDataset(table, preread=bool(cfg.preread))  # checks stacks/boxes
    box = dataset.box_size
    if settings.mask_diameter_angstrom is not None and (
        settings.mask_diameter_angstrom / pixel > 2 * box
    ):
        raise ConfigError(
            f"mask_diameter {settings.mask_diameter_angstrom} Å is larger than twice "
            f"the box ({box} px of {pixel:.4f} Å)"
        )
    postprocess = None
    if cfg.local_symmetry:
        postprocess, n_masks, n_ops = local_symmetry_function(
            str(cfg.local_symmetry), box, pixel, device
        )
        log.info("local symmetry: %d mask(s), %d operator(s)", n_masks, n_ops)

    start = time.perf_counter()
    accumulators = {}
    for half in wanted:
        positions = np.flatnonzero(halves == half)
        index = torch.from_numpy(positions)
        accumulators[half] = backproject_dataset(
            dataset.get_batch,
            positions,
            angles[index],
            shifts_px[index],
            box,
            pixel,
            settings,
            ctf_premultiplied=premultiplied,
            device=device,
        )
    elapsed = time.perf_counter() - start
    n_inserted = sum(counts[h] for h in wanted)
    log.info(
        "back-projected %d particles (%d px) in %.1f s (%.0f particles/s)",
        n_inserted,
        box,
        elapsed,
        n_inserted / max(elapsed, 1e-9),
    )

    metrics: dict[str, Any] = {
        "n_particles_half1": counts[1],
        "n_particles_half2": counts[2],
        "halves_assigned": assigned,
        "pixel_size_angstrom": pixel,
        "box_size": box,
        "backprojection_seconds": elapsed,
    }
    maps: dict[str, torch.Tensor] = {}
    if subset == "both":
        result = reconstruct_gold_standard(
            accumulators[1], accumulators[2], pixel, settings, postprocess=postprocess
        )
        maps = {"half1": result.half1, "half2": result.half2, "full": result.full}
        metrics["resolution_angstrom"] = result.resolution_angstrom
        log.info(
            "gold-standard resolution (FSC 0.143): %.2f Å", result.resolution_angstrom
        )
    else:
        half = wanted[0]
        volume = wiener_reconstruct(
            accumulators[half].data,
            accumulators[half].weights,
            box,
            max_shell=settings.max_shell(box, pixel),
        )
        if postprocess is not None:
            volume = postprocess(volume)
        mask = soft_sphere_mask(
            box,
            pixel,
            settings.mask_diameter_angstrom,
            settings.mask_soft_edge_px,
            device,
        )
        maps = {subset: volume * mask}

    output = None if cfg.output in (None, "") else str(cfg.output)  # output=5: text
    with job_directory(output, "Reconstruct", cfg) as job_dir:
        names = map_names(job_dir)
        write_maps(names, pixel, **maps)
        if subset == "both":
            write_fsc_star(
                names.fsc_star,
                result.fsc,
                pixel,
                result.resolution_angstrom,
                fsc_unregularised=result.fsc_unregularised,
                general={
                    "rlnNrParticlesHalf1": counts[1],
                    "rlnNrParticlesHalf2": counts[2],
                },
            )
        particles = table.particles_table_relion31()
        particles[labels.RANDOM_SUBSET] = halves
        write_particles(names.data_star, particles, table.optics_table())
    log.info("wrote %s", job_dir)
    return metrics, {"job_dir": job_dir, "maps": maps}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="reconstruct")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``cryoavg reconstruct``."""
    run_job(run_reconstruct, cfg)
