"""Orientation sampling for 3D refinement: a uniform SO(3) grid and local neighbourhoods.

Grid
----
A uniform grid of ``r = d · n_ψ`` orientations for an angular step ``s`` (degrees):

* ``d`` projection directions on a Fibonacci (golden-angle) sphere with
  ``d = ceil(4π / s_rad²)`` points, i.e. one point per ``s × s`` patch of the unit
  sphere (nearest-neighbour spacing ≈ ``1.07·s``, covering radius ≈ ``0.7·s``);
* ``n_ψ = ceil(360 / s)`` in-plane angles ``ψ_j = j·360/n_ψ``.

Uniform directions times uniform ψ sample the Haar measure of SO(3), so every
orientation carries the same prior weight. A direction ``v`` (unit vector in map
coordinates) becomes RELION angles ``rot = atan2(v_y, v_x)``, ``tilt = acos(v_z)``: the
third row of RELION's matrix ``A(rot, tilt, ψ)`` is ``v`` (spec §0.2), i.e. ``v`` is the
viewing direction (the map axis that projects onto the image normal). Orientation ``i``
is direction ``i // n_ψ`` with ψ index ``i % n_ψ``.

Local search
------------
:func:`local_neighbourhood` selects, for each particle, the grid orientations within a
rotation angle ``ρ`` of its previous pose, measured as the angle of ``A_1 A_2ᵀ``
(``cos θ = (tr(A_1 A_2ᵀ) − 1)/2``; ``tr(A_1 A_2ᵀ) = Σ_ij A_1,ij A_2,ij`` is one GEMM
``(b, 9) × (9, r)``).

Perturbation
------------
:meth:`OrientationGrid.rotated` turns the whole grid by one rotation ``Q``
(``A ↦ A·Qᵀ``, i.e. the map frame is rotated): the grid stays uniform, and a random
small ``Q`` per iteration (:func:`random_grid_rotation`) plays the role of RELION's
per-iteration random perturbation of the sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cryoavg.ops.rotations import (
    axis_angle_to_matrix,
    euler_angles_to_matrix,
    matrix_to_euler_angles,
)

__all__ = [
    "OrientationGrid",
    "directions_to_angles",
    "fibonacci_directions",
    "local_neighbourhood",
    "random_grid_rotation",
    "rotation_distance_degrees",
]

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def fibonacci_directions(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` nearly uniform unit vectors on the sphere (golden-angle spiral).

    Parameters
    ----------
    n
        Number of directions (≥ 1).
    dtype
        Result dtype.

    Returns
    -------
    torch.Tensor
        ``(n, 3)`` unit vectors, xyz.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    radius = torch.sqrt((1.0 - z * z).clamp(min=0.0))
    phi = i * _GOLDEN_ANGLE
    return torch.stack([radius * torch.cos(phi), radius * torch.sin(phi), z], -1).to(
        dtype
    )


def directions_to_angles(directions: torch.Tensor) -> torch.Tensor:
    """RELION ``(rot, tilt)`` in degrees of unit viewing directions.

    Parameters
    ----------
    directions
        ``(..., 3)`` unit vectors (xyz).

    Returns
    -------
    torch.Tensor
        ``(..., 2)`` ``(rot, tilt)`` in degrees (tilt in [0, 180]).
    """
    v = directions.to(torch.float64)
    rot = torch.rad2deg(torch.atan2(v[..., 1], v[..., 0]))
    tilt = torch.rad2deg(torch.acos(v[..., 2].clamp(-1.0, 1.0)))
    return torch.stack([rot, tilt], -1)


def rotation_distance_degrees(
    matrices_a: torch.Tensor, matrices_b: torch.Tensor
) -> torch.Tensor:
    """Pairwise rotation angle between two sets of rotations (degrees).

    Parameters
    ----------
    matrices_a
        ``(b, 3, 3)``.
    matrices_b
        ``(r, 3, 3)``.

    Returns
    -------
    torch.Tensor
        ``(b, r)`` angle of ``A_i B_jᵀ`` in [0, 180].
    """
    a = matrices_a.to(torch.float64).reshape(-1, 9)
    b = matrices_b.to(torch.float64).reshape(-1, 9)
    cos = ((a @ b.T) - 1.0) / 2.0
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def random_grid_rotation(
    max_angle_degrees: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random rotation about a uniform axis by an angle uniform in ``[0, max]``.

    Parameters
    ----------
    max_angle_degrees
        Largest rotation angle (degrees); 0 gives the identity.
    generator
        Optional CPU generator.

    Returns
    -------
    torch.Tensor
        ``(3, 3)`` float64 rotation matrix.
    """
    axis = torch.randn(3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm().clamp(min=1e-12)
    angle = math.radians(max_angle_degrees) * float(
        torch.rand((), generator=generator, dtype=torch.float64)
    )
    return axis_angle_to_matrix(axis * angle)


@dataclass(frozen=True)
class OrientationGrid:
    """A uniform grid of 3D orientations (RELION angles).

    Attributes
    ----------
    angles_degrees
        ``(r, 3)`` float64 ``(rot, tilt, psi)``.
    step_degrees
        The nominal angular step ``s``.
    n_directions
        ``d``.
    n_psi
        ``n_ψ`` (``r = d · n_ψ``).
    """

    angles_degrees: torch.Tensor
    step_degrees: float
    n_directions: int
    n_psi: int
    _matrices: dict = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def uniform(cls, step_degrees: float) -> OrientationGrid:
        """The uniform grid for an angular step (see the module docstring).

        Parameters
        ----------
        step_degrees
            Angular step in degrees, ``0 < s ≤ 90``.

        Returns
        -------
        OrientationGrid
        """
        step = float(step_degrees)
        if not 0.0 < step <= 90.0:
            raise ValueError(f"angular step must be in (0, 90] degrees, got {step}")
        n_dir = max(2, math.ceil(4.0 * math.pi / math.radians(step) ** 2))
        n_psi = max(1, math.ceil(360.0 / step - 1e-9))
        rot_tilt = directions_to_angles(fibonacci_directions(n_dir))  # (d, 2)
        psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
        psi = torch.where(psi > 180.0, psi - 360.0, psi)
        angles = torch.cat(
            [
                rot_tilt[:, None, :].expand(n_dir, n_psi, 2),
                psi[None, :, None].expand(n_dir, n_psi, 1),
            ],
            -1,
        ).reshape(-1, 3)
        return cls(angles, step, n_dir, n_psi)

    @property
    def n_orientations(self) -> int:
        """``r``."""
        return int(self.angles_degrees.shape[0])

    def matrices(self) -> torch.Tensor:
        """``(r, 3, 3)`` float64 RELION matrices ``A`` (computed once per grid)."""
        cached = self._matrices.get("value")
        if cached is None:
            cached = euler_angles_to_matrix(self.angles_degrees)
            self._matrices["value"] = cached
        return cached

    def rotated(self, rotation: torch.Tensor) -> OrientationGrid:
        """The grid with its map frame turned by ``rotation`` (``A ↦ A·Qᵀ``).

        Parameters
        ----------
        rotation
            ``(3, 3)`` rotation ``Q``.

        Returns
        -------
        OrientationGrid
        """
        q = rotation.to(torch.float64)
        angles = matrix_to_euler_angles(self.matrices() @ q.T)
        return OrientationGrid(angles, self.step_degrees, self.n_directions, self.n_psi)


def local_neighbourhood(
    grid: OrientationGrid,
    poses_degrees: torch.Tensor,
    max_angle_degrees: float,
    *,
    max_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid orientations within ``max_angle`` of each particle's pose, nearest first.

    Every particle gets at least its nearest grid orientation.

    Parameters
    ----------
    grid
        The orientation grid (``r`` orientations).
    poses_degrees
        ``(b, 3)`` previous RELION angles of the particles.
    max_angle_degrees
        Search radius ``ρ`` (rotation angle, degrees).
    max_count
        Optional cap on the orientations kept per particle (the nearest ones).

    Returns
    -------
    indices : torch.Tensor
        ``(b, m)`` int64 grid indices, padded with the particle's nearest index.
    valid : torch.Tensor
        ``(b, m)`` bool, False on padding.
    """
    # cos of the rotation angle, (tr(A_1 A_2ᵀ) − 1) / 2 (one GEMM; no acos of (b, r))
    a = euler_angles_to_matrix(poses_degrees.to(torch.float64)).reshape(-1, 9)
    cos = (a @ grid.matrices().reshape(-1, 9).T - 1.0) / 2.0  # (b, r)
    inside = cos >= math.cos(math.radians(min(max(max_angle_degrees, 0.0), 180.0)))
    inside[torch.arange(cos.shape[0]), cos.argmax(1)] = True
    counts = inside.sum(1)
    m = int(counts.max())
    if max_count is not None:
        m = min(m, max(1, int(max_count)))
    ordered = torch.where(inside, cos, -math.inf)
    # the m nearest (a partial sort: m is small next to the r of a fine grid)
    cos_sorted, indices = torch.topk(ordered, m, dim=1, largest=True, sorted=True)
    valid = torch.isfinite(cos_sorted)
    indices = torch.where(valid, indices, indices[:, :1])
    return indices, valid
