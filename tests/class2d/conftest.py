"""Synthetic data for the Class2D E-step tests.

Class images are sums of Gaussian blobs, so a particle "class rotated by Rz(−ψ)" is
evaluated analytically (no interpolation): ``particle(x) = class(Rz(ψ) x)``; it is then
shifted by ``−origin`` exactly in Fourier space (spec §0.3).
"""

import math
from dataclasses import dataclass

import pytest
import torch

from cryoavg.class2d.estep import EStepBatch
from cryoavg.class2d.sampling import PixelSet
from cryoavg.ops.fourier import dft_2d

# (amplitude, y, x, sigma) per blob, per class
BLOBS = [
    [(1.0, 3.0, -4.0, 2.0), (0.7, -5.0, 2.0, 1.5)],
    [(1.0, 0.0, 5.0, 2.5), (1.0, -4.0, -4.0, 1.2), (0.5, 6.0, 0.0, 1.5)],
    [(1.0, -2.0, -2.0, 3.0), (-0.8, 5.0, 5.0, 1.5), (0.6, 1.0, 6.0, 1.0)],
]


def blob_image(blobs, n, psi_degrees=0.0, dtype=torch.float64):
    """``class(Rz(ψ) x)`` on an ``n`` grid (origin ``n//2``), evaluated analytically."""
    c = torch.arange(n, dtype=dtype) - n // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    t = math.radians(psi_degrees)
    xr = math.cos(t) * x - math.sin(t) * y
    yr = math.sin(t) * x + math.cos(t) * y
    out = torch.zeros(n, n, dtype=dtype)
    for amp, by, bx, s in BLOBS[blobs] if isinstance(blobs, int) else blobs:
        out += amp * torch.exp(-((xr - bx) ** 2 + (yr - by) ** 2) / (2 * s * s))
    return out


def simple_ctf(
    pixel_set: PixelSet, strength: float, dtype=torch.float64
) -> torch.Tensor:
    """A real, CTF-like modulation ``-sin(0.1 + strength·|k|²)``: ``(p,)``."""
    k2 = (
        pixel_set.ky.double() ** 2 + pixel_set.kx.double() ** 2
    ) / pixel_set.box_size**2
    return (
        (-torch.sin(0.1 + strength * k2)).to(dtype)
        if strength > 0
        else torch.ones_like(k2, dtype=dtype)
    )


@dataclass
class Synthetic:
    batch: EStepBatch
    classes: torch.Tensor  # (k, N, N)
    true_class: torch.Tensor
    true_psi_index: torch.Tensor
    true_trans_index: torch.Tensor
    signal_power: float


def make_batch(
    images_rfft: torch.Tensor,
    pixel_set: PixelSet,
    *,
    sigma2: float,
    ctf: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> EStepBatch:
    """Wrap gathered transforms ``(b, p)`` into an :class:`EStepBatch`."""
    b, p = images_rfft.shape
    dtype = images_rfft.real.dtype
    f = pixel_set.box_size // 2 + 1
    return EStepBatch(
        images_masked_rfft=images_rfft,
        images_unmasked_rfft=images_rfft.clone(),
        ctf=torch.ones(b, p, dtype=dtype) if ctf is None else ctf.expand(b, p).clone(),
        scale=torch.ones(b, dtype=dtype) if scale is None else scale,
        sigma2=torch.full((b, p), sigma2, dtype=dtype),
        offset_px=torch.zeros(b, 2, dtype=dtype),
        index=torch.arange(b),
        optics_group=torch.zeros(b, dtype=torch.long),
        group=torch.zeros(b, dtype=torch.long),
        masked_power_beyond=torch.zeros(b, dtype=dtype),
        masked_shell_power_beyond=torch.zeros(b, f, dtype=dtype),
    )


@pytest.fixture
def synthetic():
    """Factory: ``synthetic(psi_grid, translation_grid, pixel_set, ...)``."""

    def build(
        psi_grid,
        translation_grid,
        pixel_set,
        *,
        n_particles=60,
        snr=None,
        sigma2=None,
        ctf_strength=0.0,
        seed=0,
    ) -> Synthetic:
        gen = torch.Generator().manual_seed(seed)
        n = pixel_set.box_size
        k = len(BLOBS)
        classes = torch.stack([blob_image(i, n) for i in range(k)])
        true_class = torch.arange(n_particles) % k
        true_psi = torch.randint(0, psi_grid.n_fine, (n_particles,), generator=gen)
        true_trans = torch.randint(
            0, translation_grid.n_fine, (n_particles,), generator=gen
        )
        parts = torch.stack(
            [
                blob_image(
                    int(true_class[i]), n, float(psi_grid.fine_degrees[true_psi[i]])
                )
                for i in range(n_particles)
            ]
        )
        ft = dft_2d(parts).reshape(n_particles, -1)[:, pixel_set.indices]  # (b, p)
        # shift by -origin: multiply by exp(+2πi q·t/N)
        t = translation_grid.fine_px[true_trans]  # (b, 2)
        angle = (2 * math.pi / n) * (
            t[:, :1] * pixel_set.ky.double() + t[:, 1:] * pixel_set.kx.double()
        )
        ft = ft * torch.polar(torch.ones_like(angle), angle)
        ctf = simple_ctf(pixel_set, ctf_strength)
        ft = ft * ctf
        signal_power = float((ft.abs() ** 2)[:, 1:].mean())
        if sigma2 is None:
            sigma2 = signal_power / (2 * snr)
        noise = torch.complex(
            torch.randn(ft.shape, generator=gen, dtype=torch.float64),
            torch.randn(ft.shape, generator=gen, dtype=torch.float64),
        ) * math.sqrt(sigma2)
        batch = make_batch(ft + noise, pixel_set, sigma2=sigma2, ctf=ctf)
        return Synthetic(batch, classes, true_class, true_psi, true_trans, signal_power)

    return build
