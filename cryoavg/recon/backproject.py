"""Back-projection of CTF-weighted particle images into a padded 3D Fourier grid.

Conventions owned by this module
--------------------------------
* Images are real ``(b, n, n)`` tensors indexed ``[y, x]`` with the origin at pixel
  ``n // 2`` (RELION, spec §0.1). Their unnormalised ``rfft`` (``(b, n, n // 2 + 1)``,
  the normalisation of :mod:`torch_fourier_slice`, so that a projection's transform is
  exactly the central slice of the volume's transform and a reconstruction comes back at
  the volume's scale) is inserted, as RELION's ``BackProjector`` does, into a 3D grid
  oversampled ``pad_factor`` times: edge ``p = padded_size(n, pad_factor)`` (``2 n`` by
  default); slice coordinates are multiplied by ``p / n``.
* ``rotation_matrices`` are RELION's ``A = euler_angles_to_matrix((rot, tilt, psi))``
  ``(b, 3, 3)`` acting on xyz columns (spec §0.2), the matrix that maps volume
  coordinates onto image coordinates. Slice frequency ``k = (kx, ky, 0)`` is inserted at
  volume frequency ``A^T k`` (adjoint of :func:`cryoavg.ops.projection.project_volume_2d`).
* ``shifts_px`` ``(b, 2)`` are ``(dy, dx)`` = ``(rlnOriginYAngst, rlnOriginXAngst) /
  pixel_size``: the shift APPLIED to each image to centre it (spec §0.3).
* ``ctf`` is ``(b, n, n // 2 + 1)`` on the image's own rfft grid (not fftshifted, the
  layout of :func:`cryoavg.ops.ctf.ctf_2d` with ``rfft=True``), or the CTF parameters.
* Accumulated grids are ``(p, p, p // 2 + 1)`` in torch_fourier_slice's layout: an
  ``rfft`` along x, fftshifted along z and y (frequency 0 at index ``p // 2`` of the
  first two axes and index 0 of the last). ``data`` is complex ``sum_i w_i CTF_i X_i``,
  ``weights`` real ``sum_i w_i CTF_i^2``, both splatted with the same trilinear weights
  (with ``ctf=None`` the weights are the plain interpolation weights). The x = 0 plane
  holds both Friedel halves (each splat there also adds the conjugate at the mate), as in
  :func:`torch_fourier_slice.insert_central_slices_rfft_3d`, which the tests use as the
  reference (for ``pad_factor = 1`` the two agree to float precision). The splat is
  written here (one ``index_add_`` per corner) because it is ~10x faster on CPU.
  Frequencies beyond ``max_frequency`` (cycles/pixel, 0.5 = Nyquist) are not inserted.

Example
-------
>>> acc = BackprojectionAccumulator(box_size=64, pad_factor=2.0)  # doctest: +SKIP
>>> acc.insert(images, matrices, ctf=batch["ctf"], shifts_px=shifts)  # doctest: +SKIP
>>> volume = wiener_reconstruct(acc.data, acc.weights, box_size=64)  # doctest: +SKIP
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from cryoavg.ops.ctf import ctf_2d
from cryoavg.ops.shifts import phase_shift_dft_2d

__all__ = [
    "BackprojectionAccumulator",
    "ctf_for_images",
    "empty_accumulators",
    "insert_particles",
    "padded_size",
]

#: CTF keys read from a parameter mapping (those of cryoavg.io.particles.CTF_KEYS).
_CTF_ARGUMENTS = (
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "defocus_angle_degrees",
    "voltage_kv",
    "cs_mm",
    "amplitude_contrast",
    "pixel_size_angstrom",
)
_CTF_OPTIONAL = {"phase_shift_degrees": 0.0, "bfactor_angstrom2": 0.0, "scale": 1.0}

#: Number of Fourier samples splatted per chunk (bounds memory).
_SAMPLES_PER_CHUNK = 1_000_000


def padded_size(box_size: int, pad_factor: float = 2.0) -> int:
    """Edge ``p`` of the padded Fourier grid for images of ``box_size`` pixels.

    ``p = n + 2 * (int(n * (pad_factor - 1)) // 2)`` (torch_fourier_slice's rule for
    padding), so ``p = 2 n`` for ``pad_factor = 2``.

    Parameters
    ----------
    box_size
        Image edge ``n`` in pixels.
    pad_factor
        Oversampling factor (>= 1).

    Returns
    -------
    int
        The padded edge ``p``.
    """
    if box_size < 2:
        raise ValueError(f"box_size must be >= 2, got {box_size}")
    if pad_factor < 1:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    return int(box_size) + 2 * (int(box_size * (pad_factor - 1.0)) // 2)


def empty_accumulators(
    box_size: int,
    pad_factor: float = 2.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed ``(data, weights)`` grids for :func:`insert_particles`.

    Returns
    -------
    data : torch.Tensor
        ``(p, p, p // 2 + 1)`` complex64 zeros.
    weights : torch.Tensor
        ``(p, p, p // 2 + 1)`` float32 zeros.
    """
    size = padded_size(box_size, pad_factor)
    shape = (size, size, size // 2 + 1)
    return (
        torch.zeros(shape, dtype=torch.complex64, device=device),
        torch.zeros(shape, dtype=torch.float32, device=device),
    )


def ctf_for_images(
    ctf_parameters: Mapping[str, torch.Tensor | float], box_size: int
) -> torch.Tensor:
    """RELION CTFs of particles on their rfft grid.

    Parameters
    ----------
    ctf_parameters
        Per-particle values ``(b,)`` (or floats) under the keys of
        :data:`cryoavg.io.particles.CTF_KEYS`: ``defocus_u_angstrom``,
        ``defocus_v_angstrom``, ``defocus_angle_degrees``, ``voltage_kv``, ``cs_mm``,
        ``amplitude_contrast``, ``pixel_size_angstrom`` and optionally
        ``phase_shift_degrees``, ``bfactor_angstrom2``, ``scale`` (e.g. the ``"ctf"``
        entry of a :class:`cryoavg.io.dataset.ParticleDataset` batch).
    box_size
        Image edge ``n`` in pixels.

    Returns
    -------
    torch.Tensor
        ``(b, n, n // 2 + 1)`` float32 CTF values (rfft, not fftshifted).
    """
    missing = [key for key in _CTF_ARGUMENTS if key not in ctf_parameters]
    if missing:
        raise ValueError(f"ctf parameters lack {', '.join(missing)}")
    arguments = {key: _as_float32(ctf_parameters[key]) for key in _CTF_ARGUMENTS}
    for key, default in _CTF_OPTIONAL.items():
        arguments[key] = _as_float32(ctf_parameters.get(key, default))
    return ctf_2d(
        **arguments, image_shape=(box_size, box_size), rfft=True, fftshift=False
    )


def _as_float32(value: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(value).to(torch.float32)


def _prepare_ctf(
    ctf: torch.Tensor | Mapping[str, torch.Tensor | float] | None,
    n_images: int,
    box_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    if ctf is None:
        return None
    if isinstance(ctf, Mapping):
        values = ctf_for_images(ctf, box_size)
    else:
        values = torch.as_tensor(ctf)
    expected = (box_size, box_size // 2 + 1)
    if values.ndim == 2:
        values = values.expand(n_images, *values.shape)
    if values.ndim != 3 or tuple(values.shape[-2:]) != expected:
        raise ValueError(
            f"ctf must be (b, {expected[0]}, {expected[1]}) (see ctf_for_images) or "
            f"a mapping of CTF parameters, got "
            f"{tuple(values.shape)}"
        )
    if values.shape[0] != n_images:
        raise ValueError(f"ctf has {values.shape[0]} rows for {n_images} images")
    return values.to(device=device, dtype=torch.float32)


def insert_particles(
    images: torch.Tensor,
    rotation_matrices: torch.Tensor,
    *,
    ctf: torch.Tensor | Mapping[str, torch.Tensor | float] | None = None,
    shifts_px: torch.Tensor | None = None,
    particle_weights: torch.Tensor | None = None,
    pad_factor: float = 2.0,
    max_frequency: float | None = 0.5,
    ctf_premultiplied: bool = False,
    data: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert CTF-weighted central slices of particle images into a padded 3D grid.

    Batched over particles (no Python loop per particle); internally split into chunks
    of about a million Fourier samples to bound memory.

    Parameters
    ----------
    images
        ``(b, n, n)`` real particle images (any float dtype; computed in float32).
    rotation_matrices
        ``(b, 3, 3)`` RELION matrices ``A`` (xyz) of the particles' orientations.
    ctf
        ``None`` (no CTF: every image enters with weight 1), a ``(b, n, n // 2 + 1)``
        tensor of CTF values (rfft, not fftshifted; see :func:`ctf_for_images`), or a
        mapping of per-particle CTF parameters.
    shifts_px
        ``(b, 2)`` ``(dy, dx)`` shifts in pixels applied to the images before insertion
        (``rlnOriginY/XAngst / pixel_size``); ``None`` for no shift.
    particle_weights
        ``(b,)`` non-negative multipliers of both data and CTF^2 weights (e.g. posterior
        probabilities of an orientation); ``None`` for 1.
    pad_factor
        Oversampling of the 3D grid (2 = RELION's default).
    max_frequency
        Highest inserted frequency in cycles per pixel (0.5 = Nyquist; ``None`` also
        inserts the corners of the 2D transforms).
    ctf_premultiplied
        The images already carry one CTF factor (``rlnCtfDataAreCtfPremultiplied``):
        the data are inserted as they are and the weights are still ``CTF^2``.
    data, weights
        Accumulators to add to in place (from :func:`empty_accumulators` or a previous
        call); new zeroed grids when ``None``.

    Returns
    -------
    data : torch.Tensor
        ``(p, p, p // 2 + 1)`` complex64 accumulated ``sum w CTF X`` (layout in the
        module docstring).
    weights : torch.Tensor
        ``(p, p, p // 2 + 1)`` float32 accumulated ``sum w CTF^2``.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (b, n, n), got {tuple(images.shape)}")
    n_images, box_size = images.shape[0], images.shape[-1]
    if tuple(rotation_matrices.shape) != (n_images, 3, 3):
        raise ValueError(
            f"rotation_matrices must be ({n_images}, 3, 3), got "
            f"{tuple(rotation_matrices.shape)}"
        )
    device = images.device
    size = padded_size(box_size, pad_factor)
    if data is None or weights is None:
        data, weights = empty_accumulators(box_size, pad_factor, device)
    grid_shape = (size, size, size // 2 + 1)
    if tuple(data.shape) != grid_shape or tuple(weights.shape) != grid_shape:
        raise ValueError(
            f"accumulators must be {grid_shape} for box {box_size} and pad_factor "
            f"{pad_factor}, got {tuple(data.shape)} and {tuple(weights.shape)}"
        )
    if n_images == 0:
        return data, weights
    if shifts_px is not None and tuple(shifts_px.shape) != (n_images, 2):
        raise ValueError(
            f"shifts_px must be ({n_images}, 2), got {tuple(shifts_px.shape)}"
        )
    if particle_weights is not None and tuple(particle_weights.shape) != (n_images,):
        raise ValueError(
            f"particle_weights must be ({n_images},), got "
            f"{tuple(particle_weights.shape)}"
        )
    ctf_values = _prepare_ctf(ctf, n_images, box_size, device)
    chunk = max(1, _SAMPLES_PER_CHUNK // (box_size * (box_size // 2 + 1)))
    matrices = rotation_matrices.to(device=device, dtype=torch.float32)
    accumulator = torch.zeros(
        (3, data.numel()), dtype=torch.float64, device=data.device
    )  # [re, im, weight] per voxel
    for start in range(0, n_images, chunk):
        stop = min(start + chunk, n_images)
        _insert_chunk(
            images[start:stop],
            matrices[start:stop],
            None if ctf_values is None else ctf_values[start:stop],
            None if shifts_px is None else shifts_px[start:stop],
            None if particle_weights is None else particle_weights[start:stop],
            size,
            max_frequency,
            ctf_premultiplied,
            accumulator,
        )
    grid = accumulator.reshape(3, *grid_shape)
    data += torch.complex(grid[0], grid[1]).to(data.dtype)
    weights += grid[2].to(weights.dtype)
    return data, weights


def _slice_samples(
    box_size: int, max_frequency: float | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-redundant rfft samples of an ``n`` image within ``max_frequency``.

    Returns
    -------
    flat_index : torch.Tensor
        ``(m,)`` indices into the flattened ``(n, n // 2 + 1)`` rfft.
    frequency_px : torch.Tensor
        ``(m, 3)`` xyz frequencies in units of ``1 / n`` (z = 0).
    """
    ky = torch.fft.fftfreq(box_size, 1.0 / box_size, device=device)
    kx = torch.arange(box_size // 2 + 1, device=device, dtype=ky.dtype)
    ky_grid, kx_grid = torch.meshgrid(ky, kx, indexing="ij")
    keep = ~((kx_grid == 0) & (ky_grid < 0))  # the kx = 0 column holds both halves
    if max_frequency is not None:
        radius = max_frequency * box_size
        keep &= kx_grid**2 + ky_grid**2 <= radius * radius + 1e-6
    flat_index = torch.nonzero(keep.flatten()).flatten()
    frequency = torch.stack(
        [kx_grid.flatten(), ky_grid.flatten(), torch.zeros_like(kx_grid.flatten())], -1
    )[flat_index]
    return flat_index, frequency.to(torch.float32)


def _splat_trilinear(
    values: torch.Tensor,
    coordinates: torch.Tensor,
    size: int,
    accumulator: torch.Tensor,
) -> None:
    """Trilinear splat of ``(m, 3)`` [re, im, weight] at xyz ``coordinates`` (m, 3).

    ``coordinates`` are frequencies in padded-grid units with x >= 0 (after the Friedel
    fold) and radius <= p / 2; ``accumulator`` is the ``(3, p * p * (p // 2 + 1))``
    float64 grid (z and y fftshifted, periodic). Corners on the x = 0 plane also receive
    the complex conjugate at the Friedel mate ``(-z, -y, 0)``, which that plane stores
    explicitly. One ``bincount`` per channel over all eight corners.
    """
    half = size // 2 + 1
    n_voxels = accumulator.shape[1]
    base = torch.floor(coordinates)
    fraction = coordinates - base  # (m, 3) xyz
    base = base.long()
    # per axis: the two corner positions (m, 2) and their linear weights (m, 2)
    position = torch.stack([base, base + 1], dim=-1)  # (m, 3, 2)
    linear = torch.stack([1.0 - fraction, fraction], dim=-1)  # (m, 3, 2)
    x = position[:, 0]  # (m, 2), in [0, p // 2]
    y = _wrap(position[:, 1] + size // 2, size)
    z = _wrap(position[:, 2] + size // 2, size)
    index = (
        z[:, :, None, None] * (size * half)
        + y[:, None, :, None] * half
        + x[:, None, None, :]
    ).reshape(-1, 8)  # (m, 8) corners ordered (z, y, x)
    index = index.clamp(0, n_voxels - 1)  # guards rounding at the outermost shell
    corner_weight = (
        linear[:, 2, :, None, None]
        * linear[:, 1, None, :, None]
        * linear[:, 0, None, None, :]
    ).reshape(-1, 8)  # (m, 8)
    # Friedel mates of the x = 0 corners (corner x offset 0 with base x == 0)
    plane_rows = torch.nonzero(x[:, 0] == 0).flatten()
    mate_z = _wrap(size - z[plane_rows], size)  # (q, 2)
    mate_y = _wrap(size - y[plane_rows], size)
    mate_index = (
        mate_z[:, :, None] * (size * half) + mate_y[:, None, :] * half
    ).reshape(-1)  # (q * 4,)
    own_index = (
        z[plane_rows, :, None] * (size * half) + y[plane_rows, None, :] * half
    ).reshape(-1)
    mate_weight = (
        linear[plane_rows, 2, :, None] * linear[plane_rows, 1, None, :]
    ) * linear[plane_rows, 0, 0, None, None]  # (q, 2, 2)
    # voxels that are their own mate (the origin) are not counted twice
    mate_weight = mate_weight.reshape(-1) * (mate_index != own_index)
    flat_index = index.flatten()
    for channel, sign in ((0, 1.0), (1, -1.0), (2, 1.0)):
        value = values[:, channel]
        accumulator[channel] += torch.bincount(
            flat_index,
            weights=(value[:, None] * corner_weight).flatten().to(torch.float64),
            minlength=n_voxels,
        )
        if plane_rows.numel():
            accumulator[channel] += torch.bincount(
                mate_index,
                weights=(sign * value[plane_rows, None] * mate_weight.view(-1, 4))
                .flatten()
                .to(torch.float64),
                minlength=n_voxels,
            )


def _wrap(index: torch.Tensor, size: int) -> torch.Tensor:
    """Periodic index in [0, size) for values in [0, 2 size)."""
    return torch.where(index >= size, index - size, index)


def _insert_chunk(
    images: torch.Tensor,
    matrices: torch.Tensor,
    ctf: torch.Tensor | None,
    shifts_px: torch.Tensor | None,
    particle_weights: torch.Tensor | None,
    size: int,
    max_frequency: float | None,
    ctf_premultiplied: bool,
    accumulator: torch.Tensor,
) -> None:
    box = images.shape[-1]
    spectra = torch.fft.rfftn(
        torch.fft.ifftshift(images.to(torch.float32), dim=(-2, -1)), dim=(-2, -1)
    )  # (c, n, n//2+1), unnormalised
    if shifts_px is not None:
        spectra = phase_shift_dft_2d(
            spectra, shifts_px.to(spectra.device, torch.float32), (box, box)
        )
    if ctf is None:
        ctf_weight = torch.ones(
            spectra.shape, dtype=torch.float32, device=images.device
        )
    else:
        if not ctf_premultiplied:
            spectra = spectra * ctf
        ctf_weight = ctf * ctf
    if particle_weights is not None:
        factor = particle_weights.to(spectra.device, torch.float32)[:, None, None]
        spectra = spectra * factor
        ctf_weight = ctf_weight * factor
    flat_index, frequency = _slice_samples(box, max_frequency, images.device)
    n_images = images.shape[0]
    samples = spectra.reshape(n_images, -1)[:, flat_index]  # (c, m)
    values = torch.stack(
        [samples.real, samples.imag, ctf_weight.reshape(n_images, -1)[:, flat_index]],
        dim=-1,
    )  # (c, m, 3)
    # slice frequency k lands at A^T k (row vectors: k @ A), in padded-grid units
    coordinates = (frequency @ matrices) * (size / box)  # (c, m, 3) xyz
    flip = coordinates[..., 0] < 0
    coordinates = torch.where(flip[..., None], -coordinates, coordinates)
    values = torch.where(
        flip[..., None], values * values.new_tensor([1, -1, 1]), values
    )
    _splat_trilinear(
        values.reshape(-1, 3), coordinates.reshape(-1, 3), size, accumulator
    )


@dataclass
class BackprojectionAccumulator:
    """Running ``(data, weights)`` grids of one reconstruction (e.g. one half set).

    Parameters
    ----------
    box_size
        Image edge ``n`` in pixels.
    pad_factor
        Oversampling factor of the grid.
    device
        Device of the grids.

    Attributes
    ----------
    data, weights
        ``(p, p, p // 2 + 1)`` grids (see the module docstring).
    n_particles
        Sum of the particle weights inserted so far.
    """

    box_size: int
    pad_factor: float = 2.0
    device: torch.device | str | None = None
    data: torch.Tensor = field(init=False, repr=False)
    weights: torch.Tensor = field(init=False, repr=False)
    n_particles: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.data, self.weights = empty_accumulators(
            self.box_size, self.pad_factor, self.device
        )

    def insert(
        self,
        images: torch.Tensor,
        rotation_matrices: torch.Tensor,
        *,
        ctf: torch.Tensor | Mapping[str, torch.Tensor | float] | None = None,
        shifts_px: torch.Tensor | None = None,
        particle_weights: torch.Tensor | None = None,
        max_frequency: float | None = 0.5,
        ctf_premultiplied: bool = False,
    ) -> None:
        """Add particles; arguments as in :func:`insert_particles`."""
        insert_particles(
            images.to(self.data.device),
            rotation_matrices.to(self.data.device),
            ctf=ctf,
            shifts_px=shifts_px,
            particle_weights=particle_weights,
            pad_factor=self.pad_factor,
            max_frequency=max_frequency,
            ctf_premultiplied=ctf_premultiplied,
            data=self.data,
            weights=self.weights,
        )
        self.n_particles += (
            float(images.shape[0])
            if particle_weights is None
            else float(particle_weights.sum())
        )

    def __add__(
        self, other: "BackprojectionAccumulator"
    ) -> "BackprojectionAccumulator":
        """Sum of two accumulators (e.g. both halves for the full map)."""
        if (self.box_size, self.pad_factor) != (other.box_size, other.pad_factor):
            raise ValueError("accumulators of different box size or padding")
        total = BackprojectionAccumulator(self.box_size, self.pad_factor, self.device)
        total.data = self.data + other.data.to(self.data.device)
        total.weights = self.weights + other.weights.to(self.weights.device)
        total.n_particles = self.n_particles + other.n_particles
        return total
