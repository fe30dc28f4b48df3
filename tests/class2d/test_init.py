"""Initialisation (spec §A.4) and the model state (``Class2DState``)."""

import io

import pytest
import torch

from cryoavg.class2d import init
from cryoavg.class2d.state import Class2DState
from cryoavg.ops.fourier import power_spectrum_1d

N = 32


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """32-px tensors: one intra-op thread avoids oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(y: float, x: float, sigma: float, n: int = N) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float32) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


def noisy_particles(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    signal = gaussian(2.0, -3.0, 3.0) - 0.5 * gaussian(-4.0, 2.0, 2.0)
    return signal + torch.randn(n, N, N, generator=gen)


# ----------------------------------------------------------------- ini_high, size
def test_ini_high_and_initial_current_size():
    assert init.ini_high_angstrom(32, 2.0) == pytest.approx(32.0)  # round(2.24) = 2
    assert init.ini_high_angstrom(200, 1.0) == pytest.approx(200 / 14)
    assert init.ini_high_angstrom(150, 1.0) == pytest.approx(150 / 11)  # 10.5 → 11
    assert init.initial_current_size(200, 1.0, 200 / 14) == 2 * (14 + 10)
    assert init.initial_current_size(32, 2.0, 32.0) == 24
    assert init.initial_current_size(16, 2.0, 4.0) == 16  # capped at N


# ------------------------------------------------------------------ noise spectra
def test_noise_spectrum_of_white_noise():
    # Per-pixel variance v. With the forward DFT divided by N², E|F(q)|² = v / N², i.e.
    # v / (2N²) per real/imaginary component. Subtracting the power of the mean of n
    # images (variance v / n per pixel) leaves v (n − 1) / (2 n N²).
    n, v = 400, 4.0
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, N, N, generator=gen, dtype=torch.float64) * v**0.5
    sigma2 = init.estimate_noise_spectra(
        images, torch.zeros(n, dtype=torch.long), 1, 12.0, zero_mask=False
    )
    expected = v * (n - 1) / (2 * n * N**2)
    assert sigma2.shape == (1, N // 2 + 1)
    assert float(sigma2[0, 1:].mean()) == pytest.approx(expected, rel=0.03)
    assert torch.allclose(
        sigma2[0, 1:], torch.full((N // 2,), expected, dtype=torch.float64), rtol=0.15
    )


def test_noise_spectra_per_optics_group():
    n = 300
    gen = torch.Generator().manual_seed(2)
    group = torch.arange(n) % 2
    std = torch.where(group == 0, 1.0, 2.0)[:, None, None]
    images = torch.randn(n, N, N, generator=gen, dtype=torch.float64) * std
    sigma2 = init.estimate_noise_spectra(images, group, 3, 12.0, zero_mask=False)
    mean_variance = 2.5
    for g, v in ((0, 1.0), (1, 4.0)):
        expected = (v - mean_variance / n) / (2 * N**2)
        assert float(sigma2[g, 1:].mean()) == pytest.approx(expected, rel=0.04)
    overall = init.estimate_noise_spectra(
        images, torch.zeros(n, dtype=torch.long), 1, 12.0, zero_mask=False
    )
    assert torch.allclose(sigma2[2], overall[0])  # empty group: all images


def test_noise_spectra_with_zero_mask_positive_and_finite():
    images = noisy_particles(50)
    sigma2 = init.estimate_noise_spectra(
        images, torch.zeros(50, dtype=torch.long), 1, 10.0
    )
    assert torch.isfinite(sigma2).all()
    assert (sigma2 > 0).all()


def test_noise_spectra_invalid_group():
    with pytest.raises(ValueError, match="optics_group"):
        init.estimate_noise_spectra(torch.zeros(2, N, N), torch.tensor([0, 3]), 2, 10.0)


# ---------------------------------------------------------------- class images
def test_blob_images_keep_std():
    gen = torch.Generator().manual_seed(3)
    classes = (
        torch.randn(4, N, N, generator=gen)
        * torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None, None]
    )
    classes[3] = 0.0
    blobs = init.blob_class_images(classes, 24.0, generator=gen)
    std = blobs.std(dim=(-2, -1))
    assert torch.allclose(std[:3], classes[:3].std(dim=(-2, -1)), rtol=1e-4)
    assert torch.count_nonzero(blobs[3]) == 0
    assert torch.isfinite(blobs).all()


def test_initial_class_images():
    images = noisy_particles(60)
    kwargs = {
        "ini_high_angstrom": init.ini_high_angstrom(N, 4.0),
        "pixel_size": 4.0,
        "mask_radius_px": 12.0,
    }
    classes = init.initial_class_images(images, None, 3, 7, **kwargs)
    assert classes.shape == (3, N, N)
    assert torch.isfinite(classes).all()
    assert (classes.std(dim=(-2, -1)) > 0).all()
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(classes[a], classes[b], atol=1e-6)
    again = init.initial_class_images(images, None, 3, 7, **kwargs)
    assert torch.equal(classes, again)
    other_seed = init.initial_class_images(images, None, 3, 8, **kwargs)
    assert not torch.allclose(classes, other_seed)


def test_initial_class_images_with_ctf_and_without_blobs():
    images = noisy_particles(40)
    ctf = torch.full((40, N, N // 2 + 1), -0.8)  # a constant CTF scales the images
    classes = init.initial_class_images(
        -0.8 * images, ctf, 2, 1, 16.0, 2.0, 12.0, init_blobs=False, zero_mask=False
    )
    assert torch.isfinite(classes).all()
    # the low-resolution average of the data is recovered (CTF divided out)
    mean_image = init.initial_class_images(
        images, None, 1, 1, 16.0, 2.0, 12.0, init_blobs=False, zero_mask=False
    )
    assert (
        torch.corrcoef(torch.stack([classes[0].flatten(), mean_image[0].flatten()]))[
            0, 1
        ]
        > 0.9
    )


def test_initial_tau2_and_ssnr():
    classes = torch.stack([gaussian(0, 0, 3), gaussian(2, 2, 2)])
    tau2 = init.initial_tau2(classes, 2.0)
    assert torch.allclose(tau2, power_spectrum_1d(classes))  # T · PS / 2 with T = 2
    sigma2 = torch.stack(
        [torch.full((N // 2 + 1,), 1e-3), torch.full((N // 2 + 1,), 3e-3)]
    )
    prior = torch.tensor([0.25, 0.75])
    ssnr = init.initial_ssnr(tau2, sigma2, prior, 1000)
    assert torch.allclose(ssnr, 1000 * prior[:, None] * tau2 / 2e-3)


def test_initialise_state():
    state = Class2DState(3, N, n_optics_groups=1, n_scale_groups=2)
    state.moment1_ri.fill_(5.0)
    images = noisy_particles(45)
    init.initialise_state(
        state,
        images,
        torch.zeros(45, dtype=torch.long),
        pixel_size=4.0,
        mask_radius_px=12.0,
        tau2_fudge=2.0,
        seed=11,
        n_particles=10_000,
        scale_group_particle_count=torch.tensor([6000.0, 4000.0]),
    )
    assert torch.isfinite(state.class_images).all()
    assert (state.class_images.std(dim=(-2, -1)) > 0).all()
    assert (state.sigma2_noise > 0).all()
    assert torch.allclose(state.class_prior, torch.full((3,), 1 / 3))
    assert torch.count_nonzero(state.moment1_ri) == 0
    assert (state.moment2 == 1).all()
    assert int(state.current_size) == init.initial_current_size(
        N, 4.0, init.ini_high_angstrom(N, 4.0)
    )
    assert (state.ssnr[:, 0] > 0).all()
    assert float(state.tau2_fudge) == 2.0
    assert state.scale_group_particle_count.tolist() == [6000.0, 4000.0]


# --------------------------------------------------------------------------- state
def test_state_shapes_and_parameters():
    state = Class2DState(4, N, n_optics_groups=2, n_scale_groups=5)
    big = 2 * N
    assert state.class_images.shape == (4, N, N)
    assert state.sigma2_noise.shape == (2, N // 2 + 1)
    assert state.scale.shape == (5,)
    assert state.moment1.shape == (2, 4, big, big // 2 + 1)
    assert state.moment1.is_complex()
    assert state.moment2.shape == (4, big, big // 2 + 1)
    params = dict(state.named_parameters())
    assert set(params) == {"class_images", "sigma2_noise", "scale"}
    assert not any(p.requires_grad for p in params.values())
    state.moment1[1, 2, 3, 4] = 1.0 + 2.0j  # the complex view writes the buffer
    assert state.moment1_ri[1, 2, 3, 4].tolist() == [1.0, 2.0]
    double = state.to(torch.float64)
    assert double.moment1.dtype == torch.complex128
    assert double.current_size.dtype == torch.int64
    with pytest.raises(ValueError, match="box_size"):
        Class2DState(2, 31)


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = Class2DState(3, N, n_optics_groups=2, n_scale_groups=4)
    for tensor in [*state.parameters(), *state.buffers()]:
        if tensor.dtype.is_floating_point:
            tensor.data.copy_(torch.rand(tensor.shape, generator=gen))
    state.current_size.fill_(24)
    state.current_resolution_shell.fill_(7)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = Class2DState(3, N, n_optics_groups=2, n_scale_groups=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in state.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert torch.equal(restored.moment1, state.moment1)
    assert int(restored.current_size) == 24
