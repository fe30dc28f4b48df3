r"""``cryoavg simulate``: particles with CTF, noise and junk from a 3D map, plus ground truth.

Keys (see ``configs/simulate.yaml``): ``map``, ``output``, ``n_particles``, ``junk_fraction``,
``junk_types``, ``snr``, ``box``, ``pixel_size``, ``defocus_min_um``, ``defocus_max_um``,
``seed``, ... Example::

    cryoavg simulate map=ref.mrc output=Sim/job001 n_particles=5000 junk_fraction=0.2 \\
        snr=0.05 box=64 pixel_size=3.5 defocus_min_um=0.8 defocus_max_um=2.5 seed=1
"""

import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from cryoavg.cli._configs import config_dir
from cryoavg.cli._jobs import check_config_types, job_directory, run_job
from cryoavg.errors import ConfigError, InputError
from cryoavg.io.mrc import read_map_3d
from cryoavg.ops.fourier import resize_fourier_3d
from cryoavg.simulate.particles import (
    SimulationParameters,
    fit_volume_to_box,
    simulate_particles,
)
from cryoavg.simulate.writer import write_simulation

log = logging.getLogger("cryoavg")

#: larger pixel sizes are not cryo-EM (and overflow the float32 MRC cell size)
MAX_PIXEL_SIZE_ANGSTROM = 1000.0
#: smaller pixel sizes (Å/px) are not an electron microscope's (super-resolution pixels
#: are ~0.3 Å); a header's tiny cell would put the CTF far beyond float range
MIN_PIXEL_SIZE_ANGSTROM = 0.01


def demo_map_path() -> Path:
    """Path of the bundled HSP60 demo map (48³, 7.84 Å/px)."""
    return Path(str(resources.files("cryoavg") / "data" / "hsp60_D7_48px.mrc"))


def prepare_volume(
    map_path: Path, box: int, pixel_size: float | None, map_pixel_size: float | None
) -> tuple[torch.Tensor, float]:
    """Read a map, resample it to the requested pixel size and pad/crop it to the box.

    Returns
    -------
    tuple
        ``(volume (box, box, box), pixel_size_angstrom)``.
    """
    data, header_pixel = read_map_3d(map_path)
    if data.shape[0] != data.shape[1] or data.shape[1] != data.shape[2]:
        raise InputError(map_path, f"map must be cubic, got shape {tuple(data.shape)}")
    if not np.isfinite(data).all():
        raise InputError(map_path, "map contains NaN or infinite values")
    if float(np.abs(data).max()) > 1e12:  # projections and noise would overflow float32
        raise InputError(
            map_path, f"map values are too large (|v| up to {np.abs(data).max():.3g})"
        )
    source_pixel = map_pixel_size or header_pixel
    if source_pixel is None or source_pixel <= 0:
        if pixel_size is None:
            raise InputError(
                map_path,
                "no pixel size in the MRC header: give map_pixel_size=... (Å/px)",
            )
        source_pixel = pixel_size
    if not MIN_PIXEL_SIZE_ANGSTROM <= source_pixel <= MAX_PIXEL_SIZE_ANGSTROM:
        raise InputError(
            map_path,
            f"implausible pixel size {source_pixel:g} Å/px (expected "
            f"{MIN_PIXEL_SIZE_ANGSTROM:g} to {MAX_PIXEL_SIZE_ANGSTROM:g}): give "
            "map_pixel_size=... (Å/px)",
        )
    if pixel_size is not None and not (
        MIN_PIXEL_SIZE_ANGSTROM <= pixel_size <= MAX_PIXEL_SIZE_ANGSTROM
    ):
        raise ConfigError(
            f"pixel_size={pixel_size:g}: expected a pixel size in Å/px between "
            f"{MIN_PIXEL_SIZE_ANGSTROM:g} and {MAX_PIXEL_SIZE_ANGSTROM:g}"
        )
    target_pixel = float(pixel_size) if pixel_size is not None else float(source_pixel)
    volume = torch.as_tensor(data, dtype=torch.float32)
    if abs(target_pixel - source_pixel) > 1e-4 * source_pixel:
        new_size = max(2, round(volume.shape[0] * source_pixel / target_pixel / 2) * 2)
        if new_size > 1024:
            raise InputError(
                map_path,
                f"resampling from {source_pixel:g} to {target_pixel:g} Å/px would give "
                f"a {new_size}³ map; check the pixel sizes (map_pixel_size, pixel_size)",
            )
        volume = resize_fourier_3d(volume, new_size)
        log.info(
            "resampled the map from %.3f to %.3f Å/px (%d -> %d px)",
            source_pixel,
            target_pixel,
            data.shape[0],
            new_size,
        )
    volume = fit_volume_to_box(volume, box)
    if not torch.isfinite(volume).all():
        raise InputError(map_path, "map values too large (not finite after resampling)")
    return volume, target_pixel


