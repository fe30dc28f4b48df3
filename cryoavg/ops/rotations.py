"""Rotation matrices, RELION Euler angles and gradient-safe rotation parametrisations.

Conventions owned by this module
--------------------------------
* Matrices left-multiply **column vectors in xyz order** (``x`` = column index, ``y`` =
  row index, ``z`` = section index): ``p' = M @ p``. For a volume indexed ``[z, y, x]``
  use :func:`xyz_to_zyx_matrices` to get the matrix acting on ``(z, y, x)`` columns (it
  reverses rows and columns). To rotate row vectors ``P`` of shape ``(n, 3)`` write
  ``P @ M.mT``.
* RELION Euler angles are ZYZ ``(rot, tilt, psi)`` in degrees (``euler.cpp``, spec
  §0.2). :func:`euler_angles_to_matrix` returns RELION's
  ``A = (Rz(rot) Ry(tilt) Rz(psi))^T``, the matrix that maps volume (reference)
  coordinates onto image (projection) coordinates; a projection is
  ``P_A(x, y) = sum_z V(A^T (x, y, z))`` and the viewing direction in the volume frame
  is ``A^T e_z``::

      A = [[ cg cb ca - sg sa,   cg cb sa + sg ca,  -cg sb],
           [-sg cb ca - cg sa,  -sg cb sa + cg ca,   sg sb],
           [ sb ca,              sb sa,              cb   ]]

  with ``a = rot, b = tilt, g = psi``.
* In-plane: :func:`rotation_matrix_2d` is the active
  ``Rz(theta) = [[cos, -sin], [sin, cos]]`` on ``(x, y)``; it turns +x towards +y. For
  rot = tilt = 0, ``A`` restricted to xy is ``Rz(-psi)``.
* Axis-angle vectors are ``angle_radians * unit_axis`` (xyz, right-handed, active).
  Quaternions are ``(w, x, y, z)`` with ``w >= 0``. The 6D representation is the first
  two **rows** of the matrix (Zhou et al. 2019, "On the continuity of rotation
  representations in neural networks", CVPR), mapped back by Gram-Schmidt.
* The conversions avoid NaN gradients at the identity (Taylor expansions and the
  "safe square root" idea of pytorch3d's ``rotation_conversions.py``; re-derived here,
  no pytorch3d dependency).
"""

import torch

from cryoavg.ops._grids import floating_dtype

__all__ = [
    "axis_angle_to_matrix",
    "euler_angles_to_matrix",
    "matrix_to_axis_angle",
    "matrix_to_euler_angles",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "quaternion_to_matrix",
    "random_rotations",
    "rotation_6d_to_matrix",
    "rotation_angle_degrees",
    "rotation_matrix_2d",
    "xyz_to_zyx_matrices",
]

# RELION's |sin(tilt)| threshold below which a rotation is a pure z rotation
_DEGENERATE_SIN_TILT = 16 * torch.finfo(torch.float32).eps


def _check_last(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(tensor.shape[tensor.ndim - len(shape) :]) != shape or tensor.ndim < len(
        shape
    ):
        raise ValueError(
            f"{name} must have shape (..., {', '.join(map(str, shape))}), got "
            f"{tuple(tensor.shape)}"
        )


def _as_float(tensor: torch.Tensor | float) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    if not tensor.dtype.is_floating_point:
        tensor = tensor.to(floating_dtype())
    return tensor


def _safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """sqrt(max(value, 0)) with a zero (not NaN/inf) gradient where value <= 0."""
    positive = value > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, value, torch.ones_like(value))), 0.0
    )


