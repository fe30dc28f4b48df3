"""Reading and writing local-symmetry files (spec §D.2) and validating masks/maps.

Formats
-------
* Operator STAR (``--i_mask_info`` / ``--o_mask_info`` ending in ``.star``): one table,
  one row per (mask, operator): ``rlnMaskName``, ``rlnAngleRot``, ``rlnAngleTilt``,
  ``rlnAnglePsi``, ``rlnOriginXAngst``, ``rlnOriginYAngst``, ``rlnOriginZAngst`` (Å;
  the pre-3.1 names ``rlnOriginX/Y/Z`` are accepted and read as Å, as RELION does).
  Rows are grouped by exact mask name in order of first appearance; identity
  operators are dropped (with a note); duplicated operators of one mask and two masks
  with the same basename are errors; every mask needs at least one operator.
* Mask list STAR (``--i_op_mask_info``, global search): ``rlnMaskName``,
  ``rlnAreaId`` (positive integers); 2..999 rows, no duplicated names, every area id
  ``1..max`` has at least two masks; the first mask of an area is the reference.
* DM / CCP4-style text (any other extension): ``MASKFILENAME <path>`` blocks with
  ``ROTA EULER a b g`` / ``ROTA POLAR w p k`` / ``ROTA MATRIX`` (3 rows) / ``OMAT``
  (3 rows + translation row), each followed (except OMAT) by ``TRAN dx dy dz`` (Å).
* Search candidate tables ``<stem>_cc_maskMMM_opOOO.star``: rlnAngleRot/Tilt/Psi,
  rlnOriginX/Y/ZAngst, rlnImageWeight (score, ascending).

Example
-------
>>> groups = read_mask_info("mask_and_operators.star")  # doctest: +SKIP
>>> masks = load_masks(groups, (64, 64, 64), 1.34)  # doctest: +SKIP
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from cryoavg.errors import InputError
from cryoavg.io.atomic import atomic_write
from cryoavg.io.mrc import read_map_3d
from cryoavg.io.star import (
    ANGLE_PSI,
    ANGLE_ROT,
    ANGLE_TILT,
    ORIGIN_X_ANGST,
    ORIGIN_X_PX,
    ORIGIN_Y_ANGST,
    ORIGIN_Y_PX,
    ORIGIN_Z_ANGST,
    read_star,
    write_star,
)
from cryoavg.localsym.operators import (
    LocalSymmetryOperator,
    MaskOperators,
    same_operator,
)
from cryoavg.ops.rotations import axis_angle_to_matrix

__all__ = [
    "MASK_NAME",
    "MaskArea",
    "check_map",
    "load_map",
    "load_mask",
    "load_masks",
    "read_dm_text",
    "read_mask_info",
    "read_mask_list",
    "read_operator_star",
    "write_candidate_table",
    "write_dm_text",
    "write_mask_info",
    "write_operator_star",
]

MASK_NAME = "rlnMaskName"
AREA_ID = "rlnAreaId"
IMAGE_WEIGHT = "rlnImageWeight"
ORIGIN_Z_PX = "rlnOriginZ"
_TRANSLATION_COLUMNS = (
    (ORIGIN_X_ANGST, ORIGIN_Y_ANGST, ORIGIN_Z_ANGST),
    (ORIGIN_X_PX, ORIGIN_Y_PX, ORIGIN_Z_PX),
)
_MASK_EPS = 1e-6


def _single_table(path: Path) -> pd.DataFrame:
    blocks = read_star(path)
    tables = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
    if not tables:
        raise InputError(path, "no loop table found (expected one row per operator)")
    return tables[0]


def _require(path: Path, table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)}")


def _float_column(path: Path, table: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
    if not np.all(np.isfinite(values)):
        raise InputError(path, f"column {column} has non-numeric or non-finite values")
    return values


def _group_operators(
    path: Path, rows: list[tuple[str, LocalSymmetryOperator]]
) -> list[MaskOperators]:
    """Group rows by mask name, drop identities, reject duplicates (§D.2.1)."""
    groups: dict[str, MaskOperators] = {}
    for name, operator in rows:
        group = groups.setdefault(name, MaskOperators(name))
        if operator.is_identity():
            continue
        for existing in group.operators:
            if same_operator(existing, operator):
                raise InputError(
                    path, f"duplicated operator {operator.angles_degrees} for {name}"
                )
        group.operators.append(operator.standardised())
    basenames: dict[str, str] = {}
    for name, group in groups.items():
        base = os.path.basename(name)
        if base in basenames:
            raise InputError(
                path, f"masks {basenames[base]} and {name} have the same basename"
            )
        basenames[base] = name
        if not group.operators:
            raise InputError(path, f"mask {name} has no non-identity operator")
    if not groups:
        raise InputError(path, "no operators (the table has no rows)")
    return list(groups.values())


def read_operator_star(path: str | os.PathLike[str]) -> list[MaskOperators]:
    """Read an operator STAR file (§D.2.1).

    Parameters
    ----------
    path
        STAR file with rlnMaskName, rlnAngleRot/Tilt/Psi and rlnOriginX/Y/ZAngst (or
        rlnOriginX/Y/Z, read as Å).

    Returns
    -------
    list of MaskOperators
        One entry per mask, in order of first appearance, identity operators dropped.

    Raises
    ------
    InputError
        Missing columns, non-numeric values, duplicated operators, masks with the same
        basename, or a mask without operators.
    """
    star_path = Path(path)
    table = _single_table(star_path)
    _require(star_path, table, (MASK_NAME, ANGLE_ROT, ANGLE_TILT, ANGLE_PSI))
    for names in _TRANSLATION_COLUMNS:
        if all(n in table.columns for n in names):
            shift_columns = names
            break
    else:
        raise InputError(
            star_path,
            "missing column(s) rlnOriginXAngst, rlnOriginYAngst, rlnOriginZAngst "
            "(or rlnOriginX/Y/Z)",
        )
    values = np.stack(
        [
            _float_column(star_path, table, c)
            for c in (ANGLE_ROT, ANGLE_TILT, ANGLE_PSI, *shift_columns)
        ],
        axis=1,
    )
    names = [str(n) for n in table[MASK_NAME]]
    rows = [
        (name, LocalSymmetryOperator(v[0], v[1], v[2], (v[3], v[4], v[5])))
        for name, v in zip(names, values.tolist(), strict=True)
    ]
    return _group_operators(star_path, rows)


def write_operator_star(
    path: str | os.PathLike[str], groups: Sequence[MaskOperators]
) -> None:
    """Write an operator STAR file (RELION 3.1+ column names, Å), atomically."""
    rows = [
        {
            MASK_NAME: group.mask_name,
            ANGLE_ROT: op.rot_degrees,
            ANGLE_TILT: op.tilt_degrees,
            ANGLE_PSI: op.psi_degrees,
            ORIGIN_X_ANGST: op.translation_angstrom[0],
            ORIGIN_Y_ANGST: op.translation_angstrom[1],
            ORIGIN_Z_ANGST: op.translation_angstrom[2],
        }
        for group in groups
        for op in group.operators
    ]
    write_star(path, {"": pd.DataFrame(rows)})


# --------------------------------------------------------------------------------------
# DM / CCP4 text format
# --------------------------------------------------------------------------------------


def _matrix_operator(
    path: Path, matrix_rows: list[list[float]], translation: list[float]
) -> LocalSymmetryOperator:
    matrix = torch.tensor(matrix_rows, dtype=torch.float64)
    if not torch.allclose(
        matrix @ matrix.T, torch.eye(3, dtype=torch.float64), atol=1e-3
    ):
        raise InputError(path, f"operator matrix {matrix_rows} is not a rotation")
    # RELION: angles = Euler_matrix2angles(M^T)
    return LocalSymmetryOperator.from_matrix(matrix.T, translation)


def _numbers(path: Path, words: Sequence[str], count: int, line: str) -> list[float]:
    try:
        values = [float(w) for w in words[:count]]
    except ValueError as err:
        raise InputError(path, f"cannot parse numbers in line '{line}'") from err
    if len(values) != count:
        raise InputError(path, f"expected {count} numbers in line '{line}'")
    if not all(math.isfinite(v) for v in values):
        raise InputError(path, f"non-finite number in line '{line}'")
    return values


def read_dm_text(path: str | os.PathLike[str]) -> list[MaskOperators]:
    """Read the DM/CCP4-style operator text format (§D.2.2).

    Returns
    -------
    list of MaskOperators
        As :func:`read_operator_star`.
    """
    text_path = Path(path)
    if not text_path.is_file():
        raise InputError(text_path, "file not found")
    lines = [
        line.strip()
        for line in text_path.read_text(errors="replace").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    rows: list[tuple[str, LocalSymmetryOperator]] = []
    mask: str | None = None
    index = 0

    def next_words() -> tuple[list[str], str]:
        nonlocal index
        if index >= len(lines):
            raise InputError(text_path, "unexpected end of file inside an operator")
        line = lines[index]
        index += 1
        return line.split(), line

    while index < len(lines):
        words, line = next_words()
        key = words[0].upper()
        if key == "MASKFILENAME":
            if len(words) < 2:
                raise InputError(text_path, "MASKFILENAME without a file name")
            mask = words[1]
            continue
        if mask is None:
            raise InputError(text_path, f"operator before any MASKFILENAME: '{line}'")
        if key == "OMAT":
            matrix = [_numbers(text_path, next_words()[0], 3, line) for _ in range(3)]
            translation = _numbers(text_path, next_words()[0], 3, line)
            rows.append((mask, _matrix_operator(text_path, matrix, translation)))
            continue
        if key != "ROTA" or len(words) < 2:
            raise InputError(text_path, f"unexpected line '{line}'")
        kind = words[1].upper()
        if kind == "EULER":
            angles = _numbers(text_path, words[2:], 3, line)
        elif kind == "POLAR":
            omega, phi, kappa = (
                math.radians(v) for v in _numbers(text_path, words[2:], 3, line)
            )
            axis = torch.tensor(
                [
                    math.sin(omega) * math.cos(phi),
                    math.sin(omega) * math.sin(phi),
                    math.cos(omega),
                ],
                dtype=torch.float64,
            )
            matrix_t = axis_angle_to_matrix(axis * kappa)
            angles = []
        elif kind == "MATRIX":
            first = _numbers(text_path, words[2:], 3, line)
            matrix = [first] + [
                _numbers(text_path, next_words()[0], 3, line) for _ in range(2)
            ]
            angles = []
        else:
            raise InputError(text_path, f"unknown rotation type in '{line}'")
        tran_words, tran_line = next_words()
        if tran_words[0].upper() != "TRAN":
            raise InputError(text_path, f"expected TRAN after ROTA, got '{tran_line}'")
        translation = _numbers(text_path, tran_words[1:], 3, tran_line)
        if kind == "EULER":
            operator = LocalSymmetryOperator(
                angles[0],
                angles[1],
                angles[2],
                tuple(translation),  # type: ignore[arg-type]
            )
        elif kind == "POLAR":
            operator = _matrix_operator(text_path, matrix_t.tolist(), translation)
        else:
            operator = _matrix_operator(text_path, matrix, translation)
        rows.append((mask, operator))
    if not rows:
        raise InputError(text_path, "no operators found")
    return _group_operators(text_path, rows)


def write_dm_text(
    path: str | os.PathLike[str], groups: Sequence[MaskOperators]
) -> None:
    """Write the DM text format (``MASKFILENAME`` + ``ROTA EULER`` / ``TRAN``)."""
    lines: list[str] = []
    for group in groups:
        lines.append(f"MASKFILENAME {group.mask_name}")
        for op in group.operators:
            lines.append(
                " ROTA EULER" + "".join(f"{a:15.6f}" for a in op.angles_degrees)
            )
            lines.append(
                "       TRAN" + "".join(f"{v:15.6f}" for v in op.translation_angstrom)
            )
    with atomic_write(path) as handle:
        handle.write("\n".join(lines) + "\n")


def read_mask_info(path: str | os.PathLike[str]) -> list[MaskOperators]:
    """Read masks + operators: STAR when the name ends in ``.star``, else DM text."""
    if str(path).lower().endswith(".star"):
        return read_operator_star(path)
    return read_dm_text(path)


def write_mask_info(
    path: str | os.PathLike[str], groups: Sequence[MaskOperators]
) -> None:
    """Write masks + operators: STAR when the name ends in ``.star``, else DM text."""
    if str(path).lower().endswith(".star"):
        write_operator_star(path, groups)
    else:
        write_dm_text(path, groups)


def write_candidate_table(
    path: str | os.PathLike[str], candidates: Sequence[LocalSymmetryOperator]
) -> None:
    """Write a ``_cc_maskMMM_opOOO.star`` table (§D.2.4), sorted by score ascending."""
    ordered = sorted(
        candidates, key=lambda op: math.inf if op.score is None else op.score
    )
    table = pd.DataFrame(
        {
            ANGLE_ROT: [op.rot_degrees for op in ordered],
            ANGLE_TILT: [op.tilt_degrees for op in ordered],
            ANGLE_PSI: [op.psi_degrees for op in ordered],
            ORIGIN_X_ANGST: [op.translation_angstrom[0] for op in ordered],
            ORIGIN_Y_ANGST: [op.translation_angstrom[1] for op in ordered],
            ORIGIN_Z_ANGST: [op.translation_angstrom[2] for op in ordered],
            IMAGE_WEIGHT: [float(op.score or 0.0) for op in ordered],
        }
    )
    write_star(path, {"": table})


class MaskArea:
    """One area of a global-search mask list: the reference mask and the others.

    Attributes
    ----------
    area_id
        Positive area id.
    mask_names
        Mask files in file order; the first is the reference region.
    """

    def __init__(self, area_id: int, mask_names: list[str]) -> None:
        self.area_id = area_id
        self.mask_names = mask_names

    def __repr__(self) -> str:
        return f"MaskArea({self.area_id}, {self.mask_names})"


def read_mask_list(path: str | os.PathLike[str]) -> list[MaskArea]:
    """Read a global-search mask list (rlnMaskName, rlnAreaId; §D.2.3).

    Raises
    ------
    InputError
        Missing columns, fewer than 2 or more than 999 rows, duplicated names,
        non-positive ids, or an area id ``1..max`` with fewer than two masks.
    """
    star_path = Path(path)
    table = _single_table(star_path)
    _require(star_path, table, (MASK_NAME, AREA_ID))
    if not 2 <= len(table) <= 999:
        raise InputError(star_path, f"needs 2 to 999 masks, found {len(table)}")
    names = [str(n) for n in table[MASK_NAME]]
    if len(set(names)) != len(names):
        raise InputError(star_path, "duplicated mask file names")
    ids_float = _float_column(star_path, table, AREA_ID)
    if np.any(ids_float < 1) or np.any(ids_float != np.round(ids_float)):
        raise InputError(star_path, "rlnAreaId must be positive integers")
    ids = ids_float.astype(int)
    areas = []
    for area_id in range(1, int(ids.max()) + 1):
        members = [n for n, i in zip(names, ids, strict=True) if i == area_id]
        if len(members) < 2:
            raise InputError(
                star_path, f"area {area_id} needs at least 2 masks, has {len(members)}"
            )
        areas.append(MaskArea(area_id, members))
    return areas


# --------------------------------------------------------------------------------------
# maps and masks
# --------------------------------------------------------------------------------------


def check_map(path: str | os.PathLike[str], volume: np.ndarray) -> None:
    """Raise :class:`InputError` unless ``volume`` is a finite, cubic, even-sized map."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(path, f"map must be cubic, got shape {tuple(volume.shape)}")
    if volume.shape[0] % 2:
        raise InputError(path, f"map size must be even, got {volume.shape[0]}")
    if not np.all(np.isfinite(volume)):
        raise InputError(path, "map contains NaN or infinite values")


