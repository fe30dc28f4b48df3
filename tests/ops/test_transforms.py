import math

import pytest
import torch

from cryoavg.ops.fourier import dft_2d, idft_2d
from cryoavg.ops.masks import center_of_mass_3d
from cryoavg.ops.rotations import (
    axis_angle_to_matrix,
    euler_angles_to_matrix,
    rotation_matrix_2d,
)
from cryoavg.ops.shifts import integer_shift_2d
from cryoavg.ops.transforms import (
    insert_rotated_dft_2d,
    padded_dft_2d,
    rotate_dft_2d,
    rotate_images_2d,
    sample_rotated_dft_2d,
    transform_images_2d,
    transform_volumes_3d,
)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_identity_and_full_turn(device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 17, 17, generator=generator, dtype=torch.float64).to(device)
    same = transform_images_2d(images, torch.eye(2, dtype=torch.float64, device=device))
    torch.testing.assert_close(same, images)
    full_turn = rotate_images_2d(images, torch.tensor(360.0, device=device))
    torch.testing.assert_close(full_turn, images, atol=1e-9, rtol=0)


def test_rotate_90_direction_matches_rot90():
    # Rz(+90) turns +x (columns) towards +y (rows): torch.rot90 with k = -1 (odd box)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 15, 15, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        rotate_images_2d(images, 90.0), torch.rot90(images, k=-1, dims=(-2, -1))
    )
    torch.testing.assert_close(
        rotate_images_2d(images, -90.0), torch.rot90(images, k=1, dims=(-2, -1))
    )
    torch.testing.assert_close(
        rotate_images_2d(images, 180.0), torch.rot90(images, k=2, dims=(-2, -1))
    )
    # a point right of the centre moves below it (row + 1 is +y)
    delta = torch.zeros(16, 16, dtype=torch.float64)
    delta[8, 8 + 5] = 1.0
    assert rotate_images_2d(delta, 90.0).argmax() == (8 + 5) * 16 + 8


def test_rotation_then_translation_order_and_broadcasting(smooth_image):
    delta = torch.zeros(32, 32, dtype=torch.float64)
    delta[16, 16 + 5] = 1.0  # x = +5
    moved = transform_images_2d(
        delta, rotation_matrix_2d(torch.tensor(90.0).double()), torch.tensor([0.0, 2.0])
    )
    assert moved.argmax() == (16 + 5) * 32 + (16 + 2)  # rotated to y=+5, then x += 2
    images = torch.stack([smooth_image(32), smooth_image(32).mT])[
        :, None
    ]  # (2, 1, h, w)
    angles = torch.tensor([0.0, 30.0, -75.0], dtype=torch.float64)
    batched = rotate_images_2d(images, angles)
    assert batched.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batched[1, 2], rotate_images_2d(images[1, 0], angles[2]))
    shifts = torch.tensor(
        [[1.0, -2.0], [0.0, 3.0]]
    )  # integer: equals zero-fill translate
    translated = transform_images_2d(images[:, 0], torch.eye(2).double(), shifts)
    torch.testing.assert_close(translated, integer_shift_2d(images[:, 0], shifts))


def test_rotate_back_and_forth_smooth_image(smooth_image):
    image = smooth_image(48)
    there_and_back = rotate_images_2d(rotate_images_2d(image, 37.0), -37.0)
    assert _correlation(there_and_back, image) > 0.995


def test_transform_volumes_identity_and_rot90():
    generator = torch.Generator().manual_seed(2)
    volumes = torch.randn(2, 9, 9, 9, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        transform_volumes_3d(volumes, torch.eye(3).double()), volumes
    )
    quarter = math.pi / 2
    rz = axis_angle_to_matrix(torch.tensor([0.0, 0.0, quarter], dtype=torch.float64))
    # +x -> +y: rot90 from the x axis (-1) towards the y axis (-2)
    torch.testing.assert_close(
        transform_volumes_3d(volumes, rz), torch.rot90(volumes, k=1, dims=(-1, -2))
    )
    rx = axis_angle_to_matrix(torch.tensor([quarter, 0.0, 0.0], dtype=torch.float64))
    # +y -> +z: rot90 from the y axis (-2) towards the z axis (-3)
    torch.testing.assert_close(
        transform_volumes_3d(volumes, rx), torch.rot90(volumes, k=1, dims=(-2, -3))
    )
    # the same operator given in zyx order
    torch.testing.assert_close(
        transform_volumes_3d(volumes, rx.flip(-2, -1), zyx=True),
        transform_volumes_3d(volumes, rx),
    )


