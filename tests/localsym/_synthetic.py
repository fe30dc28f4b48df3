"""Analytic synthetic maps: two (or more) copies of a Gaussian-atom blob related by known operators."""

import torch

from cryoavg.localsym.masks import create_mask
from cryoavg.localsym.operators import LocalSymmetryOperator
from cryoavg.ops._grids import centred_coordinate_grid


def blob_atoms(
    n_atoms: int = 12, spread_px: float = 4.0, seed: int = 0
) -> torch.Tensor:
    """(n_atoms, 3) xyz atom positions (px) around the origin, asymmetric."""
    generator = torch.Generator().manual_seed(seed)
    atoms = (
        torch.randn((n_atoms, 3), generator=generator, dtype=torch.float64) * spread_px
    )
    return atoms


def render_atoms(
    atoms_xyz: torch.Tensor, size: int, sigma_px: float = 1.6
) -> torch.Tensor:
    """Sum of isotropic Gaussians at xyz positions (px from the box centre), (n, n, n)."""
    grid = torch.flip(centred_coordinate_grid((size,) * 3, dtype=torch.float64), (-1,))
    out = torch.zeros((size,) * 3, dtype=torch.float64)
    for atom in atoms_xyz:
        out += torch.exp(-((grid - atom) ** 2).sum(-1) / (2 * sigma_px**2))
    return out


def transform_points(
    points_xyz: torch.Tensor, operator: LocalSymmetryOperator, pixel_size: float
) -> torch.Tensor:
    return points_xyz @ operator.matrix().T + operator.translation_px(pixel_size)


def operator_between(
    angles_degrees, centre_a_px, centre_b_px, pixel_size: float
) -> LocalSymmetryOperator:
    """Operator with the given angles moving a copy centred at A onto centre B."""
    rotation = LocalSymmetryOperator(*angles_degrees).matrix()
    t_px = torch.tensor(centre_b_px, dtype=torch.float64) - rotation @ torch.tensor(
        centre_a_px, dtype=torch.float64
    )
    return LocalSymmetryOperator(*angles_degrees, tuple((t_px * pixel_size).tolist()))


def two_copy_map(
    operator: LocalSymmetryOperator,
    size: int = 48,
    pixel_size: float = 2.0,
    centre_px=(-9.0, 3.0, 2.0),
    seed: int = 0,
    spread_px: float = 3.0,
    sigma_px: float = 1.6,
):
    """Map with copy A at ``centre_px`` and copy B = T(A); returns (map, mask_A, atoms_A)."""
    atoms = blob_atoms(12, spread_px, seed) + torch.tensor(
        centre_px, dtype=torch.float64
    )
    copy_a = render_atoms(atoms, size, sigma_px)
    copy_b = render_atoms(transform_points(atoms, operator, pixel_size), size, sigma_px)
    mask = create_mask(copy_a.float(), 0.05, 2.0, 3.0)
    return (copy_a + copy_b).float(), mask, copy_a.float(), copy_b.float()
