"""Tiled PNG figures (class galleries): one fixed layout and an atomic PNG write."""

from __future__ import annotations

import math
import os
from typing import Any

from cryoavg.io.atomic import atomic_path

#: inches: each tile's width and height (its label included), the label above its image,
#: and the strip for the figure title
TILE_WIDTH_IN = 1.6
TILE_HEIGHT_IN = 1.8
LABEL_IN = 0.35
TITLE_IN = 0.4
PNG_DPI = 90


def tile_grid(n_tiles: int, columns: int | None, title: str = "") -> tuple[Any, Any]:
    """A matplotlib figure of ``ceil(n_tiles / columns) × columns`` axes for image tiles.

    The margins are fixed in inches rather than computed by ``tight_layout``, which is slow
    for a hundred tiles and leaves no room for a ``suptitle``: the title has a strip of its
    own above the first row of labels, so the tiles lie exactly as they would without it.

    Parameters
    ----------
    n_tiles
        Number of tiles (the grid may have empty places at the end).
    columns
        Tiles per row; ``None``: about 1.5 times as many columns as rows, at most 10.
    title
        Figure title ('' for none: no strip).

    Returns
    -------
    fig, axes
        The figure and its ``(rows, columns)`` array of axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns or min(10, math.ceil(math.sqrt(n_tiles * 1.5)))
    rows = max(1, math.ceil(n_tiles / columns))
    title_in = TITLE_IN if title else 0.0
    height = TILE_HEIGHT_IN * rows + title_in
    fig, axes = plt.subplots(
        rows, columns, figsize=(TILE_WIDTH_IN * columns, height), squeeze=False
    )
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.05 / height,
        top=1.0 - (title_in + LABEL_IN - 0.05) / height,
        wspace=0.05,
        hspace=LABEL_IN / (TILE_HEIGHT_IN - LABEL_IN),
    )
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.1 / height, va="top")
    return fig, axes


def save_png(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` as a PNG atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=PNG_DPI, format="png")
    finally:
        plt.close(fig)
