"""Expectation step of 3D refinement: particles × 3D orientations × translations.

The half-reference is projected at ``q`` orientations (:func:`project_references`,
Fourier-slice projections by :mod:`cryoavg.ops.projection`, gathered on the
:class:`~cryoavg.class2d.sampling.PixelSet` of the current image size). Each particle
is scored against either all ``q`` slices (global search, one shared GEMM) or its own
``m`` candidate slices (local search around its previous pose, a batched GEMM). The
model and the likelihood are those of Class2D (spec §A.3):

``diff2(b,o,t) = Σ_p |s·CTF·P_o − X_b·φ_t|² / (2σ²)``

``= Σ|X|²/2σ² + Σ s²CTF²|P_o|²/2σ² − Re Σ conj(P_o)·Y_b·φ_t``, ``Y = (s·CTF/σ²)·X``.

The first term is pose independent, the second a GEMM ``(b, p) × (p, o)``, the cross
term a real GEMM on interleaved (re, im) values ``(b·t, 2p) × (2p, o)`` (batched per
particle for local search). The DC pixel is excluded from the likelihood.

Weights ``w ∝ prior_offset(t)·exp(−(diff2 − min diff2))`` (uniform orientation prior:
the grid is uniform on SO(3), and local search is a hard window around the previous
pose); ``diff2 − min > 700`` gives an exact zero. Significance as §A.6.4: samples in
decreasing weight order until ``adaptive_fraction`` of the total, at most
``max_significant``; their weights are normalised by the total ``S`` over all samples.

``mode="cc"`` (first iteration from a reference that is not on the particles'
greyscale, RELION's ``--firstiter_cc``): the score is the σ²-weighted normalised
cross-correlation ``Re Σ conj(P)·Y·φ / sqrt(Σ CTF²|P|²/σ²)`` and each particle gets its
best pose with weight 1.

Units: translations ``(y, x)`` px, "shift the image by +t" (``φ_t = exp(−2πi q·t/N)``),
the best offset is ``offset_px + t`` (RELION ``rlnOriginX/YAngst`` / pixel size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from cryoavg.class2d.estep import EStepBatch, phase_shifts
from cryoavg.class2d.sampling import PixelSet
from cryoavg.ops import indexing
from cryoavg.ops.rotations import euler_angles_to_matrix

__all__ = [
    "EStep3DResult",
    "PoseSamples",
    "SliceProjector",
    "SliceSums",
    "accumulate_slices",
    "expectation_step_3d",
    "project_references",
]

_DROP = 700.0


class SliceProjector:
    """Central slices of one map on a :class:`PixelSet`, for many orientations.

    The map is divided by the ``sinc²`` of trilinear interpolation on the padded grid
    (gridding pre-correction), zero-padded to ``P = pad·N`` and transformed once; a
    slice is then sampled only at the ``p`` frequencies of the pixel set, at
    ``pad·Aᵀ(kx, ky, 0)`` (trilinear, Friedel symmetry for ``kx < 0``). The result is
    RELION's normalised 2D transform of the projection,
    ``dft_2d(P_A) = F_pad(pad·Aᵀk) / N²`` (the convention of
    :func:`cryoavg.ops.projection.project_volume_rfft_2d`).

    Parameters
    ----------
    volume
        ``(N, N, N)`` real map (origin at ``N//2``).
    pad_factor
        Integer oversampling (2 = RELION).
    """

    def __init__(self, volume: torch.Tensor, pad_factor: int = 2) -> None:
        n = int(volume.shape[-1])
        pad = int(pad_factor)
        size = pad * n
        self.box_size = n
        self.pad_factor = pad
        vol = volume.to(torch.float32)
        lo = size // 2 - n // 2
        padded = torch.zeros((size,) * 3, dtype=torch.float32, device=vol.device)
        padded[lo : lo + n, lo : lo + n, lo : lo + n] = vol
        r = (
            torch.arange(size, device=vol.device, dtype=torch.float32) - size // 2
        ) / size
        sinc = torch.sinc(r) ** 2  # (P,)
        sinc = sinc.clamp(min=1e-2)
        padded = padded / (
            sinc[:, None, None] * sinc[None, :, None] * sinc[None, None, :]
        )
        ft = torch.fft.rfftn(torch.fft.ifftshift(padded), dim=(0, 1, 2))
        ft = torch.fft.fftshift(ft, dim=(0, 1)) / float(n * n)  # (P, P, P//2+1)
        # (1, 2, P, P, P//2+1) real channels for grid_sample
        self._grid = torch.view_as_real(ft).permute(3, 0, 1, 2)[None].contiguous()
        self._size = size

    def __call__(
        self, angles_degrees: torch.Tensor, pixel_set: PixelSet, *, chunk: int = 4096
    ) -> torch.Tensor:
        """Slices ``(q, p)`` complex64 for ``(q, 3)`` RELION angles."""
        device = self._grid.device
        size = self._size
        k = torch.stack(
            [
                pixel_set.kx.to(device, torch.float32),
                pixel_set.ky.to(device, torch.float32),
                torch.zeros(pixel_set.n_pixels, device=device),
            ],
            -1,
        ) * float(self.pad_factor)  # (p, 3) xyz on the padded grid
        out = []
        for i in range(0, angles_degrees.shape[0], chunk):
            a = euler_angles_to_matrix(angles_degrees[i : i + chunk].to(torch.float64))
            pos = torch.einsum("qji,pj->qpi", a.to(device, torch.float32), k)  # Aᵀk
            flip = pos[..., 0] < 0
            pos = torch.where(flip[..., None], -pos, pos)
            # grid_sample coordinates (x, y, z) -> indices (kx, P/2+ky, P/2+kz)
            half = size // 2
            coords = torch.stack(
                [
                    pos[..., 0] * (2.0 / half) - 1.0,
                    (pos[..., 1] + half) / (size - 1) * 2.0 - 1.0,
                    (pos[..., 2] + half) / (size - 1) * 2.0 - 1.0,
                ],
                -1,
            )  # (q, p, 3)
            q, p = coords.shape[:2]
            sampled = torch.nn.functional.grid_sample(
                self._grid,
                coords.view(1, q, p, 1, 3),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=True,
            )[0, :, :, :, 0]  # (2, q, p)
            z = torch.complex(sampled[0], sampled[1])
            out.append(torch.where(flip, z.conj(), z))
        if not out:
            return torch.zeros((0, pixel_set.n_pixels), dtype=torch.complex64)
        return torch.cat(out)


def project_references(
    volume: torch.Tensor,
    angles_degrees: torch.Tensor,
    pixel_set: PixelSet,
    *,
    pad_factor: int = 2,
) -> torch.Tensor:
    """Transforms of the projections of a map on a pixel set (:class:`SliceProjector`).

    Parameters
    ----------
    volume
        ``(N, N, N)`` real map.
    angles_degrees
        ``(q, 3)`` RELION angles.
    pixel_set
        Pixels of the current size (``p``).
    pad_factor
        Oversampling of the map's transform.

    Returns
    -------
    torch.Tensor
        ``(q, p)`` complex64 ``dft_2d`` of the projections (RELION normalisation).
    """
    return SliceProjector(volume, pad_factor)(angles_degrees, pixel_set)


@dataclass
class PoseSamples:
    """Contributing samples of a batch (flat list of ``e`` entries).

    Attributes
    ----------
    particle_row
        ``(e,)`` int64 row in the batch.
    orientation
        ``(e,)`` int64 row of the reference table.
    translation
        ``(e,)`` int64 index into the translation grid.
    weight
        ``(e,)`` float64 weight normalised by ``S`` (sums to ≤ 1 per particle).
    """

    particle_row: torch.Tensor
    orientation: torch.Tensor
    translation: torch.Tensor
    weight: torch.Tensor


@dataclass
class EStep3DResult:
    """Per-particle E-step outputs.

    Attributes
    ----------
    best_orientation
        ``(b,)`` int64 row of the reference table of the best sample.
    best_offset_px
        ``(b, 2)`` yx ``offset_px + t_best``.
    pmax
        ``(b,)`` largest normalised weight.
    n_significant
        ``(b,)`` int64 number of significant samples.
    log_likelihood
        ``(b,)`` ``ln S − min diff2 − Σ_p ln(2πσ²)`` (0 in ``"cc"`` mode).
    samples
        The contributing samples.
    """

    best_orientation: torch.Tensor
    best_offset_px: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    log_likelihood: torch.Tensor
    samples: PoseSamples


def _interleaved(z: torch.Tensor) -> torch.Tensor:
    z = z.contiguous()
    return torch.view_as_real(z).reshape(*z.shape[:-1], 2 * z.shape[-1])


def _pose_terms(
    y: torch.Tensor,
    a: torch.Tensor,
    references: torch.Tensor,
    phases: torch.Tensor,
    candidates: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross and model terms for one chunk of particles.

    Parameters
    ----------
    y
        ``(c, p)`` complex ``Y`` (DC zeroed).
    a
        ``(c, p)`` real weight of ``|P|²`` (DC zeroed).
    references
        ``(q, p)`` complex.
    phases
        ``(t, p)`` complex.
    candidates
        ``(c, m)`` rows of ``references`` per particle, or None for all ``q``.

    Returns
    -------
    cross : torch.Tensor
        ``(c, t, m)`` ``Re Σ conj(P)·Y·φ``.
    model : torch.Tensor
        ``(c, m)`` ``Σ a·|P|²``.
    """
    c, p = y.shape
    t = phases.shape[0]
    shifted = torch.view_as_real(y[:, None, :] * phases[None]).reshape(c, t, 2 * p)
    power = references.real**2 + references.imag**2  # (q, p)
    if candidates is None:
        cross = (shifted.reshape(c * t, 2 * p) @ _interleaved(references).T).view(
            c, t, -1
        )
        model = a @ power.T  # (c, q)
        return cross, model
    refs = _interleaved(references)[candidates]  # (c, m, 2p)
    cross = torch.bmm(shifted, refs.transpose(1, 2))  # (c, t, m)
    model = torch.bmm(power[candidates], a[:, :, None])[..., 0]  # (c, m)
    return cross, model


def expectation_step_3d(
    batch: EStepBatch,
    references: torch.Tensor,
    translations_px: torch.Tensor,
    pixel_set: PixelSet,
    *,
    candidates: torch.Tensor | None = None,
    candidate_valid: torch.Tensor | None = None,
    sigma2_offset_px: float = 4.0,
    adaptive_fraction: float = 0.999,
    max_significant: int | None = 500,
    mode: Literal["ml", "cc"] = "ml",
    max_chunk_bytes: int = 1 << 27,
) -> EStep3DResult:
    """Score a batch of particles against projected references (module docstring).

    Parameters
    ----------
    batch
        Prepared images (:func:`cryoavg.class2d.preprocess.prepare_estep_batch`).
    references
        ``(q, p)`` complex projections on ``pixel_set``.
    translations_px
        ``(t, 2)`` yx translation grid (px), relative to ``batch.offset_px``.
    pixel_set
        Pixels of the current size.
    candidates
        ``(b, m)`` rows of ``references`` per particle (local search), or None.
    candidate_valid
        ``(b, m)`` bool, False on padding of ``candidates``.
    sigma2_offset_px
        Variance (px²) of the isotropic Gaussian prior on the absolute offset.
    adaptive_fraction
        Fraction of the total weight kept as significant.
    max_significant
        Cap on the significant samples per particle (None: no cap).
    mode
        ``"ml"`` (marginalisation) or ``"cc"`` (best cross-correlation, weight 1).
    max_chunk_bytes
        Bound on temporary memory.

    Returns
    -------
    EStep3DResult
    """
    device = batch.images_masked_rfft.device
    b, p = batch.images_masked_rfft.shape
    t_grid = translations_px.to(device=device, dtype=torch.float64)
    n_t = t_grid.shape[0]
    phases = phase_shifts(t_grid, pixel_set.to(device), dtype=references.dtype)
    s = batch.scale.to(batch.ctf.dtype)[:, None]
    x = batch.images_masked_rfft.to(references.dtype)
    y = x * (s * batch.ctf / batch.sigma2)
    a = s * s * batch.ctf * batch.ctf / (2.0 * batch.sigma2)
    y[:, 0] = 0
    a = a.clone()
    a[:, 0] = 0
    m = references.shape[0] if candidates is None else candidates.shape[1]
    # log prior on the absolute offset, normalised to mean 1 over the grid: (b, t)
    o_abs = batch.offset_px.to(torch.float64)[:, None, :] + t_grid[None]
    log_prior = -(o_abs**2).sum(-1) / (2.0 * max(sigma2_offset_px, 1e-6))
    log_prior = log_prior - (
        torch.logsumexp(log_prior, 1, keepdim=True) - math.log(n_t)
    )

    step = max(1, min(b, max_chunk_bytes // max(1, n_t * (2 * p + 2 * m) * 4 * 3)))
    rows_all, ori_all, tr_all, w_all = [], [], [], []
    best_o, best_t, pmax, n_sig, log_s_all, min_all = [], [], [], [], [], []
    for i in range(0, b, step):
        sl = slice(i, i + step)
        c = y[sl].shape[0]
        cand = None if candidates is None else candidates[sl].to(device)
        cross, model = _pose_terms(y[sl], a[sl], references, phases, cand)
        cross = cross.to(torch.float64)
        model = model.to(torch.float64)
        if cand is not None and candidate_valid is not None:
            invalid = ~candidate_valid[sl].to(device)[:, None, :]  # (c, 1, m)
        else:
            invalid = None
        if mode == "cc":
            # σ²-weighted normalised cross-correlation; the best pose gets weight 1
            cc = cross / torch.sqrt(2.0 * model.clamp(min=1e-30))[:, None, :]
            if invalid is not None:
                cc = cc.masked_fill(invalid, -math.inf)
            flat = cc.reshape(c, -1).argmax(1)
            tt, oo = flat // m, flat % m
            rows = torch.arange(c, device=device)
            ori = oo if cand is None else cand[rows, oo]
            rows_all.append(rows + i)
            ori_all.append(ori)
            tr_all.append(tt)
            w_all.append(torch.ones(c, dtype=torch.float64, device=device))
            best_o.append(ori)
            best_t.append(tt)
            pmax.append(torch.ones(c, dtype=torch.float64, device=device))
            n_sig.append(torch.ones(c, dtype=torch.int64, device=device))
            log_s_all.append(torch.zeros(c, dtype=torch.float64, device=device))
            min_all.append(torch.zeros(c, dtype=torch.float64, device=device))
            continue
        d = model[:, None, :] - cross  # (c, t, m) pose-dependent diff2
        if invalid is not None:
            d = d.masked_fill(invalid, math.inf)
        dmin = d.reshape(c, -1).amin(1)  # (c,)
        delta = d - dmin[:, None, None]
        lw = (log_prior[sl][:, :, None] - delta).masked_fill(delta > _DROP, -math.inf)
        lw = lw.reshape(c, -1)  # (c, t·m)
        log_s = torch.logsumexp(lw, 1)  # (c,)
        w = torch.exp(lw - log_s[:, None])  # normalised by S
        n = w.shape[1]
        cap = (
            n
            if not max_significant or max_significant <= 0
            else min(n, max_significant)
        )
        w_top, order = torch.topk(w, cap, dim=1, largest=True, sorted=True)
        cum = torch.cumsum(w_top, 1)
        count = 1 + (cum < adaptive_fraction).sum(1)
        count = torch.minimum(count, (w_top > 0).sum(1)).clamp(min=1, max=cap)
        keep = torch.arange(cap, device=device)[None] < count[:, None]
        kr, kc = torch.nonzero(keep, as_tuple=True)
        flat = order[kr, kc]
        tt, oo = flat // m, flat % m
        ori = oo if cand is None else cand[kr, oo]
        rows_all.append(kr + i)
        ori_all.append(ori)
        tr_all.append(tt)
        w_all.append(w_top[kr, kc])
        f0 = order[:, 0]
        rows = torch.arange(c, device=device)
        best_o.append(f0 % m if cand is None else cand[rows, f0 % m])
        best_t.append(f0 // m)
        pmax.append(w_top[:, 0])
        n_sig.append(count)
        log_s_all.append(log_s)
        min_all.append(dmin)

    best_t_idx = torch.cat(best_t)
    if mode == "cc":
        log_likelihood = torch.zeros(b, dtype=torch.float64, device=device)
    else:
        const = ((x.real**2 + x.imag**2) / (2.0 * batch.sigma2))[:, 1:].sum(-1)
        log_two_pi = torch.log(2.0 * math.pi * batch.sigma2[:, 1:].double()).sum(-1)
        log_likelihood = (
            torch.cat(log_s_all) - (torch.cat(min_all) + const.double()) - log_two_pi
        )
    return EStep3DResult(
        best_orientation=torch.cat(best_o),
        best_offset_px=batch.offset_px.to(torch.float64) + t_grid[best_t_idx],
        pmax=torch.cat(pmax),
        n_significant=torch.cat(n_sig),
        log_likelihood=log_likelihood,
        samples=PoseSamples(
            particle_row=torch.cat(rows_all),
            orientation=torch.cat(ori_all),
            translation=torch.cat(tr_all),
            weight=torch.cat(w_all),
        ),
    )


@dataclass
class SliceSums:
    """Per-orientation back-projection rows and the model statistics of a batch.

    Attributes
    ----------
    orientation
        ``(u,)`` int64 distinct rows of the reference table that received weight.
    data
        ``(u, p)`` complex ``Σ w·(s·CTF/σ²)·X_unmasked·φ_t`` (DC included).
    weight
        ``(u, p)`` real ``Σ w·(s·CTF)²/σ²``.
    noise_power
        ``(g_o, f)`` ``Σ w·|s·CTF·P − X_masked·φ_t|²`` per optics group and shell.
    noise_weight
        ``(g_o,)`` ``Σ w``.
    scale_xa, scale_aa
        ``(g,)`` per scale group ``Σ w·Re(conj(CTF·P)·X)/s`` and ``Σ w·|CTF·P|²``.
    offset2_sum
        ``Σ w·|o_abs|²`` (px²).
    weight_sum
        ``Σ w``.
    """

    orientation: torch.Tensor
    data: torch.Tensor
    weight: torch.Tensor
    noise_power: torch.Tensor
    noise_weight: torch.Tensor
    scale_xa: torch.Tensor
    scale_aa: torch.Tensor
    offset2_sum: float
    weight_sum: float


def accumulate_slices(
    batch: EStepBatch,
    result: EStep3DResult,
    references: torch.Tensor,
    translations_px: torch.Tensor,
    pixel_set: PixelSet,
    *,
    n_optics_groups: int,
    n_groups: int,
    max_chunk_bytes: int = 1 << 26,
) -> SliceSums:
    """Sufficient statistics of a batch (spec §A.6.6, per 3D orientation).

    Samples are grouped per (particle, orientation); ``Σ_t w_t·φ_t`` is a GEMM
    ``(rows, t) × (t, p)``. The back-projection rows are then summed per orientation
    (all particles seen at one orientation share one central slice).

    Parameters
    ----------
    batch, result
        E-step inputs and outputs.
    references
        ``(q, p)`` complex projections used in the E-step.
    translations_px
        ``(t, 2)`` translation grid.
    pixel_set
        Pixels of the current size.
    n_optics_groups, n_groups
        Number of optics and scale groups.
    max_chunk_bytes
        Bound on temporary memory.

    Returns
    -------
    SliceSums
    """
    device = references.device
    cdtype = references.dtype
    rdtype = references.real.dtype
    sm = result.samples
    b = batch.n_particles
    n_t = translations_px.shape[0]
    q = references.shape[0]
    p = pixel_set.n_pixels
    n_shells = pixel_set.n_shells
    phases = phase_shifts(
        translations_px.to(device), pixel_set.to(device), dtype=cdtype
    )
    # group samples by (particle, orientation)
    key = sm.particle_row * q + sm.orientation
    uniq, inv = torch.unique(key, return_inverse=True)
    n_rows = uniq.shape[0]
    rb = uniq // q
    ro = uniq % q
    wt = torch.zeros((n_rows, n_t), dtype=torch.float64, device=device)
    wt.index_put_((inv, sm.translation), sm.weight.to(torch.float64), accumulate=True)
    w_row = wt.sum(1)
    ori_keys, ori_slot = torch.unique(ro, return_inverse=True)
    u = ori_keys.shape[0]
    data = torch.zeros((u, p), dtype=cdtype, device=device)
    weight = torch.zeros((u, p), dtype=rdtype, device=device)
    s_ctf = batch.scale.to(rdtype)[:, None] * batch.ctf
    ctf_over_sigma2 = s_ctf / batch.sigma2
    recon = batch.images_unmasked_rfft.to(cdtype) * ctf_over_sigma2
    recon_w = s_ctf * ctf_over_sigma2
    xm = batch.images_masked_rfft.to(cdtype)
    og = batch.optics_group.to(device)
    grp = batch.group.to(device)
    noise_pixels = torch.zeros((n_optics_groups, p), dtype=torch.float64, device=device)
    xa = torch.zeros(n_groups, dtype=torch.float64, device=device)
    aa = torch.zeros(n_groups, dtype=torch.float64, device=device)
    step = max(1, min(n_rows, max_chunk_bytes // max(1, p * 8 * 8)))
    wt_c = wt.to(rdtype)
    for i in range(0, n_rows, step):
        sl = slice(i, i + step)
        rr = rb[sl]
        shift_sum = wt_c[sl].to(cdtype) @ phases  # (c, p) Σ_t w·φ_t
        cb = s_ctf[rr]
        model = references[ro[sl]] * cb  # s·CTF·P
        cross = (model.conj() * xm[rr] * shift_sum).real  # Σ_t w Re(conj(sCTFP) X φ)
        mpow = (model.real**2 + model.imag**2) * w_row[sl, None].to(rdtype)
        contrib = (mpow - 2.0 * cross).to(torch.float64)
        noise_pixels.index_add_(0, og[rr], contrib)
        s_r = batch.scale.to(torch.float64)[rr]
        xa.index_add_(0, grp[rr], cross.sum(1).to(torch.float64) / s_r)
        aa.index_add_(0, grp[rr], mpow.sum(1).to(torch.float64) / s_r**2)
        indexing.index_add_(data, 0, ori_slot[sl], recon[rr] * shift_sum)
        weight.index_add_(0, ori_slot[sl], recon_w[rr] * w_row[sl, None].to(rdtype))
    w_particle = torch.zeros(b, dtype=torch.float64, device=device).index_add_(
        0, sm.particle_row, sm.weight.to(torch.float64)
    )
    x_power = (xm.real**2 + xm.imag**2).to(torch.float64) * w_particle[:, None]
    noise_pixels.index_add_(0, og, x_power)
    noise_power = torch.zeros(
        (n_optics_groups, n_shells), dtype=torch.float64, device=device
    ).index_add_(1, pixel_set.ires.to(device), noise_pixels)
    noise_weight = torch.zeros(
        n_optics_groups, dtype=torch.float64, device=device
    ).index_add_(0, og, w_particle)
    t64 = translations_px.to(device=device, dtype=torch.float64)
    o_abs = batch.offset_px.to(torch.float64)[sm.particle_row] + t64[sm.translation]
    offset2 = float((sm.weight.to(torch.float64) * (o_abs**2).sum(-1)).sum())
    return SliceSums(
        orientation=ori_keys,
        data=data,
        weight=weight,
        noise_power=noise_power,
        noise_weight=noise_weight,
        scale_xa=xa,
        scale_aa=aa,
        offset2_sum=offset2,
        weight_sum=float(sm.weight.sum()),
    )
