"""Expected accuracy of in-plane rotations and translations per class (spec §A.10.2).

RELION reports, for each class, how far a reference can be rotated (or shifted) before
a particle could tell the difference with 99 % confidence: the smallest step Δ for which

    Σ_q |CTF(q) · (P(q) − P_Δ(q))|² / (2 σ²(|q|))  >  −ln 0.01 = 4.60517,

where ``P`` is the class reference rotated to the particle's current ψ and ``P_Δ`` the
same rotated by ψ + Δ (or shifted by Δ pixels along x or y). Δ grows in RELION's steps
(finer near zero) up to a cap of 30° (10 px). The class value is the mean over the first
ten particles of the iteration's random order, each with its own CTF, ψ and noise
spectrum; classes with π_k < 0.01 keep the "unknown" value 999. These are the
``rlnAccuracyRotations`` / ``rlnAccuracyTranslationsAngst`` columns of the model STAR
file, which class rankers read as features.

All candidate steps are evaluated at once (a batched rotation of the references), so the
cost is one ``(k, n_steps, p)`` table per particle.
"""

import torch

from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import PixelSet

__all__ = [
    "CONFIDENCE_THRESHOLD",
    "UNKNOWN_ACCURACY",
    "expected_accuracies",
    "rotation_steps_degrees",
    "translation_steps_px",
]

#: −ln(0.01): the summed squared difference (in units of 2σ²) that makes a pose change
#: detectable with 99 % confidence.
CONFIDENCE_THRESHOLD = 4.60517
#: Value written for classes whose accuracy is not computed.
UNKNOWN_ACCURACY = 999.0


def _steps(rules: list[tuple[float, float]], cap: float) -> torch.Tensor:
    """Cumulative step values: step ``s`` while the value is below ``limit``."""
    values: list[float] = []
    value = 0.0
    while value < cap - 1e-9:
        step = next(s for limit, s in rules if value < limit - 1e-9)
        value = min(round(value + step, 6), cap)
        values.append(value)
    return torch.tensor(values, dtype=torch.float64)


def rotation_steps_degrees() -> torch.Tensor:
    """RELION's trial in-plane angles Δψ (degrees): 0.05, 0.1, …, 25, 30.

    Returns
    -------
    torch.Tensor
        ``(s,)`` float64, increasing, last value 30.
    """
    rules = [(0.2, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0), (20.0, 2.0)]
    return _steps([*rules, (float("inf"), 5.0)], 30.0)


def translation_steps_px() -> torch.Tensor:
    """RELION's trial shifts Δ (pixels): 0.1, 0.2, …, 9, 10.

    Returns
    -------
    torch.Tensor
        ``(s,)`` float64, increasing, last value 10.
    """
    rules = [(1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0)]
    return _steps([*rules, (float("inf"), 2.0)], 10.0)


def _first_detectable(energy: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """First step whose energy exceeds the threshold (the cap when none does).

    ``energy`` is ``(..., s)``; returns ``(...)`` step values.
    """
    above = energy > CONFIDENCE_THRESHOLD
    first = torch.where(
        above.any(-1),
        above.float().argmax(-1),
        torch.full_like(above[..., 0], -1, dtype=torch.int64),
    )
    return steps.to(energy.device)[first]


@torch.no_grad()
def expected_accuracies(
    projector: ClassProjector,
    pixel_set: PixelSet,
    *,
    psi_degrees: torch.Tensor,
    sigma2_noise: torch.Tensor,
    ctf: torch.Tensor | None,
    shift_along_x: torch.Tensor,
    class_prior: torch.Tensor,
    pixel_size_angstrom: float,
    min_class_prior: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class expected rotational and translational accuracy.

    Parameters
    ----------
    projector
        The iteration's class references (``k`` classes, box ``N``).
    pixel_set
        Frequencies of the current image size (element 0 is the DC pixel).
    psi_degrees
        ``(n,)`` current in-plane angle of each trial particle.
    sigma2_noise
        ``(n, N // 2 + 1)`` noise spectrum of each trial particle's optics group
        (variance per real/imaginary component).
    ctf
        ``(n, N, N // 2 + 1)`` each trial particle's CTF (half-plane, un-shifted), or
        ``None`` without CTF correction.
    shift_along_x
        ``(n,)`` bool: shift the trial particle along x (else along y).
    class_prior
        ``(k,)`` class distribution π_k.
    pixel_size_angstrom
        Pixel size, to express translations in Å.
    min_class_prior
        Classes with π_k below this keep :data:`UNKNOWN_ACCURACY`.

    Returns
    -------
    rotations_degrees, translations_angstrom
        ``(k,)`` each: the mean over the ``n`` particles of the smallest detectable
        rotation (≤ 30°) and shift (≤ 10 px, in Å); 999 for small classes.
    """
    k = projector.n_classes
    n = int(psi_degrees.shape[0])
    device = projector.data.device
    real = projector.data.real.dtype
    unknown = torch.full((k,), UNKNOWN_ACCURACY, dtype=torch.float64)
    if n == 0 or pixel_set.indices.numel() < 2:
        return unknown, unknown.clone()
    pixels = slice(1, None)  # the DC term never changes
    index = pixel_set.indices[pixels]
    ires = pixel_set.ires[pixels]
    rot_steps = rotation_steps_degrees().to(device)
    trans_steps = translation_steps_px().to(device)
    box = pixel_set.box_size
    rotations = torch.empty(k, n, dtype=torch.float64, device=device)
    translations = torch.empty(k, n, dtype=torch.float64, device=device)
    for i in range(n):  # ten trial particles, everything else batched
        sigma2 = sigma2_noise[i].to(device, real)[ires]  # (p,)
        weight = torch.where(sigma2 > 0, 0.5 / sigma2.clamp_min(1e-30), 0.0)
        if ctf is not None:
            weight = weight * ctf[i].reshape(-1).to(device, real)[index].square()
        psi = float(psi_degrees[i])
        angles = torch.cat([torch.tensor([psi], device=device), psi + rot_steps]).to(
            real
        )  # (1 + s,)
        refs = projector.rotated_references(angles, pixel_set)[
            ..., pixels
        ]  # (k, 1+s, p)
        base = refs[:, :1]  # (k, 1, p)
        diff = (refs[:, 1:] - base).abs().square()  # (k, s, p)
        rotations[:, i] = _first_detectable(diff @ weight.to(diff.dtype), rot_steps)
        # a shift by d pixels multiplies P(q) by exp(-2πi q·d/N): |ΔP|² = 4 sin²(π q d/N) |P|²
        freq = (pixel_set.kx if bool(shift_along_x[i]) else pixel_set.ky)[pixels]
        phase = torch.pi * freq.to(torch.float64)[None, :] * trans_steps[:, None] / box
        factor = (4.0 * torch.sin(phase).square()).to(real)  # (s, p)
        power = base[:, 0].abs().square() * weight  # (k, p)
        translations[:, i] = _first_detectable(power @ factor.T, trans_steps)
    eligible = class_prior.to(torch.float64).cpu() >= min_class_prior
    rot = torch.where(eligible, rotations.mean(1).cpu(), unknown)
    trans = torch.where(
        eligible, translations.mean(1).cpu() * float(pixel_size_angstrom), unknown
    )
    return rot, trans
