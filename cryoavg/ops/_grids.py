"""Private grid helpers shared by the ops modules.

Conventions: array (``zyx`` / ``yx``) order; the real-space origin of an axis of length
``n`` is index ``n // 2``.
"""

from collections.abc import Sequence

import torch


def validate_shape(
    shape: Sequence[int], ndim: int, name: str = "image_shape"
) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of ``ndim`` positive ints or raise ``ValueError``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim or any(n < 1 for n in shape):
        raise ValueError(f"{name} must be {ndim} positive sizes, got {shape}")
    return shape


def validate_cubic(shape: Sequence[int], name: str = "image_shape") -> int:
    """Return the common edge length of a square/cubic shape or raise ``ValueError``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or len(set(shape)) != 1:
        raise ValueError(f"{name} must be square (2D) or cubic (3D), got {shape}")
    return shape[0]


def centred_coordinate_grid(
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pixel coordinates relative to the origin ``n // 2`` of each axis.

    Parameters
    ----------
    shape
        ``(h, w)`` or ``(d, h, w)``.
    device, dtype
        Placement of the result (default float dtype when ``dtype`` is None).

    Returns
    -------
    torch.Tensor
        ``(*shape, ndim)`` coordinates in array order (``yx`` or ``zyx``), pixels.
    """
    dtype = dtype or torch.get_default_dtype()
    axes = [torch.arange(n, device=device, dtype=dtype) - (n // 2) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def centred_radius_grid(
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Distance in pixels of every pixel from the origin ``n // 2``."""
    coordinates = centred_coordinate_grid(shape, device=device, dtype=dtype)
    return torch.linalg.vector_norm(coordinates, dim=-1)


def floating_dtype(*tensors: object) -> torch.dtype:
    """The promoted floating dtype of the given tensors (default dtype if none).

    Complex tensors contribute their real counterpart (complex128 -> float64).
    """
    dtype: torch.dtype | None = None
    for value in tensors:
        if isinstance(value, torch.Tensor):
            candidate = value.dtype
            if candidate.is_complex:
                candidate = candidate.to_real()
            if not candidate.is_floating_point:
                continue
            dtype = (
                candidate if dtype is None else torch.promote_types(dtype, candidate)
            )
    return dtype or torch.get_default_dtype()


def first_device(*tensors: object) -> torch.device:
    """Device of the first tensor among ``tensors`` (CPU when there is none)."""
    for value in tensors:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
