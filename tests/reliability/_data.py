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
