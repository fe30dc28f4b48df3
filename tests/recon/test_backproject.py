import pytest
import torch
import torch_fourier_slice

from cryoavg.ops.ctf import ctf_2d
from cryoavg.ops.fourier import dft_2d, idft_2d
from cryoavg.ops.masks import spherical_mask_3d
from cryoavg.ops.projection import project_volume_2d
from cryoavg.ops.rotations import euler_angles_to_matrix, random_rotations
from cryoavg.recon import (
    BackprojectionAccumulator,
    ctf_for_images,
    fourier_shell_correlation,
    insert_particles,
    padded_size,
    wiener_reconstruct,
)


def _blob_volume(size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 1, size, size, size), generator=generator)
    smooth = torch.nn.functional.avg_pool3d(noise, 3, 1, 1)[0, 0]
    return smooth * spherical_mask_3d((size,) * 3, size / 2 - 5, 3)


def _poses(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    angles = random_rotations(n, generator=torch.Generator().manual_seed(seed))
    return angles, euler_angles_to_matrix(angles.double()).float()


def test_padded_size():
    assert padded_size(64, 2.0) == 128
    assert padded_size(48, 1.0) == 48
    with pytest.raises(ValueError):
        padded_size(64, 0.5)


def test_insertion_matches_torch_fourier_slice():
    size = 16
    generator = torch.Generator().manual_seed(3)
    images = torch.randn((5, size, size), generator=generator)
    _, matrices = _poses(5)
    data, weights = insert_particles(images, matrices, pad_factor=1.0)
    spectra = torch.fft.rfftn(torch.fft.ifftshift(images, dim=(-2, -1)), dim=(-2, -1))
    reference, reference_weights = torch_fourier_slice.insert_central_slices_rfft_3d(
        image_rfft=torch.fft.fftshift(spectra, dim=(-2,)),
        volume_shape=(size,) * 3,
        rotation_matrices=matrices.mT,
        fftfreq_max=0.5,
    )
    # compare away from the outermost shell, where the library drops samples that
    # fall beyond index p - 1 instead of wrapping them
    k = torch.arange(size) - size // 2
    radius = torch.sqrt(
        k[:, None, None] ** 2 + k[None, :, None] ** 2 + torch.arange(size // 2 + 1) ** 2
    )
    inner = radius < size / 2 - 1.5
    torch.testing.assert_close(
        weights[inner], reference_weights[inner], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(data[inner], reference[inner], atol=1e-3, rtol=1e-4)


def test_noise_free_projections_reconstruct_to_most_of_nyquist():
    size = 32
    volume = _blob_volume(size)
    angles, matrices = _poses(1500)
    projections = project_volume_2d(volume, angles)
    data, weights = insert_particles(projections, matrices)
    reconstruction = wiener_reconstruct(data, weights, size)
    fsc = fourier_shell_correlation(reconstruction, volume)
    assert fsc.shape == (size // 2 + 1,)
    assert float(fsc[: int(0.9 * size / 2) + 1].min()) > 0.9
    scale = float((reconstruction * volume).sum() / (volume * volume).sum())
    assert 0.9 < scale < 1.1


def test_shifts_are_undone():
    size = 32
    volume = _blob_volume(size, seed=4)
    angles, matrices = _poses(800, seed=5)
    shifts = 2.5 * torch.randn((800, 2), generator=torch.Generator().manual_seed(6))
    projections = project_volume_2d(volume, angles)
    # the particle is the projection shifted by -origin (spec §0.3)
    from cryoavg.ops.shifts import shift_images_2d

    particles = shift_images_2d(projections, -shifts)
    centred = insert_particles(particles, matrices, shifts_px=shifts)
    uncentred = insert_particles(particles, matrices)
    fsc_good = fourier_shell_correlation(wiener_reconstruct(*centred, size), volume)
    fsc_bad = fourier_shell_correlation(wiener_reconstruct(*uncentred, size), volume)
    assert float(fsc_good[1:13].min()) > 0.9
    assert float(fsc_bad[6:13].mean()) < 0.5


def test_ctf_corrected_reconstruction():
    size = 32
    volume = _blob_volume(size, seed=7)
    n = 1500
    angles, matrices = _poses(n, seed=8)
    generator = torch.Generator().manual_seed(9)
    params = {
        "defocus_u_angstrom": 8000 + 10000 * torch.rand(n, generator=generator),
        "defocus_v_angstrom": 8000 + 10000 * torch.rand(n, generator=generator),
        "defocus_angle_degrees": 180 * torch.rand(n, generator=generator),
        "voltage_kv": torch.full((n,), 300.0),
        "cs_mm": torch.full((n,), 2.7),
        "amplitude_contrast": torch.full((n,), 0.1),
        "pixel_size_angstrom": torch.full((n,), 4.0),
    }
    ctf = ctf_2d(**params, image_shape=(size, size))
    torch.testing.assert_close(ctf_for_images(params, size), ctf)
    projections = project_volume_2d(volume, angles)
    modulated = idft_2d(dft_2d(projections) * ctf, (size, size))
    corrected = wiener_reconstruct(
        *insert_particles(modulated, matrices, ctf=params), size
    )
    plain = wiener_reconstruct(*insert_particles(modulated, matrices), size)
    fsc_corrected = fourier_shell_correlation(corrected, volume)
    fsc_plain = fourier_shell_correlation(plain, volume)
    assert float(fsc_corrected[1:14].min()) > 0.9
    assert float(fsc_plain[1:14].mean()) < float(fsc_corrected[1:14].mean()) - 0.2


def test_accumulator_adds_and_weights():
    size = 16
    generator = torch.Generator().manual_seed(10)
    images = torch.randn((6, size, size), generator=generator)
    _, matrices = _poses(6, seed=11)
    first = BackprojectionAccumulator(size)
    first.insert(images[:3], matrices[:3])
    second = BackprojectionAccumulator(size)
    second.insert(images[3:], matrices[3:])
    total = first + second
    data, weights = insert_particles(images, matrices)
    torch.testing.assert_close(total.data, data, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(total.weights, weights, atol=1e-5, rtol=1e-5)
    assert total.n_particles == 6
    # zero particle weights: nothing is inserted
    empty = insert_particles(images, matrices, particle_weights=torch.zeros(6))
    assert float(empty[0].abs().max()) == 0.0
    assert float(empty[1].abs().max()) == 0.0


def test_bad_shapes_raise():
    images = torch.zeros((2, 16, 16))
    _, matrices = _poses(2)
    with pytest.raises(ValueError, match="rotation_matrices"):
        insert_particles(images, matrices[:1])
    with pytest.raises(ValueError, match="ctf"):
        insert_particles(images, matrices, ctf=torch.ones((2, 16, 16)))
    with pytest.raises(ValueError, match="shifts_px"):
        insert_particles(images, matrices, shifts_px=torch.zeros(2, 3))
