import numpy as np
import pandas as pd
import pytest
import torch

from cryoavg.errors import InputError
from cryoavg.io.particles import ParticleTable
from cryoavg.ops.masks import spherical_mask_3d
from cryoavg.ops.projection import project_volume_2d
from cryoavg.ops.rotations import euler_angles_to_matrix, random_rotations
from cryoavg.recon import (
    BackprojectionAccumulator,
    ReconstructionSettings,
    assign_random_halves,
    fourier_shell_correlation,
    half_sets,
    particle_poses,
    reconstruct_gold_standard,
    wiener_reconstruct,
)


def _table(tmp_path, **columns) -> ParticleTable:
    n = len(next(iter(columns.values())))
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            **columns,
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [2.0],
            "rlnImageSize": [32],
            "rlnImageDimensionality": [2],
        }
    )
    return ParticleTable(particles, optics, tmp_path / "particles.star")


def test_assign_random_halves_is_balanced_and_deterministic():
    halves = assign_random_halves(101, seed=3)
    assert set(np.unique(halves)) == {1, 2}
    assert (halves == 1).sum() == 51
    np.testing.assert_array_equal(halves, assign_random_halves(101, seed=3))
    assert not np.array_equal(halves, assign_random_halves(101, seed=4))


def test_half_sets_from_column_and_assigned(tmp_path):
    table = _table(tmp_path, rlnRandomSubset=[1, 2, 2, 1])
    halves, assigned = half_sets(table)
    np.testing.assert_array_equal(halves, [1, 2, 2, 1])
    assert not assigned
    halves, assigned = half_sets(_table(tmp_path, rlnAngleRot=[0.0] * 6))
    assert assigned
    assert (halves == 1).sum() == 3
    with pytest.raises(InputError, match="rlnRandomSubset"):
        half_sets(_table(tmp_path, rlnRandomSubset=[1, 3]))


def test_particle_poses(tmp_path):
    table = _table(
        tmp_path,
        rlnAngleRot=[10.0, 20.0],
        rlnAngleTilt=[30.0, 40.0],
        rlnAnglePsi=[50.0, 60.0],
        rlnOriginXAngst=[2.0, -4.0],
        rlnOriginYAngst=[6.0, 8.0],
    )
    angles, shifts, has_origins = particle_poses(table)
    assert has_origins
    np.testing.assert_allclose(angles.numpy(), [[10, 30, 50], [20, 40, 60]])
    np.testing.assert_allclose(shifts.numpy(), [[3.0, 1.0], [4.0, -2.0]])  # (dy, dx) px
    _, shifts, has_origins = particle_poses(
        _table(tmp_path, rlnAngleRot=[1.0], rlnAngleTilt=[2.0], rlnAnglePsi=[3.0])
    )
    assert not has_origins
    assert float(shifts.abs().sum()) == 0.0
    with pytest.raises(InputError, match="rlnAngleTilt"):
        particle_poses(_table(tmp_path, rlnAngleRot=[1.0], rlnAnglePsi=[3.0]))


def _noisy_halves(n: int, sigma: float, size: int = 32):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 1, size, size, size), generator=generator)
    volume = torch.nn.functional.avg_pool3d(noise, 3, 1, 1)[0, 0]
    volume = volume * spherical_mask_3d((size,) * 3, size / 2 - 5, 3)
    angles = random_rotations(n, generator=generator)
    images = project_volume_2d(volume, angles)
    images = images + sigma * torch.randn(images.shape, generator=generator)
    matrices = euler_angles_to_matrix(angles.double()).float()
    halves = [BackprojectionAccumulator(size), BackprojectionAccumulator(size)]
    halves[0].insert(images[::2], matrices[::2])
    halves[1].insert(images[1::2], matrices[1::2])
    return volume, halves


def test_wiener_term_improves_a_noisy_reconstruction():
    volume, (half1, half2) = _noisy_halves(1200, sigma=6.0)
    size = volume.shape[0]
    plain = [wiener_reconstruct(h.data, h.weights, size) for h in (half1, half2)]
    fsc = fourier_shell_correlation(*plain)
    total = half1 + half2
    raw = wiener_reconstruct(total.data, total.weights, size)
    filtered = wiener_reconstruct(total.data, total.weights, size, fsc=fsc, whole=True)
    error_raw = float(((raw - volume) ** 2).sum())
    error_filtered = float(((filtered - volume) ** 2).sum())
    assert error_filtered < 0.8 * error_raw


def test_gold_standard_pipeline():
    volume, (half1, half2) = _noisy_halves(1200, sigma=3.0)
    settings = ReconstructionSettings(mask_diameter_angstrom=44.0)
    result = reconstruct_gold_standard(half1, half2, 2.0, settings)
    size = volume.shape[0]
    assert result.full.shape == (size,) * 3
    assert result.fsc.shape == (size // 2 + 1,)
    assert float(result.fsc[1:4].min()) > 0.9
    assert 4.0 <= result.resolution_angstrom < 16.0
    outside = spherical_mask_3d((size,) * 3, 22.0 / 2 + 5.01) == 0
    assert float(result.half1[outside].abs().max()) == 0.0
    truth = fourier_shell_correlation(result.full, volume)
    assert float(truth[1:6].min()) > 0.9
    # a post-processing function is applied to every map
    negated = reconstruct_gold_standard(
        half1, half2, 2.0, settings, postprocess=lambda v: -v
    )
    torch.testing.assert_close(negated.full, -result.full)
