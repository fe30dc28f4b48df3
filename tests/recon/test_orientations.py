"""Uniform SO(3) grid and local neighbourhoods (cryoavg.recon.orientations)."""

import pytest
import torch

from cryoavg.ops.rotations import euler_angles_to_matrix, random_rotations
from cryoavg.recon.orientations import (
    OrientationGrid,
    fibonacci_directions,
    local_neighbourhood,
    random_grid_rotation,
    rotation_distance_degrees,
)


@pytest.mark.parametrize("step", [30.0, 15.0])
def test_direction_spacing_close_to_step(step):
    grid = OrientationGrid.uniform(step)
    directions = fibonacci_directions(grid.n_directions)
    cos = (directions @ directions.T).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos))
    angle.fill_diagonal_(360.0)
    nearest = angle.min(1).values
    assert float(nearest.max()) <= 1.05 * step
    assert float(nearest.min()) >= 0.5 * step
    assert grid.n_psi == round(360 / step)
    assert grid.n_orientations == grid.n_directions * grid.n_psi


@pytest.mark.parametrize("step", [30.0, 15.0])
def test_grid_covers_so3(step):
    grid = OrientationGrid.uniform(step)
    generator = torch.Generator().manual_seed(0)
    probes = euler_angles_to_matrix(
        random_rotations(1000, generator, dtype=torch.float64)
    )
    distance = rotation_distance_degrees(probes, grid.matrices()).min(1).values
    # every rotation lies within about one step of the grid (covering radius)
    assert float(distance.max()) <= step
    # and the grid's own nearest-neighbour distance is close to the step
    own = rotation_distance_degrees(grid.matrices()[:300], grid.matrices())
    own[torch.arange(300), torch.arange(300)] = 360.0
    assert float(own.min(1).values.max()) == pytest.approx(step, rel=0.1)


def test_viewing_direction_is_third_row():
    grid = OrientationGrid.uniform(30.0)
    third_row = grid.matrices()[:: grid.n_psi, 2, :]
    assert torch.allclose(third_row, fibonacci_directions(grid.n_directions), atol=1e-9)


def test_rotated_grid_keeps_spacing():
    grid = OrientationGrid.uniform(30.0)
    turned = grid.rotated(random_grid_rotation(15.0, torch.Generator().manual_seed(1)))
    d_old = rotation_distance_degrees(grid.matrices()[:50], grid.matrices())
    d_new = rotation_distance_degrees(turned.matrices()[:50], turned.matrices())
    assert torch.allclose(d_old, d_new, atol=1e-3)
    assert (
        float(rotation_distance_degrees(grid.matrices()[:1], turned.matrices()[:1])) > 0
    )


def test_local_neighbourhood_within_radius():
    grid = OrientationGrid.uniform(10.0)
    poses = random_rotations(20, torch.Generator().manual_seed(2), dtype=torch.float64)
    indices, valid = local_neighbourhood(grid, poses, 20.0)
    distance = rotation_distance_degrees(euler_angles_to_matrix(poses), grid.matrices())
    picked = torch.gather(distance, 1, indices)
    assert bool((picked[valid] <= 20.0).all())
    # complete: every grid orientation within the radius is listed
    assert torch.equal(valid.sum(1), (distance <= 20.0).sum(1))
    # nearest first
    assert torch.equal(indices[:, 0], distance.argmin(1))
    assert bool(valid[:, 0].all())
