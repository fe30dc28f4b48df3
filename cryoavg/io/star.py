"""RELION STAR files: reading through :mod:`starfile`, writing in RELION's own layout.

Conventions
-----------
* A STAR file is a ``dict`` mapping block names (without the ``data_`` prefix; an
  unnamed ``data_`` block is ``""``) to blocks. A loop block is a
  :class:`pandas.DataFrame` (one column per label, without the leading ``_``, rows in
  file order); a list (single-row) block is a ``dict`` label -> value.
* Reading is delegated to :mod:`starfile`. Every problem with a file becomes one
  :class:`~cryoavg.errors.InputError`. Labels that RELION defines as strings (image,
  micrograph, group names ...) are kept as strings even when they look like numbers.
* Writing reproduces ``MetaDataTable::write`` of RELION 4.0/5.0 byte for byte:
  each block is preceded by a blank line, ``# version 50001``, a blank line,
  ``data_<name>`` and a blank line. List blocks write ``_label`` padded to
  ``12 + max(10, longest label)`` characters followed by the value; loop blocks write
  ``loop_ ``, ``_label #i `` lines, then one row per line with every value
  right-aligned in 10 characters and followed by a space; every block ends with a line
  holding a single space. Values: doubles ``%12.6f`` (``%12.5f`` when negative), or
  ``%12.6e`` / ``%12.5e`` when ``0 < |v| < 0.001`` or ``|v| > 100000``; integers
  ``%12d``; booleans ``%12d`` of 0/1; the empty string as ``""``; strings containing
  whitespace (or starting with a quote) in double quotes. Whether a column is written
  as integer or double is decided by its pandas dtype: integer columns stay integers.
  Tables without rows or labels are not written at all (as in RELION).
* All RELION label names used by cryoavg are defined here as constants, so that the
  rest of the code never spells a ``rln`` name itself.

Example
-------
>>> blocks = read_star("particles.star")  # doctest: +SKIP
>>> blocks["particles"][IMAGE_NAME].iloc[0]  # doctest: +SKIP
'000001@Extract/job007/Movies/mic001.mrcs'
>>> write_star("out.star", {"particles": subset})  # doctest: +SKIP
"""

import linecache
import mmap
import numbers
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from cryoavg.errors import InputError
from cryoavg.io.atomic import atomic_write

__all__ = [
    "STRING_LABELS",
    "StarBlock",
    "format_star",
    "format_value",
    "read_star",
    "write_star",
]

# --------------------------------------------------------------------------------------
# RELION label names (without the leading underscore)
# --------------------------------------------------------------------------------------

# images and micrographs
IMAGE_NAME = "rlnImageName"
IMAGE_ORIGINAL_NAME = "rlnImageOriginalName"
MICROGRAPH_NAME = "rlnMicrographName"
COORDINATE_X = "rlnCoordinateX"
COORDINATE_Y = "rlnCoordinateY"
PARTICLE_NAME = "rlnParticleName"
HELICAL_TUBE_ID = "rlnHelicalTubeID"

# optics groups (RELION >= 3.1 data_optics)
OPTICS_GROUP = "rlnOpticsGroup"
OPTICS_GROUP_NAME = "rlnOpticsGroupName"
IMAGE_PIXEL_SIZE = "rlnImagePixelSize"
IMAGE_SIZE = "rlnImageSize"
IMAGE_DIMENSIONALITY = "rlnImageDimensionality"
MICROGRAPH_PIXEL_SIZE = "rlnMicrographPixelSize"
MICROGRAPH_ORIGINAL_PIXEL_SIZE = "rlnMicrographOriginalPixelSize"
MTF_FILE_NAME = "rlnMtfFileName"
BEAM_TILT_X = "rlnBeamTiltX"
BEAM_TILT_Y = "rlnBeamTiltY"
CTF_DATA_ARE_CTF_PREMULTIPLIED = "rlnCtfDataAreCtfPremultiplied"

