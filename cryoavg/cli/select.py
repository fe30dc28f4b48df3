r"""``cryoavg select``: rank 2D classes and keep the good ones (RELION Select job, §C).

Examples::

    cryoavg select optimiser=Class2D/job013/run_it100_optimiser.star output=Select/job014 \\
        min_score=0.25
    cryoavg select optimiser=Class2D/job013/run_it100_optimiser.star classes=[1,4,7] regroup=5
    cryoavg select model=run_it025_model.star data=run_it025_data.star min_particles=5000
    cryoavg select class_stack=averages.mrcs angpix=3.5 output=Select/job015

Every class average is scored by the shipped class ranker
(:func:`cryoavg.select.ranker.score_classes`; as RELION, only classes with more than 10
particles), classes are kept by score (and optional size / resolution criteria, guards
or a manual list), and the particles of the kept classes are written in input order
(optionally regrouped). Bad input gives one line on stderr, exit status 2, and no job
directory.
"""

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig

from cryoavg.cli._configs import config_dir
from cryoavg.cli._jobs import check_config_types, job_directory, run_job
from cryoavg.errors import ConfigError, InputError
from cryoavg.select.gallery import write_selection_gallery_png, write_selection_html
from cryoavg.select.inputs import SelectInput, load_select_input
from cryoavg.select.outputs import (
    write_backup_selection,
    write_class_averages,
    write_class_scores,
    write_npy,
    write_particles_star,
    write_rank_files,
)
from cryoavg.select.regroup import regroup_particles
from cryoavg.select.selection import (
    UNSCORED,
    SelectionCriteria,
    scored_classes,
    select_classes,
    selected_particles,
)

log = logging.getLogger("cryoavg")


#: the type of every scalar key (checked first: one clear line for regroup=abc);
#: ``classes`` (a list) is checked by :func:`criteria_from_config`
CONFIG_TYPES: dict[str, type] = {
    **dict.fromkeys(("min_classes", "regroup"), int),
    **dict.fromkeys(
        (
            "min_score",
            "max_score",
            "min_particles",
            "min_class_particles",
            "max_resolution",
            "angpix",
            "particle_diameter",
        ),
        float,
    ),
    "gallery": bool,
    **dict.fromkeys(
        ("optimiser", "model", "data", "class_stack", "project_dir", "output"), str
    ),
}
OPTIONAL_KEYS = (
    "min_score",
    "angpix",
    "particle_diameter",
    "optimiser",
    "model",
    "data",
    "class_stack",
    "project_dir",
    "output",
)


def _optional_float(cfg: DictConfig, key: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} must be a number, got {value!r}") from err


def _optional_path(cfg: DictConfig, key: str) -> str | None:
    value = cfg.get(key)
    return None if value in (None, "") else str(value)


def _class_number(value: Any) -> int:
    """A whole class number from ``classes=[...]`` (``"3"`` and ``3.0`` too)."""
    if isinstance(value, bool):
        raise TypeError("true/false is not a class number")
    number = float(value)
    if not (math.isfinite(number) and number == int(number) and abs(number) < 2**62):
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def criteria_from_config(cfg: DictConfig) -> SelectionCriteria:
    """Build :class:`~cryoavg.select.selection.SelectionCriteria` from the job config."""
    check_config_types(cfg, CONFIG_TYPES, optional=OPTIONAL_KEYS)
    classes = cfg.get("classes")
    manual: tuple[int, ...] | None = None
    if classes is not None:
        values = list(classes) if isinstance(classes, ListConfig | list) else [classes]
        try:
            manual = tuple(_class_number(v) for v in values)
        except (TypeError, ValueError, OverflowError) as err:
            raise ConfigError(
                f"classes must be a list of class numbers, e.g. [1,4,7]; got {classes}"
            ) from err
        if any(v < 1 for v in manual):
            raise ConfigError("class numbers in classes=[...] start at 1")
    return SelectionCriteria(
        min_score=_optional_float(cfg, "min_score"),
        max_score=float(cfg.max_score),
        min_particles=float(cfg.min_particles),
        min_classes=int(cfg.min_classes),
        classes=manual,
        min_class_particles=float(cfg.min_class_particles),
        max_resolution_angstrom=float(cfg.max_resolution),
    )


