"""Poses and gold-standard half sets of a particle table.

Conventions: particle ``i`` is row ``i`` of the STAR file (0-based). Angles are RELION's
``rlnAngleRot/Tilt/Psi`` in degrees; origins ``rlnOriginX/YAngst`` (Å, RELION >= 3.1) or
``rlnOriginX/Y`` (pixels, RELION 3.0) are returned in pixels as ``(dy, dx)`` (the shift
applied to an image to centre it, spec §0.3). Half sets are RELION's ``rlnRandomSubset``
values 1 and 2.
"""

import numpy as np
import pandas as pd
import torch

from cryoavg.errors import InputError
from cryoavg.io import star as labels
from cryoavg.io.particles import ParticleTable

__all__ = ["assign_random_halves", "half_sets", "particle_poses"]


def _column(table: ParticleTable, label: str) -> np.ndarray:
    values = pd.to_numeric(table.particles[label], errors="coerce").to_numpy(
        dtype=np.float64
    )
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            table.path, f"{label} of particle {row + 1} is not a finite number"
        )
    return values


def particle_poses(table: ParticleTable) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Orientations and origins of every particle.

    Parameters
    ----------
    table
        The particles (RELION 3.0 or 3.1+).

    Returns
    -------
    angles_degrees : torch.Tensor
        ``(n, 3)`` float64 (rot, tilt, psi).
    shifts_px : torch.Tensor
        ``(n, 2)`` float64 ``(dy, dx)`` = origin / pixel size.
    has_origins : bool
        False when the table has no origin columns (the shifts are then zero).

    Raises
    ------
    InputError
        A pose column is missing or holds a non-numeric value.
    """
    columns = table.particles.columns
    angle_labels = (labels.ANGLE_ROT, labels.ANGLE_TILT, labels.ANGLE_PSI)
    missing = [label for label in angle_labels if label not in columns]
    if missing:
        raise InputError(
            table.path,
            f"no pose column(s) {', '.join(missing)}: reconstruct needs particles "
            "with orientations (e.g. from refine3d)",
        )
    angles = np.stack([_column(table, label) for label in angle_labels], axis=1)
    pixel = np.asarray(table.pixel_size_angstrom, dtype=np.float64)
    shifts = np.zeros((table.n_particles, 2))
    has_origins = True
    pairs = (
        ((labels.ORIGIN_Y_ANGST, labels.ORIGIN_X_ANGST), pixel),
        ((labels.ORIGIN_Y_PX, labels.ORIGIN_X_PX), np.ones_like(pixel)),
    )
    for (y_label, x_label), scale in pairs:
        present = [label in columns for label in (y_label, x_label)]
        if all(present):
            shifts[:, 0] = _column(table, y_label) / scale
            shifts[:, 1] = _column(table, x_label) / scale
            break
        if any(present):
            raise InputError(
                table.path, f"only one of {y_label} and {x_label} is present"
            )
    else:
        has_origins = False
    return torch.from_numpy(angles), torch.from_numpy(shifts), has_origins


def assign_random_halves(n_particles: int, seed: int = 0) -> np.ndarray:
    """Random, balanced assignment of particles to halves 1 and 2.

    Parameters
    ----------
    n_particles
        Number of particles.
    seed
        Random seed (the same seed gives the same halves).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int64 values 1 and 2, sizes differing by at most one (half 1 gets the
        extra particle).
    """
    rng = np.random.default_rng(seed)
    halves = np.where(np.arange(n_particles) % 2 == 0, 1, 2).astype(np.int64)
    return halves[rng.permutation(n_particles)]


def half_sets(table: ParticleTable, seed: int = 0) -> tuple[np.ndarray, bool]:
    """The half set of every particle: ``rlnRandomSubset``, or assigned at random.

    Parameters
    ----------
    table
        The particles.
    seed
        Seed of :func:`assign_random_halves` when the column is absent.

    Returns
    -------
    halves : numpy.ndarray
        ``(n,)`` int64 values in {1, 2}.
    assigned : bool
        True when the halves were assigned here (no ``rlnRandomSubset`` column).

    Raises
    ------
    InputError
        ``rlnRandomSubset`` holds values other than 1 and 2.
    """
    if labels.RANDOM_SUBSET not in table.particles.columns:
        return assign_random_halves(table.n_particles, seed), True
    values = _column(table, labels.RANDOM_SUBSET)
    bad = ~np.isin(values, (1.0, 2.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            table.path,
            f"{labels.RANDOM_SUBSET} of particle {row + 1} is {values[row]:g}; "
            "expected 1 or 2",
        )
    return values.astype(np.int64), False
