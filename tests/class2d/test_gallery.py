"""The PNG class gallery: size, order of the tiles, and room for the title."""

import math

import matplotlib.image
import numpy as np
import torch

from cryoavg.class2d.gallery import write_class_gallery_png

DPI = 90  # what write_class_gallery_png saves at
COUNTS = torch.tensor([3, 50, 0, 7, 12, 1, 30])


def _gallery(tmp_path, title: str) -> np.ndarray:
    k = COUNTS.shape[0]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r2 = (yy - 16) ** 2 + (xx - 16) ** 2
    # class c is a disc of radius 3 + 2c on a dark background: its tile tells its index
    images = torch.stack([(r2 < (3 + 2 * c) ** 2).float() for c in range(k)])
    path = tmp_path / f"gallery_{bool(title)}.png"
    write_class_gallery_png(
        path, images, COUNTS, torch.full((k,), 20.0), title=title, columns=4
    )
    return matplotlib.image.imread(path)[..., :3].mean(-1)


def test_size_follows_rows_and_columns(tmp_path) -> None:
    rows = math.ceil(COUNTS.shape[0] / 4)
    assert _gallery(tmp_path, "run").shape == (
        round((1.8 * rows + 0.4) * DPI),
        round(1.6 * 4 * DPI),
    )
    assert _gallery(tmp_path, "").shape == (round(1.8 * rows * DPI), 576)


def test_title_has_its_own_strip(tmp_path) -> None:
    with_title = _gallery(tmp_path, "Class2D/job001 iteration 100")
    without = _gallery(tmp_path, "")
    strip = with_title.shape[0] - without.shape[0]  # 0.4 in
    assert (with_title[:strip] < 0.5).any()  # the title's ink
    # below it, the tiles and their labels exactly as without a title: nothing overlaps
    assert np.abs(with_title[strip:] - without).mean() < 1e-3


def test_tiles_sorted_by_particle_count(tmp_path) -> None:
    png = _gallery(tmp_path, "")
    height, width = png.shape
    rows, columns = 2, 4
    tile_h, tile_w = height / rows, width / columns
    # bright area of each tile, row by row = the radius of the class shown there
    area = [
        (
            png[
                round(r * tile_h) : round((r + 1) * tile_h),
                round(c * tile_w) : round((c + 1) * tile_w),
            ]
            > 0.9
        ).sum()
        for r, c in (divmod(slot, columns) for slot in range(COUNTS.shape[0]))
    ]
    shown = np.argsort(np.argsort(area))  # rank of each tile's disc = its class index
    expected = torch.argsort(COUNTS, descending=True, stable=True).tolist()
    assert shown.tolist() == expected
