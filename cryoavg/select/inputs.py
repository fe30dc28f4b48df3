"""Inputs of a Select job: class averages, their statistics and the particles (spec §C, §B).

Three kinds of input give one :class:`SelectInput`:

* ``optimiser=`` a Class2D ``run_itNNN_optimiser.star`` (written by cryoavg or by RELION
  4.0/5.0): its ``data_optimiser_general`` names the ``_model.star``
  (``rlnModelStarFile``) and the ``_data.star`` (``rlnExperimentalDataStarFile``) and
  gives the particle diameter (``rlnParticleDiameter``, Å);
* ``model=`` + ``data=`` — the model and data STAR files directly;
* ``class_stack=`` — a bare MRC stack of class averages (no particles, no statistics).

Conventions
-----------
* Names inside RELION STAR files are relative to the project directory (RELION runs
  from there). A relative name is looked up in ``project_dir`` (default: the current
  directory), then in the directory of the file that names it and each of that
  directory's parents, and last as a bare file name next to that file (a moved job).
* Classes are indexed 0…k−1 in ``data_model_classes`` row order; ``class_numbers`` holds
  the 1-based class number of each row (the image number of ``rlnReferenceImage``, as
  RELION parses it, when those form 1…k; else the row number), which is what the
  particles' ``rlnClassNumber`` refers to.
* Class images come from ``rlnReferenceImage`` (``NNNNNN@file.mrcs``); the pixel size
  from ``data_model_general`` ``rlnPixelSize`` (or ``angpix``).
* Every problem is one :class:`~cryoavg.errors.InputError` naming the offending file,
  or a :class:`~cryoavg.errors.ConfigError` for inconsistent keys.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoavg.errors import ConfigError, InputError
from cryoavg.io import star as labels
from cryoavg.io.mrc import read_image_stack
from cryoavg.io.particles import format_image_name, parse_image_name
from cryoavg.io.references import locate_relion_file, read_reference_images
from cryoavg.io.star import RELION_STAR_VERSION, read_star

__all__ = [
    "SelectInput",
    "load_select_input",
    "read_class_stack",
    "read_model_and_data",
    "read_optimiser",
]

_VERSION_LINE = re.compile(r"^#\s*version\s+(\d+)")


@dataclass
class SelectInput:
    """Class averages to rank and select, with what is known about them.

    Attributes
    ----------
    class_images
        ``float32 (k, N, N)`` class averages in class (row) order.
    pixel_size_angstrom
        Pixel size of the class images (Å).
    particle_diameter_angstrom
        Particle (mask) diameter in Å; ``None`` when unknown.
    reference_names
        ``rlnReferenceImage`` of each class (``NNNNNN@stack``), ``(k,)``.
    class_numbers
        ``int64 (k,)`` 1-based class number of each row.
    class_distribution
        ``(k,)`` ``rlnClassDistribution`` (π_k), or ``None`` for a bare stack.
    accuracy_rotations_degrees, accuracy_translations_angstrom
        ``(k,)`` per-class accuracies (999 = unknown), or ``None``.
    estimated_resolution_angstrom
        ``(k,)`` ``rlnEstimatedResolution`` (``inf`` allowed), or ``None``.
    model_classes
        The model's ``data_model_classes`` table as read, or ``None``.
    model_groups
        The model's ``data_model_groups`` table, or ``None`` when it has none.
    optics
        The data file's ``data_optics`` table, or ``None`` (RELION 3.0 or bare).
    particles
        The data file's particle table (all columns, file order), or ``None``.
    particles_block
        Name of the particle block in the data file (``"particles"`` for 3.1+).
    particle_class_numbers
        ``int64 (n,)`` ``rlnClassNumber`` of each particle, or ``None``.
    optimiser_values
        ``data_optimiser_general`` as read, or ``None``.
    optimiser_path, model_path, data_path, class_stack_path
        The files read (``None`` when not used).
    star_version
        Number of the ``# version`` lines of the input (written back the same way).
    """

    class_images: np.ndarray
    pixel_size_angstrom: float
    particle_diameter_angstrom: float | None
    reference_names: list[str]
    class_numbers: np.ndarray
    class_distribution: np.ndarray | None = None
    accuracy_rotations_degrees: np.ndarray | None = None
    accuracy_translations_angstrom: np.ndarray | None = None
    estimated_resolution_angstrom: np.ndarray | None = None
    model_classes: pd.DataFrame | None = field(default=None, repr=False)
    model_groups: pd.DataFrame | None = field(default=None, repr=False)
    optics: pd.DataFrame | None = field(default=None, repr=False)
    particles: pd.DataFrame | None = field(default=None, repr=False)
    particles_block: str = "particles"
    particle_class_numbers: np.ndarray | None = field(default=None, repr=False)
    optimiser_values: dict[str, Any] | None = field(default=None, repr=False)
    optimiser_path: Path | None = None
    model_path: Path | None = None
    data_path: Path | None = None
    class_stack_path: Path | None = None
    star_version: int = RELION_STAR_VERSION

    @property
    def n_classes(self) -> int:
        """``k``, the number of classes."""
        return int(self.class_images.shape[0])

    @property
    def box_size(self) -> int:
        """``N``, the class image size in pixels."""
        return int(self.class_images.shape[-1])

    @property
    def is_bare(self) -> bool:
        """True for a bare stack of images (no model, no particles)."""
        return self.particles is None

    @property
    def n_particles(self) -> int | None:
        """Number of particles in the data file, or ``None`` for a bare stack."""
        return None if self.particles is None else int(self.particles.shape[0])

    def estimated_particle_counts(self) -> np.ndarray | None:
        """``(k,)`` π_k · N, the particle counts RELION's ranker uses; ``None`` if bare."""
        if self.class_distribution is None or self.n_particles is None:
            return None
        return self.class_distribution * float(self.n_particles)

    def particle_counts(self) -> np.ndarray | None:
        """``int64 (k,)`` actual number of particles with each class number, or ``None``."""
        if self.particle_class_numbers is None:
            return None
        return np.array(
            [(self.particle_class_numbers == c).sum() for c in self.class_numbers],
            dtype=np.int64,
        )


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _star_version(path: Path) -> int:
    """The number of the first ``# version`` line of a STAR file (default 50001)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for _, line in zip(range(50), handle, strict=False):
                match = _VERSION_LINE.match(line.strip())
                if match:
                    return int(match.group(1))
    except OSError:
        pass
    return RELION_STAR_VERSION


def _list_block(blocks: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    block = blocks.get(name)
    if block is None:
        raise InputError(path, f"no data_{name} block")
    if isinstance(block, pd.DataFrame):
        if block.shape[0] != 1:
            raise InputError(path, f"data_{name} must be a list (single-row) block")
        block = {str(k): v for k, v in block.iloc[0].items()}
    return dict(block)


def _loop_block(blocks: dict[str, Any], name: str, path: Path) -> pd.DataFrame:
    block = blocks.get(name)
    if block is None:
        raise InputError(path, f"no data_{name} block")
    if isinstance(block, dict):
        block = pd.DataFrame({k: [v] for k, v in block.items()})
    return block.reset_index(drop=True)


def _require(table: pd.DataFrame, block: str, path: Path, *required: str) -> None:
    missing = [label for label in required if label not in table.columns]
    if missing:
        raise InputError(path, f"data_{block} lacks {', '.join(missing)}")


def _number(values: dict[str, Any], label: str, path: Path, block: str) -> float:
    if label not in values:
        raise InputError(path, f"data_{block} lacks {label}")
    try:
        number = float(values[label])
    except (TypeError, ValueError) as err:
        raise InputError(path, f"{label} is not a number ({values[label]!r})") from err
    if math.isnan(number):
        raise InputError(path, f"{label} is not a number ({values[label]!r})")
    return number


def _column(
    table: pd.DataFrame, label: str, path: Path, block: str, *, finite: bool = False
) -> np.ndarray:
    """A loop column as float64 (``inf`` text allowed unless ``finite``)."""
    values = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) | (~np.isfinite(values) if finite else False)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            path,
            f"{label} in data_{block} row {row + 1} is not a "
            f"{'finite ' if finite else ''}number ({table[label].iloc[row]!r})",
        )
    return values


def _no_missing_text(table: pd.DataFrame, path: Path, block: str) -> None:
    """Refuse empty or ``nan`` values in a text column (copied to the output files).

    A loop column that is not all numbers is read as text, with ``nan`` as a missing
    value; such a table cannot be written back as a STAR file.
    """
    for label in table.columns:
        column = table[label]
        if pd.api.types.is_float_dtype(column.dtype) or not column.isna().any():
            continue
        row = int(np.flatnonzero(column.isna().to_numpy())[0])
        raise InputError(
            path,
            f"{label} in data_{block} row {row + 1} is missing (nan) in a text column",
        )


# --------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------


def read_optimiser(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``data_optimiser_general`` of a Class2D ``_optimiser.star`` (cryoavg or RELION).

    Parameters
    ----------
    path
        The optimiser STAR file.

    Returns
    -------
    dict
        Label -> value; ``rlnModelStarFile`` and ``rlnExperimentalDataStarFile`` are
        guaranteed to be present.

    Raises
    ------
    InputError
        Missing or malformed file, no ``data_optimiser_general``, or a missing label.
    """
    optimiser_path = Path(path)
    values = _list_block(read_star(optimiser_path), "optimiser_general", optimiser_path)
    for label in ("rlnModelStarFile", "rlnExperimentalDataStarFile"):
        if label not in values:
            raise InputError(optimiser_path, f"data_optimiser_general lacks {label}")
    return values


