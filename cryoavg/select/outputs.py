"""Files of a Select job directory (spec §C.4), every one written atomically.

For a Class2D input (``<o>`` = the job directory as named on the command line, e.g.
``Select/job014/``):

* ``particles.star`` — ``data_optics`` + the selected particle rows (all input columns,
  input order; with ``regroup`` a new ``rlnGroupName`` and no ``rlnGroupNumber``);
* ``class_averages.star`` — unnamed table: ``rlnReferenceImage``,
  ``rlnPredictedClassScore``, ``rlnClassDistribution``, ``rlnAccuracyRotations``,
  ``rlnAccuracyTranslationsAngst``, ``rlnEstimatedResolution`` of the selected classes
  (the images still point to the Class2D stack);
* ``backup_selection.star`` — unnamed table, one ``rlnSelected`` (1/0) per class;
* ``rank_model.star`` — ``data_model_classes`` with ``rlnClassScore`` (−999 = not
  scored) in place of the moment columns;
* ``rank_data.star`` — all particles unchanged;
* ``rank_optimiser.star`` — the input ``data_optimiser_general`` with
  ``rlnModelStarFile`` → ``<o>rank_model.star`` and ``rlnExperimentalDataStarFile`` →
  ``<o>rank_data.star`` (a minimal table for ``model=``/``data=`` input);
* ``features.npy`` (``float32 (n, F)``) and ``images.npy`` (``float32 (n, 64, 64)``)
  of the ``n`` scored classes.

A bare class stack gives ``class_scores.star`` (``rlnReferenceImage``,
``rlnClassScore``, ``rlnSelected`` for every image) instead of the particle files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryoavg.io import star as labels
from cryoavg.io.atomic import atomic_write
from cryoavg.io.star import write_star
from cryoavg.select.inputs import SelectInput

__all__ = [
    "PREDICTED_CLASS_SCORE",
    "RANK_MODEL_LABELS",
    "write_backup_selection",
    "write_class_averages",
    "write_class_scores",
    "write_npy",
    "write_particles_star",
    "write_rank_files",
]

#: ``class_averages.star`` score label (``rlnClassScore`` is used in ``rank_model.star``).
PREDICTED_CLASS_SCORE = "rlnPredictedClassScore"

#: Columns of ``rank_model.star`` (those present in the input model), in order.
RANK_MODEL_LABELS: tuple[str, ...] = (
    labels.REFERENCE_IMAGE,
    labels.CLASS_SCORE,
    labels.CLASS_DISTRIBUTION,
    labels.ACCURACY_ROTATIONS,
    labels.ACCURACY_TRANSLATIONS_ANGST,
    labels.ESTIMATED_RESOLUTION,
    labels.OVERALL_FOURIER_COMPLETENESS,
    labels.CLASS_PRIOR_OFFSET_X,
    labels.CLASS_PRIOR_OFFSET_Y,
)

_CLASS_AVERAGE_STATISTICS = (
    labels.CLASS_DISTRIBUTION,
    labels.ACCURACY_ROTATIONS,
    labels.ACCURACY_TRANSLATIONS_ANGST,
    labels.ESTIMATED_RESOLUTION,
)


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` as ``float32`` ``.npy``, atomically."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32))


def _particle_blocks(
    source: SelectInput, particles: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    blocks: dict[str, pd.DataFrame] = {}
    if source.optics is not None:
        blocks["optics"] = source.optics
    blocks[source.particles_block] = particles
    return blocks


def write_particles_star(
    path: str | os.PathLike[str],
    source: SelectInput,
    particle_mask: np.ndarray,
    regrouped: pd.DataFrame | None = None,
) -> None:
    """Write the selected particles (``data_optics`` + rows in input order).

    Parameters
    ----------
    path
        Output STAR file.
    source
        The job input (must have particles).
    particle_mask
        ``bool (n,)`` selected particles.
    regrouped
        The selected rows with new group names (from
        :func:`~cryoavg.select.regroup.regroup_particles`) to write instead.
    """
    if source.particles is None:
        raise ValueError("a bare class stack has no particles")
    rows = (
        regrouped
        if regrouped is not None
        else source.particles.loc[np.asarray(particle_mask, dtype=bool)]
    )
    write_star(
        path,
        _particle_blocks(source, rows.reset_index(drop=True)),
        version=source.star_version,
    )


def _statistics_table(source: SelectInput) -> pd.DataFrame:
    """``(k, …)`` per-class statistics of the input (model columns when present)."""
    k = source.n_classes
    table = pd.DataFrame({labels.REFERENCE_IMAGE: list(source.reference_names)})
    values = {
        labels.CLASS_DISTRIBUTION: source.class_distribution,
        labels.ACCURACY_ROTATIONS: source.accuracy_rotations_degrees,
        labels.ACCURACY_TRANSLATIONS_ANGST: source.accuracy_translations_angstrom,
        labels.ESTIMATED_RESOLUTION: source.estimated_resolution_angstrom,
    }
    for label, array in values.items():
        if array is not None:
            table[label] = np.asarray(array, dtype=np.float64).reshape(k)
    if source.model_classes is not None:
        for label in (
            labels.OVERALL_FOURIER_COMPLETENESS,
            labels.CLASS_PRIOR_OFFSET_X,
            labels.CLASS_PRIOR_OFFSET_Y,
        ):
            if label in source.model_classes.columns:
                table[label] = pd.to_numeric(
                    source.model_classes[label], errors="coerce"
                ).to_numpy(np.float64)
    return table


def write_class_averages(
    path: str | os.PathLike[str],
    source: SelectInput,
    scores: np.ndarray,
    selected: np.ndarray,
) -> None:
    """Write ``class_averages.star``: the selected classes with their scores.

    Parameters
    ----------
    path
        Output STAR file.
    source
        The job input.
    scores
        ``(k,)`` predicted scores (−999 = not scored).
    selected
        ``bool (k,)`` kept classes.
    """
    stats = _statistics_table(source)
    table = pd.DataFrame({labels.REFERENCE_IMAGE: stats[labels.REFERENCE_IMAGE]})
    table[PREDICTED_CLASS_SCORE] = np.asarray(scores, dtype=np.float64)
    for label in _CLASS_AVERAGE_STATISTICS:
        if label in stats.columns:
            table[label] = stats[label]
    keep = np.asarray(selected, dtype=bool)
    write_star(
        path, {"": table.loc[keep].reset_index(drop=True)}, version=source.star_version
    )


def write_backup_selection(
    path: str | os.PathLike[str], selected: np.ndarray, *, version: int
) -> None:
    """Write ``backup_selection.star``: ``rlnSelected`` 1/0 for every class, class order."""
    table = pd.DataFrame(
        {labels.SELECTED: np.asarray(selected, dtype=bool).astype(np.int64)}
    )
    write_star(path, {"": table}, version=version)


def write_class_scores(
    path: str | os.PathLike[str],
    source: SelectInput,
    scores: np.ndarray,
    selected: np.ndarray,
) -> None:
    """Write ``class_scores.star`` of a bare stack: name, score and selection per image."""
    table = pd.DataFrame(
        {
            labels.REFERENCE_IMAGE: list(source.reference_names),
            labels.CLASS_SCORE: np.asarray(scores, dtype=np.float64),
            labels.SELECTED: np.asarray(selected, dtype=bool).astype(np.int64),
        }
    )
    write_star(path, {"": table}, version=source.star_version)


def write_rank_files(
    job_dir: str | os.PathLike[str],
    output_prefix: str,
    source: SelectInput,
    scores: np.ndarray,
) -> dict[str, Path]:
    """Write ``rank_model.star``, ``rank_data.star`` and ``rank_optimiser.star``.

    Parameters
    ----------
    job_dir
        Directory the files are written to.
    output_prefix
        How the job directory is named inside STAR files (``"Select/job014/"``).
    source
        The job input (must have particles).
    scores
        ``(k,)`` predicted scores (−999 = not scored).

    Returns
    -------
    dict
        ``{"model": …, "data": …, "optimiser": …}`` paths written.
    """
    if source.particles is None:
        raise ValueError("a bare class stack has no rank files")
    directory = Path(job_dir)
    stats = _statistics_table(source)
    stats[labels.CLASS_SCORE] = np.asarray(scores, dtype=np.float64)
    model = stats[[label for label in RANK_MODEL_LABELS if label in stats.columns]]
    paths = {
        "model": directory / "rank_model.star",
        "data": directory / "rank_data.star",
        "optimiser": directory / "rank_optimiser.star",
    }
    version = source.star_version
    write_star(paths["model"], {"model_classes": model}, version=version)
    write_star(
        paths["data"], _particle_blocks(source, source.particles), version=version
    )
    if source.optimiser_values is not None:
        optimiser = dict(source.optimiser_values)
    else:
        optimiser = {"rlnOutputRootName": f"{output_prefix}rank"}
        if source.particle_diameter_angstrom is not None:
            optimiser["rlnParticleDiameter"] = float(source.particle_diameter_angstrom)
    optimiser["rlnModelStarFile"] = f"{output_prefix}rank_model.star"
    optimiser["rlnExperimentalDataStarFile"] = f"{output_prefix}rank_data.star"
    write_star(paths["optimiser"], {"optimiser_general": optimiser}, version=version)
    return paths
