"""Which classes to keep: RELION's automatic selection (spec §C.4) and its companions.

Pure functions on per-class arrays (``k`` classes, class order):

* :func:`scored_classes` — the classes RELION's ranker scores (estimated particle count
  π_k·N above 10); the others keep the score :data:`UNSCORED` (−999).
* :func:`select_classes` — ``min_score ≤ score ≤ max_score``, optionally also a minimum
  class size and a resolution limit, then the ``min_particles`` / ``min_classes`` guards
  that add classes in descending score order; or a manual list of class numbers.
* :func:`selected_particles` — particles whose ``rlnClassNumber`` is a selected class.

An empty selection is a :class:`~cryoavg.errors.ConfigError` that says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cryoavg.errors import ConfigError

__all__ = [
    "RANKER_MIN_PARTICLES",
    "UNSCORED",
    "SelectionCriteria",
    "SelectionResult",
    "estimated_particle_counts",
    "scored_classes",
    "select_classes",
    "selected_particles",
]

#: RELION's ranker only scores classes with more than this many (estimated) particles.
RANKER_MIN_PARTICLES = 10.0

#: Score written for classes that were not scored (``rlnClassScore`` −999).
UNSCORED = -999.0


@dataclass(frozen=True)
class SelectionCriteria:
    """What to keep (the ``cryoavg select`` keys of the same names).

    Attributes
    ----------
    min_score, max_score
        Keep classes with ``min_score ≤ score ≤ max_score`` (RELION defaults 0.5 and
        999). ``min_score = None`` switches the score criterion off (size and
        resolution criteria and guards still apply).
    min_particles
        If the kept classes hold fewer (estimated) particles, add classes in
        descending score order until they do (≤ 0: off). Takes precedence over
        ``min_classes``, as in RELION's GUI.
    min_classes
        If fewer classes are kept, add classes in descending score order (≤ 0: off).
    classes
        Manual selection: exactly these 1-based class numbers (the criteria above
        are then not applied).
    min_class_particles
        Keep only classes with at least this many (estimated) particles (≤ 0: off).
    max_resolution_angstrom
        Keep only classes whose estimated resolution is at least this good, i.e.
        ``rlnEstimatedResolution ≤ max_resolution_angstrom`` (≤ 0: off).
    """

    min_score: float | None = 0.5
    max_score: float = 999.0
    min_particles: float = -1
    min_classes: int = -1
    classes: tuple[int, ...] | None = None
    min_class_particles: float = -1
    max_resolution_angstrom: float = -1

    def __post_init__(self) -> None:
        for name in ("max_score", "min_particles", "min_class_particles"):
            if not math.isfinite(float(getattr(self, name))):
                raise ConfigError(f"{name} must be a finite number")
        if self.min_score is not None:
            if not math.isfinite(float(self.min_score)):
                raise ConfigError("min_score must be a finite number (or null)")
            if self.min_score > self.max_score:
                raise ConfigError(
                    f"min_score={self.min_score} is above max_score={self.max_score}"
                )
        if self.classes is not None and len(self.classes) == 0:
            raise ConfigError("classes=[] selects nothing: give class numbers or null")

    @property
    def uses_particle_counts(self) -> bool:
        """Whether a criterion needs particle counts (not known for a bare stack)."""
        return self.min_particles > 0 or self.min_class_particles > 0


@dataclass
class SelectionResult:
    """Outcome of :func:`select_classes`.

    Attributes
    ----------
    selected
        ``bool (k,)`` kept classes.
    reasons
        ``(k,)`` why each class was kept or rejected (for logs and the gallery).
    n_added
        Classes added by the ``min_particles`` / ``min_classes`` guards.
    """

    selected: np.ndarray
    reasons: list[str]
    n_added: int = 0

    @property
    def n_selected(self) -> int:
        """Number of kept classes."""
        return int(self.selected.sum())


def estimated_particle_counts(
    class_distribution: np.ndarray, n_particles: int
) -> np.ndarray:
    """RELION's per-class particle estimate π_k · N.

    Parameters
    ----------
    class_distribution
        ``(k,)`` ``rlnClassDistribution``.
    n_particles
        Number of particles in the data set.

    Returns
    -------
    numpy.ndarray
        ``float64 (k,)``.
    """
    return np.asarray(class_distribution, dtype=np.float64) * float(n_particles)


def scored_classes(particle_counts: np.ndarray | None, k: int) -> np.ndarray:
    """Classes RELION's ranker scores: more than 10 (estimated) particles.

    Parameters
    ----------
    particle_counts
        ``(k,)`` estimated counts, or ``None`` (bare stack: every class is scored).
    k
        Number of classes.

    Returns
    -------
    numpy.ndarray
        ``bool (k,)``.
    """
    if particle_counts is None:
        return np.ones(k, dtype=bool)
    return np.asarray(particle_counts, dtype=np.float64) > RANKER_MIN_PARTICLES


def _add_by_score(
    selected: np.ndarray,
    scores: np.ndarray,
    candidates: np.ndarray,
    enough: Callable[[np.ndarray], bool],
    reasons: list[str],
    why: str,
) -> int:
    """Add candidate classes in descending score order until ``enough(selected)``."""
    added = 0
    order = np.argsort(-scores, kind="stable")
    for c in order.tolist():
        if enough(selected):
            break
        if candidates[c] and not selected[c]:
            selected[c] = True
            reasons[c] = why
            added += 1
    return added


def select_classes(
    scores: np.ndarray,
    criteria: SelectionCriteria,
    *,
    class_numbers: Sequence[int] | np.ndarray | None = None,
    particle_counts: np.ndarray | None = None,
    resolution_angstrom: np.ndarray | None = None,
) -> SelectionResult:
    """Choose the classes to keep (spec §C.4, plus size / resolution / manual).

    Parameters
    ----------
    scores
        ``(k,)`` predicted scores in [0, 1]; :data:`UNSCORED` (−999) for classes that
        were not scored (never kept by the score criterion or the guards).
    criteria
        The thresholds.
    class_numbers
        ``(k,)`` 1-based class numbers (default 1…k), for manual selection.
    particle_counts
        ``(k,)`` particle counts (π_k·N as RELION), or ``None`` when unknown.
    resolution_angstrom
        ``(k,)`` estimated resolution in Å (``inf`` allowed), or ``None``.

    Returns
    -------
    SelectionResult

    Raises
    ------
    ConfigError
        A criterion needs counts or resolutions that are unknown, a manual class
        number does not exist, or nothing is selected.
    """
    scores = np.asarray(scores, dtype=np.float64)
    k = scores.shape[0]
    numbers = (
        np.arange(1, k + 1)
        if class_numbers is None
        else np.asarray(class_numbers, dtype=np.int64)
    )
    counts = None if particle_counts is None else np.asarray(particle_counts, float)
    if criteria.uses_particle_counts and counts is None:
        raise ConfigError(
            "min_particles / min_class_particles need particle counts, which a bare "
            "class stack does not have"
        )
    if criteria.max_resolution_angstrom > 0 and resolution_angstrom is None:
        raise ConfigError(
            "max_resolution needs estimated resolutions, which a bare class stack "
            "does not have"
        )
    scored = np.isfinite(scores) & (scores != UNSCORED)
    reasons = [
        f"score {s:.3f}" if ok else "not scored (≤ 10 particles)"
        for s, ok in zip(scores.tolist(), scored.tolist(), strict=True)
    ]

    if criteria.classes is not None:
        wanted = [int(c) for c in criteria.classes]
        missing = sorted(set(wanted) - set(numbers.tolist()))
        if missing:
            raise ConfigError(
                f"classes=[...] names class {missing[0]} but the classes are "
                f"{int(numbers.min())}…{int(numbers.max())}"
            )
        selected = np.isin(numbers, wanted)
        for c in np.flatnonzero(selected).tolist():
            reasons[c] = "manual"
        return SelectionResult(selected=selected, reasons=reasons)

    keep = scored.copy()
    if criteria.min_score is not None:
        in_range = (scores >= criteria.min_score) & (scores <= criteria.max_score)
        for c in np.flatnonzero(scored & ~in_range).tolist():
            reasons[c] = (
                f"score {scores[c]:.3f} outside [{criteria.min_score:g}, {criteria.max_score:g}]"
            )
        keep &= in_range
    if criteria.min_class_particles > 0 and counts is not None:
        big = counts >= criteria.min_class_particles
        for c in np.flatnonzero(keep & ~big).tolist():
            reasons[c] = f"{counts[c]:.0f} < {criteria.min_class_particles:g} particles"
        keep &= big
    if criteria.max_resolution_angstrom > 0 and resolution_angstrom is not None:
        resolution = np.asarray(resolution_angstrom, dtype=np.float64)
        sharp = resolution <= criteria.max_resolution_angstrom
        for c in np.flatnonzero(keep & ~sharp).tolist():
            reasons[c] = (
                f"resolution {resolution[c]:.1f} Å > {criteria.max_resolution_angstrom:g} Å"
            )
        keep &= sharp
    for c in np.flatnonzero(keep).tolist():
        reasons[c] = f"kept: score {scores[c]:.3f}"

    added = 0
    if criteria.min_particles > 0 and counts is not None:
        target = float(criteria.min_particles)
        added = _add_by_score(
            keep,
            scores,
            scored,
            lambda mask: counts[mask].sum() >= target,
            reasons,
            f"added: min_particles={criteria.min_particles:g}",
        )
    elif criteria.min_classes > 0:
        target_classes = int(criteria.min_classes)
        added = _add_by_score(
            keep,
            scores,
            scored,
            lambda mask: int(mask.sum()) >= target_classes,
            reasons,
            f"added: min_classes={target_classes}",
        )
    if not keep.any():
        best = float(scores[scored].max()) if scored.any() else float("nan")
        raise ConfigError(
            f"no class selected (best score {best:.3f}, min_score={criteria.min_score}, "
            f"max_score={criteria.max_score}): lower min_score, or set min_classes=... "
            "or min_particles=..."
        )
    return SelectionResult(selected=keep, reasons=reasons, n_added=added)


def selected_particles(
    particle_class_numbers: np.ndarray,
    class_numbers: np.ndarray,
    selected: np.ndarray,
) -> np.ndarray:
    """Particles whose class is selected, in file order.

    Parameters
    ----------
    particle_class_numbers
        ``(n,)`` 1-based ``rlnClassNumber`` of each particle.
    class_numbers
        ``(k,)`` 1-based class number of each class.
    selected
        ``bool (k,)`` kept classes.

    Returns
    -------
    numpy.ndarray
        ``bool (n,)``.
    """
    kept_numbers = np.asarray(class_numbers)[np.asarray(selected, dtype=bool)]
    return np.isin(np.asarray(particle_class_numbers), kept_numbers)
