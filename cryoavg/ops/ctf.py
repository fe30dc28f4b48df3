"""Contrast transfer function (RELION ``CTF::getCTF``) on Fourier grids.

Conventions owned by this module
--------------------------------
* Frequencies: ``k = (ky, kx)`` in 1/Å on the grid of
  :func:`cryoavg.ops.fourier.fftfreq_grid` (default layout: rfft, not fftshifted,
  matching :func:`cryoavg.ops.fourier.dft_2d`). ``phi_k = atan2(ky, kx)`` is the angle
  of the frequency from the +x axis (x = column).
* Defocus values are RELION's (``rlnDefocusU/V``, Å, positive = underfocus); the
  astigmatism angle (``rlnDefocusAngle``, degrees) is the direction of ``defocus_u``
  measured from +x towards +y.
* The CTF (RELION, with the envelope on)::

      dz    = -(dU + dV)/2 - (dU - dV)/2 * cos(2 (phi_k - angle))
      gamma = pi lambda dz |k|^2 + pi/2 Cs lambda^3 |k|^4
              - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
      ctf   = -sin(gamma) * scale * exp(-B |k|^2 / 4)

  with RELION's wavelength ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` Å
  (V in volts), Cs in Å and the phase shift in radians. Low frequencies are positive
  (``ctf(0) = Q0``).
* Parameters broadcast over leading dimensions: per-particle tensors of shape ``(...)``
  give CTFs ``(..., h, w // 2 + 1)``.

Why not torch_ctf
-----------------
``torch_ctf.calculate_ctf_2d`` (0.6) uses the same angle convention
(``astigmatism_angle`` equals ``rlnDefocusAngle``, verified numerically in the tests)
but it (i) derives the wavelength from CODATA constants, which differs from RELION's by
~6.5e-6 relative and so by up to ~1e-3 in the CTF at Nyquist, (ii) always computes in
float32, (iii) takes ``sqrt(astigmatism)`` so ``dU < dV`` gives NaN and ``dU == dV``
gives NaN gradients, and (iv) regularises the frequency direction with an epsilon. None
of these can be mapped away in a wrapper, so the formula is written here and
``torch_ctf`` serves as a test oracle.
"""

from collections.abc import Sequence

import torch

from cryoavg.ops._grids import first_device, floating_dtype, validate_shape
from cryoavg.ops.fourier import dft_2d, fftfreq_grid, idft_2d

__all__ = ["apply_ctf_2d", "ctf_1d", "ctf_2d", "electron_wavelength_angstrom"]

ParamLike = float | torch.Tensor


def electron_wavelength_angstrom(voltage_kv: ParamLike) -> torch.Tensor:
    """Relativistic electron wavelength with RELION's constants.

    Parameters
    ----------
    voltage_kv
        Acceleration voltage in kV, scalar or ``(...)`` tensor.

    Returns
    -------
    torch.Tensor
        Wavelength in Å, same shape as ``voltage_kv``.
    """
    volts = torch.as_tensor(voltage_kv, dtype=floating_dtype(voltage_kv)) * 1e3
    return 12.2643247 / torch.sqrt(volts * (1.0 + volts * 0.978466e-6))


def _as_params(*values: ParamLike) -> list[torch.Tensor]:
    """Tensors on a common device/dtype, broadcast against each other."""
    device = first_device(*values)
    dtype = floating_dtype(*values)
    tensors = [torch.as_tensor(value, dtype=dtype, device=device) for value in values]
    return list(torch.broadcast_tensors(*tensors))