def read_class_stack(
    path: str | os.PathLike[str], pixel_size_angstrom: float | None = None
) -> tuple[np.ndarray, float]:
    """Read a bare stack of class averages.

    Parameters
    ----------
    path
        MRC stack ``(k, N, N)`` (a single image counts as one class).
    pixel_size_angstrom
        Pixel size (Å); ``None`` = the MRC header's.

    Returns
    -------
    images : numpy.ndarray
        ``float32 (k, N, N)``.
    pixel_size_angstrom : float

    Raises
    ------
    InputError
        Unreadable stack, non-square or non-finite images.
    ConfigError
        No pixel size in the header and none given.
    """
    stack_path = Path(path)
    images, header_pixel = read_image_stack(stack_path)
    if images.shape[-1] != images.shape[-2]:
        raise InputError(
            stack_path,
            f"class images must be square, got {images.shape[-1]}x{images.shape[-2]}",
        )
    if not np.isfinite(images).all():
        bad = int(
            np.flatnonzero(~np.isfinite(images).reshape(len(images), -1).all(1))[0]
        )
        raise InputError(stack_path, f"image {bad + 1} has non-finite pixels")
    pixel = pixel_size_angstrom if pixel_size_angstrom is not None else header_pixel
    if pixel is None:
        raise ConfigError(
            f"{stack_path} has no pixel size in its header: give angpix=... (Å/px)"
        )
    return images, float(pixel)


