import math

import pytest
import torch

from cryoavg.ops.rotations import (
    axis_angle_to_matrix,
    euler_angles_to_matrix,
    matrix_to_axis_angle,
    matrix_to_euler_angles,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    random_rotations,
    rotation_6d_to_matrix,
    rotation_angle_degrees,
    rotation_matrix_2d,
    xyz_to_zyx_matrices,
)

# From the element formulas of relion-behaviour.md §0.2 (a=rot, b=tilt, g=psi),
# e.g. A[0][0] = cos50 cos40 cos30 - sin50 sin30 = 0.42643 - 0.38302 = 0.04341.
HAND_MATRICES = {
    (30.0, 40.0, 50.0): [
        [0.0434120444, 0.9096158864, -0.4131759112],
        [-0.8295983733, 0.2632583548, 0.4924038765],
        [0.5566703992, 0.3213938048, 0.7660444431],
    ],
    (-60.0, 120.0, 10.0): [
        [-0.0958182051, 0.5132583548, -0.8528685320],
        [0.8962805764, 0.4172120099, 0.1503837332],
        [0.4330127019, -0.7500000000, -0.5000000000],
    ],
    # simple cases: tilt 90 maps volume z onto image x (negated); rot 90 about z
    (0.0, 90.0, 0.0): [[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
    (90.0, 0.0, 0.0): [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
}


@pytest.mark.parametrize("angles", list(HAND_MATRICES))
def test_euler_matrix_matches_hand_computed_values(angles):
    expected = torch.tensor(HAND_MATRICES[angles], dtype=torch.float64)
    matrix = euler_angles_to_matrix(torch.tensor(angles, dtype=torch.float64))
    torch.testing.assert_close(matrix, expected, atol=1e-9, rtol=0)


def test_euler_matrix_is_transpose_of_active_zyz_product():
    angles = torch.tensor(
        [[12.0, 70.0, -100.0], [-170.0, 5.0, 33.0]], dtype=torch.float64
    )

    def rz(deg):
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)

    def ry(deg):
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)

    for row, matrix in zip(
        angles.tolist(), euler_angles_to_matrix(angles), strict=True
    ):
        rot, tilt, psi = row
        torch.testing.assert_close(matrix, (rz(rot) @ ry(tilt) @ rz(psi)).T)


def test_euler_matrices_are_rotations_and_view_direction():
    angles = random_rotations(50, torch.Generator().manual_seed(3), dtype=torch.float64)
    matrices = euler_angles_to_matrix(angles)
    identity = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(matrices @ matrices.mT, identity)
    torch.testing.assert_close(
        torch.linalg.det(matrices), torch.ones(50, dtype=torch.float64)
    )
    rot, tilt = torch.deg2rad(angles[:, 0]), torch.deg2rad(angles[:, 1])
    direction = torch.stack(
        [
            torch.sin(tilt) * torch.cos(rot),
            torch.sin(tilt) * torch.sin(rot),
            torch.cos(tilt),
        ],
        -1,
    )
    torch.testing.assert_close(matrices.mT[..., 2], direction)  # A^T e_z


def test_euler_round_trip_regular_angles():
    generator = torch.Generator().manual_seed(0)
    angles = random_rotations(200, generator, dtype=torch.float64)
    recovered = matrix_to_euler_angles(euler_angles_to_matrix(angles))
    torch.testing.assert_close(recovered, angles, atol=1e-7, rtol=0)
    assert recovered[:, 1].min() >= 0
    assert recovered[:, 1].max() <= 180


@pytest.mark.parametrize(
    ("angles", "canonical"),
    [
        ((30.0, 0.0, 50.0), (0.0, 0.0, 80.0)),
        ((30.0, 180.0, 50.0), (0.0, 180.0, 20.0)),
        ((10.0, -40.0, 20.0), (-170.0, 40.0, -160.0)),  # negative tilt
    ],
)
def test_euler_degenerate_and_canonical_forms(angles, canonical):
    matrix = euler_angles_to_matrix(torch.tensor(angles, dtype=torch.float64))
    recovered = matrix_to_euler_angles(matrix)
    torch.testing.assert_close(recovered, torch.tensor(canonical, dtype=torch.float64))
    torch.testing.assert_close(euler_angles_to_matrix(recovered), matrix)


def test_rotation_matrix_2d_turns_x_towards_y_and_relates_to_psi():
    matrix = rotation_matrix_2d(torch.tensor(90.0, dtype=torch.float64))
    torch.testing.assert_close(
        matrix @ torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
    )
    psi = torch.tensor([25.0, -130.0], dtype=torch.float64)
    angles = torch.stack([torch.zeros(2), torch.zeros(2), psi], -1).double()
    torch.testing.assert_close(
        euler_angles_to_matrix(angles)[:, :2, :2], rotation_matrix_2d(-psi)
    )


def test_xyz_to_zyx_matrices_acts_on_reversed_vectors():
    matrix = euler_angles_to_matrix(
        torch.tensor([30.0, 40.0, 50.0], dtype=torch.float64)
    )
    vector_xyz = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    zyx = xyz_to_zyx_matrices(matrix)
    torch.testing.assert_close(zyx @ vector_xyz.flip(0), (matrix @ vector_xyz).flip(0))
    torch.testing.assert_close(xyz_to_zyx_matrices(zyx), matrix)
    with pytest.raises(ValueError, match="n, n"):
        xyz_to_zyx_matrices(torch.zeros(3, 2))


def test_random_rotations_are_uniform_and_reproducible():
    first = random_rotations(
        20000, torch.Generator().manual_seed(5), dtype=torch.float64
    )
    second = random_rotations(
        20000, torch.Generator().manual_seed(5), dtype=torch.float64
    )
    torch.testing.assert_close(first, second)
    matrices = euler_angles_to_matrix(first)
    # Haar measure: E[R] = 0 and E[R_ij^2] = 1/3 for every element
    assert matrices.mean(0).abs().max() < 0.03
    assert (matrices**2).mean(0).sub(1 / 3).abs().max() < 0.02
    assert first[:, 1].min() >= 0
    assert first[:, 1].max() <= 180


def test_rotation_angle_degrees_known_angles_and_gradients():
    axis = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    angles = torch.tensor([0.0, 37.0, 120.0, 179.99], dtype=torch.float64)
    matrices = axis_angle_to_matrix(torch.deg2rad(angles)[:, None] * axis)
    torch.testing.assert_close(
        rotation_angle_degrees(matrices), angles, atol=1e-6, rtol=0
    )
    # relative angle between two Euler orientations
    first = euler_angles_to_matrix(
        torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    )
    rz = axis_angle_to_matrix(
        torch.tensor([0.0, 0.0, math.radians(15)], dtype=torch.float64)
    )
    torch.testing.assert_close(
        rotation_angle_degrees(first.mT @ (rz @ first)), torch.tensor(15.0).double()
    )
    identity = torch.eye(3, dtype=torch.float64, requires_grad=True)
    rotation_angle_degrees(identity).backward()
    assert torch.isfinite(identity.grad).all()


def test_axis_angle_round_trip_and_known_matrix():
    quarter_turn_z = torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64)
    expected = torch.tensor(
        [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    ).double()
    torch.testing.assert_close(axis_angle_to_matrix(quarter_turn_z), expected)
    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(
        torch.randn(100, 3, generator=generator, dtype=torch.float64), dim=-1
    )
    magnitudes = torch.rand(100, 1, generator=generator, dtype=torch.float64) * math.pi
    vectors = directions * magnitudes
    vectors[0] = 0.0
    vectors[1] = 1e-5 * directions[1]
    recovered = matrix_to_axis_angle(axis_angle_to_matrix(vectors))
    torch.testing.assert_close(recovered, vectors, atol=1e-8, rtol=0)


def test_matrix_to_axis_angle_half_turn_and_identity_gradients():
    half_turn = axis_angle_to_matrix(
        torch.tensor([math.pi, 0.0, 0.0], dtype=torch.float64)
    )
    vector = matrix_to_axis_angle(half_turn)
    torch.testing.assert_close(vector.abs(), torch.tensor([math.pi, 0.0, 0.0]).double())
    for matrix in (torch.eye(3, dtype=torch.float64), half_turn):
        leaf = matrix.clone().requires_grad_(True)
        matrix_to_axis_angle(leaf).sum().backward()
        assert torch.isfinite(leaf.grad).all()
    omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    axis_angle_to_matrix(omega).sum().backward()
    assert torch.isfinite(omega.grad).all()


def test_axis_angle_gradcheck():
    omega = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (omega,))
    tiny = torch.tensor([1e-5, 2e-5, -1e-5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (tiny,))


def test_quaternion_round_trip_all_branches():
    generator = torch.Generator().manual_seed(2)
    angles = random_rotations(500, generator, dtype=torch.float64)
    matrices = euler_angles_to_matrix(angles)
    quaternions = matrix_to_quaternion(matrices)
    assert (quaternions[:, 0] >= 0).all()
    torch.testing.assert_close(quaternion_to_matrix(quaternions), matrices)
    # half turns about each axis exercise the x, y and z branches (w = 0)
    for axis in torch.eye(3, dtype=torch.float64):
        matrix = axis_angle_to_matrix(math.pi * axis)
        torch.testing.assert_close(
            quaternion_to_matrix(matrix_to_quaternion(matrix)), matrix
        )


def test_rotation_6d_round_trip_and_gram_schmidt():
    matrices = euler_angles_to_matrix(
        random_rotations(20, torch.Generator().manual_seed(4), dtype=torch.float64)
    )
    torch.testing.assert_close(
        rotation_6d_to_matrix(matrix_to_rotation_6d(matrices)), matrices
    )
    raw = torch.tensor([2.0, 0.0, 0.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(
        rotation_6d_to_matrix(raw), torch.eye(3, dtype=torch.float64)
    )
    raw = raw.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(rotation_6d_to_matrix, (raw,))


def test_invalid_shapes_raise_value_error():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        euler_angles_to_matrix(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        matrix_to_euler_angles(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="n must be"):
        random_rotations(-1)