def _header_pixel_mismatch(
    header: float | None, expected: float | None, tolerance: float = 0.01
) -> bool:
    if header is None or expected is None:
        return False
    return abs(header - expected) > tolerance * expected


def load_map(
    path: str | os.PathLike[str], pixel_size_angstrom: float | None = None
) -> tuple[torch.Tensor, float]:
    """Read and check a map; the pixel size is ``pixel_size_angstrom`` or the header's.

    Returns
    -------
    volume : torch.Tensor
        ``(n, n, n)`` float32 map.
    pixel_size_angstrom : float
        Pixel size in Å.
    """
    data, header_pixel = read_map_3d(path)
    check_map(path, data)
    pixel = pixel_size_angstrom if pixel_size_angstrom else header_pixel
    if pixel is None or not pixel > 0:
        raise InputError(path, "no pixel size in the header: give angpix=... (Å/px)")
    return torch.from_numpy(data), float(pixel)


def _header_origin_px(path: Path) -> tuple[float, float, float]:
    """Header origin shift (xyz, px): nxstart/nystart/nzstart plus origin / voxel."""
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as handle:
            header = handle.header
            start = (
                float(header.nxstart),
                float(header.nystart),
                float(header.nzstart),
            )
            voxel = float(handle.voxel_size.x) or 1.0
            origin = (
                float(header.origin.x) / voxel,
                float(header.origin.y) / voxel,
                float(header.origin.z) / voxel,
            )
    except Exception:  # header already validated by read_map_3d; be lenient here
        return (0.0, 0.0, 0.0)
    return tuple(s + o for s, o in zip(start, origin, strict=True))  # type: ignore[return-value]


