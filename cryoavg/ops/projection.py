"""Projection of volumes and back-projection of images in RELION's convention.

Conventions owned by this module
--------------------------------
* Volumes are cubic ``(d, d, d)`` indexed ``[z, y, x]``; images ``(..., d, d)`` indexed
  ``[y, x]``; origins at index ``d // 2``.
* Orientations are RELION Euler angles ``(rot, tilt, psi)`` in degrees with matrix
  ``A = euler_angles_to_matrix(angles)`` (xyz, spec §0.2). The projection is
  ``P_A(x, y) = sum_z V(A^T (x, y, z))`` (line sums over voxels), i.e. the central slice
  ``P(k) = V(A^T k)``; a point of the volume at xyz ``p`` lands at image
  ``(x, y) = (A p)[:2]``.
* The work is done by ``torch_fourier_slice`` (Fourier slice theorem, trilinear
  interpolation on a ``pad_factor``-times padded grid with ``sinc^2`` gridding
  correction). Its matrices rotate the slice's xyz frequency coordinates into the volume
  frame (it samples ``V(M k)``), so it is given ``M = A^T`` (verified by the off-centre
  blob test). It computes in float32; results are cast back to the input dtype.
* Fourier-domain helpers use the default layout of :mod:`cryoavg.ops.fourier` (rfft,
  origin-centred, not fftshifted). With RELION normalisation, the 2D transform of a
  projection is ``N`` times the central slice of the volume's 3D transform:
  ``dft_2d(P_A) = N * V_hat(A^T k)``.
"""

import torch
import torch_fourier_slice

from cryoavg.ops.fourier import dft_2d
from cryoavg.ops.rotations import euler_angles_to_matrix

__all__ = [
    "backproject_2d_to_3d",
    "extract_central_slices_rfft_3d",
    "insert_central_slices_rfft_3d",
    "project_volume_2d",
    "project_volume_rfft_2d",
]

_WORK_DTYPE = torch.float32


def _check_volume(volume: torch.Tensor) -> int:
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(
            "volume must be a single cubic (d, d, d) tensor, got shape "
            f"{tuple(volume.shape)}"
        )
    return volume.shape[-1]


def _slice_matrices(
    euler_angles_degrees: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """RELION angles (..., 3) -> torch_fourier_slice matrices A^T (..., 3, 3)."""
    angles = torch.as_tensor(euler_angles_degrees, device=device)
    if angles.ndim < 1 or angles.shape[-1] != 3:
        raise ValueError(
            f"euler_angles_degrees must be (..., 3), got {tuple(angles.shape)}"
        )
    matrices = euler_angles_to_matrix(angles.to(torch.float64))
    return matrices.mT.to(_WORK_DTYPE)


def _check_pad(pad_factor: float) -> None:
    if pad_factor < 1:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")


def project_volume_2d(
    volume: torch.Tensor, euler_angles_degrees: torch.Tensor, *, pad_factor: float = 2.0
) -> torch.Tensor:
    """Project a volume along RELION orientations (Fourier slice theorem).

    Parameters
    ----------
    volume
        ``(d, d, d)`` real volume indexed ``[z, y, x]``.
    euler_angles_degrees
        ``(..., 3)`` RELION ``(rot, tilt, psi)`` in degrees.
    pad_factor
        Oversampling of the volume's transform (2 is RELION's default).

    Returns
    -------
    torch.Tensor
        ``(..., d, d)`` projections ``P_A(x, y) = sum_z V(A^T (x, y, z))``, dtype of
        ``volume``.

    Notes
    -----
    ``torch_fourier_slice`` divides the volume by the ``sinc^2`` of trilinear
    interpolation before transforming it. For orientations whose slice falls on grid
    points (e.g. the identity) no interpolation blur occurs, so values away from the
    centre come out up to ~10% high; for general orientations the correction is
    accurate.
    """
    _check_volume(volume)
    _check_pad(pad_factor)
    matrices = _slice_matrices(euler_angles_degrees, volume.device)
    projections = torch_fourier_slice.project_3d_to_2d(
        volume.to(_WORK_DTYPE), rotation_matrices=matrices, pad_factor=pad_factor
    )
    return projections.to(volume.dtype)


def project_volume_rfft_2d(
    volume: torch.Tensor, euler_angles_degrees: torch.Tensor, *, pad_factor: float = 2.0
) -> torch.Tensor:
    """Transforms of the projections of :func:`project_volume_2d` (``dft_2d`` layout).

    Parameters
    ----------
    volume
        ``(d, d, d)`` real volume.
    euler_angles_degrees
        ``(..., 3)`` RELION angles in degrees.
    pad_factor
        Oversampling of the volume's transform.

    Returns
    -------
    torch.Tensor
        ``(..., d, d // 2 + 1)`` complex rffts (RELION normalisation, origin-centred).
    """
    return dft_2d(
        project_volume_2d(volume, euler_angles_degrees, pad_factor=pad_factor)
    )


def backproject_2d_to_3d(
    images: torch.Tensor, euler_angles_degrees: torch.Tensor, *, pad_factor: float = 2.0
) -> torch.Tensor:
    """Direct Fourier reconstruction of a volume from projections.

    Central slices are inserted with trilinear weights, divided by the accumulated
    weights (clamped at 1) and gridding-corrected; this is the inverse of
    :func:`project_volume_2d` given enough views.

    Parameters
    ----------
    images
        ``(..., d, d)`` real projections in the convention of :func:`project_volume_2d`.
    euler_angles_degrees
        ``(..., 3)`` RELION angles of the images.
    pad_factor
        Oversampling of the reconstruction grid.

    Returns
    -------
    torch.Tensor
        ``(d, d, d)`` reconstruction, dtype of ``images``.
    """
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"images must be square (..., d, d), got shape {tuple(images.shape)}"
        )
    _check_pad(pad_factor)
    matrices = _slice_matrices(euler_angles_degrees, images.device)
    if tuple(matrices.shape[:-2]) != tuple(images.shape[:-2]):
        raise ValueError(
            f"euler_angles_degrees batch {tuple(matrices.shape[:-2])} must match "
            f"images batch {tuple(images.shape[:-2])}"
        )
    volume = torch_fourier_slice.backproject_2d_to_3d(
        images.to(_WORK_DTYPE), rotation_matrices=matrices, pad_factor=pad_factor
    )
    return volume.to(images.dtype)


