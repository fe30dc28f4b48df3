"""Small valid inputs that the fuzz tests damage: a particle STAR with its stack, a map."""

from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from cryoavg.io.mrc import write_mrc
from cryoavg.io.star import format_star

from ._fuzz import scratch_dir

BOX = 16
N_IMAGES = 6


@cache
def stack_path() -> Path:
    """A 6-image, 16 px stack in the scratch directory."""
    path = scratch_dir() / "stack.mrcs"
    images = np.random.default_rng(0).normal(size=(N_IMAGES, BOX, BOX))
    write_mrc(path, images.astype(np.float32), 2.0, is_stack=True)
    return path


def particles_star_text(n: int = N_IMAGES) -> str:
    """A RELION 3.1 particles STAR (optics + particles, full CTF) for :func:`stack_path`."""
    stack = stack_path()
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographPixelSize": [2.0],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [2.0],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
            "rlnMicrographName": [f"mic{i % 2}.mrc" for i in range(n)],
            "rlnCoordinateX": np.arange(n, dtype=float) * 10,
            "rlnCoordinateY": np.arange(n, dtype=float) * 5,
            "rlnDefocusU": np.full(n, 15000.0),
            "rlnDefocusV": np.full(n, 14500.0),
            "rlnDefocusAngle": np.full(n, 30.0),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnAnglePsi": np.linspace(0, 90, n),
            "rlnOriginXAngst": np.zeros(n),
            "rlnOriginYAngst": np.zeros(n),
        }
    )
    return format_star({"optics": optics, "particles": particles})


def map_bytes(size: int = 8) -> bytes:
    """A valid ``size³`` float32 MRC map."""
    path = scratch_dir() / "template_map.mrc"
    volume = np.random.default_rng(1).random((size, size, size)).astype(np.float32)
    write_mrc(path, volume, 2.0)
    return path.read_bytes()


def stack_bytes() -> bytes:
    return stack_path().read_bytes()


# --------------------------------------------------------------------------------------
# reconstruct / refine3d: particles with poses, a reference map, local-symmetry files
# --------------------------------------------------------------------------------------

PIXEL = 2.0


def posed_particles_star_text(release: str = "3.1", stack: Path | None = None) -> str:
    """Particles of :func:`stack_path` (or ``stack``) with poses, CTF and half sets.

    ``release="3.1"``: optics + particles blocks, origins in Å, ``rlnRandomSubset``;
    ``"3.0"``: one loop, origins in pixels, optics values per particle, halves assigned
    by the job.
    """
    stack = stack_path() if stack is None else stack
    n = N_IMAGES
    rng = np.random.default_rng(7)
    particles = {
        "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
        "rlnMicrographName": [f"mic{i % 2}.mrc" for i in range(n)],
        "rlnDefocusU": np.full(n, 15000.0),
        "rlnDefocusV": np.full(n, 14500.0),
        "rlnDefocusAngle": np.full(n, 30.0),
        "rlnAngleRot": np.round(rng.uniform(-180, 180, n), 3),
        "rlnAngleTilt": np.round(rng.uniform(0, 180, n), 3),
        "rlnAnglePsi": np.round(rng.uniform(-180, 180, n), 3),
    }
    if release == "3.0":
        particles |= {
            "rlnOriginX": np.round(rng.normal(0, 0.5, n), 3),
            "rlnOriginY": np.round(rng.normal(0, 0.5, n), 3),
            "rlnVoltage": np.full(n, 300.0),
            "rlnSphericalAberration": np.full(n, 2.7),
            "rlnAmplitudeContrast": np.full(n, 0.1),
            "rlnDetectorPixelSize": np.full(n, 5.0),
            "rlnMagnification": np.full(n, 25000.0),  # 5 µm / 25000 = 2 Å
        }
        return format_star({"": pd.DataFrame(particles)}, version=30001)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographPixelSize": [PIXEL],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [PIXEL],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    particles |= {
        "rlnOriginXAngst": np.round(rng.normal(0, 1, n), 3),
        "rlnOriginYAngst": np.round(rng.normal(0, 1, n), 3),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnRandomSubset": np.arange(n, dtype=np.int64) % 2 + 1,
    }
    return format_star({"optics": optics, "particles": pd.DataFrame(particles)})


def _centred_grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis = np.arange(size) - size // 2
    return np.meshgrid(axis, axis, axis, indexing="ij")


def reference_volume(size: int = BOX) -> np.ndarray:
    """A ``size³`` float32 blob (an elongated Gaussian), the refine3d reference."""
    zz, yy, xx = _centred_grid(size)
    blob = np.exp(-(xx**2 + (yy / 1.5) ** 2 + zz**2) / 8.0)
    return blob.astype(np.float32)


@cache
def reference_path() -> Path:
    """:func:`reference_volume` at :data:`PIXEL` Å in the scratch directory."""
    path = scratch_dir() / "reference.mrc"
    write_mrc(path, reference_volume(), PIXEL)
    return path