def load_mask(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    pixel_size_angstrom: float | None = None,
    warnings: list[str] | None = None,
) -> torch.Tensor:
    """Read and validate one mask (§D.2.1).

    Parameters
    ----------
    path
        Mask MRC file.
    shape
        ``(n, n, n)`` shape of the map the mask belongs to.
    pixel_size_angstrom
        Pixel size of the map in Å; a header pixel size differing by more than 1 % is an
        error (headers without a pixel size are accepted).
    warnings
        List to which a note is appended when the header carries an origin shift
        (masks must be at the subunit's absolute position; the shift is ignored).

    Returns
    -------
    torch.Tensor
        ``(n, n, n)`` float32 mask in [0, 1].

    Raises
    ------
    InputError
        Wrong size or pixel size, values outside [0, 1], non-finite or all-zero mask.
    """
    mask_path = Path(path)
    data, header_pixel = read_map_3d(mask_path)
    if tuple(data.shape) != tuple(shape):
        raise InputError(
            mask_path,
            f"mask shape {tuple(data.shape)} differs from the map's {tuple(shape)}",
        )
    if _header_pixel_mismatch(header_pixel, pixel_size_angstrom):
        raise InputError(
            mask_path,
            f"mask pixel size {header_pixel:.4f} Å differs from the map's "
            f"{pixel_size_angstrom:.4f} Å",
        )
    if not np.all(np.isfinite(data)):
        raise InputError(mask_path, "mask contains NaN or infinite values")
    low, high = float(data.min()), float(data.max())
    if low < -_MASK_EPS or high > 1.0 + _MASK_EPS:
        raise InputError(
            mask_path, f"mask values must lie in [0, 1], found [{low:.4g}, {high:.4g}]"
        )
    if high <= _MASK_EPS:
        raise InputError(mask_path, "mask is entirely zero")
    origin = _header_origin_px(mask_path)
    if any(abs(v) > 1e-3 for v in origin) and warnings is not None:
        warnings.append(
            f"{mask_path}: header origin shift ({origin[0]:.2f}, {origin[1]:.2f}, "
            f"{origin[2]:.2f}) px ignored; masks must be at the absolute position"
        )
    return torch.from_numpy(np.clip(data, 0.0, 1.0))


def load_masks(
    groups: Sequence[MaskOperators] | Sequence[str],
    shape: Sequence[int],
    pixel_size_angstrom: float | None = None,
    warnings: list[str] | None = None,
) -> list[torch.Tensor]:
    """Load the masks of operator groups (or a list of mask names), validated."""
    names = [g.mask_name if isinstance(g, MaskOperators) else str(g) for g in groups]
    return [load_mask(n, shape, pixel_size_angstrom, warnings) for n in names]
