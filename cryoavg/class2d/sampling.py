"""Sampling grids and Fourier pixel sets of the Class2D E-step.

Implements the in-plane rotation grid and the translation grid of RELION's 2D
``HealpixSampling`` with oversampling order 1 (spec §A.6.2), the image size of the
coarse pass (§A.6.3) and the set of half-plane Fourier pixels used for a given image
size (design doc, "Pixel set").

Conventions
-----------
* Angles are in degrees; ψ is RELION's ``rlnAnglePsi``. The reference for ψ at
  frequency ``q`` is ``F(Rz(ψ) q)`` (see :mod:`cryoavg.class2d.projector`).
* Translations are in pixels, ``(y, x)`` order, and mean "shift the image by +t"
  (multiply its transform by ``exp(-2πi q·t / N)``).
* Coarse index ``j`` expands to the fine indices ``2·j + m`` (ψ, ``m ∈ {0, 1}``) and
  ``4·j + 2·m_y + m_x`` (translations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoavg.ops.fourier import shell_index
from cryoavg.ops.shifts import translation_grid_2d

__all__ = [
    "PixelSet",
    "PsiGrid",
    "TranslationGrid",
    "coarse_image_size",
    "next_perturbation",
]


def _wrap_degrees(angles: torch.Tensor) -> torch.Tensor:
    """Wrap angles above 180° by −360° (RELION's convention for ψ)."""
    return torch.where(angles > 180.0, angles - 360.0, angles)


def next_perturbation(
    previous: float,
    random_perturbation: float = 0.5,
    *,
    generator: torch.Generator | None = None,
) -> float:
    """Advance the per-iteration random perturbation of the sampling grids.

    ``perturb += U(f/2, f)``, then wrapped into ``[-f, f]`` (spec §A.6.2).

    Parameters
    ----------
    previous
        The perturbation of the previous iteration (fraction of a coarse step).
    random_perturbation
        ``f`` (RELION ``--perturb``, default 0.5). ``0`` disables perturbation.
    generator
        Optional torch random generator for reproducibility.

    Returns
    -------
    float
        The new perturbation, a fraction of the coarse step in ``[-f, f]``.
    """
    f = float(random_perturbation)
    if f <= 0.0:
        return 0.0
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    value = float(previous) + 0.5 * f + 0.5 * f * u
    while value > f:
        value -= 2.0 * f
    while value < -f:
        value += 2.0 * f
    return value


@dataclass(frozen=True)
class PsiGrid:
    """Coarse and fine (oversampling 1) in-plane rotation grid.

    Attributes
    ----------
    coarse_step_degrees
        Coarse step ``360 / n_psi`` (degrees).
    perturbation
        Fraction of the coarse step added to every angle.
    coarse_degrees
        ``(r_c,)`` float64 coarse angles incl. perturbation, wrapped to ``(-180, 180]``.
    fine_degrees
        ``(2·r_c,)`` float64 fine angles; fine index ``2·j + m`` belongs to coarse
        ``j``.
    """

    coarse_step_degrees: float
    perturbation: float
    coarse_degrees: torch.Tensor
    fine_degrees: torch.Tensor

    @classmethod
    def build(
        cls,
        psi_step_degrees: float,
        *,
        perturbation: float = 0.0,
        n_psi_multiple: int = 1,
    ) -> PsiGrid:
        """Build the grid from the user's (fine) ψ step.

        Parameters
        ----------
        psi_step_degrees
            Fine ψ step (the config value, RELION GUI "in-plane angular sampling",
            e.g. 6°); the coarse step requested is twice this.
        perturbation
            Fraction (in ``[-0.5, 0.5]``) of the coarse step added to every angle.
        n_psi_multiple
            Round the number of coarse angles up to a multiple of this (RELION uses
            32 with an accelerator, 1 on plain CPU).

        Returns
        -------
        PsiGrid
        """
        requested = 2.0 * float(psi_step_degrees)
        n_psi = math.ceil(360.0 / requested - 1e-9)
        n_psi = max(1, n_psi)
        mult = max(1, int(n_psi_multiple))
        n_psi = mult * math.ceil(n_psi / mult)
        step = 360.0 / n_psi
        j = torch.arange(n_psi, dtype=torch.float64)
        coarse = j * step + perturbation * step  # (r_c,)
        m = torch.arange(2, dtype=torch.float64)
        # (r_c, 2) -> (2·r_c,): fine index 2·j + m
        fine = (coarse[:, None] - 0.5 * step + (m[None, :] + 0.5) * 0.5 * step).reshape(
            -1
        )
        return cls(
            coarse_step_degrees=step,
            perturbation=float(perturbation),
            coarse_degrees=_wrap_degrees(coarse),
            fine_degrees=_wrap_degrees(fine),
        )

    @property
    def n_coarse(self) -> int:
        """Number of coarse angles ``r_c``."""
        return int(self.coarse_degrees.shape[0])

    @property
    def n_fine(self) -> int:
        """Number of fine angles ``2·r_c``."""
        return int(self.fine_degrees.shape[0])

    @property
    def fine_step_degrees(self) -> float:
        """Fine step (half the coarse step)."""
        return 0.5 * self.coarse_step_degrees


@dataclass(frozen=True)
class TranslationGrid:
    """Coarse and fine (oversampling 1) translation grid, in pixels, ``yx`` order.

    Attributes
    ----------
    coarse_step_px
        Coarse step ``Δ`` (px), twice the user's fine step.
    offset_range_px
        Search range (px).
    perturbation
        Fraction of ``Δ`` added to both components of every translation.
    coarse_px
        ``(t_c, 2)`` float64 coarse translations (yx, px) incl. perturbation.
    fine_px
        ``(4·t_c, 2)`` float64 fine translations; fine index ``4·j + 2·m_y + m_x``
        belongs to coarse ``j``.
    """

    coarse_step_px: float
    offset_range_px: float
    perturbation: float
    coarse_px: torch.Tensor
    fine_px: torch.Tensor

    @classmethod
    def build(
        cls,
        offset_range_px: float,
        offset_step_px: float,
        *,
        perturbation: float = 0.0,
    ) -> TranslationGrid:
        """Build the grid from the user's range and (fine) step.

        Coarse points are ``(iy·Δ, ix·Δ)`` with ``|ix|, |iy| ≤ ceil(range/Δ)`` and
        ``x² + y² < range² + 0.001``, in RELION's order (``ix`` outer, ``iy`` inner;
        :func:`cryoavg.ops.shifts.translation_grid_2d`).

        Parameters
        ----------
        offset_range_px
            Search range (px, RELION ``--offset_range``).
        offset_step_px
            Fine step (the config value, e.g. 1 px); the coarse step ``Δ`` is twice it.
        perturbation
            Fraction (in ``[-0.5, 0.5]``) of ``Δ`` added to both components.

        Returns
        -------
        TranslationGrid
        """
        step = 2.0 * float(offset_step_px)
        rng = float(offset_range_px)
        base = translation_grid_2d(rng, step, dtype=torch.float64)  # (t_c, 2) yx
        coarse = base + perturbation * step  # (t_c, 2)
        m = torch.arange(2, dtype=torch.float64)
        sub = -0.5 * step + (m + 0.5) * 0.5 * step  # (2,)
        my, mx = torch.meshgrid(sub, sub, indexing="ij")
        sub_yx = torch.stack([my.reshape(-1), mx.reshape(-1)], dim=-1)  # (4, 2)
        # (t_c, 4, 2) -> (4·t_c, 2): fine index 4·j + 2·m_y + m_x
        fine = (coarse[:, None, :] + sub_yx[None, :, :]).reshape(-1, 2)
        return cls(
            coarse_step_px=step,
            offset_range_px=rng,
            perturbation=float(perturbation),
            coarse_px=coarse,
            fine_px=fine,
        )

    @property
    def n_coarse(self) -> int:
        """Number of coarse translations ``t_c``."""
        return int(self.coarse_px.shape[0])

    @property
    def n_fine(self) -> int:
        """Number of fine translations ``4·t_c``."""
        return int(self.fine_px.shape[0])

    @property
    def fine_step_px(self) -> float:
        """Fine step (half the coarse step)."""
        return 0.5 * self.coarse_step_px


def coarse_image_size(
    box_size: int,
    pixel_size: float,
    particle_diameter: float,
    psi_step_coarse_degrees: float,
    current_size: int,
    *,
    max_coarse_size: int | None = None,
    strict_highres_exp: float | None = None,
    remap: float = 1.0,
) -> int:
    """Image size of the coarse (first) E-step pass, spec §A.6.3.

    Parameters
    ----------
    box_size
        ``N`` (px).
    pixel_size
        Pixel size (Å).
    particle_diameter
        Mask diameter ``D`` (Å).
    psi_step_coarse_degrees
        Coarse ψ step (degrees, ``PsiGrid.coarse_step_degrees``).
    current_size
        Current image size (px); the result never exceeds it.
    max_coarse_size
        RELION ``--coarse_size`` cap (``None`` or ≤ 0: no cap).
    strict_highres_exp
        RELION ``--strict_highres_exp`` (Å); when > 0 the size is
        ``2·round(remap·N·p / strict_highres_exp)`` (then used in both passes).
    remap
        ``(N_o p_o) / (N p)`` for the optics group (1 for a single group).

    Returns
    -------
    int
        Even coarse image size (px).
    """
    extent = remap * box_size * pixel_size  # Å
    if strict_highres_exp is not None and strict_highres_exp > 0:
        size = 2 * round(extent / strict_highres_exp)
    else:
        coarse_resolution = (
            (psi_step_coarse_degrees / 360.0) * math.pi * particle_diameter / 1.5
        )
        size = 2 * math.ceil(extent / coarse_resolution - 1e-9)
        if max_coarse_size is not None and max_coarse_size > 0:
            size = min(size, int(max_coarse_size))
    return int(min(size, current_size))


@dataclass(frozen=True)
class PixelSet:
    """Half-plane Fourier pixels kept for an image size ``s`` on the ``N`` grid.

    All pixels of the un-shifted ``rfft`` layout ``(N, N//2+1)`` with
    ``ires = round(sqrt(kx² + ky²)) ≤ s/2``, excluding the redundant half column
    (``kx = 0, ky < 0``; the Nyquist row ``ky = -N/2`` counts as ``+N/2`` and is kept,
    as in RELION and :func:`cryoavg.ops.fourier.shell_index`). They are sorted by
    ``(ires, flat index)`` so that

    * element 0 is the DC pixel (``ires = 0``) — excluded from the likelihood but used
      by the noise/norm/scale statistics and the reconstruction;
    * the pixels of any smaller size ``s' ≤ s`` form the prefix of length
      :meth:`count_within` ``(s')``; the likelihood of size ``s'`` uses
      ``[1 : count_within(s')]``.

    Attributes
    ----------
    box_size
        ``N``.
    image_size
        ``s`` (even, ≤ N).
    indices
        ``(p,)`` int64 indices into the flattened ``(N, N//2+1)`` half-plane array.
    ky, kx
        ``(p,)`` int64 frequencies (cycles per box); row ``N/2`` has ``ky = +N/2`` (as
        RELION indexes it; matters only for phases and rotations of Nyquist pixels).
    ires
        ``(p,)`` int64 shell index.
    """

    box_size: int
    image_size: int
    indices: torch.Tensor
    ky: torch.Tensor
    kx: torch.Tensor
    ires: torch.Tensor

    @classmethod
    def for_size(
        cls, box_size: int, image_size: int, *, device: torch.device | str | None = None
    ) -> PixelSet:
        """Build the pixel set of ``image_size`` on the ``box_size`` grid.

        Parameters
        ----------
        box_size
            ``N`` (even).
        image_size
            ``s`` (clamped to ``N``).
        device
            Device of the index tensors.

        Returns
        -------
        PixelSet
        """
        n = int(box_size)
        s = min(int(image_size), n)
        # (N, N//2+1) shell index, -1 on the redundant half column (RELION's rule: the
        # Nyquist row counts as ky = +N/2 and is kept)
        ires = shell_index((n, n), rfft=True, fftshift=False, exclude_redundant=True)
        row = torch.arange(n, dtype=torch.long)
        ky = torch.where(
            row <= n // 2, row, row - n
        )  # (N,) Nyquist row as +N/2 (RELION)
        kx = torch.arange(n // 2 + 1, dtype=torch.long)  # (N//2+1,)
        kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")  # (N, N//2+1)
        keep = (ires >= 0) & (ires <= s // 2)
        flat = torch.nonzero(keep.reshape(-1)).squeeze(-1)  # (p,) ascending
        ires_kept = ires.reshape(-1)[flat]
        order = torch.sort(ires_kept, stable=True).indices
        flat = flat[order]
        return cls(
            box_size=n,
            image_size=s,
            indices=flat.to(device),
            ky=kyy.reshape(-1)[flat].to(device),
            kx=kxx.reshape(-1)[flat].to(device),
            ires=ires.reshape(-1)[flat].to(device),
        )

    @property
    def n_pixels(self) -> int:
        """Number of pixels ``p`` (incl. DC)."""
        return int(self.indices.shape[0])

    @property
    def n_shells(self) -> int:
        """Number of shells ``f = N//2 + 1`` of the full-size spectrum."""
        return self.box_size // 2 + 1

    def count_within(self, image_size: int) -> int:
        """Length of the prefix holding all pixels with ``ires ≤ image_size/2``.

        Parameters
        ----------
        image_size
            A size ``≤ self.image_size``.

        Returns
        -------
        int
            Prefix length (incl. the DC pixel).
        """
        return int((self.ires <= int(image_size) // 2).sum())

    def take(self, start: int, stop: int) -> PixelSet:
        """Sub-set ``[start:stop]`` of the pixels (a contiguous slice).

        Parameters
        ----------
        start, stop
            Slice bounds.

        Returns
        -------
        PixelSet
            The slice (``image_size`` is kept as an upper bound).
        """
        return PixelSet(
            box_size=self.box_size,
            image_size=self.image_size,
            indices=self.indices[start:stop],
            ky=self.ky[start:stop],
            kx=self.kx[start:stop],
            ires=self.ires[start:stop],
        )

    def to(self, device: torch.device | str) -> PixelSet:
        """Copy of the pixel set on ``device``."""
        return PixelSet(
            box_size=self.box_size,
            image_size=self.image_size,
            indices=self.indices.to(device),
            ky=self.ky.to(device),
            kx=self.kx.to(device),
            ires=self.ires.to(device),
        )
