import math

import pytest
import torch
import torch_fourier_shell_correlation as tfsc

from cryoavg.recon import fourier_shell_correlation, fsc_to_ssnr, resolution_at


def test_identical_maps_give_one():
    volume = torch.randn((24, 24, 24), generator=torch.Generator().manual_seed(0))
    fsc = fourier_shell_correlation(volume, volume)
    torch.testing.assert_close(fsc, torch.ones(13, dtype=torch.float64))


def test_agrees_with_torch_fourier_shell_correlation():
    generator = torch.Generator().manual_seed(1)
    signal = torch.randn((32, 32, 32), generator=generator)
    a = signal + 0.8 * torch.randn((32, 32, 32), generator=generator)
    b = signal + 0.8 * torch.randn((32, 32, 32), generator=generator)
    ours = fourier_shell_correlation(a, b)
    reference = tfsc.fourier_shell_correlation(a, b).double()
    assert ours.shape == reference.shape
    assert float((ours[1:] - reference[1:]).abs().max()) < 0.06
    # own generator: the global RNG's state depends on the tests run before
    noise = torch.randn((32, 32, 32), generator=generator)
    independent = fourier_shell_correlation(a, noise)
    assert float(independent[2:].abs().max()) < 0.25


def test_resolution_at_synthetic_curve():
    # box 40 -> 21 shells; the curve falls linearly from 1 at shell 0 to 0 at shell 20
    fsc = 1.0 - torch.arange(21, dtype=torch.float64) / 20.0
    crossing = 20.0 * (1 - 0.143)  # shell where the curve is 0.143
    assert resolution_at(fsc, 2.0) == pytest.approx(40 * 2.0 / crossing, rel=1e-6)
    assert resolution_at(fsc, 2.0, threshold=0.5) == pytest.approx(8.0, rel=1e-6)
    # never below the threshold: Nyquist
    assert resolution_at(torch.ones(21, dtype=torch.float64), 2.0) == pytest.approx(4.0)


def test_fsc_to_ssnr():
    fsc = torch.tensor([0.999, 0.5, 0.143, -0.2], dtype=torch.float64)
    ssnr = fsc_to_ssnr(fsc)
    assert float(ssnr[1]) == pytest.approx(1.0)
    assert float(ssnr[3]) == pytest.approx(0.001 / 0.999)
    whole = fsc_to_ssnr(fsc, whole=True, tau2_fudge=2.0)
    f = math.sqrt(2 * 0.143 / 1.143)
    assert float(whole[2]) == pytest.approx(2.0 * f / (1 - f))
    with pytest.raises(ValueError):
        fsc_to_ssnr(fsc, tau2_fudge=0.0)