def euler_angles_to_matrix(angles_degrees: torch.Tensor) -> torch.Tensor:
    """RELION ``Euler_angles2matrix``: ZYZ ``(rot, tilt, psi)`` to the matrix ``A``.

    Parameters
    ----------
    angles_degrees
        ``(..., 3)`` ``(rot, tilt, psi)`` in degrees.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` matrices ``A = (Rz(rot) Ry(tilt) Rz(psi))^T`` acting on xyz
        columns.
    """
    angles = _as_float(angles_degrees)
    _check_last(angles, (3,), "angles_degrees")
    rot, tilt, psi = torch.deg2rad(angles).unbind(-1)
    ca, sa = torch.cos(rot), torch.sin(rot)
    cb, sb = torch.cos(tilt), torch.sin(tilt)
    cg, sg = torch.cos(psi), torch.sin(psi)
    row0 = torch.stack(
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb], dim=-1
    )
    row1 = torch.stack(
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb], dim=-1
    )
    row2 = torch.stack([sb * ca, sb * sa, cb], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def matrix_to_euler_angles(matrices: torch.Tensor) -> torch.Tensor:
    """RELION ``Euler_matrix2angles``: inverse of :func:`euler_angles_to_matrix`.

    Parameters
    ----------
    matrices
        ``(..., 3, 3)`` rotation matrices ``A`` (xyz).

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` ``(rot, tilt, psi)`` in degrees, ``tilt`` in [0, 180], ``rot`` and
        ``psi`` in [-180, 180]. When ``|sin(tilt)| <= 16 * float32 eps`` the rotation is
        put entirely into ``psi`` and ``rot = 0`` (``tilt`` 0 or 180), as RELION does.
    """
    m = _as_float(matrices)
    _check_last(m, (3, 3), "matrices")
    sin_tilt = _safe_sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    regular = sin_tilt > _DEGENERATE_SIN_TILT
    rot_regular = torch.atan2(m[..., 2, 1], m[..., 2, 0])
    psi_regular = torch.atan2(m[..., 1, 2], -m[..., 0, 2])
    tilt_regular = torch.atan2(sin_tilt, m[..., 2, 2])
    upright = m[..., 2, 2] > 0
    psi_degenerate = torch.where(
        upright,
        torch.atan2(-m[..., 1, 0], m[..., 0, 0]),
        torch.atan2(m[..., 1, 0], -m[..., 0, 0]),
    )
    tilt_degenerate = torch.where(upright, 0.0, torch.pi).to(m.dtype)
    rot = torch.where(regular, rot_regular, torch.zeros_like(rot_regular))
    tilt = torch.where(regular, tilt_regular, tilt_degenerate)
    psi = torch.where(regular, psi_regular, psi_degenerate)
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def rotation_matrix_2d(angles_degrees: torch.Tensor | float) -> torch.Tensor:
    """Active in-plane rotation ``Rz(theta)`` acting on ``(x, y)`` columns.

    Parameters
    ----------
    angles_degrees
        ``(...)`` angles in degrees.

    Returns
    -------
    torch.Tensor
        ``(..., 2, 2)`` matrices ``[[cos, -sin], [sin, cos]]``.
    """
    theta = torch.deg2rad(_as_float(angles_degrees))
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def xyz_to_zyx_matrices(matrices: torch.Tensor) -> torch.Tensor:
    """Re-express matrices acting on xyz (or xy) columns for zyx (or yx) columns.

    The operation reverses the order of rows and columns, so it is its own inverse.

    Parameters
    ----------
    matrices
        ``(..., n, n)`` matrices.

    Returns
    -------
    torch.Tensor
        ``(..., n, n)`` matrices in the reversed axis order.
    """
    if matrices.ndim < 2 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"matrices must be (..., n, n), got {tuple(matrices.shape)}")
    return torch.flip(matrices, dims=(-2, -1))


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly distributed rotations (Haar measure on SO(3)) as RELION Euler angles.

    ``rot`` and ``psi`` are uniform in [-180, 180) and ``cos(tilt)`` is uniform in [-1,
    1].

    Parameters
    ----------
    n
        Number of rotations.
    generator
        Optional random generator (on ``device``) for reproducibility.
    dtype, device
        Placement of the result.

    Returns
    -------
    torch.Tensor
        ``(n, 3)`` ``(rot, tilt, psi)`` in degrees.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    dtype = dtype or torch.get_default_dtype()
    uniform = torch.rand((n, 3), generator=generator, dtype=dtype, device=device)
    rot = 360.0 * uniform[:, 0] - 180.0
    tilt = torch.rad2deg(torch.acos((2.0 * uniform[:, 1] - 1.0).clamp(-1.0, 1.0)))
    psi = 360.0 * uniform[:, 2] - 180.0
    return torch.stack([rot, tilt, psi], dim=-1)


def rotation_angle_degrees(matrices: torch.Tensor) -> torch.Tensor:
    """Rotation angle of 3D rotation matrices, in [0, 180] degrees.

    Uses ``atan2(|vee(M - M^T)|, trace(M) - 1)``, accurate near 0 and 180 degrees. For
    the angle between two rotations ``M1`` and ``M2`` pass ``M1.mT @ M2``.

    Parameters
    ----------
    matrices
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``(...)`` angles in degrees.
    """
    m = _as_float(matrices)
    _check_last(m, (3, 3), "matrices")
    vee = torch.stack(
        [
            m[..., 2, 1] - m[..., 1, 2],
            m[..., 0, 2] - m[..., 2, 0],
            m[..., 1, 0] - m[..., 0, 1],
        ],
        dim=-1,
    )
    two_sin = _safe_sqrt((vee**2).sum(-1))
    two_cos = m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0
    return torch.rad2deg(torch.atan2(two_sin, two_cos))