def score_input(source: SelectInput) -> tuple[np.ndarray, Any, np.ndarray]:
    """Score the classes of ``source`` with the class ranker.

    Returns
    -------
    scores : numpy.ndarray
        ``float64 (k,)``; :data:`~cryoavg.select.selection.UNSCORED` for classes with
        10 particles or fewer (not scored, as RELION).
    result : ClassScores
        The ranker's output for the scored classes (features, 64×64 images).
    scored : numpy.ndarray
        ``bool (k,)`` which classes were scored.
    """
    from cryoavg.select.ranker import score_classes

    counts = source.estimated_particle_counts()
    scored = scored_classes(counts, source.n_classes)
    where = source.model_path or source.class_stack_path
    if not scored.any():
        raise InputError(
            where,
            f"no class has more than 10 particles ({source.n_particles} particles in "
            f"{source.n_classes} classes); nothing to score",
        )

    def subset(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else np.asarray(values, np.float64)[scored]

    try:
        result = score_classes(
            torch.from_numpy(np.ascontiguousarray(source.class_images[scored])),
            pixel_size_angstrom=source.pixel_size_angstrom,
            particle_diameter_angstrom=source.particle_diameter_angstrom,
            class_distribution=subset(source.class_distribution),
            n_particles=subset(counts),
            accuracy_rotation_deg=subset(source.accuracy_rotations_degrees),
            accuracy_translation_angst=subset(source.accuracy_translations_angstrom),
            resolution_angstrom=subset(source.estimated_resolution_angstrom),
        )
    except ValueError as err:
        raise InputError(where, f"cannot score the classes ({err})") from err
    scores = np.full(source.n_classes, UNSCORED, dtype=np.float64)
    scores[scored] = np.asarray(result.scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(scores).all():
        raise InputError(where, "the class ranker gave non-finite scores")
    return scores, result, scored


def _output_prefix(job_dir: Path) -> str:
    """The job directory as written inside STAR files (``Select/job014/``)."""
    return f"{job_dir.as_posix().rstrip('/')}/"


def run_select(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a Select job (testable entry point).

    Everything is read, scored and selected before the job directory is created, so bad
    input or an empty selection leaves nothing behind.

    Returns
    -------
    tuple
        ``(metrics, objects)``: counts of kept classes and particles; the job directory,
        input, scores, selection and particle mask.
    """
    criteria = criteria_from_config(cfg)
    regroup = int(cfg.regroup)
    source = load_select_input(
        optimiser=_optional_path(cfg, "optimiser"),
        model=_optional_path(cfg, "model"),
        data=_optional_path(cfg, "data"),
        class_stack=_optional_path(cfg, "class_stack"),
        pixel_size_angstrom=_optional_float(cfg, "angpix"),
        particle_diameter_angstrom=_optional_float(cfg, "particle_diameter"),
        project_dir=_optional_path(cfg, "project_dir"),
    )
    if source.is_bare and regroup > 0:
        raise ConfigError("regroup needs particles; a bare class stack has none")
    if source.optimiser_values is not None:
        ctf = str(source.optimiser_values.get("rlnDoCorrectCtf", "1")).strip()
        if ctf in ("0", "False", "false"):
            log.warning(
                "the Class2D run did not correct for the CTF; RELION's ranker refuses "
                "such jobs and the scores may be unreliable"
            )
    log.info(
        "scoring %d class averages (%d px, %.3f Å/px, particle diameter %s)",
        source.n_classes,
        source.box_size,
        source.pixel_size_angstrom,
        "default"
        if source.particle_diameter_angstrom is None
        else f"{source.particle_diameter_angstrom:g} Å",
    )
    scores, ranked, scored = score_input(source)
    counts = source.estimated_particle_counts()
    where = source.data_path or source.class_stack_path
    if source.is_bare:
        try:
            selection = select_classes(
                scores, criteria, class_numbers=source.class_numbers
            )
        except ConfigError as err:
            # scoring a bare stack is the job; an empty selection is reported, not fatal
            log.warning("%s", err)
            selection = None
    else:
        selection = select_classes(
            scores,
            criteria,
            class_numbers=source.class_numbers,
            particle_counts=counts,
            resolution_angstrom=source.estimated_resolution_angstrom,
        )
    selected = (
        selection.selected
        if selection is not None
        else np.zeros(source.n_classes, dtype=bool)
    )

    particle_mask = None
    regrouped = None
    if not source.is_bare:
        particle_mask = selected_particles(
            source.particle_class_numbers, source.class_numbers, selected
        )
        if not particle_mask.any():
            kept = ", ".join(str(c) for c in source.class_numbers[selected].tolist())
            raise InputError(where, f"no particle is in the selected classes ({kept})")
        if regroup > 0:
            regrouped, regroup_result = regroup_particles(
                source.particles.loc[particle_mask].reset_index(drop=True),
                regroup,
                source.model_groups,
                where=str(source.model_path),
            )
            n_new = len(set(regroup_result.new_group_names) - {""})
            log.info(
                "regrouped %d particles into %d groups (target %d per group)",
                int(particle_mask.sum()),
                n_new,
                regroup_result.target,
            )

    with job_directory(_optional_path(cfg, "output"), "Select", cfg) as job_dir:
        prefix = _output_prefix(job_dir)
        version = source.star_version
        if source.is_bare:
            write_class_scores(job_dir / "class_scores.star", source, scores, selected)
        else:
            write_particles_star(
                job_dir / "particles.star", source, particle_mask, regrouped
            )
            write_rank_files(job_dir, prefix, source, scores)
        if selected.any():
            write_class_averages(
                job_dir / "class_averages.star", source, scores, selected
            )
        write_backup_selection(
            job_dir / "backup_selection.star", selected, version=version
        )
        write_npy(job_dir / "features.npy", ranked.features)
        write_npy(job_dir / "images.npy", ranked.images64)
        if bool(cfg.gallery):
            shown_counts = source.particle_counts()
            n_kept_particles = (
                None if particle_mask is None else int(particle_mask.sum())
            )
            summary = (
                f"{int(selected.sum())} of {source.n_classes} classes kept"
                + (
                    ""
                    if n_kept_particles is None
                    else f", {n_kept_particles} of {source.n_particles} particles"
                )
                + f" (min_score={criteria.min_score}, max_score={criteria.max_score:g})"
            )
            write_selection_gallery_png(
                job_dir / "selection_gallery.png",
                source.class_images,
                scores,
                selected,
                source.class_numbers,
                shown_counts,
                title=summary.replace(" (", "\n("),
            )
            write_selection_html(
                job_dir / "selection.html",
                source.class_images,
                scores,
                selected,
                source.class_numbers,
                shown_counts,
                title=f"cryoavg select: {job_dir}",
                summary=summary,
                reasons=None if selection is None else selection.reasons,
            )
    metrics: dict[str, Any] = {
        "n_classes": source.n_classes,
        "n_scored": int(scored.sum()),
        "n_selected_classes": int(selected.sum()),
        "n_added_by_guard": 0 if selection is None else selection.n_added,
        "n_particles": source.n_particles,
        "n_selected_particles": None
        if particle_mask is None
        else int(particle_mask.sum()),
        "best_score": float(scores[scored].max()),
    }
    log.info(
        "Select: kept %d of %d classes%s; %s",
        metrics["n_selected_classes"],
        metrics["n_classes"],
        ""
        if particle_mask is None
        else f" and {metrics['n_selected_particles']} of {metrics['n_particles']} "
        "particles",
        job_dir,
    )
    return metrics, {
        "job_dir": job_dir,
        "input": source,
        "scores": scores,
        "selection": selection,
        "selected": selected,
        "particle_mask": particle_mask,
        "regrouped": regrouped,
        "ranked": ranked,
    }


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="select")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``cryoavg select``."""
    run_job(run_select, cfg)
