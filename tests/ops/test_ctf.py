import math

import pytest
import torch
import torch_ctf

from cryoavg.ops.ctf import apply_ctf_2d, ctf_1d, ctf_2d, electron_wavelength_angstrom
from cryoavg.ops.fourier import dft_2d, idft_2d

PARAMS = {
    "defocus_u_angstrom": 15000.0,
    "defocus_v_angstrom": 12000.0,
    "defocus_angle_degrees": 30.0,
    "voltage_kv": 300.0,
    "cs_mm": 2.7,
    "amplitude_contrast": 0.1,
    "pixel_size_angstrom": 1.5,
}


def relion_ctf_value(
    ky, kx, *, du, dv, angle, kv, cs, q0, px, size, phase=0.0, bfac=0.0, scale=1.0
):
    """RELION CTF::getCTF at integer frequency (ky, kx) of an N grid, by hand."""
    volts = kv * 1e3
    wavelength = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
    x, y = kx / (size * px), ky / (size * px)
    u2 = x * x + y * y
    azimuth = math.atan2(y, x) - math.radians(angle)
    deltaf = -(du + dv) / 2 - (du - dv) / 2 * math.cos(2 * azimuth)
    k1 = math.pi * wavelength
    k2 = math.pi / 2 * cs * 1e7 * wavelength**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    gamma = k1 * deltaf * u2 + k2 * u2 * u2 - math.radians(phase) - k3
    return -math.sin(gamma) * scale * math.exp(-bfac / 4 * u2)


def test_wavelength_relion_constant():
    wavelength = electron_wavelength_angstrom(
        torch.tensor([300.0, 200.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        wavelength,
        torch.tensor([0.0196876153, 0.0250794936]).double(),
        atol=1e-9,
        rtol=0,
    )


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"phase_shift_degrees": 35.0, "bfactor_angstrom2": 80.0, "scale": 0.8},
        {"defocus_angle_degrees": -75.0, "defocus_v_angstrom": 21000.0},
    ],
)
def test_ctf_2d_matches_hand_formula_at_known_frequencies(extra):
    params = {**PARAMS, **extra}
    size = 64
    ctf = ctf_2d(
        **{k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()},
        image_shape=(size, size),
    )
    assert ctf.shape == (64, 33)
    assert ctf.dtype == torch.float64
    for ky, kx in [
        (0, 0),
        (0, 5),
        (3, 4),
        (-7, 2),
        (-20, 0),
        (31, 17),
        (-32, 32),
        (13, 1),
    ]:
        expected = relion_ctf_value(
            ky,
            kx,
            du=params["defocus_u_angstrom"],
            dv=params["defocus_v_angstrom"],
            angle=params["defocus_angle_degrees"],
            kv=300.0,
            cs=2.7,
            q0=0.1,
            px=1.5,
            size=size,
            phase=params.get("phase_shift_degrees", 0.0),
            bfac=params.get("bfactor_angstrom2", 0.0),
            scale=params.get("scale", 1.0),
        )
        assert abs(ctf[ky % size, kx].item() - expected) < 1e-9, (ky, kx)
    ctf32 = ctf_2d(**params, image_shape=(size, size), **{})  # floats -> float32
    assert ctf32.dtype == torch.float32
    assert (ctf32.double() - ctf).abs().max() < 1e-4


def test_ctf_dc_value_and_fftshift_layout():
    ctf = ctf_2d(**PARAMS, image_shape=(32, 32), rfft=False, fftshift=True)
    assert ctf.shape == (32, 32)
    torch.testing.assert_close(ctf[16, 16], torch.tensor(0.1))  # ctf(0) = Q0
    plain = ctf_2d(**PARAMS, image_shape=(32, 32), rfft=False, fftshift=False)
    torch.testing.assert_close(torch.fft.fftshift(plain), ctf)


def test_astigmatism_angle_convention_along_axes():
    # defocus_u lies along the angle: along +x (angle 0) the CTF is the 1D CTF of dU
    size = 128
    params = {**PARAMS, "defocus_angle_degrees": 0.0}
    ctf = ctf_2d(**params, image_shape=(size, size))
    common = {
        k: PARAMS[k]
        for k in ("voltage_kv", "cs_mm", "amplitude_contrast", "pixel_size_angstrom")
    }
    along_u = ctf_1d(defocus_angstrom=15000.0, box_size=size, **common)
    along_v = ctf_1d(defocus_angstrom=12000.0, box_size=size, **common)
    torch.testing.assert_close(ctf[0, :], along_u)  # ky = 0, kx = 0..N/2
    torch.testing.assert_close(ctf[:65, 0], along_v)  # kx = 0, ky = 0..N/2
    rotated = ctf_2d(
        **{**params, "defocus_angle_degrees": 90.0}, image_shape=(size, size)
    )
    torch.testing.assert_close(rotated[:65, 0], along_u)
    # swapping U and V is the same as adding 90 degrees
    swapped = ctf_2d(
        **{
            **params,
            "defocus_u_angstrom": 12000.0,
            "defocus_v_angstrom": 15000.0,
            "defocus_angle_degrees": 90.0,
        },
        image_shape=(size, size),
    )
    torch.testing.assert_close(swapped, ctf, atol=1e-4, rtol=0)


