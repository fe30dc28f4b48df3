"""Fourier shell correlation, resolution at a threshold and FSC-derived SSNR.

Conventions: maps are cubic ``(n, n, n)`` real tensors; shells are RELION's
``ires = round(|k| n)`` (spec §0.1), ``n // 2 + 1`` of them (shell 0 = DC, shell
``n // 2`` = Nyquist). Shell ``i`` is the spatial frequency ``i / (n * pixel_size)``
1/Å, i.e. the resolution ``n * pixel_size / i`` Å.
"""

import math

import torch

from cryoavg.ops.fourier import fourier_shell_correlation as _shell_correlation
from cryoavg.ops.fourier import resolution_at_threshold

__all__ = [
    "fourier_shell_correlation",
    "fsc_to_ssnr",
    "resolution_at",
    "shell_resolution_angstrom",
]


def fourier_shell_correlation(map_a: torch.Tensor, map_b: torch.Tensor) -> torch.Tensor:
    """FSC between two maps on RELION's integer shells.

    Parameters
    ----------
    map_a, map_b
        ``(n, n, n)`` real maps of the same shape.

    Returns
    -------
    torch.Tensor
        ``(n // 2 + 1,)`` correlation per shell (0 for an empty or all-zero shell);
        float64.
    """
    if map_a.ndim != 3 or tuple(map_a.shape) != tuple(map_b.shape):
        raise ValueError(
            f"maps must be two (n, n, n) tensors of one shape, got "
            f"{tuple(map_a.shape)} and {tuple(map_b.shape)}"
        )
    return _shell_correlation(map_a.to(torch.float64), map_b.to(torch.float64))


def shell_resolution_angstrom(
    n_shells: int, pixel_size_angstrom: float
) -> torch.Tensor:
    """Resolution of every shell ``n * pixel_size / i`` in Å (``inf`` for shell 0).

    Parameters
    ----------
    n_shells
        Number of shells ``n // 2 + 1``.
    pixel_size_angstrom
        Pixel size in Å.

    Returns
    -------
    torch.Tensor
        ``(n_shells,)`` float64 resolutions.
    """
    box = 2 * (n_shells - 1)
    shells = torch.arange(n_shells, dtype=torch.float64)
    return torch.where(
        shells > 0, box * pixel_size_angstrom / shells.clamp(min=1), math.inf
    )


def resolution_at(
    fsc: torch.Tensor, pixel_size_angstrom: float, threshold: float = 0.143
) -> float:
    """Resolution (Å) where an FSC curve first drops below ``threshold``.

    The crossing is linearly interpolated between the last shell at or above the
    threshold and the first shell ``>= 1`` below it (shell 0 is never tested); a curve
    that never drops gives the Nyquist resolution ``2 * pixel_size``.

    Parameters
    ----------
    fsc
        ``(n // 2 + 1,)`` FSC per shell.
    pixel_size_angstrom
        Pixel size in Å.
    threshold
        0.143 (gold standard, half maps) or 0.5 (against a reference).

    Returns
    -------
    float
        Resolution in Å.
    """
    if fsc.ndim != 1:
        raise ValueError(f"fsc must be 1D (n_shells,), got {tuple(fsc.shape)}")
    box = 2 * (fsc.shape[0] - 1)
    value = resolution_at_threshold(
        fsc.to(torch.float64), box, float(pixel_size_angstrom), float(threshold)
    )
    return float(value)


def fsc_to_ssnr(
    fsc: torch.Tensor, *, whole: bool = False, tau2_fudge: float = 1.0
) -> torch.Tensor:
    """Spectral SNR of a reconstruction from the FSC of its half maps.

    ``f`` is clamped to [0.001, 0.999]; for a map from both halves (``whole``) the
    FSC is first converted with ``f' = sqrt(2 f / (1 + f))`` (twice the particles);
    then ``SSNR = T f / (1 - f)`` (RELION's FSC-based tau^2).

    Parameters
    ----------
    fsc
        ``(n_shells,)`` half-map FSC.
    whole
        The SSNR is wanted for the reconstruction of both halves together.
    tau2_fudge
        Regularisation parameter ``T`` (> 0).

    Returns
    -------
    torch.Tensor
        ``(n_shells,)`` float64 SSNR.
    """
    if tau2_fudge <= 0:
        raise ValueError(f"tau2_fudge must be > 0, got {tau2_fudge}")
    f = fsc.to(torch.float64).clamp(min=0.001)
    if whole:
        f = torch.sqrt(2.0 * f / (1.0 + f))
    f = f.clamp(max=0.999)
    return tau2_fudge * f / (1.0 - f)
