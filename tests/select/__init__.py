"""Helpers for the Select tests: a hand-made RELION 4.0 Class2D result (spec §B).

:func:`write_relion_class2d` writes, under a project directory, exactly the files a
RELION 4.0 EM Class2D run leaves for its last iteration — ``run_it025_optimiser.star``
(with RELION's two header lines and the 4.0 labels of §B.5), ``run_it025_model.star``
(§B.3: model_general, model_classes, model_class_N, model_groups,
model_optics_group_N), ``run_it025_data.star`` (§B.4: data_optics + data_particles)
and ``run_it025_classes.mrcs`` — with project-relative names inside, ``# version
30001`` lines, two optics groups and eight micrograph (scale) groups.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryoavg.class2d.export import (
    MODEL_CLASSES_LABELS,
    MODEL_GENERAL_LABELS,
    OPTIMISER_LABELS,
)
from cryoavg.io import star as labels
from cryoavg.io.mrc import write_mrc
from cryoavg.io.star import write_star

#: labels of §B.5 that RELION 4.0 does not write (5.0 only)
_RELION5_ONLY = {
    "rlnTomoTomogramsFile",
    "rlnTomoTrajectoriesFile",
    "rlnDoBlush",
    "rlnBlushNoSpectralTrailing",
    "rlnOffsetRangeX",
    "rlnOffsetRangeY",
    "rlnOffsetRangeZ",
}

JOB = "Class2D/job003"
ROOT = f"{JOB}/run"


@dataclass
class RelionClass2D:
    """What :func:`write_relion_class2d` wrote (paths absolute, names as in the files)."""

    project: Path
    optimiser: Path
    model: Path
    data: Path
    stack: Path
    images: np.ndarray
    class_counts: np.ndarray
    particle_class: np.ndarray
    scale: np.ndarray
    particle_group: np.ndarray
    particle_optics: np.ndarray
    pixel_size_angstrom: float = 7.0
    diameter_angstrom: float = 180.0
    particles: pd.DataFrame = field(repr=False, default=None)


def class_images(k: int, box: int, seed: int = 0) -> np.ndarray:
    """``(k, box, box)`` images: odd rows are centred blobs, even rows pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:box, :box] - box / 2
    images = np.empty((k, box, box), np.float32)
    for i in range(k):
        if i % 2 == 0:
            blob = np.exp(-(x**2 + (1.5 * y) ** 2) / (2 * (box / 8) ** 2))
            blob += 0.6 * np.exp(-((x - box / 6) ** 2 + y**2) / (2 * (box / 16) ** 2))
            images[i] = blob + 0.05 * rng.standard_normal((box, box))
        else:
            images[i] = rng.standard_normal((box, box))
    return images


