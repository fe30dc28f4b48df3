import pytest
import torch
import torch_fourier_shift

from cryoavg.ops.fourier import dft_2d, dft_3d
from cryoavg.ops.shifts import (
    integer_shift_2d,
    phase_shift_dft_2d,
    phase_shift_dft_3d,
    shift_images_2d,
    shift_volumes_3d,
    translation_grid_2d,
)


def test_integer_fourier_shift_equals_roll(device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 18, generator=generator, dtype=torch.float64).to(
        device
    )
    shifted = shift_images_2d(images, torch.tensor([3.0, -5.0], device=device))
    torch.testing.assert_close(shifted, torch.roll(images, (3, -5), dims=(-2, -1)))
    volumes = torch.randn(2, 8, 10, 12, generator=generator, dtype=torch.float64).to(
        device
    )
    shifted3 = shift_volumes_3d(volumes, torch.tensor([1.0, -2.0, 4.0], device=device))
    torch.testing.assert_close(
        shifted3, torch.roll(volumes, (1, -2, 4), dims=(-3, -2, -1))
    )


def test_shift_sign_moves_content_by_plus_shift():
    image = torch.zeros(16, 16, dtype=torch.float64)
    image[8, 8] = 1.0
    shifted = shift_images_2d(image, torch.tensor([2.0, -3.0]))
    assert shifted.argmax() == (8 + 2) * 16 + (8 - 3)
    assert shifted.dtype == torch.float64


def test_per_image_subpixel_shifts_invert(smooth_image):
    # odd size: no Nyquist terms, so sub-pixel shifts are exactly invertible
    images = torch.stack([smooth_image(33), smooth_image(33).flip(-1)])
    shifts = torch.tensor([[0.3, -1.7], [2.25, 0.5]], dtype=torch.float64)
    there = shift_images_2d(images, shifts)
    back = shift_images_2d(there, -shifts)
    torch.testing.assert_close(back, images, atol=1e-12, rtol=0)
    # a half-pixel shift of a smooth image is close to the average of neighbours
    half = shift_images_2d(images[0], torch.tensor([0.0, 0.5]).double())
    average = 0.5 * (images[0] + torch.roll(images[0], 1, dims=-1))
    assert (half - average).abs().max() < 0.05


@pytest.mark.parametrize(
    ("rfft", "fftshifted"), [(True, False), (True, True), (False, True)]
)
def test_phase_shift_dft_matches_shifted_images(rfft, fftshifted, smooth_image):
    # odd size: no Nyquist terms, so real-space and Fourier-space shifts agree exactly
    images = torch.stack([smooth_image(33), smooth_image(33).mT])
    shifts = torch.tensor([[1.25, -0.5], [-3.0, 2.5]], dtype=torch.float64)
    dft = dft_2d(images, rfft=rfft, fftshift=fftshifted)
    shifted_dft = phase_shift_dft_2d(
        dft, shifts, (33, 33), rfft=rfft, fftshifted=fftshifted
    )
    expected = dft_2d(shift_images_2d(images, shifts), rfft=rfft, fftshift=fftshifted)
    torch.testing.assert_close(shifted_dft, expected, atol=1e-14, rtol=0)
    # many shifts of one image: (t, 2) against (h, w2)
    grid = translation_grid_2d(2.0, 1.0, dtype=torch.float64)
    many = phase_shift_dft_2d(dft[0], grid, (33, 33), rfft=rfft, fftshifted=fftshifted)
    assert many.shape == (grid.shape[0], *dft.shape[-2:])


def test_shifts_agree_with_torch_fourier_shift_oracle(smooth_image):
    images = torch.stack([smooth_image(32), smooth_image(32).mT]).float()
    shifts = torch.tensor([[1.25, -0.5], [-3.0, 2.5]])
    library = torch_fourier_shift.fourier_shift_image_2d(images, shifts)
    torch.testing.assert_close(
        shift_images_2d(images, shifts), library, atol=1e-5, rtol=0
    )
    dft = dft_2d(images, rfft=False, fftshift=True)
    library_dft = torch_fourier_shift.fourier_shift_dft_2d(
        dft, image_shape=(32, 32), shifts=shifts, rfft=False, fftshifted=True
    )
    ours = phase_shift_dft_2d(dft, shifts, (32, 32), rfft=False, fftshifted=True)
    torch.testing.assert_close(ours, library_dft, atol=1e-6, rtol=0)


def test_phase_shift_dft_3d_integer():
    generator = torch.Generator().manual_seed(1)
    volume = torch.randn(8, 8, 8, generator=generator, dtype=torch.float64)
    shifted = phase_shift_dft_3d(
        dft_3d(volume), torch.tensor([2.0, 0.0, -1.0]), (8, 8, 8)
    )
    expected = dft_3d(torch.roll(volume, (2, 0, -1), dims=(-3, -2, -1)))
    torch.testing.assert_close(shifted, expected)


def test_phase_shift_dft_gradcheck():
    generator = torch.Generator().manual_seed(2)
    dft = dft_2d(torch.randn(2, 6, 6, generator=generator, dtype=torch.float64))
    dft = dft.detach().requires_grad_(True)
    shifts = torch.tensor(
        [[0.3, -0.7], [1.1, 0.2]], dtype=torch.float64, requires_grad=True
    )

    def fn(dft_values, shift_values):
        return phase_shift_dft_2d(dft_values, shift_values, (6, 6))

    assert torch.autograd.gradcheck(fn, (dft, shifts))


def test_translation_grid_relion_rule_and_order():
    grid = translation_grid_2d(5.0, 2.0, dtype=torch.float64)
    # |ix|,|iy| <= 3 and ix^2 + iy^2 <= 6: 1 + 4 + 4 + 4 + 8 = 21 points
    assert grid.shape == (21, 2)
    assert (grid.pow(2).sum(-1) < 25.001).all()
    torch.testing.assert_close(
        grid[0], torch.tensor([-2.0, -4.0]).double()
    )  # x outer, y inner
    torch.testing.assert_close(grid[1], torch.tensor([0.0, -4.0]).double())
    assert torch.unique(grid, dim=0).shape[0] == 21
    cross = translation_grid_2d(
        1.0, 1.0
    )  # boundary points kept by the +0.001 tolerance
    assert cross.shape == (5, 2)
    torch.testing.assert_close(translation_grid_2d(0.0, 1.0), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="step_px"):
        translation_grid_2d(5.0, 0.0)


def test_integer_shift_2d_zero_fill_and_broadcast():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 10, 12, generator=generator)
    shifts = torch.tensor([[[2, -3]], [[-1, 4]]])  # (2, 1, 2) -> per image
    out = integer_shift_2d(images[:, None], shifts)  # (2, 1, 10, 12)
    assert out.shape == (2, 1, 10, 12)
    expected = torch.roll(images[0], (2, -3), dims=(-2, -1))
    expected[:2, :] = 0.0
    expected[:, -3:] = 0.0
    torch.testing.assert_close(out[0, 0], expected)
    expected = torch.roll(images[1], (-1, 4), dims=(-2, -1))
    expected[-1:, :] = 0.0
    expected[:, :4] = 0.0
    torch.testing.assert_close(out[1, 0], expected)
    many = integer_shift_2d(
        images[0], torch.tensor([[0.4, 0.0], [0.0, 1.6]])
    )  # rounded
    torch.testing.assert_close(many[0], images[0])
    torch.testing.assert_close(many[1][:, 2:], images[0][:, :-2])
    with pytest.raises(ValueError, match="shifts_px"):
        integer_shift_2d(images, torch.zeros(3))
