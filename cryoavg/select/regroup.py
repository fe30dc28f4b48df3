"""Regroup selected particles into about ``n`` scale groups (spec §C.6, ``--regroup n``).

RELION's rule, reproduced exactly by :func:`regroup_old_groups`:

1. count the selected particles of every old group and record its optics group;
2. sort the old groups by ``rlnGroupScaleCorrection`` (ascending);
3. ``target = floor(n_selected / n)`` (an error below 10);
4. for each optics group 1…max, start a new group id and walk its sorted old groups,
   adding their counts to a running total; when the total exceeds ``target`` the id is
   incremented and the total reset to 0 — the old group that overflowed gets the NEW
   id (and is not counted in the new total);
5. names are ``group_`` + the id zero-padded to ``floor(log10 n) + 1`` digits; every
   selected particle gets its old group's new ``rlnGroupName`` and ``rlnGroupNumber`` is
   removed (RELION re-derives it from the name).

Old groups are the model's ``data_model_groups`` (matched by the particles'
``rlnGroupNumber``, else by ``rlnGroupName``); without a groups table they are the
micrographs (``rlnMicrographName``), all with scale correction 1, in name order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryoavg.errors import ConfigError, InputError
from cryoavg.io import star as labels

__all__ = [
    "MIN_PARTICLES_PER_GROUP",
    "RegroupResult",
    "regroup_old_groups",
    "regroup_particles",
]

log = logging.getLogger("cryoavg")

#: RELION refuses to regroup into groups of fewer particles than this.
MIN_PARTICLES_PER_GROUP = 10


@dataclass
class RegroupResult:
    """New groups of the old groups.

    Attributes
    ----------
    new_group_id
        ``int64 (m,)`` new group id of each old group (−1: no selected particles).
    new_group_names
        ``(m,)`` ``"group_NN"`` of each old group (``""`` for those without particles).
    target
        Particles per group aimed at (``floor(n_selected / n)``).
    warnings
        Old groups whose particles come from several optics groups.
    """

    new_group_id: np.ndarray
    new_group_names: list[str]
    target: int
    warnings: list[str]


def regroup_old_groups(
    old_group: np.ndarray,
    scale_correction: np.ndarray,
    optics_group: np.ndarray,
    n_groups: int,
) -> RegroupResult:
    """Merge old groups into about ``n_groups`` new ones (RELION ``--regroup``).

    Parameters
    ----------
    old_group
        ``int (s,)`` 0-based old group of each selected particle (``0 … m−1``).
    scale_correction
        ``(m,)`` ``rlnGroupScaleCorrection`` of each old group (sort key).
    optics_group
        ``int (s,)`` 1-based optics group of each selected particle.
    n_groups
        Approximate number of groups wanted (``n``).

    Returns
    -------
    RegroupResult

    Raises
    ------
    ConfigError
        ``n_groups < 1`` or fewer than 10 particles per group.
    """
    if n_groups < 1:
        raise ConfigError(f"regroup must be >= 1, got {n_groups}")
    old_group = np.asarray(old_group, dtype=np.int64)
    optics_group = np.asarray(optics_group, dtype=np.int64)
    scale = np.asarray(scale_correction, dtype=np.float64)
    m = scale.shape[0]
    n_selected = int(old_group.shape[0])
    target = n_selected // n_groups
    if target < MIN_PARTICLES_PER_GROUP:
        raise ConfigError(
            f"regroup={n_groups}: {n_selected} selected particles give {target} per "
            f"group; need at least {MIN_PARTICLES_PER_GROUP} (use a smaller regroup)"
        )
    counts = np.bincount(old_group, minlength=m)
    group_optics = np.full(m, -1, dtype=np.int64)
    warnings: list[str] = []
    for g in np.flatnonzero(counts).tolist():
        values = np.unique(optics_group[old_group == g])
        group_optics[g] = int(values[0])
        if values.size > 1:
            warnings.append(
                f"old group {g + 1} has particles of optics groups "
                f"{', '.join(str(v) for v in values.tolist())}"
            )
    order = np.argsort(scale, kind="stable")
    new_id = np.full(m, -1, dtype=np.int64)
    current = 0
    max_optics = int(group_optics.max()) if m else 0
    for optics in range(1, max_optics + 1):
        current += 1
        running = 0
        for g in order.tolist():
            if group_optics[g] != optics:
                continue
            running += int(counts[g])
            if running > target:
                current += 1
                running = 0
            new_id[g] = current
    digits = len(str(n_groups))  # floor(log10 n) + 1
    names = [f"group_{i:0{digits}d}" if i > 0 else "" for i in new_id.tolist()]
    return RegroupResult(
        new_group_id=new_id, new_group_names=names, target=target, warnings=warnings
    )


def _old_groups(
    particles: pd.DataFrame, groups: pd.DataFrame | None, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """0-based old group of each particle and the scale correction of each old group."""
    if groups is not None and labels.GROUP_SCALE_CORRECTION in groups.columns:
        scale = pd.to_numeric(groups[labels.GROUP_SCALE_CORRECTION], errors="coerce")
        scale = scale.to_numpy(dtype=np.float64)
        if (
            labels.GROUP_NUMBER in particles.columns
            and labels.GROUP_NUMBER in groups.columns
        ):
            numbers = pd.to_numeric(groups[labels.GROUP_NUMBER], errors="coerce")
            key = particles[labels.GROUP_NUMBER]
            lookup = {int(v): i for i, v in enumerate(numbers.tolist())}
            index = [lookup.get(int(v), -1) for v in pd.to_numeric(key).tolist()]
        elif (
            labels.GROUP_NAME in particles.columns
            and labels.GROUP_NAME in groups.columns
        ):
            lookup = {str(v): i for i, v in enumerate(groups[labels.GROUP_NAME])}
            index = [lookup.get(str(v), -1) for v in particles[labels.GROUP_NAME]]
        else:
            raise InputError(
                where,
                "particles have neither rlnGroupNumber nor rlnGroupName to match the "
                "model's data_model_groups",
            )
        result = np.asarray(index, dtype=np.int64)
        if (result < 0).any():
            raise InputError(where, "particles refer to groups the model does not have")
        if np.isnan(scale).any():
            raise InputError(where, f"{labels.GROUP_SCALE_CORRECTION} is not a number")
        return result, scale
    if labels.MICROGRAPH_NAME not in particles.columns:
        raise InputError(
            where,
            "regroup needs the model's data_model_groups or an rlnMicrographName column",
        )
    codes, uniques = pd.factorize(
        particles[labels.MICROGRAPH_NAME].astype(str), sort=True
    )
    return np.asarray(codes, dtype=np.int64), np.ones(len(uniques))


def regroup_particles(
    particles: pd.DataFrame,
    n_groups: int,
    groups: pd.DataFrame | None = None,
    *,
    where: str = "particles",
) -> tuple[pd.DataFrame, RegroupResult]:
    """Give the selected particles new group names (spec §C.6).

    Parameters
    ----------
    particles
        The selected particles (all columns), ``s`` rows.
    n_groups
        Approximate number of groups wanted.
    groups
        The model's ``data_model_groups`` (``rlnGroupNumber``, ``rlnGroupName``,
        ``rlnGroupScaleCorrection``), or ``None``: group by micrograph.
    where
        File named in error messages.

    Returns
    -------
    particles : pandas.DataFrame
        A copy with ``rlnGroupName`` set (replaced in place, or appended) and
        ``rlnGroupNumber`` removed; rows and other columns unchanged.
    result : RegroupResult

    Raises
    ------
    ConfigError
        Fewer than 10 particles per group.
    InputError
        Particles that cannot be matched to the old groups.
    """
    old_group, scale = _old_groups(particles, groups, where)
    if labels.OPTICS_GROUP in particles.columns:
        optics = pd.to_numeric(particles[labels.OPTICS_GROUP], errors="coerce")
        if optics.isna().any():
            raise InputError(where, f"{labels.OPTICS_GROUP} is not a number")
        optics_group = optics.to_numpy(dtype=np.int64)
    else:
        optics_group = np.ones(particles.shape[0], dtype=np.int64)
    result = regroup_old_groups(old_group, scale, optics_group, n_groups)
    for text in result.warnings:
        log.warning("regroup: %s", text)
    names = np.asarray(result.new_group_names, dtype=object)[old_group]
    out = particles.copy()
    out[labels.GROUP_NAME] = [str(v) for v in names]
    if labels.GROUP_NUMBER in out.columns:
        out = out.drop(columns=[labels.GROUP_NUMBER])
    return out, result