def _phase_and_envelope(
    frequency_sq: torch.Tensor,
    cos_term: torch.Tensor,
    defocus_u_angstrom: torch.Tensor,
    defocus_v_angstrom: torch.Tensor,
    wavelength: torch.Tensor,
    cs_angstrom: torch.Tensor,
    phase_shift_rad: torch.Tensor,
    amplitude_contrast: torch.Tensor,
    bfactor_angstrom2: torch.Tensor,
    scale: torch.Tensor,
    intact_first_peak: bool = False,
) -> torch.Tensor:
    """RELION's CTF from |k|^2 (1/Å^2) and cos(2 (phi_k - angle)), broadcastable."""
    defocus_average = -(defocus_u_angstrom + defocus_v_angstrom) * 0.5
    defocus_deviation = -(defocus_u_angstrom - defocus_v_angstrom) * 0.5
    delta_f = defocus_average + defocus_deviation * cos_term
    amplitude_phase = torch.atan(
        amplitude_contrast / torch.sqrt(1.0 - amplitude_contrast**2)
    )
    gamma = (
        torch.pi * wavelength * delta_f * frequency_sq
        + 0.5 * torch.pi * cs_angstrom * wavelength**3 * frequency_sq**2
        - phase_shift_rad
        - amplitude_phase
    )
    ctf = -torch.sin(gamma)
    if intact_first_peak:
        # RELION --ctf_intact_first_peak: no CTF correction before the first peak
        ctf = torch.where(gamma.abs() < 0.5 * torch.pi, torch.ones_like(ctf), ctf)
    return ctf * scale * torch.exp(-0.25 * bfactor_angstrom2 * frequency_sq)


def ctf_2d(
    *,
    defocus_u_angstrom: ParamLike,
    defocus_v_angstrom: ParamLike,
    defocus_angle_degrees: ParamLike,
    voltage_kv: ParamLike,
    cs_mm: ParamLike,
    amplitude_contrast: ParamLike,
    pixel_size_angstrom: ParamLike,
    image_shape: Sequence[int],
    phase_shift_degrees: ParamLike = 0.0,
    bfactor_angstrom2: ParamLike = 0.0,
    scale: ParamLike = 1.0,
    rfft: bool = True,
    fftshift: bool = False,
    intact_first_peak: bool = False,
) -> torch.Tensor:
    """RELION's 2D CTF image for one or many particles.

    All physical parameters are floats or tensors broadcastable to a common shape
    ``(...)`` (one value per particle). Device and dtype follow the first tensor given
    (float32 default).

    Parameters
    ----------
    defocus_u_angstrom, defocus_v_angstrom
        ``rlnDefocusU`` / ``rlnDefocusV`` in Å, positive = underfocus. Either may be
        larger.
    defocus_angle_degrees
        ``rlnDefocusAngle``: direction of ``defocus_u`` from +x towards +y, degrees.
    voltage_kv
        Acceleration voltage in kV.
    cs_mm
        Spherical aberration in mm.
    amplitude_contrast
        Amplitude contrast fraction ``Q0`` in [0, 1).
    pixel_size_angstrom
        Pixel size in Å.
    image_shape
        Real-space ``(h, w)`` of the images the CTF applies to.
    phase_shift_degrees
        Additional phase shift (``rlnPhaseShift``), degrees.
    bfactor_angstrom2
        ``rlnCtfBfactor`` in Å^2; envelope ``exp(-B |k|^2 / 4)``.
    scale
        ``rlnCtfScalefactor``.
    rfft, fftshift
        Layout of the Fourier grid (see :mod:`cryoavg.ops.fourier`).
    intact_first_peak
        RELION's ``--ctf_intact_first_peak``: the CTF is 1 wherever the phase
        ``|γ| < π/2`` (before its first peak); the B-factor envelope and scale still apply.

    Returns
    -------
    torch.Tensor
        ``(..., h, w // 2 + 1)`` (rfft) or ``(..., h, w)`` real CTF values.
    """
    shape = validate_shape(image_shape, 2)
    (
        defocus_u,
        defocus_v,
        angle_degrees,
        voltage,
        cs,
        q0,
        pixel_size,
        phase_shift,
        bfactor,
        scale_tensor,
    ) = _as_params(
        defocus_u_angstrom,
        defocus_v_angstrom,
        defocus_angle_degrees,
        voltage_kv,
        cs_mm,
        amplitude_contrast,
        pixel_size_angstrom,
        phase_shift_degrees,
        bfactor_angstrom2,
        scale,
    )
    if bool((pixel_size <= 0).any()):
        raise ValueError(f"pixel_size_angstrom must be > 0, got {pixel_size_angstrom}")
    if bool(((q0 < 0) | (q0 >= 1)).any()):
        raise ValueError(
            f"amplitude_contrast must be in [0, 1), got {amplitude_contrast}"
        )

    def per_particle(value: torch.Tensor) -> torch.Tensor:
        return value[..., None, None]  # (..., 1, 1)

    grid = fftfreq_grid(
        shape,
        rfft=rfft,
        fftshift=fftshift,
        device=defocus_u.device,
        dtype=defocus_u.dtype,
    )
    frequency_sq_px = (grid**2).sum(-1)  # (h, w2) cycles^2/pixel^2
    phi = torch.atan2(grid[..., 0], grid[..., 1])  # angle from +x towards +y
    angle = per_particle(torch.deg2rad(angle_degrees))
    cos_term = torch.cos(2.0 * (phi - angle))  # (..., h, w2)
    frequency_sq = frequency_sq_px / per_particle(pixel_size) ** 2
    return _phase_and_envelope(
        frequency_sq,
        cos_term,
        per_particle(defocus_u),
        per_particle(defocus_v),
        per_particle(electron_wavelength_angstrom(voltage)),
        per_particle(cs * 1e7),
        per_particle(torch.deg2rad(phase_shift)),
        per_particle(q0),
        per_particle(bfactor),
        per_particle(scale_tensor),
        intact_first_peak,
    )