def test_ctf_against_torch_ctf_oracle():
    size = 64
    ours = ctf_2d(**PARAMS, image_shape=(size, size))

    def library(angle):
        return torch_ctf.calculate_ctf_2d(
            defocus=(15000 + 12000) / 2e4,
            astigmatism=(15000 - 12000) / 2e4,
            astigmatism_angle=angle,
            voltage=300.0,
            spherical_aberration=2.7,
            amplitude_contrast=0.1,
            phase_shift=0.0,
            pixel_size=1.5,
            image_shape=(size, size),
            rfft=True,
            fftshift=False,
        )

    # same angle convention; residual from torch_ctf's CODATA wavelength (~6.5e-6 rel.)
    assert (ours - library(30.0)).abs().max() < 3e-3
    assert (ours - library(120.0)).abs().max() > 0.5  # a 90 degree error would show


def test_ctf_broadcasts_per_particle_parameters(device):
    defocus_u = torch.tensor([[10000.0, 20000.0, 30000.0]], device=device)  # (1, 3)
    pixel = torch.tensor([[1.0], [2.0]], device=device)  # (2, 1)
    ctf = ctf_2d(
        **{**PARAMS, "defocus_u_angstrom": defocus_u, "pixel_size_angstrom": pixel},
        image_shape=(16, 16),
    )
    assert ctf.shape == (2, 3, 16, 9)
    assert ctf.device.type == torch.device(device).type
    single = ctf_2d(
        **{**PARAMS, "defocus_u_angstrom": 20000.0, "pixel_size_angstrom": 2.0},
        image_shape=(16, 16),
    )
    torch.testing.assert_close(ctf[1, 1].cpu(), single)


def test_ctf_gradients_at_zero_astigmatism():
    defocus = torch.tensor([12000.0], dtype=torch.float64, requires_grad=True)

    def fn(defocus_value):
        return ctf_2d(
            **{
                **PARAMS,
                "defocus_u_angstrom": defocus_value,
                "defocus_v_angstrom": defocus_value,
            },
            image_shape=(8, 8),
        )

    assert torch.autograd.gradcheck(fn, (defocus,))


def test_ctf_1d_and_validation():
    values = ctf_1d(
        defocus_angstrom=torch.tensor([8000.0, 9000.0]),
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.07,
        pixel_size_angstrom=1.0,
        box_size=32,
    )
    assert values.shape == (2, 17)
    torch.testing.assert_close(values[:, 0], torch.full((2,), 0.07))
    with pytest.raises(ValueError, match="amplitude_contrast"):
        ctf_2d(**{**PARAMS, "amplitude_contrast": 1.0}, image_shape=(8, 8))
    with pytest.raises(ValueError, match="pixel_size"):
        ctf_2d(**{**PARAMS, "pixel_size_angstrom": 0.0}, image_shape=(8, 8))


def test_apply_ctf_2d():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 32, 32, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        apply_ctf_2d(images, torch.ones(32, 17).double()), images
    )
    ctf = ctf_2d(
        **{k: torch.tensor(v, dtype=torch.float64) for k, v in PARAMS.items()},
        image_shape=(32, 32),
    )
    expected = torch.fft.irfft2(
        torch.fft.rfft2(images) * ctf, s=(32, 32)
    )  # origin-free
    torch.testing.assert_close(apply_ctf_2d(images, ctf), expected)
    torch.testing.assert_close(
        apply_ctf_2d(images, ctf), idft_2d(dft_2d(images) * ctf, (32, 32))
    )
    with pytest.raises(ValueError, match="ctf_rfft"):
        apply_ctf_2d(images, torch.ones(32, 32))


def test_intact_first_peak_is_one_before_the_first_peak_only():
    from cryoavg.ops.ctf import ctf_2d

    params = {
        "defocus_u_angstrom": 20000.0,
        "defocus_v_angstrom": 20000.0,
        "defocus_angle_degrees": 0.0,
        "voltage_kv": 300.0,
        "cs_mm": 2.7,
        "amplitude_contrast": 0.1,
        "pixel_size_angstrom": 2.0,
        "image_shape": (128, 128),
        "bfactor_angstrom2": 0.0,
    }
    plain = ctf_2d(**params)
    intact = ctf_2d(**params, intact_first_peak=True)
    radial_plain = plain[0, :64]  # along +ky at kx = 0
    radial_intact = intact[0, :64]
    first_peak = int(torch.argmax(radial_plain.abs()[:20]))
    assert first_peak > 1
    # before the first peak: flat 1; well after it: identical to the plain CTF
    assert torch.allclose(radial_intact[: first_peak - 1], torch.ones(first_peak - 1))
    assert torch.allclose(
        radial_intact[first_peak + 3 :], radial_plain[first_peak + 3 :]
    )
    assert plain[0, 0] < 0.2  # the plain CTF starts near -sin(atan(Q0)) ≈ -0.1