def _skew(vectors: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices [v]x."""
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        -2,
    )


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, smooth at the identity.

    Parameters
    ----------
    axis_angle
        ``(..., 3)`` rotation vectors: angle in radians times the unit axis (xyz).

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` rotation matrices (active, right-handed, acting on xyz columns).
    """
    omega = _as_float(axis_angle)
    _check_last(omega, (3,), "axis_angle")
    theta_sq = (omega**2).sum(-1)
    small = theta_sq < 1e-6
    safe_sq = torch.where(small, torch.ones_like(theta_sq), theta_sq)
    theta = torch.sqrt(safe_sq)
    # sin(t)/t and (1 - cos(t))/t^2 with their Taylor series near t = 0
    coef_1 = torch.where(small, 1.0 - theta_sq / 6.0, torch.sin(theta) / theta)
    coef_2 = torch.where(
        small, 0.5 - theta_sq / 24.0, (1.0 - torch.cos(theta)) / safe_sq
    )
    skew = _skew(omega)
    identity = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return (
        identity
        + coef_1[..., None, None] * skew
        + coef_2[..., None, None] * (skew @ skew)
    )


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(w, x, y, z)`` to rotation matrices (normalised first).

    Parameters
    ----------
    quaternions
        ``(..., 4)`` quaternions, real part first.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` rotation matrices acting on xyz columns.
    """
    q = _as_float(quaternions)
    _check_last(q, (4,), "quaternions")
    w, x, y, z = (q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            torch.stack(
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1
            ),
            torch.stack(
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1
            ),
            torch.stack(
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1
            ),
        ],
        -2,
    )


def matrix_to_quaternion(matrices: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to unit quaternions ``(w, x, y, z)`` with ``w >= 0``.

    Each of the four standard formulas divides by a different component; the one with
    the largest component (>= 1/2) is used, so no division is ill-conditioned.

    Parameters
    ----------
    matrices
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``(..., 4)`` quaternions.
    """
    m = _as_float(matrices)
    _check_last(m, (3, 3), "matrices")
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # 4 * (w^2, x^2, y^2, z^2)
    four_sq = torch.stack(
        [
            1 + m00 + m11 + m22,
            1 + m00 - m11 - m22,
            1 - m00 + m11 - m22,
            1 - m00 - m11 + m22,
        ],
        -1,
    )
    two_q = _safe_sqrt(four_sq)  # 2 * |component|
    # candidate k: quaternion * (4 q_k), one row per choice of the dividing component
    candidates = torch.stack(
        [
            torch.stack([two_q[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, two_q[..., 1] ** 2, m01 + m10, m02 + m20], -1),
            torch.stack([m02 - m20, m01 + m10, two_q[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m02 + m20, m12 + m21, two_q[..., 3] ** 2], -1),
        ],
        -2,
    )  # (..., 4, 4)
    denominators = 2.0 * two_q.clamp(
        min=0.1
    )  # 4 q_k; only the best (q_k >= 1/2) is used
    candidates = candidates / denominators[..., :, None]
    best = four_sq.argmax(dim=-1)
    index = best[..., None, None].expand(*best.shape, 1, 4)
    quaternion = candidates.gather(-2, index).squeeze(-2)
    quaternion = torch.where(quaternion[..., :1] < 0, -quaternion, quaternion)
    return quaternion / torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True)


def matrix_to_axis_angle(matrices: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to rotation vectors (angle in radians times unit axis).

    Parameters
    ----------
    matrices
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` rotation vectors with angle in [0, pi].
    """
    quaternion = matrix_to_quaternion(matrices)
    w, vector = quaternion[..., 0], quaternion[..., 1:]
    sin_half_sq = (vector**2).sum(-1)
    small = sin_half_sq < 1e-8
    sin_half = torch.sqrt(torch.where(small, torch.ones_like(sin_half_sq), sin_half_sq))
    # angle / sin(angle/2) = 2 atan2(s, w) / s -> 2 / w (1 - s^2/(3 w^2)) for small s;
    # w is replaced where unused so no inf/NaN leaks into gradients (w = 0 at 180 deg)
    w_small = torch.where(small, w, torch.ones_like(w))
    factor = torch.where(
        small,
        2.0 / w_small * (1.0 - sin_half_sq / (3.0 * w_small**2)),
        2.0 * torch.atan2(sin_half, w) / sin_half,
    )
    return vector * factor[..., None]


def rotation_6d_to_matrix(rotation_6d: torch.Tensor) -> torch.Tensor:
    """Continuous 6D representation to rotation matrices by Gram-Schmidt (Zhou et al.
    2019).

    Parameters
    ----------
    rotation_6d
        ``(..., 6)``: two 3-vectors ``a1, a2`` (not necessarily orthonormal).

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` rotation matrices with rows ``b1 = a1/|a1|``, ``b2`` =
        normalised component of ``a2`` orthogonal to ``b1``, ``b3 = b1 x b2``.
    """
    d6 = _as_float(rotation_6d)
    _check_last(d6, (6,), "rotation_6d")
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(
        a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1
    )
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def matrix_to_rotation_6d(matrices: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to the 6D representation (their first two rows).

    Parameters
    ----------
    matrices
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``(..., 6)``.
    """
    _check_last(matrices, (3, 3), "matrices")
    return matrices[..., :2, :].reshape(*matrices.shape[:-2], 6)
