"""Expectation step of reference-free 2D classification (spec §A.6), vectorised.

A mini-batch of particles is aligned against all classes in two passes:

1. **Coarse pass** over every (class ``k``, coarse ψ ``r``, coarse translation ``t``)
   on the pixels of the coarse image size. The squared differences

   ``diff2(b,k,r,t) = Σ_p |s·CTF·P_kr − X_b·φ_t|² / (2σ²)``

   are expanded as ``Σ|X|²/2σ² + Σ s²CTF²|P|²/2σ² − Re Σ conj(P_kr)·Y_b·φ_t`` with
   ``Y = (s·CTF/σ²)·X``. The second term is a real GEMM ``(b, p) × (p, k·r)``. Only the
   real part of the cross term is needed: ``A + B`` with ``A = Σ Re P·Re(Y·φ)`` and
   ``B = Σ Im P·Im(Y·φ)``, two real GEMMs ``(b·t, p) × (p, k·r)``. A class image is
   real, so its reference turned by 180° is the complex conjugate, whose cross term is
   ``A − B``: on a ψ grid whose second half is its first half turned by 180° (an even
   number of equally spaced angles), the GEMMs run over the first half only, half the
   arithmetic (:func:`_coarse_block`). The first term is pose independent and cancels
   in the weights.
2. **Significance** (§A.6.4): per particle, weights sorted descending are summed to
   ``adaptive_fraction`` of the total, at most ``max_significant`` samples.
3. **Fine pass** on the significant coarse samples only: each expands to 2 fine ψ × 4
   fine translations, evaluated on the pixels of the current size. With
   ``φ_{t_fine} = φ_{t_coarse}·φ_δ`` (``δ`` the fixed sub-offset of a fine translation),
   the cross terms of all samples of one (class, coarse ψ) pair are one GEMM
   ``(rows, 2p) × (2p, 8)`` of the gathered shifted images ``Y·φ_{t_coarse}`` with the
   pair's table ``P·conj(φ_δ)``, batched over the pairs with groups padded to a few
   sizes; the ``|P|²`` term is a GEMM over the pairs used. New minimum,
   weights, their sum ``S``, a second significance threshold (no cap), all in a dense
   per-particle ``(b, significant·8)`` layout; contributing weights are normalised by
   ``S``.

Reference tables, phases and interpolation plans depend only on the iteration (class
images, grids, pixel set), so they are built once and memoised on the projector
(:meth:`ClassProjector.memoised`), which lives for one iteration.

Reduced precision (``precision``, config key ``estep_precision``): the cross-term GEMM of
the coarse pass, the compute-bound part of the E-step, can run with ``"tf32"`` or
``"bf16"`` operands and fp32 accumulation (:func:`_scoring_matmul`). Everything else stays
as with ``"fp32"``: the ``|P|²`` and ``|X|²`` terms, the fine pass (whose GEMMs have 8
columns and are bound by memory traffic, not arithmetic), log-sum-exp and all
statistics. Reduced precision therefore only perturbs which coarse samples are
significant, and the significance test allows for it: with a per-particle bound ``ε`` on
the error of the coarse scores (:func:`_coarse_error_bound`), every coarse sample whose
log weight is within ``2ε`` of the largest is also kept (up to the cap), so the coarse
sample that is best in fp32 always reaches the fine pass. The fine ``diff2``, weights,
Pmax and log-likelihood of the samples kept are fp32; apart from samples at the edge of
the adaptive fraction, the results differ from fp32 only where the wider set holds more
probability or a better fine sample (docs/scaleout.md, "Reduced precision", gives the
measured tolerances).

Weights are handled in the log domain (log-sum-exp), so a particle always keeps at
least one significant sample, however large its ``diff2`` values are. The statistics
sum the contributing samples per (particle, class, ψ) first: ``Σ_t w_t·φ_t`` is a
sparse product ``(rows, t) × (t, p)`` (a row has weight on a few translations),
processed in cache-sized row chunks. The new norm corrections come from the statistics'
per-pixel sums (:class:`StatisticsUpdate`), not from the E-step.

Units and conventions
---------------------
* Translations ``t`` in pixels, ``(y, x)``, "shift the image by +t":
  ``φ_t(q) = exp(−2πi q·t/N)``. ψ in degrees; the reference at ψ is ``F_k(Rz(ψ) q)``
  (:mod:`cryoavg.class2d.projector`).
* Offset prior: isotropic Gaussian on the absolute offset
  ``o_abs = pixel_size·(offset_px + t)`` (Å) with mean ``μ_k`` (Å) and variance
  ``σ²_off`` (Å²), evaluated at the coarse translation (fine samples inherit the prior
  of their coarse parent, as RELION). This is the physically consistent form; RELION
  mixes pixel and Å units here (spec §A.11) and agrees only for 1 Å pixels.
* Class and offset priors are divided by their means over the sampled grid (the class
  prior over ``k``; the offset prior over the coarse translations, per particle and
  class); this leaves the weights unchanged and makes ``S`` an average likelihood
  ratio (§A.6.4).
* The log-likelihood contribution is
  ``ln S − (min diff2 + ½·Σ|X|²_beyond) − Σ_p ln(2πσ²)`` (§A.3, §A.6.5), where
  ``Σ|X|²_beyond`` is the masked power beyond the current size (RELION adds it
  un-weighted by σ²) and ``p`` runs over the likelihood pixels (``1 ≤ ires ≤ s/2``).
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal

import torch

from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import PixelSet, PsiGrid, TranslationGrid
from cryoavg.class2d.settings import ESTEP_PRECISIONS
from cryoavg.class2d.statistics import Class2DStatistics
from cryoavg.ops import indexing

__all__ = [
    "ESTEP_PRECISIONS",
    "EStepBatch",
    "EStepResult",
    "SignificantSamples",
    "StatisticsUpdate",
    "accumulate_statistics",
    "expectation_step",
    "phase_shifts",
    "prepare_estep_tables",
    "squared_differences",
    "statistics_update",
]

_DROP = 700.0  # diff2 − min above which a sample's weight is exactly zero (RELION)

#: ``torch.mm(a, b, out_dtype=torch.float32)`` for bf16 ``a``, ``b`` (CUDA only; newer
#: PyTorch): bf16 products accumulated *and returned* in fp32
_MM_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")

#: bound on the error of a reduced-precision scoring GEMM against the fp32 one, relative
#: to ``Σ_i |lhs_i·rhs_i|``: operand rounding (TF32 ≤ 2⁻¹⁰ per operand even when
#: truncating, bf16 ≤ 2⁻⁹ rounding to nearest, so ≤ 2⁻⁹ resp. 2⁻⁸ per product), the
#: result rounded to bf16 where the bf16 GEMM returns bf16 (≤ 2⁻⁹) and the fp32
#: accumulation of both results (n·2⁻²⁴ each: the totals stay within these values for
#: sums of up to n = 16 384 terms, i.e. 8 192 coarse pixels)
GEMM_ERROR_BOUND = {"tf32": 2.0**-8, "bf16": 2.0**-7}


@dataclass
class EStepBatch:
    """Per-particle inputs of the E-step (design doc, "Per-particle inputs").

    All Fourier vectors are gathered on a :class:`~cryoavg.class2d.sampling.PixelSet`
    of the current size (``p`` pixels, DC first, sorted by shell).

    Attributes
    ----------
    images_masked_rfft
        ``(b, p)`` complex: masked, pre-shifted by ``offset_px``, norm-corrected images.
    images_unmasked_rfft
        ``(b, p)`` complex: the same without the mask (back-projection only).
    ctf
        ``(b, p)`` real CTF (CTF² for CTF-premultiplied data, ones without CTF).
    scale
        ``(b,)`` intensity scale ``s`` of each particle's scale group.
    sigma2
        ``(b, p)`` noise variance σ²_o(ires) (per component) of the particle's optics
        group.
    offset_px
        ``(b, 2)`` rounded previous offset (yx, px) the images were shifted by.
    index
        ``(b,)`` int64 global particle indices (half set = index % 2).
    optics_group
        ``(b,)`` int64 optics group (0-based).
    group
        ``(b,)`` int64 scale / micrograph group (0-based).
    masked_power_beyond
        ``(b,)`` Σ|X_masked|² over shells beyond the current size.
    masked_shell_power_beyond
        ``(b, f)`` the same per shell (zero for shells ≤ current size / 2).
    norm_correction
        Optional ``(b,)`` previous ``rlnNormCorrection`` (the new one, computed with the
        statistics (:class:`StatisticsUpdate`), is ``old / avg_norm · sqrt(2E)``;
        without it ``sqrt(2E)``).
    """

    images_masked_rfft: torch.Tensor
    images_unmasked_rfft: torch.Tensor
    ctf: torch.Tensor
    scale: torch.Tensor
    sigma2: torch.Tensor
    offset_px: torch.Tensor
    index: torch.Tensor
    optics_group: torch.Tensor
    group: torch.Tensor
    masked_power_beyond: torch.Tensor
    masked_shell_power_beyond: torch.Tensor
    norm_correction: torch.Tensor | None = None

    @property
    def n_particles(self) -> int:
        """``b``."""
        return int(self.images_masked_rfft.shape[0])

    def to(self, device: torch.device | str) -> EStepBatch:
        """Copy on ``device``."""
        return EStepBatch(
            **{
                f.name: (
                    None
                    if getattr(self, f.name) is None
                    else getattr(self, f.name).to(device)
                )
                for f in fields(self)
            }
        )

    def rows(self, start: int, stop: int) -> EStepBatch:
        """The particles ``start:stop`` (views, no copy)."""
        return EStepBatch(
            **{
                f.name: (
                    None
                    if getattr(self, f.name) is None
                    else getattr(self, f.name)[start:stop]
                )
                for f in fields(self)
            }
        )


@dataclass
class SignificantSamples:
    """Sparse contributing fine samples of a batch (flat list of ``e`` entries).

    Attributes
    ----------
    particle_row
        ``(e,)`` int64 row in the batch.
    class_index
        ``(e,)`` int64 class (0-based).
    psi_fine_index
        ``(e,)`` int64 index into ``PsiGrid.fine_degrees``.
    trans_fine_index
        ``(e,)`` int64 index into ``TranslationGrid.fine_px``.
    weight
        ``(e,)`` weight normalised by ``S`` (sums to ≤ 1 per particle).
    """

    particle_row: torch.Tensor
    class_index: torch.Tensor
    psi_fine_index: torch.Tensor
    trans_fine_index: torch.Tensor
    weight: torch.Tensor

    @property
    def n_entries(self) -> int:
        """``e``."""
        return int(self.weight.shape[0])


@dataclass
class EStepResult:
    """Per-particle E-step outputs (design doc, §A.6.5).

    Attributes
    ----------
    best_class
        ``(b,)`` int64, 0-based.
    best_psi_degrees
        ``(b,)`` fine ψ of the best sample (incl. perturbation).
    best_offset_px
        ``(b, 2)`` yx: ``offset_px + t_fine`` (incl. perturbation).
    pmax
        ``(b,)`` largest normalised weight.
    n_significant
        ``(b,)`` int64 number of significant coarse samples.
    log_likelihood
        ``(b,)`` log-likelihood contribution.
    min_diff2
        ``(b,)`` smallest fine diff2 (incl. the pose-independent ``Σ|X|²/2σ²``).
    weight_sum
        ``(b,)`` Σ of the contributing normalised weights (≤ 1).
    samples
        The contributing fine samples.
    """

    best_class: torch.Tensor
    best_psi_degrees: torch.Tensor
    best_offset_px: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    log_likelihood: torch.Tensor
    min_diff2: torch.Tensor
    weight_sum: torch.Tensor
    samples: SignificantSamples


# --------------------------------------------------------------------------------------
# small helpers


def phase_shifts(
    translations_px: torch.Tensor,
    pixel_set: PixelSet,
    *,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype = torch.complex64,
) -> torch.Tensor:
    """Phase factors that shift an image by ``+t``: ``exp(−2πi (ky·ty + kx·tx)/N)``.

    Private stand-in for ``cryoavg.ops.shifts.phase_shift_dft_2d`` on a pixel set.

    Parameters
    ----------
    translations_px
        ``(t, 2)`` yx shifts (px).
    pixel_set
        Frequencies (or slice ``[start:stop]``), ``p`` pixels.
    start, stop
        Optional slice of the pixel set.
    dtype
        Complex dtype of the result.

    Returns
    -------
    torch.Tensor
        ``(t, p)`` complex.
    """
    device = pixel_set.ky.device
    n = pixel_set.box_size
    ky = pixel_set.ky[start:stop].to(torch.float64)
    kx = pixel_set.kx[start:stop].to(torch.float64)
    t = translations_px.to(device=device, dtype=torch.float64)
    angle = (-2.0 * math.pi / n) * (
        t[:, 0:1] * ky[None, :] + t[:, 1:2] * kx[None, :]
    )  # (t, p)
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


# --------------------------------------------------------------------------------------
# reduced-precision scoring GEMMs


def _check_precision(precision: str) -> None:
    if precision not in ESTEP_PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(ESTEP_PRECISIONS)}, got {precision!r}"
        )


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to TensorFloat-32 (10-bit mantissa, fp32 exponent), as fp32.

    Round to nearest, ties away from zero (the rounding of PTX ``cvt.rna.tf32.f32``), on
    the bit pattern: adding half a unit of the 13 dropped mantissa bits carries into the
    kept ones (and into the exponent at a binade's end). Used to emulate TF32 GEMMs off
    CUDA; float64 input is rounded through fp32 and returned as float64.

    Parameters
    ----------
    x
        Real tensor (float32 or float64), finite.

    Returns
    -------
    torch.Tensor
        Same shape and dtype.
    """
    x32 = x.to(torch.float32).contiguous()
    bits = x32.view(torch.int32)
    rounded = ((bits + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32)
    return rounded.to(x.dtype)


@contextlib.contextmanager
def _cuda_tf32_matmul() -> Iterator[None]:
    """Allow TF32 in CUDA float32 matmuls inside the block, then restore the setting.

    Uses ``torch.backends.cuda.matmul.fp32_precision`` where it exists (PyTorch ≥ 2.9,
    which refuses to mix it with the legacy flag once the new one was set), else the
    legacy ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    try:
        previous = matmul.fp32_precision
    except AttributeError:  # PyTorch < 2.9
        previous_flag = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = previous_flag
        return
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _native_bf16_fp32_output(device: torch.device) -> bool:
    return device.type == "cuda" and _MM_HAS_OUT_DTYPE


def _gemm_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A real GEMM operand (fp32/fp64) in the form :func:`_scoring_matmul` takes it.

    ``"fp32"``: ``x``. ``"bf16"``: ``x`` cast to bfloat16 (round to nearest even).
    ``"tf32"``: on CUDA ``x`` (the tensor cores round it); elsewhere ``x`` rounded to
    TF32 (:func:`round_to_tf32`), the emulation.
    """
    if precision == "bf16":
        return x.to(torch.bfloat16)
    if precision == "tf32" and x.device.type != "cuda":
        return round_to_tf32(x)
    return x


def _scoring_matmul(
    lhs: torch.Tensor, rhs: torch.Tensor, precision: str, dtype: torch.dtype
) -> torch.Tensor:
    """``lhs @ rhs`` of two :func:`_gemm_operand` operands, returned in ``dtype``.

    * ``"fp32"``: the plain GEMM.
    * ``"tf32"``: on CUDA with TF32 allowed for this GEMM only
      (:func:`_cuda_tf32_matmul`); elsewhere an fp32 GEMM of the TF32-rounded operands
      (their products are exact in fp32, so this is the TF32 arithmetic up to the order
      of summation).
    * ``"bf16"``: bf16 operands, fp32 accumulation. On CUDA with a PyTorch that has
      ``torch.mm(..., out_dtype=torch.float32)`` the result is returned in fp32;
      otherwise (CPU, older PyTorch) the bf16 GEMM returns bf16, i.e. the fp32 sum
      rounded to an 8-bit mantissa, which is what the CPU validation measures (an upper
      bound for the fp32-output path).

    Parameters
    ----------
    lhs, rhs
        ``(m, n)`` and ``(n, q)`` operands (views, e.g. transposed, are fine).
    precision
        One of :data:`ESTEP_PRECISIONS`.
    dtype
        Real dtype of the result.

    Returns
    -------
    torch.Tensor
        ``(m, q)``.
    """
    if precision == "bf16":
        if _native_bf16_fp32_output(lhs.device):
            return torch.mm(lhs, rhs, out_dtype=torch.float32).to(dtype)
        return torch.mm(lhs, rhs).to(dtype)
    if precision == "tf32" and lhs.device.type == "cuda":
        with _cuda_tf32_matmul():
            return (lhs @ rhs).to(dtype)
    return (lhs @ rhs).to(dtype)


def _segment_max(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    out = values.new_full((n,), -math.inf)
    return out.scatter_reduce(0, segment, values, reduce="amax", include_self=True)


def _segment_min(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    out = values.new_full((n,), math.inf)
    return out.scatter_reduce(0, segment, values, reduce="amin", include_self=True)


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    return values.new_zeros((n, *values.shape[1:])).index_add_(0, segment, values)


def _rows_per_chunk(bytes_per_row: int, max_chunk_bytes: int, n_rows: int) -> int:
    return max(1, min(max(n_rows, 1), max_chunk_bytes // max(1, bytes_per_row)))


def _log_class_prior(class_prior: torch.Tensor) -> torch.Tensor:
    """``log(π_k / mean π)``, ``−inf`` for ``π_k ≤ 0``. ``(k,)``."""
    pi = class_prior.to(torch.float64)
    positive = pi > 0
    log_pi = torch.where(positive, torch.log(pi.clamp(min=1e-300)), -math.inf)
    return log_pi - math.log(max(float(pi.clamp(min=0).mean()), 1e-300))


def _log_offset_prior(
    offset_px: torch.Tensor,
    translations_px: torch.Tensor,
    mu_angstrom: torch.Tensor,
    sigma2_offset: float,
    pixel_size: float,
) -> torch.Tensor:
    """Log offset prior ``(b, t, k)`` (float64), normalised per particle.

    The mean of its exponential over all translations *and* classes is 1 (§A.6.4: a
    constant per particle, which cancels when the weights are normalised). It is not
    normalised per class: a class whose prior offset ``μ_k`` lies far from the
    particle's offset pays for it in the class posterior, as in RELION. (Normalising
    over t within each class made an off-centre junk class free for centred particles.)
    """
    o_abs = pixel_size * (
        offset_px.to(torch.float64)[:, None, :] + translations_px[None]
    )  # (b, t, 2)
    mu = mu_angstrom.to(torch.float64)  # (k, 2)
    # y and x apart: a reduction over a last axis of 2 is slow on a CPU
    dy = o_abs[:, :, None, 0] - mu[None, None, :, 0]  # (b, t, k)
    dx = o_abs[:, :, None, 1] - mu[None, None, :, 1]
    log_p = (dy * dy + dx * dx).div_(-2.0 * sigma2_offset)  # (b, t, k)
    n_tk = log_p.shape[1] * log_p.shape[2]
    log_mean = torch.logsumexp(log_p.flatten(1), dim=1) - math.log(max(n_tk, 1))
    return log_p - log_mean[:, None, None]


# --------------------------------------------------------------------------------------
# coarse pass


def _coarse_cross_terms(
    weighted_images: torch.Tensor,
    model_weight: torch.Tensor,
    references: torch.Tensor,
    phases: torch.Tensor,
    *,
    precision: str = "fp32",
) -> torch.Tensor:
    """``Σ s²CTF²|P|²/2σ² − Re Σ conj(P)·Y·φ`` for one chunk of particles.

    Parameters
    ----------
    weighted_images
        ``(b, p)`` complex ``Y = s·CTF/σ²·X``.
    model_weight
        ``(b, p)`` real ``s²·CTF²/(2σ²)``.
    references
        ``(k, r, p)`` complex.
    phases
        ``(t, p)`` complex.
    precision
        Arithmetic of the cross-term GEMM (:data:`ESTEP_PRECISIONS`).

    Returns
    -------
    torch.Tensor
        ``(b, t, k, r)`` real (the pose-dependent part of diff2).
    """
    k, r, _ = references.shape
    return _coarse_block(
        weighted_images,
        model_weight,
        _planar(references),
        references.real**2 + references.imag**2,
        _planar(phases),
        half_turn=False,
        precision=precision,
    ).view(-1, phases.shape[0], k, r)


def _planar(z: torch.Tensor) -> torch.Tensor:
    """``(..., p)`` complex → ``(2, ..., p)`` real: real parts, then imaginary parts."""
    return torch.stack([z.real, z.imag])


def _coarse_block(
    weighted_images: torch.Tensor,
    model_weight: torch.Tensor,
    references: torch.Tensor,
    ref_power: torch.Tensor,
    phases: torch.Tensor,
    *,
    half_turn: bool,
    precision: str = "fp32",
    references_operand: _CoarseOperand | None = None,
) -> torch.Tensor:
    """:func:`_coarse_cross_terms` with prepared (planar) references.

    The cross term ``Re Σ conj(P)·Z`` of the shifted images ``Z = Y·φ`` is
    ``A + B`` with ``A = Σ Re P·Re Z`` and ``B = Σ Im P·Im Z``: two real GEMMs
    ``(b·t, p) × (p, k·h)``. With ``half_turn`` the ``h`` references of each class are
    the first half of a ψ grid whose second half is the first turned by 180°. A class
    image is real, so its transform turned by 180° is the complex conjugate
    (``P_{ψ+180°}(q) = F(−Rz(ψ) q) = conj P_ψ(q)``), whose cross term is ``A − B``:
    the same two GEMMs give all ``2h`` angles, half the arithmetic of one GEMM over
    all angles.

    Parameters
    ----------
    weighted_images, model_weight
        As :func:`_coarse_cross_terms`.
    references
        ``(2, k, h, p)`` real: real and imaginary parts of the references.
    ref_power
        ``(k, h, p)`` real ``|P|²`` (the same for the angles turned by 180°).
    phases
        ``(2, t, p)`` real: real and imaginary parts of the translations' phases.
    half_turn
        Whether to return the angles turned by 180° as well (see above).
    precision
        Arithmetic of the cross-term GEMMs (:data:`ESTEP_PRECISIONS`); the ``|P|²``
        term is always computed in the dtype of the inputs.
    references_operand
        ``references`` already prepared for ``precision`` (:func:`_coarse_operand`,
        memoised per iteration); ``None`` = convert here.

    Returns
    -------
    torch.Tensor
        ``(b, t, k·r)`` real, ``r = 2h`` with ``half_turn`` (angle ``j + h`` of a class
        is angle ``j`` turned by 180°), else ``h``.
    """
    b, p = weighted_images.shape
    t = phases.shape[1]
    _, k, h, _ = references.shape
    kh = k * h
    model = (model_weight @ ref_power.reshape(kh, p).T).view(b, 1, kh)  # (b, 1, k·h)
    rhs = (
        _gemm_operand(references, precision)
        if references_operand is None
        else references_operand.operand
    ).reshape(2, kh, p)
    # angle j of a class, then (with half_turn) angle j turned by 180°
    out = model.new_empty((b, t, k, 2 if half_turn else 1, h))
    # on a CPU, blocks of particles: the shifted images and both GEMM results of a block
    # stay in cache until they are combined; a GPU takes the chunk whole
    rows = COARSE_GEMM_ROWS if weighted_images.device.type == "cpu" else b * t
    step = max(1, rows // max(1, t))
    # contiguous real and imaginary parts: the broadcast products below run several
    # times faster on them than on the strided views of the complex tensor
    images_re = weighted_images.real.contiguous()  # (b, p)
    images_im = weighted_images.imag.contiguous()
    for i in range(0, b, step):
        c = min(b, i + step) - i
        y_re = images_re[i : i + c, None, :]
        y_im = images_im[i : i + c, None, :]
        # Z = Y·φ, real and imaginary parts: (c, t, p) each
        z_re = torch.mul(y_re, phases[0]).addcmul_(y_im, phases[1], value=-1.0)
        z_im = torch.mul(y_re, phases[1]).addcmul_(y_im, phases[0])
        a_term, b_term = (
            _scoring_matmul(
                _gemm_operand(z.view(c * t, p), precision), rhs[j].T, precision, z.dtype
            ).view(c, t, kh)
            for j, z in enumerate((z_re, z_im))
        )
        a_term.neg_().add_(model[i : i + c])  # |P|² term − A
        a_term = a_term.view(c, t, k, h)
        b_term = b_term.view(c, t, k, h)
        torch.sub(a_term, b_term, out=out[i : i + c, :, :, 0])
        if half_turn:
            torch.add(a_term, b_term, out=out[i : i + c, :, :, 1])
    return out.view(b, t, -1)


#: Rows (particles × translations) of the shifted images per GEMM block of
#: :func:`_coarse_block` on a CPU. On the public case's shapes (430 pixels, 300 columns)
#: the GEMM alone ran at 126 GFLOP/s in blocks of 672 rows and 96 GFLOP/s in one piece of
#: 5376; inside the E-step the difference was within the machine's noise.
COARSE_GEMM_ROWS = 672


def squared_differences(
    images: torch.Tensor,
    ctf: torch.Tensor,
    scale: torch.Tensor,
    sigma2: torch.Tensor,
    references: torch.Tensor,
    phases: torch.Tensor,
    *,
    max_chunk_bytes: int = 1 << 28,
    precision: str = "fp32",
) -> torch.Tensor:
    """Full ``diff2(b,k,r,t) = Σ_p |s·CTF·P_kr − X_b·φ_t|² / (2σ²)`` by batched GEMMs.

    Parameters
    ----------
    images
        ``(b, p)`` complex ``X``.
    ctf, sigma2
        ``(b, p)`` real.
    scale
        ``(b,)``.
    references
        ``(k, r, p)`` complex ``P``.
    phases
        ``(t, p)`` complex ``φ``.
    max_chunk_bytes
        Bound on temporary memory (chunks over ``b``).
    precision
        Arithmetic of the cross-term GEMM (:data:`ESTEP_PRECISIONS`, see
        :func:`_scoring_matmul`); the ``|X|²`` and ``|P|²`` terms stay in the dtype of
        the inputs.

    Returns
    -------
    torch.Tensor
        ``(b, k, r, t)`` real.
    """
    _check_precision(precision)
    b, p = images.shape
    k, r, _ = references.shape
    t = phases.shape[0]
    s = scale.to(ctf.dtype)[:, None]
    y = images * (s * ctf / sigma2)  # (b, p)
    a = s * s * ctf * ctf / (2.0 * sigma2)  # (b, p)
    const = ((images.real**2 + images.imag**2) / (2.0 * sigma2)).sum(-1)  # (b,)
    elem = ctf.element_size()
    step = _rows_per_chunk(t * (4 * p + 2 * k * r) * elem, max_chunk_bytes, b)
    out = []
    for i in range(0, b, step):
        d = _coarse_cross_terms(
            y[i : i + step], a[i : i + step], references, phases, precision=precision
        )
        out.append(d + const[i : i + step, None, None, None])
    return torch.cat(out).permute(0, 2, 3, 1)  # (b, t, k, r) -> (b, k, r, t)


def _top_samples(
    log_w: torch.Tensor,
    group_max: torch.Tensor,
    q: int,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``q`` largest log weights of each row, found through the groups' maxima.

    A sample among a row's ``q`` largest lies in one of the ``q`` groups with the
    largest maxima (fewer than ``q`` samples, hence fewer than ``q`` groups, rank above
    it), so the top-k runs over the ``t·q`` samples of those groups instead of all
    ``t·u`` (ties may be broken otherwise than by a top-k over the whole row).

    Parameters
    ----------
    log_w
        ``(b, t, u)`` log weights: ``u`` groups (class, ψ) of ``t`` samples (translations).
    group_max
        ``(b, u)`` the maximum of each group.
    q
        Number of samples wanted (``≤ t·u``).
    rows
        Optional ``(l,)`` rows to take (default: all).

    Returns
    -------
    top : torch.Tensor
        ``(l, q)`` largest log weights, in decreasing order.
    index : torch.Tensor
        ``(l, q)`` int64 their flat indices into ``(t, u)``.
    """
    b, t, u = log_w.shape
    q_groups = min(q, u)
    if rows is None:
        rows = torch.arange(b, device=log_w.device)
    else:
        group_max = group_max.index_select(0, rows)
    _, groups = torch.topk(group_max, q_groups, dim=1, sorted=False)  # (l, q_g)
    translations = torch.arange(t, device=log_w.device)
    flat = (rows[:, None, None] * t + translations[:, None]) * u + groups[:, None]
    candidates = log_w.reshape(-1).index_select(0, flat.view(-1))  # (l·t·q_g,)
    top, j = torch.topk(candidates.view(-1, t * q_groups), q, dim=1, sorted=True)
    return top, (j // q_groups) * u + groups.gather(1, j % q_groups)


def _significant_dense(
    log_w: torch.Tensor,
    adaptive_fraction: float,
    max_significant: int | None,
    margin: torch.Tensor | None = None,
    n_translations: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Significant samples of dense log-weights (§A.6.4).

    Parameters
    ----------
    log_w
        ``(b, n)`` log weights (``−inf`` = dropped); each row has a finite maximum.
    adaptive_fraction
        Fraction of the total weight to keep.
    max_significant
        Cap on the count (``None``/≤0: none).
    margin
        Optional ``(b,)``: also keep every sample whose log weight is within
        ``margin`` of the largest (up to the cap).
    n_translations
        ``t``: the rows are laid out ``(t, n / t)`` (translation-major), which lets the
        top-k work on the best (class, ψ) groups only (:func:`_top_samples`).

    Returns
    -------
    order : torch.Tensor
        ``(b, m)`` flat sample indices sorted by decreasing weight.
    count : torch.Tensor
        ``(b,)`` int64 number of significant samples: the first ``count`` of ``order``.
    """
    b, n = log_w.shape
    m = (
        n
        if (max_significant is None or max_significant <= 0)
        else min(n, int(max_significant))
    )
    log_w3 = log_w.view(b, n_translations, n // n_translations)
    # most rows have a handful of significant samples: a short top-k for all rows
    # first, the full one only for the rows whose count may be longer
    first = min(m, SIGNIFICANT_FIRST_TOPK)
    group_max = log_w3.amax(1)  # (b, u)
    top, order = _top_samples(log_w3, group_max, first)
    # the total weight Σ exp(log_w − max): exponentials and their (pairwise) sum in
    # the input dtype, all terms ≤ 1 (relative error ~1e-7 in float32, which moves a
    # count only where a cumulative sum lies that close to the threshold). Arguments are
    # clamped a little above ln(smallest normal number): a CPU's exp is many times
    # slower where its result is subnormal, and the n clamped terms add at most
    # n·e⁴·1.2e-38 to a total ≥ 1 (the largest term), far below the sum's resolution.
    floor = math.log(torch.finfo(log_w.dtype).tiny) + 4.0
    total = (
        (log_w - top[:, :1]).clamp_(min=floor).exp_().sum(1).to(torch.float64)
    )  # (b,)
    count = _significant_count(top, total, adaptive_fraction, margin)
    if first < m:
        # rows whose first `first` samples may not be all: their full top-m
        longer = torch.nonzero(count >= first).squeeze(-1)  # (l,)
        order = torch.nn.functional.pad(order, (0, m - first))  # (b, m)
        if longer.numel():
            top_l, order_l = _top_samples(log_w3, group_max, m, longer)
            order[longer] = order_l
            count[longer] = _significant_count(
                top_l,
                total[longer],
                adaptive_fraction,
                None if margin is None else margin[longer],
            )
    count = count.clamp(max=m)
    return order, count


#: :func:`_significant_dense` first takes this many samples of every row, then all
#: ``max_significant`` of the rows that need more.
SIGNIFICANT_FIRST_TOPK = 16


def _significant_count(
    top: torch.Tensor,
    total: torch.Tensor,
    adaptive_fraction: float,
    margin: torch.Tensor | None,
) -> torch.Tensor:
    """Significant samples per row from its sorted largest log weights ``(b, m)``.

    The first ``count`` samples hold ``adaptive_fraction`` of ``total`` (``(b,)``,
    ``Σ exp(log_w − max)``) or, with ``margin``, lie within it of the largest. A count
    of ``m`` means "``m`` or more".
    """
    top = top.to(torch.float64)
    lmax = top[:, :1]  # (b, 1)
    w = torch.exp(top - lmax)  # (b, m)
    cum = torch.cumsum(w, dim=1)
    count = 1 + (cum <= adaptive_fraction * total[:, None]).sum(1)
    count = torch.minimum(count, (w > 0).sum(1)).clamp(min=1)
    if margin is not None:
        within = (top >= lmax - margin.to(torch.float64)[:, None]).sum(1)
        count = torch.maximum(count, within)
    return count


# --------------------------------------------------------------------------------------
# per-iteration tables (memoised on the projector, which lives for one iteration)


@dataclass
class _CoarseTables:
    """Coarse-pass tables: references and phases on the coarse pixels ``[1:n_coarse]``.

    Attributes
    ----------
    references
        ``(2, k, h, p_c)`` real and imaginary parts of the coarse references,
        ``h = r_c / 2`` angles per class with ``half_turn``, else ``h = r_c``.
    ref_power
        ``(k, h, p_c)`` real ``|P|²``.
    phases
        ``(2, t_c, p_c)`` real and imaginary parts of the coarse translations' phases.
    half_turn
        Whether the second half of the coarse ψ grid is the first turned by 180° (an
        even number of equally spaced angles), so that only the first half is stored
        (see :func:`_coarse_block`).
    """

    references: torch.Tensor
    ref_power: torch.Tensor
    phases: torch.Tensor
    half_turn: bool


def _half_turn_grid(psi_degrees: torch.Tensor) -> bool:
    """Whether angle ``j + r/2`` of the grid is angle ``j`` + 180° for every ``j``."""
    r = int(psi_degrees.shape[0])
    if r % 2:
        return False
    turn = torch.remainder(psi_degrees[r // 2 :] - psi_degrees[: r // 2] - 180.0, 360.0)
    return bool((torch.minimum(turn, 360.0 - turn) < 1e-9).all())


@dataclass
class _FineTables:
    """Fine-pass and statistics tables on all pixels of the current size (``p``).

    Attributes
    ----------
    references
        ``(k·r_f, p)`` complex ``P``; row ``k·r_f + ψ_fine`` (= ``2·(k·r_c + r) + m``).
    ref_power
        ``(k·r_f, p)`` real ``|P|²``.
    fine_q
        ``(k·r_c, 8, 2p)`` real, interleaved ``P_{k,2r+m}·conj(φ_δj)`` (row ``4m + j``),
        ``δ_j`` the sub-offset of fine translation ``4·t + j`` from its coarse parent:
        ``Re Σ conj(P)·Y·φ_{t_f} = fine_q · interleaved(Y·φ_{t_c})``.
    trans_phases
        ``(t_c, p)`` complex phases of the coarse translations.
    fine_phases_ri
        ``(t_f, 2p)`` real, interleaved phases of the fine translations.
    half_turn
        Whether fine angle ``j + r_f/2`` is angle ``j`` turned by 180°; its reference is
        then stored as the conjugate of angle ``j``'s, so their ``|P|²`` are equal.
    """

    references: torch.Tensor
    ref_power: torch.Tensor
    fine_q: torch.Tensor
    trans_phases: torch.Tensor
    fine_phases_ri: torch.Tensor
    half_turn: bool


def _coarse_tables(
    projector: ClassProjector,
    psi_grid: PsiGrid,
    translation_grid: TranslationGrid,
    pixel_set: PixelSet,
    n_coarse: int,
    cdtype: torch.dtype,
    max_chunk_bytes: int,
) -> _CoarseTables:
    device = projector.data.device

    def build() -> _CoarseTables:
        psi = psi_grid.coarse_degrees.to(device)
        half_turn = _half_turn_grid(psi)
        if half_turn:
            psi = psi[: psi.shape[0] // 2]
        refs = projector.rotated_references(
            psi, pixel_set, start=1, stop=n_coarse, max_chunk_bytes=max_chunk_bytes
        ).to(cdtype)  # (k, h, p_c)
        return _CoarseTables(
            references=_planar(refs),
            ref_power=refs.real**2 + refs.imag**2,
            phases=_planar(
                phase_shifts(
                    translation_grid.coarse_px.to(device),
                    pixel_set,
                    start=1,
                    stop=n_coarse,
                    dtype=cdtype,
                )
            ),
            half_turn=half_turn,
        )

    return projector.memoised(
        "estep-coarse",
        (psi_grid, translation_grid, pixel_set),
        (n_coarse, cdtype),
        build,
    )


@dataclass
class _CoarseOperand:
    """The coarse references prepared for a reduced-precision cross-term GEMM.

    Attributes
    ----------
    operand
        :func:`_gemm_operand` of the coarse references (``(2, k, h, p_c)``).
    reference_norm
        Largest reference norm ``max_{k,r} ‖P_kr‖`` (float64 scalar).
    """

    operand: torch.Tensor
    reference_norm: torch.Tensor


def _coarse_operand(
    projector: ClassProjector, coarse: _CoarseTables, precision: str
) -> _CoarseOperand | None:
    """The coarse references as GEMM operand for ``precision`` (memoised; fp32: None)."""
    if precision == "fp32":
        return None

    def build() -> _CoarseOperand:
        norm = coarse.ref_power.to(torch.float64).sum(-1).sqrt().amax()
        return _CoarseOperand(_gemm_operand(coarse.references, precision), norm)

    return projector.memoised(
        "estep-coarse-operand", (coarse.references,), (precision,), build
    )


def _coarse_error_bound(
    weighted_images: torch.Tensor, operand: _CoarseOperand, precision: str
) -> torch.Tensor:
    """Bound on ``|cross_reduced − cross_fp32|`` per particle, over all coarse samples.

    :data:`GEMM_ERROR_BOUND` times ``Σ_i |l_i·r_i| ≤ ‖l‖·‖r‖`` (Cauchy–Schwarz), with
    ``‖Y·φ_t‖ = ‖Y‖`` (unit phases) and the largest reference norm.

    Parameters
    ----------
    weighted_images
        ``(b, p_c)`` complex ``Y`` on the coarse pixels.
    operand
        The prepared references.
    precision
        ``"tf32"`` or ``"bf16"``.

    Returns
    -------
    torch.Tensor
        ``(b,)`` float64.
    """
    power = (weighted_images.real**2 + weighted_images.imag**2).to(torch.float64)
    return GEMM_ERROR_BOUND[precision] * power.sum(1).sqrt() * operand.reference_norm


def _fine_tables(
    projector: ClassProjector,
    psi_grid: PsiGrid,
    translation_grid: TranslationGrid,
    pixel_set: PixelSet,
    cdtype: torch.dtype,
    max_chunk_bytes: int,
) -> _FineTables:
    device = projector.data.device

    def build() -> _FineTables:
        psi = psi_grid.fine_degrees.to(device)
        half_turn = _half_turn_grid(psi)
        if half_turn:
            # the second half turned by 180°: the conjugate of the first (as in the
            # coarse tables), so the |P|² of the two halves are equal
            half = projector.rotated_references(
                psi[: psi.shape[0] // 2], pixel_set, max_chunk_bytes=max_chunk_bytes
            ).to(cdtype)  # (k, r_f/2, p)
            refs = torch.cat([half, half.conj_physical()], dim=1)  # (k, r_f, p)
        else:
            refs = projector.rotated_references(
                psi, pixel_set, max_chunk_bytes=max_chunk_bytes
            ).to(cdtype)  # (k, r_f, p)
        k, r_f, p = refs.shape
        trans_c = translation_grid.coarse_px.to(device)
        trans_f = translation_grid.fine_px.to(device)
        t_c = trans_c.shape[0]
        sub = trans_f.view(t_c, 4, 2) - trans_c[:, None, :]  # (t_c, 4, 2)
        if t_c and float((sub - sub[:1]).abs().max()) > 1e-9:
            raise ValueError("fine translations must be coarse ones plus fixed offsets")
        delta = phase_shifts(sub[0], pixel_set, dtype=cdtype)  # (4, p)
        q = refs.view(k, r_f // 2, 2, 1, p) * delta.conj().view(1, 1, 1, 4, p)
        fine = phase_shifts(trans_f, pixel_set, dtype=cdtype)  # (t_f, p)
        return _FineTables(
            references=refs.reshape(k * r_f, p),
            ref_power=(refs.real**2 + refs.imag**2).reshape(k * r_f, p),
            fine_q=torch.view_as_real(q).reshape(k * (r_f // 2), 8, 2 * p),
            trans_phases=phase_shifts(trans_c, pixel_set, dtype=cdtype),
            fine_phases_ri=torch.view_as_real(fine).reshape(-1, 2 * p),
            half_turn=half_turn,
        )

    return projector.memoised(
        "estep-fine", (psi_grid, translation_grid, pixel_set), (cdtype,), build
    )


def prepare_estep_tables(
    projector: ClassProjector,
    psi_grid: PsiGrid,
    translation_grid: TranslationGrid,
    pixel_set: PixelSet,
    *,
    coarse_size: int,
    dtype: torch.dtype = torch.complex64,
    max_chunk_bytes: int = 1 << 28,
    precision: str = "fp32",
) -> None:
    """Build the iteration's memoised reference tables now (else on the first E-step).

    The tables (rotated references and phases, coarse and fine) are the largest
    allocations that do not scale with the chunk; building them first lets the caller
    measure the memory left for the chunks.

    Parameters
    ----------
    projector, psi_grid, translation_grid, pixel_set, coarse_size
        As passed to :func:`expectation_step`.
    dtype
        Complex dtype of the particle transforms (``EStepBatch.images_masked_rfft``).
    max_chunk_bytes
        Bound on the temporaries of building them.
    precision
        As passed to :func:`expectation_step` (the coarse references are also kept as
        the GEMM operand of that precision).
    """
    _check_precision(precision)
    n_coarse = pixel_set.count_within(min(int(coarse_size), pixel_set.image_size))
    coarse = _coarse_tables(
        projector,
        psi_grid,
        translation_grid,
        pixel_set,
        n_coarse,
        dtype,
        max_chunk_bytes,
    )
    _coarse_operand(projector, coarse, precision)
    _fine_tables(
        projector, psi_grid, translation_grid, pixel_set, dtype, max_chunk_bytes
    )


# --------------------------------------------------------------------------------------
# fine pass helpers


def _unique_inverse(
    key: torch.Tensor, n_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(key, return_inverse=True)`` for keys in ``[0, n_keys)``.

    Uses a dense marker (no sort) when the key space is not much larger than the
    number of keys.
    """
    if n_keys > 8 * key.numel() + (1 << 16):
        return torch.unique(key, return_inverse=True)
    mark = torch.zeros(n_keys, dtype=torch.bool, device=key.device)
    mark[key] = True
    keys = torch.nonzero(mark).squeeze(-1)
    position = torch.cumsum(mark, 0) - 1
    return keys, position[key]


#: Bound on the coarse scores of one chunk of particles on a CPU (bytes).
COARSE_CHUNK_BYTES_CPU = 1 << 25

#: :meth:`StatisticsUpdate.apply_to` inserts the rows by sparse products over whole
#: (target, ψ) tables when they fill at least this fraction of the tables (below it, the
#: per-row scatter-adds do less work). Calibrated on CPU with
#: ``scripts/benchmark_class2d.py splat``.
DENSE_SPLAT_FILL = 0.25

#: Bytes of gathered shifted images per batched GEMM of the fine pass (cache sized).
FINE_TILE_BYTES = 1 << 21


def _size_classes(counts: torch.Tensor) -> torch.Tensor:
    """Padded size of each group of :func:`_fine_cross` (``(g,)`` int64 → ``(g,)``).

    Counts up to 8 are kept; larger ones are rounded up to a multiple of an eighth of
    their power of two (8, 9, …, 16, 18, 20, …, 32, 36, …), so padding adds at most
    12.5 % and the groups fall into a few dozen size classes at most.
    """
    octave = torch.floor(torch.log2(counts.to(torch.float64))).to(torch.int64)
    eighth = torch.clamp((1 << octave.clamp(min=0)) // 8, min=1)
    return (counts + eighth - 1) // eighth * eighth


def _fine_cross(
    fine_q: torch.Tensor,
    weighted_images: torch.Tensor,
    trans_phases: torch.Tensor,
    row: torch.Tensor,
    pair: torch.Tensor,
    trans_coarse: torch.Tensor,
    particle_offsets: list[int],
    max_chunk_bytes: int,
) -> torch.Tensor:
    """``Re Σ_p conj(P)·Y·φ`` of the 8 fine samples of each coarse sample.

    Uses ``φ_{t_f} = φ_{t_c}·φ_δ``: the samples of one (class, coarse ψ) pair ``u``
    share the pair's table ``fine_q[u]`` (see :class:`_FineTables`), so a group of
    ``c`` samples is one ``(c, 2p) × (2p, 8)`` product of their shifted images
    ``Y·φ_{t_c}`` with the table. The groups are padded to size classes
    (:func:`_size_classes`; padding rows are computed and dropped) and laid out, by
    padded size, in one buffer of rows built with whole-batch index operations. The
    groups of one size go through batched GEMMs (``torch.bmm``) whose gathered operand
    is at most :data:`FINE_TILE_BYTES`, so it stays in cache between the gather and the
    product. The only loop runs over these tiles, not over poses or groups.

    Parameters
    ----------
    fine_q
        ``(k·r_c, 8, 2p)`` real.
    weighted_images
        ``(b, p)`` complex ``Y``.
    trans_phases
        ``(t_c, p)`` complex.
    row, pair, trans_coarse
        ``(e,)`` particle row (ascending), pair ``k·r_c + r`` and coarse translation.
    particle_offsets
        ``(b + 1,)`` first entry of each particle (``row`` is sorted).
    max_chunk_bytes
        Bound on the shifted images held at once (chunks over particles).

    Returns
    -------
    torch.Tensor
        ``(e, 8)`` real, column ``4·m + j`` (fine ψ ``m``, fine translation ``j``).
    """
    b, p = weighted_images.shape
    t_c = trans_phases.shape[0]
    e = row.shape[0]
    device = row.device
    elem = weighted_images.real.element_size()
    width = 2 * p  # one gathered row: the shifted image of a sample, interleaved
    out = weighted_images.real.new_empty((e, 8))
    step = _rows_per_chunk(t_c * width * elem, max_chunk_bytes, b)
    for i0 in range(0, b, step):
        i1 = min(b, i0 + step)
        e0, e1 = particle_offsets[i0], particle_offsets[i1]
        if e1 == e0:
            continue
        # the distinct shifted images (particle, coarse translation) of the chunk
        zkey = (row[e0:e1] - i0) * t_c + trans_coarse[e0:e1]
        used, zpos = _unique_inverse(zkey, (i1 - i0) * t_c)  # (v,), (c,)
        z = indexing.index_select(weighted_images, 0, i0 + used // t_c)  # (v, p)
        z.mul_(indexing.index_select(trans_phases, 0, used % t_c))
        z_rows = torch.view_as_real(z).view(-1, width)  # (v, 2p)
        # groups: the samples of one pair, sorted by pair; (g,) groups
        pr = pair[e0:e1]
        perm = torch.argsort(pr, stable=True)
        counts = torch.bincount(pr, minlength=fine_q.shape[0])
        groups = torch.nonzero(counts).squeeze(-1)  # (g,) pair of each group
        size = counts[groups]
        group_of = torch.repeat_interleave(
            torch.arange(groups.shape[0], device=device), size
        )  # (c,) group of each sorted sample
        within = (
            torch.arange(e1 - e0, device=device)
            - (torch.cumsum(size, 0) - size)[group_of]
        )  # (c,) position in its group
        # padded layout: groups ordered by padded size, each a block of its size
        padded = _size_classes(size)  # (g,)
        rank = torch.argsort(padded, stable=True)  # (g,) groups by padded size
        padded_ranked = padded[rank]
        start = torch.empty_like(padded)
        start[rank] = torch.cumsum(padded_ranked, 0) - padded_ranked
        slot = start[group_of] + within  # (c,) row of each sorted sample
        n_padded = int(padded.sum())
        index = torch.zeros(n_padded, dtype=torch.int64, device=device)
        index[slot] = zpos[perm]  # padding rows read row 0
        pairs_ranked = groups[rank]
        sizes, n_groups = torch.unique_consecutive(padded_ranked, return_counts=True)
        prod = out.new_empty((n_padded, 8))
        max_rows = max(int(sizes.max()), FINE_TILE_BYTES // (width * elem))
        buffer = out.new_empty((max_rows, width))
        g_start, r_start = 0, 0
        for s, g_j in zip(sizes.tolist(), n_groups.tolist(), strict=True):
            per_tile = max(1, max_rows // s)
            for g0 in range(0, g_j, per_tile):
                n = min(g_j, g0 + per_tile) - g0
                r0 = r_start + g0 * s
                rows = torch.index_select(
                    z_rows, 0, index[r0 : r0 + n * s], out=buffer[: n * s]
                )
                tables = fine_q.index_select(
                    0, pairs_ranked[g_start + g0 : g_start + g0 + n]
                )  # (n, 8, 2p)
                torch.bmm(
                    rows.view(n, s, width),
                    tables.transpose(1, 2),
                    out=prod[r0 : r0 + n * s].view(n, s, 8),
                )
            g_start += g_j
            r_start += g_j * s
        out[e0 + perm] = prod[slot]
    return out


def _group_by_pose(
    particle_row: torch.Tensor,
    class_index: torch.Tensor,
    psi_index: torch.Tensor,
    trans_index: torch.Tensor,
    weight: torch.Tensor,
    n_classes: int,
    n_psi: int,
    n_trans: int,
    n_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group sparse samples by (particle, class, ψ), translation weights as dense rows.

    Parameters
    ----------
    particle_row, class_index, psi_index, trans_index
        ``(e,)`` int64 sample coordinates.
    weight
        ``(e,)`` sample weights.
    n_classes, n_psi, n_trans
        Sizes of the class, ψ and translation axes.
    n_rows
        Number of particles (rows).

    Returns
    -------
    row, cls, psi : torch.Tensor
        ``(n,)`` int64 coordinates of the distinct (particle, class, ψ) groups, sorted.
    trans_weight : torch.Tensor
        ``(n, t)`` weight of each translation in each group (dtype of ``weight``).
    """
    key = (particle_row * n_classes + class_index) * n_psi + psi_index  # (e,)
    keys, inverse = _unique_inverse(key, n_rows * n_classes * n_psi)  # (n,), (e,)
    trans_weight = weight.new_zeros((keys.shape[0], n_trans))
    trans_weight.index_put_((inverse, trans_index), weight, accumulate=True)
    return (
        keys // (n_classes * n_psi),
        (keys // n_psi) % n_classes,
        keys % n_psi,
        trans_weight,
    )


# --------------------------------------------------------------------------------------
# the E-step


def expectation_step(
    batch: EStepBatch,
    projector: ClassProjector,
    psi_grid: PsiGrid,
    translation_grid: TranslationGrid,
    pixel_set: PixelSet,
    *,
    class_prior: torch.Tensor,
    class_offset_prior_angstrom: torch.Tensor,
    sigma2_offset_angstrom2: float | torch.Tensor,
    pixel_size: float,
    coarse_size: int,
    max_significant: int | None = -1,
    adaptive_fraction: float = 0.999,
    max_chunk_bytes: int = 1 << 28,
    precision: str = "fp32",
) -> EStepResult:
    """Two-pass adaptive E-step of a mini-batch (spec §A.6.4, §A.6.5).

    Reference tables and phases that are the same for every chunk of an iteration are
    memoised on ``projector`` (keyed by the identity of the grids and the pixel set).

    Parameters
    ----------
    batch
        Particle data on ``pixel_set`` (``p`` pixels of the current size, DC first).
    projector
        Padded transforms of the ``k`` class images.
    psi_grid
        In-plane angles (coarse ``r_c``, fine ``2·r_c``), degrees.
    translation_grid
        Translations (coarse ``t_c``, fine ``4·t_c``), px.
    pixel_set
        Pixel set of the current image size (its ``image_size`` is ``current_size``).
    class_prior
        ``(k,)`` π_k; classes with π_k ≤ 0 are skipped.
    class_offset_prior_angstrom
        ``(k, 2)`` μ_k (yx, Å).
    sigma2_offset_angstrom2
        σ²_off (Å², > 0).
    pixel_size
        Å per pixel.
    coarse_size
        Image size of the coarse pass (px, ≤ current size).
    max_significant
        Cap on significant coarse samples per particle; ``-1`` (default) = ``5·k``
        (RELION's 2D VDAM value), ``None`` or ``0`` = no cap.
    adaptive_fraction
        Fraction of the weight kept by the significance thresholds (0.999).
    max_chunk_bytes
        Approximate bound on temporary memory per chunk.
    precision
        Arithmetic of the coarse pass's cross-term GEMM: ``"fp32"`` (default),
        ``"tf32"`` or ``"bf16"`` (:func:`_scoring_matmul`; see the module docstring for
        what stays in fp32).

    Returns
    -------
    EStepResult
    """
    _check_precision(precision)
    device = batch.images_masked_rfft.device
    rdtype = batch.ctf.dtype
    cdtype = batch.images_masked_rfft.dtype
    b = batch.n_particles
    k = projector.n_classes
    if max_significant is not None and max_significant < 0:
        max_significant = 5 * k
    n_coarse = pixel_set.count_within(min(int(coarse_size), pixel_set.image_size))
    psi_f = psi_grid.fine_degrees.to(device)
    trans_c = translation_grid.coarse_px.to(device)
    trans_f = translation_grid.fine_px.to(device)
    r_c, t_c = psi_grid.n_coarse, trans_c.shape[0]
    sigma2_off = float(sigma2_offset_angstrom2)
    coarse = _coarse_tables(
        projector,
        psi_grid,
        translation_grid,
        pixel_set,
        n_coarse,
        cdtype,
        max_chunk_bytes,
    )
    coarse_operand = _coarse_operand(projector, coarse, precision)
    fine = _fine_tables(
        projector, psi_grid, translation_grid, pixel_set, cdtype, max_chunk_bytes
    )

    x = batch.images_masked_rfft  # (b, p)
    s = batch.scale.to(rdtype)[:, None]  # (b, 1)
    y = x * (s * batch.ctf / batch.sigma2)  # (b, p) complex
    a = s * s * batch.ctf**2 / (2.0 * batch.sigma2)  # (b, p) real

    # ---- priors: (k,), (b, t_c, k)
    log_pi = _log_class_prior(class_prior.to(device))
    log_off = _log_offset_prior(
        batch.offset_px.to(device),
        trans_c,
        class_offset_prior_angstrom.to(device),
        sigma2_off,
        pixel_size,
    )
    log_prior = log_off + log_pi[None, None, :]  # (b, t_c, k) float64
    class_ok = log_pi > -math.inf  # (k,)
    all_classes_ok = bool(class_ok.all())

    # ---- pass 1: coarse
    p_c = n_coarse - 1
    elem = batch.ctf.element_size()
    # on a CPU, cache-sized chunks of the score tensor are faster; a GPU takes them whole
    coarse_bytes = (
        max_chunk_bytes
        if device.type == "cuda"
        else min(max_chunk_bytes, COARSE_CHUNK_BYTES_CPU)
    )
    step = _rows_per_chunk(t_c * (4 * p_c + 3 * k * r_c) * elem, coarse_bytes, b)
    orders, counts = [], []
    inf = torch.tensor(math.inf, dtype=rdtype, device=device)
    for i in range(0, b, step):
        # reduced precision: keep every sample that may be the best one in fp32 (its
        # score is off by at most ``bound``), so the fine pass still finds it
        margin = (
            None
            if coarse_operand is None
            else 2.0
            * _coarse_error_bound(
                y[i : i + step, 1:n_coarse], coarse_operand, precision
            )
        )
        d = _coarse_block(
            y[i : i + step, 1:n_coarse],
            a[i : i + step, 1:n_coarse],
            coarse.references,
            coarse.ref_power,
            coarse.phases,
            half_turn=coarse.half_turn,
            precision=precision,
            references_operand=coarse_operand,
        ).view(-1, t_c, k, r_c)
        if not all_classes_ok:
            d = torch.where(class_ok.view(1, 1, k, 1), d, inf)  # (c, t, k, r)
        c = d.shape[0]
        delta = d.sub_(d.reshape(c, -1).amin(1).view(c, 1, 1, 1))
        prior_c = log_prior[i : i + c, :, :, None].to(rdtype)  # (c, t, k, 1)
        if margin is None:
            # samples beyond the drop distance (diff2 − min > 700) are left in: their
            # weights, exp(−700 + prior differences) of the best one's, are negligible
            # in the total (see _significant_dense) and never significant
            lw = torch.sub(prior_c, delta, out=delta).reshape(c, -1)  # (c, t·k·r)
        else:
            drop = (_DROP + margin).view(c, 1, 1, 1)
            lw = (prior_c - delta).masked_fill_(delta > drop, -math.inf).reshape(c, -1)
        order, count = _significant_dense(
            lw, adaptive_fraction, max_significant, margin, n_translations=t_c
        )
        orders.append(order[:, : int(count.max())])
        counts.append(count)
    n_significant = torch.cat(counts)  # (b,)
    m_max = max(o.shape[1] for o in orders)
    order_c = torch.cat(
        [torch.nn.functional.pad(o, (0, m_max - o.shape[1])) for o in orders]
    )  # (b, M) flat index into (t_c, k, r_c), padded
    valid = torch.arange(m_max, device=device)[None] < n_significant[:, None]  # (b, M)
    row, col = torch.nonzero(valid, as_tuple=True)  # (e,) coarse samples, by particle
    flat = order_c[row, col]
    tc = flat // (k * r_c)
    kc = (flat // r_c) % k
    rc = flat % r_c
    e = row.shape[0]
    ends = torch.cumsum(n_significant, 0)  # (b,) end of each particle's samples
    offsets = [0, *ends.tolist()]

    # ---- pass 2: the 8 fine samples of each significant coarse sample
    y_lik = y.clone()
    y_lik[:, 0] = 0  # DC excluded from the likelihood
    a_lik = a.clone()
    a_lik[:, 0] = 0
    pair_e = kc * r_c + rc  # (e,)
    cross = _fine_cross(
        fine.fine_q,
        y_lik,
        fine.trans_phases,
        row,
        pair_e,
        tc,
        offsets,
        max_chunk_bytes,
    ).to(torch.float64)  # (e, 8)
    # Σ_p a·|P|² of the fine rows k·r_f + 2r + m used, (b, u) for the u distinct rows;
    # on a half-turn grid a row and the row turned by 180° share |P|² (one column)
    r_f = 2 * r_c
    psi_e = 2 * rc[:, None] + torch.arange(2, device=device)  # (e, 2) fine ψ
    if fine.half_turn:
        psi_e = psi_e % (r_f // 2)
    fine_rows = kc[:, None] * r_f + psi_e  # (e, 2)
    rows_used, row_pos = _unique_inverse(fine_rows.view(-1), k * r_f)  # (u,), (2e,)
    power = a_lik @ fine.ref_power.index_select(0, rows_used).T  # (b, u)
    power_e = power[row[:, None], row_pos.view(e, 2)].to(torch.float64)  # (e, 2)
    d_fine = power_e[:, :, None] - cross.view(e, 2, 4)  # (e, 2, 4)

    # dense per-particle layout (b, M·8); padding has diff2 = +inf, weight 0
    n8 = 8 * m_max
    dd = torch.full((b, m_max, 8), math.inf, dtype=torch.float64, device=device)
    dd[row, col] = d_fine.reshape(e, 8)
    min_pose = dd.view(b, -1).amin(1)  # (b,)
    delta = dd.sub_(min_pose[:, None, None])
    lp = torch.full((b, m_max), -math.inf, dtype=torch.float64, device=device)
    lp[row, col] = log_prior[row, tc, kc]
    lw = (lp[:, :, None] - delta).masked_fill_(delta > _DROP, -math.inf).view(b, n8)
    lmax = lw.amax(1)
    log_s = lmax + torch.log(torch.exp(lw - lmax[:, None]).sum(1))  # (b,)
    w = torch.exp(lw - log_s[:, None])  # (b, M·8) normalised by S

    # second significance threshold per particle (no cap): sort by −w, stable
    valid8 = valid.repeat_interleave(8, dim=1)  # (b, M·8)
    w_sorted, order = torch.sort(
        torch.where(valid8, w, -1.0), dim=1, descending=True, stable=True
    )
    w_pos = w_sorted.clamp(min=0.0)
    cum = torch.cumsum(w_pos, 1)
    total = w_pos.sum(1)
    below = (cum <= adaptive_fraction * total[:, None]) & (w_sorted >= 0)
    count = 1 + below.sum(1)
    count = torch.minimum(count, (w_sorted > 0).sum(1)).clamp(min=1)
    keep_sorted = torch.arange(n8, device=device)[None] < count[:, None]  # (b, M·8)
    keep_row, keep_pos = torch.nonzero(keep_sorted, as_tuple=True)
    keep_idx = order[keep_row, keep_pos]  # flat (M, 8) index, sorted by (row, −w)
    kc_pad = torch.zeros((b, m_max), dtype=torch.long, device=device)
    rc_pad = torch.zeros_like(kc_pad)
    tc_pad = torch.zeros_like(kc_pad)
    kc_pad[row, col] = kc
    rc_pad[row, col] = rc
    tc_pad[row, col] = tc

    def coordinates(
        rows: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = idx // 8
        return (
            kc_pad[rows, j],
            2 * rc_pad[rows, j] + (idx % 8) // 4,
            4 * tc_pad[rows, j] + idx % 4,
        )

    k_class, k_psi, k_trans = coordinates(keep_row, keep_idx)
    w_keep = w_sorted[keep_row, keep_pos]
    samples = SignificantSamples(
        particle_row=keep_row,
        class_index=k_class,
        psi_fine_index=k_psi,
        trans_fine_index=k_trans,
        weight=w_keep.to(rdtype),
    )
    rows_b = torch.arange(b, device=device)
    best_class, best_psi, best_trans = coordinates(rows_b, order[:, 0])
    best_offset = batch.offset_px.to(torch.float64) + trans_f[best_trans]

    # ---- per-particle outputs
    const = (
        ((x.real**2 + x.imag**2) / (2.0 * batch.sigma2))[:, 1:]
        .sum(-1)
        .to(torch.float64)
    )  # (b,)
    min_diff2 = const + min_pose
    log_two_pi_sigma2 = torch.log(
        2.0 * math.pi * batch.sigma2[:, 1:].to(torch.float64)
    ).sum(-1)
    beyond = batch.masked_power_beyond.to(torch.float64)
    log_likelihood = log_s - (min_diff2 + 0.5 * beyond) - log_two_pi_sigma2

    return EStepResult(
        best_class=best_class,
        best_psi_degrees=psi_f[best_psi].to(rdtype),
        best_offset_px=best_offset.to(rdtype),
        pmax=w_sorted[:, 0].to(rdtype),
        n_significant=n_significant,
        log_likelihood=log_likelihood,
        min_diff2=min_diff2,
        weight_sum=w_keep.new_zeros(b).index_add_(0, keep_row, w_keep),
        samples=samples,
    )


# --------------------------------------------------------------------------------------
# sufficient statistics


#: Cost model of the two forms of the per-pixel statistics, calibrated on CPU with
#: ``scripts/benchmark_class2d.py estep`` (per pixel, in units of one dense multiply-add):
#: per weighted row ``2.5·T + 85`` (gathers, scatters, elementwise passes), dense
#: ``T`` per (particle, reference row). The dense form is used when
#: ``density · (2.5·T + 85) > DENSE_STATISTICS_THRESHOLD · T``, i.e. from a density of
#: about 0.05 (T = 4 translations) to 0.3 (T = 84).
DENSE_STATISTICS_THRESHOLD = 1.0


def _prefer_dense(density: float, n_translations: int, threshold: float) -> bool:
    """Whether the dense-GEMM statistics are cheaper at this density (see above)."""
    return density * (2.5 * n_translations + 85.0) > threshold * n_translations


def _pixel_terms_dense(
    batch: EStepBatch,
    fine: _FineTables,
    *,
    rb: torch.Tensor,
    ref_row: torch.Tensor,
    trans_weight: torch.Tensor,
    good: torch.Tensor,
    s_ctf: torch.Tensor,
    recon: torch.Tensor,
    recon_weight: torch.Tensor,
    n_classes: int,
    n_psi: int,
    noise_pixels: torch.Tensor,
    max_chunk_bytes: int,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Per-pixel statistics of :func:`accumulate_statistics` as dense GEMMs.

    With ``R = k·r_f`` reference rows, ``T`` fine translations and the weights
    ``W[b, R, T]`` scattered densely, every per-row sum becomes a matrix product over
    the ``(particle, translation)`` columns ``Y[(b, t), p] = Z_b(p)·φ_t(p)``:

    * reconstruction ``D[h, R] = Σ_{b∈h, t} W·(s·CTF/σ²·X_unmasked)·φ_t``,
      weights ``Σ_{b∈h} (Σ_t W)·(s·CTF)²/σ²``;
    * noise ``Σ_b (s·CTF)²·Σ_R (Σ_t W)·|P_R|² − 2·Re(conj(P_R)·Σ_{b,t} W·s·CTF·X_masked·φ_t)``
      (added to ``noise_pixels`` per optics group);
    * scale terms per particle ``xa_b = Σ_{R,t} W·Re Σ_p good·conj(P_R)·s·CTF·X·φ_t`` and
      ``aa_b = Σ_R (Σ_t W)·Σ_p good·|P_R|²·(s·CTF)²``.

    Parameters
    ----------
    batch
        The E-step inputs (``b`` particles, ``p`` pixels).
    fine
        Fine tables (references ``(R, p)``, phases ``(T, 2p)``).
    rb, ref_row
        ``(n,)`` particle and reference row of each weighted (particle, class, ψ) group.
    trans_weight
        ``(n, T)`` translation weights of each group.
    good
        ``(k, p)`` 0/1 pixels used by the scale statistics.
    s_ctf, recon, recon_weight
        ``(b, p)`` s·CTF, s·CTF/σ²·X_unmasked (complex) and (s·CTF)²/σ².
    n_classes, n_psi
        ``k`` and ``r_f``.
    noise_pixels
        ``(g, p)`` float64 accumulator, updated in place.
    max_chunk_bytes
        Bound on the dense temporaries (chunks over particles).

    Returns
    -------
    keys, data_rows, weight_rows, xa, aa, residual
        ``(u,)`` accumulator keys ``half·R + row`` with weight, ``(u, p)`` complex
        and real row sums, ``(b,)`` per-particle scale terms, and ``(b,)`` float64
        ``Σ_p Σ_{R,t} W·(|s·CTF·P_R|² − 2·Re(conj(s·CTF·P_R)·X·φ_t))`` (the
        pose-dependent part of the norm correction's residual).
    """
    device = recon.device
    rdtype = s_ctf.dtype
    b, p = recon.shape
    n_ref = n_classes * n_psi
    n_t = trans_weight.shape[1]
    phases_ri = fine.fine_phases_ri.view(n_t, p, 2)
    phases = torch.view_as_complex(phases_ri)  # (T, p)
    refs_ri = torch.view_as_real(fine.references).reshape(n_ref, 2 * p)  # (R, 2p)
    good_rows = good.repeat_interleave(n_psi, dim=0)  # (R, p)
    g_ri = (torch.view_as_real(fine.references) * good_rows[..., None]).reshape(
        n_ref, 2 * p
    )  # interleaved good·(Re P, Im P): Re(good·conj(P)·Y) = g_ri · y_ri
    gp = fine.ref_power * good_rows  # (R, p)
    # scale (good pixels) and residual (all pixels) cross terms in one GEMM
    corr_refs = torch.cat([g_ri, refs_ri])  # (2R, 2p)
    half = (batch.index.to(device) % 2).to(torch.int64)  # (b,)
    og = batch.optics_group.to(device)
    xc = s_ctf * batch.images_masked_rfft  # (b, p) s·CTF·X_masked
    data = torch.zeros((2, n_ref, 2 * p), dtype=rdtype, device=device)
    weight = torch.zeros((2, n_ref, p), dtype=rdtype, device=device)
    row_weight = torch.zeros((2, n_ref), dtype=torch.float64, device=device)
    xa = torch.zeros(b, dtype=rdtype, device=device)
    aa = torch.zeros(b, dtype=rdtype, device=device)
    residual = torch.zeros(b, dtype=torch.float64, device=device)
    per_particle = 4 * (n_ref * n_t * 3 + n_t * p * 2 * 3)
    step = max(1, min(b, max_chunk_bytes // max(1, per_particle)))
    for b0 in range(0, b, step):
        b1 = min(b, b0 + step)
        c = b1 - b0
        inside = (rb >= b0) & (rb < b1)
        w = torch.zeros((c, n_ref, n_t), dtype=rdtype, device=device)
        w[rb[inside] - b0, ref_row[inside]] = trans_weight[inside]
        w_row = w.sum(2)  # (c, R)
        w_cols = w.permute(1, 0, 2).reshape(n_ref, c * n_t)  # (R, c·T)
        y_recon = torch.view_as_real(recon[b0:b1, None, :] * phases).reshape(
            c * n_t, 2 * p
        )
        y_masked = torch.view_as_real(xc[b0:b1, None, :] * phases).reshape(
            c * n_t, 2 * p
        )
        hb = half[b0:b1]
        for h in (0, 1):
            in_half = (hb == h).to(rdtype)  # (c,)
            if not bool(in_half.any()):
                continue
            cols = (w * in_half[:, None, None]).permute(1, 0, 2).reshape(n_ref, -1)
            data[h] += cols @ y_recon
            rows_h = w_row * in_half[:, None]  # (c, R)
            weight[h] += rows_h.T @ recon_weight[b0:b1]
            row_weight[h] += rows_h.sum(0, dtype=torch.float64)
        # noise: Σ_b (s·CTF)²·(w_row @ |P|²) − 2·Re(conj(P)·Σ W·s·CTF·X·φ)
        ctf2 = s_ctf[b0:b1].square()  # (c, p)
        model_power = (w_row @ fine.ref_power) * ctf2  # (c, p)
        ogc = og[b0:b1]
        for g in torch.unique(ogc).tolist():
            sel = ogc == g
            cols = (
                w_cols
                if bool(sel.all())
                else (
                    (w * sel.to(rdtype)[:, None, None])
                    .permute(1, 0, 2)
                    .reshape(n_ref, -1)
                )
            )
            z = (cols @ y_masked).view(n_ref, p, 2)  # Σ W·s·CTF·X·φ (R, p) re/im
            cross = (z * refs_ri.view(n_ref, p, 2)).sum(-1).sum(0)  # (p,) Re(conj(P)·z)
            noise_pixels[g] += model_power[sel].sum(
                0, dtype=torch.float64
            ) - 2.0 * cross.to(torch.float64)
        # scale: xa_b = Σ_{R,t} W·Re(good·conj(P)·Y), aa_b = Σ_R w_row·(good·|P|² @ ctf²)
        corr = (corr_refs @ y_masked.T).view(2, n_ref, c, n_t)  # (2, R, c, T)
        wc = w.permute(1, 0, 2)  # (R, c, T)
        xa[b0:b1] = (wc * corr[0]).sum((0, 2))
        aa[b0:b1] = (w_row * (ctf2 @ gp.T)).sum(1)
        residual[b0:b1] = model_power.sum(1, dtype=torch.float64) - 2.0 * (
            wc * corr[1]
        ).sum((0, 2), dtype=torch.float64)
    keys = torch.nonzero(row_weight.reshape(-1) > 0).squeeze(-1)  # (u,) half·R + row
    data_rows = torch.view_as_complex(
        data.view(2 * n_ref, p, 2).index_select(0, keys).contiguous()
    )
    weight_rows = weight.view(2 * n_ref, p).index_select(0, keys)
    return keys, data_rows, weight_rows, xa, aa, residual


def _pixel_terms_rows(
    batch: EStepBatch,
    fine: _FineTables,
    *,
    rb: torch.Tensor,
    rk: torch.Tensor,
    ref_row: torch.Tensor,
    trans_weight: torch.Tensor,
    slot: torch.Tensor,
    n_slots: int,
    good: torch.Tensor | None,
    s_ctf: torch.Tensor,
    recon: torch.Tensor,
    recon_weight: torch.Tensor,
    noise_pixels: torch.Tensor,
    max_chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel statistics of :func:`accumulate_statistics` per weighted row.

    For each weighted (particle, class, ψ) row with translation weights ``w_t`` the
    pixel-wise products are ``S = Σ_t w_t·φ_t`` (a sparse product: a row has a few
    weighted translations) and ``Q = conj(P)·S``. Only two things are done per row and
    pixel: the reconstruction row ``(s·CTF/σ²·X_unmasked)·S`` is added to its
    accumulator, and ``Q`` (and ``good·Q``) is summed per particle. The noise and scale
    terms then follow per particle:

    * ``Σ_rows Re(conj(s·CTF·P)·X·S) = s·CTF·Re(X·Σ_rows Q)``;
    * ``Σ_rows (Σ_t w)·|P|²·(s·CTF)²`` = ``(s·CTF)²·(W @ |P|²)`` with ``W[b, R]`` the
      rows' total weights (a sparse product), likewise with ``good·|P|²`` for ``aa``;
    * the weights ``Σ_rows (Σ_t w)·(s·CTF)²/σ²`` per accumulator row are a sparse
      ``(u, b)`` product with ``(s·CTF)²/σ²``.

    Parameters
    ----------
    batch
        The E-step inputs (``b`` particles, ``p`` pixels).
    fine
        Fine tables (references ``(R, p)``, ``R = k·r_f``; phases ``(T, 2p)``).
    rb, rk, ref_row
        ``(n,)`` particle, class and reference row of each weighted row.
    trans_weight
        ``(n, T)`` translation weights of each row.
    slot
        ``(n,)`` accumulator row (of ``n_slots``) of each row.
    n_slots
        ``u``, the number of accumulator rows.
    good
        ``(k, p)`` 0/1 pixels of the scale statistics; ``None`` = all.
    s_ctf, recon, recon_weight
        ``(b, p)`` s·CTF, s·CTF/σ²·X_unmasked (complex) and (s·CTF)²/σ².
    noise_pixels
        ``(g, p)`` float64 accumulator, updated in place.
    max_chunk_bytes
        Bound on the per-row temporaries (chunks over rows).

    Returns
    -------
    data_rows, weight_rows, xa, aa, residual
        ``(u, p)`` complex and real accumulator rows, ``(b,)`` per-particle scale terms,
        and ``(b,)`` float64 ``Σ_p Σ_rows (|s·CTF·P|²·Σ_t w − 2·Re(conj(s·CTF·P)·X·S))``
        (the pose-dependent part of the norm correction's residual).
    """
    device = recon.device
    rdtype = s_ctf.dtype
    b, p = recon.shape
    n = rb.shape[0]
    n_ref = fine.references.shape[0]
    xm = batch.images_masked_rfft
    og = batch.optics_group.to(device)
    w_row = trans_weight.sum(1)  # (n,) Σ_t w
    data_rows = torch.zeros((n_slots, p), dtype=recon.dtype, device=device)
    q_sum = torch.zeros((b, p), dtype=recon.dtype, device=device)  # Σ_rows Q
    q_good = q_sum if good is None else torch.zeros_like(q_sum)  # Σ_rows good·Q
    # chunks of ~1 MiB per (c, p) complex temporary
    step = _rows_per_chunk(p * 8 * 16, min(max_chunk_bytes, 1 << 24), n)
    for i in range(0, n, step):
        sl = slice(i, i + step)
        rr = rb[sl]
        c = rr.shape[0]
        shift_sum = torch.view_as_complex(
            indexing.sparse_rows_matmul(trans_weight[sl], fine.fine_phases_ri).view(
                c, p, 2
            )
        )  # (c, p) S = Σ_t w·φ_t (a few of the T translations per row carry weight)
        q = indexing.index_select(fine.references, 0, ref_row[sl]).conj_physical_()
        q.mul_(shift_sum)  # (c, p) conj(P)·S
        indexing.index_add_(q_sum, 0, rr, q)
        if good is not None:
            indexing.index_add_(q_good, 0, rr, q.mul_(good.index_select(0, rk[sl])))
        indexing.index_add_(
            data_rows, 0, slot[sl], indexing.index_select(recon, 0, rr).mul_(shift_sum)
        )
    # the rows' total weights as a (b, R) matrix: model power Σ_rows (Σ_t w)·|P|²
    row_weights = torch.zeros((b, n_ref), dtype=rdtype, device=device)
    row_weights[rb, ref_row] = w_row
    ctf2 = s_ctf.square()  # (b, p)
    power = indexing.sparse_rows_matmul(row_weights, fine.ref_power)  # (b, p)
    model = power * ctf2
    cross = (xm * q_sum).real * s_ctf  # (b, p) Σ_rows Re(conj(s·CTF·P)·X·S)
    per_pixel = (model - 2.0 * cross).to(torch.float64)  # (b, p)
    noise_pixels.index_add_(0, og, per_pixel)
    residual = per_pixel.sum(1)  # (b,)
    if good is None:
        xa = cross.sum(1)
        aa = model.sum(1)
    else:
        k = good.shape[0]
        good_power = (fine.ref_power.view(k, n_ref // k, p) * good[:, None]).view(
            n_ref, p
        )  # (R, p) good·|P|², each row with its class's pixels
        xa = ((xm * q_good).real * s_ctf).sum(1)
        aa = (indexing.sparse_rows_matmul(row_weights, good_power) * ctf2).sum(1)
    # weights Σ_rows (Σ_t w)·(s·CTF)²/σ² per accumulator row: a sparse (u, b) product
    slot_weights = torch.sparse_coo_tensor(
        torch.stack([slot, rb]), w_row, (n_slots, b), check_invariants=False
    )  # indices in range by construction
    weight_rows = torch.sparse.mm(slot_weights, recon_weight)  # (u, p)
    return data_rows, weight_rows, xa, aa, residual


#: the sums of :class:`Class2DStatistics` a :class:`StatisticsUpdate` holds densely (all
#: but the padded ``data`` / ``weight`` grids, which receive back-projected rows)
_SMALL_SUMS = (
    "class_weight",
    "offset_sum_angstrom",
    "sigma2_offset_sum",
    "noise_power",
    "noise_weight",
    "scale_xa",
    "scale_aa",
    "norm_sum",
    "weight_sum",
    "log_likelihood",
    "pmax_sum",
    "n_particles",
)


@dataclass
class StatisticsUpdate:
    """A batch's contribution to :class:`Class2DStatistics`, computed but not yet added.

    :func:`statistics_update` does all the work that allocates memory in proportion to
    the batch; :meth:`apply_to` only adds. Adding is resumable: an out-of-memory error
    inside :meth:`apply_to` (whose temporaries are a few MiB) leaves every row either
    added once or not at all, and calling it again adds the rest, so a caller that backs
    off and retries never adds a contribution twice or half.

    Attributes
    ----------
    sums
        Field name → tensor of the same shape and dtype as that field of the statistics,
        for the fields in ``_SMALL_SUMS``.
    data_rows
        ``(u, p)`` complex rows to back-project into ``data``.
    weight_rows
        ``(u, p)`` real rows to back-project into ``weight``.
    target
        ``(u,)`` int64 ``half·k + class`` of each row.
    psi_index
        ``(u,)`` int64 fine ψ of each row (into ``psi_degrees``).
    psi_degrees
        ``(r_f,)`` the fine ψ table.
    pixel_set
        Pixels of the rows.
    norm_correction
        ``(b,)`` float64 new norm correction of each particle (RELION computes it with
        the weighted sums too): ``sqrt(2E)``, times ``old / avg_norm`` when the batch
        has an old one, with ``E`` the weighted residual power
        ``Σ w·Σ_p |s·CTF·P − X·φ|²`` (DC included) plus the masked power beyond the
        current size. ``sums["norm_sum"]`` holds its sum.
    applied_rows
        Rows back-projected so far.
    sums_applied
        Whether ``sums`` have been added.
    """

    sums: dict[str, torch.Tensor]
    data_rows: torch.Tensor
    weight_rows: torch.Tensor
    target: torch.Tensor
    psi_index: torch.Tensor
    psi_degrees: torch.Tensor
    pixel_set: PixelSet
    norm_correction: torch.Tensor
    applied_rows: int = 0
    sums_applied: bool = False

    def apply_to(
        self,
        stats: Class2DStatistics,
        projector: ClassProjector,
        *,
        max_chunk_bytes: int = 1 << 28,
        splat: Literal["auto", "dense", "pairs"] = "auto",
    ) -> Class2DStatistics:
        """Add the contribution to ``stats`` in place (or what is left of it).

        Parameters
        ----------
        stats
            The running statistics (those the update was computed for).
        projector
            The class projector of the E-step (its adjoint inserts the rows).
        max_chunk_bytes
            Bound on the temporaries of one insertion step.
        splat
            How the rows are inserted: ``"dense"`` by sparse products over whole
            (target, ψ) tables (:meth:`ClassProjector.backproject_rows`), ``"pairs"``
            row by row (:meth:`ClassProjector.backproject_pairs`), ``"auto"`` (default)
            dense when the rows fill at least :data:`DENSE_SPLAT_FILL` of the tables of
            the targets they go to. Both give the same sums up to rounding.

        Returns
        -------
        Class2DStatistics
            ``stats``.
        """
        k2 = stats.data.shape[0] * stats.data.shape[1]  # 2·k
        big = stats.data.shape[-2]
        out_data = stats.data.view(k2, big, -1)
        out_weight = stats.weight.view(k2, big, -1)
        n = int(self.target.shape[0])
        if splat == "auto":
            n_targets = int(torch.unique(self.target).shape[0]) if n else 0
            fill = n / max(1, n_targets * int(self.psi_degrees.shape[0]))
            splat = "dense" if fill >= DENSE_SPLAT_FILL else "pairs"
        if splat == "dense":
            self._apply_dense(projector, out_data, out_weight, max_chunk_bytes)
        step = projector.pair_rows_per_step(self.pixel_set.n_pixels, max_chunk_bytes)
        while self.applied_rows < n:
            # one insertion step per call: its temporaries are all allocated before
            # anything is added, so an out-of-memory error leaves these rows untouched
            sl = slice(self.applied_rows, min(n, self.applied_rows + step))
            projector.backproject_pairs(
                self.data_rows[sl],
                self.target[sl],
                self.psi_degrees,
                self.pixel_set,
                out_data,
                weights=self.weight_rows[sl],
                out_weight=out_weight,
                target_index=self.target[sl],
                max_chunk_bytes=max_chunk_bytes,
                angle_index=self.psi_index[sl],
            )
            self.applied_rows = sl.stop
        if not self.sums_applied:
            for name, value in self.sums.items():
                getattr(stats, name).add_(value)  # same shape and dtype: no allocation
            self.sums_applied = True
        return stats

    def _apply_dense(
        self,
        projector: ClassProjector,
        out_data: torch.Tensor,
        out_weight: torch.Tensor,
        max_chunk_bytes: int,
    ) -> None:
        """The rows left, in steps of whole targets within the memory budget."""
        n = int(self.target.shape[0])
        r_f = int(self.psi_degrees.shape[0])
        per_target = projector.splat_rows_per_target(
            r_f, self.pixel_set.n_pixels, self.weight_rows.element_size()
        )
        targets_per_step = max(1, max_chunk_bytes // per_target)
        # first row of each run of equal targets (the rows are sorted by target)
        starts = torch.nonzero(self.target[1:] != self.target[:-1]).squeeze(-1) + 1
        bounds = [0, *starts.tolist(), n]
        while self.applied_rows < n:
            i0 = self.applied_rows
            first = bisect.bisect_right(bounds, i0) - 1  # the run holding row i0
            i1 = bounds[min(len(bounds) - 1, first + targets_per_step)]
            sl = slice(i0, i1)
            projector.backproject_rows(
                self.data_rows[sl],
                self.weight_rows[sl],
                self.target[sl],
                self.psi_index[sl],
                self.psi_degrees,
                self.pixel_set,
                out_data,
                out_weight,
            )
            self.applied_rows = i1


def accumulate_statistics(
    batch: EStepBatch,
    result: EStepResult,
    projector: ClassProjector,
    psi_grid: PsiGrid,
    translation_grid: TranslationGrid,
    pixel_set: PixelSet,
    stats: Class2DStatistics,
    *,
    mode: Literal["vdam", "em"] = "vdam",
    class_offset_prior_angstrom: torch.Tensor,
    pixel_size: float,
    ssnr: torch.Tensor | None = None,
    avg_norm: float = 1.0,
    max_chunk_bytes: int = 1 << 28,
    dense_threshold: float | None = DENSE_STATISTICS_THRESHOLD,
) -> Class2DStatistics:
    """Add a batch's contribution to the sufficient statistics (spec §A.6.6), in place.

    :func:`statistics_update` followed by :meth:`StatisticsUpdate.apply_to`; see there
    for what is accumulated and for the parameters.

    Returns
    -------
    Class2DStatistics
        ``stats``.
    """
    update = statistics_update(
        batch,
        result,
        projector,
        psi_grid,
        translation_grid,
        pixel_set,
        stats,
        mode=mode,
        class_offset_prior_angstrom=class_offset_prior_angstrom,
        pixel_size=pixel_size,
        ssnr=ssnr,
        avg_norm=avg_norm,
        max_chunk_bytes=max_chunk_bytes,
        dense_threshold=dense_threshold,
    )
    return update.apply_to(stats, projector, max_chunk_bytes=max_chunk_bytes)


def statistics_update(
    batch: EStepBatch,
    result: EStepResult,
    projector: ClassProjector,
    psi_grid: PsiGrid,
    translation_grid: TranslationGrid,
    pixel_set: PixelSet,
    stats: Class2DStatistics,
    *,
    mode: Literal["vdam", "em"] = "vdam",
    class_offset_prior_angstrom: torch.Tensor,
    pixel_size: float,
    ssnr: torch.Tensor | None = None,
    avg_norm: float = 1.0,
    max_chunk_bytes: int = 1 << 28,
    dense_threshold: float | None = DENSE_STATISTICS_THRESHOLD,
) -> StatisticsUpdate:
    """A batch's contribution to the sufficient statistics (spec §A.6.6), not yet added.

    For every contributing fine sample ``(b, k, ψ, t)`` with normalised weight ``w``:

    * reconstruction (per pseudo half ``index % 2``): ``w·(s·CTF/σ²)·X_unmasked·φ_t``
      (``"em"``) or ``w·(s·CTF/σ²)·(X_unmasked·φ_t − s·CTF·P)`` (``"vdam"``) and
      ``w·(s·CTF)²/σ²`` are summed per ``(half, k, ψ)`` row (``index_add_``), to be
      inserted once with :meth:`ClassProjector.backproject_pairs` (back-rotation by ψ,
      bilinear splatting on the padded grid); DC included;
    * noise ``w·|s·CTF·P − X_masked·φ_t|²`` per shell and optics group (incl. DC),
      plus the masked shell power beyond the current size once per particle;
      ``noise_weight += w``;
    * scale ``XA += w·Re(conj(CTF·P)·X)/…`` and ``AA += w·|CTF·P|²`` (divided by ``s``
      resp. ``s²`` as RELION), over pixels whose shell has ``SSNR_k > 3``;
    * class weights, offsets ``w·o_abs`` (Å), ``w·|μ_k − o_abs|²`` (Å²), LL, Pmax;
    * each particle's new norm correction from the same per-pixel sums
      (:attr:`StatisticsUpdate.norm_correction`), and their sum.

    Per (particle, class, ψ) group the translations are summed first
    (``Σ_t w_t·φ_t``, a GEMM); the pose-independent parts (``Σ w·|X|²``,
    ``P·Σ w·(s·CTF)²/σ²``) are added once per particle resp. accumulator row.

    Parameters
    ----------
    batch, result
        The E-step inputs and outputs.
    projector
        The class projector used in the E-step.
    psi_grid, translation_grid, pixel_set
        As passed to :func:`expectation_step`.
    stats
        The statistics the update is for (``Class2DStatistics.zeros(k, N, ...)``); only
        their shapes, dtypes and device are read here.
    mode
        ``"vdam"`` (residual back-projection) or ``"em"``.
    class_offset_prior_angstrom
        ``(k, 2)`` μ_k (yx, Å).
    pixel_size
        Å per pixel.
    ssnr
        ``(k, f)`` SSNR per class and shell for the scale statistics; ``None`` = use all
        pixels.
    avg_norm
        Model's average norm correction (only used with ``batch.norm_correction``).
    max_chunk_bytes
        Approximate bound on temporary memory per chunk.
    dense_threshold
        Compute the per-pixel sums as dense GEMMs over (particle × translation)
        columns (:func:`_pixel_terms_dense`) instead of per weighted row when the cost
        model says so (:data:`DENSE_STATISTICS_THRESHOLD`) and the dense accumulators
        fit in ``max_chunk_bytes``; 0 = always dense; ``None`` = always per row. Both
        give the same sums.

    Returns
    -------
    StatisticsUpdate
    """
    device = batch.images_masked_rfft.device
    rdtype = batch.ctf.dtype
    cdtype = batch.images_masked_rfft.dtype
    b = batch.n_particles
    k = projector.n_classes
    n_cur = pixel_set.n_pixels
    n_og, n_shells = stats.noise_power.shape
    sm = result.samples
    w = sm.weight.to(torch.float64)
    rows = sm.particle_row
    trans_f = translation_grid.fine_px.to(device)
    psi_f = psi_grid.fine_degrees.to(device)
    r_f = psi_f.shape[0]
    acc = stats.class_weight.dtype
    fine = _fine_tables(
        projector, psi_grid, translation_grid, pixel_set, cdtype, max_chunk_bytes
    )
    sums = {name: torch.zeros_like(getattr(stats, name)) for name in _SMALL_SUMS}

    # ---- class, offsets, scalars
    sums["class_weight"].index_add_(0, sm.class_index, w.to(acc))
    o_abs = pixel_size * (
        batch.offset_px.to(torch.float64)[rows] + trans_f[sm.trans_fine_index]
    )  # (e, 2) Å
    sums["offset_sum_angstrom"].index_add_(
        0, sm.class_index, (w[:, None] * o_abs).to(acc)
    )
    mu = class_offset_prior_angstrom.to(device=device, dtype=torch.float64)[
        sm.class_index
    ]  # (e, 2)
    sums["sigma2_offset_sum"].add_((w * ((mu - o_abs) ** 2).sum(-1)).sum().to(acc))
    sums["weight_sum"].add_(w.sum().to(acc))
    sums["log_likelihood"].add_(result.log_likelihood.to(torch.float64).sum().to(acc))
    sums["pmax_sum"].add_(result.pmax.to(torch.float64).sum().to(acc))
    sums["n_particles"].add_(float(b))
    og = batch.optics_group.to(device)
    sums["noise_weight"].index_add_(0, og[rows], w.to(acc))
    sums["noise_power"].index_add_(0, og, batch.masked_shell_power_beyond.to(acc))

    # ---- per-pixel terms, per (particle, class, ψ) group with Σ_t w·φ_t (GEMM)
    t_f = trans_f.shape[0]
    rb, rk, rpsi, wt = _group_by_pose(
        rows,
        sm.class_index,
        sm.psi_fine_index,
        sm.trans_fine_index,
        sm.weight.to(rdtype),
        k,
        r_f,
        t_f,
        b,
    )  # (n,) ×3, (n, t_f)
    n_rows = rb.shape[0]
    ref_row = rk * r_f + rpsi  # (n,) row of the reference table
    # accumulator rows: distinct (half, class, ψ)
    half = batch.index.to(device)[rb] % 2
    keys, slot = _unique_inverse((half * k + rk) * r_f + rpsi, 2 * k * r_f)  # (u,)
    u = keys.shape[0]
    key_class = (keys // r_f) % k
    key_psi = keys % r_f
    ires = pixel_set.ires.to(device)  # (p,)
    if ssnr is not None:
        good_shell = ssnr.to(device)[:, : int(ires.max()) + 1] > 3.0  # (k, f')
        good = good_shell[:, ires].to(rdtype)  # (k, p)
    else:
        good = torch.ones((k, n_cur), dtype=rdtype, device=device)
    # per-particle factors (b, p)
    s_ctf = batch.scale.to(rdtype)[:, None] * batch.ctf  # s·CTF
    ctf_over_sigma2 = s_ctf / batch.sigma2
    recon = batch.images_unmasked_rfft * ctf_over_sigma2  # s·CTF/σ²·X_unmasked
    recon_weight = s_ctf * ctf_over_sigma2  # (s·CTF)²/σ²
    xm = batch.images_masked_rfft
    noise_pixels = torch.zeros((n_og, n_cur), dtype=torch.float64, device=device)
    density = n_rows / max(1, b * k * r_f)
    # the dense form's accumulators: data (2, R, 2p) and weight (2, R, p), R = k·r_f
    dense_bytes = 2 * k * r_f * 3 * n_cur * s_ctf.element_size()
    use_dense = dense_threshold is not None and (
        dense_threshold == 0
        or (
            _prefer_dense(density, t_f, dense_threshold)
            and dense_bytes <= max_chunk_bytes
        )
    )
    if use_dense:
        # most (particle, class, ψ) combinations carry weight (early iterations): the
        # same sums as dense GEMMs over (particle, translation) columns
        dense = _pixel_terms_dense(
            batch,
            fine,
            rb=rb,
            ref_row=ref_row,
            trans_weight=wt,
            good=good,
            s_ctf=s_ctf,
            recon=recon,
            recon_weight=recon_weight,
            n_classes=k,
            n_psi=r_f,
            noise_pixels=noise_pixels,
            max_chunk_bytes=max_chunk_bytes,
        )
        keys, data_rows, weight_rows, xa, aa, residual = dense
        key_class = (keys // r_f) % k
        key_psi = keys % r_f
    else:
        data_rows, weight_rows, xa, aa, residual = _pixel_terms_rows(
            batch,
            fine,
            rb=rb,
            rk=rk,
            ref_row=ref_row,
            trans_weight=wt,
            slot=slot,
            n_slots=u,
            good=good if ssnr is not None else None,
            s_ctf=s_ctf,
            recon=recon,
            recon_weight=recon_weight,
            noise_pixels=noise_pixels,
            max_chunk_bytes=max_chunk_bytes,
        )
    # pose-independent Σ w·|X_masked|² once per particle
    w_particle = torch.zeros(b, dtype=torch.float64, device=device).index_add_(
        0, rows, w
    )
    x_power = (xm.real**2 + xm.imag**2).to(torch.float64) * w_particle[:, None]
    noise_pixels.index_add_(0, og, x_power)
    # norm correction sqrt(2E), E = Σ w·Σ_p |s·CTF·P − X·φ|² (incl. DC) + power beyond
    residual = (residual + x_power.sum(1)).clamp(min=0.0)
    norm_correction = torch.sqrt(
        2.0 * (residual + batch.masked_power_beyond.to(torch.float64))
    )
    if batch.norm_correction is not None:
        norm_correction = (
            norm_correction * batch.norm_correction.to(torch.float64) / avg_norm
        )
    sums["norm_sum"].add_(norm_correction.sum().to(acc))
    noise_shells = torch.zeros(
        (n_og, n_shells), dtype=torch.float64, device=device
    ).index_add_(1, ires, noise_pixels)
    sums["noise_power"].add_(noise_shells.to(acc))
    s64 = batch.scale.to(torch.float64)  # xa, aa: (b,) per particle
    grp = batch.group.to(device)
    sums["scale_xa"].index_add_(0, grp, (xa.to(torch.float64) / s64).to(acc))
    sums["scale_aa"].index_add_(0, grp, (aa.to(torch.float64) / s64**2).to(acc))
    if mode == "vdam":
        # Σ w·(s·CTF/σ²)·s·CTF·P per row = P·Σ w·(s·CTF)²/σ², in row chunks (the rows
        # can be as many as 2·k·r_f: no full-size temporaries)
        key_ref = key_class * r_f + key_psi
        n_keys = int(key_ref.shape[0])
        step = _rows_per_chunk(n_cur * 8 * 2, max_chunk_bytes, n_keys)
        for i in range(0, n_keys, step):
            sl = slice(i, i + step)
            data_rows[sl] -= (
                indexing.index_select(fine.references, 0, key_ref[sl]) * weight_rows[sl]
            )

    # insertion (back-rotation) into the padded accumulators, both halves at once, is
    # left to StatisticsUpdate.apply_to
    return StatisticsUpdate(
        sums=sums,
        data_rows=data_rows,
        weight_rows=weight_rows,
        target=keys // r_f,  # (u,) = half·k + class
        psi_index=key_psi,
        psi_degrees=psi_f,
        pixel_set=pixel_set,
        norm_correction=norm_correction,
    )