# RELION 3.0 pixel size: detector pixel (micrometre) / magnification
DETECTOR_PIXEL_SIZE = "rlnDetectorPixelSize"
MAGNIFICATION = "rlnMagnification"

# CTF
VOLTAGE = "rlnVoltage"
SPHERICAL_ABERRATION = "rlnSphericalAberration"
AMPLITUDE_CONTRAST = "rlnAmplitudeContrast"
DEFOCUS_U = "rlnDefocusU"
DEFOCUS_V = "rlnDefocusV"
DEFOCUS_ANGLE = "rlnDefocusAngle"
CTF_BFACTOR = "rlnCtfBfactor"
CTF_SCALEFACTOR = "rlnCtfScalefactor"
PHASE_SHIFT = "rlnPhaseShift"
CTF_MAX_RESOLUTION = "rlnCtfMaxResolution"
CTF_FIGURE_OF_MERIT = "rlnCtfFigureOfMerit"

# poses and per-particle refinement results (run_itNNN_data.star)
ANGLE_ROT = "rlnAngleRot"
ANGLE_TILT = "rlnAngleTilt"
ANGLE_PSI = "rlnAnglePsi"
ORIGIN_X_ANGST = "rlnOriginXAngst"
ORIGIN_Y_ANGST = "rlnOriginYAngst"
ORIGIN_Z_ANGST = "rlnOriginZAngst"
ORIGIN_X_PX = "rlnOriginX"  # RELION <= 3.0, pixels
ORIGIN_Y_PX = "rlnOriginY"  # RELION <= 3.0, pixels
ORIGIN_X_PRIOR_ANGST = "rlnOriginXPriorAngst"
ORIGIN_Y_PRIOR_ANGST = "rlnOriginYPriorAngst"
ANGLE_PSI_PRIOR = "rlnAnglePsiPrior"
ANGLE_TILT_PRIOR = "rlnAngleTiltPrior"
CLASS_NUMBER = "rlnClassNumber"
NORM_CORRECTION = "rlnNormCorrection"
LOG_LIKELI_CONTRIBUTION = "rlnLogLikeliContribution"
MAX_VALUE_PROB_DISTRIBUTION = "rlnMaxValueProbDistribution"
NR_OF_SIGNIFICANT_SAMPLES = "rlnNrOfSignificantSamples"
RANDOM_SUBSET = "rlnRandomSubset"
GROUP_NAME = "rlnGroupName"
GROUP_NUMBER = "rlnGroupNumber"
AUTOPICK_FIGURE_OF_MERIT = "rlnAutopickFigureOfMerit"

# run_itNNN_model.star: data_model_general
REFERENCE_DIMENSIONALITY = "rlnReferenceDimensionality"
DATA_DIMENSIONALITY = "rlnDataDimensionality"
ORIGINAL_IMAGE_SIZE = "rlnOriginalImageSize"
CURRENT_RESOLUTION = "rlnCurrentResolution"
CURRENT_IMAGE_SIZE = "rlnCurrentImageSize"
PADDING_FACTOR = "rlnPaddingFactor"
IS_HELIX = "rlnIsHelix"
FOURIER_SPACE_INTERPOLATOR = "rlnFourierSpaceInterpolator"
MIN_RADIUS_NN_INTERPOLATION = "rlnMinRadiusNnInterpolation"
PIXEL_SIZE = "rlnPixelSize"
NR_CLASSES = "rlnNrClasses"
NR_BODIES = "rlnNrBodies"
NR_GROUPS = "rlnNrGroups"
NR_OPTICS_GROUPS = "rlnNrOpticsGroups"
TAU2_FUDGE_FACTOR = "rlnTau2FudgeFactor"
NORM_CORRECTION_AVERAGE = "rlnNormCorrectionAverage"
SIGMA_OFFSETS_ANGST = "rlnSigmaOffsetsAngst"
ORIENTATIONAL_PRIOR_MODE = "rlnOrientationalPriorMode"
SIGMA_PRIOR_ROT_ANGLE = "rlnSigmaPriorRotAngle"
SIGMA_PRIOR_TILT_ANGLE = "rlnSigmaPriorTiltAngle"
SIGMA_PRIOR_PSI_ANGLE = "rlnSigmaPriorPsiAngle"
LOG_LIKELIHOOD = "rlnLogLikelihood"
AVERAGE_PMAX = "rlnAveragePmax"

