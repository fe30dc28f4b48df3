import math

import pytest
import torch

from cryoavg.ops.healpix import (
    healpix_order_for_step,
    healpix_pixel_centres,
    healpix_step_degrees,
)


def _unit(tilt, rot):
    t, r = torch.deg2rad(tilt), torch.deg2rad(rot)
    return torch.stack([t.sin() * r.cos(), t.sin() * r.sin(), t.cos()], dim=-1)


def test_order_zero_matches_the_base_pixels():
    tilt, rot = healpix_pixel_centres(0)
    z = torch.cos(torch.deg2rad(tilt))
    # 4 pixels per ring at z = 2/3, 0, -2/3
    assert torch.allclose(z[:4], torch.full((4,), 2.0 / 3.0, dtype=torch.float64))
    assert torch.allclose(z[4:8], torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z[8:], torch.full((4,), -2.0 / 3.0, dtype=torch.float64))
    assert rot[:4].tolist() == pytest.approx([45.0, 135.0, 225.0, 315.0])
    assert sorted(rot[4:8].tolist()) == pytest.approx([0.0, 90.0, 180.0, 270.0])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_pixels_are_distinct_balanced_and_spaced_at_the_step(order):
    tilt, rot = healpix_pixel_centres(order)
    assert tilt.shape == (12 * 4**order,)
    assert float(tilt.min()) > 0.0
    assert float(tilt.max()) < 180.0
    assert float(rot.min()) >= 0.0
    assert float(rot.max()) < 360.0
    unit = _unit(tilt, rot)
    # equal-area pixels: the centres balance out and their second moment is isotropic
    assert float(unit.mean(0).norm()) < 1e-9
    second = unit.T @ unit / unit.shape[0]
    assert torch.allclose(second, torch.eye(3, dtype=torch.float64) / 3.0, atol=0.01)
    cosines = (unit @ unit.T).clamp(-1, 1)
    cosines.fill_diagonal_(-1.0)
    nearest = torch.rad2deg(torch.acos(cosines.max(1).values))
    step = healpix_step_degrees(order)
    assert float(nearest.min()) > 0.75 * step
    assert float(nearest.max()) <= 1.05 * step


def test_order_for_step_is_the_first_order_below_the_step():
    assert healpix_order_for_step(5.0) == 4  # 3.75° < 5 <= 7.5°
    assert healpix_order_for_step(7.5) == 4
    assert healpix_order_for_step(7.6) == 3
    assert healpix_order_for_step(0.5) == 7
    assert healpix_step_degrees(2) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="> 0"):
        healpix_order_for_step(0.0)
    assert math.isclose(healpix_step_degrees(0), 60.0)
