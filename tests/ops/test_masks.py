import math

import numpy as np
import pytest
import torch

from cryoavg.ops.masks import (
    center_of_mass_2d,
    center_of_mass_3d,
    circular_mask_2d,
    soft_mask_outside_2d,
    soft_mask_outside_3d,
    spherical_mask_3d,
)


def test_circular_mask_values_at_known_radii(device):
    mask = circular_mask_2d((32, 32), 8.0, 4.0, device=device, dtype=torch.float64)
    assert mask.shape == (32, 32)
    assert mask.device.type == torch.device(device).type
    mask = mask.cpu()
    centre = 16
    assert mask[centre, centre] == 1.0
    assert mask[centre, centre + 8] == 1.0  # r = R
    torch.testing.assert_close(mask[centre, centre + 10], torch.tensor(0.5).double())
    torch.testing.assert_close(
        mask[centre, centre - 11],
        torch.tensor(0.5 + 0.5 * math.cos(0.75 * math.pi)).double(),
    )
    assert mask[centre + 12, centre] == 0.0
    assert mask[0, 0] == 0.0
    # r = 5 at (3, 4): inside
    assert mask[centre + 3, centre + 4] == 1.0
    hard = circular_mask_2d((31, 31), 5.0)
    assert hard[15, 20] == 1.0
    assert hard[15, 21] == 0.0
    assert hard.sum() == 81
    with pytest.raises(ValueError, match=">= 0"):
        circular_mask_2d((8, 8), -1.0)


def test_spherical_mask_values():
    mask = spherical_mask_3d((20, 20, 20), 5.0, 2.0, dtype=torch.float64)
    assert mask[10, 13, 14] == 1.0  # r = 5
    torch.testing.assert_close(mask[10, 10, 16], torch.tensor(0.5).double())  # r = 6
    assert mask[10, 10, 17] == 0.0  # r = 7 = R + w
    assert mask[10 + 6, 10, 10] == mask[10, 10 + 6, 10] == mask[10, 10, 10 - 6]


def _relion_soft_mask_outside(
    image: np.ndarray, radius: float, width: float
) -> np.ndarray:
    """softMaskOutsideMap written as RELION's two loops (no noise image)."""
    out = image.copy()
    size_y, size_x = image.shape
    radius_p = radius + width
    total, total_bg = 0.0, 0.0
    for i in range(size_y):
        for j in range(size_x):
            r = math.hypot(i - size_y // 2, j - size_x // 2)
            if r < radius:
                continue
            weight = (
                1.0
                if r > radius_p
                else 0.5 + 0.5 * math.cos(math.pi * (radius_p - r) / width)
            )
            total += weight
            total_bg += weight * image[i, j]
    background = total_bg / total
    for i in range(size_y):
        for j in range(size_x):
            r = math.hypot(i - size_y // 2, j - size_x // 2)
            if r < radius:
                continue
            weight = (
                1.0
                if r > radius_p
                else 0.5 + 0.5 * math.cos(math.pi * (radius_p - r) / width)
            )
            out[i, j] = (1 - weight) * image[i, j] + weight * background
    return out


def test_soft_mask_outside_matches_relion_loops():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 20, 20, generator=generator, dtype=torch.float64) + 0.3
    masked = soft_mask_outside_2d(images, 6.0, 3.0)
    for image, result in zip(images, masked, strict=True):
        np.testing.assert_allclose(
            result.numpy(),
            _relion_soft_mask_outside(image.numpy(), 6.0, 3.0),
            atol=1e-12,
        )
    radius = torch.hypot(
        *torch.meshgrid(torch.arange(20.0) - 10, torch.arange(20.0) - 10, indexing="ij")
    )
    torch.testing.assert_close(masked[:, radius < 6], images[:, radius < 6])
    far = masked[:, radius > 9]
    torch.testing.assert_close(far, far[:, :1].expand_as(far))  # one background value


def test_soft_mask_outside_background_options():
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    constant = torch.full((16, 16), 2.5, dtype=torch.float64)
    torch.testing.assert_close(soft_mask_outside_2d(constant, 5.0), constant)
    noise = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    with_noise = soft_mask_outside_2d(image, 4.0, 2.0, background=noise)
    assert torch.equal(with_noise[0, 0], noise[0, 0])
    assert torch.equal(with_noise[8, 8], image[8, 8])
    zeroed = soft_mask_outside_2d(image, 4.0, 2.0, background=0.0)
    assert zeroed[0, 0] == 0.0
    default_radius = soft_mask_outside_2d(image, None, 3.0)
    torch.testing.assert_close(default_radius[8, 8:16], image[8, 8:16])  # R = N/2 = 8
    with pytest.raises(ValueError, match="no background"):
        soft_mask_outside_2d(image, 30.0, 3.0)


def test_soft_mask_outside_3d():
    generator = torch.Generator().manual_seed(2)
    volume = torch.randn(12, 12, 12, generator=generator, dtype=torch.float64)
    masked = soft_mask_outside_3d(volume, 3.0, 2.0)
    assert torch.equal(masked[6, 6, 6:9], volume[6, 6, 6:9])
    assert masked[0, 0, 0] == masked[11, 0, 5]
    assert masked[0, 0, 0] != volume[0, 0, 0]


def test_center_of_mass_2d_and_3d():
    image = torch.zeros(2, 16, 16, dtype=torch.float64)
    image[0, 8 + 3, 8 - 2] = 1.0
    image[1, 8, 8] = -5.0  # negative only: zero mass with positive_only
    image[1, 8 + 4, 8] = 1.0
    image[1, 8 + 4, 8 + 2] = 1.0
    com = center_of_mass_2d(image)
    torch.testing.assert_close(com, torch.tensor([[3.0, -2.0], [4.0, 1.0]]).double())
    signed = center_of_mass_2d(image[1], positive_only=False)
    torch.testing.assert_close(signed, torch.tensor([8.0 / -3.0, 2.0 / -3.0]).double())
    torch.testing.assert_close(center_of_mass_2d(torch.zeros(8, 8)), torch.zeros(2))
    volume = torch.zeros(10, 10, 10)
    volume[5 + 1, 5 - 2, 5 + 3] = 2.0
    torch.testing.assert_close(
        center_of_mass_3d(volume), torch.tensor([1.0, -2.0, 3.0])
    )
