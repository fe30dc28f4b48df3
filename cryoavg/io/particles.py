"""RELION particle tables: reading, validation, derived per-particle arrays, writing.

Conventions
-----------
* A :class:`ParticleTable` keeps the STAR ``data_particles`` table exactly as read
  (all columns, file order) and, for RELION >= 3.1 files, the ``data_optics`` table.
  RELION 3.0 files (no optics block) keep ``optics = None``; their optics values
  (voltage, Cs, amplitude contrast, pixel size) come from particle columns.
* Indices are 0-based everywhere in Python: particle ``i`` is row ``i`` of the file,
  image ``k`` of a stack is ``(k + 1)@stack.mrcs`` in the STAR file, optics group
  index ``g`` is the ``g``-th group in increasing ``rlnOpticsGroup`` number, and
  micrograph groups are numbered as RELION's ``Experiment::read`` numbers them
  (``rlnGroupNumber - 1``).
* Units: Å for pixel sizes and defocus, degrees for angles and phase shift, kV, mm
  (Cs), Å² (B-factor). Per-particle value lookup follows RELION's ``CTF::readByGroup``:
  a particle column wins over the optics column, else RELION's default is used.
* Pixel size: ``rlnImagePixelSize`` of the optics group (3.1), else a
  ``rlnImagePixelSize`` particle column, else ``rlnDetectorPixelSize`` (µm) ·
  10⁴ / ``rlnMagnification`` (3.0); an explicit ``pixel_size_angstrom`` argument
  overrides all of them.
* Stack paths in ``rlnImageName`` that are relative are looked up next to the STAR
  file first, then in the project directory (RELION runs from the project root).

Example
-------
>>> table = read_particles("Extract/job007/particles.star")  # doctest: +SKIP
>>> table.n_particles, table.box_size, table.pixel_size_angstrom[:2]  # doctest: +SKIP
(10000, 256, array([1.06, 1.06]))
>>> ctf = table.ctf_parameters()  # doctest: +SKIP
>>> write_particles("particles.star", table.subset(kept))  # doctest: +SKIP
"""

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoavg.errors import ConfigError, InputError
from cryoavg.io import star as labels
from cryoavg.io.mrc import read_mrc_header
from cryoavg.io.star import RELION_STAR_VERSION, read_star, write_star

__all__ = [
    "CTF_KEYS",
    "ParticleTable",
    "format_image_name",
    "parse_image_name",
    "read_particles",
    "resolve_stack_path",
    "strip_pipeline_prefix",
    "write_particles",
]

#: Keys of :meth:`ParticleTable.ctf_parameters`, in order.
CTF_KEYS: tuple[str, ...] = (
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "defocus_angle_degrees",
    "voltage_kv",
    "cs_mm",
    "amplitude_contrast",
    "phase_shift_degrees",
    "bfactor_angstrom2",
    "scale",
    "pixel_size_angstrom",
)

# (key, RELION label, RELION default) as in CTF::readByGroup; defocus V defaults to U.
_CTF_LABELS: tuple[tuple[str, str, float | None], ...] = (
    ("defocus_u_angstrom", labels.DEFOCUS_U, 0.0),
    ("defocus_v_angstrom", labels.DEFOCUS_V, None),
    ("defocus_angle_degrees", labels.DEFOCUS_ANGLE, 0.0),
    ("voltage_kv", labels.VOLTAGE, 200.0),
    ("cs_mm", labels.SPHERICAL_ABERRATION, 0.0),
    ("amplitude_contrast", labels.AMPLITUDE_CONTRAST, 0.0),
    ("phase_shift_degrees", labels.PHASE_SHIFT, 0.0),
    ("bfactor_angstrom2", labels.CTF_BFACTOR, 0.0),
    ("scale", labels.CTF_SCALEFACTOR, 1.0),
)
_REQUIRED_CTF_LABELS = (
    labels.DEFOCUS_U,
    labels.DEFOCUS_V,
    labels.DEFOCUS_ANGLE,
    labels.VOLTAGE,
    labels.SPHERICAL_ABERRATION,
    labels.AMPLITUDE_CONTRAST,
)
# RELION 3.0 particle columns that define an optics group when converting to 3.1
_OPTICS_DEFINING_LABELS = (
    labels.VOLTAGE,
    labels.SPHERICAL_ABERRATION,
    labels.AMPLITUDE_CONTRAST,
    labels.BEAM_TILT_X,
    labels.BEAM_TILT_Y,
)
_IMAGE_NAME_PATTERN = re.compile(r"^\s*(\d+)@(.+?)\s*$")
_PIPELINE_PREFIX = re.compile(r"^.+?/job\d{3}[^/]*/")


