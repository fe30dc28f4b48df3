"""Soft circular/spherical masks, RELION background replacement and centres of mass.

Conventions owned by this module
--------------------------------
* Images ``(..., h, w)``, volumes ``(..., d, h, w)``. Radii are measured in pixels from
  the origin pixel ``n // 2`` of every axis.
* Raised-cosine mask of radius ``R`` and edge width ``w`` (spec §0.5): 1 for ``r <= R``,
  ``0.5 + 0.5 cos(pi (r - R) / w)`` for ``R < r < R + w`` and 0 beyond ``R + w``;
  ``w = 0`` gives a hard edge.
* Background replacement (RELION ``softMaskOutsideMap``): with the background weight
  ``c(r) = 1 - mask(r)`` (0 inside ``R``, 1 beyond ``R + w``) every pixel becomes
  ``(1 - c) * value + c * b``. ``b`` is the ``c``-weighted mean of the image outside
  ``R`` (one value per image) when no background is given, or a per-pixel noise image.
* Centres of mass are ``(y, x)`` / ``(z, y, x)`` pixel offsets from the origin
  ``n // 2``.
"""

from collections.abc import Sequence

import torch

from cryoavg.ops._grids import (
    centred_coordinate_grid,
    centred_radius_grid,
    validate_shape,
)

__all__ = [
    "center_of_mass_2d",
    "center_of_mass_3d",
    "circular_mask_2d",
    "soft_mask_outside_2d",
    "soft_mask_outside_3d",
    "spherical_mask_3d",
]


def _raised_cosine(
    radius: torch.Tensor, radius_px: float, soft_edge_px: float
) -> torch.Tensor:
    if radius_px < 0 or soft_edge_px < 0:
        raise ValueError(
            f"radius_px ({radius_px}) and soft_edge_px ({soft_edge_px}) must be >= 0"
        )
    if soft_edge_px == 0:
        return (radius <= radius_px).to(radius.dtype)
    phase = ((radius - radius_px) / soft_edge_px).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(torch.pi * phase)


