"""Fuzzing the Hydra command lines of class2d, simulate and localsym.

Override strings with bad types, unknown keys, out-of-range values, broken syntax and
missing config group options are composed with the real configs
(:func:`cryoavg.cli._configs.config_dir`) exactly as ``cryoavg <job>`` does: first
:func:`cryoavg.cli._jobs.check_overrides`, then :func:`cryoavg.cli._jobs.run_job`. Each
must end in one ``error:`` line and exit status 2, never a traceback. The input files
are missing on purpose, so a command line that is valid stops at them.
"""

import io
from contextlib import redirect_stderr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryoavg.cli._jobs import check_overrides
from cryoavg.cli.class2d import run_class2d
from cryoavg.cli.localsym import run_localsym
from cryoavg.cli.simulate import run_simulate
from tests.conftest import compose_job

from ._fuzz import FAST, FULL, cli_answer, count, scratch_dir

JOBS = {
    "class2d": (
        run_class2d,
        ["particles=/nonexistent/particles.star", "logger=none"],
        [
            "classes",
            "tau2_fudge",
            "iterations",
            "algorithm",
            "mask_diameter",
            "zero_mask",
            "highres_limit",
            "center_classes",
            "psi_step",
            "offset_range",
            "offset_step",
            "ctf",
            "norm",
            "scale",
            "class_inactivity_threshold",
            "expand_class",
            "estep_memory_mib",
            "estep_precision",
            "seed",
            "write_every",
            "preread",
            "max_significant",
            "grad_ini_subset",
            "grad_fin_subset",
            "pixel_size",
            "data.chunk_size",
            "data.num_workers",
            "trainer",
            "logger",
            "experiment",
            "debug",
            "trainer.devices",
            "trainer.precision",
        ],
    ),
    "simulate": (
        run_simulate,
        ["map=/nonexistent/map.mrc"],
        [
            "n_particles",
            "junk_fraction",
            "junk_types",
            "snr",
            "box",
            "pixel_size",
            "map_pixel_size",
            "defocus_min_um",
            "defocus_max_um",
            "astigmatism_angstrom",
            "voltage_kv",
            "cs_mm",
            "amplitude_contrast",
            "bfactor",
            "ctf",
            "shift_sigma_px",
            "particles_per_micrograph",
            "seed",
        ],
    ),
    "localsym": (
        run_localsym,
        ["function=apply", "i_map=/nonexistent/map.mrc", "i_mask_info=/no/ops.star"],
        [
            "function",
            "angpix",
            "sphere_percentage",
            "width",
            "ang_range",
            "ang_step",
            "offset_range",
            "offset_step",
            "bin",
            "score",
            "local_grid",
            "max_iterations",
            "check_sphere",
            "n_protofilaments",
            "twist",
            "scheme_rounds",
        ],
    ),
}

BAD_VALUES = [
    "abc",
    "",
    "-1",
    "0",
    "1e999",
    "-1e999",
    "nan",
    "inf",
    "1.5",
    "true",
    "null",
    "[1,2]",
    "{a:1}",
    "[1,",
    "'unterminated",
    "${oops}",
    "${classes}",
    "2**40",
    "99999999999999999999",
    "nope",
    "é",
    "\\",
]


@st.composite
def command_lines(draw, job: str) -> list[str]:
    keys = JOBS[job][2]
    overrides = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(
            st.sampled_from(keys)
            | st.sampled_from(["nr_classes", "foo.bar", "trainer.nope", "hydra.x"])
        )
        value = draw(
            st.sampled_from(BAD_VALUES)
            | st.integers(-(10**6), 10**6).map(str)
            | st.floats(allow_nan=True).map(repr)
            | st.text(
                alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=10
            )
        )
        prefix = draw(st.sampled_from(["", "", "", "+", "++", "~"]))
        overrides.append(f"{prefix}{key}={value}")
    return overrides


def check_command_line(job: str, overrides: list[str]) -> None:
    count(f"config_{job}")
    run, base, _ = JOBS[job]
    buffer = io.StringIO()
    try:
        with redirect_stderr(buffer):
            check_overrides(job, [*base, *overrides])
    except SystemExit as stop:
        code = stop.code
    else:
        code = None
    if code is not None:
        assert code == 2
        lines = buffer.getvalue().strip().splitlines()
        assert len(lines) == 1, buffer.getvalue()
        assert lines[0].startswith("error: ")
        return
    cfg = compose_job(
        job,
        [*base, *overrides, f"output={scratch_dir() / 'configs' / 'job001'}"]
        if job != "localsym"
        else [*base, *overrides],
    )
    status, line = cli_answer(run, cfg)
    assert status == 2, line
    assert not (scratch_dir() / "configs").exists()


#: each input composes the real config twice (about 0.1 s): fewer in the default suite
FAST_CONFIGS = settings(FAST, max_examples=15)


@pytest.mark.parametrize("job", list(JOBS))
def test_known_bad_values_are_one_line(job):
    key = JOBS[job][2][0]
    for value in ("abc", "[1,2]", "1e999", ""):
        check_command_line(job, [f"{key}={value}"])
    check_command_line(job, ["no_such_key=1"])


@pytest.mark.parametrize(
    "override", ["trainer=-1", "logger=1.5", "~trainer=1", "trainer=[1,2]"]
)
def test_config_group_given_a_number_is_one_line(override):
    # Hydra raises a bare ValueError for these (found by the full fuzz run)
    check_command_line("class2d", [override])


@pytest.mark.parametrize("job", list(JOBS))
def test_fuzz_command_lines(job):
    given(command_lines(job))(FAST_CONFIGS(lambda o: check_command_line(job, o)))()


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_fuzz_command_lines_full(job):
    given(command_lines(job))(FULL(lambda o: check_command_line(job, o)))()
