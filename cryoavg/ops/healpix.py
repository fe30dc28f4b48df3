"""HEALPix sampling of the sphere (ring scheme), as RELION samples viewing directions.

Conventions owned by this module
--------------------------------
* ``order`` ``o`` gives ``n_side = 2**o`` and ``12 n_side^2`` equal-area pixels; RELION
  calls ``360 / (6 * 2**o)`` degrees the angular step of order ``o`` (spec §D.5.6,
  §A.6).
* Pixel centres are returned as ``(tilt, rot)`` = polar angle ``theta`` from +z and
  azimuth ``phi``, both in degrees, so that a viewing direction is RELION Euler
  ``(rot, tilt, psi)`` with any ``psi``. Pixels are numbered in the ring scheme
  (north to south, increasing azimuth within a ring).
* The formulas are the standard ring-scheme pixel centres of the HEALPix construction
  (Górski et al. 2005): north polar cap, equatorial belt, south polar cap.
"""

import math

import torch

__all__ = [
    "healpix_order_for_step",
    "healpix_pixel_centres",
    "healpix_step_degrees",
]


def healpix_step_degrees(order: int) -> float:
    """RELION's nominal angular step of a HEALPix order: ``360 / (6 * 2**order)``."""
    if order < 0:
        raise ValueError(f"HEALPix order must be >= 0, got {order}")
    return 360.0 / (6.0 * 2**order)


def healpix_order_for_step(step_degrees: float, max_order: int = 13) -> int:
    """First order whose nominal step is below ``step_degrees`` (§D.5.6).

    Raises
    ------
    ValueError
        If ``step_degrees`` is not positive or needs an order above ``max_order``.
    """
    if not step_degrees > 0:
        raise ValueError(f"angular step must be > 0, got {step_degrees}")
    for order in range(max_order + 1):
        if healpix_step_degrees(order) < step_degrees:
            return order
    raise ValueError(
        f"angular step {step_degrees}° needs a HEALPix order above {max_order}"
    )


def healpix_pixel_centres(
    order: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of all ``12 * 4**order`` pixels, ring scheme.

    Parameters
    ----------
    order
        HEALPix order (``n_side = 2**order``).
    dtype
        Floating dtype of the result.

    Returns
    -------
    tilt_degrees, rot_degrees : torch.Tensor
        ``(12 n_side^2,)`` polar angles in [0, 180] and azimuths in [0, 360).
    """
    if order < 0:
        raise ValueError(f"HEALPix order must be >= 0, got {order}")
    n_side = 2**order
    n_pix = 12 * n_side * n_side
    n_cap = 2 * n_side * (n_side - 1)  # pixels in one polar cap
    p = torch.arange(n_pix, dtype=torch.float64)
    z = torch.empty(n_pix, dtype=torch.float64)
    phi = torch.empty(n_pix, dtype=torch.float64)

    north = p < n_cap
    # ring i (1-based) holds 4 i pixels; j (1-based) along the ring
    i = torch.floor((1.0 + torch.sqrt(1.0 + 2.0 * p[north])) / 2.0)
    j = p[north] - 2.0 * i * (i - 1.0) + 1.0
    z[north] = 1.0 - i * i / (3.0 * n_side * n_side)
    phi[north] = (j - 0.5) * math.pi / (2.0 * i)

    belt = (p >= n_cap) & (p < n_pix - n_cap)
    q = p[belt] - n_cap
    i = torch.floor(q / (4 * n_side)) + n_side  # ring index n_side .. 3 n_side
    j = torch.remainder(q, 4 * n_side) + 1.0
    s = torch.remainder(i - n_side + 1.0, 2.0)  # 1 on rings shifted by half a pixel
    z[belt] = (2.0 * n_side - i) * 2.0 / (3.0 * n_side)
    phi[belt] = (j - s / 2.0) * math.pi / (2.0 * n_side)

    south = p >= n_pix - n_cap
    q = n_pix - p[south]
    i = torch.floor((1.0 + torch.sqrt(2.0 * q - 1.0)) / 2.0)
    j = 4.0 * i + 1.0 - (q - 2.0 * i * (i - 1.0))
    z[south] = -1.0 + i * i / (3.0 * n_side * n_side)
    phi[south] = (j - 0.5) * math.pi / (2.0 * i)

    tilt = torch.rad2deg(torch.acos(z.clamp(-1.0, 1.0)))
    rot = torch.rad2deg(torch.remainder(phi, 2.0 * math.pi))
    return tilt.to(dtype), rot.to(dtype)
