"""Synthetic test data for the ops tests (no files: generated on the fly)."""

import torch


def gaussian_blobs(
    shape: tuple[int, ...],
    centres: list[tuple[float, ...]],
    sigma: float = 2.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sum of isotropic Gaussians at array-order centres relative to n // 2."""
    axes = [torch.arange(n, dtype=dtype) - n // 2 for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    out = torch.zeros(shape, dtype=dtype)
    for centre in centres:
        dist_sq = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
        out = out + torch.exp(-dist_sq / (2 * sigma**2))
    return out