def parameters_from_config(cfg: DictConfig, pixel_size: float) -> SimulationParameters:
    """Translate the job config into :class:`SimulationParameters` (validated)."""
    per_mic = list(cfg.particles_per_micrograph)
    if len(per_mic) != 2:
        raise ConfigError("particles_per_micrograph must be [min, max]")
    params = SimulationParameters(
        n_particles=int(cfg.n_particles),
        box_size=int(cfg.box),
        pixel_size_angstrom=float(pixel_size),
        junk_fraction=float(cfg.junk_fraction),
        junk_types=tuple(str(t) for t in cfg.junk_types),
        snr=None if cfg.snr is None else float(cfg.snr),
        defocus_min_um=float(cfg.defocus_min_um),
        defocus_max_um=float(cfg.defocus_max_um),
        astigmatism_max_angstrom=float(cfg.astigmatism_angstrom),
        voltage_kv=float(cfg.voltage_kv),
        cs_mm=float(cfg.cs_mm),
        amplitude_contrast=float(cfg.amplitude_contrast),
        bfactor_angstrom2=float(cfg.bfactor),
        apply_ctf=bool(cfg.ctf),
        shift_sigma_px=float(cfg.shift_sigma_px),
        particles_per_micrograph=(int(per_mic[0]), int(per_mic[1])),
        seed=int(cfg.seed),
    )
    params.validate()
    return params


#: the type of every scalar key (checked first: one clear line for n_particles=abc)
CONFIG_TYPES: dict[str, type] = {
    **dict.fromkeys(("n_particles", "box", "seed"), int),
    **dict.fromkeys(
        (
            "junk_fraction",
            "snr",
            "pixel_size",
            "map_pixel_size",
            "defocus_min_um",
            "defocus_max_um",
            "astigmatism_angstrom",
            "voltage_kv",
            "cs_mm",
            "amplitude_contrast",
            "bfactor",
            "shift_sigma_px",
        ),
        float,
    ),
    "ctf": bool,
    "map": str,
    "output": str,
}
OPTIONAL_KEYS = ("snr", "pixel_size", "map_pixel_size", "map", "output")


def run_simulate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the simulation job (testable entry point).

    Parameters
    ----------
    cfg
        Composed ``simulate`` config.

    Returns
    -------
    tuple
        ``(metrics, objects)``: figures from ``sim_info.json`` and the job directory / result.
    """
    check_config_types(cfg, CONFIG_TYPES, optional=OPTIONAL_KEYS)
    map_path = Path(cfg.map) if cfg.map else demo_map_path()
    if cfg.box is None or int(cfg.box) < 16 or int(cfg.box) % 2:
        raise ConfigError(f"box must be an even number ≥ 16, got {cfg.box}")
    volume, pixel_size = prepare_volume(
        map_path,
        int(cfg.box),
        None if cfg.pixel_size is None else float(cfg.pixel_size),
        None if cfg.map_pixel_size is None else float(cfg.map_pixel_size),
    )
    params = parameters_from_config(cfg, pixel_size)
    start = time.perf_counter()
    result = simulate_particles(volume, params)
    with job_directory(cfg.output, "Simulate", cfg) as job_dir:
        info = write_simulation(job_dir, result, params, map_path=str(map_path))
    log.info(
        "simulated %d particles (%d junk) of %d px at %.3f Å/px in %.1f s -> %s",
        params.n_particles,
        int(result.is_junk.sum()),
        params.box_size,
        pixel_size,
        time.perf_counter() - start,
        job_dir / "particles.star",
    )
    return info, {"job_dir": job_dir, "result": result}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="simulate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``cryoavg simulate``."""
    run_job(run_simulate, cfg)