def ctf_1d(
    *,
    defocus_angstrom: ParamLike,
    voltage_kv: ParamLike,
    cs_mm: ParamLike,
    amplitude_contrast: ParamLike,
    pixel_size_angstrom: ParamLike,
    box_size: int,
    phase_shift_degrees: ParamLike = 0.0,
    bfactor_angstrom2: ParamLike = 0.0,
    scale: ParamLike = 1.0,
) -> torch.Tensor:
    """Non-astigmatic CTF sampled at the radial shells ``0 .. N // 2``.

    Parameters
    ----------
    defocus_angstrom
        Defocus in Å (positive = underfocus), scalar or ``(...)``.
    voltage_kv, cs_mm, amplitude_contrast, pixel_size_angstrom
        As in :func:`ctf_2d`.
    box_size
        Box size ``N``; shell ``i`` is the frequency ``i / (N * pixel_size)`` 1/Å.
    phase_shift_degrees, bfactor_angstrom2, scale
        As in :func:`ctf_2d`.

    Returns
    -------
    torch.Tensor
        ``(..., N // 2 + 1)`` CTF values.
    """
    if box_size < 1:
        raise ValueError(f"box_size must be >= 1, got {box_size}")
    defocus, voltage, cs, q0, pixel_size, phase_shift, bfactor, scale_tensor = (
        _as_params(
            defocus_angstrom,
            voltage_kv,
            cs_mm,
            amplitude_contrast,
            pixel_size_angstrom,
            phase_shift_degrees,
            bfactor_angstrom2,
            scale,
        )
    )
    if bool((pixel_size <= 0).any()):
        raise ValueError(f"pixel_size_angstrom must be > 0, got {pixel_size_angstrom}")
    shells = torch.arange(box_size // 2 + 1, device=defocus.device, dtype=defocus.dtype)
    frequency_sq = (shells / (box_size * pixel_size[..., None])) ** 2  # (..., f)
    return _phase_and_envelope(
        frequency_sq,
        torch.ones_like(frequency_sq),
        defocus[..., None],
        defocus[..., None],
        electron_wavelength_angstrom(voltage)[..., None],
        cs[..., None] * 1e7,
        torch.deg2rad(phase_shift)[..., None],
        q0[..., None],
        bfactor[..., None],
        scale_tensor[..., None],
    )


def apply_ctf_2d(images: torch.Tensor, ctf_rfft: torch.Tensor) -> torch.Tensor:
    """Multiply the Fourier transform of real images by a real CTF and transform back.

    Parameters
    ----------
    images
        ``(..., h, w)`` real images.
    ctf_rfft
        ``(..., h, w // 2 + 1)`` CTF on the default rfft grid (not fftshifted),
        broadcastable against the transforms of ``images``.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)`` CTF-modulated images (broadcast leading shape).
    """
    if images.ndim < 2:
        raise ValueError(f"images must be (..., h, w), got shape {tuple(images.shape)}")
    shape = tuple(images.shape[-2:])
    expected = (shape[0], shape[1] // 2 + 1)
    if tuple(ctf_rfft.shape[-2:]) != expected:
        raise ValueError(
            f"ctf_rfft must end with {expected} for images {shape}, got "
            f"{tuple(ctf_rfft.shape)}"
        )
    return idft_2d(dft_2d(images) * ctf_rfft, shape)
