"""Turn a chunk of particle images into an :class:`~cryoavg.class2d.estep.EStepBatch` (§A.6.1).

For every particle, in one batched pass:

1. multiply by ``avg_norm / rlnNormCorrection`` (``--norm``);
2. translate by the rounded current offset (integer pixels, zero fill, no wrap) so that the
   translational search is relative to it;
3. the *unmasked* Fourier transform (back-projection only);
4. the *masked* image: soft circular mask of radius D/2 with a raised-cosine edge, the outside
   replaced by the weighted background mean (``zero_mask``) or by synthetic noise drawn from
   the current noise spectrum; its Fourier transform is used for alignment and for the noise,
   scale and norm statistics, including its power beyond the current image size;
5. the CTF (RELION parameters; CTF² for CTF-premultiplied data; ones without CTF; 1 below the
   first peak with ``ctf_intact_first_peak``);
6. everything gathered on the :class:`~cryoavg.class2d.sampling.PixelSet` of the current size.

Conventions: images ``(b, N, N)``, offsets yx px, Fourier transforms with RELION's
normalisation (:func:`cryoavg.ops.fourier.dft_2d`).
"""

import torch

from cryoavg.class2d.estep import EStepBatch
from cryoavg.class2d.sampling import PixelSet
from cryoavg.ops.ctf import ctf_2d
from cryoavg.ops.fourier import dft_2d, idft_2d, shell_index
from cryoavg.ops.masks import soft_mask_outside_2d
from cryoavg.ops.shifts import integer_shift_2d