# run_itNNN_model.star: data_model_classes
REFERENCE_IMAGE = "rlnReferenceImage"
GRAD_MOMENT_1 = "rlnGradMoment1"
GRAD_MOMENT_2 = "rlnGradMoment2"
CLASS_DISTRIBUTION = "rlnClassDistribution"
ACCURACY_ROTATIONS = "rlnAccuracyRotations"
ACCURACY_TRANSLATIONS_ANGST = "rlnAccuracyTranslationsAngst"
ESTIMATED_RESOLUTION = "rlnEstimatedResolution"
OVERALL_FOURIER_COMPLETENESS = "rlnOverallFourierCompleteness"
CLASS_PRIOR_OFFSET_X = "rlnClassPriorOffsetX"
CLASS_PRIOR_OFFSET_Y = "rlnClassPriorOffsetY"

# run_itNNN_model.star: data_model_class_N, data_model_groups, data_model_optics_group_N
SPECTRAL_INDEX = "rlnSpectralIndex"
RESOLUTION = "rlnResolution"
ANGSTROM_RESOLUTION = "rlnAngstromResolution"
SSNR_MAP = "rlnSsnrMap"
GOLD_STANDARD_FSC = "rlnGoldStandardFsc"
FOURIER_COMPLETENESS = "rlnFourierCompleteness"
REFERENCE_SIGMA2 = "rlnReferenceSigma2"
REFERENCE_TAU2 = "rlnReferenceTau2"
SPECTRAL_ORIENTABILITY_CONTRIBUTION = "rlnSpectralOrientabilityContribution"
GROUP_NR_PARTICLES = "rlnGroupNrParticles"
GROUP_SCALE_CORRECTION = "rlnGroupScaleCorrection"
SIGMA2_NOISE = "rlnSigma2Noise"

# run_itNNN_sampling.star: data_sampling_general
IS_3D_SAMPLING = "rlnIs3DSampling"
IS_3D_TRANSLATIONAL_SAMPLING = "rlnIs3DTranslationalSampling"
PSI_STEP = "rlnPsiStep"
OFFSET_RANGE = "rlnOffsetRange"
OFFSET_STEP = "rlnOffsetStep"
HELICAL_OFFSET_STEP = "rlnHelicalOffsetStep"
SAMPLING_PERTURB_INSTANCE = "rlnSamplingPerturbInstance"
SAMPLING_PERTURB_FACTOR = "rlnSamplingPerturbFactor"
HEALPIX_ORDER_ORIGINAL = "rlnHealpixOrderOriginal"
PSI_STEP_ORIGINAL = "rlnPsiStepOriginal"
OFFSET_RANGE_ORIGINAL = "rlnOffsetRangeOriginal"
OFFSET_STEP_ORIGINAL = "rlnOffsetStepOriginal"

# class ranker / selection
CLASS_SCORE = "rlnClassScore"
SELECTED = "rlnSelected"

#: Labels that RELION stores as strings. They are read as strings even when every
#: value looks like a number (e.g. micrograph names "1", "2", ...).
STRING_LABELS: frozenset[str] = frozenset(
    {
        IMAGE_NAME,
        IMAGE_ORIGINAL_NAME,
        MICROGRAPH_NAME,
        PARTICLE_NAME,
        OPTICS_GROUP_NAME,
        MTF_FILE_NAME,
        GROUP_NAME,
        REFERENCE_IMAGE,
        GRAD_MOMENT_1,
        GRAD_MOMENT_2,
        "rlnOutputRootName",
        "rlnModelStarFile",
        "rlnModelStarFile2",
        "rlnExperimentalDataStarFile",
        "rlnOrientSamplingStarFile",
        "rlnSolventMaskName",
        "rlnSolventMask2Name",
        "rlnBodyStarFile",
        "rlnTauSpectrumName",
        "rlnLocalSymmetryFile",
        "rlnFourierMask",
        "rlnTomoTomogramsFile",
        "rlnTomoTrajectoriesFile",
        "rlnMicrographMovieName",
        "rlnCtfImage",
        "rlnMaskName",
    }
)

