"""RELION output files of one Class2D iteration (spec §B, §A.10, §A.1).

:func:`write_iteration` writes, for an output root such as ``Class2D/job013/run`` and
iteration ``NNN``, exactly the files ``relion_refine`` writes for a 2D run:

* ``run_itNNN_classes.mrcs`` — the ``K`` (masked) class images (§B.1);
* ``run_itNNN_1moment.mrcs`` / ``run_itNNN_2moment.mrcs`` — VDAM moments (§B.2);
* ``run_itNNN_model.star`` — ``model_general``, ``model_classes``, ``model_class_N``,
  ``model_groups``, ``model_optics_group_N`` (§B.3);
* ``run_itNNN_data.star`` — ``data_optics`` and ``data_particles`` (§B.4);
* ``run_itNNN_sampling.star`` — ``sampling_general`` (§B.6, not for iteration 0);
* ``run_itNNN_optimiser.star`` — written **last**: it is the commit marker of an
  iteration, the file ``--continue`` (and :mod:`cryoavg.class2d.continuation`) reads.

Every file is written atomically (:mod:`cryoavg.io.atomic`), so a reader sees either
the previous version of a file or the complete new one. Labels, block names and their
order follow the spec; values are formatted by :func:`cryoavg.io.star.write_star`
(RELION's ``MetaDataTable::write`` layout).

Conventions
-----------
* Names written inside STAR files are built from ``root`` as given (RELION writes
  project-relative names such as ``000001@Class2D/job013/run_it025_classes.mrcs``);
  files are created relative to the current directory, like RELION.
* ``Class2DState.class_offset_prior_angstrom`` is ``(y, x)``; the STAR file has
  ``rlnClassPriorOffsetX`` / ``rlnClassPriorOffsetY`` in Å.
* Moments are stored in the state as un-shifted half planes (row ``i`` is ``ky = i`` for
  ``i < P/2`` else ``i − P``); the files hold rows in centred order starting at
  ``ky = −P/2`` with real and imaginary parts interleaved along x (§B.2).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

import cryoavg
from cryoavg.class2d.mstep import estimated_resolution_angstrom
from cryoavg.class2d.sampling import PsiGrid, TranslationGrid
from cryoavg.class2d.schedule import VdamSchedule
from cryoavg.io import star as labels
from cryoavg.io.mrc import write_mrc
from cryoavg.io.particles import ParticleTable, format_image_name
from cryoavg.io.star import RELION_STAR_VERSION, write_star

#: Per-class values: a sequence, NumPy array or tensor.
ArrayLike = Sequence[float] | np.ndarray | torch.Tensor

if TYPE_CHECKING:
    from cryoavg.class2d.settings import Class2DSettings
    from cryoavg.class2d.state import Class2DState

__all__ = [
    "DATA_ADDED_LABELS",
    "MODEL_CLASSES_LABELS",
    "MODEL_CLASS_SPECTRUM_LABELS",
    "MODEL_GENERAL_LABELS",
    "MODEL_GROUPS_LABELS",
    "MODEL_OPTICS_GROUP_LABELS",
    "OPTIMISER_LABELS",
    "SAMPLING_LABELS",
    "IterationChanges",
    "IterationPaths",
    "SamplingInfo",
    "decode_moment_sections",
    "encode_moment_sections",
    "iteration_paths",
    "optimiser_header_lines",
    "overall_fourier_completeness",
    "relion_command_line",
    "write_iteration",
]

# --------------------------------------------------------------------------------------
# label lists (spec §B), in the order RELION writes them
# --------------------------------------------------------------------------------------

#: ``data_model_general`` (§B.3.1, non-helical).
MODEL_GENERAL_LABELS: tuple[str, ...] = (
    labels.REFERENCE_DIMENSIONALITY,
    labels.DATA_DIMENSIONALITY,
    labels.ORIGINAL_IMAGE_SIZE,
    labels.CURRENT_RESOLUTION,
    labels.CURRENT_IMAGE_SIZE,
    labels.PADDING_FACTOR,
    labels.IS_HELIX,
    labels.FOURIER_SPACE_INTERPOLATOR,
    labels.MIN_RADIUS_NN_INTERPOLATION,
    labels.PIXEL_SIZE,
    labels.NR_CLASSES,
    labels.NR_BODIES,
    labels.NR_GROUPS,
    labels.NR_OPTICS_GROUPS,
    labels.TAU2_FUDGE_FACTOR,
    labels.NORM_CORRECTION_AVERAGE,
    labels.SIGMA_OFFSETS_ANGST,
    labels.ORIENTATIONAL_PRIOR_MODE,
    labels.SIGMA_PRIOR_ROT_ANGLE,
    labels.SIGMA_PRIOR_TILT_ANGLE,
    labels.SIGMA_PRIOR_PSI_ANGLE,
    labels.LOG_LIKELIHOOD,
    labels.AVERAGE_PMAX,
)

#: ``data_model_classes`` (§B.3.2); the two moment labels only for VDAM.
MODEL_CLASSES_LABELS: tuple[str, ...] = (
    labels.REFERENCE_IMAGE,
    labels.GRAD_MOMENT_1,
    labels.GRAD_MOMENT_2,
    labels.CLASS_DISTRIBUTION,
    labels.ACCURACY_ROTATIONS,
    labels.ACCURACY_TRANSLATIONS_ANGST,
    labels.ESTIMATED_RESOLUTION,
    labels.OVERALL_FOURIER_COMPLETENESS,
    labels.CLASS_PRIOR_OFFSET_X,
    labels.CLASS_PRIOR_OFFSET_Y,
)

#: ``data_model_class_N`` (§B.3.3), one row per shell.
MODEL_CLASS_SPECTRUM_LABELS: tuple[str, ...] = (
    labels.SPECTRAL_INDEX,
    labels.RESOLUTION,
    labels.ANGSTROM_RESOLUTION,
    labels.SSNR_MAP,
    labels.GOLD_STANDARD_FSC,
    labels.FOURIER_COMPLETENESS,
    labels.REFERENCE_SIGMA2,
    labels.REFERENCE_TAU2,
)

#: ``data_model_groups`` (§B.3.4).
MODEL_GROUPS_LABELS: tuple[str, ...] = (
    labels.GROUP_NUMBER,
    labels.GROUP_NAME,
    labels.GROUP_NR_PARTICLES,
    labels.GROUP_SCALE_CORRECTION,
)

#: ``data_model_optics_group_N`` (§B.3.5).
MODEL_OPTICS_GROUP_LABELS: tuple[str, ...] = (
    labels.SPECTRAL_INDEX,
    labels.RESOLUTION,
    labels.SIGMA2_NOISE,
)

#: Columns that ``run_itNNN_data.star`` adds to the input particle columns (§B.4).
DATA_ADDED_LABELS: tuple[str, ...] = (
    labels.ANGLE_ROT,
    labels.ANGLE_TILT,
    labels.ANGLE_PSI,
    labels.ORIGIN_X_ANGST,
    labels.ORIGIN_Y_ANGST,
    labels.CLASS_NUMBER,
    labels.NORM_CORRECTION,
    labels.LOG_LIKELI_CONTRIBUTION,
    labels.MAX_VALUE_PROB_DISTRIBUTION,
    labels.NR_OF_SIGNIFICANT_SAMPLES,
    labels.GROUP_NUMBER,
)

#: ``data_sampling_general`` of a 2D run (§B.6).
SAMPLING_LABELS: tuple[str, ...] = (
    labels.IS_3D_SAMPLING,
    labels.IS_3D_TRANSLATIONAL_SAMPLING,
    labels.PSI_STEP,
    labels.OFFSET_RANGE,
    labels.OFFSET_STEP,
    labels.HELICAL_OFFSET_STEP,
    labels.SAMPLING_PERTURB_INSTANCE,
    labels.SAMPLING_PERTURB_FACTOR,
    labels.HEALPIX_ORDER_ORIGINAL,
    labels.PSI_STEP_ORIGINAL,
    labels.OFFSET_RANGE_ORIGINAL,
    labels.OFFSET_STEP_ORIGINAL,
)

#: ``data_optimiser_general`` (§B.5, RELION 5.0, no split halves), in order.
OPTIMISER_LABELS: tuple[str, ...] = (
    "rlnOutputRootName",
    "rlnModelStarFile",
    "rlnExperimentalDataStarFile",
    "rlnTomoTomogramsFile",
    "rlnTomoTrajectoriesFile",
    "rlnOrientSamplingStarFile",
    "rlnCurrentIteration",
    "rlnNumberOfIterations",
    "rlnDoSplitRandomHalves",
    "rlnJoinHalvesUntilThisResolution",
    "rlnAdaptiveOversampleOrder",
    "rlnAdaptiveOversampleFraction",
    "rlnRandomSeed",
    "rlnParticleDiameter",
    "rlnWidthMaskEdge",
    "rlnDoZeroMask",
    "rlnDoSolventFlattening",
    "rlnDoSolventFscCorrection",
    "rlnSolventMaskName",
    "rlnSolventMask2Name",
    "rlnBodyStarFile",
    "rlnTauSpectrumName",
    "rlnMaximumCoarseImageSize",
    "rlnHighresLimitExpectation",
    "rlnLowresLimitExpectation",
    "rlnIncrementImageSize",
    "rlnDoMapEstimation",
    "rlnDoFastSubsetOptimisation",
    "rlnDoExternalReconstruct",
    "rlnDoBlush",
    "rlnBlushNoSpectralTrailing",
    "rlnDoGradientRefine",
    "rlnDoStochasticGradientDescent",
    "rlnGradEmIters",
    "rlnGradHasConverged",
    "rlnGradCurrentStepsize",
    "rlnGradSubsetOrder",
    "rlnGradSuspendFinerSamplingIter",
    "rlnGradSuspendLocalSamplingIter",
    "rlnSgdInitialIterationsFraction",
    "rlnSgdFinalIterationsFraction",
    "rlnSgdMinimumResolution",
    "rlnSgdInitialResolution",
    "rlnSgdFinalResolution",
    "rlnSgdInitialSubsetSize",
    "rlnSgdFinalSubsetSize",
    "rlnSgdMuFactor",
    "rlnSgdSkipAnneal",
    "rlnSgdClassInactivityThreshold",
    "rlnSgdSubsetSize",
    "rlnSgdWriteEverySubset",
    "rlnSgdStepsize",
    "rlnSgdStepsizeScheme",
    "rlnTau2FudgeScheme",
    "rlnTau2FudgeArg",
    "rlnMaximumSignificantPoses",
    "rlnDoAutoRefine",
    "rlnDoAutoSampling",
    "rlnAutoLocalSearchesHealpixOrder",
    "rlnNumberOfIterWithoutResolutionGain",
    "rlnBestResolutionThusFar",
    "rlnNumberOfIterWithoutChangingAssignments",
    "rlnDoSkipAlign",
    "rlnDoSkipRotate",
    "rlnOverallAccuracyRotations",
    "rlnOverallAccuracyTranslationsAngst",
    "rlnChangesOptimalOrientations",
    "rlnChangesOptimalOffsets",
    "rlnChangesOptimalClasses",
    "rlnSmallestChangesOrientations",
    "rlnSmallestChangesOffsets",
    "rlnSmallestChangesClasses",
    "rlnLocalSymmetryFile",
    "rlnDoHelicalRefine",
    "rlnIgnoreHelicalSymmetry",
    "rlnFourierMask",
    "rlnHelicalTwistInitial",
    "rlnHelicalRiseInitial",
    "rlnHelicalCentralProportion",
    "rlnNrHelicalNStart",
    "rlnHelicalMaskTubeInnerDiameter",
    "rlnHelicalMaskTubeOuterDiameter",
    "rlnHelicalSymmetryLocalRefinement",
    "rlnHelicalSigmaDistance",
    "rlnHelicalKeepTiltPriorFixed",
    "rlnHasConverged",
    "rlnHasHighFscAtResolLimit",
    "rlnHasLargeSizeIncreaseIterationsAgo",
    "rlnDoCorrectNorm",
    "rlnDoCorrectScale",
    "rlnDoCorrectCtf",
    "rlnDoCenterClasses",
    "rlnDoIgnoreCtfUntilFirstPeak",
    "rlnCtfDataArePhaseFlipped",
    "rlnDoOnlyFlipCtfPhases",
    "rlnRefsAreCtfCorrected",
    "rlnFixSigmaNoiseEstimates",
    "rlnFixSigmaOffsetEstimates",
    "rlnMaxNumberOfPooledParticles",
    "rlnOffsetRangeX",
    "rlnOffsetRangeY",
    "rlnOffsetRangeZ",
)

#: Accuracy / change values RELION writes before they are known.
UNKNOWN_ACCURACY = 999.0
UNKNOWN_CLASS_CHANGES = 9999999

#: RELION constants of a 2D run that cryoavg does not vary.
_INTERPOLATOR_LINEAR = 1
_MIN_RADIUS_NN = 10
_INCR_SIZE = 10
_HEALPIX_ORDER_2D = 2
_POOLED_PARTICLES = 3
_SGD_MIN_RESOLUTION_ANGSTROM = 20.0
_DEFAULT_OFFSET_PRIOR_SIGMA_ANGSTROM = 10.0

#: Per-particle columns stored as integers.
_INTEGER_PARTICLE_LABELS = (
    labels.CLASS_NUMBER,
    labels.NR_OF_SIGNIFICANT_SAMPLES,
    labels.GROUP_NUMBER,
    labels.OPTICS_GROUP,
    labels.RANDOM_SUBSET,
)


# --------------------------------------------------------------------------------------
# small value types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingInfo:
    """Orientational sampling of an iteration, as written to ``_sampling.star`` (§B.6).

    Attributes
    ----------
    psi_step_degrees
        Coarse in-plane step actually used (``360 / n_psi``, e.g. 12°).
    offset_range_px
        Translation search range (pixels).
    offset_step_px
        Coarse translation step (pixels, twice the user's fine step).
    perturbation
        Random perturbation of this iteration, a fraction of the coarse steps.
    perturbation_factor
        RELION ``--perturb`` (0.5).
    psi_step_original_degrees, offset_range_original_px, offset_step_original_px
        The values requested at the start (coarse); ``None`` = the current value.
    """

    psi_step_degrees: float
    offset_range_px: float
    offset_step_px: float
    perturbation: float = 0.0
    perturbation_factor: float = 0.5
    psi_step_original_degrees: float | None = None
    offset_range_original_px: float | None = None
    offset_step_original_px: float | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Class2DSettings,
        *,
        perturbation: float = 0.0,
        perturbation_factor: float = 0.5,
        n_psi_multiple: int = 1,
    ) -> SamplingInfo:
        """The sampling that :class:`~cryoavg.class2d.sampling.PsiGrid` builds.

        Parameters
        ----------
        settings
            Run options (fine ψ and translation steps, range).
        perturbation
            Perturbation of the iteration (fraction of the coarse step).
        perturbation_factor
            RELION ``--perturb``.
        n_psi_multiple
            Round the number of coarse angles up to a multiple of this (as for the
            E-step grid).

        Returns
        -------
        SamplingInfo
        """
        grid = PsiGrid.build(settings.psi_step_degrees, n_psi_multiple=n_psi_multiple)
        return cls(
            psi_step_degrees=grid.coarse_step_degrees,
            offset_range_px=float(settings.offset_range_px),
            offset_step_px=settings.offset_step_coarse_px,
            perturbation=float(perturbation),
            perturbation_factor=float(perturbation_factor),
            psi_step_original_degrees=settings.psi_step_coarse_degrees,
        )

    @classmethod
    def from_grids(
        cls,
        psi_grid: PsiGrid,
        translation_grid: TranslationGrid,
        *,
        perturbation_factor: float = 0.5,
        psi_step_original_degrees: float | None = None,
    ) -> SamplingInfo:
        """The sampling of the E-step grids of an iteration.

        Parameters
        ----------
        psi_grid, translation_grid
            The grids used (their perturbation is the iteration's perturbation).
        perturbation_factor
            RELION ``--perturb``.
        psi_step_original_degrees
            The coarse ψ step requested (``None`` = the grid's step).

        Returns
        -------
        SamplingInfo
        """
        return cls(
            psi_step_degrees=psi_grid.coarse_step_degrees,
            offset_range_px=translation_grid.offset_range_px,
            offset_step_px=translation_grid.coarse_step_px,
            perturbation=psi_grid.perturbation,
            perturbation_factor=float(perturbation_factor),
            psi_step_original_degrees=psi_step_original_degrees,
        )


@dataclass(frozen=True)
class IterationChanges:
    """Changes of the optimal hidden variables (``rlnChangesOptimal*``, §B.5).

    Attributes
    ----------
    orientations_degrees
        Mean change of the in-plane angle of the processed particles (°).
    offsets_angstrom
        RMS per-axis change of the offsets (Å).
    classes
        Fraction of the processed particles that changed class.
    smallest_orientations_degrees, smallest_offsets_angstrom, smallest_classes
        The smallest values so far (``rlnSmallestChanges*``).
    """

    orientations_degrees: float = UNKNOWN_ACCURACY
    offsets_angstrom: float = UNKNOWN_ACCURACY
    classes: float = float(UNKNOWN_CLASS_CHANGES)
    smallest_orientations_degrees: float = UNKNOWN_ACCURACY
    smallest_offsets_angstrom: float = UNKNOWN_ACCURACY
    smallest_classes: float = float(UNKNOWN_CLASS_CHANGES)


@dataclass(frozen=True)
class IterationPaths:
    """Names of the files of one iteration (as written inside the STAR files).

    Attributes
    ----------
    root
        Output root of the iteration, ``<output root>_itNNN``.
    classes, moment1, moment2, model, data, sampling, optimiser
        ``<root>_classes.mrcs``, ``_1moment.mrcs``, ``_2moment.mrcs``,
        ``_model.star``, ``_data.star``, ``_sampling.star``, ``_optimiser.star``.
    """

    root: str
    classes: str
    moment1: str
    moment2: str
    model: str
    data: str
    sampling: str
    optimiser: str


def iteration_paths(root: str | os.PathLike[str], iteration: int) -> IterationPaths:
    """File names of an iteration: ``<root>_itNNN_<suffix>``.

    Parameters
    ----------
    root
        Output root, e.g. ``Class2D/job013/run``.
    iteration
        Iteration number (≥ 0), written with at least three digits.

    Returns
    -------
    IterationPaths

    Raises
    ------
    ValueError
        A negative iteration.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    base = f"{os.fspath(root)}_it{int(iteration):03d}"
    return IterationPaths(
        root=base,
        classes=f"{base}_classes.mrcs",
        moment1=f"{base}_1moment.mrcs",
        moment2=f"{base}_2moment.mrcs",
        model=f"{base}_model.star",
        data=f"{base}_data.star",
        sampling=f"{base}_sampling.star",
        optimiser=f"{base}_optimiser.star",
    )


# --------------------------------------------------------------------------------------
# helpers: numbers, moments, per-class statistics
# --------------------------------------------------------------------------------------


def _numpy(value: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_complex():
            return value.numpy()
        return value.to(torch.float64 if dtype is np.float64 else value.dtype).numpy()
    return np.asarray(value, dtype=dtype)


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item())
    return float(value)


def _format_number(value: float) -> str:
    """Number as RELION's ``floatToString`` prints it on a command line (12, 0.1)."""
    number = float(value)
    if number == int(number) and abs(number) < 1e15:
        return str(int(number))
    return f"{number:g}"


def encode_moment_sections(moments: np.ndarray | torch.Tensor) -> np.ndarray:
    """Complex half planes → RELION moment-stack sections (§B.2).

    Parameters
    ----------
    moments
        ``(n, P, P // 2 + 1)`` complex, un-shifted rfft layout (row ``i`` is
        ``ky = i`` for ``i < P/2`` else ``i − P``).

    Returns
    -------
    numpy.ndarray
        ``float32 (n, P, 2 · (P // 2 + 1))``: rows in centred order (first row
        ``ky = −P/2``), real and imaginary parts interleaved along x.
    """
    array = _numpy(moments, np.complex64)
    if array.ndim != 3 or not np.iscomplexobj(array):
        raise ValueError(f"expected complex (n, P, P//2+1) moments, got {array.shape}")
    centred = np.fft.fftshift(array, axes=-2)
    out = np.empty((*centred.shape[:-1], 2 * centred.shape[-1]), dtype=np.float32)
    out[..., 0::2] = centred.real
    out[..., 1::2] = centred.imag
    return out


def decode_moment_sections(sections: np.ndarray) -> np.ndarray:
    """RELION moment-stack sections → complex un-shifted half planes (inverse).

    Parameters
    ----------
    sections
        ``(n, P, 2 · (P // 2 + 1))`` real sections (§B.2).

    Returns
    -------
    numpy.ndarray
        ``complex64 (n, P, P // 2 + 1)`` in the un-shifted rfft layout.
    """
    array = np.asarray(sections, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] % 2:
        raise ValueError(f"expected (n, P, 2·(P//2+1)) sections, got {array.shape}")
    complex_values = array[..., 0::2] + 1j * array[..., 1::2]
    return np.fft.ifftshift(complex_values, axes=-2).astype(np.complex64)


def _last_shell_with_ssnr_above_one(ssnr: np.ndarray) -> np.ndarray:
    """``maxres`` of §A.10.3: last shell before the first with SSNR < 1, per class."""
    below = ssnr < 1.0
    first = np.where(below.any(axis=-1), below.argmax(axis=-1), ssnr.shape[-1])
    return np.maximum(first - 1, 0).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _cube_shell_counts(maxres: int) -> np.ndarray:
    """Integer points of the cube ``|v_i| ≤ maxres − 1`` per shell ``floor(|v|)``.

    Returns
    -------
    numpy.ndarray
        ``(maxres + 1,)`` float64 counts (the 3D weighting of §A.10.4).
    """
    half = maxres - 1
    coords = np.arange(-half, half + 1, dtype=np.int64)
    squares = coords**2  # (c,)
    pair = np.bincount((squares[:, None] + squares[None, :]).ravel())  # (s2,)
    total = np.zeros(pair.size + int(squares.max()), dtype=np.float64)
    for square in squares.tolist():
        total[square : square + pair.size] += pair
    radius = np.floor(np.sqrt(np.arange(total.size, dtype=np.float64))).astype(np.int64)
    keep = radius <= maxres
    return np.bincount(radius[keep], weights=total[keep], minlength=maxres + 1)


def overall_fourier_completeness(
    ssnr: np.ndarray | torch.Tensor, completeness: np.ndarray | torch.Tensor
) -> np.ndarray:
    """``rlnOverallFourierCompleteness`` of each class (§A.10.4).

    The mean of the per-shell completeness ``C(floor(|v|))`` over the integer points
    ``v`` of the 3D cube ``|v_i| ≤ maxres − 1`` with ``floor(|v|) ≤ maxres`` (RELION
    uses this 3D neighbourhood for 2D data too), ``maxres`` as for
    ``rlnEstimatedResolution``.

    Parameters
    ----------
    ssnr
        ``(k, f)`` SSNR spectra.
    completeness
        ``(k, f)`` per-shell Fourier completeness.

    Returns
    -------
    numpy.ndarray
        ``(k,)`` float64. Classes with ``maxres = 0`` (empty classes, where RELION
        divides 0 by 0 and writes ``nan``) get 0.
    """
    ssnr_np = _numpy(ssnr)
    completeness_np = _numpy(completeness)
    maxres = _last_shell_with_ssnr_above_one(ssnr_np)
    result = np.zeros(ssnr_np.shape[0], dtype=np.float64)
    for k, shells in enumerate(maxres.tolist()):
        if shells < 1:
            continue
        counts = _cube_shell_counts(int(shells))
        result[k] = float(
            (counts * completeness_np[k, : shells + 1]).sum() / counts.sum()
        )
    return result


def _resolution_per_shell(box_size: int, pixel_size_angstrom: float) -> np.ndarray:
    """``rlnResolution`` (1/Å) of shells ``0 … N/2``."""
    return np.arange(box_size // 2 + 1, dtype=np.float64) / (
        box_size * pixel_size_angstrom
    )


def _angstrom_per_shell(box_size: int, pixel_size_angstrom: float) -> np.ndarray:
    """``rlnAngstromResolution`` of shells ``0 … N/2`` (999 for shell 0)."""
    shells = np.arange(box_size // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        values = box_size * pixel_size_angstrom / shells
    values[0] = 999.0
    return values


def _per_class(
    values: ArrayLike | None,
    n_classes: int,
    name: str,
) -> np.ndarray:
    if values is None:
        return np.full(n_classes, UNKNOWN_ACCURACY)
    array = _numpy(values).reshape(-1)
    if array.size != n_classes:
        raise ValueError(f"{name} must have {n_classes} values, got {array.size}")
    return array


# --------------------------------------------------------------------------------------
# command line (§A.1)
# --------------------------------------------------------------------------------------


def relion_command_line(
    settings: Class2DSettings,
    *,
    output_root: str | os.PathLike[str],
    input_star: str | os.PathLike[str] | None = None,
    continue_from: str | os.PathLike[str] | None = None,
    threads: int = 1,
    pool: int = _POOLED_PARTICLES,
    gpu_ids: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``relion_refine`` arguments that the Class2D GUI job would run (§A.1).

    Parameters
    ----------
    settings
        Run options. GUI values are the fine sampling steps; the command gets the
        coarse ones (``--psi_step 2·ψ``, ``--offset_step 2·step``).
    output_root
        ``--o`` (e.g. ``Class2D/job013/run``); ``--pipeline_control`` is its directory.
    input_star
        ``--i`` (new jobs).
    continue_from
        ``--continue`` (an ``_optimiser.star``); then the new-job-only options
        (``--i``, ``--ctf``, ``--K``, ``--flatten_solvent``, ``--zero_mask``,
        ``--strict_highres_exp``, ``--norm``, ``--scale``) are left out.
    threads, pool, gpu_ids
        ``--j``, ``--pool`` and ``--gpu``.
    extra_args
        Appended in the "other arguments" position (before ``--pipeline_control``).

    Returns
    -------
    list of str
        The arguments after the executable name, in the GUI's order. The random seed
        (``--random_seed``) and a non-default offset prior (``--offset``, Å) are
        passed among the other arguments.

    Raises
    ------
    ValueError
        Neither or both of ``input_star`` and ``continue_from``.
    """
    if (input_star is None) == (continue_from is None):
        raise ValueError("give exactly one of input_star (new job) or continue_from")
    root = os.fspath(output_root)
    is_new = continue_from is None
    args: list[str] = []
    if is_new:
        args += ["--o", root]
    else:
        args += ["--continue", os.fspath(continue_from), "--o", root]
    if settings.is_vdam:
        args += [
            "--grad",
            "--class_inactivity_threshold",
            _format_number(settings.class_inactivity_threshold),
            "--grad_write_iter",
            str(int(settings.write_every)),
        ]
    args += ["--iter", str(int(settings.n_iterations))]
    if is_new:
        args += ["--i", os.fspath(input_star)]  # type: ignore[arg-type]
    args += ["--dont_combine_weights_via_disc"]
    if settings.preread_images:
        args += ["--preread_images"]
    args += ["--pool", str(int(pool)), "--pad", str(int(settings.pad))]
    if is_new and settings.do_ctf:
        args += ["--ctf"]
        if settings.ctf_intact_first_peak:
            args += ["--ctf_intact_first_peak"]
    args += ["--tau2_fudge", _format_number(settings.tau2_fudge)]
    if settings.particle_diameter_angstrom is not None:
        args += [
            "--particle_diameter",
            _format_number(settings.particle_diameter_angstrom),
        ]
    if is_new:
        args += ["--K", str(int(settings.n_classes))]
        if settings.flatten_solvent:
            args += ["--flatten_solvent"]
        if settings.zero_mask:
            args += ["--zero_mask"]
        if settings.highres_limit_angstrom > 0:
            args += [
                "--strict_highres_exp",
                _format_number(settings.highres_limit_angstrom),
            ]
    if settings.center_classes:
        args += ["--center_classes"]
    args += [
        "--oversampling",
        "1",
        "--psi_step",
        _format_number(settings.psi_step_coarse_degrees),
        "--offset_range",
        _format_number(settings.offset_range_px),
        "--offset_step",
        _format_number(settings.offset_step_coarse_px),
    ]
    if is_new:
        if settings.do_norm:
            args += ["--norm"]
        if settings.do_scale:
            args += ["--scale"]
    args += ["--j", str(int(threads))]
    if gpu_ids is not None:
        args += ["--gpu", gpu_ids]
    args += ["--random_seed", str(int(settings.seed))]
    if settings.offset_prior_sigma_angstrom != _DEFAULT_OFFSET_PRIOR_SIGMA_ANGSTROM:
        args += ["--offset", _format_number(settings.offset_prior_sigma_angstrom)]
    args += [str(arg) for arg in extra_args]
    job_dir = os.path.dirname(root)
    args += ["--pipeline_control", f"{job_dir}/" if job_dir else "./"]
    return args


def optimiser_header_lines(command_line: str | Sequence[str]) -> list[str]:
    """The two comment lines that open ``run_itNNN_optimiser.star`` (§B.5).

    Parameters
    ----------
    command_line
        The arguments after the executable name: a list (joined with single spaces
        and followed by a space, as RELION writes them) or the finished string.

    Returns
    -------
    list of str
        ``# RELION optimiser; version cryoavg-<version>`` and ``# <command line>``.

    Raises
    ------
    ValueError
        The command line contains a line break.
    """
    if isinstance(command_line, str):
        text = command_line
    else:
        text = "".join(f"{arg} " for arg in command_line)
    if "\n" in text or "\r" in text:
        raise ValueError("the command line cannot contain line breaks")
    return [
        f"# RELION optimiser; version cryoavg-{cryoavg.__version__}",
        f"# {text}",
    ]


# --------------------------------------------------------------------------------------
# the files
# --------------------------------------------------------------------------------------


def _model_blocks(
    *,
    state: Class2DState,
    paths: IterationPaths,
    group_names: Sequence[str],
    group_particle_counts: Sequence[int] | np.ndarray,
    pixel_size_angstrom: float,
    accuracy_rotations_degrees: np.ndarray,
    accuracy_translations_angstrom: np.ndarray,
    write_moments: bool,
    image_name_digits: int,
) -> dict[str, Any]:
    k, n = state.n_classes, state.box_size
    p = float(pixel_size_angstrom)
    maxres = int(state.current_resolution_shell)
    current_resolution = n * p / maxres if maxres > 0 else math.inf
    general = {
        labels.REFERENCE_DIMENSIONALITY: 2,
        labels.DATA_DIMENSIONALITY: 2,
        labels.ORIGINAL_IMAGE_SIZE: n,
        labels.CURRENT_RESOLUTION: float(current_resolution),
        labels.CURRENT_IMAGE_SIZE: int(state.current_size),
        labels.PADDING_FACTOR: float(state.pad),
        labels.IS_HELIX: False,
        labels.FOURIER_SPACE_INTERPOLATOR: _INTERPOLATOR_LINEAR,
        labels.MIN_RADIUS_NN_INTERPOLATION: _MIN_RADIUS_NN,
        labels.PIXEL_SIZE: p,
        labels.NR_CLASSES: k,
        labels.NR_BODIES: 1,
        labels.NR_GROUPS: state.n_scale_groups,
        labels.NR_OPTICS_GROUPS: state.n_optics_groups,
        labels.TAU2_FUDGE_FACTOR: _scalar(state.tau2_fudge),
        labels.NORM_CORRECTION_AVERAGE: _scalar(state.avg_norm),
        labels.SIGMA_OFFSETS_ANGST: math.sqrt(
            max(_scalar(state.sigma2_offset_angstrom2), 0.0)
        ),
        labels.ORIENTATIONAL_PRIOR_MODE: 0,
        labels.SIGMA_PRIOR_ROT_ANGLE: 0.0,
        labels.SIGMA_PRIOR_TILT_ANGLE: 0.0,
        labels.SIGMA_PRIOR_PSI_ANGLE: 0.0,
        labels.LOG_LIKELIHOOD: _scalar(state.log_likelihood),
        labels.AVERAGE_PMAX: _scalar(state.average_pmax),
    }

    ssnr = _numpy(state.ssnr)
    completeness = _numpy(state.fourier_completeness)
    resolution = (
        estimated_resolution_angstrom(torch.as_tensor(ssnr, dtype=torch.float64), n, p)
        .cpu()
        .numpy()
    )
    offsets_yx = _numpy(state.class_offset_prior_angstrom)
    classes: dict[str, Any] = {
        labels.REFERENCE_IMAGE: [
            format_image_name(i, paths.classes, image_name_digits) for i in range(k)
        ]
    }
    if write_moments:
        classes[labels.GRAD_MOMENT_1] = [
            format_image_name(i, paths.moment1, image_name_digits) for i in range(k)
        ]
        classes[labels.GRAD_MOMENT_2] = [
            format_image_name(i, paths.moment2, image_name_digits) for i in range(k)
        ]
    classes.update(
        {
            labels.CLASS_DISTRIBUTION: _numpy(state.class_prior),
            labels.ACCURACY_ROTATIONS: accuracy_rotations_degrees.astype(np.float64),
            labels.ACCURACY_TRANSLATIONS_ANGST: accuracy_translations_angstrom.astype(
                np.float64
            ),
            labels.ESTIMATED_RESOLUTION: resolution.astype(np.float64),
            labels.OVERALL_FOURIER_COMPLETENESS: overall_fourier_completeness(
                ssnr, completeness
            ),
            labels.CLASS_PRIOR_OFFSET_X: offsets_yx[:, 1],
            labels.CLASS_PRIOR_OFFSET_Y: offsets_yx[:, 0],
        }
    )
    blocks: dict[str, Any] = {
        "model_general": general,
        "model_classes": pd.DataFrame(classes),
    }

    shells = np.arange(n // 2 + 1, dtype=np.int64)
    shell_resolution = _resolution_per_shell(n, p)
    shell_angstrom = _angstrom_per_shell(n, p)
    tau2 = _numpy(state.tau2)
    sigma2_class = _numpy(state.sigma2_class)
    for i in range(k):
        blocks[f"model_class_{i + 1}"] = pd.DataFrame(
            {
                labels.SPECTRAL_INDEX: shells,
                labels.RESOLUTION: shell_resolution,
                labels.ANGSTROM_RESOLUTION: shell_angstrom,
                labels.SSNR_MAP: ssnr[i],
                labels.GOLD_STANDARD_FSC: np.zeros(shells.size),
                labels.FOURIER_COMPLETENESS: completeness[i],
                labels.REFERENCE_SIGMA2: sigma2_class[i],
                labels.REFERENCE_TAU2: tau2[i],
            }
        )

    m = state.n_scale_groups
    names = [str(name) for name in group_names]
    counts = np.asarray(group_particle_counts).reshape(-1)
    if len(names) != m or counts.size != m:
        raise ValueError(
            f"the state has {m} scale groups but {len(names)} group names and "
            f"{counts.size} group particle counts were given"
        )
    blocks["model_groups"] = pd.DataFrame(
        {
            labels.GROUP_NUMBER: np.arange(1, m + 1, dtype=np.int64),
            labels.GROUP_NAME: names,
            labels.GROUP_NR_PARTICLES: np.rint(counts).astype(np.int64),
            labels.GROUP_SCALE_CORRECTION: _numpy(state.scale),
        }
    )

    sigma2_noise = _numpy(state.sigma2_noise)
    for g in range(state.n_optics_groups):
        used = sigma2_noise[g] > 0
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame(
            {
                labels.SPECTRAL_INDEX: shells[used],
                labels.RESOLUTION: shell_resolution[used],
                labels.SIGMA2_NOISE: sigma2_noise[g][used],
            }
        )
    return blocks


def _as_relion31(
    particles: pd.DataFrame | ParticleTable,
    optics: pd.DataFrame | None,
    pixel_size_angstrom: float,
    box_size: int,
    data_path: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Particles and optics tables in RELION ≥ 3.1 form (3.0 input converted)."""
    if isinstance(particles, ParticleTable):
        return particles.particles_table_relion31(), particles.optics_table()
    if optics is not None:
        return particles.copy(), optics.copy()
    columns = set(particles.columns)
    has_pixel = (
        labels.IMAGE_PIXEL_SIZE in columns
        or {
            labels.DETECTOR_PIXEL_SIZE,
            labels.MAGNIFICATION,
        }
        <= columns
    )
    table = ParticleTable(
        particles=particles,
        optics=None,
        path=Path(data_path),
        pixel_size_override_angstrom=None if has_pixel else pixel_size_angstrom,
    )
    frame = table.particles_table_relion31()
    optics_frame = table.optics_table()
    if labels.IMAGE_SIZE not in optics_frame.columns:
        position = optics_frame.columns.get_loc(labels.IMAGE_PIXEL_SIZE) + 1
        optics_frame.insert(position, labels.IMAGE_SIZE, np.int64(box_size))
    # RELION 3.1 keeps origins only in Å.
    if labels.ORIGIN_X_ANGST in frame.columns:
        frame = frame.drop(columns=[labels.ORIGIN_X_PX], errors="ignore")
    if labels.ORIGIN_Y_ANGST in frame.columns:
        frame = frame.drop(columns=[labels.ORIGIN_Y_PX], errors="ignore")
    return frame, optics_frame


def _as_integer_column(column: pd.Series) -> pd.Series:
    if pd.api.types.is_integer_dtype(column.dtype):
        return column.astype(np.int64)
    values = pd.to_numeric(column, errors="coerce")
    if values.isna().any() or not np.all(np.equal(np.mod(values, 1), 0)):
        return column
    return values.astype(np.int64)


def _data_blocks(
    particles: pd.DataFrame | ParticleTable,
    optics: pd.DataFrame | None,
    *,
    pixel_size_angstrom: float,
    box_size: int,
    data_path: str,
    input_columns: Sequence[str] | None,
) -> dict[str, pd.DataFrame]:
    frame, optics_frame = _as_relion31(
        particles, optics, pixel_size_angstrom, box_size, data_path
    )
    frame = frame.reset_index(drop=True).drop(
        columns=["rlnSortedIndex"], errors="ignore"
    )
    defaults: dict[str, Any] = {
        labels.ANGLE_ROT: 0.0,
        labels.ANGLE_TILT: 0.0,
        labels.ANGLE_PSI: 0.0,
        labels.ORIGIN_X_ANGST: 0.0,
        labels.ORIGIN_Y_ANGST: 0.0,
        labels.CLASS_NUMBER: 0,
        labels.NORM_CORRECTION: 1.0,
        labels.LOG_LIKELI_CONTRIBUTION: 0.0,
        labels.MAX_VALUE_PROB_DISTRIBUTION: 0.0,
        labels.NR_OF_SIGNIFICANT_SAMPLES: 0,
    }
    if labels.GROUP_NUMBER not in frame.columns:
        # RELION (re)assigns group numbers when it reads the particles (§A.4.1)
        table = ParticleTable(
            particles=frame, optics=optics_frame, path=Path(data_path)
        )
        frame[labels.GROUP_NUMBER] = table.micrograph_group_index + 1
    for label, value in defaults.items():
        if label not in frame.columns:
            frame[label] = np.full(
                frame.shape[0],
                value,
                dtype=np.int64 if isinstance(value, int) else None,
            )
    if input_columns is None:
        first = [c for c in frame.columns if c not in DATA_ADDED_LABELS]
    else:
        first = [c for c in input_columns if c in frame.columns]
    order = list(dict.fromkeys([*first, *DATA_ADDED_LABELS, *frame.columns]))
    frame = frame[order]
    for label in _INTEGER_PARTICLE_LABELS:
        if label in frame.columns:
            frame[label] = _as_integer_column(frame[label])
    return {"optics": optics_frame, "particles": frame}


def _sampling_block(
    sampling: SamplingInfo, pixel_size_angstrom: float
) -> dict[str, Any]:
    p = float(pixel_size_angstrom)

    def original(value: float | None, current: float) -> float:
        return float(current if value is None else value)

    return {
        labels.IS_3D_SAMPLING: False,
        labels.IS_3D_TRANSLATIONAL_SAMPLING: False,
        labels.PSI_STEP: float(sampling.psi_step_degrees),
        labels.OFFSET_RANGE: float(sampling.offset_range_px) * p,
        labels.OFFSET_STEP: float(sampling.offset_step_px) * p,
        labels.HELICAL_OFFSET_STEP: -1.0,
        labels.SAMPLING_PERTURB_INSTANCE: float(sampling.perturbation),
        labels.SAMPLING_PERTURB_FACTOR: float(sampling.perturbation_factor),
        labels.HEALPIX_ORDER_ORIGINAL: _HEALPIX_ORDER_2D,
        labels.PSI_STEP_ORIGINAL: original(
            sampling.psi_step_original_degrees, sampling.psi_step_degrees
        ),
        labels.OFFSET_RANGE_ORIGINAL: original(
            sampling.offset_range_original_px, sampling.offset_range_px
        )
        * p,
        labels.OFFSET_STEP_ORIGINAL: original(
            sampling.offset_step_original_px, sampling.offset_step_px
        )
        * p,
    }


def _optimiser_block(
    *,
    root: str,
    paths: IterationPaths,
    iteration: int,
    settings: Class2DSettings,
    state: Class2DState,
    pixel_size_angstrom: float,
    subset_size: int,
    accuracy_rotations_degrees: np.ndarray,
    accuracy_translations_angstrom: np.ndarray,
    changes: IterationChanges,
) -> dict[str, Any]:
    diameter = settings.particle_diameter_angstrom
    if diameter is None:
        diameter = (state.box_size - settings.mask_edge_px) * pixel_size_angstrom
    vdam = settings.is_vdam
    values: dict[str, Any] = {
        "rlnOutputRootName": root,
        "rlnModelStarFile": paths.model,
        "rlnExperimentalDataStarFile": paths.data,
        "rlnTomoTomogramsFile": "",
        "rlnTomoTrajectoriesFile": "",
        "rlnOrientSamplingStarFile": paths.sampling,
        "rlnCurrentIteration": int(iteration),
        "rlnNumberOfIterations": int(settings.n_iterations),
        "rlnDoSplitRandomHalves": False,
        "rlnJoinHalvesUntilThisResolution": -1.0,
        "rlnAdaptiveOversampleOrder": 1,
        "rlnAdaptiveOversampleFraction": float(settings.adaptive_fraction),
        "rlnRandomSeed": int(settings.seed),
        "rlnParticleDiameter": float(diameter),
        "rlnWidthMaskEdge": round(settings.mask_edge_px),
        "rlnDoZeroMask": bool(settings.zero_mask),
        "rlnDoSolventFlattening": bool(settings.flatten_solvent),
        "rlnDoSolventFscCorrection": False,
        "rlnSolventMaskName": "None",
        "rlnSolventMask2Name": "None",
        "rlnBodyStarFile": "None",
        "rlnTauSpectrumName": "None",
        "rlnMaximumCoarseImageSize": -1,
        "rlnHighresLimitExpectation": float(settings.highres_limit_angstrom),
        "rlnLowresLimitExpectation": -1.0,
        "rlnIncrementImageSize": _INCR_SIZE,
        "rlnDoMapEstimation": True,
        "rlnDoFastSubsetOptimisation": False,
        "rlnDoExternalReconstruct": False,
        "rlnDoBlush": False,
        "rlnBlushNoSpectralTrailing": False,
        "rlnDoGradientRefine": vdam,
        "rlnDoStochasticGradientDescent": vdam,
        "rlnGradEmIters": 0,
        "rlnGradHasConverged": False,
        "rlnGradCurrentStepsize": _scalar(state.step_size),
        "rlnGradSubsetOrder": 0,
        "rlnGradSuspendFinerSamplingIter": 0,
        "rlnGradSuspendLocalSamplingIter": -1,
        "rlnSgdInitialIterationsFraction": float(settings.grad_ini_frac),
        "rlnSgdFinalIterationsFraction": float(settings.grad_fin_frac),
        "rlnSgdMinimumResolution": _SGD_MIN_RESOLUTION_ANGSTROM,
        "rlnSgdInitialResolution": -1.0,
        "rlnSgdFinalResolution": -1.0,
        "rlnSgdInitialSubsetSize": _optional_int(settings.grad_ini_subset),
        "rlnSgdFinalSubsetSize": _optional_int(settings.grad_fin_subset),
        "rlnSgdMuFactor": float(settings.mu),
        "rlnSgdSkipAnneal": False,
        "rlnSgdClassInactivityThreshold": float(settings.class_inactivity_threshold),
        "rlnSgdSubsetSize": int(subset_size),
        "rlnSgdWriteEverySubset": int(settings.write_every),
        "rlnSgdStepsize": float(settings.grad_stepsize),
        "rlnSgdStepsizeScheme": "",
        "rlnTau2FudgeScheme": "",
        "rlnTau2FudgeArg": float(settings.tau2_fudge),
        "rlnMaximumSignificantPoses": _optional_int(settings.max_significant),
        "rlnDoAutoRefine": False,
        "rlnDoAutoSampling": False,
        "rlnAutoLocalSearchesHealpixOrder": 4,
        "rlnNumberOfIterWithoutResolutionGain": 0,
        "rlnBestResolutionThusFar": 1.0 / 999.0,
        "rlnNumberOfIterWithoutChangingAssignments": 0,
        "rlnDoSkipAlign": False,
        "rlnDoSkipRotate": False,
        "rlnOverallAccuracyRotations": float(np.min(accuracy_rotations_degrees)),
        "rlnOverallAccuracyTranslationsAngst": float(
            np.min(accuracy_translations_angstrom)
        ),
        "rlnChangesOptimalOrientations": float(changes.orientations_degrees),
        "rlnChangesOptimalOffsets": float(changes.offsets_angstrom),
        "rlnChangesOptimalClasses": float(changes.classes),
        "rlnSmallestChangesOrientations": float(changes.smallest_orientations_degrees),
        "rlnSmallestChangesOffsets": float(changes.smallest_offsets_angstrom),
        "rlnSmallestChangesClasses": round(changes.smallest_classes),
        "rlnLocalSymmetryFile": "None",
        "rlnDoHelicalRefine": False,
        "rlnIgnoreHelicalSymmetry": False,
        "rlnFourierMask": "None",
        "rlnHelicalTwistInitial": 0.0,
        "rlnHelicalRiseInitial": 0.0,
        "rlnHelicalCentralProportion": 0.3,
        "rlnNrHelicalNStart": 1,
        "rlnHelicalMaskTubeInnerDiameter": -1.0,
        "rlnHelicalMaskTubeOuterDiameter": -1.0,
        "rlnHelicalSymmetryLocalRefinement": False,
        "rlnHelicalSigmaDistance": -1.0,
        "rlnHelicalKeepTiltPriorFixed": False,
        "rlnHasConverged": False,
        "rlnHasHighFscAtResolLimit": False,
        "rlnHasLargeSizeIncreaseIterationsAgo": 0,
        "rlnDoCorrectNorm": bool(settings.do_norm),
        "rlnDoCorrectScale": bool(settings.do_scale),
        "rlnDoCorrectCtf": bool(settings.do_ctf),
        "rlnDoCenterClasses": bool(settings.center_classes),
        "rlnDoIgnoreCtfUntilFirstPeak": bool(settings.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": False,
        "rlnDoOnlyFlipCtfPhases": False,
        "rlnRefsAreCtfCorrected": True,
        "rlnFixSigmaNoiseEstimates": False,
        "rlnFixSigmaOffsetEstimates": False,
        "rlnMaxNumberOfPooledParticles": _POOLED_PARTICLES,
        "rlnOffsetRangeX": -1.0,
        "rlnOffsetRangeY": -1.0,
        "rlnOffsetRangeZ": -1.0,
    }
    # keep the spec order even if the dict above is edited carelessly
    return {label: values[label] for label in OPTIMISER_LABELS}


def _optional_int(value: int | None) -> int:
    return -1 if value is None or value <= 0 else int(value)


def _default_subset_size(
    settings: Class2DSettings, iteration: int, n_particles_total: int
) -> int:
    """``rlnSgdSubsetSize`` of an iteration: the VDAM schedule, −1 (all) for EM."""
    if not settings.is_vdam or iteration < 1:
        return -1
    schedule = VdamSchedule.from_settings(settings, n_particles_total)
    return schedule.subset_size(iteration)


def write_iteration(
    root: str | os.PathLike[str],
    iteration: int,
    *,
    state: Class2DState,
    particles: pd.DataFrame | ParticleTable,
    optics: pd.DataFrame | None,
    group_names: Sequence[str],
    group_particle_counts: Sequence[int] | np.ndarray,
    settings: Class2DSettings,
    sampling: SamplingInfo | None,
    command_line: str | Sequence[str],
    pixel_size_angstrom: float,
    n_particles_total: int,
    accuracy_rotations_degrees: ArrayLike | None = None,
    accuracy_translations_angstrom: ArrayLike | None = None,
    changes: IterationChanges | None = None,
    write_moments: bool | None = None,
    subset_size: int | None = None,
    input_columns: Sequence[str] | None = None,
    image_name_digits: int = 6,
    star_version: int = RELION_STAR_VERSION,
    unmasked_class_images: ArrayLike | None = None,
) -> IterationPaths:
    """Write all RELION files of one Class2D iteration (spec §B).

    Parameters
    ----------
    root
        Output root, e.g. ``Class2D/job013/run``; the files are
        ``<root>_itNNN_<suffix>``. Its directory must exist.
    iteration
        Iteration number (0 = the initial model).
    state
        Model after the iteration (class images already masked).
    particles
        The particle table with this iteration's values already in place (angles,
        origins in Å, class numbers 1-based, norm corrections, log-likelihood
        contributions, max. probabilities, numbers of significant samples, group
        numbers), one row per input particle in input order. A
        :class:`~cryoavg.io.particles.ParticleTable` is accepted as well.
    optics
        The input ``data_optics`` table, or ``None`` for RELION 3.0 input: then an
        optics table is derived from the particle columns (voltage, Cs, amplitude
        contrast, pixel size) and the output is RELION 3.1+.
    group_names, group_particle_counts
        Name and particle count of each scale (micrograph) group, ``(m,)``.
    settings
        Run options (written to ``_optimiser.star``).
    sampling
        Sampling of the iteration; ``None`` = :meth:`SamplingInfo.from_settings`
        without perturbation.
    command_line
        Arguments after the executable name (see :func:`relion_command_line`), or the
        finished string; written as the second line of ``_optimiser.star``.
    pixel_size_angstrom
        Pixel size of the model in Å.
    n_particles_total
        Number of particles in the data set (for the VDAM mini-batch size).
    accuracy_rotations_degrees, accuracy_translations_angstrom
        ``(k,)`` per-class accuracies; ``None`` = 999 (unknown).
    changes
        Changes of the optimal hidden variables; ``None`` = RELION's "unknown" values.
    write_moments
        Write the VDAM moment stacks and the ``rlnGradMoment1/2`` columns; ``None`` =
        when ``settings.algorithm == "vdam"``.
    subset_size
        ``rlnSgdSubsetSize`` (−1 = all particles); ``None`` = from the VDAM schedule.
    input_columns
        Column names of the input particles file, in file order: the data.star keeps
        these first, then adds the columns of :data:`DATA_ADDED_LABELS`. ``None`` =
        every column of ``particles`` that is not in :data:`DATA_ADDED_LABELS`, in
        table order.
    image_name_digits
        Digits of the ``NNNNNN@stack`` names (6: RELION 4.0/5.0.0, 8: 5.0.1+).
    star_version
        Number in the ``# version`` lines.
    unmasked_class_images
        ``(k, N, N)`` class images before solvent flattening; when given (EM), written
        to ``<root>_unmasked_classes.mrcs`` (no iteration number, overwritten each
        time, as RELION does).

    Returns
    -------
    IterationPaths
        The names of the files written (``sampling`` is not written for iteration 0,
        the moment stacks only for VDAM).

    Raises
    ------
    ValueError
        Inconsistent inputs (group lists, accuracy lengths, negative iteration).
    OutputError
        A file could not be written.
    InputError
        RELION 3.0 particles whose optics cannot be derived.
    """
    paths = iteration_paths(root, iteration)
    root_name = os.fspath(root)
    k = state.n_classes
    p = float(pixel_size_angstrom)
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"pixel_size_angstrom must be > 0, got {pixel_size_angstrom}")
    if write_moments is None:
        write_moments = settings.is_vdam
    if sampling is None:
        sampling = SamplingInfo.from_settings(settings)
    if changes is None:
        changes = IterationChanges()
    if subset_size is None:
        subset_size = _default_subset_size(settings, iteration, n_particles_total)
    acc_rot = _per_class(accuracy_rotations_degrees, k, "accuracy_rotations_degrees")
    acc_trans = _per_class(
        accuracy_translations_angstrom, k, "accuracy_translations_angstrom"
    )
    header = optimiser_header_lines(command_line)
    unmasked = None
    if unmasked_class_images is not None:
        unmasked = _numpy(unmasked_class_images, np.float32)
        expected_shape = tuple(state.class_images.shape)
        if unmasked.shape != expected_shape:
            raise ValueError(
                f"unmasked_class_images must have shape {expected_shape}, "
                f"got {unmasked.shape}"
            )

    # Build every table before writing anything, so that bad inputs leave no files.
    model = _model_blocks(
        state=state,
        paths=paths,
        group_names=group_names,
        group_particle_counts=group_particle_counts,
        pixel_size_angstrom=p,
        accuracy_rotations_degrees=acc_rot,
        accuracy_translations_angstrom=acc_trans,
        write_moments=write_moments,
        image_name_digits=image_name_digits,
    )
    data = _data_blocks(
        particles,
        optics,
        pixel_size_angstrom=p,
        box_size=state.box_size,
        data_path=paths.data,
        input_columns=input_columns,
    )
    optimiser = _optimiser_block(
        root=root_name,
        paths=paths,
        iteration=iteration,
        settings=settings,
        state=state,
        pixel_size_angstrom=p,
        subset_size=subset_size,
        accuracy_rotations_degrees=acc_rot,
        accuracy_translations_angstrom=acc_trans,
        changes=changes,
    )

    write_mrc(paths.classes, _numpy(state.class_images, np.float32), p, is_stack=True)
    if unmasked is not None:
        write_mrc(f"{root_name}_unmasked_classes.mrcs", unmasked, p, is_stack=True)
    if write_moments:
        moment1 = state.moment1.detach().cpu()
        sections = encode_moment_sections(moment1.reshape(2 * k, *moment1.shape[-2:]))
        write_mrc(paths.moment1, sections, p, is_stack=True)
        moment2 = state.moment2.detach().cpu().to(torch.complex64)
        write_mrc(paths.moment2, encode_moment_sections(moment2), p, is_stack=True)
    write_star(paths.model, model, version=star_version)
    write_star(paths.data, data, version=star_version)
    if iteration > 0:
        write_star(
            paths.sampling,
            {"sampling_general": _sampling_block(sampling, p)},
            version=star_version,
        )
    write_star(
        paths.optimiser,
        {"optimiser_general": optimiser},
        version=star_version,
        header_comments=header,
    )
    return paths
