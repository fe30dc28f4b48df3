import pytest
import torch

from cryoavg.ops.fourier import dft_2d, dft_3d, fourier_shell_correlation
from cryoavg.ops.masks import center_of_mass_2d
from cryoavg.ops.projection import (
    backproject_2d_to_3d,
    extract_central_slices_rfft_3d,
    insert_central_slices_rfft_3d,
    project_volume_2d,
    project_volume_rfft_2d,
)
from cryoavg.ops.rotations import euler_angles_to_matrix, random_rotations

from ._synthetic import gaussian_blobs


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_identity_projection_is_sum_over_z(smooth_volume):
    volume = smooth_volume(24)
    projection = project_volume_2d(volume, torch.zeros(3, dtype=torch.float64))
    assert projection.shape == (24, 24)
    assert projection.dtype == torch.float64
    line_sums = volume.sum(0)
    assert _correlation(projection, line_sums) > 0.999
    # on-grid slices keep the sinc^2 gridding pre-correction (~1.2x at the box edge)
    relative_error = (projection - line_sums).abs().max() / line_sums.max()
    assert relative_error < 0.1


def _blob(size: int, centre_xyz: tuple[float, float, float]) -> torch.Tensor:
    return gaussian_blobs((size,) * 3, [tuple(reversed(centre_xyz))], sigma=1.5)


@pytest.mark.parametrize("angles", [(30.0, 40.0, 50.0), (-120.0, 100.0, 200.0)])
def test_off_centre_blob_lands_at_a_times_position(angles):
    position = torch.tensor([8.0, -5.0, 3.0], dtype=torch.float64)  # xyz
    projection = project_volume_2d(
        _blob(32, tuple(position.tolist())), torch.tensor(angles)
    )
    matrix = euler_angles_to_matrix(torch.tensor(angles, dtype=torch.float64))
    expected_xy = (matrix @ position)[:2]
    centroid_yx = center_of_mass_2d(
        projection.clamp(min=0) ** 2
    )  # sharpen: ignore ringing
    torch.testing.assert_close(centroid_yx.flip(-1), expected_xy, atol=0.1, rtol=0)
    peak = int(projection.argmax())
    assert abs(peak // 32 - 16 - expected_xy[1]) < 1
    assert abs(peak % 32 - 16 - expected_xy[0]) < 1


def test_tilt_90_projects_volume_z_onto_minus_image_x():
    projection = project_volume_2d(
        _blob(24, (0.0, 3.0, 5.0)), torch.tensor([0.0, 90.0, 0.0])
    )
    centroid_yx = center_of_mass_2d(projection.clamp(min=0) ** 2)
    torch.testing.assert_close(
        centroid_yx, torch.tensor([3.0, -5.0]).double(), atol=0.1, rtol=0
    )


def test_projection_batches_and_rfft(smooth_volume):
    volume = smooth_volume(16).float()
    angles = random_rotations(6, torch.Generator().manual_seed(0)).reshape(2, 3, 3)
    projections = project_volume_2d(volume, angles)
    assert projections.shape == (2, 3, 16, 16)
    torch.testing.assert_close(
        projections[1, 2], project_volume_2d(volume, angles[1, 2])
    )
    torch.testing.assert_close(
        project_volume_rfft_2d(volume, angles), dft_2d(projections)
    )
    with pytest.raises(ValueError, match="cubic"):
        project_volume_2d(volume[:, :, :8], angles)


def test_project_then_backproject_recovers_volume(smooth_volume):
    volume = smooth_volume(24).float()
    angles = random_rotations(150, torch.Generator().manual_seed(1))
    reconstruction = backproject_2d_to_3d(project_volume_2d(volume, angles), angles)
    assert reconstruction.shape == (24, 24, 24)
    fsc = fourier_shell_correlation(reconstruction, volume)
    assert fsc[1:7].min() > 0.9  # low resolution (up to shell N/4)
    # wrong orientations (A instead of A^T) would not reconstruct
    wrong = backproject_2d_to_3d(
        project_volume_2d(volume, angles), angles[:, [2, 1, 0]] * -1
    )
    assert fourier_shell_correlation(wrong, volume)[3:7].mean() < 0.8


def test_central_slice_extraction_and_insertion_on_grid(smooth_volume):
    volume = smooth_volume(16).float()
    volume_rfft = dft_3d(volume)  # (16, 16, 9)
    identity = torch.zeros(3)
    central = extract_central_slices_rfft_3d(volume_rfft, identity)
    torch.testing.assert_close(
        central, volume_rfft[0], atol=1e-6, rtol=0
    )  # kz = 0 plane
    # projection theorem with RELION normalisation: dft_2d(P) = N * slice
    projection_rfft = dft_2d(volume.sum(0))
    torch.testing.assert_close(16 * central, projection_rfft, atol=1e-5, rtol=0)
    inserted, weights = insert_central_slices_rfft_3d(central[None], identity[None], 16)
    assert inserted.shape == (16, 16, 9)
    assert weights.shape == (16, 16, 9)
    torch.testing.assert_close(inserted[0, :, 1:], central[:, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights[0, :, 1:], torch.ones(16, 8))
    assert weights[1:].abs().max() == 0  # nothing off the kz = 0 plane
    shifted = extract_central_slices_rfft_3d(
        torch.fft.fftshift(volume_rfft, dim=(-3, -2)), identity, fftshifted=True
    )
    torch.testing.assert_close(shifted, torch.fft.fftshift(central, dim=(-2,)))
