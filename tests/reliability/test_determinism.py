"""Determinism on CPU: the same seed gives bitwise the same Class2D result."""

import mrcfile
import numpy as np
import pytest

from cryoavg.cli.class2d import run_class2d
from cryoavg.io.star import read_star
from tests.conftest import compose_job

ARGS = [
    "classes=3",
    "psi_step=15",
    "offset_range=2",
    "iterations=2",
    "write_every=2",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


def _run(tiny_simulation, job, seed):
    cfg = compose_job(
        "class2d",
        [
            f"particles={tiny_simulation / 'particles.star'}",
            f"output={job}",
            f"seed={seed}",
            *ARGS,
        ],
    )
    run_class2d(cfg)
    classes = mrcfile.read(job / "run_it002_classes.mrcs")
    data = read_star(job / "run_it002_data.star")["particles"]
    return np.array(classes), data


@pytest.mark.slow
def test_same_seed_same_result_on_cpu(tiny_simulation, tmp_path):
    first, data_1 = _run(tiny_simulation, tmp_path / "a", 3)
    second, data_2 = _run(tiny_simulation, tmp_path / "b", 3)
    np.testing.assert_array_equal(first, second)
    for label in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst"):
        np.testing.assert_array_equal(data_1[label], data_2[label])
    other, _ = _run(tiny_simulation, tmp_path / "c", 4)
    assert not np.array_equal(first, other)  # the seed matters
