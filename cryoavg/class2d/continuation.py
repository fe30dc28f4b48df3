"""Continue a Class2D run from a written iteration (spec §B.7).

:func:`read_iteration` reads ``run_itNNN_optimiser.star`` — written by cryoavg
(:func:`cryoavg.class2d.export.write_iteration`) or by RELION 4.0/5.0 — and the files it
points to: the ``_model.star`` (class images from the ``rlnReferenceImage`` stack,
spectra, priors, groups, noise spectra, VDAM moments from ``rlnGradMoment1/2``), the
``_data.star`` (particles with their current class, ψ, origin and norm correction) and
the ``_sampling.star``. :func:`restore_state` copies the model into a
:class:`~cryoavg.class2d.state.Class2DState`.

Path resolution
---------------
File names inside RELION STAR files are relative to the project directory (RELION runs
from there). A relative name is looked up, in this order, in ``project_dir`` (default:
the current directory), in the directory of the STAR file that names it and in each of
that directory's parents (so ``/proj/Class2D/job003/run_it050_optimiser.star`` finds
``Class2D/job003/run_it050_model.star`` under ``/proj`` from anywhere), and finally as
a bare file name next to that STAR file (a moved job directory).

Every problem with the files is one :class:`~cryoavg.errors.InputError` naming the
offending file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryoavg.class2d.export import (
    UNKNOWN_ACCURACY,
    IterationChanges,
    SamplingInfo,
    decode_moment_sections,
)
from cryoavg.class2d.settings import Class2DSettings
from cryoavg.class2d.state import Class2DState
from cryoavg.errors import InputError
from cryoavg.io import star as labels
from cryoavg.io.mrc import read_image_stack
from cryoavg.io.particles import ParticleTable, parse_image_name, read_particles
from cryoavg.io.references import locate_relion_file, read_reference_images
from cryoavg.io.star import read_star

__all__ = [
    "ContinuationState",
    "ModelStarContents",
    "read_iteration",
    "read_model_star",
    "restore_state",
    "state_from_continuation",
]

#: Labels of ``data_optimiser_general`` that must be present.
REQUIRED_OPTIMISER_LABELS: tuple[str, ...] = (
    "rlnOutputRootName",
    "rlnModelStarFile",
    "rlnExperimentalDataStarFile",
    "rlnOrientSamplingStarFile",
    "rlnCurrentIteration",
    "rlnNumberOfIterations",
    "rlnRandomSeed",
    "rlnParticleDiameter",
    "rlnDoZeroMask",
    "rlnDoSolventFlattening",
    "rlnDoCorrectNorm",
    "rlnDoCorrectScale",
    "rlnDoCorrectCtf",
)

#: Labels of ``data_model_general`` that must be present.
REQUIRED_MODEL_GENERAL_LABELS: tuple[str, ...] = (
    labels.ORIGINAL_IMAGE_SIZE,
    labels.CURRENT_RESOLUTION,
    labels.CURRENT_IMAGE_SIZE,
    labels.PADDING_FACTOR,
    labels.PIXEL_SIZE,
    labels.NR_CLASSES,
    labels.NR_GROUPS,
    labels.TAU2_FUDGE_FACTOR,
    labels.NORM_CORRECTION_AVERAGE,
    labels.LOG_LIKELIHOOD,
    labels.AVERAGE_PMAX,
)

_REQUIRED_CLASS_LABELS = (
    labels.REFERENCE_IMAGE,
    labels.CLASS_DISTRIBUTION,
    labels.ACCURACY_ROTATIONS,
    labels.CLASS_PRIOR_OFFSET_X,
    labels.CLASS_PRIOR_OFFSET_Y,
)
_REQUIRED_SPECTRUM_LABELS = (
    labels.SPECTRAL_INDEX,
    labels.SSNR_MAP,
    labels.REFERENCE_TAU2,
    labels.REFERENCE_SIGMA2,
)
_REQUIRED_GROUP_LABELS = (
    labels.GROUP_NUMBER,
    labels.GROUP_NAME,
    labels.GROUP_NR_PARTICLES,
    labels.GROUP_SCALE_CORRECTION,
)
_REQUIRED_SAMPLING_LABELS = (labels.PSI_STEP, labels.OFFSET_RANGE, labels.OFFSET_STEP)
_OFFSET_DECIMALS_PX = 4
_VDAM_DEFAULT_TAU2_FUDGE = 4.0


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------


@dataclass
class ModelStarContents:
    """Contents of a 2D ``run_itNNN_model.star`` and the images it names.

    Attributes
    ----------
    path
        The model STAR file.
    box_size
        ``N`` (``rlnOriginalImageSize``), pixels.
    pixel_size_angstrom
        ``rlnPixelSize``.
    pad
        ``rlnPaddingFactor``.
    current_size
        ``rlnCurrentImageSize`` (pixels).
    current_resolution_angstrom
        ``rlnCurrentResolution`` (Å; ``inf`` when unknown).
    tau2_fudge
        ``rlnTau2FudgeFactor``, T of the iteration.
    avg_norm
        ``rlnNormCorrectionAverage``.
    sigma2_offset_angstrom2
        Variance of the offset prior (``rlnSigmaOffsetsAngst`` squared), Å².
    log_likelihood, average_pmax
        ``rlnLogLikelihood``, ``rlnAveragePmax``.
    class_images
        ``float32 (k, N, N)`` from the ``rlnReferenceImage`` stack.
    class_prior
        ``(k,)`` ``rlnClassDistribution``.
    accuracy_rotations_degrees, accuracy_translations_angstrom
        ``(k,)`` per-class accuracies (999 = unknown).
    estimated_resolution_angstrom, overall_fourier_completeness
        ``(k,)`` as written (informational).
    class_offset_prior_angstrom
        ``(k, 2)`` class prior offsets, ``(y, x)`` in Å.
    ssnr, tau2, sigma2_class, fourier_completeness
        ``(k, N // 2 + 1)`` spectra (``rlnSsnrMap``, ``rlnReferenceTau2``,
        ``rlnReferenceSigma2``, ``rlnFourierCompleteness``).
    group_names, group_particle_counts, scale
        Scale groups ``(m,)``: names, particle counts, ``rlnGroupScaleCorrection``.
    sigma2_noise
        ``(g, N // 2 + 1)`` noise spectra (0 for shells not written).
    moment1
        ``complex64 (2, k, P, P // 2 + 1)`` VDAM first moments (un-shifted half
        planes), or ``None`` when the model has none (EM).
    moment2
        ``float32 (k, P, P // 2 + 1)`` second moment (real part), or ``None``.
    """

    path: Path
    box_size: int
    pixel_size_angstrom: float
    pad: int
    current_size: int
    current_resolution_angstrom: float
    tau2_fudge: float
    avg_norm: float
    sigma2_offset_angstrom2: float
    log_likelihood: float
    average_pmax: float
    class_images: np.ndarray
    class_prior: np.ndarray
    accuracy_rotations_degrees: np.ndarray
    accuracy_translations_angstrom: np.ndarray
    estimated_resolution_angstrom: np.ndarray
    overall_fourier_completeness: np.ndarray
    class_offset_prior_angstrom: np.ndarray
    ssnr: np.ndarray
    tau2: np.ndarray
    sigma2_class: np.ndarray
    fourier_completeness: np.ndarray
    group_names: list[str]
    group_particle_counts: np.ndarray
    scale: np.ndarray
    sigma2_noise: np.ndarray
    moment1: np.ndarray | None = None
    moment2: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        """``k``, the number of classes."""
        return int(self.class_images.shape[0])

    @property
    def n_optics_groups(self) -> int:
        """``g``, the number of noise spectra."""
        return int(self.sigma2_noise.shape[0])

    @property
    def n_scale_groups(self) -> int:
        """``m``, the number of scale groups."""
        return len(self.group_names)

    @property
    def current_resolution_shell(self) -> int:
        """``maxres`` (shell) of the current resolution, ``N·p / resolution``."""
        value = self.current_resolution_angstrom
        if not math.isfinite(value) or value <= 0:
            return 0
        return round(self.box_size * self.pixel_size_angstrom / value)


@dataclass
class ContinuationState:
    """Everything needed to continue a run after a written iteration.

    Attributes
    ----------
    optimiser_path
        The ``_optimiser.star`` that was read.
    project_dir
        Directory against which the relative names of the optimiser file resolved.
    iteration
        ``rlnCurrentIteration``; the run continues with ``iteration + 1``.
    output_root
        ``rlnOutputRootName`` (e.g. ``Class2D/job013/run``).
    settings
        Run options recovered from the files (see :func:`read_iteration`).
    model
        The model (:class:`ModelStarContents`).
    particles
        The ``_data.star`` particles (current class, ψ, origin, norm, groups).
    sampling
        The ``_sampling.star`` contents; ``None`` when there is none (iteration 0).
    step_size
        ``rlnGradCurrentStepsize`` (VDAM step of the iteration).
    subset_size
        ``rlnSgdSubsetSize`` (−1 = all particles).
    changes
        Changes of the optimal hidden variables.
    relion_version
        Version string of the first header line (``None`` without one).
    command_line
        The command line of the second header line (``None`` without one).
    model_star_path, data_star_path, sampling_star_path
        The files read (``sampling_star_path`` is ``None`` when absent).
    optimiser_values
        All values of ``data_optimiser_general`` as read.
    """

    optimiser_path: Path
    project_dir: Path
    iteration: int
    output_root: str
    settings: Class2DSettings
    model: ModelStarContents
    particles: ParticleTable
    sampling: SamplingInfo | None
    step_size: float
    subset_size: int
    changes: IterationChanges
    relion_version: str | None
    command_line: str | None
    model_star_path: Path
    data_star_path: Path
    sampling_star_path: Path | None
    optimiser_values: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _list_block(
    blocks: dict[str, Any], name: str, path: Path, required: tuple[str, ...]
) -> dict[str, Any]:
    block = blocks.get(name)
    if block is None:
        raise InputError(path, f"no data_{name} block")
    if isinstance(block, pd.DataFrame):
        if block.shape[0] != 1:
            raise InputError(path, f"data_{name} must be a list (single-row) block")
        block = {str(k): v for k, v in block.iloc[0].items()}
    missing = [label for label in required if label not in block]
    if missing:
        raise InputError(path, f"data_{name} lacks {', '.join(missing)}")
    return dict(block)


def _loop_block(
    blocks: dict[str, Any], name: str, path: Path, required: tuple[str, ...]
) -> pd.DataFrame:
    block = blocks.get(name)
    if block is None:
        raise InputError(path, f"no data_{name} block")
    if isinstance(block, dict):
        block = pd.DataFrame({k: [v] for k, v in block.items()})
    missing = [label for label in required if label not in block.columns]
    if missing:
        raise InputError(path, f"data_{name} lacks {', '.join(missing)}")
    return block


def _number(values: dict[str, Any], label: str, path: Path) -> float:
    try:
        return float(values[label])
    except (TypeError, ValueError) as err:
        raise InputError(path, f"{label} is not a number ({values[label]!r})") from err


def _integer(values: dict[str, Any], label: str, path: Path) -> int:
    number = _number(values, label, path)
    if not math.isfinite(number) or number != int(number):
        raise InputError(path, f"{label} is not an integer ({values[label]!r})")
    return int(number)


def _flag(values: dict[str, Any], label: str, path: Path) -> bool:
    value = values[label]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return _number(values, label, path) != 0


def _column(table: pd.DataFrame, label: str, path: Path, block: str) -> np.ndarray:
    """A loop column as float64; NaN/inf text (RELION writes ``nan``) is kept."""
    raw = table[label]
    values = np.array(pd.to_numeric(raw, errors="coerce"), dtype=np.float64)
    if pd.api.types.is_numeric_dtype(raw.dtype):
        return values
    for row in np.flatnonzero(np.isnan(values)).tolist():
        text = str(raw.iloc[row]).strip().lower()
        if text not in ("nan", "-nan", "+nan"):
            raise InputError(
                path,
                f"{label} in data_{block} row {row + 1} is not a number "
                f"({raw.iloc[row]!r})",
            )
    return values


def _read_header(path: Path) -> tuple[str | None, str | None]:
    """Version string and command line from the two comment lines of an optimiser."""
    version: str | None = None
    command: str | None = None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline().rstrip("\r\n")
            second = handle.readline().rstrip("\r\n")
    except OSError as err:
        raise InputError(path, f"cannot read ({err.strerror or err})") from err
    marker = "# RELION optimiser; version"
    if first.startswith(marker):
        version = first[len(marker) :].strip() or None
        if second.startswith("#") and not second.startswith("# version"):
            command = second[1:].removeprefix(" ")
    return version, command


def _command_options(command_line: str | None) -> dict[str, str | None]:
    """``--flag value`` pairs of a command line (flags without a value map to None)."""
    if not command_line:
        return {}
    tokens = command_line.split()
    options: dict[str, str | None] = {}
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        is_value = following is not None and not following.startswith("--")
        options[token] = following if is_value else None
    return options


def _option_number(options: dict[str, str | None], flag: str) -> float | None:
    value = options.get(flag)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------
# model.star
# --------------------------------------------------------------------------------------


def _read_moment_stack(
    names: list[str],
    model_path: Path,
    project_dir: Path | None,
    padded_size: int,
    n_sections: int,
    what: str,
) -> np.ndarray:
    """Complex half planes of the named sections, ``(n_sections, P, P // 2 + 1)``."""
    k = len(names)
    width = 2 * (padded_size // 2 + 1)
    loaded: dict[str, tuple[Path, np.ndarray]] = {}
    result = np.zeros((n_sections, padded_size, padded_size // 2 + 1), np.complex64)
    for i, name in enumerate(names):
        try:
            index0, stack_name = parse_image_name(str(name))
        except ValueError as err:
            raise InputError(model_path, f"class {i + 1}: {err}") from err
        if stack_name not in loaded:
            stack_path, _ = locate_relion_file(
                stack_name, model_path, project_dir, what
            )
            data, _ = read_image_stack(stack_path)
            if data.shape[-2:] != (padded_size, width):
                raise InputError(
                    stack_path,
                    f"{what} sections are {data.shape[-1]}x{data.shape[-2]} but "
                    f"{width}x{padded_size} are expected for pad·N = {padded_size}",
                )
            loaded[stack_name] = (stack_path, data)
        stack_path, data = loaded[stack_name]
        # half 1 of the first moment is section index + k (§B.7)
        for half in range(n_sections // k):
            index = index0 + half * k
            if index >= data.shape[0]:
                raise InputError(
                    stack_path,
                    f"has {data.shape[0]} sections but {what} of class {i + 1} "
                    f"needs section {index + 1}",
                )
            result[half * k + i] = decode_moment_sections(data[index : index + 1])[0]
    return result


def _spectra(
    blocks: dict[str, Any], path: Path, k: int, n_shells: int
) -> dict[str, np.ndarray]:
    out = {
        name: np.zeros((k, n_shells))
        for name in ("ssnr", "tau2", "sigma2_class", "fourier_completeness")
    }
    for i in range(k):
        name = f"model_class_{i + 1}"
        table = _loop_block(blocks, name, path, _REQUIRED_SPECTRUM_LABELS)
        index = _column(table, labels.SPECTRAL_INDEX, path, name).astype(np.int64)
        if (index < 0).any() or (index >= n_shells).any():
            raise InputError(
                path, f"data_{name} has spectral indices outside 0…{n_shells - 1}"
            )
        out["ssnr"][i, index] = _column(table, labels.SSNR_MAP, path, name)
        out["tau2"][i, index] = _column(table, labels.REFERENCE_TAU2, path, name)
        out["sigma2_class"][i, index] = _column(
            table, labels.REFERENCE_SIGMA2, path, name
        )
        if labels.FOURIER_COMPLETENESS in table.columns:
            out["fourier_completeness"][i, index] = _column(
                table, labels.FOURIER_COMPLETENESS, path, name
            )
    return out


def _noise_spectra(
    blocks: dict[str, Any], path: Path, n_optics_groups: int, n_shells: int
) -> np.ndarray:
    pre4 = "model_optics_group_1" not in blocks and "model_group_1" in blocks
    sigma2 = np.zeros((n_optics_groups, n_shells))
    for g in range(n_optics_groups):
        name = "model_group_1" if pre4 else f"model_optics_group_{g + 1}"
        if name not in blocks:  # RELION skips empty tables: no shell with σ² > 0
            continue
        table = _loop_block(
            blocks, name, path, (labels.SPECTRAL_INDEX, labels.SIGMA2_NOISE)
        )
        index = _column(table, labels.SPECTRAL_INDEX, path, name).astype(np.int64)
        keep = (index >= 0) & (index < n_shells)
        sigma2[g, index[keep]] = _column(table, labels.SIGMA2_NOISE, path, name)[keep]
    return sigma2


def read_model_star(
    path: str | os.PathLike[str],
    *,
    project_dir: str | os.PathLike[str] | None = None,
    n_optics_groups: int | None = None,
) -> ModelStarContents:
    """Read a 2D ``run_itNNN_model.star`` with its class images and moments.

    Parameters
    ----------
    path
        The model STAR file.
    project_dir
        Directory that relative image names are relative to (default: the current
        directory; the model's directory and its parents are tried as well).
    n_optics_groups
        Number of optics groups of the data; required only for pre-4.0 files without
        ``rlnNrOpticsGroups`` (their single noise spectrum is used for all groups).

    Returns
    -------
    ModelStarContents

    Raises
    ------
    InputError
        Missing or malformed file, missing labels or blocks, class or moment stacks
        that are missing or do not match the model (count, box size).
    """
    model_path = Path(path)
    base = None if project_dir is None else Path(project_dir)
    blocks = read_star(model_path)
    general = _list_block(
        blocks, "model_general", model_path, REQUIRED_MODEL_GENERAL_LABELS
    )
    n = _integer(general, labels.ORIGINAL_IMAGE_SIZE, model_path)
    p = _number(general, labels.PIXEL_SIZE, model_path)
    k = _integer(general, labels.NR_CLASSES, model_path)
    pad = _number(general, labels.PADDING_FACTOR, model_path)
    if n < 2 or n % 2 or k < 1 or not p > 0 or pad < 1 or pad != int(pad):
        raise InputError(
            model_path,
            f"invalid model_general (box {n}, pixel {p:g} Å, {k} classes, pad {pad:g})",
        )
    pad_int = int(pad)
    n_shells = n // 2 + 1
    if labels.SIGMA_OFFSETS_ANGST in general:
        sigma_offset = _number(general, labels.SIGMA_OFFSETS_ANGST, model_path)
    elif "rlnSigmaOffsets" in general:  # RELION 3.0: pixels
        sigma_offset = _number(general, "rlnSigmaOffsets", model_path) * p
    else:
        raise InputError(
            model_path, f"data_model_general lacks {labels.SIGMA_OFFSETS_ANGST}"
        )
    if labels.NR_OPTICS_GROUPS in general:
        n_optics = _integer(general, labels.NR_OPTICS_GROUPS, model_path)
    else:
        n_optics = int(n_optics_groups) if n_optics_groups is not None else 1

    classes = _loop_block(blocks, "model_classes", model_path, _REQUIRED_CLASS_LABELS)
    if classes.shape[0] != k:
        raise InputError(
            model_path,
            f"data_model_classes has {classes.shape[0]} rows but rlnNrClasses is {k}",
        )
    if labels.ACCURACY_TRANSLATIONS_ANGST in classes.columns:
        acc_trans = _column(
            classes, labels.ACCURACY_TRANSLATIONS_ANGST, model_path, "model_classes"
        )
    elif "rlnAccuracyTranslations" in classes.columns:  # RELION 3.0: pixels
        acc_trans = (
            _column(classes, "rlnAccuracyTranslations", model_path, "model_classes") * p
        )
    else:
        raise InputError(
            model_path, f"data_model_classes lacks {labels.ACCURACY_TRANSLATIONS_ANGST}"
        )

    def optional(label: str, default: float) -> np.ndarray:
        if label in classes.columns:
            return _column(classes, label, model_path, "model_classes")
        return np.full(k, default)

    reference_names = [str(v) for v in classes[labels.REFERENCE_IMAGE]]
    class_images, _ = read_reference_images(reference_names, model_path, base, n)
    moment1 = moment2 = None
    padded = pad_int * n
    if labels.GRAD_MOMENT_1 in classes.columns:
        moment1 = _read_moment_stack(
            [str(v) for v in classes[labels.GRAD_MOMENT_1]],
            model_path,
            base,
            padded,
            2 * k,
            "first-moment stack",
        ).reshape(2, k, padded, padded // 2 + 1)
    if labels.GRAD_MOMENT_2 in classes.columns:
        moment2 = (
            _read_moment_stack(
                [str(v) for v in classes[labels.GRAD_MOMENT_2]],
                model_path,
                base,
                padded,
                k,
                "second-moment stack",
            )
            .real.astype(np.float32)
            .copy()
        )

    spectra = _spectra(blocks, model_path, k, n_shells)

    m = _integer(general, labels.NR_GROUPS, model_path)
    groups = _loop_block(blocks, "model_groups", model_path, _REQUIRED_GROUP_LABELS)
    numbers = _column(groups, labels.GROUP_NUMBER, model_path, "model_groups")
    numbers = numbers.astype(np.int64)
    if groups.shape[0] != m or sorted(numbers.tolist()) != list(range(1, m + 1)):
        raise InputError(
            model_path,
            f"data_model_groups does not number groups 1…{m} (rlnNrGroups = {m})",
        )
    order = np.argsort(numbers)
    group_names = [str(v) for v in groups[labels.GROUP_NAME].to_numpy()[order]]
    counts = _column(groups, labels.GROUP_NR_PARTICLES, model_path, "model_groups")
    scale = _column(groups, labels.GROUP_SCALE_CORRECTION, model_path, "model_groups")

    offsets_yx = np.stack(
        [
            _column(classes, labels.CLASS_PRIOR_OFFSET_Y, model_path, "model_classes"),
            _column(classes, labels.CLASS_PRIOR_OFFSET_X, model_path, "model_classes"),
        ],
        axis=-1,
    )
    return ModelStarContents(
        path=model_path,
        box_size=n,
        pixel_size_angstrom=p,
        pad=pad_int,
        current_size=_integer(general, labels.CURRENT_IMAGE_SIZE, model_path),
        current_resolution_angstrom=_number(
            general, labels.CURRENT_RESOLUTION, model_path
        ),
        tau2_fudge=_number(general, labels.TAU2_FUDGE_FACTOR, model_path),
        avg_norm=_number(general, labels.NORM_CORRECTION_AVERAGE, model_path),
        sigma2_offset_angstrom2=sigma_offset**2,
        log_likelihood=_number(general, labels.LOG_LIKELIHOOD, model_path),
        average_pmax=_number(general, labels.AVERAGE_PMAX, model_path),
        class_images=class_images,
        class_prior=_column(
            classes, labels.CLASS_DISTRIBUTION, model_path, "model_classes"
        ),
        accuracy_rotations_degrees=_column(
            classes, labels.ACCURACY_ROTATIONS, model_path, "model_classes"
        ),
        accuracy_translations_angstrom=acc_trans,
        estimated_resolution_angstrom=optional(labels.ESTIMATED_RESOLUTION, 0.0),
        overall_fourier_completeness=optional(labels.OVERALL_FOURIER_COMPLETENESS, 0.0),
        class_offset_prior_angstrom=offsets_yx,
        ssnr=spectra["ssnr"],
        tau2=spectra["tau2"],
        sigma2_class=spectra["sigma2_class"],
        fourier_completeness=spectra["fourier_completeness"],
        group_names=group_names,
        group_particle_counts=np.rint(counts[order]).astype(np.int64),
        scale=scale[order],
        sigma2_noise=_noise_spectra(blocks, model_path, n_optics, n_shells),
        moment1=moment1,
        moment2=moment2,
    )


# --------------------------------------------------------------------------------------
# sampling.star and settings
# --------------------------------------------------------------------------------------


def _read_sampling(path: Path, pixel_size_angstrom: float) -> SamplingInfo:
    blocks = read_star(path)
    values = _list_block(blocks, "sampling_general", path, _REQUIRED_SAMPLING_LABELS)
    p = float(pixel_size_angstrom)

    def optional(label: str, scale: float = 1.0) -> float | None:
        if label not in values:
            return None
        return _number(values, label, path) * scale

    def px(label: str) -> float | None:
        value = optional(label, 1.0 / p)
        return None if value is None else round(value, _OFFSET_DECIMALS_PX)

    perturbation = optional(labels.SAMPLING_PERTURB_INSTANCE)
    factor = optional(labels.SAMPLING_PERTURB_FACTOR)
    return SamplingInfo(
        psi_step_degrees=_number(values, labels.PSI_STEP, path),
        offset_range_px=px(labels.OFFSET_RANGE) or 0.0,
        offset_step_px=px(labels.OFFSET_STEP) or 0.0,
        perturbation=0.0 if perturbation is None else perturbation,
        perturbation_factor=0.5 if factor is None else factor,
        psi_step_original_degrees=optional(labels.PSI_STEP_ORIGINAL),
        offset_range_original_px=px(labels.OFFSET_RANGE_ORIGINAL),
        offset_step_original_px=px(labels.OFFSET_STEP_ORIGINAL),
    )


def _settings(
    values: dict[str, Any],
    path: Path,
    model: ModelStarContents,
    sampling: SamplingInfo | None,
    command_line: str | None,
) -> Class2DSettings:
    """Map the optimiser labels (and model, sampling, command line) to settings."""
    defaults = Class2DSettings()
    result: dict[str, Any] = {}

    def number(label: str, default: float) -> float:
        return _number(values, label, path) if label in values else default

    def integer(label: str, default: int | None) -> int | None:
        return _integer(values, label, path) if label in values else default

    def flag(label: str, default: bool) -> bool:
        return _flag(values, label, path) if label in values else default

    result["n_classes"] = model.n_classes
    result["pad"] = model.pad
    result["n_iterations"] = _integer(values, "rlnNumberOfIterations", path)
    result["seed"] = _integer(values, "rlnRandomSeed", path)
    result["algorithm"] = "vdam" if flag("rlnDoGradientRefine", False) else "em"
    tau2_arg = number("rlnTau2FudgeArg", -1.0)
    if tau2_arg <= 0:
        # not given: VDAM's default final T is 4 (§A.8.4); EM keeps T constant
        if result["algorithm"] == "vdam":
            tau2_arg = _VDAM_DEFAULT_TAU2_FUDGE
        elif model.tau2_fudge > 0:
            tau2_arg = model.tau2_fudge
        else:
            tau2_arg = defaults.tau2_fudge
    result["tau2_fudge"] = tau2_arg
    diameter = _number(values, "rlnParticleDiameter", path)
    result["particle_diameter_angstrom"] = diameter if diameter > 0 else None
    result["zero_mask"] = _flag(values, "rlnDoZeroMask", path)
    result["flatten_solvent"] = _flag(values, "rlnDoSolventFlattening", path)
    result["highres_limit_angstrom"] = number(
        "rlnHighresLimitExpectation", defaults.highres_limit_angstrom
    )
    result["center_classes"] = flag("rlnDoCenterClasses", False)
    result["do_ctf"] = _flag(values, "rlnDoCorrectCtf", path)
    result["ctf_intact_first_peak"] = flag("rlnDoIgnoreCtfUntilFirstPeak", False)
    result["do_norm"] = _flag(values, "rlnDoCorrectNorm", path)
    result["do_scale"] = _flag(values, "rlnDoCorrectScale", path)
    result["class_inactivity_threshold"] = number("rlnSgdClassInactivityThreshold", 0.0)
    result["write_every"] = max(
        integer("rlnSgdWriteEverySubset", defaults.write_every) or 1, 1
    )
    result["mask_edge_px"] = float(number("rlnWidthMaskEdge", defaults.mask_edge_px))
    result["adaptive_fraction"] = number(
        "rlnAdaptiveOversampleFraction", defaults.adaptive_fraction
    )
    max_sig = integer("rlnMaximumSignificantPoses", -1)
    result["max_significant"] = max_sig if max_sig is not None and max_sig > 0 else None
    result["grad_ini_frac"] = number(
        "rlnSgdInitialIterationsFraction", defaults.grad_ini_frac
    )
    result["grad_fin_frac"] = number(
        "rlnSgdFinalIterationsFraction", defaults.grad_fin_frac
    )
    result["grad_stepsize"] = number("rlnSgdStepsize", defaults.grad_stepsize)
    result["mu"] = number("rlnSgdMuFactor", defaults.mu)
    for field_name, label in (
        ("grad_ini_subset", "rlnSgdInitialSubsetSize"),
        ("grad_fin_subset", "rlnSgdFinalSubsetSize"),
    ):
        size = integer(label, -1)
        result[field_name] = size if size is not None and size > 0 else None

    # sampling: the STAR file has coarse steps; settings hold the fine (GUI) steps
    options = _command_options(command_line)
    if sampling is not None:
        coarse_psi = sampling.psi_step_original_degrees or sampling.psi_step_degrees
        result["psi_step_degrees"] = coarse_psi / 2.0
        result["offset_range_px"] = sampling.offset_range_px
        result["offset_step_px"] = sampling.offset_step_px / 2.0
    else:
        psi = _option_number(options, "--psi_step")
        if psi is not None and psi > 0:
            result["psi_step_degrees"] = psi / 2.0
        offset_range = _option_number(options, "--offset_range")
        if offset_range is not None and offset_range >= 0:
            result["offset_range_px"] = offset_range
        offset_step = _option_number(options, "--offset_step")
        if offset_step is not None and offset_step > 0:
            result["offset_step_px"] = offset_step / 2.0
    # not stored in the optimiser file: from the command line when given there
    offset_sigma = _option_number(options, "--offset")
    if offset_sigma is not None and offset_sigma > 0:
        result["offset_prior_sigma_angstrom"] = offset_sigma
    if "--preread_images" in options:
        result["preread_images"] = True
    return Class2DSettings.from_dict(result)


# --------------------------------------------------------------------------------------
# the optimiser
# --------------------------------------------------------------------------------------


def read_iteration(
    optimiser_star: str | os.PathLike[str],
    *,
    project_dir: str | os.PathLike[str] | None = None,
) -> ContinuationState:
    """Read a written iteration (ours or RELION's) for ``--continue``.

    Parameters
    ----------
    optimiser_star
        ``<root>_itNNN_optimiser.star``.
    project_dir
        RELION project directory that relative names are relative to (default: the
        current directory; the optimiser's directory and its parents are tried too).

    Returns
    -------
    ContinuationState
        Iteration, settings, model, particles and sampling.

    Notes
    -----
    Settings come from ``data_optimiser_general`` (``rlnDoGradientRefine`` →
    ``algorithm``, ``rlnTau2FudgeArg``, ``rlnParticleDiameter``, ``rlnDoZeroMask``,
    ``rlnDoSolventFlattening``, ``rlnDoCenterClasses``, ``rlnDoCorrectCtf``,
    ``rlnDoCorrectNorm``/``Scale``, ``rlnRandomSeed``,
    ``rlnSgdClassInactivityThreshold``, ``rlnSgdWriteEverySubset``, the ``rlnSgd*``
    schedule values, ...), ``n_classes`` and ``pad`` from the model, the ψ and offset
    steps from the sampling file (coarse → fine = ÷ 2; from ``--psi_step``,
    ``--offset_range``, ``--offset_step`` of the header's command line when there is
    no sampling file). ``offset_prior_sigma_angstrom`` and ``preread_images`` are not
    stored by RELION; they are taken from ``--offset`` / ``--preread_images`` of the
    header's command line when present, else left at their defaults.

    Raises
    ------
    InputError
        A missing file (the optimiser, or the model/data/sampling file it names),
        missing required labels, or a model whose class or moment stacks do not match.
    """
    path = Path(optimiser_star)
    base = None if project_dir is None else Path(project_dir)
    blocks = read_star(path)
    values = _list_block(blocks, "optimiser_general", path, REQUIRED_OPTIMISER_LABELS)
    iteration = _integer(values, "rlnCurrentIteration", path)
    if iteration < 0:
        raise InputError(path, f"rlnCurrentIteration is negative ({iteration})")
    relion_version, command_line = _read_header(path)

    data_path, project = locate_relion_file(
        str(values["rlnExperimentalDataStarFile"]), path, base, "data STAR"
    )
    model_path, model_project = locate_relion_file(
        str(values["rlnModelStarFile"]), path, base, "model STAR"
    )
    particles = read_particles(data_path, project_dir=project)
    model = read_model_star(
        model_path,
        project_dir=model_project,
        n_optics_groups=particles.n_optics_groups,
    )
    if model.n_optics_groups != particles.n_optics_groups:
        raise InputError(
            model_path,
            f"{model.n_optics_groups} optics groups in the model but "
            f"{particles.n_optics_groups} in {data_path}",
        )

    sampling_path: Path | None = None
    sampling: SamplingInfo | None = None
    sampling_name = str(values["rlnOrientSamplingStarFile"])
    try:
        sampling_path, _ = locate_relion_file(
            sampling_name, path, base, "sampling STAR"
        )
    except InputError:
        if iteration > 0:
            raise
    if sampling_path is not None:
        sampling = _read_sampling(sampling_path, model.pixel_size_angstrom)

    settings = _settings(values, path, model, sampling, command_line)

    def number(label: str, default: float) -> float:
        return _number(values, label, path) if label in values else default

    changes = IterationChanges(
        orientations_degrees=number("rlnChangesOptimalOrientations", UNKNOWN_ACCURACY),
        offsets_angstrom=number("rlnChangesOptimalOffsets", UNKNOWN_ACCURACY),
        classes=number("rlnChangesOptimalClasses", 9999999.0),
        smallest_orientations_degrees=number(
            "rlnSmallestChangesOrientations", UNKNOWN_ACCURACY
        ),
        smallest_offsets_angstrom=number("rlnSmallestChangesOffsets", UNKNOWN_ACCURACY),
        smallest_classes=number("rlnSmallestChangesClasses", 9999999.0),
    )
    subset = number("rlnSgdSubsetSize", -1.0)
    return ContinuationState(
        optimiser_path=path,
        project_dir=project,
        iteration=iteration,
        output_root=str(values["rlnOutputRootName"]),
        settings=settings,
        model=model,
        particles=particles,
        sampling=sampling,
        step_size=number("rlnGradCurrentStepsize", 0.0),
        subset_size=int(subset) if math.isfinite(subset) else -1,
        changes=changes,
        relion_version=relion_version,
        command_line=command_line,
        model_star_path=model_path,
        data_star_path=data_path,
        sampling_star_path=sampling_path,
        optimiser_values=values,
    )


# --------------------------------------------------------------------------------------
# into a Class2DState
# --------------------------------------------------------------------------------------


def _copy(target: torch.Tensor, values: np.ndarray) -> None:
    source = torch.from_numpy(np.array(values, copy=True))
    target.copy_(source.to(device=target.device, dtype=target.dtype))


def restore_state(
    state: Class2DState, cont: ContinuationState | ModelStarContents
) -> Class2DState:
    """Copy a read model into a state of matching size, in place.

    Parameters
    ----------
    state
        Target state; its ``k``, ``N``, pad, optics and scale group counts must match
        the model.
    cont
        The continuation (or just its model).

    Returns
    -------
    Class2DState
        ``state`` itself. Restored: class images, noise spectra, scales, τ², SSNR,
        completeness, σ²_class, class prior, class prior offsets (yx), σ²_off, average
        norm, the per-class accuracies, current size and resolution shell, T, log-likelihood, average Pmax, the
        scale-group particle counts, the VDAM step size (from a continuation) and the
        moments when the model has them. ``class_age`` is not stored by RELION and is
        left unchanged.

    Raises
    ------
    InputError
        The model does not match the state's sizes (names the model file).
    """
    model = cont.model if isinstance(cont, ContinuationState) else cont
    expected = (
        model.n_classes,
        model.box_size,
        model.pad,
        model.n_optics_groups,
        model.n_scale_groups,
    )
    actual = (
        state.n_classes,
        state.box_size,
        state.pad,
        state.n_optics_groups,
        state.n_scale_groups,
    )
    if expected != actual:
        raise InputError(
            model.path,
            "model (classes, box, pad, optics groups, scale groups) = "
            f"{expected} does not match the state {actual}",
        )
    with torch.no_grad():
        _copy(state.class_images, model.class_images)
        _copy(state.sigma2_noise, model.sigma2_noise)
        _copy(state.scale, model.scale)
        _copy(state.tau2, model.tau2)
        _copy(state.ssnr, model.ssnr)
        _copy(state.fourier_completeness, model.fourier_completeness)
        _copy(state.sigma2_class, model.sigma2_class)
        _copy(state.class_prior, model.class_prior)
        _copy(state.class_offset_prior_angstrom, model.class_offset_prior_angstrom)
        state.sigma2_offset_angstrom2.fill_(model.sigma2_offset_angstrom2)
        state.avg_norm.fill_(model.avg_norm)
        state.current_size.fill_(model.current_size)
        state.current_resolution_shell.fill_(model.current_resolution_shell)
        state.tau2_fudge.fill_(model.tau2_fudge)
        state.log_likelihood.fill_(model.log_likelihood)
        state.average_pmax.fill_(model.average_pmax)
        _copy(state.accuracy_rotations_degrees, model.accuracy_rotations_degrees)
        _copy(
            state.accuracy_translations_angstrom, model.accuracy_translations_angstrom
        )
        _copy(
            state.scale_group_particle_count,
            model.group_particle_counts.astype(np.float64),
        )
        if isinstance(cont, ContinuationState):
            state.step_size.fill_(cont.step_size)
        if model.moment1 is not None:
            state.moment1_ri.copy_(
                torch.view_as_real(torch.as_tensor(model.moment1)).to(
                    device=state.moment1_ri.device, dtype=state.moment1_ri.dtype
                )
            )
        if model.moment2 is not None:
            _copy(state.moment2, model.moment2)
    return state


def state_from_continuation(
    cont: ContinuationState,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Class2DState:
    """A new :class:`Class2DState` of the model's size holding the read model.

    Parameters
    ----------
    cont
        The continuation.
    dtype, device
        Floating dtype and device of the state.

    Returns
    -------
    Class2DState
    """
    model = cont.model
    state = Class2DState(
        model.n_classes,
        model.box_size,
        model.n_optics_groups,
        model.n_scale_groups,
        pad=model.pad,
        sigma2_offset_angstrom2=model.sigma2_offset_angstrom2,
        dtype=dtype,
        device=device,
    )
    return restore_state(state, cont)
