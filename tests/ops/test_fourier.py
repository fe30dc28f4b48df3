import math

import numpy as np
import pytest
import torch
import torch_fourier_shell_correlation
import torch_grid_utils

from cryoavg.ops.fourier import (
    dft_2d,
    dft_3d,
    fftfreq_grid,
    fourier_ring_correlation,
    fourier_shell_correlation,
    idft_2d,
    idft_3d,
    lowpass_filter,
    lowpass_weights,
    power_spectrum_1d,
    resize_fourier_2d,
    resize_fourier_3d,
    resolution_at_threshold,
    shell_average,
    shell_index,
    shell_pixel_counts,
    shell_sum,
)


def _relion_frequencies(size: int, rfft: bool):
    """(ip, jp) of every Fourier pixel with RELION's FFTW_ELEMENT indexing (numpy)."""
    width = size // 2 + 1 if rfft else size
    rows = np.array([i if i < size // 2 + 1 else i - size for i in range(size)])
    cols = np.arange(width) if rfft else rows.copy()
    return rows[:, None] + 0 * cols[None, :], cols[None, :] + 0 * rows[:, None]


@pytest.mark.parametrize("size", [16, 15])
@pytest.mark.parametrize("rfft", [True, False])
@pytest.mark.parametrize("fftshift", [True, False])
def test_dft_round_trip_2d_and_3d(size, rfft, fftshift, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size + 2, generator=generator, dtype=torch.float64)
    images = images.to(device)
    dft = dft_2d(images, rfft=rfft, fftshift=fftshift)
    assert dft.device.type == torch.device(device).type
    back = idft_2d(dft, images.shape[-2:], rfft=rfft, fftshifted=fftshift)
    torch.testing.assert_close(back, images)
    volumes = images[:, :, : size - 4, : size - 2].reshape(2, -1, size - 2)[..., None]
    volumes = volumes.expand(-1, -1, -1, 5).contiguous()
    back3 = idft_3d(
        dft_3d(volumes, rfft=rfft, fftshift=fftshift),
        volumes.shape[-3:],
        rfft=rfft,
        fftshifted=fftshift,
    )
    torch.testing.assert_close(back3, volumes)


def test_dft_normalisation_parseval_and_origin():
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    full = dft_2d(image, rfft=False)
    torch.testing.assert_close(full.abs().pow(2).sum(), image.pow(2).mean())
    torch.testing.assert_close(full[0, 0].real, image.mean())
    # a delta at the origin N//2 has a real, flat transform 1/N^2
    delta = torch.zeros(15, 15, dtype=torch.float64)
    delta[7, 7] = 1.0
    torch.testing.assert_close(
        dft_2d(delta), torch.full((15, 8), 1 / 225, dtype=torch.complex128)
    )
    # fftshift puts the zero frequency at index N//2 (rows only for an rfft)
    shifted = dft_2d(image, rfft=True, fftshift=True)
    torch.testing.assert_close(shifted[8, 0].real, image.mean())
    shifted_full = dft_2d(image, rfft=False, fftshift=True)
    torch.testing.assert_close(shifted_full[8, 8].real, image.mean())


def test_idft_rejects_wrong_shape():
    with pytest.raises(ValueError, match="expected"):
        idft_2d(torch.zeros(16, 9, dtype=torch.complex64), (16, 18))


def test_fftfreq_grid_values_and_order():
    grid = fftfreq_grid((8, 6), rfft=True, fftshift=False, dtype=torch.float64)
    assert grid.shape == (8, 4, 2)
    torch.testing.assert_close(
        grid[..., 0][:, 0], torch.fft.fftfreq(8, dtype=torch.float64)
    )
    torch.testing.assert_close(
        grid[..., 1][0], torch.fft.rfftfreq(6, dtype=torch.float64)
    )
    shifted = fftfreq_grid((5, 5, 5), rfft=False, fftshift=True)
    torch.testing.assert_close(shifted[2, 2, 2], torch.zeros(3))
    # same layout as the field's library, for every flag combination
    for shape in [(6, 7), (5, 4, 6)]:
        for rfft in (True, False):
            for fftshift in (True, False):
                torch.testing.assert_close(
                    fftfreq_grid(shape, rfft=rfft, fftshift=fftshift),
                    torch_grid_utils.fftfreq_grid(shape, rfft=rfft, fftshift=fftshift),
                )
    exact = fftfreq_grid((33, 33), rfft=True, fftshift=False, dtype=torch.float64)
    assert exact[1, 0, 0].item() == 1 / 33


def test_shell_index_known_pixels():
    idx = shell_index((16, 16), rfft=True, fftshift=False)
    assert idx.dtype == torch.long
    assert idx.shape == (16, 9)
    assert idx[0, 0] == 0
    assert idx[3, 4] == 5  # ky=3, kx=4
    assert idx[16 - 3, 4] == 5  # ky=-3
    assert idx[1, 1] == 1  # round(sqrt 2)
    assert idx[2, 2] == 3  # round(2.83)
    assert idx[8, 8] == 11  # corner (-8, 8): round(11.31)
    excluded = shell_index((16, 16), rfft=True, exclude_redundant=True)
    assert excluded[15, 0] == -1
    assert excluded[9, 0] == -1
    assert excluded[8, 0] == 8  # Nyquist row kept (RELION calls it +N/2)
    assert excluded[15, 1] == 1
    full = shell_index((16, 16), rfft=False, fftshift=True)
    assert full[8, 8] == 0
    assert full[8 + 3, 8 - 4] == 5
    with pytest.raises(ValueError, match="square"):
        shell_index((16, 18))


@pytest.mark.parametrize("size", [8, 9, 16])
def test_shell_pixel_counts_match_relion_loop(size):
    ip, jp = _relion_frequencies(size, rfft=True)
    expected = np.zeros(size // 2 + 1, dtype=int)
    for i_val, j_val in zip(ip.ravel(), jp.ravel(), strict=True):
        ires = math.floor(math.sqrt(i_val * i_val + j_val * j_val) + 0.5)
        if ires < size // 2 + 1 and not (j_val == 0 and i_val < 0):
            expected[ires] += 1
    np.testing.assert_array_equal(shell_pixel_counts((size, size)).numpy(), expected)
    full = shell_pixel_counts((size, size), rfft=False)
    assert full[0] == 1
    assert full[1] == 8


def test_shell_sum_and_average():
    idx = shell_index((16, 16))
    constant = torch.full((2, 16, 9), 3.5, dtype=torch.float64)
    torch.testing.assert_close(
        shell_average(constant, idx, 9), torch.full((2, 9), 3.5, dtype=torch.float64)
    )
    counts = shell_sum(torch.ones(16, 9, dtype=torch.float64), idx, 9)
    torch.testing.assert_close(shell_sum(constant, idx, 9), 3.5 * counts.expand(2, 9))
    # shells beyond the data are empty -> 0, indices outside [0, n) ignored
    averages = shell_average(torch.ones(16, 9), idx.clamp(max=3), 6)
    torch.testing.assert_close(averages, torch.tensor([1.0, 1, 1, 1, 0, 0]))
    masked = torch.where(idx == 2, -1, idx)
    assert shell_sum(torch.ones(16, 9), masked, 9)[2] == 0
    values = torch.randn(16, 9, dtype=torch.float64, requires_grad=True)
    shell_sum(values, idx, 9).sum().backward()
    assert torch.isfinite(values.grad).all()
    with pytest.raises(ValueError, match="does not end"):
        shell_sum(torch.ones(4, 4), idx, 9)


def test_power_spectrum_of_white_noise_and_single_frequency():
    generator = torch.Generator().manual_seed(2)
    noise = 2.0 * torch.randn(200, 32, 32, generator=generator, dtype=torch.float64)
    spectrum = power_spectrum_1d(noise).mean(0)
    assert spectrum.shape == (17,)
    # E|F|^2 = sigma^2 / N^2 with the forward normalisation
    torch.testing.assert_close(
        spectrum[1:], torch.full((16,), 4.0 / 1024).double(), rtol=0.1, atol=0
    )
    columns = torch.arange(32, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * 5 * columns / 32).expand(32, 32)
    wave_spectrum = power_spectrum_1d(wave)
    assert int(wave_spectrum.argmax()) == 5
    assert wave_spectrum[torch.arange(17) != 5].abs().max() < 1e-20
    volume_spectrum = power_spectrum_1d(torch.randn(2, 8, 8, 8), ndim=3)
    assert volume_spectrum.shape == (2, 5)


def _frc_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RELION getFSC: rfft half plane, round(|k|) binning (independent numpy loop)."""
    size = a.shape[-1]
    fa, fb = np.fft.rfft2(a), np.fft.rfft2(b)
    ip, jp = _relion_frequencies(size, rfft=True)
    n_shells = size // 2 + 1
    num, da, db = np.zeros(n_shells), np.zeros(n_shells), np.zeros(n_shells)
    for (i, j), i_val, j_val in zip(
        np.ndindex(ip.shape), ip.ravel(), jp.ravel(), strict=True
    ):
        ires = math.floor(math.sqrt(i_val * i_val + j_val * j_val) + 0.5)
        if ires < n_shells:
            num[ires] += (fa[i, j] * np.conj(fb[i, j])).real
            da[ires] += abs(fa[i, j]) ** 2
            db[ires] += abs(fb[i, j]) ** 2
    return num / np.sqrt(da * db)


def test_fourier_ring_correlation_matches_relion_binning(smooth_image):
    generator = torch.Generator().manual_seed(3)
    signal = smooth_image(32)
    a = signal + 0.05 * torch.randn(32, 32, generator=generator, dtype=torch.float64)
    b = signal + 0.05 * torch.randn(32, 32, generator=generator, dtype=torch.float64)
    frc = fourier_ring_correlation(a, b)
    np.testing.assert_allclose(
        frc.numpy(), _frc_reference(a.numpy(), b.numpy()), atol=1e-10
    )
    torch.testing.assert_close(fourier_ring_correlation(a, a), torch.ones(17).double())
    torch.testing.assert_close(
        fourier_ring_correlation(a, -3 * a), -torch.ones(17).double()
    )


def test_fourier_ring_correlation_against_library_and_noise(smooth_image):
    generator = torch.Generator().manual_seed(4)
    signal = smooth_image(64, sigma=1.5)
    a = signal + 0.02 * torch.randn(64, 64, generator=generator, dtype=torch.float64)
    b = signal + 0.02 * torch.randn(64, 64, generator=generator, dtype=torch.float64)
    ours = fourier_ring_correlation(a, b)
    library = torch_fourier_shell_correlation.fourier_ring_correlation(a, b)
    # the library bins by linear interpolation between shells: close but not identical
    assert (ours[1:-1] - library[1:-1]).abs().mean() < 0.05
    noise = torch.randn(2, 100, 64, 64, generator=generator, dtype=torch.float64)
    independent = fourier_ring_correlation(noise[0], noise[1]).mean(0)
    assert independent[4:].abs().mean() < 0.03
    batched = fourier_ring_correlation(torch.stack([a, b]), a)
    torch.testing.assert_close(batched[0], torch.ones(33).double())
    torch.testing.assert_close(batched[1], ours)


def test_fourier_shell_correlation_volumes(smooth_volume):
    generator = torch.Generator().manual_seed(5)
    volume = smooth_volume(16)
    noisy = volume + 0.01 * torch.randn(
        16, 16, 16, generator=generator, dtype=torch.float64
    )
    fsc = fourier_shell_correlation(volume, noisy)
    assert fsc.shape == (9,)
    assert fsc[:4].min() > 0.99
    library = torch_fourier_shell_correlation.fourier_shell_correlation(volume, noisy)
    assert (fsc[1:-1] - library[1:-1]).abs().mean() < 0.05


def test_resolution_at_threshold_interpolates():
    shells = torch.arange(17, dtype=torch.float64)
    linear = 1 - shells / 16  # N = 32
    resolution = resolution_at_threshold(linear, 32, 2.0, 0.5)
    torch.testing.assert_close(resolution, torch.tensor(64 / 8).double())
    # 0.143: c[13] = 0.1875, c[14] = 0.125 -> shell 13 + 0.0445 / 0.0625
    expected_shell = 13 + (0.1875 - 0.143) / 0.0625
    torch.testing.assert_close(
        resolution_at_threshold(linear, 32, 2.0, 0.143),
        torch.tensor(64 / expected_shell).double(),
    )
    flat = torch.ones(2, 17, dtype=torch.float64)
    flat[1, 3:] = 0.0
    result = resolution_at_threshold(flat, 32, 2.0, 0.143)
    torch.testing.assert_close(result[0], torch.tensor(4.0).double())  # Nyquist
    assert 64 / 3 < result[1] < 64 / 2
    with pytest.raises(ValueError, match="2 shells"):
        resolution_at_threshold(torch.ones(1), 32, 2.0)


def test_lowpass_weights_known_radii():
    # R = round(64 * 2 / 16) = 8, edge 2 shells: keep r < 7, zero r > 9
    weights = lowpass_weights((64, 64), 16.0, 2.0, 2, dtype=torch.float64)
    assert weights[0, 6] == 1.0
    assert weights[0, 7] == 1.0
    torch.testing.assert_close(weights[0, 8], torch.tensor(0.5).double())
    assert weights[0, 9] < 1e-12
    assert weights[0, 10] == 0.0
    torch.testing.assert_close(
        weights[5, 5],
        torch.tensor(0.5 + 0.5 * math.cos(math.pi * (math.sqrt(50) - 7) / 2)).double(),
    )
    hard = lowpass_weights((64, 64), 16.0, 2.0, 0)
    assert hard[0, 8] == 1.0
    assert hard[0, 9] == 0.0


def test_lowpass_filter_2d_and_3d():
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(3, 64, 64, generator=generator, dtype=torch.float64)
    filtered = lowpass_filter(images, 16.0, 2.0)
    before, after = dft_2d(images), dft_2d(filtered)
    radius = shell_index((64, 64))
    torch.testing.assert_close(after[..., radius < 7], before[..., radius < 7])
    assert after[..., radius > 9].abs().max() < 1e-12
    volumes = torch.randn(2, 16, 16, 16, generator=generator, dtype=torch.float64)
    filtered3 = lowpass_filter(volumes, 8.0, 1.0, ndim=3)  # R = 2
    spectrum = power_spectrum_1d(filtered3, ndim=3)
    assert spectrum[:, 4:].abs().max() < 1e-20
    assert spectrum[:, 1].min() > 0
    with pytest.raises(ValueError, match="> 0"):
        lowpass_filter(images, 0.0, 2.0)


@pytest.mark.parametrize(("old", "new"), [(32, 20), (32, 48), (31, 16), (24, 33)])
def test_resize_fourier_preserves_scale_and_band_limited_content(
    old, new, smooth_image
):
    constant = torch.full((2, old, old), 1.7, dtype=torch.float64)
    torch.testing.assert_close(
        resize_fourier_2d(constant, new), torch.full((2, new, new), 1.7).double()
    )
    image = lowpass_filter(
        smooth_image(old, sigma=2.5), 4 * 1.0 * old / min(old, new), 1.0
    )
    there_and_back = resize_fourier_2d(resize_fourier_2d(image, new), old)
    torch.testing.assert_close(there_and_back, image, atol=1e-9, rtol=0)


def test_resize_fourier_keeps_centre_and_3d():
    image = torch.zeros(32, 32, dtype=torch.float64)
    image[16, 16] = 1.0
    small = resize_fourier_2d(image, 16)
    assert small.argmax() == 8 * 16 + 8  # origin N//2 -> new N//2
    torch.testing.assert_close(
        small.sum(), torch.tensor(0.25).double()
    )  # mean preserved
    volume = torch.full((12, 12, 12), -0.3, dtype=torch.float64)
    torch.testing.assert_close(
        resize_fourier_3d(volume, 20), torch.full((20, 20, 20), -0.3).double()
    )
