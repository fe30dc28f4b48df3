"""RELION-convention DFTs, frequency grids and radial-shell statistics.

Conventions owned by this module
--------------------------------
* Images are ``(..., h, w)``, volumes ``(..., d, h, w)``; any leading batch dimensions.
  Results follow the input's device and dtype.
* Real-space origin: pixel ``n // 2`` of every axis (RELION's "Xmipp origin"). Before a
  forward transform that pixel is moved to index 0 (``ifftshift``), so a centred,
  symmetric object has an (almost) real transform; the inverse transform moves it back.
* Normalisation (RELION): the forward transform divides by the number of real-space
  samples and the inverse is un-normalised (``torch.fft`` ``norm="forward"``). Pixel
  values survive a round trip, the DC term is the image mean, and Parseval reads
  ``sum(|F|**2 over the full transform) == mean(x**2)``.
* Layout flags: ``rfft`` (half transform along the last axis, width ``w // 2 + 1``) and
  ``fftshift`` / ``fftshifted`` (zero frequency moved to index ``n // 2`` of every full
  axis; the half axis of an rfft is never shifted). Default layout: rfft, not
  fftshifted, i.e. row ``i`` holds ``ky = i`` for ``i < h / 2`` and ``i - h`` otherwise,
  column ``j`` holds ``kx = j``.
* Frequencies are in cycles per pixel, ordered like the array axes (``yx`` / ``zyx``).
* Radial shells: ``ires = round(|k| * n)`` on a square/cubic ``n`` grid; 1D spectra have
  ``n // 2 + 1`` entries (shells ``0 .. n // 2``); pixels in the corners
  (``ires > n // 2``) are ignored. RELION's per-shell pixel counts (``Npix_per_shell``)
  use the rfft half plane without the redundant half column ``kx == 0, ky < 0``.
"""

from collections.abc import Sequence

import torch

from cryoavg.ops._grids import validate_cubic, validate_shape

__all__ = [
    "dft_2d",
    "dft_3d",
    "fftfreq_grid",
    "fourier_ring_correlation",
    "fourier_shell_correlation",
    "idft_2d",
    "idft_3d",
    "lowpass_filter",
    "lowpass_weights",
    "power_spectrum_1d",
    "resize_fourier_2d",
    "resize_fourier_3d",
    "resolution_at_threshold",
    "shell_average",
    "shell_index",
    "shell_pixel_counts",
    "shell_sum",
]


def _spatial_dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def _shift_dims(ndim: int, rfft: bool) -> tuple[int, ...]:
    """Axes that (i)fftshift acts on: all spatial axes but the half axis of an rfft."""
    dims = _spatial_dims(ndim)
    return dims[:-1] if rfft else dims


def _check_ndim(tensor: torch.Tensor, ndim: int, name: str) -> None:
    if tensor.ndim < ndim:
        raise ValueError(
            f"{name} must have at least {ndim} dimensions, got shape "
            f"{tuple(tensor.shape)}"
        )


def _forward_dft(
    x: torch.Tensor, ndim: int, rfft: bool, fftshift: bool
) -> torch.Tensor:
    _check_ndim(x, ndim, "input")
    dims = _spatial_dims(ndim)
    x = torch.fft.ifftshift(x, dim=dims)  # real-space origin n//2 -> index 0
    if rfft:
        dft = torch.fft.rfftn(x, dim=dims, norm="forward")
    else:
        dft = torch.fft.fftn(x, dim=dims, norm="forward")
    if fftshift:
        dft = torch.fft.fftshift(dft, dim=_shift_dims(ndim, rfft))
    return dft


