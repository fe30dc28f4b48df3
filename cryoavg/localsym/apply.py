"""Impose, duplicate and apply local-symmetry operators (spec §D.3, §D.4, §D.6).

Conventions: maps and masks are ``(n, n, n)`` tensors indexed ``[z, y, x]``; operators
are given as matrices ``A`` ``(k, 3, 3)`` acting on xyz columns and translations ``t``
``(k, 3)`` in pixels (xyz), see :mod:`cryoavg.localsym.operators`. Every resampling is
:func:`cryoavg.ops.transforms.transform_volumes_3d` (trilinear, 0 outside the box),
which is differentiable, so :func:`apply_local_symmetry` can sit inside an autograd
graph.
"""

from collections.abc import Sequence

import torch

from cryoavg.ops._grids import centred_coordinate_grid, centred_radius_grid
from cryoavg.ops.transforms import transform_volumes_3d

__all__ = [
    "MASK_EPS",
    "apply_local_symmetry",
    "check_operators_in_sphere",
    "duplicate_masked_density",
    "inverse_operators",
    "soft_sphere_3d",
    "transform_map",
]

#: mask values at or below this are "outside" (RELION's XMIPP_EQUAL_ACCURACY scale)
MASK_EPS = 1e-6


def inverse_operators(
    matrices: torch.Tensor, translations_px: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse operators ``(A^T, -A^T t)`` of ``(k, 3, 3)`` / ``(k, 3)`` operators."""
    inverse = matrices.transpose(-1, -2)
    return inverse, -torch.einsum("...ij,...j->...i", inverse, translations_px)


def transform_map(
    volume: torch.Tensor, matrix: torch.Tensor, translation_px: torch.Tensor
) -> torch.Tensor:
    """Apply operators to a map: ``out(x) = in(A^T (x - t))`` (``--transform``).

    Parameters
    ----------
    volume
        ``(n, n, n)`` map.
    matrix
        ``(3, 3)`` or ``(k, 3, 3)`` matrices ``A`` (xyz).
    translation_px
        ``(3,)`` or ``(k, 3)`` translations ``t`` in pixels (xyz).

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` or ``(k, n, n, n)`` transformed maps.
    """
    return transform_volumes_3d(volume, matrix, translation_px)


def _pull_back(
    volume: torch.Tensor, matrices: torch.Tensor, translations_px: torch.Tensor
) -> torch.Tensor:
    """``out_i(x) = volume(A_i x + t_i)`` for all operators, ``(k, n, n, n)``."""
    inverse, inverse_t = inverse_operators(matrices, translations_px)
    return transform_volumes_3d(volume, inverse, inverse_t)


def apply_local_symmetry(
    volume: torch.Tensor,
    masks: Sequence[torch.Tensor],
    operators: Sequence[tuple[torch.Tensor, torch.Tensor]],
    eps: float = MASK_EPS,
) -> torch.Tensor:
    """Impose local symmetry on a map (RELION ``applyLocalSymmetry``, §D.3).

    For each mask ``M`` with operators ``T_1..T_k``:
    ``V(x) = (ori(x) + sum_i ori(T_i x)) M(x) / (k + 1)`` where ``M > eps`` (else 0);
    ``S += V + sum_i V(T_i^-1 x)``; ``W += M + sum_i M(T_i^-1 x)``. The result is
    ``S / W`` where ``W > 1 + eps``, ``S + (1 - W) ori`` where ``eps < W < 1 - eps``,
    ``S`` where ``|W - 1| <= eps`` and ``ori`` where ``W <= eps`` (unchanged outside
    every mask).

    Parameters
    ----------
    volume
        ``(n, n, n)`` map ``ori``.
    masks
        One ``(n, n, n)`` mask in [0, 1] per set of identical regions.
    operators
        Per mask, ``(matrices (k, 3, 3), translations_px (k, 3))``.
    eps
        Tolerance on mask and weight values.

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` symmetrised map (differentiable with respect to every input).
    """
    if len(masks) != len(operators):
        raise ValueError(f"got {len(masks)} masks but {len(operators)} operator sets")
    dtype = volume.dtype if volume.dtype.is_floating_point else torch.float32
    ori = volume.to(dtype)
    total = torch.zeros_like(ori)
    weight = torch.zeros_like(ori)
    for mask, (matrices, translations) in zip(masks, operators, strict=True):
        if tuple(mask.shape) != tuple(ori.shape):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} differs from the map's "
                f"{tuple(ori.shape)}"
            )
        mask = mask.to(ori)
        matrices = matrices.to(ori)
        translations = translations.to(ori)
        n_copies = matrices.shape[0] + 1
        copies = _pull_back(ori, matrices, translations)  # (k, n, n, n)
        average = (ori + copies.sum(0)) * mask / n_copies
        average = torch.where(mask > eps, average, torch.zeros_like(average))
        total = (
            total
            + average
            + transform_volumes_3d(average, matrices, translations).sum(0)
        )
        weight = (
            weight + mask + transform_volumes_3d(mask, matrices, translations).sum(0)
        )
    return torch.where(
        weight > 1.0 + eps,
        total / weight.clamp(min=1.0),
        torch.where(
            weight > 1.0 - eps,
            total,
            torch.where(weight > eps, total + (1.0 - weight) * ori, ori),
        ),
    )


def duplicate_masked_density(
    masks: Sequence[torch.Tensor],
    operators: Sequence[tuple[torch.Tensor, torch.Tensor]],
    volume: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replicate masked density (or the masks) by the operators (``--duplicate``, §D.4).

    ``out = sum_m [ R_m + sum_i T_i(R_m) ]`` with ``R_m = ori M_m`` (or ``M_m`` when no
    map is given) and ``T_i(f)(x) = f(A_i^T (x - t_i))``.

    Parameters
    ----------
    masks
        ``(n, n, n)`` masks.
    operators
        Per mask ``(matrices (k, 3, 3), translations_px (k, 3))``.
    volume
        Optional ``(n, n, n)`` map.

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` duplicated density.
    """
    if not masks:
        raise ValueError("at least one mask is needed")
    out = torch.zeros_like(masks[0], dtype=torch.float32)
    for mask, (matrices, translations) in zip(masks, operators, strict=True):
        region = mask.float() if volume is None else mask.float() * volume.float()
        out = (
            out
            + region
            + transform_volumes_3d(region, matrices.float(), translations.float()).sum(
                0
            )
        )
    return out


def soft_sphere_3d(
    volume: torch.Tensor,
    sphere_percentage: float,
    width_px: float = 5.0,
    *,
    relion_inverted_edge: bool = False,
) -> torch.Tensor:
    """The optional final spherical mask of ``--apply --sphere_percentage f`` (§D.3).

    Radius ``R = f * n / 2``; voxels beyond ``R + w`` are 0 and those in the edge are
    multiplied by the usual falling raised cosine ``0.5 + 0.5 cos(pi (r - R) / w)``.

    Parameters
    ----------
    volume
        ``(n, n, n)`` map.
    sphere_percentage
        ``f`` in (0, 0.99).
    width_px
        Edge width ``w`` in pixels.
    relion_inverted_edge
        Reproduce RELION's bug: the edge factor is ``0.5 + 0.5 cos(pi (R + w - r) / w)``
        (0 at ``R``, rising to 1 at ``R + w``).

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` masked map.
    """
    if not 0.0 < sphere_percentage < 0.99:
        raise ValueError(
            f"sphere_percentage must be in (0, 0.99), got {sphere_percentage}"
        )
    radius = sphere_percentage * min(volume.shape[-3:]) / 2.0
    r = centred_radius_grid(volume.shape[-3:], device=volume.device, dtype=volume.dtype)
    inside_edge = (r > radius) & (r <= radius + width_px)
    phase = (radius + width_px - r) if relion_inverted_edge else (r - radius)
    edge = 0.5 + 0.5 * torch.cos(torch.pi * phase / max(width_px, 1e-9))
    factor = torch.where(
        r <= radius,
        torch.ones_like(r),
        torch.where(inside_edge, edge, torch.zeros_like(r)),
    )
    return volume * factor


def check_operators_in_sphere(
    mask: torch.Tensor,
    matrices: torch.Tensor,
    translations_px: torch.Tensor,
    radius_px: float | None = None,
    eps: float = MASK_EPS,
) -> list[int]:
    """Operators that move the masked region outside the box's maximal sphere.

    Parameters
    ----------
    mask
        ``(n, n, n)`` mask; its region is every voxel with value > ``eps``.
    matrices, translations_px
        ``(k, 3, 3)`` and ``(k, 3)`` operators (xyz, pixels).
    radius_px
        Sphere radius; default ``n / 2``.
    eps
        Mask threshold.

    Returns
    -------
    list of int
        Indices of the offending operators; ``-1`` first when the region itself is
        already outside the sphere.
    """
    n = min(mask.shape[-3:])
    radius = n / 2.0 if radius_px is None else float(radius_px)
    positions = centred_coordinate_grid(mask.shape[-3:], dtype=torch.float64)
    points = torch.flip(positions[mask > eps], dims=(-1,))  # (p, 3) xyz
    bad: list[int] = []
    if points.numel() == 0:
        return bad
    if float(points.norm(dim=-1).max()) > radius + 1e-6:
        bad.append(-1)
    moved = (
        torch.einsum("kij,pj->kpi", matrices.double(), points)
        + translations_px.double()[:, None, :]
    )
    too_far = moved.norm(dim=-1).amax(dim=-1) > radius + 1e-6
    bad.extend(int(i) for i in torch.nonzero(too_far).flatten())
    return bad
