"""Initialisation of reference-free 2D classification (iteration 0, spec §A.4).

Noise spectra from a subset of particles, random-ψ low-resolution averages as initial
class images, blob re-initialisation, the initial low-pass ``ini_high``, τ², SSNR and
the current image size of iteration 1.

Conventions
-----------
* Images ``(n, N, N)`` are real space with the origin at pixel ``N // 2``; CTFs are
  ``(n, N, N // 2 + 1)`` on the un-shifted rfft half plane (as ``dft_2d``).
* Spectra are ``(…, f)``, ``f = N // 2 + 1``, indexed by ``ires = round(|q|)``; σ² and
  τ² are variances per real/imaginary component of the RELION-normalised transform
  (forward divided by ``N²``). For white noise of per-pixel variance ``v`` this is
  ``v / (2N²)``.
* Random numbers come from a seeded :class:`torch.Generator` (RELION's C ``rand()`` is
  not reproduced; the images are statistically equivalent, not bit-identical).
* The selection of at most 1000 particles per optics group (RELION
  ``--nr_parts_sigma2noise``) is the caller's job: pass the chosen subset.
"""

import math

import torch

from cryoavg.class2d.mstep import _fill_shells
from cryoavg.class2d.state import Class2DState
from cryoavg.ops.fourier import (
    dft_2d,
    idft_2d,
    lowpass_filter,
    power_spectrum_1d,
    shell_average,
    shell_index,
)
from cryoavg.ops.masks import soft_mask_outside_2d

__all__ = [
    "blob_class_images",
    "estimate_noise_spectra",
    "ini_high_angstrom",
    "initial_class_images",
    "initial_current_size",
    "initial_ssnr",
    "initial_tau2",
    "initialise_state",
]


def _relion_round(value: float) -> int:
    """Round half away from zero (RELION ``ROUND``) for non-negative values."""
    return math.floor(value + 0.5)


def ini_high_angstrom(box_size: int, pixel_size: float) -> float:
    """Default initial low-pass resolution without a reference (§A.4.3).

    Parameters
    ----------
    box_size
        ``N`` in pixels.
    pixel_size
        Pixel size in Å.

    Returns
    -------
    float
        ``N·p / round(0.07·N)`` Å (the shell ``round(0.07·N)``, at least shell 1).
    """
    if box_size < 1 or pixel_size <= 0:
        raise ValueError(f"invalid box_size={box_size} or pixel_size={pixel_size}")
    shell = max(1, _relion_round(0.07 * box_size))
    return box_size * pixel_size / shell


def initial_current_size(
    box_size: int, pixel_size: float, ini_high: float, incr_size: int = 10
) -> int:
    """Current image size of iteration 1 (§A.4.8).

    Parameters
    ----------
    box_size
        ``N`` in pixels.
    pixel_size
        Pixel size in Å.
    ini_high
        Initial low-pass resolution in Å.
    incr_size
        RELION ``--incr_size`` (10 shells).

    Returns
    -------
    int
        ``min(N, 2·(round(N·p / ini_high) + incr_size))``.
    """
    if ini_high <= 0:
        raise ValueError(f"ini_high must be > 0, got {ini_high}")
    maxres = _relion_round(box_size * pixel_size / ini_high)
    return int(min(box_size, 2 * (maxres + incr_size)))


