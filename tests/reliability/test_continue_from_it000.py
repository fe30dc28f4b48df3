"""Continuing Class2D from ``run_it000_optimiser.star`` (before any E-step).

Iteration 0 has no ``_sampling.star`` (RELION §A.4 step 9), so the ψ and offset steps of
the run can only come from the relion_refine arguments in the optimiser header (§B.5).
cryoavg used to write its own command line there (``cryoavg class2d psi_step=10 ...``),
so a continuation from iteration 0 fell back to the default steps and drifted far from
the uninterrupted run (17 % of the largest class pixel after 6 iterations).
"""

import mrcfile
import numpy as np
import pytest

from cryoavg.class2d.continuation import read_iteration
from cryoavg.cli.class2d import run_class2d
from cryoavg.io.star import read_star
from tests.conftest import compose_job

ARGS = [
    "classes=3",
    "psi_step=10",  # not the defaults (6°, 5 px, 1 px)
    "offset_range=3",
    "offset_step=1.5",
    "seed=5",
    "write_every=1",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]
#: as for every optimiser.star continuation (tests/cli/test_class2d_job.py): the noise
#: spectra are written with 3-4 significant digits. Measured here: 6e-6 (6 iterations).
CONTINUE_RTOL = 1e-3


def _run(*overrides):
    _, objects = run_class2d(compose_job("class2d", [*ARGS, *overrides]))
    return objects


@pytest.mark.slow  # the quick check: tests/cli/test_class2d_job.py
def test_iteration_zero_keeps_the_run_settings(tiny_simulation, tmp_path):
    job = tmp_path / "Class2D" / "job001"
    module = _run(
        f"particles={tiny_simulation / 'particles.star'}",
        f"output={job}",
        "iterations=1",
        # a cheap E-step, still not the default steps
        "classes=2",
        "psi_step=30",
        "offset_range=2",
        "offset_step=2",
        "preread=true",
    )["module"]
    continuation = read_iteration(job / "run_it000_optimiser.star")
    assert continuation.iteration == 0
    assert continuation.sampling is None  # no run_it000_sampling.star, as RELION
    want = module.settings.as_dict()
    got = continuation.settings.as_dict()
    # the automatic diameter (None) is written as the value it stands for
    data = module.data_info
    assert continuation.settings.mask_radius_px(
        data.box_size, data.pixel_size_angstrom
    ) == pytest.approx(module.mask_radius_px)
    different = {
        key: (got[key], want[key])
        for key in want
        if got[key] != want[key] and key != "particle_diameter_angstrom"
    }
    assert different == {}
    assert got["psi_step_degrees"] == 30.0
    assert got["preread_images"] is True


def _classes(job, iteration):
    (path,) = job.glob(f"run*_it{iteration:03d}_classes.mrcs")
    return np.array(mrcfile.read(path))


@pytest.mark.slow
def test_continue_from_iteration_zero_follows_the_uninterrupted_run(
    tiny_simulation, tmp_path
):
    iterations = 4
    reference = tmp_path / "Class2D" / "job001"
    _run(
        f"particles={tiny_simulation / 'particles.star'}",
        f"output={reference}",
        f"iterations={iterations}",
    )
    continued = tmp_path / "Class2D" / "job002"
    _run(
        f"continue_from={reference / 'run_it000_optimiser.star'}",
        f"output={continued}",
        f"iterations={iterations}",
    )
    want = _classes(reference, iterations)
    got = _classes(continued, iterations)
    difference = float(np.abs(got - want).max() / np.abs(want).max())
    assert difference < CONTINUE_RTOL, difference

    def assignment(job):
        (path,) = job.glob(f"run*_it{iterations:03d}_data.star")
        return read_star(path)["particles"]["rlnClassNumber"].to_numpy()

    assert (assignment(continued) == assignment(reference)).mean() >= 0.95
