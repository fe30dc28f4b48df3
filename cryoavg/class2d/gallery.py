"""Class galleries: a TensorBoard image grid and the end-of-run PNG (classes sorted by size)."""

import math
from pathlib import Path

import numpy as np
import torch

from cryoavg.io.figures import save_png, tile_grid


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """Scale each image to [0, 1] (robust to flat images)."""
    flat = images.flatten(1)
    low = flat.amin(1)[:, None, None]
    high = flat.amax(1)[:, None, None]
    return (images - low) / (high - low).clamp_min(1e-12)


def class_gallery_image(
    class_images: torch.Tensor,
    class_prior: torch.Tensor,
    resolution_angstrom: torch.Tensor | None = None,
    *,
    columns: int | None = None,
    border_px: int = 2,
) -> np.ndarray:
    """One grey image tiling all classes, largest class first.

    Parameters
    ----------
    class_images
        ``(k, N, N)`` class averages.
    class_prior
        ``(k,)`` class distribution (sort key).
    resolution_angstrom
        Unused here (kept for a symmetric interface with the PNG writer).
    columns
        Tiles per row (default ``ceil(sqrt(k))``).
    border_px
        Gap between tiles.

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32 in [0, 1].
    """
    k, size = class_images.shape[0], class_images.shape[-1]
    order = torch.argsort(class_prior, descending=True)
    tiles = _normalise(class_images[order].float())
    columns = columns or math.ceil(math.sqrt(k))
    rows = math.ceil(k / columns)
    step = size + border_px
    canvas = np.ones((rows * step - border_px, columns * step - border_px), np.float32)
    for slot in range(k):
        r, c = divmod(slot, columns)
        canvas[r * step : r * step + size, c * step : c * step + size] = tiles[
            slot
        ].numpy()
    return canvas


def write_class_gallery_png(
    path: Path,
    class_images: torch.Tensor,
    particle_counts: torch.Tensor,
    resolution_angstrom: torch.Tensor,
    *,
    title: str = "",
    columns: int | None = None,
) -> None:
    """PNG of the classes sorted by particle count, each labelled with count and resolution.

    Parameters
    ----------
    path
        Output PNG (written atomically).
    class_images
        ``(k, N, N)`` class averages.
    particle_counts
        ``(k,)`` particles assigned to each class.
    resolution_angstrom
        ``(k,)`` estimated resolution (inf for empty classes).
    title
        Figure title.
    columns
        Tiles per row.
    """
    k = class_images.shape[0]
    order = torch.argsort(particle_counts, descending=True, stable=True)
    fig, axes = tile_grid(k, columns, title)
    for slot, axis in enumerate(axes.flat):
        axis.axis("off")
        if slot >= k:
            continue
        cls = int(order[slot])
        axis.imshow(class_images[cls].numpy(), cmap="gray")
        res = float(resolution_angstrom[cls])
        res_text = f"{res:.0f} Å" if math.isfinite(res) else "– Å"
        axis.set_title(
            f"#{cls + 1}  n={int(particle_counts[cls])}\n{res_text}", fontsize=7
        )
    save_png(fig, path)