def estimate_noise_spectra(
    images: torch.Tensor,
    optics_group: torch.Tensor,
    n_groups: int,
    mask_radius_px: float,
    soft_edge_px: float = 5.0,
    zero_mask: bool = True,
) -> torch.Tensor:
    """Initial noise spectra σ²_o(ires) per optics group (§A.4.4).

    ``σ²_o = Σ_{i∈o} PS_i / (2·n_o) − PS(M̄) / 2`` where ``PS_i`` is the shell mean of
    ``|F_i|²`` over the full rfft half plane and ``M̄`` the mean of all images.
    Non-positive values are replaced by the previous shell (the next positive one for
    leading shells). Optics groups without images get the estimate from all images.

    Parameters
    ----------
    images
        ``(n, N, N)`` particle images (the noise-estimation subset).
    optics_group
        ``(n,)`` int, 0-based optics group of each image.
    n_groups
        ``g``, number of optics groups.
    mask_radius_px
        Radius of the particle mask (``D / (2p)``) in pixels.
    soft_edge_px
        Width of the mask edge (``--maskedge``, 5 px).
    zero_mask
        Background-replace each image outside the mask first (``--zero_mask``).

    Returns
    -------
    torch.Tensor
        ``(g, f)`` σ² per real/imaginary component.

    Raises
    ------
    ValueError
        For inconsistent shapes, no images or out-of-range group indices.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (n, N, N), got {tuple(images.shape)}")
    n_images, size = images.shape[0], images.shape[-1]
    if n_images < 1:
        raise ValueError("estimate_noise_spectra needs at least one image")
    if tuple(optics_group.shape) != (n_images,):
        raise ValueError(
            f"optics_group must be ({n_images},), got {tuple(optics_group.shape)}"
        )
    group = optics_group.to(device=images.device, dtype=torch.long)
    if bool((group < 0).any()) or bool((group >= n_groups).any()):
        raise ValueError(f"optics_group values must lie in [0, {n_groups})")
    work = (
        soft_mask_outside_2d(images, mask_radius_px, soft_edge_px)
        if zero_mask
        else images
    )
    n_shells = size // 2 + 1
    shells = shell_index((size, size), device=images.device)
    dft = dft_2d(work)  # (n, N, N//2+1)
    power = shell_average(dft.real**2 + dft.imag**2, shells, n_shells)  # (n, f)
    mean_dft = dft_2d(work.mean(dim=0))
    mean_power = shell_average(mean_dft.real**2 + mean_dft.imag**2, shells, n_shells)

    sums = power.new_zeros(n_groups, n_shells).index_add_(0, group, power)  # (g, f)
    counts = power.new_zeros(n_groups).index_add_(
        0, group, torch.ones_like(group, dtype=power.dtype)
    )
    overall = power.sum(dim=0) / (2.0 * n_images) - mean_power / 2.0  # (f,)
    per_group = sums / (2.0 * counts.clamp(min=1.0))[:, None] - mean_power / 2.0
    sigma2 = torch.where(counts[:, None] > 0, per_group, overall.expand_as(per_group))
    return _fill_shells(sigma2, sigma2 > 0)


def _sample_half_plane(
    values: torch.Tensor, y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Bilinear samples of rfft half planes at real frequencies (Hermitian symmetry).

    Parameters
    ----------
    values
        ``(n, N, N//2+1)`` real or complex half planes (un-shifted).
    y, x
        ``(n, p)`` frequencies (``N``-grid units); corners with negative ``x`` are read
        from ``(−y, −x)`` and conjugated.

    Returns
    -------
    torch.Tensor
        ``(n, p)`` interpolated values.
    """
    size, n_cols = values.shape[-2], values.shape[-1]
    batch = torch.arange(values.shape[0], device=values.device)[:, None]  # (n, 1)
    y0, x0 = torch.floor(y), torch.floor(x)
    fy, fx = y - y0, x - x0
    out = torch.zeros(y.shape, dtype=values.dtype, device=values.device)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yi = (y0 + dy).long()
        xi = (x0 + dx).long()
        mirror = xi < 0
        yi = torch.where(mirror, -yi, yi)
        xi = torch.where(mirror, -xi, xi).clamp(max=n_cols - 1)
        corner = values[batch, torch.remainder(yi, size), xi]  # (n, p)
        if corner.is_complex():
            corner = torch.where(mirror, corner.conj(), corner)
        wy = fy if dy else 1.0 - fy
        wx = fx if dx else 1.0 - fx
        out = out + (wy * wx).to(corner.real.dtype) * corner
    return out


