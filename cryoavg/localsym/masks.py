"""RELION ``relion_mask_create`` (spec §E): masks for local-symmetry regions.

Conventions: volumes ``(n, n, n)`` indexed ``[z, y, x]``; distances in pixels,
Euclidean (exact distance transform); the box centre is voxel ``n // 2``.
"""

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from cryoavg.ops._grids import centred_coordinate_grid
from cryoavg.ops.fourier import lowpass_filter

__all__ = ["create_mask", "create_mask_denovo", "mask_around_point"]


def create_mask(
    volume: torch.Tensor,
    ini_threshold: float = 0.01,
    extend_inimask_px: float = 0.0,
    width_soft_edge_px: float = 0.0,
    *,
    lowpass_angstrom: float | None = None,
    pixel_size_angstrom: float | None = None,
    invert: bool = False,
) -> torch.Tensor:
    """Mask from a map: low-pass, threshold, extend, raised-cosine soft edge (§E).

    Parameters
    ----------
    volume
        ``(n, n, n)`` map.
    ini_threshold
        Binarisation threshold ``theta``: voxels ``>= theta`` become 1.
    extend_inimask_px
        ``e`` > 0: a 0-voxel becomes 1 when a 1-voxel lies at distance ``< e``; ``e`` < 0
        shrinks: a 1-voxel becomes 0 when a 0-voxel lies within ``< |e|``.
    width_soft_edge_px
        ``w``: every 0-voxel at distance ``d < w`` from the binary mask becomes
        ``0.5 + 0.5 cos(pi d / w)``.
    lowpass_angstrom
        Low-pass resolution in Å applied first (RELION raised-cosine edge of ±1 shell);
        None or <= 0 for none.
    pixel_size_angstrom
        Pixel size in Å (needed with ``lowpass_angstrom``).
    invert
        Return ``1 - mask``.

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` float32 mask in [0, 1].
    """
    data = volume.float()
    if lowpass_angstrom is not None and lowpass_angstrom > 0:
        if pixel_size_angstrom is None or not pixel_size_angstrom > 0:
            raise ValueError("lowpass_angstrom needs a positive pixel_size_angstrom")
        data = lowpass_filter(data, lowpass_angstrom, pixel_size_angstrom, 2, ndim=3)
    binary = (data >= ini_threshold).cpu().numpy()
    if extend_inimask_px > 0 and binary.any():
        distance = ndimage.distance_transform_edt(~binary)
        binary = binary | (distance < extend_inimask_px)
    elif extend_inimask_px < 0 and (~binary).any():
        distance = ndimage.distance_transform_edt(binary)
        binary = binary & ~(distance < -extend_inimask_px)
    mask = binary.astype(np.float32)
    if width_soft_edge_px > 0 and binary.any():
        distance = ndimage.distance_transform_edt(~binary)
        edge = (~binary) & (distance < width_soft_edge_px)
        mask[edge] = 0.5 + 0.5 * np.cos(np.pi * distance[edge] / width_soft_edge_px)
    result = torch.from_numpy(mask).to(volume.device)
    return 1.0 - result if invert else result


def create_mask_denovo(
    box_size: int,
    inner_radius_px: float = 0.0,
    outer_radius_px: float = 99999.0,
    width_soft_edge_px: float = 0.0,
    center_px: Sequence[float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """De novo spherical shell mask (``relion_mask_create --denovo``, §E).

    Parameters
    ----------
    box_size
        Box size ``n``.
    inner_radius_px, outer_radius_px
        The mask is 1 for ``inner <= d < outer``.
    width_soft_edge_px
        Cosine edge width ``w`` (inside the inner radius and outside the outer one).
    center_px
        ``(x, y, z)`` centre in pixels relative to the box centre.

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` float32 mask.
    """
    grid = torch.flip(
        centred_coordinate_grid((box_size,) * 3, dtype=torch.float64), dims=(-1,)
    )
    d = (grid - torch.tensor(list(center_px), dtype=torch.float64)).norm(dim=-1)
    w = max(float(width_soft_edge_px), 1e-12)
    inner, outer = float(inner_radius_px), float(outer_radius_px)
    mask = torch.zeros_like(d)
    rising = (d >= inner - w) & (d < inner)
    mask = torch.where(
        rising, 0.5 - 0.5 * torch.cos(torch.pi * (d - (inner - w)) / w), mask
    )
    mask = torch.where((d >= inner) & (d < outer), torch.ones_like(d), mask)
    falling = (d >= outer) & (d < outer + w)
    mask = torch.where(
        falling, 0.5 - 0.5 * torch.cos(torch.pi * (outer + w - d) / w), mask
    )
    return mask.float()


def mask_around_point(
    volume: torch.Tensor,
    center_px: Sequence[float],
    radius_px: float,
    ini_threshold: float,
    extend_inimask_px: float = 2.0,
    width_soft_edge_px: float = 3.0,
    **kwargs: float | None,
) -> torch.Tensor:
    """Mask of the density near a point (one subunit): threshold inside a sphere.

    The map is multiplied by a hard ball of ``radius_px`` around ``center_px`` (xyz,
    pixels from the box centre) before :func:`create_mask`.

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` mask.
    """
    ball = create_mask_denovo(volume.shape[-1], 0.0, radius_px, 0.0, center_px)
    return create_mask(
        volume * ball.to(volume),
        ini_threshold,
        extend_inimask_px,
        width_soft_edge_px,
        **kwargs,  # type: ignore[arg-type]
    )