def insert_central_slices_rfft_3d(
    slices_rfft: torch.Tensor,
    euler_angles_degrees: torch.Tensor,
    volume_size: int,
    *,
    fftshifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate 2D rffts as central slices of a 3D rfft (trilinear, no padding).

    Slice frequency ``k = (kx, ky, 0)`` is inserted at volume frequency ``A^T k``, the
    adjoint of :func:`extract_central_slices_rfft_3d`. Values are accumulated as given
    (see the module docstring for the factor ``N`` between 2D and 3D RELION-normalised
    transforms).

    Parameters
    ----------
    slices_rfft
        ``(..., d, d // 2 + 1)`` complex 2D rffts.
    euler_angles_degrees
        ``(..., 3)`` RELION angles of the slices.
    volume_size
        Edge ``d`` of the cubic volume.
    fftshifted
        Layout of both the input slices and the outputs: True for fftshifted full axes.

    Returns
    -------
    volume_rfft : torch.Tensor
        ``(d, d, d // 2 + 1)`` complex accumulated data.
    weights : torch.Tensor
        ``(d, d, d // 2 + 1)`` real accumulated interpolation weights.
    """
    expected = (volume_size, volume_size // 2 + 1)
    if (
        slices_rfft.ndim < 2
        or tuple(slices_rfft.shape[-2:]) != expected
        or not slices_rfft.dtype.is_complex
    ):
        raise ValueError(
            f"slices_rfft must be complex (..., {expected[0]}, {expected[1]}), got "
            f"{tuple(slices_rfft.shape)}"
        )
    matrices = _slice_matrices(euler_angles_degrees, slices_rfft.device)
    data = slices_rfft.to(torch.complex64)
    if not fftshifted:
        data = torch.fft.fftshift(data, dim=(-2,))
    volume_rfft, weights = torch_fourier_slice.insert_central_slices_rfft_3d(
        image_rfft=data, volume_shape=(volume_size,) * 3, rotation_matrices=matrices
    )
    if not fftshifted:
        volume_rfft = torch.fft.ifftshift(volume_rfft, dim=(-3, -2))
        weights = torch.fft.ifftshift(weights, dim=(-3, -2))
    return volume_rfft.to(slices_rfft.dtype), weights.to(slices_rfft.real.dtype)


def extract_central_slices_rfft_3d(
    volume_rfft: torch.Tensor,
    euler_angles_degrees: torch.Tensor,
    *,
    fftshifted: bool = False,
) -> torch.Tensor:
    """Sample central slices ``V(A^T k)`` of a 3D rfft (trilinear, no padding).

    Parameters
    ----------
    volume_rfft
        ``(d, d, d // 2 + 1)`` complex 3D rfft.
    euler_angles_degrees
        ``(..., 3)`` RELION angles.
    fftshifted
        Layout of the input volume and the output slices.

    Returns
    -------
    torch.Tensor
        ``(..., d, d // 2 + 1)`` complex 2D rffts.
    """
    if volume_rfft.ndim != 3 or not volume_rfft.dtype.is_complex:
        raise ValueError(
            "volume_rfft must be a complex (d, d, d//2+1) tensor, got "
            f"{tuple(volume_rfft.shape)}"
        )
    size = volume_rfft.shape[0]
    if tuple(volume_rfft.shape) != (size, size, size // 2 + 1):
        raise ValueError(
            f"volume_rfft must be (d, d, d//2+1), got {tuple(volume_rfft.shape)}"
        )
    matrices = _slice_matrices(euler_angles_degrees, volume_rfft.device)
    data = volume_rfft.to(torch.complex64)
    if not fftshifted:
        data = torch.fft.fftshift(data, dim=(-3, -2))
    slices = torch_fourier_slice.extract_central_slices_rfft_3d(
        volume_rfft=data, rotation_matrices=matrices
    )
    if not fftshifted:
        slices = torch.fft.ifftshift(slices, dim=(-2,))
    return slices.to(volume_rfft.dtype)
