"""Write simulated particles the way a RELION Extract job does, plus the ground truth.

Layout of a simulation job directory::

    <job>/particles.star          RELION 3.1 STAR (data_optics + data_particles)
    <job>/Particles/micNNNNN.mrcs one stack per micrograph name
    <job>/ground_truth.star       true angles/origins, rlnIsJunk, rlnJunkType
    <job>/sim_info.json           parameters and derived figures

Image names are written relative to the project directory (the current working directory
when the job directory lies inside it), as RELION does.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from cryoavg.io.atomic import atomic_write
from cryoavg.io.mrc import write_mrc
from cryoavg.io.particles import format_image_name
from cryoavg.io.star import write_star
from cryoavg.simulate.particles import SimulatedParticles, SimulationParameters


def _name_base(job_dir: Path, project_dir: Path) -> Path:
    """Path prefix for image names: relative to the project when inside it, else absolute."""
    job_abs = job_dir.resolve()
    try:
        return job_abs.relative_to(project_dir.resolve())
    except ValueError:
        return job_abs


def optics_table(params: SimulationParameters) -> pd.DataFrame:
    """RELION 3.1 ``data_optics`` table of a simulation (one optics group)."""
    return pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [float(params.pixel_size_angstrom)],
            "rlnVoltage": [float(params.voltage_kv)],
            "rlnSphericalAberration": [float(params.cs_mm)],
            "rlnAmplitudeContrast": [float(params.amplitude_contrast)],
            "rlnImagePixelSize": [float(params.pixel_size_angstrom)],
            "rlnImageSize": [int(params.box_size)],
            "rlnImageDimensionality": [2],
            "rlnCtfDataAreCtfPremultiplied": [0],
        }
    )


def write_simulation(
    job_dir: Path,
    result: SimulatedParticles,
    params: SimulationParameters,
    *,
    project_dir: Path | None = None,
    map_path: str = "",
) -> dict[str, object]:
    """Write stacks, particles.star, ground_truth.star and sim_info.json into ``job_dir``.

    Parameters
    ----------
    job_dir
        Existing job directory.
    result
        Output of :func:`cryoavg.simulate.particles.simulate_particles`.
    params
        The parameters used.
    project_dir
        Project root for relative image names (default: current directory).
    map_path
        Source map, recorded in ``sim_info.json``.

    Returns
    -------
    dict
        The contents of ``sim_info.json``.
    """
    project = Path(project_dir) if project_dir is not None else Path(os.getcwd())
    base = _name_base(job_dir, project)
    stacks_dir = job_dir / "Particles"
    stacks_dir.mkdir(parents=True, exist_ok=True)
    micrograph = result.micrograph_index.numpy()
    n = int(micrograph.size)
    images = result.images.numpy()
    image_names = np.empty(n, dtype=object)
    micrograph_names = np.empty(n, dtype=object)
    coordinates = np.zeros((n, 2))
    for mic in np.unique(micrograph):
        rows = np.flatnonzero(micrograph == mic)
        stack_name = f"mic{mic + 1:05d}.mrcs"
        write_mrc(
            stacks_dir / stack_name,
            images[rows],
            params.pixel_size_angstrom,
            is_stack=True,
        )
        for slot, row in enumerate(rows):
            image_names[row] = format_image_name(
                slot, str(base / "Particles" / stack_name)
            )
        micrograph_names[rows] = f"MotionCorr/job002/Movies/mic{mic + 1:05d}.mrc"
        # a plausible picking grid on a 4k x 4k micrograph
        grid = np.arange(len(rows))
        coordinates[rows, 0] = 200 + (grid % 10) * 350.0
        coordinates[rows, 1] = 200 + (grid // 10) * 350.0
    optics = optics_table(params)
    common = {
        "rlnCoordinateX": coordinates[:, 0],
        "rlnCoordinateY": coordinates[:, 1],
        "rlnImageName": image_names.astype(str),
        "rlnMicrographName": micrograph_names.astype(str),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    }
    particles = pd.DataFrame(
        {
            **common,
            "rlnDefocusU": result.defocus_u_angstrom.double().numpy().round(2),
            "rlnDefocusV": result.defocus_v_angstrom.double().numpy().round(2),
            "rlnDefocusAngle": result.defocus_angle_degrees.double().numpy().round(3),
            "rlnCtfBfactor": np.full(n, float(params.bfactor_angstrom2)),
            "rlnCtfScalefactor": np.ones(n),
            "rlnPhaseShift": np.zeros(n),
        }
    )
    write_star(job_dir / "particles.star", {"optics": optics, "particles": particles})
    angles = result.angles_degrees.double().numpy()
    origin = result.origin_px.double().numpy() * params.pixel_size_angstrom  # yx Å
    truth = pd.DataFrame(
        {
            "rlnImageName": common["rlnImageName"],
            "rlnMicrographName": common["rlnMicrographName"],
            "rlnOpticsGroup": common["rlnOpticsGroup"],
            "rlnAngleRot": angles[:, 0].round(4),
            "rlnAngleTilt": angles[:, 1].round(4),
            "rlnAnglePsi": angles[:, 2].round(4),
            "rlnOriginXAngst": origin[:, 1].round(4),
            "rlnOriginYAngst": origin[:, 0].round(4),
            "rlnIsJunk": result.is_junk.numpy().astype(np.int64),
            "rlnJunkType": np.asarray(result.junk_type, dtype=str),
        }
    )
    write_star(job_dir / "ground_truth.star", {"optics": optics, "particles": truth})
    info: dict[str, object] = {
        "map": map_path,
        **{
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(params).items()
        },
        "n_micrographs": int(micrograph.max()) + 1,
        "particle_radius_px": result.particle_radius_px,
        "particle_diameter_angstrom": 2
        * result.particle_radius_px
        * params.pixel_size_angstrom,
        "noise_sigma": result.noise_sigma,
        "junk_counts": {
            kind: result.junk_type.count(kind)
            for kind in sorted(set(result.junk_type))
            if kind != "none"
        },
    }
    with atomic_write(job_dir / "sim_info.json") as handle:
        json.dump(info, handle, indent=2)
    return info