def noise_images_2d(
    sigma2: torch.Tensor, box_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Real-space Gaussian noise images with a given per-shell spectrum.

    Parameters
    ----------
    sigma2
        ``(b, f)`` noise variance per real/imaginary component of each shell.
    box_size
        ``N``.
    generator
        Random generator (CPU) for reproducible noise.

    Returns
    -------
    torch.Tensor
        ``(b, N, N)`` noise images whose rfft has variance ``sigma2[ires]`` per component.
    """
    shells = shell_index(
        (box_size, box_size), rfft=True, fftshift=False, device=sigma2.device
    )
    shells = shells.clamp_max(sigma2.shape[-1] - 1)
    std = sigma2.clamp_min(0).sqrt()[:, shells]  # (b, N, N//2+1)
    shape = std.shape
    real = torch.randn(shape, generator=generator, dtype=std.dtype).to(std.device)
    imag = torch.randn(shape, generator=generator, dtype=std.dtype).to(std.device)
    spectrum = torch.complex(real, imag) * std
    return idft_2d(spectrum, (box_size, box_size), rfft=True)


def ctf_images(
    ctf_params: dict[str, torch.Tensor],
    box_size: int,
    *,
    premultiplied: torch.Tensor | None = None,
    intact_first_peak: bool = False,
) -> torch.Tensor:
    """RELION CTF on the full ``(N, N//2+1)`` half plane for a batch of particles.

    Parameters
    ----------
    ctf_params
        Per-particle ``(b,)`` tensors with the keys of
        :meth:`cryoavg.io.particles.ParticleTable.ctf_parameters`.
    box_size
        ``N``.
    premultiplied
        ``(b,)`` bool: the data are CTF-premultiplied (the CTF used is CTF²).
    intact_first_peak
        Set the CTF to 1 at frequencies below its first peak.

    Returns
    -------
    torch.Tensor
        ``(b, N, N//2+1)`` real.
    """
    ctf = ctf_2d(
        defocus_u_angstrom=ctf_params["defocus_u_angstrom"],
        defocus_v_angstrom=ctf_params["defocus_v_angstrom"],
        defocus_angle_degrees=ctf_params["defocus_angle_degrees"],
        voltage_kv=ctf_params["voltage_kv"],
        cs_mm=ctf_params["cs_mm"],
        amplitude_contrast=ctf_params["amplitude_contrast"],
        pixel_size_angstrom=ctf_params["pixel_size_angstrom"],
        phase_shift_degrees=ctf_params["phase_shift_degrees"],
        bfactor_angstrom2=ctf_params["bfactor_angstrom2"],
        scale=ctf_params["scale"],
        image_shape=(box_size, box_size),
        rfft=True,
        fftshift=False,
        intact_first_peak=intact_first_peak,
    )
    if premultiplied is not None and bool(premultiplied.any()):
        ctf = torch.where(premultiplied[:, None, None], ctf * ctf, ctf)
    return ctf


def prepare_estep_batch(
    images: torch.Tensor,
    *,
    index: torch.Tensor,
    optics_group: torch.Tensor,
    group: torch.Tensor,
    offset_px: torch.Tensor,
    norm_correction: torch.Tensor,
    ctf: torch.Tensor | None,
    sigma2_noise: torch.Tensor,
    scale: torch.Tensor,
    avg_norm: float,
    pixel_set: PixelSet,
    mask_radius_px: float,
    mask_edge_px: float,
    zero_mask: bool,
    do_norm: bool,
    noise_generator: torch.Generator | None = None,
) -> EStepBatch:
    """Prepare the E-step inputs of a chunk of particles (§A.6.1).

    Parameters
    ----------
    images
        ``(b, N, N)`` raw particle images (float32).
    index, optics_group, group
        ``(b,)`` global particle index, 0-based optics group and scale (micrograph) group.
    offset_px
        ``(b, 2)`` current offsets (yx px, RELION origin / pixel size); rounded here.
    norm_correction
        ``(b,)`` current ``rlnNormCorrection``.
    ctf
        ``(b, N, N//2+1)`` CTF (see :func:`ctf_images`), or ``None`` for no CTF.
    sigma2_noise
        ``(g, f)`` noise spectra of the optics groups.
    scale
        ``(m,)`` scale factors of the scale groups.
    avg_norm
        Average norm correction of the model.
    pixel_set
        Pixels of the current image size.
    mask_radius_px, mask_edge_px
        Circular mask radius and soft-edge width (px).
    zero_mask
        Background of the masked image = its weighted mean (else synthetic noise).
    do_norm
        Apply the per-particle norm correction.
    noise_generator
        Generator for the synthetic background noise (``zero_mask=False``).

    Returns
    -------
    EStepBatch
        Gathered on ``pixel_set``.
    """
    size = images.shape[-1]
    images = images.to(torch.float32)
    if do_norm:
        images = images * (avg_norm / norm_correction.clamp_min(1e-6))[:, None, None]
    rounded = torch.round(offset_px)
    shifted = integer_shift_2d(images, rounded)
    sigma2_per_particle = sigma2_noise[optics_group]  # (b, f)
    if zero_mask:
        masked = soft_mask_outside_2d(shifted, mask_radius_px, mask_edge_px)
    else:
        background = noise_images_2d(sigma2_per_particle, size, noise_generator)
        masked = soft_mask_outside_2d(
            shifted, mask_radius_px, mask_edge_px, background=background
        )
    unmasked_rfft = dft_2d(shifted, rfft=True).flatten(-2)  # (b, N·(N//2+1))
    masked_full = dft_2d(masked, rfft=True)  # (b, N, N//2+1)
    masked_rfft = masked_full.flatten(-2)
    # power of the masked image beyond the current size (RELION counts the half plane
    # including both halves of the kx = 0 column here)
    shells = shell_index((size, size), rfft=True, fftshift=False, device=images.device)
    n_shells = size // 2 + 1
    beyond = shells > pixel_set.image_size // 2
    power = masked_full.abs().square()
    shell_power = torch.zeros(
        (images.shape[0], n_shells), dtype=power.dtype, device=power.device
    )
    shell_power.index_add_(
        1, shells.flatten().clamp_max(n_shells - 1), power.flatten(1)
    )
    shell_power[:, : pixel_set.image_size // 2 + 1] = 0
    power_beyond = (power * beyond).flatten(1).sum(1)
    indices = pixel_set.indices
    ires = pixel_set.ires.clamp_max(n_shells - 1)
    if ctf is None:
        ctf_gathered = torch.ones(
            (images.shape[0], indices.numel()), device=images.device
        )
    else:
        ctf_gathered = ctf.flatten(-2)[:, indices]
    return EStepBatch(
        images_masked_rfft=masked_rfft[:, indices],
        images_unmasked_rfft=unmasked_rfft[:, indices],
        ctf=ctf_gathered,
        scale=scale[group],
        sigma2=sigma2_per_particle[:, ires],
        offset_px=rounded,
        index=index,
        optics_group=optics_group,
        group=group,
        masked_power_beyond=power_beyond,
        masked_shell_power_beyond=shell_power,
        norm_correction=norm_correction if do_norm else None,
    )