# --------------------------------------------------------------------------------------
# image names and stack paths
# --------------------------------------------------------------------------------------


def parse_image_name(image_name: str) -> tuple[int, str]:
    """Split a RELION image name into a 0-based index and the stack path.

    Parameters
    ----------
    image_name
        ``"000012@Extract/job007/mic.mrcs"`` (1-based image number in the file) or a
        plain file name (a single image, index 0).

    Returns
    -------
    index0 : int
        0-based image index within the stack.
    stack_path : str
        The stack path as written (not resolved).

    Raises
    ------
    ValueError
        Empty name, a non-numeric or zero image number, or no path after ``@``.
    """
    name = str(image_name).strip()
    if not name:
        raise ValueError("empty image name")
    if "@" not in name:
        return 0, name
    match = _IMAGE_NAME_PATTERN.match(name)
    if match is None:
        raise ValueError(f"malformed image name {name!r} (expected NNNNNN@stack.mrcs)")
    number = int(match.group(1))
    if number < 1:
        raise ValueError(f"image numbers start at 1, got {name!r}")
    return number - 1, match.group(2)


def format_image_name(
    index0: int, stack_path: str | os.PathLike[str], digits: int = 6
) -> str:
    """Format a RELION image name ``NNNNNN@stack``.

    Parameters
    ----------
    index0
        0-based index of the image in the stack.
    stack_path
        Stack path as it should appear in the STAR file.
    digits
        Zero-padded width of the 1-based number: 6 (RELION 4.0, 5.0.0) or 8
        (RELION >= 5.0.1).

    Returns
    -------
    str
        For example ``format_image_name(0, "a.mrcs") == "000001@a.mrcs"``.

    Raises
    ------
    ValueError
        Negative index.
    """
    if index0 < 0:
        raise ValueError(f"image index must be >= 0, got {index0}")
    return f"{int(index0) + 1:0{int(digits)}d}@{os.fspath(stack_path)}"


def strip_pipeline_prefix(file_name: str) -> str:
    """Remove a RELION pipeline prefix ``JobType/jobNNN/`` from a file name.

    Parameters
    ----------
    file_name
        E.g. ``"MotionCorr/job002/Movies/mic001.mrc"``.

    Returns
    -------
    str
        The part after the first ``/jobNNN/`` directory (``"Movies/mic001.mrc"``), or
        the name unchanged when it has no such directory (RELION's
        ``decomposePipelineFileName``).
    """
    return _PIPELINE_PREFIX.sub("", file_name, count=1)


def resolve_stack_path(
    stack_name: str | os.PathLike[str],
    star_dir: str | os.PathLike[str],
    project_dir: str | os.PathLike[str] | None = None,
    *,
    star_file: str | os.PathLike[str] | None = None,
    image_name: str | None = None,
) -> Path:
    """Find the stack file that an image name refers to.

    Parameters
    ----------
    stack_name
        Stack path as written in ``rlnImageName`` (after the ``@``).
    star_dir
        Directory of the STAR file; relative paths are tried there first.
    project_dir
        RELION project directory, tried second (default: the current directory, as
        RELION jobs run from the project root).
    star_file
        The STAR file, named in the error message (default: ``star_dir``).
    image_name
        The full image name, quoted in the error message.

    Returns
    -------
    Path
        The existing stack file.

    Raises
    ------
    InputError
        No candidate exists; the message names the STAR file, the image name and every
        path tried.
    """
    stack = Path(stack_name)
    if stack.is_absolute():
        candidates = [stack]
    else:
        base = Path(project_dir) if project_dir is not None else Path.cwd()
        candidates = [Path(star_dir) / stack, base / stack]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    shown = image_name if image_name is not None else os.fspath(stack_name)
    raise InputError(
        star_file if star_file is not None else star_dir,
        f"stack of image '{shown}' not found (tried {tried})",
    )


# --------------------------------------------------------------------------------------
# the particle table
# --------------------------------------------------------------------------------------


def _numeric_column(
    table: pd.DataFrame, label: str, star_path: Path, what: str
) -> np.ndarray:
    """A column as float64; non-numeric/missing values raise InputError naming a row."""
    values = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raw = table[label].iloc[row]
        raise InputError(
            star_path, f"{label} in {what} {row + 1} is not a finite number ({raw!r})"
        )
    return values