#: A STAR block: a loop (DataFrame) or a list block (label -> value).
StarBlock = pd.DataFrame | dict[str, Any]

RELION_STAR_VERSION = 50001

# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def read_star(path: str | os.PathLike[str]) -> dict[str, StarBlock]:
    """Read every data block of a STAR file.

    Parameters
    ----------
    path
        The STAR file.

    Returns
    -------
    dict
        Block name (without ``data_``; ``""`` for an unnamed ``data_`` block) ->
        :class:`pandas.DataFrame` for loop blocks (rows in file order, integer columns
        as ``int64``, real columns as ``float64``, text as strings) or ``dict`` for
        list blocks. Blocks appear in file order.

    Raises
    ------
    InputError
        The file is missing, unreadable, empty, not a STAR file, has no data block,
        or a block is malformed.
    """
    star_path = Path(path)
    _check_readable(star_path)
    if star_path.stat().st_size == 0:
        raise InputError(star_path, "empty file")
    _check_unique_blocks(star_path)
    try:
        blocks = starfile.read(
            star_path, always_dict=True, parse_as_string=sorted(STRING_LABELS)
        )
    except Exception as err:  # starfile/pandas raise many kinds on malformed text
        raise InputError(
            star_path, f"not a readable STAR file ({_short(err)})"
        ) from err
    finally:
        # starfile reads the lines through linecache and clears it only after a
        # successful parse: after a failed one, the next read of the same path would
        # see the old lines
        linecache.clearcache()
    if not blocks:
        raise InputError(star_path, "no data_ block found; not a STAR file")
    result: dict[str, StarBlock] = {}
    for name, block in blocks.items():
        if block is None:
            raise InputError(star_path, f"data_{name} block has no labels")
        if isinstance(block, pd.DataFrame):
            block = block.reset_index(drop=True)
            block.columns = [str(column) for column in block.columns]
            duplicated = sorted(set(block.columns[block.columns.duplicated()]))
            if duplicated:
                raise InputError(
                    star_path,
                    f"data_{name}: label(s) {', '.join(duplicated)} appear twice",
                )
        result[str(name)] = block
    return result


_BLOCK_NAME = re.compile(rb"^data_(\S*)", re.MULTILINE)


