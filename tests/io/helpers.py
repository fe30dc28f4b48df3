"""Helpers for the cryoavg.io tests: synthetic stacks and STAR files, real data."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryoavg.io.mrc import write_mrc
from cryoavg.io.particles import format_image_name
from cryoavg.io.star import write_star


def shared_dir() -> Path | None:
    """The project's ``../shared`` folder (or $CRYOAVG_SHARED), None when absent."""
    candidates = []
    if os.environ.get("CRYOAVG_SHARED"):
        candidates.append(Path(os.environ["CRYOAVG_SHARED"]))
    candidates.append(Path(__file__).resolve().parents[3] / "shared")
    for candidate in candidates:
        if (candidate / "data" / "particles").is_dir():
            return candidate
    return None


@dataclass
class SyntheticDataset:
    star: Path
    images: np.ndarray  # (n, box, box) float32 in particle order
    particles: pd.DataFrame
    optics: pd.DataFrame
    stacks: list[Path]


def make_dataset(
    directory: Path,
    *,
    stack_sizes: tuple[int, ...] = (4, 3),
    box: int = 16,
    pixel_size_angstrom: float = 1.5,
    seed: int = 0,
    star_name: str = "particles.star",
) -> SyntheticDataset:
    """Write stacks in ``directory/Particles`` and a RELION 3.1 STAR in ``directory``.

    Particles alternate between stacks (so reads must regroup them), two optics groups.
    """
    rng = np.random.default_rng(seed)
    (directory / "Particles").mkdir(parents=True, exist_ok=True)
    stacks = []
    stack_images = []
    for s, size in enumerate(stack_sizes):
        images = rng.normal(size=(size, box, box)).astype(np.float32)
        path = directory / "Particles" / f"mic{s + 1:03d}.mrcs"
        write_mrc(path, images, pixel_size_angstrom, is_stack=True)
        stacks.append(path)
        stack_images.append(images)
    # interleave: particle order visits stacks round-robin, images in reverse order
    entries = [(s, k) for s, size in enumerate(stack_sizes) for k in range(size)]
    order = sorted(entries, key=lambda e: (-e[1], e[0]))
    n = len(order)
    names = [format_image_name(k, f"Particles/mic{s + 1:03d}.mrcs") for s, k in order]
    images = np.stack([stack_images[s][k] for s, k in order])
    particles = pd.DataFrame(
        {
            "rlnCoordinateX": rng.uniform(0, 4000, n),
            "rlnCoordinateY": rng.uniform(0, 4000, n),
            "rlnImageName": names,
            "rlnMicrographName": [
                f"MotionCorr/job002/Movies/mic{s + 1:03d}.mrc" for s, _ in order
            ],
            "rlnDefocusU": rng.uniform(10000, 20000, n),
            "rlnDefocusV": rng.uniform(10000, 20000, n),
            "rlnDefocusAngle": rng.uniform(-180, 180, n),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnCtfScalefactor": np.ones(n),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": rng.normal(size=n),
            "rlnOriginYAngst": rng.normal(size=n),
            "rlnClassNumber": np.arange(n, dtype=np.int64) % 3 + 1,
            "rlnOpticsGroup": np.arange(n, dtype=np.int64) % 2 + 1,
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.array([1, 2], dtype=np.int64),
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnAmplitudeContrast": [0.1, 0.07],
            "rlnSphericalAberration": [2.7, 0.01],
            "rlnVoltage": [300.0, 200.0],
            "rlnImagePixelSize": [pixel_size_angstrom, pixel_size_angstrom],
            "rlnImageSize": np.array([box, box], dtype=np.int64),
            "rlnImageDimensionality": np.array([2, 2], dtype=np.int64),
            "rlnCtfDataAreCtfPremultiplied": np.array([0, 1], dtype=np.int64),
        }
    )
    star = directory / star_name
    write_star(star, {"optics": optics, "particles": particles})
    return SyntheticDataset(star, images, particles, optics, stacks)


def leftover_temp_files(directory: Path) -> list[str]:
    """Temporary files left by atomic writes (hidden ``.name.XXXX.tmp``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))
