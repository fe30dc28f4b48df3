import math

import pytest
import torch

from cryoavg.class2d.sampling import (
    PixelSet,
    PsiGrid,
    TranslationGrid,
    coarse_image_size,
    next_perturbation,
)
from cryoavg.ops.fourier import shell_pixel_counts


def test_psi_grid_default_6_degrees():
    grid = PsiGrid.build(6.0)
    assert grid.n_coarse == 30
    assert grid.n_fine == 60
    assert grid.coarse_step_degrees == pytest.approx(12.0)
    assert grid.fine_step_degrees == pytest.approx(6.0)
    # fine index 2j + m: ψ_j − step/2 + (m + ½)·step/2
    assert grid.fine_degrees[:4].tolist() == pytest.approx([-3.0, 3.0, 9.0, 15.0])
    assert grid.coarse_degrees[:3].tolist() == pytest.approx([0.0, 12.0, 24.0])
    # wrapped: nothing above 180
    assert float(grid.fine_degrees.max()) <= 180.0
    assert float(grid.coarse_degrees.max()) <= 180.0


def test_psi_grid_perturbation_and_accelerator_rounding():
    grid = PsiGrid.build(6.0, perturbation=0.25)
    assert grid.coarse_degrees[1].item() == pytest.approx(12.0 + 3.0)
    assert grid.fine_degrees[0].item() == pytest.approx(0.0)
    gpu = PsiGrid.build(6.0, n_psi_multiple=32)
    assert gpu.n_coarse == 32
    assert gpu.coarse_step_degrees == pytest.approx(11.25)
    assert PsiGrid.build(5.0).n_coarse == 36


def test_translation_grid_default():
    grid = TranslationGrid.build(5.0, 1.0)
    assert grid.coarse_step_px == 2.0
    assert grid.n_coarse == 21
    assert grid.n_fine == 84
    r2 = (grid.coarse_px**2).sum(-1)
    assert bool((r2 < 25.001).all())
    assert bool(((grid.coarse_px / 2.0).round() * 2.0 == grid.coarse_px).all())
    assert grid.coarse_px[0].tolist() == [-2.0, -4.0]  # ix outer, iy inner (RELION)
    assert grid.coarse_px[1].tolist() == [0.0, -4.0]
    # fine index 4j + 2·my + mx, sub-grid x − Δ/2 + (m + ½)·Δ/2
    j = 7
    c = grid.coarse_px[j]
    fine = grid.fine_px[4 * j : 4 * j + 4]
    expected = torch.stack(
        [
            c + torch.tensor([dy, dx], dtype=torch.float64)
            for dy in (-0.5, 0.5)
            for dx in (-0.5, 0.5)
        ]
    )
    torch.testing.assert_close(fine, expected)


def test_translation_grid_perturbation():
    base = TranslationGrid.build(3.0, 1.0)
    pert = TranslationGrid.build(3.0, 1.0, perturbation=-0.5)
    torch.testing.assert_close(pert.coarse_px, base.coarse_px - 1.0)
    torch.testing.assert_close(pert.fine_px, base.fine_px - 1.0)


def test_next_perturbation_range():
    gen = torch.Generator().manual_seed(1)
    p = 0.0
    values = []
    for _ in range(50):
        p = next_perturbation(p, 0.5, generator=gen)
        values.append(p)
    assert all(-0.5 <= v <= 0.5 for v in values)
    assert len(set(values)) > 40
    assert next_perturbation(0.3, 0.0) == 0.0


def test_coarse_image_size():
    # 12° coarse step, D = 200 Å, 64 px × 2 Å:
    # res = 12/360·π·200/1.5 ≈ 13.96 Å → 2·ceil(9.17)
    assert coarse_image_size(64, 2.0, 200.0, 12.0, 64) == 20
    assert coarse_image_size(64, 2.0, 200.0, 12.0, 16) == 16  # never above current size
    assert coarse_image_size(64, 2.0, 200.0, 12.0, 64, max_coarse_size=12) == 12
    assert coarse_image_size(64, 2.0, 200.0, 12.0, 64, strict_highres_exp=10.0) == 26


@pytest.mark.parametrize("size", [8, 20, 32])
def test_pixel_set_layout(size):
    n = 32
    ps = PixelSet.for_size(n, size)
    counts = shell_pixel_counts((n, n))
    assert ps.n_pixels == int(counts[: size // 2 + 1].sum())
    assert int(ps.ires[0]) == 0
    assert int(ps.indices[0]) == 0
    assert bool((ps.ires[1:] >= ps.ires[:-1]).all())
    assert bool((ps.ires <= size // 2).all())
    assert not bool(((ps.kx == 0) & (ps.ky < 0)).any())
    # indices agree with (ky, kx) on the (N, N//2+1) layout
    row = torch.remainder(ps.ky, n)
    torch.testing.assert_close(ps.indices, row * (n // 2 + 1) + ps.kx)
    torch.testing.assert_close(
        ps.ires, torch.sqrt((ps.ky**2 + ps.kx**2).double()).round().long()
    )
    # prefix property
    small = PixelSet.for_size(n, 8)
    m = ps.count_within(8) if size >= 8 else None
    if m is not None:
        torch.testing.assert_close(ps.indices[:m], small.indices)
    assert ps.take(1, 5).n_pixels == 4


def test_pixel_set_matches_shell_count_with_nyquist():
    n = 16
    ps = PixelSet.for_size(n, n)
    assert int((ps.ires == n // 2).sum()) == int(shell_pixel_counts((n, n))[n // 2])
    assert math.isclose(float(ps.ky.max()), n / 2)
