"""M-step of 2D classification: EM (spec §A.7) and VDAM (§A.8.5–§A.8.7) updates.

Also the post-M-step operations of §A.9 (solvent flattening, class centring, current
resolution) and the estimated resolution of §A.10.3.

All functions act in place on a :class:`~cryoavg.class2d.state.Class2DState` given the
summed :class:`~cryoavg.class2d.statistics.Class2DStatistics` of the iteration (already
all-reduced over DDP ranks, so every rank performs the identical update).

Conventions
-----------
* ``k`` classes, ``N`` box, ``f = N // 2 + 1`` shells, ``P = pad · N``, ``osc = pad²``.
* Padded-grid arrays ``(…, P, P // 2 + 1)`` are un-shifted rfft half planes whose values
  are on the ``N``-grid scale (see ``docs/class2d-design.md``): the padded transform of
  a class image is ``dft_2d(zero_pad(image, P)) · pad²``. A padded voxel at integer
  frequency ``(ky_p, kx_p)`` lies at ``N``-grid radius ``r = |k_p| / pad`` and in shell
  ``ires = floor(r + ½)`` (RELION's ``ROUND``).
* ``r_max = current_size / 2``: padded voxels with ``r < r_max`` are filled, all others
  are zero (class images are hard low-passed at the current size every iteration).
* Spectra are variances per real/imaginary component (τ², σ²) on the ``N``-grid scale.
* Real-space shifts are ``(y, x)`` in pixels; "translate by ``s``" moves content by
  ``+s``, i.e. multiplies the transform by ``exp(−2πi q·s / N)``.
"""

import math
from dataclasses import dataclass

import torch

from cryoavg.class2d.projector import gridding_correction_map
from cryoavg.class2d.schedule import VdamSchedule
from cryoavg.class2d.settings import EXPAND_CLASS_RULES
from cryoavg.class2d.state import Class2DState
from cryoavg.class2d.statistics import Class2DStatistics
from cryoavg.ops.fourier import dft_2d, idft_2d, shell_pixel_counts
from cryoavg.ops.masks import (
    center_of_mass_2d,
    circular_mask_2d,
    soft_mask_outside_2d,
)
from cryoavg.ops.shifts import phase_shift_dft_2d

__all__ = [
    "EmUpdateResult",
    "VdamUpdateResult",
    "center_classes",
    "class_power_spectrum",
    "em_update",
    "estimated_resolution_angstrom",
    "padded_dft_2d",
    "solvent_flatten",
    "update_other_parameters",
    "update_resolution",
    "vdam_update",
    "vdam_update_for_iteration",
]

_MIN_SIGMA2_NOISE = 1e-14


@dataclass(frozen=True)
class EmUpdateResult:
    """What :func:`em_update` did besides the update: the class split (if any).

    Attributes
    ----------
    expanded_class
        0-based class that was split (None if no class was re-seeded).
    replaced_class
        0-based class that received its second half (None if none).
    """

    expanded_class: int | None
    replaced_class: int | None


@dataclass(frozen=True)
class VdamUpdateResult:
    """What a VDAM update did (for logging).

    Attributes
    ----------
    expanded_class
        0-based class that was copied (None if no replacement happened).
    replaced_class
        0-based class that was overwritten by the copy (None if none).
    class_error
        ``(k,)`` class error ``e_k = mean |d|² · π_k`` (0 for classes not updated).
    updated
        ``(k,)`` bool, classes whose image took a gradient step.
    """

    expanded_class: int | None
    replaced_class: int | None
    class_error: torch.Tensor
    updated: torch.Tensor


# --------------------------------------------------------------------------- geometry
def _relion_round(values: torch.Tensor) -> torch.Tensor:
    """Round half away from zero for non-negative values (RELION ``ROUND``)."""
    return torch.floor(values + 0.5)


@dataclass(frozen=True)
class _PaddedGrid:
    """Geometry of the padded half plane ``(P, P // 2 + 1)``.

    ``radius`` is the ``N``-grid radius of each voxel; ``shell`` its shell index, set to
    ``n_shells`` (an overflow bin) outside ``r < r_max`` or beyond the last shell.
    """

    radius: torch.Tensor  # (P, P//2+1) N-grid units
    shell: torch.Tensor  # (P, P//2+1) long, n_shells outside the mask
    inside: torch.Tensor  # (P, P//2+1) bool, r < r_max
    n_shells: int


