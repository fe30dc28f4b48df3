"""E-step of 3D refinement: slices, pose recovery, significance, statistics."""

import pytest
import torch

from cryoavg.class2d.preprocess import prepare_estep_batch
from cryoavg.class2d.sampling import PixelSet
from cryoavg.ops.projection import project_volume_rfft_2d
from cryoavg.ops.rotations import euler_angles_to_matrix, random_rotations
from cryoavg.ops.shifts import translation_grid_2d
from cryoavg.recon.estep3d import (
    SliceProjector,
    accumulate_slices,
    expectation_step_3d,
)
from cryoavg.recon.orientations import (
    OrientationGrid,
    local_neighbourhood,
    rotation_distance_degrees,
)
from tests.recon._synthetic3d import blob_map, particles

BOX = 32


@pytest.fixture(scope="module")
def volume():
    return blob_map(BOX, sigma_px=1.0)


def _batch(images, sigma2, pixel_set):
    b = images.shape[0]
    return prepare_estep_batch(
        images,
        index=torch.arange(b),
        optics_group=torch.zeros(b, dtype=torch.long),
        group=torch.zeros(b, dtype=torch.long),
        offset_px=torch.zeros(b, 2),
        norm_correction=torch.ones(b),
        ctf=None,
        sigma2_noise=torch.full((1, BOX // 2 + 1), sigma2),
        scale=torch.ones(1),
        avg_norm=1.0,
        pixel_set=pixel_set,
        mask_radius_px=BOX / 2 - 2,
        mask_edge_px=2,
        zero_mask=True,
        do_norm=False,
    )


def test_slices_match_projections(volume):
    pixel_set = PixelSet.for_size(BOX, BOX)
    angles = random_rotations(20, torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = project_volume_rfft_2d(volume, angles).flatten(-2)[:, pixel_set.indices]
    got = SliceProjector(volume)(angles, pixel_set)
    inside = pixel_set.ires < BOX // 2 - 1  # the Nyquist corner is handled differently
    error = (got - expected)[:, inside].norm() / expected[:, inside].norm()
    assert float(error) < 0.03


@pytest.fixture(scope="module")
def scored(volume):
    noise = 0.5
    images, angles, origins = particles(volume, 48, noise_sigma=noise, seed=4)
    pixel_set = PixelSet.for_size(BOX, BOX)
    # white noise of std s has per-component variance s²/(2 N²) with RELION's FFT
    batch = _batch(images, noise**2 / (2 * BOX * BOX), pixel_set)
    grid = OrientationGrid.uniform(15.0)
    refs = SliceProjector(volume)(grid.angles_degrees, pixel_set)
    translations = translation_grid_2d(3, 1, dtype=torch.float64)
    return batch, grid, refs, translations, pixel_set, angles, origins, noise


def _errors(grid, index, angles):
    best = euler_angles_to_matrix(grid.angles_degrees[index])
    return rotation_distance_degrees(euler_angles_to_matrix(angles), best).diagonal()


@pytest.mark.parametrize("mode", ["ml", "cc"])
def test_global_search_recovers_poses(scored, mode):
    batch, grid, refs, translations, pixel_set, angles, origins, _ = scored
    result = expectation_step_3d(batch, refs, translations, pixel_set, mode=mode)
    errors = _errors(grid, result.best_orientation, angles)
    assert float(errors.max()) <= grid.step_degrees  # within the grid's covering radius
    assert torch.equal(result.best_offset_px, origins)
    if mode == "ml":
        sums = torch.zeros(48, dtype=torch.float64).index_add_(
            0, result.samples.particle_row, result.samples.weight
        )
        assert bool((sums <= 1 + 1e-9).all())
        assert bool((sums >= 0.99).all())  # adaptive_fraction 0.999
        assert bool((result.pmax <= 1).all())
    else:
        assert bool((result.pmax == 1).all())
        assert bool((result.n_significant == 1).all())


def test_local_search_matches_global(scored):
    batch, grid, refs, translations, pixel_set, _angles, _, _ = scored
    full = expectation_step_3d(batch, refs, translations, pixel_set)
    start = grid.angles_degrees[full.best_orientation]
    cand, valid = local_neighbourhood(grid, start, 20.0)
    local = expectation_step_3d(
        batch, refs, translations, pixel_set, candidates=cand, candidate_valid=valid
    )
    assert torch.equal(local.best_orientation, full.best_orientation)
    assert cand.shape[1] < grid.n_orientations / 20


def test_significance_cap(scored):
    _, _, refs, translations, pixel_set, _, _, _ = scored
    # a very flat posterior (huge σ²) is capped at max_significant samples
    flat = _batch(torch.zeros(4, BOX, BOX), 1e6, pixel_set)
    result = expectation_step_3d(flat, refs, translations, pixel_set, max_significant=7)
    assert bool((result.n_significant == 7).all())
    assert float(result.pmax.max()) < 0.01


def test_noise_and_scale_statistics(scored):
    batch, _grid, refs, translations, pixel_set, _, _, noise = scored
    result = expectation_step_3d(batch, refs, translations, pixel_set)
    sums = accumulate_slices(
        batch, result, refs, translations, pixel_set, n_optics_groups=1, n_groups=1
    )
    counts = torch.bincount(pixel_set.ires, minlength=BOX // 2 + 1).double()
    sigma2 = sums.noise_power[0] / (2 * sums.noise_weight[0] * counts)
    expected = noise**2 / (2 * BOX * BOX)
    # mid shells (inside the mask the noise is white): within 25 %
    assert float(sigma2[4:12].mean()) == pytest.approx(expected, rel=0.25)
    # the scale of the true map is 1
    assert float(sums.scale_xa[0] / sums.scale_aa[0]) == pytest.approx(1.0, abs=0.1)
    assert sums.weight_sum == pytest.approx(float(result.samples.weight.sum()))
    assert sums.data.shape == (sums.orientation.shape[0], pixel_set.n_pixels)