def test_transform_volumes_moves_points_to_a_p_plus_t():
    size, centre = 24, torch.tensor([3.0, -4.0, 2.0], dtype=torch.float64)  # xyz
    axes = [torch.arange(size, dtype=torch.float64) - size // 2] * 3
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    blob = torch.exp(
        -((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 4
    )
    matrix = euler_angles_to_matrix(
        torch.tensor([30.0, 40.0, 50.0], dtype=torch.float64)
    )
    translation = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)  # xyz
    moved = transform_volumes_3d(blob, matrix, translation)
    expected = matrix @ centre + translation
    torch.testing.assert_close(
        center_of_mass_3d(moved).flip(-1), expected, atol=0.05, rtol=0
    )
    # integer translation in xyz: delta moves by (dx, dy, dz)
    delta = torch.zeros(9, 9, 9, dtype=torch.float64)
    delta[4, 4, 4] = 1.0
    shifted = transform_volumes_3d(
        delta, torch.eye(3).double(), torch.tensor([2.0, 0.0, -1.0])
    )
    assert shifted[4 - 1, 4, 4 + 2] == 1.0


def test_transform_volumes_composition_and_inverse(smooth_volume):
    volume = smooth_volume(24)
    first = euler_angles_to_matrix(
        torch.tensor([10.0, 25.0, -40.0], dtype=torch.float64)
    )
    second = euler_angles_to_matrix(
        torch.tensor([-70.0, 60.0, 15.0], dtype=torch.float64)
    )
    t_first = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    t_second = torch.tensor([-1.5, 0.0, 1.0], dtype=torch.float64)
    twice = transform_volumes_3d(
        transform_volumes_3d(volume, first, t_first), second, t_second
    )
    composed = transform_volumes_3d(volume, second @ first, second @ t_first + t_second)
    assert _correlation(twice, composed) > 0.99
    back = transform_volumes_3d(
        transform_volumes_3d(volume, first, t_first), first.mT, -(first.mT @ t_first)
    )
    assert _correlation(back, volume) > 0.99


def test_transform_volumes_gradients_flow(smooth_volume):
    volume = smooth_volume(16)
    target = transform_volumes_3d(
        volume,
        axis_angle_to_matrix(torch.tensor([0.1, -0.05, 0.2], dtype=torch.float64)),
        torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64),
    )
    omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    translation = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    loss = (
        transform_volumes_3d(volume, axis_angle_to_matrix(omega), translation) - target
    )
    loss.pow(2).sum().backward()
    assert torch.isfinite(omega.grad).all()
    assert omega.grad.abs().sum() > 0
    assert torch.isfinite(translation.grad).all()
    assert translation.grad.abs().sum() > 0
    # descending the gradient reduces the loss (operators can be refined by autograd)
    with torch.no_grad():
        omega_new = omega - 1e-3 * omega.grad / omega.grad.norm()
        translation_new = (
            translation - 1e-2 * translation.grad / translation.grad.norm()
        )
        before = loss.pow(2).sum()
        after = transform_volumes_3d(
            volume, axis_angle_to_matrix(omega_new), translation_new
        )
        assert (after - target).pow(2).sum() < before


def test_transform_volumes_gradcheck():
    generator = torch.Generator().manual_seed(3)
    volume = torch.randn(
        1, 5, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True
    )
    matrix = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.45], dtype=torch.float64))
    matrix = matrix.detach().requires_grad_(True)
    translation = torch.tensor(
        [0.21, -0.37, 0.13], dtype=torch.float64, requires_grad=True
    )
    assert torch.autograd.gradcheck(transform_volumes_3d, (volume, matrix, translation))