def _padded_grid(
    box_size: int, pad: int, r_max: float, *, device: torch.device, dtype: torch.dtype
) -> _PaddedGrid:
    big = pad * box_size
    ky = torch.fft.fftfreq(big, 1.0 / big, device=device, dtype=torch.float64).round()
    kx = torch.arange(big // 2 + 1, device=device, dtype=torch.float64)
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / pad  # (P, P//2+1)
    n_shells = box_size // 2 + 1
    inside = radius < r_max
    shell = _relion_round(radius).long()
    shell = torch.where(
        inside & (shell < n_shells), shell, torch.full_like(shell, n_shells)
    )
    return _PaddedGrid(
        radius=radius.to(dtype),
        shell=shell,
        inside=inside,
        n_shells=n_shells,
    )


def _padded_shell_sum(values: torch.Tensor, grid: _PaddedGrid) -> torch.Tensor:
    """Sum ``(…, P, P//2+1)`` values per shell over ``r < r_max`` → ``(…, f)``."""
    shell = grid.shell
    lead = values.shape[:-2]
    flat = values.reshape(*lead, -1)
    out = flat.new_zeros(*lead, grid.n_shells + 1)
    out = out.index_add(-1, shell.reshape(-1), flat)
    return out[..., : grid.n_shells]


def _padded_shell_mean(values: torch.Tensor, grid: _PaddedGrid) -> torch.Tensor:
    """Mean of ``(…, P, P//2+1)`` values per shell over ``r < r_max`` → ``(…, f)``."""
    sums = _padded_shell_sum(values, grid)
    counts = _padded_shell_sum(torch.ones_like(grid.radius), grid)
    return sums / counts.clamp(min=1)


def _expand_shells(spectrum: torch.Tensor, grid: _PaddedGrid) -> torch.Tensor:
    """Spread ``(…, f)`` shell values over the padded grid (0 outside the mask)."""
    padded = torch.cat([spectrum, spectrum.new_zeros(*spectrum.shape[:-1], 1)], dim=-1)
    return padded[..., grid.shell]  # (…, P, P//2+1)


# ----------------------------------------------------------------- real-space helpers
def _translate_bilinear(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate images by ``+shift`` with bilinear interpolation, zero fill, no wrap.

    Private stand-in for a real-space ``cryoavg.ops.shifts`` translation.

    Parameters
    ----------
    images
        ``(b, N, N)`` real images.
    shifts_px
        ``(b, 2)`` ``(y, x)`` shifts in pixels: ``out(p) = in(p − shift)``.

    Returns
    -------
    torch.Tensor
        ``(b, N, N)`` translated images.
    """
    b, h, w = images.shape
    ys = torch.arange(h, device=images.device, dtype=images.dtype)
    xs = torch.arange(w, device=images.device, dtype=images.dtype)
    src_y = ys[None, :, None] - shifts_px[:, 0, None, None]  # (b, h, 1)
    src_x = xs[None, None, :] - shifts_px[:, 1, None, None]  # (b, 1, w)
    # grid_sample with align_corners=True: -1 ↔ index 0, +1 ↔ index n-1
    gy = (2.0 * src_y / max(h - 1, 1) - 1.0).expand(b, h, w)
    gx = (2.0 * src_x / max(w - 1, 1) - 1.0).expand(b, h, w)
    grid = torch.stack([gx, gy], dim=-1)  # (b, h, w, 2) in (x, y) order
    out = torch.nn.functional.grid_sample(
        images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[:, 0]


def _zero_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Embed ``(…, N, N)`` images in ``(…, size, size)`` zeros, origins aligned."""
    n = images.shape[-1]
    out = images.new_zeros(*images.shape[:-2], size, size)
    o = size // 2 - n // 2
    out[..., o : o + n, o : o + n] = images
    return out


def _window(images: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``(…, size, size)`` window of ``(…, P, P)`` images, origins aligned."""
    big = images.shape[-1]
    o = big // 2 - size // 2
    return images[..., o : o + size, o : o + size]


# ---------------------------------------------------------------- Fourier helpers
def padded_dft_2d(
    images: torch.Tensor,
    pad: int = 2,
    *,
    gridding_correction: bool = False,
    r_max: float | None = None,
) -> torch.Tensor:
    """Padded, ``N``-grid-scaled half-plane transform of class images.

    Parameters
    ----------
    images
        ``(…, N, N)`` real images (origin at ``N // 2``).
    pad
        Padding factor.
    gridding_correction
        Divide by ``sinc²(r / (pad·N))`` before padding (as the E-step projector does).
    r_max
        If given, zero all voxels with ``N``-grid radius ``r ≥ r_max``.

    Returns
    -------
    torch.Tensor
        ``(…, P, P // 2 + 1)`` complex; ``dft_2d(zero_pad(image, P)) · pad²``, so that
        the voxel at ``pad · q`` equals the ``N``-grid coefficient at ``q``.
    """
    n = images.shape[-1]
    work = images
    if gridding_correction:
        work = images / gridding_correction_map(
            n, pad, dtype=images.dtype, device=images.device
        )
    out = dft_2d(_zero_pad(work, pad * n)) * float(pad * pad)
    if r_max is not None:
        grid = _padded_grid(
            n, pad, r_max, device=images.device, dtype=images.real.dtype
        )
        out = out * grid.inside
    return out


def _padded_to_image(dft: torch.Tensor, box_size: int, pad: int) -> torch.Tensor:
    """Inverse of :func:`padded_dft_2d` (no gridding): → ``(…, N, N)`` images."""
    big = pad * box_size
    return _window(idft_2d(dft, (big, big)), box_size) / float(pad * pad)


def class_power_spectrum(
    images: torch.Tensor, pad: int = 2, current_size: int | None = None
) -> torch.Tensor:
    """τ² of class images as RELION computes it when building projectors (§A.7).

    Parameters
    ----------
    images
        ``(k, N, N)`` class images.
    pad
        Padding factor.
    current_size
        Current image size; shells ``ires > current_size / 2`` get 0. None → ``N``.

    Returns
    -------
    torch.Tensor
        ``(k, f)`` shell mean of ``|F_pad|² / 2`` over the padded grid, with ``F_pad``
        the gridding-corrected padded transform (:func:`padded_dft_2d`): the power per
        real/imaginary component on the ``N``-grid scale.
    """
    n = images.shape[-1]
    r_max = (n if current_size is None else int(current_size)) / 2.0
    grid = _padded_grid(n, pad, r_max + 0.5, device=images.device, dtype=images.dtype)
    dft = padded_dft_2d(images, pad, gridding_correction=True)
    power = dft.real**2 + dft.imag**2
    tau2 = _padded_shell_mean(power, grid) / 2.0
    shells = torch.arange(grid.n_shells, device=images.device)
    return torch.where(shells <= r_max, tau2, torch.zeros_like(tau2))


def _ssnr_arrays(
    weight: torch.Tensor,
    tau2: torch.Tensor,
    tau2_fudge: float,
    grid: _PaddedGrid,
    pad: int,
    r_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RELION ``updateSSNRarrays`` for 2D (§A.7).

    Parameters
    ----------
    weight
        ``(k, P, P//2+1)`` accumulated weights.
    tau2
        ``(k, f)`` prior spectra.
    tau2_fudge
        T.
    grid
        Padded geometry with ``r < r_max`` mask.
    pad
        Padding factor (``osc = pad²``).
    r_max
        ``current_size / 2``.

    Returns
    -------
    ssnr, completeness, sigma2_class : torch.Tensor
        ``(k, f)`` each: shell mean of ``W·osc·T·τ²`` (999 for shells ≤ r_max without
        voxels, 0 beyond), the fraction of voxels with ratio ≥ 1 and
        ``n_voxels / Σ osc·W`` (0 where ``Σ W = 0``).
    """
    osc = float(pad * pad)
    ratio = weight * osc * tau2_fudge * _expand_shells(tau2, grid)  # (k, P, P//2+1)
    counts = _padded_shell_sum(torch.ones_like(grid.radius), grid)  # (f,)
    sums = _padded_shell_sum(ratio, grid)
    covered = _padded_shell_sum((ratio >= 1.0).to(ratio.dtype), grid)
    weight_sums = _padded_shell_sum(weight * osc, grid)
    shells = torch.arange(grid.n_shells, device=weight.device, dtype=weight.dtype)
    empty_value = torch.where(
        shells <= r_max, torch.full_like(shells, 999.0), torch.zeros_like(shells)
    )
    has = counts > 0
    ssnr = torch.where(has, sums / counts.clamp(min=1), empty_value)
    completeness = torch.where(
        has, covered / counts.clamp(min=1), torch.zeros_like(sums)
    )
    sigma2_class = torch.where(
        weight_sums > 0,
        counts
        / torch.where(weight_sums > 0, weight_sums, torch.ones_like(weight_sums)),
        torch.zeros_like(weight_sums),
    )
    return ssnr, completeness, sigma2_class


def _fill_shells(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace invalid shells by the previous valid one (the first valid for a prefix).

    Parameters
    ----------
    values, valid
        ``(…, f)`` spectra and a bool mask of acceptable entries.

    Returns
    -------
    torch.Tensor
        ``(…, f)``; rows without any valid entry are returned unchanged.
    """
    f = values.shape[-1]
    idx = torch.arange(f, device=values.device).expand_as(values)
    previous = torch.where(valid, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    first_valid = torch.where(valid, idx, torch.full_like(idx, f)).min(
        dim=-1, keepdim=True
    )
    source = torch.where(
        previous >= 0, previous, first_valid.values.expand_as(previous)
    )
    any_valid = valid.any(dim=-1, keepdim=True)
    source = torch.where(any_valid, source.clamp(max=f - 1), idx)
    return values.gather(-1, source)


# ------------------------------------------------------------------------- EM update
@torch.no_grad()
def em_update(
    state: Class2DState,
    stats: Class2DStatistics,
    tau2_fudge: float,
    *,
    do_map: bool = True,
    minres_map: int = 5,
    do_norm: bool = True,
    do_scale: bool = True,
    fix_sigma_noise: bool = False,
    fix_sigma_offset: bool = False,
    min_sigma2_offset_angstrom2: float | None = 2.0,
    allow_class_replacement: bool = False,
    class_inactivity_threshold: float = 0.0,
) -> EmUpdateResult:
    """EM M-step (§A.7): new class images and all other parameters, in place.

    For each class, with ``D``/``W`` the sums of both pseudo half-set accumulators::

        F = D / max(W + 1/(osc·T·τ²(ires)), W̄(ires) / 1000)

    (the regularisation only for ``ires ≥ minres_map`` with MAP; if ``τ² = 0`` it is
    ``1/(0.001·W)``), only for ``r < current_size / 2``; inverse transform on the padded
    grid, window to ``N``, divide by ``pad²``, background-replace the corners (radius
    ``N/2``, width 3 px) and divide by ``sinc²(r/(pad·N))``. τ² is the power spectrum of
    the current class image (the one the E-step projected). Classes whose prior π_k was
    0 are set to zero. Then :func:`update_other_parameters` with ``mu = 0``.

    Class re-seeding (cryoavg's extension; RELION's EM has none): with
    ``allow_class_replacement`` and a positive ``class_inactivity_threshold`` c, if the
    least populated class has ``π < c / K_active`` it takes the place of half of the
    most populated class: the two pseudo half-set reconstructions of that class become
    the two classes (the most populated keeps half 0, the re-seeded one gets half 1),
    and both get half of its share π, its offset prior, τ² and SSNR. The two halves
    differ by noise only, so a class that holds one view merges back, while a class
    that averages several views can divide into them.

    Parameters
    ----------
    state
        Model state; updated in place (images, ``tau2``, ``ssnr``,
        ``fourier_completeness``, ``sigma2_class``, ``tau2_fudge`` and the other
        parameters).
    stats
        Summed sufficient statistics of the iteration (EM accumulators).
    tau2_fudge
        Regularisation parameter T (> 0).
    do_map
        Add the prior (MAP); False gives the ML estimate ``D / max(W, W̄/1000)``.
    minres_map
        First shell that is regularised (RELION ``--minres_map``, 5).
    do_norm, do_scale, fix_sigma_noise, fix_sigma_offset, min_sigma2_offset_angstrom2
        See :func:`update_other_parameters`.
    allow_class_replacement
        Whether this iteration may re-seed a class.
    class_inactivity_threshold
        c; 0 disables re-seeding.

    Returns
    -------
    EmUpdateResult
        The split class and the re-seeded one (both None when nothing happened).

    Raises
    ------
    ValueError
        If ``tau2_fudge`` is not positive or the statistics do not match the state.
    """
    if tau2_fudge <= 0:
        raise ValueError(f"tau2_fudge must be > 0, got {tau2_fudge}")
    if class_inactivity_threshold < 0:
        raise ValueError(
            f"class_inactivity_threshold must be >= 0, got {class_inactivity_threshold}"
        )
    _check_shapes(state, stats)
    n, pad = state.box_size, state.pad
    dtype = state.class_images.dtype
    device = state.class_images.device
    r_max = int(state.current_size) / 2.0
    grid = _padded_grid(n, pad, r_max, device=device, dtype=dtype)

    tau2 = class_power_spectrum(state.class_images, pad, int(state.current_size))
    weight = stats.weight.sum(dim=0).to(dtype)  # (k, P, P//2+1)
    data = stats.data.sum(dim=0).to(state.moment1.dtype)  # (k, P, P//2+1)
    ssnr, completeness, sigma2_class = _ssnr_arrays(
        weight, tau2, tau2_fudge, grid, pad, r_max
    )

    images = _em_images(
        data,
        weight,
        tau2,
        tau2_fudge,
        grid,
        n,
        pad,
        do_map=do_map,
        minres_map=minres_map,
    )
    prior_old = state.class_prior.clone()
    empty = prior_old <= 0
    images = torch.where(empty[:, None, None], torch.zeros_like(images), images)
    images = torch.nan_to_num(images, nan=0.0, posinf=0.0, neginf=0.0)

    expanded: int | None = None
    replaced: int | None = None
    if allow_class_replacement and class_inactivity_threshold > 0:
        n_active = int((prior_old > 0).sum())
        drop = int(torch.argmin(prior_old))
        expand = int(torch.argmax(prior_old))
        threshold = class_inactivity_threshold / max(n_active, 1)
        halves_weight = stats.weight[:, expand].to(dtype)  # (2, P, P//2+1)
        if (
            drop != expand
            and float(prior_old[drop]) < threshold
            and bool((halves_weight.flatten(1).sum(1) > 0).all())
        ):
            halves = _em_images(
                stats.data[:, expand].to(state.moment1.dtype),
                halves_weight,
                tau2[expand].expand(2, -1),
                tau2_fudge,
                grid,
                n,
                pad,
                do_map=do_map,
                minres_map=minres_map,
            )  # (2, N, N)
            halves = torch.nan_to_num(halves, nan=0.0, posinf=0.0, neginf=0.0)
            images[expand] = halves[0]
            images[drop] = halves[1]
            expanded, replaced = expand, drop
            for table in (tau2, ssnr, completeness, sigma2_class):
                table[drop] = table[expand]

    state.class_images.copy_(images)
    state.tau2.copy_(tau2)
    state.ssnr.copy_(ssnr)
    state.fourier_completeness.copy_(completeness)
    state.sigma2_class.copy_(sigma2_class)
    state.tau2_fudge.fill_(float(tau2_fudge))
    update_other_parameters(
        state,
        stats,
        mu=0.0,
        do_norm=do_norm,
        do_scale=do_scale,
        fix_sigma_noise=fix_sigma_noise,
        fix_sigma_offset=fix_sigma_offset,
        min_sigma2_offset_angstrom2=min_sigma2_offset_angstrom2,
    )
    if replaced is not None and expanded is not None:
        share = 0.5 * float(state.class_prior[expanded])
        state.class_prior[expanded] = share
        state.class_prior[replaced] = share
        state.class_prior.div_(state.class_prior.sum().clamp(min=1e-30))
        state.class_offset_prior_angstrom[replaced] = state.class_offset_prior_angstrom[
            expanded
        ]
    return EmUpdateResult(expanded_class=expanded, replaced_class=replaced)


def _em_images(
    data: torch.Tensor,
    weight: torch.Tensor,
    tau2: torch.Tensor,
    tau2_fudge: float,
    grid: _PaddedGrid,
    n: int,
    pad: int,
    *,
    do_map: bool,
    minres_map: int,
) -> torch.Tensor:
    """Class images ``(k, N, N)`` from EM sums ``(k, P, P//2+1)`` (§A.7, see em_update)."""
    dtype = weight.dtype
    device = weight.device
    osc = float(pad * pad)
    # regularised weight
    regularise = grid.shell >= minres_map  # (P, P//2+1)
    if do_map:
        tau2_voxel = _expand_shells(tau2, grid)  # (k, P, P//2+1)
        positive_tau2 = tau2_voxel > 0
        inv_tau2 = 1.0 / (
            osc * tau2_fudge * torch.where(positive_tau2, tau2_voxel, 1.0)
        )
        inv_weight = torch.where(
            weight > 0, 1.0 / (0.001 * weight.clamp(min=1e-30)), 0.0
        )
        prior = torch.where(positive_tau2, inv_tau2, inv_weight)
        weight_reg = weight + torch.where(regularise & grid.inside, prior, 0.0)
    else:
        weight_reg = weight
    mean_weight = _padded_shell_mean(weight_reg, grid)  # (k, f)
    floor = _expand_shells(mean_weight, grid) / 1000.0
    denominator = torch.maximum(weight_reg, floor)
    positive = (denominator > 0) & grid.inside
    safe = torch.where(positive, denominator, torch.ones_like(denominator))
    dft = torch.where(positive, data / safe, torch.zeros_like(data))

    images = _padded_to_image(dft, n, pad)  # (k, N, N)
    images = soft_mask_outside_2d(images, n / 2.0, 3.0)
    return images / gridding_correction_map(n, pad, dtype=dtype, device=device)


def _check_shapes(state: Class2DState, stats: Class2DStatistics) -> None:
    k, big = state.n_classes, state.padded_size
    expected = (2, k, big, big // 2 + 1)
    if tuple(stats.data.shape) != expected or tuple(stats.weight.shape) != expected:
        raise ValueError(
            f"statistics accumulators have shapes {tuple(stats.data.shape)} / "
            f"{tuple(stats.weight.shape)}, expected {expected} for this state"
        )
    if tuple(stats.class_weight.shape) != (k,):
        raise ValueError(
            f"class_weight must be ({k},), got {tuple(stats.class_weight.shape)}"
        )
    if tuple(stats.noise_power.shape) != tuple(state.sigma2_noise.shape):
        raise ValueError(
            f"noise_power must be {tuple(state.sigma2_noise.shape)}, "
            f"got {tuple(stats.noise_power.shape)}"
        )
    if tuple(stats.scale_xa.shape) != tuple(state.scale.shape):
        raise ValueError(
            f"scale_xa must be {tuple(state.scale.shape)}, "
            f"got {tuple(stats.scale_xa.shape)}"
        )


# ------------------------------------------------------------ other parameters
@torch.no_grad()
def update_other_parameters(
    state: Class2DState,
    stats: Class2DStatistics,
    mu: float = 0.0,
    *,
    do_norm: bool = True,
    do_scale: bool = True,
    fix_sigma_noise: bool = False,
    fix_sigma_offset: bool = False,
    min_sigma2_offset_angstrom2: float | None = 2.0,
) -> None:
    """Update π, μ_k, σ²_off, σ²_noise, scales and avg_norm (§A.7, §A.8.7), in place.

    Every parameter becomes ``mu · old + (1 − mu) · estimate`` (``mu = 0``: EM, or a
    VDAM iteration over all particles). With Σw the total class weight:

    * avg_norm = Σ norm / Σw;
    * s_g = XA_g / AA_g (1 for groups with AA = 0, as RELION), then clamped to
      ``[median/5, 5·median]`` and divided by their particle-count-weighted mean;
      skipped for a single group;
    * π_k = w_k / Σw, renormalised to sum 1;
    * μ_k = Σ w·o / w_k (Å), reset to 0 for classes without weight;
    * σ²_off = Σ w·|μ − o|² / (2Σw), floored at ``min_sigma2_offset_angstrom2``;
    * σ²_o(ires) = noise_power / (2·noise_weight·Npix(ires)) for optics groups with
      weight; values < 1e−14 are replaced by the previous shell.

    Also stores the log-likelihood and the average Pmax. Nothing changes when the
    statistics carry no weight.

    Parameters
    ----------
    state
        Model state (updated in place).
    stats
        Summed statistics.
    mu
        Momentum in ``[0, 1)``.
    do_norm, do_scale
        Update ``avg_norm`` / ``scale``.
    fix_sigma_noise, fix_sigma_offset
        Keep σ²_noise / σ²_off fixed.
    min_sigma2_offset_angstrom2
        Floor of σ²_off (RELION 5: 2 Å²); None disables it (RELION 4).

    Raises
    ------
    ValueError
        If ``mu`` is outside ``[0, 1)``.
    """
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"mu must be in [0, 1), got {mu}")
    dtype = state.class_prior.dtype
    class_weight = stats.class_weight.to(dtype)
    total = float(stats.class_weight.sum())
    if total <= 0:
        return

    def ema(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return mu * old + (1.0 - mu) * new.to(old.dtype)

    if do_norm:
        state.avg_norm.copy_(ema(state.avg_norm, stats.norm_sum.to(dtype) / total))

    if do_scale and state.n_scale_groups > 1:
        xa = stats.scale_xa.to(dtype)
        aa = stats.scale_aa.to(dtype)
        has = aa > 0
        # RELION (maximizationOtherParameters): a group without reference power
        # in this batch contributes the estimate 1
        estimate = torch.where(
            has, xa / torch.where(has, aa, 1.0), torch.ones_like(state.scale)
        )
        scale = ema(state.scale, estimate)
        median = scale.sort().values[scale.numel() // 2]
        if median > 0:
            scale = scale.clamp(min=float(median) / 5.0, max=5.0 * float(median))
        counts = state.scale_group_particle_count.to(dtype)
        mean = (counts * scale).sum() / counts.sum().clamp(min=1e-30)
        if mean > 0:
            scale = scale / mean
        state.scale.copy_(scale)

    prior = ema(state.class_prior, class_weight / total).clamp(min=0.0)
    state.class_prior.copy_(prior / prior.sum().clamp(min=1e-30))

    has_weight = class_weight > 0
    offsets = (
        stats.offset_sum_angstrom.to(dtype)
        / torch.where(has_weight, class_weight, 1.0)[:, None]
    )
    offsets = ema(state.class_offset_prior_angstrom, offsets)
    state.class_offset_prior_angstrom.copy_(
        torch.where(has_weight[:, None], offsets, torch.zeros_like(offsets))
    )

    if not fix_sigma_offset:
        sigma2_offset = ema(
            state.sigma2_offset_angstrom2,
            stats.sigma2_offset_sum.to(dtype) / (2.0 * total),
        )
        if min_sigma2_offset_angstrom2 is not None:
            sigma2_offset = sigma2_offset.clamp(min=float(min_sigma2_offset_angstrom2))
        state.sigma2_offset_angstrom2.copy_(sigma2_offset)

    if not fix_sigma_noise:
        n = state.box_size
        npix = shell_pixel_counts((n, n), device=state.sigma2_noise.device).to(dtype)
        noise_weight = stats.noise_weight.to(dtype)  # (g,)
        group_has = noise_weight > 0
        denominator = 2.0 * torch.where(group_has, noise_weight, 1.0)[:, None] * npix
        estimate = stats.noise_power.to(dtype) / denominator  # (g, f)
        sigma2 = ema(state.sigma2_noise, estimate)
        sigma2 = _fill_shells(sigma2, sigma2 >= _MIN_SIGMA2_NOISE)
        state.sigma2_noise.copy_(
            torch.where(group_has[:, None], sigma2, state.sigma2_noise)
        )

    state.log_likelihood.copy_(stats.log_likelihood.to(dtype))
    state.average_pmax.copy_(stats.pmax_sum.to(dtype) / total)


# ---------------------------------------------------------------------- VDAM update
@torch.no_grad()
def vdam_update(
    state: Class2DState,
    stats: Class2DStatistics,
    step_size: float,
    tau2_fudge: float,
    mu: float,
    *,
    allow_class_replacement: bool = False,
    class_inactivity_threshold: float = 0.0,
    expand_class: str = "largest",
    do_norm: bool = True,
    do_scale: bool = True,
    fix_sigma_noise: bool = False,
    fix_sigma_offset: bool = False,
    min_sigma2_offset_angstrom2: float | None = 2.0,
) -> VdamUpdateResult:
    """VDAM M-step (§A.8.5–§A.8.7): moment update, class replacement, image step.

    For every class with π_k > 0 and a non-empty half-0 accumulator, on the padded grid
    inside ``r < r_max = current_size / 2``:

    1. ``g_h = D_h / max(1, W_h)`` for both pseudo half-sets ``h``;
    2. ``m1_h ← 0.9·m1_h + 0.1·g_h`` (``m1_h ← g_h`` while it is identically zero);
    3. ``m2 ← 0.999·m2 + 0.001·|g_1 − g_0|² / (|(g_0 + g_1)/2|² + 1e−12)``;
    4. ``d = ((m1_0 + m1_1)/2) / (sqrt(m2) + 1e−12)``;

    (steps 2–4 only for ``r < r_max``, as RELION: moments beyond the current size
    keep their values and ``d`` is zero there, also in the class error);
    5. ``ν(ires)`` = shell mean of ``|m1_0 − m1_1|``; class error
       ``e_k = mean|d|²·π_k``.

    In the replacement window (``allow_class_replacement``) with a positive
    ``class_inactivity_threshold`` c, the least populated class (argmin π) is
    overwritten by a copy of the expanded class if ``π_drop < c / K_active`` (image, both first moments with half 0 ×0.9, second
    moment, π, τ², SSNR, completeness, class age ×0.9) and takes no step this
    iteration. Each other updated class then
    steps::

        F ← F + step_k·(f·d − (1 − f)·F),   step_k = step·(1 − exp(−(3K + 10)·π_k)),
        f = snr / (1 + snr),  snr = 2·T·A(ires) / ν(ires)  (f = 1 where ν = 0),

    with ``A`` the shell mean of ``|F|`` and ``F`` the padded transform of the current
    image (no gridding correction); ``F`` is zero beyond ``r_max``. The new image is the
    windowed inverse transform with its corners background-replaced. Classes that are
    not updated keep their image. SSNR (§A.8.6) comes from the half-0 weights and the τ²
    of the current images. Finally :func:`update_other_parameters` with ``mu``.

    Parameters
    ----------
    state
        Model state, updated in place (including ``moment1``, ``moment2``,
        ``class_age``, ``step_size`` and ``tau2_fudge``).
    stats
        Summed VDAM statistics (``data`` holds residual back-projections).
    step_size
        Base step size of this iteration (:meth:`VdamSchedule.step_size`).
    tau2_fudge
        T of this iteration (:meth:`VdamSchedule.tau2_fudge`), > 0.
    mu
        Momentum of the other parameters (:meth:`VdamSchedule.momentum`).
    allow_class_replacement
        Whether this iteration is in the replacement window.
    class_inactivity_threshold
        c (RELION ``--class_inactivity_threshold``; GUI 0.1); 0 disables replacement.
    expand_class
        Which class a re-seeded class copies: ``"largest"`` (the most populated class,
        argmax π; cryoavg's default) or ``"gradient"`` (RELION's rule: the largest class
        error ``e_k``). RELION's rule often picks a heterogeneous junk class, whose
        copy empties again; splitting the most populated class instead lets a class
        that averages several views divide into them (on the public 70S case:
        13 distinct views instead of 5).
    do_norm, do_scale, fix_sigma_noise, fix_sigma_offset, min_sigma2_offset_angstrom2
        See :func:`update_other_parameters`.

    Returns
    -------
    VdamUpdateResult
        Replacement and class-error information.

    Raises
    ------
    ValueError
        For a non-positive ``tau2_fudge``, a negative step or threshold, or statistics
        that do not match the state.
    """
    if tau2_fudge <= 0:
        raise ValueError(f"tau2_fudge must be > 0, got {tau2_fudge}")
    if step_size < 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if class_inactivity_threshold < 0:
        raise ValueError(
            f"class_inactivity_threshold must be >= 0, got {class_inactivity_threshold}"
        )
    if expand_class not in EXPAND_CLASS_RULES:
        raise ValueError(
            f"expand_class must be one of {EXPAND_CLASS_RULES}, got {expand_class!r}"
        )
    _check_shapes(state, stats)
    n, pad, k = state.box_size, state.pad, state.n_classes
    dtype = state.class_images.dtype
    cdtype = state.moment1.dtype
    device = state.class_images.device
    r_max = int(state.current_size) / 2.0
    grid = _padded_grid(n, pad, r_max, device=device, dtype=dtype)
    inside = grid.inside  # (P, P//2+1)
    prior_old = state.class_prior.clone()

    # §A.8.6: τ² of the current images and SSNR from the half-0 weights
    tau2 = class_power_spectrum(state.class_images, pad, int(state.current_size))
    weight = stats.weight.to(dtype)  # (2, k, P, P//2+1)
    ssnr, completeness, sigma2_class = _ssnr_arrays(
        weight[0], tau2, tau2_fudge, grid, pad, r_max
    )

    # steps 1-6 (vectorised over classes, masked to active ones)
    active = (prior_old > 0) & (weight[0].sum(dim=(-2, -1)) > 0)  # (k,)
    data = stats.data.to(cdtype)
    gradient = data / weight.clamp(min=1.0) * inside  # (2, k, P, P//2+1)
    moment1 = state.moment1  # (2, k, P, P//2+1) view on the buffer
    first_time = (moment1 == 0).all(dim=-1).all(dim=-1)  # (2, k)
    # RELION (getFristMoment / getSecondMoment / applyMomenta) only touches voxels
    # with r < r_max: moments beyond the current size keep their values, and the
    # direction is zero there
    new_moment1 = torch.where(
        inside,
        torch.where(
            first_time[..., None, None], gradient, 0.9 * moment1 + 0.1 * gradient
        ),
        moment1,
    )
    noise = gradient[1] - gradient[0]
    signal = 0.5 * (gradient[0] + gradient[1])
    ratio = (noise.real**2 + noise.imag**2) / (signal.real**2 + signal.imag**2 + 1e-12)
    new_moment2 = torch.where(
        inside, 0.999 * state.moment2 + 0.001 * ratio, state.moment2
    )  # (k, P, P//2+1)
    direction = (
        0.5 * (new_moment1[0] + new_moment1[1]) / (new_moment2.sqrt() + 1e-12) * inside
    )
    half_difference = (new_moment1[0] - new_moment1[1]).abs()
    nu = _padded_shell_mean(half_difference, grid)  # (k, f)
    class_error = (direction.real**2 + direction.imag**2).mean(dim=(-2, -1)) * prior_old
    class_error = torch.where(active, class_error, torch.zeros_like(class_error))

    active_b = active[:, None, None]
    moment1.copy_(torch.where(active_b[None], new_moment1, moment1))
    state.moment2.copy_(torch.where(active_b, new_moment2, state.moment2))
    state.class_age.add_(stats.class_weight.to(dtype))
    state.tau2.copy_(tau2)
    state.ssnr.copy_(ssnr)
    state.fourier_completeness.copy_(completeness)
    state.sigma2_class.copy_(sigma2_class)

    # class replacement (at most one per iteration)
    expanded: int | None = None
    replaced: int | None = None
    if (
        allow_class_replacement
        and class_inactivity_threshold > 0
        and bool(active.any())
    ):
        n_active = int((prior_old > 0).sum())
        drop = int(torch.argmin(prior_old))
        if expand_class == "largest":
            expand = int(torch.argmax(prior_old))
        else:
            expand = int(torch.argmax(class_error))
        threshold = class_inactivity_threshold / max(n_active, 1)
        if drop != expand and float(prior_old[drop]) < threshold:
            expanded, replaced = expand, drop
            state.class_images[drop] = state.class_images[expand]
            moment1[:, drop] = moment1[:, expand]
            moment1[0, drop] *= 0.9
            state.moment2[drop] = state.moment2[expand]
            state.class_prior[drop] = state.class_prior[expand]
            state.tau2[drop] = state.tau2[expand]
            state.ssnr[drop] = state.ssnr[expand]
            state.fourier_completeness[drop] = state.fourier_completeness[expand]
            state.sigma2_class[drop] = state.sigma2_class[expand]
            state.class_age[drop] = 0.9 * state.class_age[expand]
            # the copy also takes the expanded class's offset prior: left at the
            # dropped class's old (often off-centre junk) position, the Gaussian offset
            # prior penalises the copy for every particle and it empties again
            state.class_offset_prior_angstrom[drop] = state.class_offset_prior_angstrom[
                expand
            ]

    # steps 7-10: image update of the active classes (except a replaced one)
    updated = active.clone()
    if replaced is not None:
        updated[replaced] = False
    if bool(updated.any()):
        current = padded_dft_2d(state.class_images, pad, r_max=r_max)  # (k, P, P//2+1)
        amplitude = _padded_shell_mean(current.abs(), grid)  # (k, f)
        has_nu = nu > 0
        snr = 2.0 * tau2_fudge * amplitude / torch.where(has_nu, nu, 1.0)
        fsc = torch.where(has_nu, snr / (1.0 + snr), torch.ones_like(snr)).clamp(
            0.0, 1.0
        )
        fsc_voxel = _expand_shells(fsc, grid)  # (k, P, P//2+1), 0 outside
        class_step = step_size * (
            1.0 - torch.exp(-(3.0 * k + 10.0) * prior_old)
        )  # (k,)
        step_voxel = class_step[:, None, None]
        new_dft = current + step_voxel * (
            fsc_voxel * direction - (1.0 - fsc_voxel) * current
        )
        new_dft = new_dft * inside
        images = _padded_to_image(new_dft, n, pad)
        images = soft_mask_outside_2d(images, n / 2.0, 3.0)
        images = torch.nan_to_num(images, nan=0.0, posinf=0.0, neginf=0.0)
        state.class_images.copy_(
            torch.where(updated[:, None, None], images, state.class_images)
        )

    state.step_size.fill_(float(step_size))
    state.tau2_fudge.fill_(float(tau2_fudge))
    update_other_parameters(
        state,
        stats,
        mu=mu,
        do_norm=do_norm,
        do_scale=do_scale,
        fix_sigma_noise=fix_sigma_noise,
        fix_sigma_offset=fix_sigma_offset,
        min_sigma2_offset_angstrom2=min_sigma2_offset_angstrom2,
    )
    return VdamUpdateResult(
        expanded_class=expanded,
        replaced_class=replaced,
        class_error=class_error,
        updated=updated,
    )


def vdam_update_for_iteration(
    state: Class2DState,
    stats: Class2DStatistics,
    schedule: VdamSchedule,
    iteration: int,
    *,
    class_inactivity_threshold: float = 0.0,
    **kwargs: bool | float | None,
) -> VdamUpdateResult:
    """:func:`vdam_update` with step, T, μ and the replacement window from a schedule.

    Parameters
    ----------
    state, stats
        As :func:`vdam_update`.
    schedule
        The run's :class:`~cryoavg.class2d.schedule.VdamSchedule`.
    iteration
        Current iteration (1-based).
    class_inactivity_threshold
        c (0 disables class replacement).
    **kwargs
        Further keyword options of :func:`vdam_update`.

    Returns
    -------
    VdamUpdateResult
    """
    return vdam_update(
        state,
        stats,
        schedule.step_size(iteration),
        schedule.tau2_fudge(iteration),
        schedule.momentum(iteration),
        allow_class_replacement=schedule.in_replacement_window(iteration),
        class_inactivity_threshold=class_inactivity_threshold,
        **kwargs,  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------- post-M-step (§A.9)
@torch.no_grad()
def solvent_flatten(
    state: Class2DState, mask_radius_px: float, soft_edge_px: float = 5.0
) -> None:
    """Multiply every class image by the soft circular mask (§A.9.1), in place.

    Parameters
    ----------
    state
        Model state.
    mask_radius_px
        Mask radius ``D / (2p)`` in pixels.
    soft_edge_px
        Width of the raised-cosine edge (RELION ``--maskedge``, 5 px); outside
        ``radius + edge`` the images become exactly 0.
    """
    size = state.box_size
    mask = circular_mask_2d(
        (size, size),
        mask_radius_px,
        soft_edge_px,
        device=state.class_images.device,
        dtype=state.class_images.dtype,
    )
    state.class_images.mul_(mask)


@torch.no_grad()
def center_classes(
    state: Class2DState,
    offset_range_px: float,
    *,
    min_shift_px: float = 0.0,
    shift_moments: bool = False,
) -> torch.Tensor:
    """Centre each class on the centre of mass of its positive pixels (§A.9.2).

    The centre of mass ``c`` (``(y, x)`` px relative to pixel ``N // 2``) is scaled down
    to length ``offset_range_px`` if longer, and the image is translated by ``−c``
    (bilinear, zero fill, no wrap). Classes with ``|c| < min_shift_px`` (VDAM:
    ``max(0.01·D/p, 2)``) or without positive pixels are left untouched.

    With ``shift_moments`` (VDAM) the first moments of *both* pseudo half-sets are
    phase-shifted by the same translation. RELION instead overwrites the half-1 moment
    with the shifted half-0 moment (an apparent bug, spec §A.11); cryoavg deliberately
    shifts each half's own moment.

    Parameters
    ----------
    state
        Model state.
    offset_range_px
        Maximum length of the applied shift (the search range, pixels).
    min_shift_px
        Shifts shorter than this are skipped.
    shift_moments
        Also translate the VDAM first moments.

    Returns
    -------
    torch.Tensor
        ``(k, 2)`` applied translations ``(y, x)`` in pixels (``−c``, 0 if skipped).
    """
    images = state.class_images
    com = center_of_mass_2d(images, positive_only=True)  # (k, 2), 0 without mass
    length = torch.linalg.vector_norm(com, dim=-1)
    if offset_range_px >= 0:
        factor = torch.where(
            length > offset_range_px,
            offset_range_px / torch.where(length > 0, length, 1.0),
            1.0,
        )
        com = com * factor[:, None]
        length = torch.linalg.vector_norm(com, dim=-1)
    apply = (length >= min_shift_px) & (length > 0)
    shifts = torch.where(apply[:, None], -com, torch.zeros_like(com))
    if bool(apply.any()):
        moved = _translate_bilinear(images, shifts)
        images.copy_(torch.where(apply[:, None, None], moved, images))
        if shift_moments:
            big = state.padded_size
            moment1 = state.moment1  # (2, k, P, P//2+1)
            # the padded grid has the same pixel size: the same shift in pixels
            moment1.copy_(phase_shift_dft_2d(moment1, shifts, (big, big)))
    return shifts


@torch.no_grad()
def update_resolution(
    state: Class2DState, *, minres: int = 5, incr_size: int = 10
) -> int:
    """Current resolution and image size from the SSNR (§A.9.3), in place.

    For each class the first shell ``ires ≥ 1`` with SSNR < 1, minus one (``N/2 − 1``
    if there is none); ``maxres`` is the maximum over classes, at least ``minres``.
    ``current_size = min(N, 2·(maxres + incr_size))``.

    Parameters
    ----------
    state
        Model state (``ssnr`` is read; ``current_size`` and
        ``current_resolution_shell`` are written).
    minres
        Lower bound of ``maxres`` (RELION ``--minres_map``, 5).
    incr_size
        Extra shells beyond ``maxres`` (RELION ``--incr_size``, 10).

    Returns
    -------
    int
        ``maxres``; the current resolution is ``N·p / maxres`` Å.
    """
    n = state.box_size
    half = n // 2
    ssnr = state.ssnr[:, 1:half]  # shells 1 … N/2 − 1
    below = ssnr < 1.0
    first = torch.where(
        below.any(dim=-1),
        below.to(torch.int64).argmax(dim=-1) + 1,
        torch.full((state.n_classes,), half, device=ssnr.device, dtype=torch.int64),
    )
    maxres = max(int((first - 1).max()) if first.numel() else 0, 0)
    maxres = max(maxres, int(minres))
    current_size = min(n, 2 * (maxres + int(incr_size)))
    state.current_size.fill_(current_size)
    state.current_resolution_shell.fill_(maxres)
    return maxres


def estimated_resolution_angstrom(
    ssnr: torch.Tensor, box_size: int, pixel_size: float
) -> torch.Tensor:
    """Per-class estimated resolution (``rlnEstimatedResolution``, §A.10.3).

    Parameters
    ----------
    ssnr
        ``(…, f)`` SSNR spectra.
    box_size
        ``N`` in pixels.
    pixel_size
        Pixel size in Å.

    Returns
    -------
    torch.Tensor
        ``(…)`` ``N·p / maxres`` Å, with ``maxres`` the last shell before the first
        shell with SSNR < 1 (the last shell if none); ``inf`` when ``maxres = 0``
        (e.g. empty classes).
    """
    below = ssnr < 1.0
    n_shells = ssnr.shape[-1]
    first = torch.where(
        below.any(dim=-1),
        below.to(torch.int64).argmax(dim=-1),
        torch.full(ssnr.shape[:-1], n_shells, device=ssnr.device, dtype=torch.int64),
    )
    maxres = (first - 1).to(ssnr.dtype)
    value = box_size * pixel_size / maxres.clamp(min=1.0)
    return torch.where(maxres > 0, value, torch.full_like(value, math.inf))
