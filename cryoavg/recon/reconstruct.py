"""Wiener-filtered direct Fourier reconstruction and the gold-standard half-map pipeline.

Conventions owned by this module
--------------------------------
* ``data`` and ``weights`` are the padded ``(p, p, p // 2 + 1)`` grids of
  :mod:`cryoavg.recon.backproject` (rfft along x, fftshifted along z and y).
* Shells are those of the unpadded box ``n``: a padded voxel at radius ``r`` (padded
  grid units) belongs to shell ``ires = round(r n / p)``, ``0 .. n // 2``.
* Wiener division (RELION's FSC-based regularisation, spec §A.7 and §D.7): with
  ``W̄(ires)`` the mean weight of the shell and ``SSNR(ires)`` from the half-map FSC
  (:func:`cryoavg.recon.fsc.fsc_to_ssnr`, which includes ``T = tau2_fudge``)::

      F = D / max(W + W̄ / SSNR, W̄ / 1000)

  The regularisation ``W̄ / SSNR`` equals RELION's ``1 / (osc T tau^2)`` with
  ``tau^2 = SSNR sigma^2`` and ``sigma^2 = 1 / (osc W̄)``; it is added for shells
  ``>= min_regularised_shell`` only. Without an FSC (``fsc=None``) no regularisation is
  added (``F = D / max(W, W̄ / 1000)``). Voxels of shells beyond ``max_shell`` are zero.
* The inverse transform is taken on the padded grid (unnormalised forward transforms
  upstream, so the map comes back at the scale of the projected volume), divided by the
  separable ``sinc^2`` of trilinear interpolation (gridding correction) and windowed to
  the central ``n^3`` voxels; the origin is voxel ``n // 2``.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cryoavg.ops.masks import spherical_mask_3d
from cryoavg.ops.rotations import euler_angles_to_matrix
from cryoavg.recon.backproject import BackprojectionAccumulator, padded_size
from cryoavg.recon.fsc import fourier_shell_correlation, fsc_to_ssnr, resolution_at

__all__ = [
    "GoldStandardResult",
    "ReconstructionSettings",
    "backproject_dataset",
    "gridding_correction_3d",
    "reconstruct_gold_standard",
    "shell_index_padded",
    "soft_sphere_mask",
    "wiener_reconstruct",
]

log = logging.getLogger("cryoavg")

#: RELION's floor on the denominator: a fraction of the shell's mean weight
WEIGHT_FLOOR_FRACTION = 1e-3


def shell_index_padded(
    box_size: int, padded: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Shell ``round(r n / p)`` of every voxel of a padded fftshifted-rfft grid.

    Parameters
    ----------
    box_size
        Unpadded edge ``n``.
    padded
        Padded edge ``p``.
    device
        Device of the result.

    Returns
    -------
    torch.Tensor
        ``(p, p, p // 2 + 1)`` int64 shell indices (may exceed ``n // 2`` in corners).
    """
    full = torch.arange(padded, device=device, dtype=torch.float64) - padded // 2
    half = torch.arange(padded // 2 + 1, device=device, dtype=torch.float64)
    radius = torch.sqrt(
        full[:, None, None] ** 2 + full[None, :, None] ** 2 + half[None, None, :] ** 2
    )
    return torch.round(radius * box_size / padded).long()


def gridding_correction_3d(
    padded: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Separable ``sinc^2`` of trilinear interpolation on a padded real-space grid.

    Returns
    -------
    torch.Tensor
        ``(p, p, p)`` float64 factors (origin at voxel ``p // 2``); divide by them.
    """
    coordinate = torch.arange(padded, device=device, dtype=torch.float64) - padded // 2
    factor = torch.sinc(coordinate / padded) ** 2
    return factor[:, None, None] * factor[None, :, None] * factor[None, None, :]


def wiener_reconstruct(
    data: torch.Tensor,
    weights: torch.Tensor,
    box_size: int,
    *,
    fsc: torch.Tensor | None = None,
    tau2_fudge: float = 1.0,
    whole: bool = False,
    min_regularised_shell: int = 5,
    max_shell: int | None = None,
    gridding_correction: bool = True,
) -> torch.Tensor:
    """Real-space map from accumulated back-projections (Wiener filter, gridding).

    Parameters
    ----------
    data
        ``(p, p, p // 2 + 1)`` complex ``sum CTF X`` (see :mod:`cryoavg.recon.backproject`).
    weights
        ``(p, p, p // 2 + 1)`` real ``sum CTF^2``.
    box_size
        Output edge ``n`` in pixels (``p = padded_size(n, pad_factor)``).
    fsc
        ``(n // 2 + 1,)`` half-map FSC giving the SSNR of the Wiener term; ``None``
        for no regularisation.
    tau2_fudge
        Regularisation parameter ``T`` (> 1 trusts the data more).
    whole
        ``data`` holds both halves (the FSC is converted to that of the full set).
    min_regularised_shell
        First shell that receives the Wiener term (RELION's ``minres_map``, 5).
    max_shell
        Last shell kept (default ``n // 2``; e.g. the shell of ``maxres``).
    gridding_correction
        Divide by the ``sinc^2`` of trilinear interpolation.

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` float32 map indexed ``[z, y, x]``.
    """
    padded = data.shape[0]
    grid_shape = (padded, padded, padded // 2 + 1)
    if tuple(data.shape) != grid_shape or tuple(weights.shape) != grid_shape:
        raise ValueError(
            f"data and weights must be (p, p, p//2+1) grids, got {tuple(data.shape)} "
            f"and {tuple(weights.shape)}"
        )
    if padded < box_size:
        raise ValueError(f"padded grid {padded} is smaller than the box {box_size}")
    n_shells = box_size // 2 + 1
    max_shell = n_shells - 1 if max_shell is None else min(int(max_shell), n_shells - 1)
    device = data.device
    shells = shell_index_padded(box_size, padded, device)
    inside = shells <= max_shell
    index = torch.where(inside, shells, torch.full_like(shells, n_shells))
    weights64 = weights.to(torch.float64)
    counts = torch.zeros(n_shells + 1, dtype=torch.float64, device=device)
    counts.index_add_(0, index.flatten(), torch.ones_like(weights64).flatten())
    sums = torch.zeros_like(counts).index_add_(0, index.flatten(), weights64.flatten())
    mean_weight = sums / counts.clamp(min=1.0)  # (n_shells + 1,)
    mean_weight[n_shells] = 0.0
    regularisation = torch.zeros_like(mean_weight)
    if fsc is not None:
        if tuple(fsc.shape) != (n_shells,):
            raise ValueError(f"fsc must be ({n_shells},), got {tuple(fsc.shape)}")
        ssnr = fsc_to_ssnr(fsc.to(device), whole=whole, tau2_fudge=tau2_fudge)
        term = mean_weight[:n_shells] / ssnr
        term[: max(0, int(min_regularised_shell))] = 0.0
        regularisation[:n_shells] = term
    denominator = torch.maximum(
        weights64 + regularisation[index], WEIGHT_FLOOR_FRACTION * mean_weight[index]
    )
    usable = inside & (denominator > 0)
    safe = torch.where(usable, denominator, torch.ones_like(denominator))
    spectrum = torch.where(
        usable,
        data.to(torch.complex128) / safe,
        torch.zeros_like(data, dtype=torch.complex128),
    )
    spectrum = torch.fft.ifftshift(spectrum, dim=(-3, -2))
    volume = torch.fft.irfftn(spectrum, s=(padded,) * 3, dim=(-3, -2, -1))
    volume = torch.fft.fftshift(volume, dim=(-3, -2, -1))
    if gridding_correction:
        volume = volume / gridding_correction_3d(padded, device)
    low = padded // 2 - box_size // 2
    window = slice(low, low + box_size)
    return volume[window, window, window].to(torch.float32).contiguous()


def soft_sphere_mask(
    box_size: int,
    pixel_size_angstrom: float,
    mask_diameter_angstrom: float | None,
    soft_edge_px: float = 5.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION-style soft spherical mask for a ``mask_diameter`` in Å.

    The ball of radius ``mask_diameter / (2 pixel_size)`` passes, followed by a
    raised-cosine edge of ``soft_edge_px``; ``None`` uses the largest ball that fits
    with its edge (``n / 2 - soft_edge_px``).

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` float32 mask in [0, 1].
    """
    if soft_edge_px < 1e-6:  # a hard edge (1e-300 px underflows to 0 in float32)
        soft_edge_px = 0.0
    if mask_diameter_angstrom is None:
        radius = max(0.0, box_size / 2 - soft_edge_px)
    else:
        radius = float(mask_diameter_angstrom) / (2.0 * float(pixel_size_angstrom))
    return spherical_mask_3d(
        (box_size,) * 3, radius, soft_edge_px, device=device, dtype=torch.float32
    )


@dataclass
class ReconstructionSettings:
    """Options of a gold-standard reconstruction.

    Attributes
    ----------
    pad_factor
        Oversampling of the Fourier grid (2).
    tau2_fudge
        Regularisation parameter ``T`` of the Wiener term.
    use_ctf
        Weight by the CTF (``False`` for CTF-free data).
    max_resolution_angstrom
        Highest resolution inserted and kept (``None``: Nyquist).
    mask_diameter_angstrom
        Diameter of the soft spherical mask (``None``: the box).
    mask_soft_edge_px
        Width of its cosine edge in pixels.
    min_regularised_shell
        First shell that receives the Wiener term.
    batch_size
        Particles read and inserted at once.
    """

    pad_factor: float = 2.0
    tau2_fudge: float = 1.0
    use_ctf: bool = True
    max_resolution_angstrom: float | None = None
    mask_diameter_angstrom: float | None = None
    mask_soft_edge_px: float = 5.0
    min_regularised_shell: int = 5
    batch_size: int = 256

    def max_frequency(self, pixel_size_angstrom: float) -> float:
        """Highest inserted frequency in cycles/pixel (0.5 = Nyquist)."""
        if self.max_resolution_angstrom is None:
            return 0.5
        return min(0.5, pixel_size_angstrom / float(self.max_resolution_angstrom))

    def max_shell(self, box_size: int, pixel_size_angstrom: float) -> int:
        """Last shell kept in the maps."""
        return int(np.floor(self.max_frequency(pixel_size_angstrom) * box_size + 1e-9))


def backproject_dataset(
    get_batch: Callable[[np.ndarray], dict],
    positions: Sequence[int] | np.ndarray,
    angles_degrees: torch.Tensor,
    shifts_px: torch.Tensor,
    box_size: int,
    pixel_size_angstrom: float,
    settings: ReconstructionSettings,
    *,
    ctf_premultiplied: bool = False,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> BackprojectionAccumulator:
    """Back-project a set of particles read in batches.

    Parameters
    ----------
    get_batch
        ``ParticleDataset.get_batch``-like reader: positions ``(b,)`` to a dict with
        ``"image"`` ``(b, n, n)`` and ``"ctf"`` (per-particle CTF parameters).
    positions
        Dataset positions of the particles to insert.
    angles_degrees
        ``(len(positions), 3)`` RELION (rot, tilt, psi) of those particles.
    shifts_px
        ``(len(positions), 2)`` ``(dy, dx)`` origins in pixels.
    box_size, pixel_size_angstrom
        Image edge (px) and pixel size (Å).
    settings
        Padding, CTF use, resolution limit and batch size.
    ctf_premultiplied
        The images already carry one CTF factor.
    device
        Device of the computation.
    progress
        Called with the number of particles inserted after every batch.

    Returns
    -------
    BackprojectionAccumulator
        The accumulated grids.
    """
    positions = np.asarray(positions, dtype=np.int64)
    accumulator = BackprojectionAccumulator(box_size, settings.pad_factor, device)
    max_frequency = settings.max_frequency(pixel_size_angstrom)
    matrices = euler_angles_to_matrix(angles_degrees.to(torch.float64)).float()
    batch = max(1, int(settings.batch_size))
    for start in range(0, positions.size, batch):
        stop = min(start + batch, positions.size)
        items = get_batch(positions[start:stop])
        images = items["image"].to(device=device, dtype=torch.float32)
        ctf = None
        if settings.use_ctf:
            ctf = {k: v.to(device) for k, v in items["ctf"].items()}
        accumulator.insert(
            images,
            matrices[start:stop].to(device),
            ctf=ctf,
            shifts_px=shifts_px[start:stop].to(device=device, dtype=torch.float32),
            max_frequency=max_frequency,
            ctf_premultiplied=ctf_premultiplied,
        )
        if progress is not None:
            progress(stop)
    return accumulator


@dataclass
class GoldStandardResult:
    """Maps and resolution of a gold-standard reconstruction.

    Attributes
    ----------
    half1, half2
        ``(n, n, n)`` Wiener-filtered half maps (masked; local symmetry applied if asked).
    full
        ``(n, n, n)`` map from all particles.
    fsc
        ``(n // 2 + 1,)`` FSC between the final half maps.
    fsc_unregularised
        ``(n // 2 + 1,)`` FSC of the unregularised (masked) half maps, which sets the
        Wiener term.
    resolution_angstrom
        Resolution where ``fsc`` drops below 0.143.
    """

    half1: torch.Tensor
    half2: torch.Tensor
    full: torch.Tensor
    fsc: torch.Tensor
    fsc_unregularised: torch.Tensor
    resolution_angstrom: float


def reconstruct_gold_standard(
    half1: BackprojectionAccumulator,
    half2: BackprojectionAccumulator,
    pixel_size_angstrom: float,
    settings: ReconstructionSettings,
    *,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GoldStandardResult:
    """Half maps, full map and FSC from the accumulators of the two halves.

    1. Unregularised half maps (masked) give the FSC that sets the Wiener term.
    2. Each half and the full set (``whole=True``) are reconstructed with it.
    3. ``postprocess`` (e.g. local symmetry) is applied to each map separately.
    4. The soft spherical mask is applied; the final FSC is that of the masked halves.

    Parameters
    ----------
    half1, half2
        Accumulators of the two random halves (same box and padding).
    pixel_size_angstrom
        Pixel size in Å.
    settings
        Regularisation, mask and resolution options.
    postprocess
        Map -> map function applied to every map after reconstruction.

    Returns
    -------
    GoldStandardResult
        Maps and curves.
    """
    box = half1.box_size
    if padded_size(box, half1.pad_factor) != half2.data.shape[0]:
        raise ValueError("the two halves have different grids")
    device = half1.data.device
    mask = soft_sphere_mask(
        box,
        pixel_size_angstrom,
        settings.mask_diameter_angstrom,
        settings.mask_soft_edge_px,
        device,
    )
    max_shell = settings.max_shell(box, pixel_size_angstrom)
    common = {
        "max_shell": max_shell,
        "min_regularised_shell": settings.min_regularised_shell,
        "tau2_fudge": settings.tau2_fudge,
    }
    raw1 = wiener_reconstruct(half1.data, half1.weights, box, **common)
    raw2 = wiener_reconstruct(half2.data, half2.weights, box, **common)
    fsc_raw = fourier_shell_correlation(raw1 * mask, raw2 * mask)
    fsc_raw[max_shell + 1 :] = 0.0
    total = half1 + half2
    maps = [
        wiener_reconstruct(
            acc.data, acc.weights, box, fsc=fsc_raw, whole=whole, **common
        )
        for acc, whole in ((half1, False), (half2, False), (total, True))
    ]
    if postprocess is not None:
        maps = [postprocess(volume) for volume in maps]
    maps = [volume * mask for volume in maps]
    fsc = fourier_shell_correlation(maps[0], maps[1])
    fsc[max_shell + 1 :] = 0.0
    return GoldStandardResult(
        half1=maps[0],
        half2=maps[1],
        full=maps[2],
        fsc=fsc,
        fsc_unregularised=fsc_raw,
        resolution_angstrom=resolution_at(fsc, pixel_size_angstrom, 0.143),
    )
