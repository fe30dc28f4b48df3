"""Automatic 2D class ranking: a score in [0, 1] per class average (RELION class ranker).

>>> scores = score_classes(classes, pixel_size_angstrom=7.84,
...                        particle_diameter_angstrom=300.0)  # doctest: +SKIP
>>> scores.scores  # doctest: +SKIP
array([0.98, 0.02, ...], dtype=float32)

The network (:mod:`cryoavg.select.network`) ships with cryoavg in
``cryoavg/select/weights/class_ranker_v1.pt`` with its SHA-256 beside it; it was trained by
``scripts/train_ranker.py`` on class averages that cryoavg itself produced from simulated
data (labels from the simulation's ground truth) and on synthetic sharp, high-SNR averages
(clean projections as good, junk analogues as bad), so that large, detailed real averages
are ranked as well as small noisy ones (``docs/select.md``). Nothing is ever downloaded.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryoavg.errors import CryoavgError
from cryoavg.select.features import compute_features, feature_names
from cryoavg.select.network import ClassRankerNet, load_checkpoint

#: the weights shipped with cryoavg
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "class_ranker_v1.pt"


@dataclass
class ClassScores:
    """Scores of ``k`` class averages and what they were computed from.

    Attributes
    ----------
    scores
        ``(k,)`` float32 in [0, 1]; higher = better class.
    features
        ``(k, F)`` float32 features (see :func:`cryoavg.select.features.feature_names`).
    images64
        ``(k, 64, 64)`` float32 CNN inputs.
    feature_names
        The ``F`` column names of ``features``.
    """

    scores: np.ndarray
    features: np.ndarray
    images64: np.ndarray
    feature_names: list[str]


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, mtime_ns: int) -> tuple[ClassRankerNet, tuple[str, ...]]:
    model, names, _ = load_checkpoint(Path(path))
    return model, tuple(names)


def load_ranker(
    weights: str | Path | None = None,
) -> tuple[ClassRankerNet, list[str]]:
    """Load (and cache) the ranker network; verifies the SHA-256 checksum.

    Raises
    ------
    cryoavg.errors.CryoavgError
        Missing weights, checksum mismatch or an incompatible file.
    """
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    mtime = path.stat().st_mtime_ns if path.is_file() else -1
    if mtime < 0:
        load_checkpoint(path)  # raises the clear "not found" error
    model, names = _cached_model(str(path.resolve()), mtime)
    if list(names) != feature_names():
        raise CryoavgError(
            f"class ranker weights {path}: trained with different features "
            f"({len(names)} columns, this cryoavg computes {len(feature_names())})"
        )
    return model, list(names)


def score_classes(
    images: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    particle_diameter_angstrom: float | None = None,
    class_distribution=None,
    n_particles=None,
    accuracy_rotation_deg=None,
    accuracy_translation_angst=None,
    resolution_angstrom=None,
    weights: str | Path | None = None,
) -> ClassScores:
    """Score class averages with the shipped class ranker.

    Parameters
    ----------
    images
        ``(k, h, w)`` class averages (a single ``(h, w)`` image is accepted).
    pixel_size_angstrom
        Pixel size of the images (Å/px).
    particle_diameter_angstrom
        Particle / mask diameter (Å); ``None`` = ``(box − 5 px)·p``.
    class_distribution
        ``(k,)`` class fractions π_k, or ``None``.
    n_particles
        ``(k,)`` particles per class, or ``None``.
    accuracy_rotation_deg, accuracy_translation_angst
        ``(k,)`` model accuracies; values > 99 (RELION's 999) mean unknown.
    resolution_angstrom
        ``(k,)`` estimated resolution (Å, may be ``inf``), or ``None``.
    weights
        Another checkpoint (default: the shipped :data:`DEFAULT_WEIGHTS`).

    Every optional per-class input that is ``None`` is treated as missing (the network was
    trained with these groups randomly removed), so a bare stack of class averages can be
    scored too.

    Returns
    -------
    ClassScores
        Scores, features and CNN images.

    Raises
    ------
    cryoavg.errors.CryoavgError
        The weights are missing or fail their checksum.
    ValueError
        An optional array does not have ``k`` values, ``pixel_size_angstrom`` ≤ 0, or
        images / diameter that cannot be ranked (see :func:`compute_features`).
    """
    if not pixel_size_angstrom or pixel_size_angstrom <= 0:
        raise ValueError(f"pixel_size_angstrom must be > 0, got {pixel_size_angstrom}")
    model, names = load_ranker(weights)
    if images.ndim == 2:
        images = images[None]
    features, images64 = compute_features(
        images,
        pixel_size_angstrom=pixel_size_angstrom,
        particle_diameter_angstrom=particle_diameter_angstrom,
        class_distribution=class_distribution,
        n_particles=n_particles,
        accuracy_rotation_deg=accuracy_rotation_deg,
        accuracy_translation_angst=accuracy_translation_angst,
        resolution_angstrom=resolution_angstrom,
    )
    with torch.no_grad():
        scores = model(torch.from_numpy(images64), torch.from_numpy(features))
    return ClassScores(
        scores=scores.numpy().astype(np.float32),
        features=features,
        images64=images64,
        feature_names=names,
    )
