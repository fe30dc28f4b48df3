"""Pictures of a selection: a PNG gallery and a self-contained HTML page.

Both show every class sorted by score (best first; unscored classes last), each
labelled with its class number, score and particle count; kept classes are framed in
green, rejected ones in red. The HTML page embeds one base64 PNG per class, so it can
be opened or mailed on its own. Same look as :mod:`cryoavg.class2d.gallery`.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence

import numpy as np

from cryoavg.io.atomic import atomic_write
from cryoavg.io.figures import save_png, tile_grid

__all__ = ["score_order", "write_selection_gallery_png", "write_selection_html"]

_KEPT = "#2ca02c"
_REJECTED = "#d62728"


def score_order(scores: np.ndarray) -> np.ndarray:
    """Class indices sorted by descending score (ties: class order), ``int64 (k,)``."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def _label(number: int, score: float, count: float | None) -> str:
    score_text = f"{score:.2f}" if score > -998 else "–"
    count_text = "" if count is None else f"  n={count:.0f}"
    return f"#{number}  s={score_text}{count_text}"


def write_selection_gallery_png(
    path: str | os.PathLike[str],
    images: np.ndarray,
    scores: np.ndarray,
    selected: np.ndarray,
    class_numbers: Sequence[int] | np.ndarray,
    particle_counts: np.ndarray | None = None,
    *,
    title: str = "",
    columns: int | None = None,
) -> None:
    """PNG of all classes sorted by score, kept ones framed green, rejected red.

    Parameters
    ----------
    path
        Output PNG (written atomically).
    images
        ``(k, N, N)`` class averages.
    scores
        ``(k,)`` scores (−999 = not scored).
    selected
        ``bool (k,)`` kept classes.
    class_numbers
        ``(k,)`` 1-based class numbers.
    particle_counts
        ``(k,)`` particles per class, or ``None``.
    title
        Figure title.
    columns
        Tiles per row.
    """
    k = int(images.shape[0])
    order = score_order(scores)
    fig, axes = tile_grid(k, columns, title)
    for slot, axis in enumerate(axes.flat):
        if slot >= k:
            axis.axis("off")
            continue
        cls = int(order[slot])
        axis.imshow(np.asarray(images[cls]), cmap="gray")
        axis.set_xticks([])
        axis.set_yticks([])
        colour = _KEPT if bool(selected[cls]) else _REJECTED
        for spine in axis.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
        count = None if particle_counts is None else float(particle_counts[cls])
        axis.set_title(
            _label(int(class_numbers[cls]), float(scores[cls]), count),
            fontsize=6,
            color=colour,
        )
    save_png(fig, path)


def _png_base64(image: np.ndarray) -> str:
    """One grey image as a base64-encoded PNG (scaled to its own min…max)."""
    import matplotlib.image

    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / max(high - low, 1e-12)
    buffer = io.BytesIO()
    matplotlib.image.imsave(
        buffer, scaled, cmap="gray", vmin=0.0, vmax=1.0, format="png"
    )
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_selection_html(
    path: str | os.PathLike[str],
    images: np.ndarray,
    scores: np.ndarray,
    selected: np.ndarray,
    class_numbers: Sequence[int] | np.ndarray,
    particle_counts: np.ndarray | None = None,
    *,
    title: str = "cryoavg select",
    summary: str = "",
    reasons: Sequence[str] | None = None,
) -> None:
    """A self-contained HTML page of all classes sorted by score.

    Parameters
    ----------
    path
        Output HTML file (written atomically).
    images
        ``(k, N, N)`` class averages.
    scores
        ``(k,)`` scores (−999 = not scored).
    selected
        ``bool (k,)`` kept classes.
    class_numbers
        ``(k,)`` 1-based class numbers.
    particle_counts
        ``(k,)`` particles per class, or ``None``.
    title
        Page title.
    summary
        One line shown under the title.
    reasons
        ``(k,)`` why each class was kept or rejected (shown as a tooltip).
    """
    tiles = []
    for cls in score_order(scores).tolist():
        kept = bool(selected[cls])
        count = None if particle_counts is None else float(particle_counts[cls])
        label = html.escape(_label(int(class_numbers[cls]), float(scores[cls]), count))
        why = html.escape(reasons[cls]) if reasons is not None else ""
        tiles.append(
            f'<figure class="{"kept" if kept else "rejected"}" title="{why}">'
            f'<img alt="class {int(class_numbers[cls])}" '
            f'src="data:image/png;base64,{_png_base64(images[cls])}">'
            f"<figcaption>{label}<br>{'kept' if kept else 'rejected'}</figcaption>"
            "</figure>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
main {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; padding: 3px; border: 4px solid; text-align: center; }}
figure.kept {{ border-color: {_KEPT}; }}
figure.rejected {{ border-color: {_REJECTED}; opacity: 0.75; }}
img {{ width: 112px; height: 112px; image-rendering: pixelated; display: block; }}
figcaption {{ font-size: 11px; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>
<main>
{chr(10).join(tiles)}
</main>
</body>
</html>
"""
    with atomic_write(path) as handle:
        handle.write(page)