def _inverse_dft(
    dft: torch.Tensor, shape: tuple[int, ...], ndim: int, rfft: bool, fftshifted: bool
) -> torch.Tensor:
    _check_ndim(dft, ndim, "dft")
    dims = _spatial_dims(ndim)
    expected = (*shape[:-1], shape[-1] // 2 + 1) if rfft else shape
    if tuple(dft.shape[-ndim:]) != expected:
        raise ValueError(
            f"dft has spatial shape {tuple(dft.shape[-ndim:])}, expected {expected} "
            f"for image shape {shape}"
        )
    if fftshifted:
        dft = torch.fft.ifftshift(dft, dim=_shift_dims(ndim, rfft))
    if rfft:
        x = torch.fft.irfftn(dft, s=shape, dim=dims, norm="forward")
    else:
        x = torch.fft.ifftn(dft, s=shape, dim=dims, norm="forward").real
    return torch.fft.fftshift(x, dim=dims)  # index 0 -> real-space origin n//2


def dft_2d(
    images: torch.Tensor, *, rfft: bool = True, fftshift: bool = False
) -> torch.Tensor:
    """Forward 2D DFT with RELION normalisation about the origin ``N // 2``.

    Parameters
    ----------
    images
        ``(..., h, w)`` real images.
    rfft
        Return the non-redundant half transform ``(..., h, w // 2 + 1)``; otherwise the
        full ``(..., h, w)`` transform.
    fftshift
        Move the zero frequency to index ``h // 2`` (and ``w // 2`` for a full
        transform).

    Returns
    -------
    torch.Tensor
        Complex transform, divided by ``h * w``.
    """
    return _forward_dft(images, 2, rfft, fftshift)


def idft_2d(
    dft: torch.Tensor,
    image_shape: Sequence[int],
    *,
    rfft: bool = True,
    fftshifted: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`dft_2d` (un-normalised, origin moved back to ``N // 2``).

    Parameters
    ----------
    dft
        ``(..., h, w // 2 + 1)`` (rfft) or ``(..., h, w)`` complex transform.
    image_shape
        Real-space ``(h, w)``.
    rfft
        Whether ``dft`` is a half transform.
    fftshifted
        Whether ``dft`` has its zero frequency at index ``h // 2``.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)`` real images (the real part for a full transform).
    """
    shape = validate_shape(image_shape, 2)
    return _inverse_dft(dft, shape, 2, rfft, fftshifted)


def dft_3d(
    volumes: torch.Tensor, *, rfft: bool = True, fftshift: bool = False
) -> torch.Tensor:
    """Forward 3D DFT with RELION normalisation about the origin ``N // 2``.

    Parameters
    ----------
    volumes
        ``(..., d, h, w)`` real volumes.
    rfft
        Return the half transform ``(..., d, h, w // 2 + 1)``; otherwise the full
        transform.
    fftshift
        Move the zero frequency to index ``n // 2`` of every full axis.

    Returns
    -------
    torch.Tensor
        Complex transform, divided by ``d * h * w``.
    """
    return _forward_dft(volumes, 3, rfft, fftshift)


def idft_3d(
    dft: torch.Tensor,
    volume_shape: Sequence[int],
    *,
    rfft: bool = True,
    fftshifted: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`dft_3d`.

    Parameters
    ----------
    dft
        ``(..., d, h, w // 2 + 1)`` (rfft) or ``(..., d, h, w)`` complex transform.
    volume_shape
        Real-space ``(d, h, w)``.
    rfft
        Whether ``dft`` is a half transform.
    fftshifted
        Whether ``dft`` is fftshifted.

    Returns
    -------
    torch.Tensor
        ``(..., d, h, w)`` real volumes.
    """
    shape = validate_shape(volume_shape, 3, "volume_shape")
    return _inverse_dft(dft, shape, 3, rfft, fftshifted)


def fftfreq_grid(
    image_shape: Sequence[int],
    *,
    rfft: bool,
    fftshift: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DFT sample frequencies of a 2D or 3D transform.

    Same layout and ordering as ``torch_grid_utils.fftfreq_grid`` (checked in the
    tests), but built directly in the requested dtype so that float64 grids are exact
    (the library always builds them in the default dtype).

    Parameters
    ----------
    image_shape
        Real-space ``(h, w)`` or ``(d, h, w)``.
    rfft, fftshift
        Layout of the transform the grid belongs to (see the module docstring).
    device, dtype
        Placement of the result (default float dtype when ``dtype`` is None).

    Returns
    -------
    torch.Tensor
        ``(*transform_shape, ndim)`` frequencies in cycles/pixel, ordered ``yx`` /
        ``zyx``.
    """
    shape = tuple(int(n) for n in image_shape)
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise ValueError(f"image_shape must be 2 or 3 positive sizes, got {shape}")
    dtype = dtype or torch.get_default_dtype()
    axes = [torch.fft.fftfreq(n, device=device, dtype=dtype) for n in shape[:-1]]
    last = torch.fft.rfftfreq if rfft else torch.fft.fftfreq
    axes.append(last(shape[-1], device=device, dtype=dtype))
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    if fftshift:
        n_shifted = len(shape) - 1 if rfft else len(shape)  # spatial axes lead the grid
        grid = torch.fft.fftshift(grid, dim=tuple(range(n_shifted)))
    return grid


def _integer_frequency_grid(
    image_shape: Sequence[int],
    rfft: bool,
    fftshift: bool,
    device: torch.device | str | None,
) -> torch.Tensor:
    shape = tuple(int(n) for n in image_shape)
    grid = fftfreq_grid(
        shape, rfft=rfft, fftshift=fftshift, device=device, dtype=torch.float64
    )
    sizes = torch.tensor(shape, dtype=torch.float64, device=grid.device)
    return torch.round(grid * sizes).long()  # (..., ndim) integer frequencies


def shell_index(
    image_shape: Sequence[int],
    *,
    rfft: bool = True,
    fftshift: bool = False,
    exclude_redundant: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Radial shell index ``ires = round(|k| * N)`` of every Fourier pixel (§0.1).

    Parameters
    ----------
    image_shape
        Square ``(N, N)`` or cubic ``(N, N, N)`` real-space shape.
    rfft, fftshift
        Layout of the transform (see the module docstring).
    exclude_redundant
        For an rfft, set the index of the redundant half column (``kx == 0, ky < 0``,
        RELION's rule, also used in 3D) to -1 so that shell statistics skip it, as
        RELION's ``Npix_per_shell`` and likelihood sums do.
    device
        Device of the result.

    Returns
    -------
    torch.Tensor
        Long tensor with the transform's spatial shape; values
        ``0 .. ceil(N * sqrt(ndim) / 2)`` (``-1`` for excluded pixels).
    """
    size = validate_cubic(image_shape)
    k = _integer_frequency_grid(image_shape, rfft, fftshift, device)
    ires = torch.round(torch.sqrt((k**2).sum(-1).double())).long()
    if exclude_redundant and rfft:
        ires = torch.where(
            _redundant_half_column(k, size), torch.full_like(ires, -1), ires
        )
    return ires


def _redundant_half_column(k: torch.Tensor, size: int) -> torch.Tensor:
    """RELION's rule ``kx == 0 and ky < 0`` (in 2D and 3D alike).

    RELION indexes the Nyquist row of an even box as ``ky = +N/2`` (``ip = i`` for
    ``i <= N/2``), so that row is kept although ``torch.fft.fftfreq`` calls it
    ``-N/2``.
    """
    ky = k[..., -2]
    return (k[..., -1] == 0) & (ky < 0) & (2 * ky != -size)


def shell_sum(
    values: torch.Tensor, shell_idx: torch.Tensor, n_shells: int
) -> torch.Tensor:
    """Sum values over radial shells (differentiable scatter-add).

    Parameters
    ----------
    values
        ``(..., *spatial)`` values, real or complex; ``spatial`` is ``shell_idx.shape``.
    shell_idx
        Long tensor of shell indices with the spatial shape (2D or 3D), e.g. from
        :func:`shell_index`. Indices outside ``0 .. n_shells - 1`` are ignored.
    n_shells
        Number of shells in the output.

    Returns
    -------
    torch.Tensor
        ``(..., n_shells)`` per-shell sums (0 for empty shells).
    """
    spatial = tuple(shell_idx.shape)
    if tuple(
        values.shape[values.ndim - len(spatial) :]
    ) != spatial or values.ndim < len(spatial):
        raise ValueError(
            f"values shape {tuple(values.shape)} does not end with shell_idx shape "
            f"{spatial}"
        )
    if n_shells < 1:
        raise ValueError(f"n_shells must be >= 1, got {n_shells}")
    flat_idx = shell_idx.reshape(-1).to(device=values.device, dtype=torch.long)
    valid = (flat_idx >= 0) & (flat_idx < n_shells)
    flat_idx = torch.where(
        valid, flat_idx, torch.full_like(flat_idx, n_shells)
    )  # overflow bin
    batch = values.shape[: values.ndim - len(spatial)]
    flat_values = values.reshape(*batch, -1)
    out = flat_values.new_zeros(*batch, n_shells + 1)
    out = out.index_add(-1, flat_idx, flat_values)
    return out[..., :n_shells]


def shell_average(
    values: torch.Tensor, shell_idx: torch.Tensor, n_shells: int
) -> torch.Tensor:
    """Average values over radial shells.

    Parameters
    ----------
    values
        ``(..., *spatial)`` values, real or complex.
    shell_idx
        Long tensor of shell indices with the spatial shape; out-of-range indices are
        ignored.
    n_shells
        Number of shells in the output.

    Returns
    -------
    torch.Tensor
        ``(..., n_shells)`` per-shell means (0 for empty shells).
    """
    sums = shell_sum(values, shell_idx, n_shells)
    ones = torch.ones(shell_idx.shape, dtype=sums.real.dtype, device=values.device)
    counts = shell_sum(ones, shell_idx, n_shells)
    return sums / counts.clamp(min=1)


def shell_pixel_counts(
    image_shape: Sequence[int],
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Number of Fourier pixels per shell ``0 .. N // 2`` (RELION ``Npix_per_shell``).

    Parameters
    ----------
    image_shape
        Square or cubic real-space shape.
    rfft
        Count over the rfft half transform without its redundant half column
        (``kx == 0, ky < 0``), as RELION does; otherwise over the full transform.
    device
        Device of the result.

    Returns
    -------
    torch.Tensor
        ``(N // 2 + 1,)`` long counts.
    """
    size = validate_cubic(image_shape)
    idx = shell_index(image_shape, rfft=rfft, exclude_redundant=rfft, device=device)
    ones = torch.ones(idx.shape, dtype=torch.float64, device=idx.device)
    return shell_sum(ones, idx, size // 2 + 1).round().long()


def power_spectrum_1d(images: torch.Tensor, *, ndim: int = 2) -> torch.Tensor:
    """Shell-averaged power ``|F|**2`` of images or volumes (RELION normalisation).

    Parameters
    ----------
    images
        ``(..., N, N)`` images (``ndim=2``) or ``(..., N, N, N)`` volumes (``ndim=3``).
    ndim
        Number of spatial dimensions, 2 or 3.

    Returns
    -------
    torch.Tensor
        ``(..., N // 2 + 1)`` mean of ``|F(k)|**2`` over each shell of the half
        transform (each independent frequency counted once).
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    _check_ndim(images, ndim, "images")
    shape = tuple(images.shape[-ndim:])
    size = validate_cubic(shape, "images spatial shape")
    dft = _forward_dft(images, ndim, rfft=True, fftshift=False)
    idx = shell_index(shape, rfft=True, exclude_redundant=True, device=images.device)
    return shell_average(dft.real**2 + dft.imag**2, idx, size // 2 + 1)


def _fourier_correlation(a: torch.Tensor, b: torch.Tensor, ndim: int) -> torch.Tensor:
    _check_ndim(a, ndim, "a")
    _check_ndim(b, ndim, "b")
    if a.shape[-ndim:] != b.shape[-ndim:]:
        raise ValueError(
            f"a and b must have the same spatial shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    shape = tuple(a.shape[-ndim:])
    size = validate_cubic(shape, "spatial shape")
    n_shells = size // 2 + 1
    fa = _forward_dft(a, ndim, rfft=True, fftshift=False)
    fb = _forward_dft(b, ndim, rfft=True, fftshift=False)
    idx = shell_index(shape, rfft=True, device=a.device)
    numerator = shell_sum((fa * fb.conj()).real, idx, n_shells)
    power_a = shell_sum(fa.real**2 + fa.imag**2, idx, n_shells)
    power_b = shell_sum(fb.real**2 + fb.imag**2, idx, n_shells)
    denominator_sq = power_a * power_b
    positive = denominator_sq > 0
    safe = torch.where(positive, denominator_sq, torch.ones_like(denominator_sq))
    return torch.where(
        positive, numerator / torch.sqrt(safe), torch.zeros_like(numerator)
    )


def fourier_ring_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fourier ring correlation per shell ``round(|k| N)`` (RELION ``getFSC``).

    Sums run over the whole rfft half plane (as RELION's ``getFSC``), shells
    ``0 .. N // 2``.

    Notes
    -----
    ``torch_fourier_shell_correlation`` bins frequencies with linear interpolation
    between neighbouring shells and fixes shell 0 to 1, so it does not reproduce
    RELION's ``round(|k| N)`` binning; this is our own implementation (tested against it
    as an oracle).

    Parameters
    ----------
    a, b
        ``(..., N, N)`` images (leading dimensions broadcast).

    Returns
    -------
    torch.Tensor
        ``(..., N // 2 + 1)`` correlation per shell, in [-1, 1] (0 where a shell has no
        power).
    """
    return _fourier_correlation(a, b, 2)


def fourier_shell_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fourier shell correlation of volumes (3D :func:`fourier_ring_correlation`).

    Parameters
    ----------
    a, b
        ``(..., N, N, N)`` volumes (leading dimensions broadcast).

    Returns
    -------
    torch.Tensor
        ``(..., N // 2 + 1)`` correlation per shell.
    """
    return _fourier_correlation(a, b, 3)


def resolution_at_threshold(
    curve: torch.Tensor,
    box_size: int,
    pixel_size_angstrom: float,
    threshold: float = 0.143,
) -> torch.Tensor:
    """Resolution where an FRC/FSC curve first drops below a threshold.

    The crossing is located between the last shell at or above the threshold and the
    first shell ``>= 1`` below it by linear interpolation; shell 0 (DC) is never tested.

    Parameters
    ----------
    curve
        ``(..., n_shells)`` correlation per shell ``0 .. n_shells - 1``.
    box_size
        Real-space box size ``N`` (shell ``i`` is ``i / (N * pixel_size)`` 1/Å).
    pixel_size_angstrom
        Pixel size in Å.
    threshold
        Threshold value (0.143 gold standard, 0.5 for a reference comparison).

    Returns
    -------
    torch.Tensor
        ``(...)`` resolution in Å; ``N * pixel_size`` at worst, and the resolution of
        the last shell if the curve never drops below the threshold.
    """
    if curve.ndim < 1 or curve.shape[-1] < 2:
        raise ValueError(
            f"curve must have at least 2 shells, got shape {tuple(curve.shape)}"
        )
    if box_size < 1 or pixel_size_angstrom <= 0:
        raise ValueError(
            f"invalid box_size={box_size} or pixel_size_angstrom={pixel_size_angstrom}"
        )
    below = curve[..., 1:] < threshold
    crossed = below.any(dim=-1)
    first = below.to(torch.int64).argmax(dim=-1) + 1  # first shell >= 1 below threshold
    previous = first - 1
    value_before = curve.gather(-1, previous.unsqueeze(-1)).squeeze(-1)
    value_after = curve.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    drop = (value_before - value_after).clamp(min=torch.finfo(curve.dtype).tiny)
    fraction = ((value_before - threshold) / drop).clamp(0.0, 1.0)
    shell = (previous.to(curve.dtype) + fraction).clamp(min=1.0)
    last_shell = torch.full_like(shell, float(curve.shape[-1] - 1))
    shell = torch.where(crossed, shell, last_shell)
    return box_size * pixel_size_angstrom / shell


def lowpass_weights(
    image_shape: Sequence[int],
    resolution_angstrom: float,
    pixel_size_angstrom: float,
    edge_width_shells: int = 2,
    *,
    rfft: bool = True,
    fftshift: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RELION ``lowPassFilterMap`` raised-cosine weights on a Fourier grid.

    With ``R = round(N * pixel_size / resolution)`` (RELION rounds to a whole shell) and
    ``half = edge_width_shells // 2`` (integer division, as RELION), frequencies with
    radius ``r < R - half`` (shells, ``r = |k| N``) are kept, those with
    ``r > R + half`` are zeroed and those in between are multiplied by
    ``0.5 + 0.5 cos(pi (r - R + half) / (2 half))``. With ``half == 0`` the cut is hard
    (keep ``r <= R``).

    Parameters
    ----------
    image_shape
        Square or cubic real-space shape ``(N, N[, N])``.
    resolution_angstrom
        Filter resolution in Å (> 0).
    pixel_size_angstrom
        Pixel size in Å (> 0).
    edge_width_shells
        Full width of the cosine edge in shells.
    rfft, fftshift
        Layout of the transform (see the module docstring).
    device, dtype
        Placement of the result.

    Returns
    -------
    torch.Tensor
        Real weights with the transform's spatial shape.
    """
    size = validate_cubic(image_shape)
    if resolution_angstrom <= 0 or pixel_size_angstrom <= 0:
        raise ValueError(
            f"resolution_angstrom ({resolution_angstrom}) and pixel_size_angstrom "
            f"({pixel_size_angstrom}) must be > 0"
        )
    if edge_width_shells < 0:
        raise ValueError(f"edge_width_shells must be >= 0, got {edge_width_shells}")
    dtype = dtype or torch.get_default_dtype()
    filter_shell = int(
        torch.round(
            torch.tensor(size * pixel_size_angstrom / resolution_angstrom)
        ).item()
    )
    half_width = int(edge_width_shells) // 2
    edge_low = max(0.0, float(filter_shell - half_width))
    edge_high = float(filter_shell + half_width)
    k = _integer_frequency_grid(image_shape, rfft, fftshift, device).to(torch.float64)
    radius = torch.sqrt((k**2).sum(-1))
    if edge_high <= edge_low:
        weights = (radius <= edge_low).to(torch.float64)
    else:
        phase = ((radius - edge_low) / (edge_high - edge_low)).clamp(0.0, 1.0)
        weights = 0.5 + 0.5 * torch.cos(torch.pi * phase)
        weights = torch.where(radius < edge_low, torch.ones_like(weights), weights)
    return weights.to(dtype)


def lowpass_filter(
    images: torch.Tensor,
    resolution_angstrom: float,
    pixel_size_angstrom: float,
    edge_width_shells: int = 2,
    *,
    ndim: int = 2,
) -> torch.Tensor:
    """Low-pass filter images or volumes with RELION's raised-cosine edge.

    See :func:`lowpass_weights` for the filter shape (RELION ``lowPassFilterMap``).

    Parameters
    ----------
    images
        ``(..., N, N)`` images (``ndim=2``) or ``(..., N, N, N)`` volumes (``ndim=3``).
    resolution_angstrom
        Filter resolution in Å.
    pixel_size_angstrom
        Pixel size in Å.
    edge_width_shells
        Full width of the cosine edge in shells (RELION default 2).
    ndim
        Number of spatial dimensions, 2 or 3.

    Returns
    -------
    torch.Tensor
        Filtered real-space data, same shape as ``images``.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    _check_ndim(images, ndim, "images")
    shape = tuple(images.shape[-ndim:])
    dtype = images.dtype if images.dtype.is_floating_point else None
    weights = lowpass_weights(
        shape,
        resolution_angstrom,
        pixel_size_angstrom,
        edge_width_shells,
        device=images.device,
        dtype=dtype,
    )
    dft = _forward_dft(images, ndim, rfft=True, fftshift=False)
    return _inverse_dft(dft * weights, shape, ndim, rfft=True, fftshifted=False)


def _resize_fourier(x: torch.Tensor, new_size: int, ndim: int) -> torch.Tensor:
    _check_ndim(x, ndim, "input")
    shape = tuple(x.shape[-ndim:])
    old_size = validate_cubic(shape, "spatial shape")
    if int(new_size) < 1:
        raise ValueError(f"new_size must be >= 1, got {new_size}")
    new_size = int(new_size)
    if new_size == old_size:
        return x.clone()
    dft = _forward_dft(x, ndim, rfft=True, fftshift=True)
    batch = dft.shape[:-ndim]
    out = dft.new_zeros(*batch, *([new_size] * (ndim - 1)), new_size // 2 + 1)
    # full axes: frequencies k with index k + n // 2 in both grids
    k_low = max(-(old_size // 2), -(new_size // 2))
    k_high = min(old_size - old_size // 2, new_size - new_size // 2)  # exclusive
    old_slice = slice(k_low + old_size // 2, k_high + old_size // 2)
    new_slice = slice(k_low + new_size // 2, k_high + new_size // 2)
    n_half = min(old_size, new_size) // 2 + 1
    index_old = (Ellipsis, *([old_slice] * (ndim - 1)), slice(0, n_half))
    index_new = (Ellipsis, *([new_slice] * (ndim - 1)), slice(0, n_half))
    out[index_new] = dft[index_old]
    return _inverse_dft(out, (new_size,) * ndim, ndim, rfft=True, fftshifted=True)


def resize_fourier_2d(images: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resize square images by Fourier cropping/zero-padding (RELION ``resizeMap``).

    With RELION's normalisation the real-space intensity scale is preserved (a constant
    image stays the same constant); the pixel size changes by ``N / new_size``.

    Parameters
    ----------
    images
        ``(..., N, N)`` images.
    new_size
        Output box size.

    Returns
    -------
    torch.Tensor
        ``(..., new_size, new_size)`` images, origin at ``new_size // 2``.
    """
    return _resize_fourier(images, new_size, 2)


def resize_fourier_3d(volumes: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resize cubic volumes by Fourier cropping or zero-padding (RELION ``resizeMap``).

    Parameters
    ----------
    volumes
        ``(..., N, N, N)`` volumes.
    new_size
        Output box size.

    Returns
    -------
    torch.Tensor
        ``(..., new_size, new_size, new_size)`` volumes.
    """
    return _resize_fourier(volumes, new_size, 3)
