"""Translations: Fourier phase shifts, integer shifts and translation search grids.

Conventions owned by this module
--------------------------------
* Shifts are in pixels in array order: ``(..., 2)`` = ``(dy, dx)`` for images and
  ``(..., 3)`` = ``(dz, dy, dx)`` for volumes (y = row, x = column, z = section).
* Shifting by ``+s`` moves the content by ``+s`` (content at ``p`` ends up at
  ``p + s``): the DFT is multiplied by ``exp(-2 pi i k . s / N)`` (spec §0.3). Fourier
  shifts are periodic (content leaving one edge re-enters at the other);
  :func:`integer_shift_2d` fills with zeros.
* Phase shifts commute with the choice of real-space origin, so they apply unchanged to
  the transforms of :mod:`cryoavg.ops.fourier` (any ``rfft`` / ``fftshifted`` layout).
* ``torch_fourier_shift`` (0.6) uses the same sign and ``yx`` order (verified in the
  tests, where it serves as an oracle), but it builds its phases from a float32
  frequency grid (``2 pi k`` is rounded to float32 before the shift is applied), which
  limits float64 inputs to ~1e-6 accuracy. The phase ramp is therefore computed here in
  the input's precision, on the grid of :func:`cryoavg.ops.fourier.fftfreq_grid`.
* For even sizes and fractional shifts the Nyquist terms of a real image cannot carry
  the complex phase; :func:`shift_images_2d` returns the real part, as an inverse rfft
  does.
"""

from collections.abc import Sequence
from math import ceil

import torch

from cryoavg.ops._grids import validate_shape
from cryoavg.ops.fourier import fftfreq_grid

__all__ = [
    "integer_shift_2d",
    "phase_shift_dft_2d",
    "phase_shift_dft_3d",
    "shift_images_2d",
    "shift_volumes_3d",
    "translation_grid_2d",
]


def _prepare_shifts(
    shifts_px: torch.Tensor, ndim: int, like: torch.Tensor
) -> torch.Tensor:
    shifts = torch.as_tensor(shifts_px, device=like.device)
    if shifts.ndim < 1 or shifts.shape[-1] != ndim:
        raise ValueError(
            f"shifts_px must have shape (..., {ndim}), got {tuple(shifts.shape)}"
        )
    real_dtype = like.dtype.to_real() if like.dtype.is_complex else like.dtype
    if not real_dtype.is_floating_point:
        real_dtype = torch.get_default_dtype()
    return shifts.to(real_dtype)


def _phase_ramp(
    shifts: torch.Tensor, shape: tuple[int, ...], rfft: bool, fftshift: bool
) -> torch.Tensor:
    """``exp(-2 pi i k . s)`` on a Fourier grid: shifts (..., ndim) -> (..., *grid)."""
    grid = fftfreq_grid(
        shape, rfft=rfft, fftshift=fftshift, device=shifts.device, dtype=shifts.dtype
    )  # (*grid, ndim) cycles/pixel
    ndim = len(shape)
    shifts = shifts.reshape(*shifts.shape[:-1], *([1] * ndim), ndim)
    angles = -2.0 * torch.pi * (grid * shifts).sum(-1)
    return torch.polar(torch.ones_like(angles), angles)


def _shift_real(data: torch.Tensor, shifts: torch.Tensor, ndim: int) -> torch.Tensor:
    shape = tuple(data.shape[-ndim:])
    dims = tuple(range(-ndim, 0))
    dft = torch.fft.rfftn(data, dim=dims)
    dft = dft * _phase_ramp(shifts, shape, rfft=True, fftshift=False)
    return torch.fft.irfftn(dft, s=shape, dim=dims)


def shift_images_2d(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate images by (sub-pixel) shifts using Fourier phase shifts (periodic).

    Parameters
    ----------
    images
        ``(..., h, w)`` real images.
    shifts_px
        ``(..., 2)`` ``(dy, dx)`` shifts in pixels, broadcastable against the leading
        dimensions of ``images``. Content moves by ``+shift``.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)`` shifted images (broadcast leading shape).
    """
    if images.ndim < 2:
        raise ValueError(f"images must be (..., h, w), got shape {tuple(images.shape)}")
    shifts = _prepare_shifts(shifts_px, 2, images)
    return _shift_real(images, shifts, 2)


def shift_volumes_3d(volumes: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate volumes by (sub-voxel) shifts using Fourier phase shifts (periodic).

    Parameters
    ----------
    volumes
        ``(..., d, h, w)`` real volumes.
    shifts_px
        ``(..., 3)`` ``(dz, dy, dx)`` shifts in pixels.

    Returns
    -------
    torch.Tensor
        ``(..., d, h, w)`` shifted volumes.
    """
    if volumes.ndim < 3:
        raise ValueError(
            f"volumes must be (..., d, h, w), got shape {tuple(volumes.shape)}"
        )
    shifts = _prepare_shifts(shifts_px, 3, volumes)
    return _shift_real(volumes, shifts, 3)