def _class_numbers(names: list[str]) -> np.ndarray:
    """1-based class number of each row: the image numbers when they are 1…k."""
    k = len(names)
    try:
        numbers = [parse_image_name(name)[0] + 1 for name in names]
    except ValueError:
        numbers = []
    if sorted(numbers) == list(range(1, k + 1)):
        return np.asarray(numbers, dtype=np.int64)
    return np.arange(1, k + 1, dtype=np.int64)


def _particle_block(blocks: dict[str, Any], path: Path) -> tuple[str, pd.DataFrame]:
    if "particles" in blocks:
        block = blocks["particles"]
        if not isinstance(block, pd.DataFrame):
            raise InputError(path, "data_particles is not a loop (loop_) table")
        return "particles", block
    loops = [
        name
        for name, block in blocks.items()
        if isinstance(block, pd.DataFrame) and labels.IMAGE_NAME in block.columns
    ]
    if len(loops) != 1:
        raise InputError(path, "no data_particles table")
    if loops[0] == "optics":
        # e.g. a second "data_optics" line before data_particles: the parser gives the
        # particle loop to it and data_particles disappears
        raise InputError(
            path, "data_optics holds the particles (rlnImageName); no data_particles"
        )
    return loops[0], blocks[loops[0]]


def read_model_and_data(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    project_dir: str | os.PathLike[str] | None = None,
    class_stack: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
    particle_diameter_angstrom: float | None = None,
) -> SelectInput:
    """Read a 2D ``_model.star`` with its class images and the matching ``_data.star``.

    Parameters
    ----------
    model
        The model STAR file: ``data_model_classes`` with ``rlnReferenceImage`` and
        ``rlnClassDistribution``; ``data_model_general`` (``rlnPixelSize``,
        ``rlnOriginalImageSize``, ``rlnNrClasses``) and ``data_model_groups`` are
        optional (without ``rlnPixelSize`` the class stack header gives the pixel size,
        as for RELION's ``rank_model.star``).
    data
        The data STAR file (``data_optics`` + ``data_particles`` with
        ``rlnClassNumber``; RELION 3.0 single-table files are accepted).
    project_dir
        Directory that relative names are relative to (default: the current one).
    class_stack
        Use the images of this stack instead of ``rlnReferenceImage`` (must have one
        image per class and the model's box size).
    pixel_size_angstrom
        Overrides ``rlnPixelSize``.
    particle_diameter_angstrom
        Particle diameter (Å); ``None`` = unknown.

    Returns
    -------
    SelectInput

    Raises
    ------
    InputError
        Missing or malformed files, missing labels, class images that do not match
        the model (count, box), particles in classes the model does not have.
    """
    model_path, data_path = Path(model), Path(data)
    base = None if project_dir is None else Path(project_dir)
    blocks = read_star(model_path)
    # RELION's rank_model.star has data_model_classes only: the pixel size then comes
    # from the class stack's header
    general = (
        _list_block(blocks, "model_general", model_path)
        if "model_general" in blocks
        else {}
    )
    box = None
    if labels.ORIGINAL_IMAGE_SIZE in general:
        box = int(
            _number(general, labels.ORIGINAL_IMAGE_SIZE, model_path, "model_general")
        )
    classes = _loop_block(blocks, "model_classes", model_path)
    _require(classes, "model_classes", model_path, labels.CLASS_DISTRIBUTION)
    k = int(classes.shape[0])
    if labels.NR_CLASSES in general:
        declared = int(_number(general, labels.NR_CLASSES, model_path, "model_general"))
        if declared != k:
            raise InputError(
                model_path,
                f"data_model_classes has {k} rows but rlnNrClasses is {declared}",
            )

    stack_path: Path | None = None
    if class_stack is not None:
        stack_path = Path(class_stack)
        images, header_pixel = read_image_stack(stack_path)
        expected = box if box is not None else images.shape[-1]
        if images.shape[0] != k or images.shape[-2:] != (expected, expected):
            raise InputError(
                stack_path,
                f"has {images.shape[0]} images of {images.shape[-1]}x"
                f"{images.shape[-2]} px but the model has {k} classes of "
                f"{expected} px",
            )
        if not np.isfinite(images).all():
            raise InputError(stack_path, "non-finite pixels in the class images")
        names = [format_image_name(i, stack_path) for i in range(k)]
        class_numbers = np.arange(1, k + 1, dtype=np.int64)
    else:
        _require(classes, "model_classes", model_path, labels.REFERENCE_IMAGE)
        names = [str(v).strip() for v in classes[labels.REFERENCE_IMAGE]]
        images, header_pixel = read_reference_images(names, model_path, base, box)
        if not np.isfinite(images).all():
            bad = int(np.flatnonzero(~np.isfinite(images).reshape(k, -1).all(1))[0])
            raise InputError(model_path, f"class {bad + 1} image has non-finite pixels")
        class_numbers = _class_numbers(names)
    if pixel_size_angstrom is not None:
        pixel = float(pixel_size_angstrom)
    elif labels.PIXEL_SIZE in general:
        pixel = _number(general, labels.PIXEL_SIZE, model_path, "model_general")
    elif header_pixel is not None:
        pixel = float(header_pixel)
    else:
        raise InputError(
            model_path,
            f"no {labels.PIXEL_SIZE} and no pixel size in the class stack header: "
            "give angpix=...",
        )
    if not (math.isfinite(pixel) and pixel > 0):
        raise InputError(model_path, f"invalid {labels.PIXEL_SIZE} ({pixel:g})")

    def optional(label: str, fallback: str | None = None, scale: float = 1.0):
        for name, factor in ((label, 1.0), (fallback, scale)):
            if name is not None and name in classes.columns:
                return _column(classes, name, model_path, "model_classes") * factor
        return None

    distribution = _column(
        classes, labels.CLASS_DISTRIBUTION, model_path, "model_classes", finite=True
    )
    groups = blocks.get("model_groups")
    if isinstance(groups, dict):
        groups = pd.DataFrame({key: [value] for key, value in groups.items()})

    data_blocks = read_star(data_path)
    block_name, particles = _particle_block(data_blocks, data_path)
    particles = particles.reset_index(drop=True)
    if particles.shape[0] == 0:
        raise InputError(data_path, "the particles table is empty")
    _require(particles, block_name, data_path, labels.CLASS_NUMBER)
    class_of_particle = _column(
        particles, labels.CLASS_NUMBER, data_path, block_name, finite=True
    )
    if (class_of_particle != np.round(class_of_particle)).any():
        raise InputError(data_path, f"{labels.CLASS_NUMBER} has non-integer values")
    if (np.abs(class_of_particle) >= 2**62).any():
        raise InputError(data_path, f"{labels.CLASS_NUMBER} has absurdly large values")
    class_of_particle = class_of_particle.astype(np.int64)
    unknown = sorted(
        set(class_of_particle[class_of_particle > 0].tolist())
        - set(class_numbers.tolist())
    )
    if unknown:
        raise InputError(
            data_path,
            f"particles are in class {unknown[0]} but {model_path} has {k} classes",
        )
    optics = data_blocks.get("optics") if block_name == "particles" else None
    if optics is not None and not isinstance(optics, pd.DataFrame):
        raise InputError(data_path, "data_optics is not a loop (loop_) table")
    _no_missing_text(particles, data_path, block_name)
    if optics is not None:
        _no_missing_text(optics, data_path, "optics")
    return SelectInput(
        class_images=images,
        pixel_size_angstrom=pixel,
        particle_diameter_angstrom=particle_diameter_angstrom,
        reference_names=names,
        class_numbers=class_numbers,
        class_distribution=distribution,
        accuracy_rotations_degrees=optional(labels.ACCURACY_ROTATIONS),
        accuracy_translations_angstrom=optional(
            labels.ACCURACY_TRANSLATIONS_ANGST, "rlnAccuracyTranslations", pixel
        ),
        estimated_resolution_angstrom=optional(labels.ESTIMATED_RESOLUTION),
        model_classes=classes,
        model_groups=groups,
        optics=optics,
        particles=particles,
        particles_block=block_name,
        particle_class_numbers=class_of_particle,
        model_path=model_path,
        data_path=data_path,
        class_stack_path=stack_path,
        star_version=_star_version(data_path),
    )


