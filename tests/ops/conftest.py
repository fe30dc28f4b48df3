"""Shared fixtures for the ops tests: devices and smooth synthetic images/volumes."""

from collections.abc import Callable

import pytest
import torch

from ._synthetic import gaussian_blobs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def smooth_image() -> Callable[..., torch.Tensor]:
    """Factory for a smooth, asymmetric 2D test image (blobs in the central disc)."""

    def make(size: int = 32, sigma: float = 2.0, dtype: torch.dtype = torch.float64):
        quarter = size / 4
        centres = [
            (0.0, 0.0),
            (quarter, 0.3 * quarter),
            (-0.5 * quarter, 0.8 * quarter),
        ]
        centres.append((-0.7 * quarter, -0.9 * quarter))
        return gaussian_blobs((size, size), centres, sigma, dtype)

    return make


@pytest.fixture
def smooth_volume() -> Callable[..., torch.Tensor]:
    """Factory for a smooth, asymmetric 3D test volume."""

    def make(size: int = 24, sigma: float = 2.0, dtype: torch.dtype = torch.float64):
        q = size / 4
        centres = [(0.0, 0.0, 0.0), (0.5 * q, q, 0.2 * q), (-q, 0.3 * q, -0.6 * q)]
        centres.append((0.2 * q, -0.8 * q, 0.9 * q))
        return gaussian_blobs((size, size, size), centres, sigma, dtype)

    return make