def phase_shift_dft_2d(
    dft: torch.Tensor,
    shifts_px: torch.Tensor,
    image_shape: Sequence[int],
    rfft: bool = True,
    fftshifted: bool = False,
) -> torch.Tensor:
    """Shift images in Fourier space: multiply their DFT by ``exp(-2 pi i k . s)``.

    Differentiable with respect to both ``dft`` and ``shifts_px``.

    Parameters
    ----------
    dft
        ``(..., h, w // 2 + 1)`` (rfft) or ``(..., h, w)`` complex transforms.
    shifts_px
        ``(..., 2)`` ``(dy, dx)`` shifts in pixels, broadcastable against ``dft``'s
        leading dimensions.
    image_shape
        Real-space ``(h, w)``.
    rfft, fftshifted
        Layout of ``dft`` (see :mod:`cryoavg.ops.fourier`).

    Returns
    -------
    torch.Tensor
        Phase-shifted transforms (broadcast leading shape).
    """
    shape = validate_shape(image_shape, 2)
    shifts = _prepare_shifts(shifts_px, 2, dft)
    return dft * _phase_ramp(shifts, shape, rfft, fftshifted)


def phase_shift_dft_3d(
    dft: torch.Tensor,
    shifts_px: torch.Tensor,
    volume_shape: Sequence[int],
    rfft: bool = True,
    fftshifted: bool = False,
) -> torch.Tensor:
    """3D version of :func:`phase_shift_dft_2d`.

    Parameters
    ----------
    dft
        ``(..., d, h, w // 2 + 1)`` (rfft) or ``(..., d, h, w)`` complex transforms.
    shifts_px
        ``(..., 3)`` ``(dz, dy, dx)`` shifts in pixels.
    volume_shape
        Real-space ``(d, h, w)``.
    rfft, fftshifted
        Layout of ``dft``.

    Returns
    -------
    torch.Tensor
        Phase-shifted transforms.
    """
    shape = validate_shape(volume_shape, 3, "volume_shape")
    shifts = _prepare_shifts(shifts_px, 3, dft)
    return dft * _phase_ramp(shifts, shape, rfft, fftshifted)


def translation_grid_2d(
    range_px: float,
    step_px: float,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION's in-plane translation search grid (spec §A.6.2).

    All ``(iy * step, ix * step)`` with ``|ix|, |iy| <= ceil(range / step)`` and
    ``x**2 + y**2 < range**2 + 0.001``, in RELION's order (x in the outer loop, y
    inner).

    Parameters
    ----------
    range_px
        Search range in pixels (>= 0); 0 gives the single translation ``(0, 0)``.
    step_px
        Grid step in pixels (> 0).
    dtype, device
        Placement of the result.

    Returns
    -------
    torch.Tensor
        ``(t, 2)`` ``(dy, dx)`` offsets in pixels.
    """
    if step_px <= 0:
        raise ValueError(f"step_px must be > 0, got {step_px}")
    if range_px < 0:
        raise ValueError(f"range_px must be >= 0, got {range_px}")
    dtype = dtype or torch.get_default_dtype()
    max_index = ceil(range_px / step_px)
    index = torch.arange(-max_index, max_index + 1, device=device, dtype=torch.float64)
    index_x, index_y = torch.meshgrid(index, index, indexing="ij")  # x outer, y inner
    offsets = torch.stack([index_y.reshape(-1), index_x.reshape(-1)], dim=-1) * step_px
    keep = (offsets**2).sum(-1) < range_px**2 + 0.001
    return offsets[keep].to(dtype)


def integer_shift_2d(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate images by whole pixels without wrap-around, filling with zeros.

    ``out[y, x] = images[y - dy, x - dx]`` where that pixel exists, else 0 (RELION's
    real-space ``translate`` with integer offsets and ``DONT_WRAP``).

    Parameters
    ----------
    images
        ``(..., h, w)`` images (any dtype).
    shifts_px
        ``(..., 2)`` ``(dy, dx)`` shifts; floats are rounded to the nearest integer.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)`` shifted images (broadcast leading shape).
    """
    if images.ndim < 2:
        raise ValueError(f"images must be (..., h, w), got shape {tuple(images.shape)}")
    shifts = torch.as_tensor(shifts_px, device=images.device)
    if shifts.ndim < 1 or shifts.shape[-1] != 2:
        raise ValueError(
            f"shifts_px must have shape (..., 2), got {tuple(shifts.shape)}"
        )
    if shifts.dtype.is_floating_point:
        shifts = torch.round(shifts)
    shifts = shifts.long()
    height, width = images.shape[-2:]
    batch = torch.broadcast_shapes(images.shape[:-2], shifts.shape[:-1])
    rows = torch.arange(height, device=images.device)[:, None]
    cols = torch.arange(width, device=images.device)[None, :]
    source_y = rows - shifts[..., 0, None, None]  # (..., h, 1)
    source_x = cols - shifts[..., 1, None, None]  # (..., 1, w)
    valid = (source_y >= 0) & (source_y < height) & (source_x >= 0) & (source_x < width)
    flat_index = source_y.clamp(0, height - 1) * width + source_x.clamp(
        0, width - 1
    )  # (..., h, w)
    flat_index = flat_index.expand(*batch, height, width).reshape(
        *batch, height * width
    )
    flat_images = images.reshape(*images.shape[:-2], height * width).expand(
        *batch, height * width
    )
    gathered = torch.gather(flat_images, -1, flat_index).reshape(*batch, height, width)
    return torch.where(
        valid.expand(*batch, height, width), gathered, torch.zeros_like(gathered)
    )