def _check_unique_blocks(path: Path) -> None:
    """Raise InputError when two data blocks share a name (starfile merges them)."""
    try:
        with (
            open(path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as content,
        ):
            names = [match.group(1) for match in _BLOCK_NAME.finditer(content)]
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read ({_short(err)})") from err
    seen: set[bytes] = set()
    for name in names:
        if name in seen:
            shown = name.decode("utf-8", "replace")
            raise InputError(path, f"block data_{shown} appears twice")
        seen.add(name)


def _check_readable(path: Path) -> None:
    """Raise InputError unless ``path`` is an existing, readable regular file."""
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------

_LOOP_VALUE_WIDTH = 10
_LIST_MIN_LABEL_WIDTH = 10
_LIST_LABEL_PAD = 12


def _format_double(value: float) -> str:
    """RELION's ``getValueToString`` for doubles (buffer of 12 characters + NUL)."""
    magnitude = abs(value)
    if (0.0 < magnitude < 0.001) or magnitude > 100000.0:
        return f"{value:12.5e}" if value < 0 else f"{value:12.6e}"
    # RELION snprintf's into a 13-byte buffer: |v| == 100000 would need 13 characters
    # and is cut to 12, which changes only the last (redundant) decimal.
    text = f"{value:12.5f}" if value < 0 else f"{value:12.6f}"
    return text[:12]


def _escape_string(value: str) -> str:
    """RELION's ``escapeStringForSTAR``: quote empty and whitespace strings."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"STAR values cannot contain line breaks: {value!r}")
    if value == "":
        return '""'
    if value[0] in "\"'" or " " in value or "\t" in value:
        return f'"{value}"'
    return value


def format_value(value: Any) -> str:
    """Format one value as RELION writes it in a STAR file.

    Parameters
    ----------
    value
        A bool, integer, real number or string (Python or NumPy scalar).

    Returns
    -------
    str
        Booleans and integers as ``%12d``; reals as ``%12.6f`` (``%12.5f`` negative),
        or ``%12.6e`` (``%12.5e``) when ``0 < |v| < 0.001`` or ``|v| > 100000``;
        strings unpadded, quoted when empty, containing whitespace or starting with a
        quote.

    Raises
    ------
    ValueError
        Missing values (``None``, ``pd.NA``) and strings with line breaks cannot be
        written.
    """
    if isinstance(value, bool | np.bool_):
        return f"{int(value):12d}"
    if isinstance(value, numbers.Integral):
        return f"{int(value):12d}"
    if isinstance(value, numbers.Real):
        return _format_double(float(value))
    if value is None or value is pd.NA:
        raise ValueError("STAR values cannot be missing (None/NA)")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _escape_string(str(value))


def _format_doubles(values: np.ndarray) -> list[str]:
    """Vectorised :func:`_format_double` for a float64 array (same output)."""
    magnitude = np.abs(values)
    scientific = ((magnitude > 0.0) & (magnitude < 0.001)) | (magnitude > 100000.0)
    negative = values < 0.0
    texts: list[str] = [""] * values.size
    for mask, form in (
        (~scientific & ~negative, "%12.6f"),
        (~scientific & negative, "%12.5f"),
        (scientific & ~negative, "%12.6e"),
        (scientific & negative, "%12.5e"),
    ):
        positions = np.flatnonzero(mask)
        for position, value in zip(
            positions.tolist(), values[positions].tolist(), strict=True
        ):
            texts[position] = form % value
    for position in np.flatnonzero(magnitude == 100000.0).tolist():
        texts[position] = texts[position][:12]  # RELION's 12-character buffer
    return texts


def _format_column(column: pd.Series) -> list[str]:
    """Format a whole loop column according to its dtype (ints stay ints).

    Numbers come out at least 12 characters wide; strings are right-aligned in 10.
    """
    dtype = column.dtype
    if column.isna().any() and not pd.api.types.is_float_dtype(dtype):
        raise ValueError(f"column {column.name!r} has missing values")
    if pd.api.types.is_bool_dtype(dtype):
        return [f"{v:12d}" for v in column.to_numpy(dtype=np.int64).tolist()]
    if pd.api.types.is_integer_dtype(dtype):
        return [f"{v:12d}" for v in column.to_numpy(dtype=np.int64).tolist()]
    if pd.api.types.is_float_dtype(dtype):
        return _format_doubles(column.to_numpy(dtype=np.float64))
    return [format_value(v).rjust(_LOOP_VALUE_WIDTH) for v in column.tolist()]


#: Rows formatted at a time: bounds the memory of writing very large tables.
_LOOP_CHUNK_ROWS = 20_000


def _format_loop(name: str, table: pd.DataFrame) -> Iterator[str]:
    yield "loop_ "
    yield from (f"_{label} #{i} " for i, label in enumerate(table.columns, start=1))
    for start in range(0, table.shape[0], _LOOP_CHUNK_ROWS):
        chunk = table.iloc[start : start + _LOOP_CHUNK_ROWS]
        columns = []
        for label in chunk.columns:
            try:
                columns.append(_format_column(chunk[label]))
            except ValueError as err:
                raise ValueError(f"data_{name}, {label}: {err}") from err
        yield from (" ".join(row) + " " for row in zip(*columns, strict=True))
    yield " "


def _format_list(name: str, values: Mapping[str, Any], lines: list[str]) -> None:
    width = max(_LIST_MIN_LABEL_WIDTH, *(len(str(label)) for label in values))
    for label, value in values.items():
        try:
            text = format_value(value)
        except ValueError as err:
            raise ValueError(f"data_{name}, {label}: {err}") from err
        lines.append(f"_{str(label).ljust(_LIST_LABEL_PAD + width)}{text}")
    lines.append(" ")


def _is_empty(block: StarBlock) -> bool:
    if isinstance(block, pd.DataFrame):
        return block.shape[0] == 0 or block.shape[1] == 0
    return len(block) == 0


def format_star(
    blocks: Mapping[str, StarBlock],
    *,
    version: int = RELION_STAR_VERSION,
    header_comments: Iterable[str] | None = None,
) -> str:
    """Format data blocks as the text of a STAR file, in RELION's exact layout.

    Parameters
    ----------
    blocks
        Block name (without ``data_``) -> loop (:class:`pandas.DataFrame`) or list
        block (mapping label -> value), written in the given order. Labels are the
        column names / keys without the leading underscore. Empty tables are skipped,
        as RELION does.
    version
        Number written in the ``# version`` line before each block (RELION 4.0:
        30001, 5.0: 50001). Below 30000 no version line is written.
    header_comments
        Lines written first, before any block (e.g. the two header lines of
        ``run_itNNN_optimiser.star``). A ``"# "`` is prepended to lines that do not
        start with ``#``.

    Returns
    -------
    str
        The file content, ending with a newline.

    Raises
    ------
    ValueError
        A block is not a DataFrame or mapping, or a value cannot be written (missing
        value in a non-float column, string with a line break).
    """
    return (
        "\n".join(_star_lines(blocks, version=version, header_comments=header_comments))
        + "\n"
    )


def _star_lines(
    blocks: Mapping[str, StarBlock],
    *,
    version: int,
    header_comments: Iterable[str] | None,
) -> Iterator[str]:
    """The lines of :func:`format_star`, generated block by block (and row chunk)."""
    for comment in header_comments or ():
        text = str(comment)
        if "\n" in text:
            raise ValueError("header comments cannot contain line breaks")
        yield text if text.startswith("#") else f"# {text}"
    for name, block in blocks.items():
        if not isinstance(block, pd.DataFrame | Mapping):
            raise ValueError(
                f"data_{name}: expected a DataFrame or a dict, "
                f"got {type(block).__name__}"
            )
        if _is_empty(block):
            continue
        yield ""
        if version >= 30000:
            yield f"# version {version}"
            yield ""
        yield f"data_{name}"
        yield ""
        if isinstance(block, pd.DataFrame):
            yield from _format_loop(name, block)
        else:
            lines: list[str] = []
            _format_list(name, block, lines)
            yield from lines


def write_star(
    path: str | os.PathLike[str],
    blocks: Mapping[str, StarBlock],
    *,
    version: int = RELION_STAR_VERSION,
    header_comments: Iterable[str] | None = None,
) -> None:
    """Write data blocks to a STAR file atomically, in RELION's exact layout.

    Parameters
    ----------
    path
        Output file. Written to a temporary file first and renamed into place.
    blocks
        Block name -> loop (DataFrame) or list block (mapping); see :func:`format_star`.
    version
        Number written in the ``# version`` lines (50001 = RELION 5.0).
    header_comments
        Lines written before the first block; see :func:`format_star`.

    Raises
    ------
    OutputError
        The file could not be written.
    ValueError
        A value cannot be represented in a STAR file.
    """
    # formatted and written in pieces, so that huge tables never exist as one string;
    # a formatting error leaves no file (atomic_write removes the temporary file)
    lines = _star_lines(blocks, version=version, header_comments=header_comments)
    with atomic_write(path) as handle:
        for line in lines:
            handle.write(line)
            handle.write("\n")