@cache
def mask_path() -> Path:
    """A ``16³`` ball of radius 3 px at the centre (a local-symmetry mask)."""
    zz, yy, xx = _centred_grid(BOX)
    path = scratch_dir() / "localsym_mask.mrc"
    write_mrc(path, ((xx**2 + yy**2 + zz**2) <= 9).astype(np.float32), PIXEL)
    return path


def operator_star_text(geometry: bool = False) -> str:
    """An operator STAR file: two operators of :func:`mask_path` (they stay in the box).

    ``geometry``: with the ``rlnImageSize`` and ``rlnImagePixelSize`` columns that
    ``reconstruct`` compares with the particles.
    """
    mask = mask_path()
    labels = "_rlnImageSize #8\n_rlnImagePixelSize #9\n" if geometry else ""
    values = f" {BOX} {PIXEL:.6f}" if geometry else ""
    return (
        "\n# version 50001\n\ndata_\n\nloop_\n"
        "_rlnMaskName #1\n_rlnAngleRot #2\n_rlnAngleTilt #3\n_rlnAnglePsi #4\n"
        "_rlnOriginXAngst #5\n_rlnOriginYAngst #6\n_rlnOriginZAngst #7\n"
        f"{labels}"
        f"{mask} 0.000000 0.000000 180.000000 0.000000 0.000000 0.000000{values}\n"
        f"{mask} 30.000000 10.000000 20.000000 1.000000 0.000000 0.500000{values}\n"
    )


def operator_dm_text() -> str:
    """The operators of :func:`operator_star_text` as DM text (any other extension)."""
    return (
        f"MASKFILENAME {mask_path()}\n"
        " ROTA EULER 0.0 0.0 180.0\n       TRAN 0.0 0.0 0.0\n"
        " ROTA POLAR 0.0 0.0 72.0\n       TRAN 0.5 0.0 0.0\n"
    )


# --------------------------------------------------------------------------------------
# select: a RELION 4.0 Class2D result and one written by cryoavg
# --------------------------------------------------------------------------------------

#: particles per class of the Class2D results (the last class is too small to score)
CLASS_COUNTS = (20, 15, 12, 5)
CLASS_PIXEL = 7.0


@cache
def relion_class2d() -> Path:
    """A RELION 4.0 Class2D iteration (project-relative names) of 16 px classes.

    Returns the project directory; the files are ``Class2D/job003/run_it025_*``.
    """
    from tests.select import write_relion_class2d

    project = scratch_dir() / "relion_class2d"
    write_relion_class2d(project, class_counts=CLASS_COUNTS, box=BOX)
    return project


@cache
def cryoavg_class2d() -> Path:
    """A Class2D iteration as cryoavg writes it (EM, absolute names); the optimiser path."""
    import torch

    from cryoavg.class2d.export import write_iteration
    from cryoavg.class2d.settings import Class2DSettings
    from cryoavg.class2d.state import Class2DState
    from tests.select import class_images

    k, n = len(CLASS_COUNTS), sum(CLASS_COUNTS)
    state = Class2DState(k, BOX, n_scale_groups=3)
    with torch.no_grad():
        state.class_images.copy_(torch.from_numpy(class_images(k, BOX, seed=3)))
        state.class_prior.copy_(torch.tensor(CLASS_COUNTS, dtype=torch.float32) / n)
        state.ssnr.fill_(2.0)
        state.current_resolution_shell.fill_(4)
    particles = pd.DataFrame(
        {
            "rlnImageName": [
                f"{i % N_IMAGES + 1:06d}@{stack_path()}" for i in range(n)
            ],
            "rlnMicrographName": [f"mic{i % 3}.mrc" for i in range(n)],
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnDefocusU": np.full(n, 15000.0),
            "rlnDefocusV": np.full(n, 14000.0),
            "rlnDefocusAngle": np.zeros(n),
            "rlnClassNumber": np.repeat(np.arange(1, k + 1), CLASS_COUNTS),
            "rlnAnglePsi": np.zeros(n),
            "rlnOriginXAngst": np.zeros(n),
            "rlnOriginYAngst": np.zeros(n),
            "rlnGroupNumber": np.arange(n, dtype=np.int64) % 3 + 1,
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [CLASS_PIXEL],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    job = scratch_dir() / "cryoavg_class2d" / "Class2D" / "job002"
    job.mkdir(parents=True, exist_ok=True)
    settings = Class2DSettings(
        n_classes=k, algorithm="em", particle_diameter_angstrom=90.0
    )
    paths = write_iteration(
        job / "run",
        2,
        state=state,
        particles=particles,
        optics=optics,
        group_names=["mic0.mrc", "mic1.mrc", "mic2.mrc"],
        group_particle_counts=np.bincount(np.arange(n) % 3),
        settings=settings,
        sampling=None,
        command_line="--o run --iter 2",
        pixel_size_angstrom=CLASS_PIXEL,
        n_particles_total=n,
    )
    return Path(paths.optimiser)