def blob_class_images(
    class_images: torch.Tensor,
    diameter_px: float,
    *,
    generator: torch.Generator | None = None,
    n_blobs: int = 40,
) -> torch.Tensor:
    """Blob re-initialisation of class images (§A.4.6).

    Per class, ``n_blobs`` positive and ``n_blobs`` negative Gaussian blobs with centres
    ``~ Normal(N // 2, D/7)`` in y and x, amplitude ``|class image|`` at the (rounded,
    clipped) centre pixel and profile ``exp(−|x − x₀|²·(10/D)²)``; the new image is
    ``B₊ − B₋/2`` rescaled to the standard deviation of the input class image.

    Parameters
    ----------
    class_images
        ``(k, N, N)`` current class images.
    diameter_px
        Particle diameter ``D`` in pixels (> 0).
    generator
        Seeded CPU generator (None: torch's global RNG).
    n_blobs
        Blobs of each sign per class (RELION: 40).

    Returns
    -------
    torch.Tensor
        ``(k, N, N)`` blob images with the per-class std of ``class_images`` (zero for
        classes whose input is constant).
    """
    if diameter_px <= 0:
        raise ValueError(f"diameter_px must be > 0, got {diameter_px}")
    k, size = class_images.shape[0], class_images.shape[-1]
    device, dtype = class_images.device, class_images.dtype
    noise = torch.randn((k, 2, n_blobs, 2), generator=generator, dtype=torch.float64)
    centres = (size // 2 + noise * (diameter_px / 7.0)).to(device=device, dtype=dtype)
    pixel = torch.floor(centres + 0.5).long().clamp(0, size - 1)  # (k, 2, b, 2)
    classes = torch.arange(k, device=device)[:, None, None]
    amplitude = class_images.abs()[classes, pixel[..., 0], pixel[..., 1]]  # (k, 2, b)
    inv_width2 = (10.0 / diameter_px) ** 2
    axis = torch.arange(size, device=device, dtype=dtype)
    gy = torch.exp(-((axis - centres[..., 0, None]) ** 2) * inv_width2)  # (k, 2, b, N)
    gx = torch.exp(-((axis - centres[..., 1, None]) ** 2) * inv_width2)  # (k, 2, b, N)
    blobs = torch.einsum("ksb,ksby,ksbx->ksyx", amplitude, gy, gx)  # (k, 2, N, N)
    new = blobs[:, 0] - 0.5 * blobs[:, 1]
    std_old = class_images.std(dim=(-2, -1))
    std_new = new.std(dim=(-2, -1))
    factor = torch.where(
        std_new > 0, std_old / torch.where(std_new > 0, std_new, 1.0), 0.0
    )
    return new * factor[:, None, None]


def initial_class_images(
    images: torch.Tensor,
    ctf: torch.Tensor | None,
    n_classes: int,
    seed: int,
    ini_high_angstrom: float,
    pixel_size: float,
    mask_radius_px: float,
    *,
    soft_edge_px: float = 5.0,
    zero_mask: bool = True,
    init_blobs: bool = True,
) -> torch.Tensor:
    """Initial class images without a reference (§A.4.4–§A.4.6).

    Image ``j`` goes to class ``j mod K`` with a random ψ. Its transform, restricted to
    ``|q| ≤ round(0.07·N)/2``, is multiplied by the CTF and inserted at ψ (sampled
    bilinearly in the rotated frame); each class is ``Σ CTF·X / Σ CTF²`` without
    regularisation. The classes are low-pass filtered at ``ini_high`` (raised cosine of
    2 shells), optionally replaced by blob images (:func:`blob_class_images`) and
    low-pass filtered again, and finally background-replaced outside the mask.

    Parameters
    ----------
    images
        ``(n, N, N)`` particle images (the noise-estimation subset; ``n ≥ K`` for every
        class to receive images).
    ctf
        ``(n, N, N//2+1)`` CTF of each image on the rfft half plane, or None (no CTF).
    n_classes
        ``K``.
    seed
        Seed of the random ψ and blob positions.
    ini_high_angstrom
        Initial low-pass resolution in Å (:func:`ini_high_angstrom`).
    pixel_size
        Pixel size in Å.
    mask_radius_px
        Particle mask radius ``D / (2p)`` in pixels.
    soft_edge_px
        Mask edge width (5 px).
    zero_mask
        Background-replace the particle images outside the mask first.
    init_blobs
        Blob re-initialisation (RELION default; ``--no_init_blobs`` switches it off).

    Returns
    -------
    torch.Tensor
        ``(K, N, N)`` class images.

    Raises
    ------
    ValueError
        For inconsistent shapes or non-positive sizes.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (n, N, N), got {tuple(images.shape)}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if mask_radius_px <= 0 or pixel_size <= 0 or ini_high_angstrom <= 0:
        raise ValueError("mask_radius_px, pixel_size and ini_high_angstrom must be > 0")
    n_images, size = images.shape[0], images.shape[-1]
    device, dtype = images.device, images.dtype
    if ctf is not None and tuple(ctf.shape) != (n_images, size, size // 2 + 1):
        raise ValueError(
            f"ctf must be ({n_images}, {size}, {size // 2 + 1}), got {tuple(ctf.shape)}"
        )
    generator = torch.Generator(device="cpu").manual_seed(int(seed))

    work = (
        soft_mask_outside_2d(images, mask_radius_px, soft_edge_px)
        if zero_mask
        else images
    )
    dft = dft_2d(work)  # (n, N, N//2+1)
    ctf_half = torch.ones_like(dft.real) if ctf is None else ctf.to(dtype)
    weighted = dft * ctf_half
    ctf2 = ctf_half**2

    # target frequencies: non-redundant half plane inside the small window
    radius = max(1, _relion_round(0.07 * size)) / 2.0
    reach = math.ceil(radius)
    ky, kx = torch.meshgrid(
        torch.arange(-reach, reach + 1, device=device),
        torch.arange(0, reach + 1, device=device),
        indexing="ij",
    )
    keep = (ky**2 + kx**2 <= radius**2) & ((kx > 0) | (ky >= 0))
    ky, kx = ky[keep], kx[keep]  # (p,)
    psi = torch.rand(n_images, generator=generator, dtype=torch.float64) * (
        2.0 * math.pi
    )
    cos = torch.cos(psi).to(device=device, dtype=dtype)[:, None]
    sin = torch.sin(psi).to(device=device, dtype=dtype)[:, None]
    kyf, kxf = ky.to(dtype)[None], kx.to(dtype)[None]
    src_x = cos * kxf - sin * kyf  # (n, p)
    src_y = sin * kxf + cos * kyf
    data = _sample_half_plane(weighted, src_y, src_x)  # (n, p) complex
    weight = _sample_half_plane(ctf2, src_y, src_x)  # (n, p)

    classes = torch.arange(n_images, device=device) % n_classes
    class_data = data.new_zeros(n_classes, ky.numel()).index_add_(0, classes, data)
    class_weight = weight.new_zeros(n_classes, ky.numel()).index_add_(
        0, classes, weight
    )
    has = class_weight > 0
    values = torch.where(
        has,
        class_data / torch.where(has, class_weight, 1.0),
        torch.zeros_like(class_data),
    )
    half = dft.new_zeros(n_classes, size, size // 2 + 1)
    half[:, torch.remainder(ky, size), kx] = values
    column = (kx == 0) & (ky > 0)  # fill the redundant half column by symmetry
    half[:, torch.remainder(-ky[column], size), 0] = values[:, column].conj()
    classes_img = idft_2d(half, (size, size))  # (K, N, N)

    classes_img = lowpass_filter(classes_img, ini_high_angstrom, pixel_size)
    if init_blobs:
        classes_img = blob_class_images(
            classes_img, 2.0 * mask_radius_px, generator=generator
        )
        classes_img = lowpass_filter(classes_img, ini_high_angstrom, pixel_size)
    return soft_mask_outside_2d(classes_img, mask_radius_px, soft_edge_px)


def initial_tau2(class_images: torch.Tensor, tau2_fudge: float) -> torch.Tensor:
    """τ² written for iteration 0 (§A.4.7): ``T · PS(F_k) / 2``.

    Parameters
    ----------
    class_images
        ``(k, N, N)`` initial class images.
    tau2_fudge
        T.

    Returns
    -------
    torch.Tensor
        ``(k, f)`` with PS the shell mean of ``|F|²`` (RELION-normalised transform).
    """
    return tau2_fudge * power_spectrum_1d(class_images) / 2.0


def initial_ssnr(
    tau2: torch.Tensor,
    sigma2_noise: torch.Tensor,
    class_prior: torch.Tensor,
    n_particles: int,
) -> torch.Tensor:
    """Initial SSNR (§A.4.7, 2D): ``N_p · π_k · τ²_k / mean_o σ²_o``.

    Parameters
    ----------
    tau2
        ``(k, f)`` initial τ².
    sigma2_noise
        ``(g, f)`` noise spectra.
    class_prior
        ``(k,)`` π.
    n_particles
        ``N_p``, number of particles in the data set.

    Returns
    -------
    torch.Tensor
        ``(k, f)``; 0 where the mean noise is 0.
    """
    noise = sigma2_noise.mean(dim=0)  # (f,)
    positive = noise > 0
    ratio = tau2 / torch.where(positive, noise, torch.ones_like(noise))
    ssnr = n_particles * class_prior[:, None] * ratio
    return torch.where(positive, ssnr, torch.zeros_like(ssnr))


@torch.no_grad()
def initialise_state(
    state: Class2DState,
    images: torch.Tensor,
    optics_group: torch.Tensor,
    *,
    pixel_size: float,
    mask_radius_px: float,
    tau2_fudge: float,
    seed: int,
    n_particles: int,
    ctf: torch.Tensor | None = None,
    ini_high: float | None = None,
    soft_edge_px: float = 5.0,
    zero_mask: bool = True,
    init_blobs: bool = True,
    incr_size: int = 10,
    scale_group_particle_count: torch.Tensor | None = None,
) -> None:
    """Fill a fresh :class:`Class2DState` for iteration 0 (§A.4, §F "init"), in place.

    Sets σ²_noise, class images, π = 1/K, μ_k = 0, s_g = 1, avg_norm = 1, zero first
    moments, unit second moments, zero class ages, τ² and SSNR of iteration 0, T and the
    current size of iteration 1. σ²_off keeps the state's initial value.

    Parameters
    ----------
    state
        State to initialise.
    images
        ``(n, N, N)`` noise-estimation subset of the particles.
    optics_group
        ``(n,)`` 0-based optics group of each image.
    pixel_size
        Pixel size in Å.
    mask_radius_px
        Particle mask radius in pixels.
    tau2_fudge
        T (for the iteration-0 τ²).
    seed
        Random seed.
    n_particles
        Number of particles in the whole data set (for the SSNR).
    ctf
        ``(n, N, N//2+1)`` CTFs of ``images`` or None.
    ini_high
        Initial low-pass resolution in Å; None → :func:`ini_high_angstrom`.
    soft_edge_px, zero_mask, init_blobs
        See :func:`initial_class_images`.
    incr_size
        RELION ``--incr_size``.
    scale_group_particle_count
        ``(m,)`` particles per scale group (for the scale normalisation); None keeps
        the state's value.
    """
    size = state.box_size
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(
            f"images must be (n, {size}, {size}), got {tuple(images.shape)}"
        )
    resolution = (
        ini_high if ini_high is not None else ini_high_angstrom(size, pixel_size)
    )
    dtype, device = state.class_images.dtype, state.class_images.device
    images = images.to(device=device, dtype=dtype)
    sigma2 = estimate_noise_spectra(
        images,
        optics_group,
        state.n_optics_groups,
        mask_radius_px,
        soft_edge_px,
        zero_mask,
    )
    class_images = initial_class_images(
        images,
        ctf,
        state.n_classes,
        seed,
        resolution,
        pixel_size,
        mask_radius_px,
        soft_edge_px=soft_edge_px,
        zero_mask=zero_mask,
        init_blobs=init_blobs,
    )
    state.sigma2_noise.copy_(sigma2)
    state.class_images.copy_(class_images)
    state.class_prior.fill_(1.0 / state.n_classes)
    state.class_offset_prior_angstrom.zero_()
    state.scale.fill_(1.0)
    state.avg_norm.fill_(1.0)
    state.moment1_ri.zero_()
    state.moment2.fill_(1.0)
    state.class_age.zero_()
    if scale_group_particle_count is not None:
        state.scale_group_particle_count.copy_(scale_group_particle_count)
    tau2 = initial_tau2(class_images, tau2_fudge)
    state.tau2.copy_(tau2)
    state.ssnr.copy_(initial_ssnr(tau2, sigma2, state.class_prior, n_particles))
    state.tau2_fudge.fill_(float(tau2_fudge))
    state.current_size.fill_(
        initial_current_size(size, pixel_size, resolution, incr_size)
    )
    state.current_resolution_shell.fill_(_relion_round(size * pixel_size / resolution))