def test_rotate_dft_matches_real_space_rotation(smooth_image):
    image = smooth_image(64, sigma=2.5)
    angles = torch.tensor([17.0, 90.0, -135.0], dtype=torch.float64)
    rotated_rfft = rotate_dft_2d(dft_2d(image), angles, 64)
    assert rotated_rfft.shape == (3, 64, 33)
    in_fourier = idft_2d(rotated_rfft, (64, 64))
    in_real_space = rotate_images_2d(image, angles)
    for fourier, real in zip(in_fourier, in_real_space, strict=True):
        assert _correlation(fourier, real) > 0.99
    # the wrong sense of rotation is clearly worse
    assert _correlation(in_fourier[0], rotate_images_2d(image, -17.0)) < 0.95


def test_sample_on_grid_is_exact_and_batched(smooth_image):
    images = torch.stack([smooth_image(32), smooth_image(32).mT])
    padded = padded_dft_2d(images, 2, gridding_correction=False)
    assert padded.shape == (2, 64, 33)
    sampled = sample_rotated_dft_2d(padded, torch.tensor([0.0, 90.0]).double(), 32)
    assert sampled.shape == (2, 2, 32, 17)
    radius = torch.sqrt(
        torch.fft.fftfreq(32, 1 / 32)[:, None] ** 2 + torch.arange(17.0)[None, :] ** 2
    ).double()
    inside = radius <= 16
    torch.testing.assert_close(sampled[:, 0], dft_2d(images) * inside)
    # 90 degrees on the grid: same as rotating the (odd-free) rfft grid exactly
    rotated = dft_2d(torch.rot90(images, k=-1, dims=(-2, -1)).roll(1, dims=-1))
    torch.testing.assert_close(sampled[:, 1], rotated * inside, atol=1e-12, rtol=0)


def test_insert_is_adjoint_of_sample():
    generator = torch.Generator().manual_seed(4)
    padded = torch.randn(3, 48, 25, generator=generator, dtype=torch.complex128)
    angles = torch.tensor([[10.0, 123.0], [-45.0, 300.0]], dtype=torch.float64)
    sampled = sample_rotated_dft_2d(padded, angles, 24)
    assert sampled.shape == (3, 2, 2, 24, 13)
    values = torch.randn(sampled.shape, generator=generator, dtype=torch.complex128)
    inserted = insert_rotated_dft_2d(values, angles, 48)
    assert inserted.shape == padded.shape
    lhs = (sampled.conj() * values).real.sum()
    rhs = (padded.conj() * inserted).real.sum()
    torch.testing.assert_close(lhs, rhs)
    weights = insert_rotated_dft_2d(
        torch.ones(2, 2, 24, 13, dtype=torch.float64), angles, 48
    )
    assert weights.dtype == torch.float64
    assert weights.min() >= 0
    with pytest.raises(ValueError, match="angle axes"):
        insert_rotated_dft_2d(values, torch.zeros(5), 48)


def test_sample_rotated_dft_gradients():
    generator = torch.Generator().manual_seed(5)
    padded = torch.randn(
        16, 9, generator=generator, dtype=torch.complex128, requires_grad=True
    )
    angles = torch.tensor([12.3, -70.1], dtype=torch.float64, requires_grad=True)
    sample_rotated_dft_2d(padded, angles, 8).abs().pow(2).sum().backward()
    assert torch.isfinite(angles.grad).all()
    assert angles.grad.abs().sum() > 0
    assert torch.isfinite(padded.grad).all()


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="rotation_matrices_2d"):
        transform_images_2d(torch.zeros(8, 8), torch.eye(3))
    with pytest.raises(ValueError, match="translations_px"):
        transform_volumes_3d(torch.zeros(4, 4, 4), torch.eye(3), torch.zeros(2))
    with pytest.raises(ValueError, match="pad_factor"):
        padded_dft_2d(torch.zeros(8, 8), 1.5)
    with pytest.raises(ValueError, match="dft_rfft"):
        rotate_dft_2d(torch.zeros(8, 8, dtype=torch.complex64), 10.0, 8)