def circular_mask_2d(
    image_shape: Sequence[int],
    radius_px: float,
    soft_edge_px: float = 0.0,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Raised-cosine circular mask centred on pixel ``(h // 2, w // 2)``.

    Parameters
    ----------
    image_shape
        ``(h, w)``.
    radius_px
        Radius ``R`` of the fully-passing disc, pixels.
    soft_edge_px
        Width ``w`` of the cosine edge, pixels (0 = hard edge).
    device, dtype
        Placement of the result.

    Returns
    -------
    torch.Tensor
        ``(h, w)`` mask values in [0, 1].
    """
    shape = validate_shape(image_shape, 2)
    radius = centred_radius_grid(shape, device=device, dtype=dtype)
    return _raised_cosine(radius, radius_px, soft_edge_px)


def spherical_mask_3d(
    volume_shape: Sequence[int],
    radius_px: float,
    soft_edge_px: float = 0.0,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Raised-cosine spherical mask centred on voxel ``(d // 2, h // 2, w // 2)``.

    Parameters
    ----------
    volume_shape
        ``(d, h, w)``.
    radius_px
        Radius ``R`` of the fully-passing ball, pixels.
    soft_edge_px
        Width ``w`` of the cosine edge, pixels (0 = hard edge).
    device, dtype
        Placement of the result.

    Returns
    -------
    torch.Tensor
        ``(d, h, w)`` mask values in [0, 1].
    """
    shape = validate_shape(volume_shape, 3, "volume_shape")
    radius = centred_radius_grid(shape, device=device, dtype=dtype)
    return _raised_cosine(radius, radius_px, soft_edge_px)


def _soft_mask_outside(
    data: torch.Tensor,
    ndim: int,
    radius_px: float | None,
    soft_edge_px: float,
    background: torch.Tensor | float | None,
) -> torch.Tensor:
    if data.ndim < ndim:
        raise ValueError(
            f"input must have at least {ndim} dimensions, got shape {tuple(data.shape)}"
        )
    shape = tuple(data.shape[-ndim:])
    if radius_px is None:
        radius_px = shape[-1] / 2.0  # RELION default R = N/2
    dtype = data.dtype if data.dtype.is_floating_point else None
    radius = centred_radius_grid(shape, device=data.device, dtype=dtype)
    weight = 1.0 - _raised_cosine(
        radius, radius_px, soft_edge_px
    )  # c(r): 0 inside, 1 far out
    dims = tuple(range(-ndim, 0))
    if background is None:
        total = weight.sum()
        if float(total) <= 0:
            raise ValueError(
                f"no background pixels outside radius_px={radius_px} "
                f"(+{soft_edge_px}) for shape {shape}"
            )
        fill = (data * weight).sum(dim=dims, keepdim=True) / total  # (..., 1, 1)
    else:
        fill = torch.as_tensor(background, dtype=data.dtype, device=data.device)
        if fill.ndim > 0 and tuple(fill.shape[-ndim:]) != shape:
            raise ValueError(
                f"background image must end with shape {shape}, got {tuple(fill.shape)}"
            )
    return (1.0 - weight) * data + weight * fill


def soft_mask_outside_2d(
    images: torch.Tensor,
    radius_px: float | None,
    soft_edge_px: float = 3.0,
    background: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """RELION ``softMaskOutsideMap`` for images: blend the outside into a background.

    Pixels with ``r < R`` are unchanged; in the edge ``R <= r <= R + w`` the value
    becomes ``(1 - c) * value + c * b`` with ``c = 0.5 + 0.5 cos(pi (R + w - r) / w)``;
    beyond ``R + w`` it becomes ``b``.

    Parameters
    ----------
    images
        ``(..., h, w)`` images.
    radius_px
        Radius ``R`` in pixels; None gives RELION's default ``w / 2`` (half the box).
    soft_edge_px
        Edge width ``w`` in pixels (RELION default 3).
    background
        None: ``b`` is each image's ``c``-weighted mean over ``r >= R`` (what RELION's
        ``--zero_mask`` does). A ``(..., h, w)`` tensor: per-pixel background (noise
        image), broadcastable against ``images``. A float: constant background.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)`` images with the background replaced.
    """
    return _soft_mask_outside(images, 2, radius_px, soft_edge_px, background)


def soft_mask_outside_3d(
    volumes: torch.Tensor,
    radius_px: float | None,
    soft_edge_px: float = 3.0,
    background: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """3D version of :func:`soft_mask_outside_2d` (spherical).

    Parameters
    ----------
    volumes
        ``(..., d, h, w)`` volumes.
    radius_px
        Radius ``R`` in pixels; None gives half the box.
    soft_edge_px
        Edge width ``w`` in pixels.
    background
        None (weighted mean of the background), a ``(..., d, h, w)`` noise volume or a
        float.

    Returns
    -------
    torch.Tensor
        ``(..., d, h, w)`` volumes with the background replaced.
    """
    return _soft_mask_outside(volumes, 3, radius_px, soft_edge_px, background)


def _center_of_mass(data: torch.Tensor, ndim: int, positive_only: bool) -> torch.Tensor:
    if data.ndim < ndim:
        raise ValueError(
            f"input must have at least {ndim} dimensions, got shape {tuple(data.shape)}"
        )
    shape = tuple(data.shape[-ndim:])
    weights = data.clamp(min=0) if positive_only else data
    coordinates = centred_coordinate_grid(
        shape, device=data.device, dtype=data.dtype
    )  # (*shape, ndim)
    total = weights.flatten(-ndim).sum(-1)  # (...)
    moments = weights.flatten(-ndim) @ coordinates.reshape(-1, ndim)  # (..., ndim)
    nonzero = total != 0
    safe_total = torch.where(nonzero, total, torch.ones_like(total))
    return torch.where(
        nonzero[..., None], moments / safe_total[..., None], torch.zeros_like(moments)
    )


def center_of_mass_2d(images: torch.Tensor, positive_only: bool = True) -> torch.Tensor:
    """Centre of mass of images relative to the origin pixel ``(h // 2, w // 2)``.

    Parameters
    ----------
    images
        ``(..., h, w)`` images.
    positive_only
        Use only positive pixel values as masses (RELION's class centring, spec §A.9.2).

    Returns
    -------
    torch.Tensor
        ``(..., 2)`` ``(y, x)`` offsets in pixels (0 for an image with zero total mass).
    """
    return _center_of_mass(images, 2, positive_only)


def center_of_mass_3d(
    volumes: torch.Tensor, positive_only: bool = True
) -> torch.Tensor:
    """Centre of mass of volumes relative to the origin voxel.

    Parameters
    ----------
    volumes
        ``(..., d, h, w)`` volumes.
    positive_only
        Use only positive voxel values as masses.

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` ``(z, y, x)`` offsets in pixels.
    """
    return _center_of_mass(volumes, 3, positive_only)