@dataclass(eq=False)
class ParticleTable:
    """Particles of a RELION STAR file with their optics groups.

    Construction validates the table (image names, optics groups, pixel sizes, CTF
    values) and raises :class:`~cryoavg.errors.InputError` on the first problem. Treat
    the table as immutable: derived arrays are computed once; use :meth:`subset` or
    build a new table for changed data.

    Parameters
    ----------
    particles
        The ``data_particles`` loop, one row per particle in file order, all columns
        preserved.
    optics
        The ``data_optics`` loop (RELION >= 3.1) or ``None`` (RELION 3.0).
    path
        The STAR file (used for error messages and to resolve relative stack paths).
    project_dir
        RELION project directory for relative stack paths (default: current directory).
    pixel_size_override_angstrom
        If given, used as the pixel size of every particle instead of the STAR values.
    """

    particles: pd.DataFrame = field(repr=False)
    optics: pd.DataFrame | None = field(repr=False)
    path: Path
    project_dir: Path | None = None
    pixel_size_override_angstrom: float | None = None
    _optics_index: np.ndarray = field(init=False, repr=False)
    _pixel_size: np.ndarray = field(init=False, repr=False)
    _image_index0: np.ndarray = field(init=False, repr=False)
    _stack_names: np.ndarray = field(init=False, repr=False)
    _ctf: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.project_dir is not None:
            self.project_dir = Path(self.project_dir)
        self.particles = self.particles.reset_index(drop=True)
        if self.optics is not None:
            self.optics = self.optics.reset_index(drop=True)
        if self.particles.shape[0] == 0:
            raise InputError(self.path, "the particles table is empty")
        if labels.IMAGE_NAME not in self.particles.columns:
            raise InputError(
                self.path, f"the particles table has no {labels.IMAGE_NAME} column"
            )
        self._parse_image_names()
        self._optics_index = self._assign_optics_groups()
        self._pixel_size = self._resolve_pixel_sizes()
        self._ctf = self._read_ctf()
        self._check_dimensionality()

    # ---------------------------------------------------------------- validation

    def _parse_image_names(self) -> None:
        names = self.particles[labels.IMAGE_NAME]
        text = names.astype(str).str.strip()
        parts = text.str.extract(_IMAGE_NAME_PATTERN)
        has_at = text.str.contains("@", regex=False).to_numpy(dtype=bool)
        matched = parts[0].notna().to_numpy(dtype=bool)
        empty = (text == "").to_numpy(dtype=bool) | names.isna().to_numpy(dtype=bool)
        bad = empty | (has_at & ~matched)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(
                self.path,
                f"malformed {labels.IMAGE_NAME} in particle {row + 1}: "
                f"{names.iloc[row]!r} (expected NNNNNN@stack.mrcs)",
            )
        numbers = (
            pd.to_numeric(parts[0], errors="coerce").fillna(1).to_numpy(dtype=np.int64)
        )
        if (numbers < 1).any():
            row = int(np.flatnonzero(numbers < 1)[0])
            raise InputError(
                self.path,
                f"image numbers start at 1, particle {row + 1} has {names.iloc[row]!r}",
            )
        self._image_index0 = np.where(matched, numbers - 1, 0).astype(np.int64)
        self._stack_names = np.where(
            matched, parts[1].to_numpy(dtype=object), text.to_numpy()
        )

    def _assign_optics_groups(self) -> np.ndarray:
        n = self.n_particles
        if self.optics is None:
            return self._optics_groups_from_particle_columns()
        if self.optics.shape[0] == 0:
            raise InputError(self.path, "the optics table is empty")
        if labels.OPTICS_GROUP not in self.optics.columns:
            raise InputError(
                self.path, f"the optics table has no {labels.OPTICS_GROUP} column"
            )
        numbers = _numeric_column(
            self.optics, labels.OPTICS_GROUP, self.path, "optics row"
        )
        if np.unique(numbers).size != numbers.size:
            raise InputError(
                self.path, f"duplicate {labels.OPTICS_GROUP} in the optics table"
            )
        order = np.argsort(numbers, kind="stable")
        if not np.array_equal(order, np.arange(order.size)):
            # keep optics rows sorted by group number so that index g is row g
            self.optics = self.optics.iloc[order].reset_index(drop=True)
            numbers = numbers[order]
        if labels.OPTICS_GROUP not in self.particles.columns:
            if numbers.size == 1:
                return np.zeros(n, dtype=np.int64)
            raise InputError(
                self.path,
                f"the particles table has no {labels.OPTICS_GROUP} column "
                f"but there are "
                f"{numbers.size} optics groups",
            )
        particle_groups = _numeric_column(
            self.particles, labels.OPTICS_GROUP, self.path, "particle"
        )
        index = np.searchsorted(numbers, particle_groups)
        index = np.clip(index, 0, numbers.size - 1)
        unknown = numbers[index] != particle_groups
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            known = ", ".join(str(int(v)) for v in numbers)
            raise InputError(
                self.path,
                f"particle {row + 1} refers to optics group {particle_groups[row]:g}, "
                f"which is not in the optics table (groups: {known})",
            )
        return index.astype(np.int64)

    def _optics_groups_from_particle_columns(self) -> np.ndarray:
        """RELION 3.0: one optics group per distinct voltage/Cs/Q0/beam tilt/pixel."""
        present = [
            label for label in _OPTICS_DEFINING_LABELS if label in self.particles
        ]
        present += [
            label
            for label in (
                labels.IMAGE_PIXEL_SIZE,
                labels.DETECTOR_PIXEL_SIZE,
                labels.MAGNIFICATION,
            )
            if label in self.particles
        ]
        if not present:
            return np.zeros(self.n_particles, dtype=np.int64)
        codes = self.particles.groupby(present, sort=False, dropna=False).ngroup()
        return codes.to_numpy(dtype=np.int64)

    def _column_per_particle(self, label: str) -> np.ndarray | None:
        """Per-particle float64 values: particle column, else optics column, or None."""
        if label in self.particles.columns:
            return _numeric_column(self.particles, label, self.path, "particle")
        if self.optics is not None and label in self.optics.columns:
            values = _numeric_column(self.optics, label, self.path, "optics row")
            return values[self._optics_index]
        return None

    def _resolve_pixel_sizes(self) -> np.ndarray:
        n = self.n_particles
        if self.pixel_size_override_angstrom is not None:
            value = float(self.pixel_size_override_angstrom)
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(
                    f"pixel_size_angstrom must be a positive number of Å, got {value}"
                )
            return np.full(n, value)
        pixel: np.ndarray | None = None
        if self.optics is not None and labels.IMAGE_PIXEL_SIZE in self.optics.columns:
            values = _numeric_column(
                self.optics, labels.IMAGE_PIXEL_SIZE, self.path, "optics row"
            )
            pixel = values[self._optics_index]
        elif labels.IMAGE_PIXEL_SIZE in self.particles.columns:
            pixel = _numeric_column(
                self.particles, labels.IMAGE_PIXEL_SIZE, self.path, "particle"
            )
        else:
            detector_um = self._column_per_particle(labels.DETECTOR_PIXEL_SIZE)
            magnification = self._column_per_particle(labels.MAGNIFICATION)
            if detector_um is not None and magnification is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    pixel = detector_um * 1e4 / magnification
        if pixel is None:
            raise InputError(
                self.path,
                f"no pixel size: neither {labels.IMAGE_PIXEL_SIZE} nor "
                f"{labels.DETECTOR_PIXEL_SIZE}/{labels.MAGNIFICATION} is given; "
                "pass the pixel size in Å (pixel_size_angstrom)",
            )
        bad = ~(np.isfinite(pixel) & (pixel > 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(
                self.path, f"invalid pixel size {pixel[row]:g} Å for particle {row + 1}"
            )
        return pixel

    def _read_ctf(self) -> dict[str, np.ndarray]:
        n = self.n_particles
        result: dict[str, np.ndarray] = {}
        for key, label, default in _CTF_LABELS:
            values = self._column_per_particle(label)
            if values is None:
                if default is None:  # defocus V defaults to defocus U
                    values = result["defocus_u_angstrom"].astype(np.float64)
                else:
                    values = np.full(n, default)
            result[key] = values.astype(np.float32)
        result["pixel_size_angstrom"] = self._pixel_size.astype(np.float32)
        for values in result.values():
            values.flags.writeable = False
        return result

    def _check_dimensionality(self) -> None:
        if (
            self.optics is not None
            and labels.IMAGE_DIMENSIONALITY in self.optics.columns
        ):
            dims = _numeric_column(
                self.optics, labels.IMAGE_DIMENSIONALITY, self.path, "optics row"
            )
            if (dims != 2).any():
                raise InputError(
                    self.path,
                    f"{labels.IMAGE_DIMENSIONALITY} is {dims[dims != 2][0]:g}; "
                    "only 2D particle images are supported",
                )

    def __repr__(self) -> str:
        release = "3.0" if self.optics is None else "3.1+"
        return (
            f"ParticleTable(path={str(self.path)!r}, n_particles={self.n_particles}, "
            f"n_optics_groups={self.n_optics_groups}, relion={release})"
        )

    # ---------------------------------------------------------------- basic properties

    @property
    def n_particles(self) -> int:
        """Number of particles (rows of the particles table)."""
        return int(self.particles.shape[0])

    def __len__(self) -> int:
        return self.n_particles

    @property
    def is_relion30(self) -> bool:
        """True for RELION 3.0 input (no optics table)."""
        return self.optics is None

    @property
    def n_optics_groups(self) -> int:
        """Number of optics groups (RELION 3.0: distinct voltage/Cs/Q0/pixel sets)."""
        if self.optics is not None:
            return int(self.optics.shape[0])
        return int(self._optics_index.max()) + 1

    @property
    def optics_group_index(self) -> np.ndarray:
        """0-based optics group of every particle, ``int64 (n,)``."""
        return self._optics_index.copy()

    @property
    def optics_group_names(self) -> list[str]:
        """Name of each optics group (``rlnOpticsGroupName`` or ``opticsGroupN``)."""
        if self.optics is not None and labels.OPTICS_GROUP_NAME in self.optics.columns:
            return [str(name) for name in self.optics[labels.OPTICS_GROUP_NAME]]
        return [f"opticsGroup{g + 1}" for g in range(self.n_optics_groups)]

    @property
    def pixel_size_angstrom(self) -> np.ndarray:
        """Pixel size of every particle in Å, ``float64 (n,)``."""
        return self._pixel_size.copy()

    @property
    def pixel_size_per_optics_group_angstrom(self) -> np.ndarray:
        """Pixel size of each optics group in Å, ``float64 (g,)``."""
        result = np.zeros(self.n_optics_groups)
        result[self._optics_index] = self._pixel_size
        return result

    @property
    def has_mixed_pixel_sizes(self) -> bool:
        """True when particles do not all share one pixel size."""
        return bool(np.ptp(self._pixel_size) > 0)

    @property
    def image_names(self) -> np.ndarray:
        """``rlnImageName`` of every particle as strings, ``(n,)``."""
        return self.particles[labels.IMAGE_NAME].astype(str).to_numpy(dtype=object)

    @property
    def image_index0(self) -> np.ndarray:
        """0-based index of every particle's image in its stack, ``int64 (n,)``."""
        return self._image_index0.copy()

    @property
    def stack_names(self) -> np.ndarray:
        """Stack path of every particle as written in the STAR file, ``(n,)``."""
        return self._stack_names.copy()

    # ---------------------------------------------------------------- box size

    @property
    def image_size_per_optics_group_px(self) -> np.ndarray | None:
        """``rlnImageSize`` of each optics group (pixels), or None when not given."""
        if self.optics is None or labels.IMAGE_SIZE not in self.optics.columns:
            return None
        values = _numeric_column(
            self.optics, labels.IMAGE_SIZE, self.path, "optics row"
        )
        return values.astype(np.int64)

    @cached_property
    def box_size(self) -> int:
        """Box size in pixels shared by all particles.

        Taken from ``rlnImageSize`` of the optics groups when present, otherwise from
        the header of the first particle's stack.

        Raises
        ------
        InputError
            Optics groups declare different image sizes, or the stack is missing or
            invalid.
        """
        sizes = self.image_size_per_optics_group_px
        if sizes is not None:
            used = np.unique(sizes[np.unique(self._optics_index)])
            if used.size > 1:
                raise InputError(
                    self.path,
                    f"optics groups have different image sizes "
                    f"({', '.join(map(str, used))} px);"
                    " all particles must share one box size",
                )
            return int(used[0])
        stack_paths, stack_ids = self.stack_paths()
        return read_mrc_header(stack_paths[int(stack_ids[0])]).nx

    # ---------------------------------------------------------------- stacks

    def stack_paths(self) -> tuple[list[Path], np.ndarray]:
        """Resolve the distinct stack files of all particles.

        Returns
        -------
        paths : list of Path
            Each distinct stack once, in order of first use.
        stack_index : numpy.ndarray
            ``int64 (n,)``: index into ``paths`` of every particle's stack.

        Raises
        ------
        InputError
            A stack file does not exist (see :func:`resolve_stack_path`).
        """
        return self._resolved_stacks

    @cached_property
    def _resolved_stacks(self) -> tuple[list[Path], np.ndarray]:
        codes, uniques = pd.factorize(
            pd.Series(self._stack_names, dtype=object), sort=False
        )
        first_row = pd.Series(np.arange(codes.size)).groupby(codes).first().to_numpy()
        image_names = self.image_names
        paths = [
            resolve_stack_path(
                str(name),
                self.path.parent,
                self.project_dir,
                star_file=self.path,
                image_name=str(image_names[row]),
            )
            for name, row in zip(uniques, first_row, strict=True)
        ]
        return paths, np.asarray(codes, dtype=np.int64)

    # ---------------------------------------------------------------- groups

    @cached_property
    def _groups(self) -> tuple[np.ndarray, list[str]]:
        n = self.n_particles
        if labels.GROUP_NAME in self.particles.columns:
            names = self.particles[labels.GROUP_NAME].astype(str)
        elif labels.MICROGRAPH_NAME in self.particles.columns:
            names = (
                self.particles[labels.MICROGRAPH_NAME]
                .astype(str)
                .map(strip_pipeline_prefix)
            )
        else:
            return np.zeros(n, dtype=np.int64), ["group"]
        # RELION sorts the particles on rlnMicrographName (stable) before numbering
        # groups in order of first appearance.
        if labels.MICROGRAPH_NAME in self.particles.columns:
            micrographs = self.particles[labels.MICROGRAPH_NAME].astype(str).to_numpy()
            order = np.argsort(micrographs, kind="stable")
        else:
            order = np.arange(n)
        codes_sorted, uniques = pd.factorize(names.to_numpy()[order], sort=False)
        codes = np.empty(n, dtype=np.int64)
        codes[order] = codes_sorted
        return codes, [str(u) for u in uniques]

    @property
    def micrograph_group_index(self) -> np.ndarray:
        """0-based group of every particle (``rlnGroupNumber - 1``), ``int64 (n,)``.

        Groups come from ``rlnGroupName`` when present, else one group per micrograph
        name with its ``JobType/jobNNN/`` prefix removed; without either, one group.
        They are numbered in order of first appearance after a stable sort of the
        particles on ``rlnMicrographName``, as ``Experiment::read`` does.
        """
        return self._groups[0].copy()

    @property
    def group_names(self) -> list[str]:
        """Name of each micrograph group, indexed by :attr:`micrograph_group_index`."""
        return list(self._groups[1])

    @property
    def n_groups(self) -> int:
        """Number of micrograph groups."""
        return len(self._groups[1])

    # ---------------------------------------------------------------- CTF

    @property
    def has_ctf(self) -> bool:
        """True when defocus U/V/angle, voltage, Cs and amplitude contrast are given."""
        optics_columns = set(self.optics.columns) if self.optics is not None else set()
        available = set(self.particles.columns) | optics_columns
        return all(label in available for label in _REQUIRED_CTF_LABELS)

    def check_ctf(self) -> None:
        """Check that the CTF parameters can be used (call it when the CTF is applied).

        Raises
        ------
        InputError
            Naming the file, the label and the first particle with a non-finite value,
            a voltage that is not positive or an amplitude contrast outside [0, 1).
        """
        label_of = {key: label for key, label, _ in _CTF_LABELS}
        checks = [
            (key, ~np.isfinite(self._ctf[key]), "is not a finite number")
            for key, _, _ in _CTF_LABELS
        ]
        voltage = self._ctf["voltage_kv"]
        contrast = self._ctf["amplitude_contrast"]
        checks.append(("voltage_kv", ~(voltage > 0), "must be positive (kV)"))
        checks.append(
            (
                "amplitude_contrast",
                ~((contrast >= 0) & (contrast < 1)),
                "must be in [0, 1)",
            )
        )
        for key, bad, problem in checks:
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise InputError(
                    self.path,
                    f"{label_of[key]} {problem}, got {self._ctf[key][row]:g} "
                    f"for particle {row + 1}",
                )

    def ctf_parameters(self) -> dict[str, np.ndarray]:
        """CTF parameters of every particle.

        Returns
        -------
        dict
            ``float32 (n,)`` read-only arrays under the keys of :data:`CTF_KEYS`:
            ``defocus_u_angstrom``, ``defocus_v_angstrom``, ``defocus_angle_degrees``,
            ``voltage_kv``, ``cs_mm``, ``amplitude_contrast`` (fraction),
            ``phase_shift_degrees``, ``bfactor_angstrom2``, ``scale`` and
            ``pixel_size_angstrom``. Missing labels take RELION's defaults (voltage
            200 kV, scale 1, defocus V = defocus U, the others 0).
        """
        return dict(self._ctf)

    @property
    def ctf_premultiplied(self) -> np.ndarray:
        """``rlnCtfDataAreCtfPremultiplied`` of each optics group, ``bool (g,)``."""
        if (
            self.optics is None
            or labels.CTF_DATA_ARE_CTF_PREMULTIPLIED not in self.optics
        ):
            return np.zeros(self.n_optics_groups, dtype=bool)
        values = _numeric_column(
            self.optics, labels.CTF_DATA_ARE_CTF_PREMULTIPLIED, self.path, "optics row"
        )
        return values != 0

    # ---------------------------------------------------------------- tables

    def merged(self) -> pd.DataFrame:
        """Per-particle table with the optics columns joined in.

        Returns
        -------
        pandas.DataFrame
            A copy of the particles table (same row order) plus every optics column
            that the particles table does not have (particle columns win, as in
            RELION), plus ``rlnImagePixelSize`` with the resolved pixel size when
            missing.
        """
        result = self.particles.copy()
        if self.optics is not None:
            for label in self.optics.columns:
                if label not in result.columns:
                    result[label] = self.optics[label].to_numpy()[self._optics_index]
        if labels.IMAGE_PIXEL_SIZE not in result.columns:
            result[labels.IMAGE_PIXEL_SIZE] = self._pixel_size
        return result

    def optics_table(self) -> pd.DataFrame:
        """The optics table in RELION 3.1 form (from particle columns for 3.0 input).

        Returns
        -------
        pandas.DataFrame
            One row per optics group: ``rlnOpticsGroup`` (1-based),
            ``rlnOpticsGroupName``, ``rlnAmplitudeContrast``,
            ``rlnSphericalAberration``, ``rlnVoltage``, ``rlnImagePixelSize``,
            ``rlnImageSize`` (when known) and ``rlnImageDimensionality`` for 3.0 input;
            the original table (with an overriding pixel size applied) otherwise.
        """
        if self.optics is not None:
            optics = self.optics.copy()
            if self.pixel_size_override_angstrom is not None:
                optics[labels.IMAGE_PIXEL_SIZE] = (
                    self.pixel_size_per_optics_group_angstrom
                )
            return optics
        n_groups = self.n_optics_groups
        first = (
            pd.Series(np.arange(self.n_particles)).groupby(self._optics_index).first()
        )
        rows = first.to_numpy()
        optics = pd.DataFrame(
            {
                labels.OPTICS_GROUP: np.arange(1, n_groups + 1, dtype=np.int64),
                labels.OPTICS_GROUP_NAME: [
                    f"opticsGroup{g + 1}" for g in range(n_groups)
                ],
                labels.AMPLITUDE_CONTRAST: self._ctf["amplitude_contrast"][rows].astype(
                    float
                ),
                labels.SPHERICAL_ABERRATION: self._ctf["cs_mm"][rows].astype(float),
                labels.VOLTAGE: self._ctf["voltage_kv"][rows].astype(float),
                labels.IMAGE_PIXEL_SIZE: self._pixel_size[rows],
            }
        )
        for label in (labels.BEAM_TILT_X, labels.BEAM_TILT_Y):
            if label in self.particles.columns:
                optics[label] = self._column_per_particle(label)[rows]
        with contextlib.suppress(InputError):  # no stacks: the file is still valid
            optics[labels.IMAGE_SIZE] = np.int64(self.box_size)
        optics[labels.IMAGE_DIMENSIONALITY] = np.int64(2)
        return optics

    def particles_table_relion31(self) -> pd.DataFrame:
        """The particles table in RELION 3.1 form (with ``rlnOpticsGroup``).

        Returns
        -------
        pandas.DataFrame
            For 3.1 input a copy of :attr:`particles`. For 3.0 input the optics
            columns moved to :meth:`optics_table` (voltage, Cs, amplitude contrast,
            magnification, detector pixel size, beam tilt) are dropped, origins in
            pixels become ``rlnOriginX/YAngst`` and ``rlnOpticsGroup`` is added.
        """
        particles = self.particles.copy()
        if self.optics is not None:
            return particles
        moved = [
            *_OPTICS_DEFINING_LABELS,
            labels.DETECTOR_PIXEL_SIZE,
            labels.MAGNIFICATION,
            labels.IMAGE_PIXEL_SIZE,
        ]
        particles = particles.drop(columns=[c for c in moved if c in particles.columns])
        for old, new in (
            (labels.ORIGIN_X_PX, labels.ORIGIN_X_ANGST),
            (labels.ORIGIN_Y_PX, labels.ORIGIN_Y_ANGST),
        ):
            if old in particles.columns and new not in particles.columns:
                angstrom = (
                    _numeric_column(particles, old, self.path, "particle")
                    * self._pixel_size
                )
                position = particles.columns.get_loc(old)
                particles = particles.drop(columns=[old])
                particles.insert(position, new, angstrom)
        particles[labels.OPTICS_GROUP] = self._optics_index + 1
        return particles

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ParticleTable":
        """A new table with the given particles (in the given order).

        Parameters
        ----------
        indices
            0-based particle indices or a boolean mask of length ``n_particles``.

        Returns
        -------
        ParticleTable
            Same optics table, path and pixel-size override.
        """
        selection = np.asarray(indices)
        if selection.dtype == bool:
            selection = np.flatnonzero(selection)
        return ParticleTable(
            particles=self.particles.iloc[selection].reset_index(drop=True),
            optics=None if self.optics is None else self.optics.copy(),
            path=self.path,
            project_dir=self.project_dir,
            pixel_size_override_angstrom=self.pixel_size_override_angstrom,
        )


# --------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------


def _find_particles_block(
    blocks: dict[str, Any], star_path: Path
) -> tuple[pd.DataFrame, bool]:
    """Return the particles loop and whether it came from a named ``data_particles``."""
    if "particles" in blocks:
        block = blocks["particles"]
        if not isinstance(block, pd.DataFrame):
            raise InputError(star_path, "data_particles is not a loop (loop_) table")
        return block, True
    candidates = [
        name
        for name, block in blocks.items()
        if isinstance(block, pd.DataFrame) and labels.IMAGE_NAME in block.columns
    ]
    if len(candidates) == 1:
        return blocks[candidates[0]], False
    if len(candidates) > 1:
        names = ", ".join(f"data_{name}" for name in candidates)
        raise InputError(
            star_path,
            f"several tables have {labels.IMAGE_NAME} ({names}) "
            "and none is data_particles",
        )
    if "optics" in blocks:
        raise InputError(star_path, "no data_particles table (only data_optics)")
    raise InputError(
        star_path,
        "no particles table (neither data_particles nor a loop with "
        f"{labels.IMAGE_NAME})",
    )


def read_particles(
    path: str | os.PathLike[str],
    *,
    pixel_size_angstrom: float | None = None,
    project_dir: str | os.PathLike[str] | None = None,
) -> ParticleTable:
    """Read a RELION 3.0 or 3.1+ particles STAR file.

    Parameters
    ----------
    path
        The STAR file: ``data_optics`` + ``data_particles`` (RELION >= 3.1) or a single
        particles loop (RELION 3.0, any block name).
    pixel_size_angstrom
        Pixel size in Å for every particle. Overrides the STAR values; required when
        the file has neither ``rlnImagePixelSize`` nor
        ``rlnDetectorPixelSize``/``rlnMagnification``.
    project_dir
        RELION project directory used to resolve relative stack paths (after the STAR
        file's own directory). Default: the current directory.

    Returns
    -------
    ParticleTable
        All particles in file order, validated.

    Raises
    ------
    InputError
        Unreadable STAR file, no or empty particles table, no ``rlnImageName``,
        malformed image names, unknown optics groups, missing or invalid pixel sizes,
        non-numeric CTF values.
    ConfigError
        ``pixel_size_angstrom`` is not positive.
    """
    star_path = Path(path)
    blocks = read_star(star_path)
    particles, named = _find_particles_block(blocks, star_path)
    optics = blocks.get("optics") if named else None
    if optics is not None and not isinstance(optics, pd.DataFrame):
        raise InputError(star_path, "data_optics is not a loop (loop_) table")
    return ParticleTable(
        particles=particles,
        optics=optics,
        path=star_path,
        project_dir=None if project_dir is None else Path(project_dir),
        pixel_size_override_angstrom=pixel_size_angstrom,
    )


def _renumber_image_names(
    particles: pd.DataFrame, digits: int, star_path: Path
) -> pd.DataFrame:
    renamed = []
    for row, name in enumerate(particles[labels.IMAGE_NAME].astype(str)):
        try:
            index0, stack = parse_image_name(name)
        except ValueError as err:
            raise InputError(star_path, f"particle {row + 1}: {err}") from err
        renamed.append(
            format_image_name(index0, stack, digits) if "@" in name else name
        )
    result = particles.copy()
    result[labels.IMAGE_NAME] = renamed
    return result


def write_particles(
    path: str | os.PathLike[str],
    particles: ParticleTable | pd.DataFrame,
    optics: pd.DataFrame | None = None,
    *,
    image_name_digits: int | None = None,
    version: int = RELION_STAR_VERSION,
) -> None:
    """Write particles as a RELION 3.1+ STAR file (optics + particles blocks).

    Parameters
    ----------
    path
        Output STAR file (written atomically).
    particles
        A :class:`ParticleTable` (its optics table is used; RELION 3.0 input is
        converted, see :meth:`ParticleTable.optics_table`) or a particles DataFrame
        together with ``optics``.
    optics
        The optics table when ``particles`` is a DataFrame; ignored for a table.
    image_name_digits
        Re-write ``rlnImageName`` numbers with this many digits (6 for RELION 4.0/5.0.0,
        8 from 5.0.1); ``None`` keeps the names as they are.
    version
        Number in the ``# version`` lines (50001 = RELION 5.0).

    Raises
    ------
    ValueError
        A DataFrame was given without an optics table.
    OutputError
        The file could not be written.
    """
    star_path = Path(path)
    if isinstance(particles, ParticleTable):
        optics_frame = particles.optics_table()
        particle_frame = particles.particles_table_relion31()
    else:
        if optics is None:
            raise ValueError(
                "write_particles needs an optics table with a particles DataFrame"
            )
        optics_frame, particle_frame = optics, particles
    if image_name_digits is not None and labels.IMAGE_NAME in particle_frame.columns:
        particle_frame = _renumber_image_names(
            particle_frame, image_name_digits, star_path
        )
    write_star(
        star_path,
        {"optics": optics_frame, "particles": particle_frame},
        version=version,
    )