def write_relion_class2d(
    project: Path,
    *,
    class_counts: tuple[int, ...] = (90, 70, 60, 45, 27, 8),
    box: int = 32,
    seed: int = 0,
) -> RelionClass2D:
    """Write a RELION 4.0 Class2D iteration (EM, ``--iter 25``) under ``project``."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(class_counts, dtype=np.int64)
    k, n = counts.size, int(counts.sum())
    pixel, diameter = 7.0, 180.0
    job = project / JOB
    job.mkdir(parents=True, exist_ok=True)
    images = class_images(k, box, seed)
    stack_name = f"{ROOT}_it025_classes.mrcs"
    write_mrc(project / stack_name, images, pixel, is_stack=True)

    # particles: shuffled classes, 8 micrographs, micrographs 1-4 optics group 1, 5-8 group 2
    particle_class = rng.permutation(np.repeat(np.arange(1, k + 1), counts))
    micrograph = rng.integers(1, 9, size=n)
    optics = np.where(micrograph <= 4, 1, 2)
    scale = np.array([1.05, 0.92, 1.10, 0.97, 1.01, 0.88, 1.15, 0.95])
    particles = pd.DataFrame(
        {
            labels.COORDINATE_X: rng.uniform(100, 3000, n),
            labels.COORDINATE_Y: rng.uniform(100, 3000, n),
            labels.IMAGE_NAME: [
                f"{i + 1:06d}@Extract/job007/Movies/mic{m:03d}.mrcs"
                for i, m in enumerate(micrograph)
            ],
            labels.MICROGRAPH_NAME: [
                f"MotionCorr/job002/Movies/mic{m:03d}.mrc" for m in micrograph
            ],
            labels.OPTICS_GROUP: optics.astype(np.int64),
            labels.DEFOCUS_U: rng.uniform(8000, 25000, n),
            labels.DEFOCUS_V: rng.uniform(8000, 25000, n),
            labels.DEFOCUS_ANGLE: rng.uniform(0, 180, n),
            labels.ANGLE_ROT: np.zeros(n),
            labels.ANGLE_TILT: np.zeros(n),
            labels.ANGLE_PSI: rng.uniform(-180, 180, n),
            labels.ORIGIN_X_ANGST: rng.normal(0, 7, n),
            labels.ORIGIN_Y_ANGST: rng.normal(0, 7, n),
            labels.CLASS_NUMBER: particle_class.astype(np.int64),
            labels.NORM_CORRECTION: rng.uniform(0.8, 1.2, n),
            labels.LOG_LIKELI_CONTRIBUTION: rng.normal(1e4, 100, n),
            labels.MAX_VALUE_PROB_DISTRIBUTION: rng.uniform(0, 1, n),
            labels.NR_OF_SIGNIFICANT_SAMPLES: rng.integers(1, 50, n).astype(np.int64),
            labels.GROUP_NUMBER: micrograph.astype(np.int64),
        }
    )
    optics_table = pd.DataFrame(
        {
            labels.OPTICS_GROUP_NAME: ["opticsGroup1", "opticsGroup2"],
            labels.OPTICS_GROUP: np.array([1, 2], dtype=np.int64),
            labels.MICROGRAPH_ORIGINAL_PIXEL_SIZE: [1.75, 1.75],
            labels.VOLTAGE: [300.0, 300.0],
            labels.SPHERICAL_ABERRATION: [2.7, 2.7],
            labels.AMPLITUDE_CONTRAST: [0.1, 0.1],
            labels.IMAGE_PIXEL_SIZE: [pixel, pixel],
            labels.IMAGE_SIZE: np.array([box, box], dtype=np.int64),
            labels.IMAGE_DIMENSIONALITY: np.array([2, 2], dtype=np.int64),
            labels.CTF_DATA_ARE_CTF_PREMULTIPLIED: np.array([0, 0], dtype=np.int64),
        }
    )
    write_star(
        project / f"{ROOT}_it025_data.star",
        {"optics": optics_table, "particles": particles},
        version=30001,
    )

    # model.star (§B.3), EM: no moment columns
    general_values = {
        labels.REFERENCE_DIMENSIONALITY: 2,
        labels.DATA_DIMENSIONALITY: 2,
        labels.ORIGINAL_IMAGE_SIZE: box,
        labels.CURRENT_RESOLUTION: 21.0,
        labels.CURRENT_IMAGE_SIZE: box,
        labels.PADDING_FACTOR: 2,
        labels.IS_HELIX: 0,
        labels.FOURIER_SPACE_INTERPOLATOR: 1,
        labels.MIN_RADIUS_NN_INTERPOLATION: 10,
        labels.PIXEL_SIZE: pixel,
        labels.NR_CLASSES: k,
        labels.NR_BODIES: 1,
        labels.NR_GROUPS: 8,
        labels.NR_OPTICS_GROUPS: 2,
        labels.TAU2_FUDGE_FACTOR: 2.0,
        labels.NORM_CORRECTION_AVERAGE: 1.0,
        labels.SIGMA_OFFSETS_ANGST: 7.0,
        labels.ORIENTATIONAL_PRIOR_MODE: 0,
        labels.SIGMA_PRIOR_ROT_ANGLE: 0.0,
        labels.SIGMA_PRIOR_TILT_ANGLE: 0.0,
        labels.SIGMA_PRIOR_PSI_ANGLE: 0.0,
        labels.LOG_LIKELIHOOD: 1.2e8,
        labels.AVERAGE_PMAX: 0.4,
    }
    general = {label: general_values[label] for label in MODEL_GENERAL_LABELS}
    resolution = np.array([15.0, 30.0, 18.0, 45.0, np.inf, np.inf])[:k]
    classes_values = {
        labels.REFERENCE_IMAGE: [f"{i + 1:06d}@{stack_name}" for i in range(k)],
        labels.CLASS_DISTRIBUTION: counts / n,
        labels.ACCURACY_ROTATIONS: np.array([3.1, 999.0, 4.2, 8.5, 999.0, 999.0])[:k],
        labels.ACCURACY_TRANSLATIONS_ANGST: np.array([1.2, 999.0, 1.9, 3.0, 999, 999])[
            :k
        ],
        labels.ESTIMATED_RESOLUTION: resolution,
        labels.OVERALL_FOURIER_COMPLETENESS: np.ones(k),
        labels.CLASS_PRIOR_OFFSET_X: rng.normal(0, 0.5, k),
        labels.CLASS_PRIOR_OFFSET_Y: rng.normal(0, 0.5, k),
    }
    classes = pd.DataFrame(
        {
            label: classes_values[label]
            for label in MODEL_CLASSES_LABELS
            if label in classes_values
        }
    )
    blocks: dict = {"model_general": general, "model_classes": classes}
    shells = np.arange(box // 2 + 1)
    for i in range(k):
        blocks[f"model_class_{i + 1}"] = pd.DataFrame(
            {
                labels.SPECTRAL_INDEX: shells.astype(np.int64),
                labels.RESOLUTION: shells / (box * pixel),
                labels.ANGSTROM_RESOLUTION: np.where(
                    shells > 0, box * pixel / np.maximum(shells, 1), 999.0
                ),
                labels.SSNR_MAP: np.exp(-shells / 4.0) * 50,
                labels.GOLD_STANDARD_FSC: np.zeros(shells.size),
                labels.FOURIER_COMPLETENESS: np.ones(shells.size),
                labels.REFERENCE_SIGMA2: np.full(shells.size, 0.01),
                labels.REFERENCE_TAU2: np.exp(-shells / 4.0),
            }
        )
    group_counts = np.bincount(micrograph, minlength=9)[1:]
    blocks["model_groups"] = pd.DataFrame(
        {
            labels.GROUP_NUMBER: np.arange(1, 9, dtype=np.int64),
            labels.GROUP_NAME: [f"Movies/mic{m:03d}.mrc" for m in range(1, 9)],
            labels.GROUP_NR_PARTICLES: group_counts.astype(np.int64),
            labels.GROUP_SCALE_CORRECTION: scale,
        }
    )
    for g in (1, 2):
        blocks[f"model_optics_group_{g}"] = pd.DataFrame(
            {
                labels.SPECTRAL_INDEX: shells.astype(np.int64),
                labels.RESOLUTION: shells / (box * pixel),
                labels.SIGMA2_NOISE: np.full(shells.size, 0.5),
            }
        )
    write_star(project / f"{ROOT}_it025_model.star", blocks, version=30001)

    # optimiser.star (§B.5, RELION 4.0 labels)
    names = {
        "rlnOutputRootName": ROOT,
        "rlnModelStarFile": f"{ROOT}_it025_model.star",
        "rlnExperimentalDataStarFile": f"{ROOT}_it025_data.star",
        "rlnOrientSamplingStarFile": f"{ROOT}_it025_sampling.star",
        "rlnSolventMaskName": "None",
        "rlnSolventMask2Name": "None",
        "rlnBodyStarFile": "None",
        "rlnTauSpectrumName": "None",
        "rlnLocalSymmetryFile": "None",
        "rlnFourierMask": "None",
    }
    numbers = {
        "rlnCurrentIteration": 25,
        "rlnNumberOfIterations": 25,
        "rlnParticleDiameter": diameter,
        "rlnRandomSeed": 1,
        "rlnDoCorrectCtf": 1,
        "rlnDoZeroMask": 1,
        "rlnDoSolventFlattening": 1,
        "rlnDoCorrectNorm": 1,
        "rlnDoCorrectScale": 1,
    }
    optimiser = {}
    for label in OPTIMISER_LABELS:
        if label in _RELION5_ONLY:
            continue
        optimiser[label] = names.get(label, numbers.get(label, 0))
    write_star(
        project / f"{ROOT}_it025_optimiser.star",
        {"optimiser_general": optimiser},
        version=30001,
        header_comments=[
            "# RELION optimiser; version 4.0.1-commit-000000",
            f"# --o {ROOT} --iter 25 --i Extract/job007/particles.star --K {k} "
            f"--particle_diameter {diameter:g} --ctf --tau2_fudge 2 ",
        ],
    )
    return RelionClass2D(
        project=project,
        optimiser=project / f"{ROOT}_it025_optimiser.star",
        model=project / f"{ROOT}_it025_model.star",
        data=project / f"{ROOT}_it025_data.star",
        stack=project / stack_name,
        images=images,
        class_counts=counts,
        particle_class=particle_class,
        scale=scale,
        particle_group=micrograph - 1,
        particle_optics=optics,
        pixel_size_angstrom=pixel,
        diameter_angstrom=diameter,
        particles=particles,
    )