def load_select_input(
    *,
    optimiser: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    class_stack: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
    particle_diameter_angstrom: float | None = None,
    project_dir: str | os.PathLike[str] | None = None,
) -> SelectInput:
    """Read the input of a Select job from whichever keys were given.

    Parameters
    ----------
    optimiser
        A Class2D ``_optimiser.star`` (names the model and data files).
    model, data
        The model and data STAR files (instead of ``optimiser``).
    class_stack
        Alone: a bare stack of class averages. With a model: replaces the images
        named by ``rlnReferenceImage``.
    pixel_size_angstrom
        Overrides the model's (or the stack header's) pixel size.
    particle_diameter_angstrom
        Overrides the optimiser's ``rlnParticleDiameter``.
    project_dir
        Directory that relative names in the STAR files are relative to.

    Returns
    -------
    SelectInput

    Raises
    ------
    ConfigError
        No input, or keys that do not go together.
    InputError
        A file is missing, malformed or inconsistent.
    """
    if pixel_size_angstrom is not None and not pixel_size_angstrom > 0:
        raise ConfigError(f"angpix must be > 0, got {pixel_size_angstrom}")
    if particle_diameter_angstrom is not None and not particle_diameter_angstrom > 0:
        raise ConfigError(
            f"particle_diameter must be > 0, got {particle_diameter_angstrom}"
        )
    if optimiser is not None:
        if model is not None or data is not None:
            raise ConfigError(
                "give either optimiser=... or model=... data=..., not both"
            )
        optimiser_path = Path(optimiser)
        values = read_optimiser(optimiser_path)
        model_path, _ = locate_relion_file(
            values["rlnModelStarFile"], optimiser_path, project_dir, "model"
        )
        data_path, _ = locate_relion_file(
            values["rlnExperimentalDataStarFile"], optimiser_path, project_dir, "data"
        )
        diameter = particle_diameter_angstrom
        if diameter is None and "rlnParticleDiameter" in values:
            written = _number(
                values, "rlnParticleDiameter", optimiser_path, "optimiser_general"
            )
            diameter = written if math.isfinite(written) and written > 0 else None
        result = read_model_and_data(
            model_path,
            data_path,
            project_dir=project_dir,
            class_stack=class_stack,
            pixel_size_angstrom=pixel_size_angstrom,
            particle_diameter_angstrom=diameter,
        )
        result.optimiser_values = values
        result.optimiser_path = optimiser_path
        return result
    if model is not None or data is not None:
        if model is None or data is None:
            raise ConfigError("model=... and data=... must be given together")
        return read_model_and_data(
            model,
            data,
            project_dir=project_dir,
            class_stack=class_stack,
            pixel_size_angstrom=pixel_size_angstrom,
            particle_diameter_angstrom=particle_diameter_angstrom,
        )
    if class_stack is None:
        raise ConfigError(
            "no input: give optimiser=<run_itNNN_optimiser.star>, model=... data=..., "
            "or class_stack=<averages.mrcs> angpix=..."
        )
    stack_path = Path(class_stack)
    images, pixel = read_class_stack(stack_path, pixel_size_angstrom)
    k = int(images.shape[0])
    return SelectInput(
        class_images=images,
        pixel_size_angstrom=pixel,
        particle_diameter_angstrom=particle_diameter_angstrom,
        reference_names=[format_image_name(i, stack_path) for i in range(k)],
        class_numbers=np.arange(1, k + 1, dtype=np.int64),
        class_stack_path=stack_path,
    )
