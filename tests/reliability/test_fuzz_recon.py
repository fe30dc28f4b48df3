"""Fuzzing ``cryoavg reconstruct`` and ``cryoavg refine3d`` through :func:`run_job`.

Damaged particle STAR files with poses (RELION 3.1 and 3.0: angles, origins in Å or
pixels, CTF and optics values, half sets), damaged or mismatched particle stacks,
damaged or mismatched ``reference=`` maps (box, pixel size, NaN, truncation, mode),
damaged local-symmetry operator files (STAR and DM text) and bad command lines must each
end in a normal run with complete outputs or in one ``error:`` line (exit status 2) with
no job directory left: never a traceback, a hang or a partial output. The inputs are
tiny (six 16 px particles, 16³ maps, one refinement iteration), so one input takes
about 0.1 s.
"""

import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from cryoavg.cli.reconstruct import run_reconstruct
from cryoavg.cli.refine3d import run_refine3d
from cryoavg.errors import InputError
from cryoavg.io.mrc import read_map_3d, read_mrc, write_mrc
from cryoavg.io.star import read_star
from cryoavg.io.validate import validate_particles
from tests.conftest import compose_job

from ._data import (
    BOX,
    PIXEL,
    operator_dm_text,
    operator_star_text,
    posed_particles_star_text,
    reference_path,
    reference_volume,
    stack_bytes,
)
from ._fuzz import (
    FAST_JOB,
    FULL,
    answer_job,
    cli_answer,
    count,
    overrides_answer,
    scratch_dir,
    scratch_file,
    torch_threads,
)
from ._mutate import malformed, overrides_of, quiet, wrong_mrc
from .test_fuzz_mrc import damaged_mrc


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


# ---------------------------------------------------------------- inputs

STARS = st.one_of(
    malformed(quiet(posed_particles_star_text("3.1"))),
    malformed(quiet(posed_particles_star_text("3.0"))),
)


@cache
def _stack_images() -> np.ndarray:
    return read_mrc(scratch_file("recon_template.mrcs", stack_bytes()))[0]


STACKS = st.one_of(
    damaged_mrc(quiet(stack_bytes())),
    wrong_mrc(_stack_images, PIXEL, is_stack=True),
    wrong_mrc(_stack_images, PIXEL, is_stack=True),
    st.binary(max_size=1024),
)
#: a damaged STAR file (valid stack) or a damaged stack (valid STAR file)
PARTICLES = st.one_of(
    st.tuples(st.just("star"), STARS), st.tuples(st.just("stack"), STACKS)
)
MAPS = st.one_of(
    damaged_mrc(quiet(reference_path().read_bytes())),
    wrong_mrc(reference_volume, PIXEL, is_stack=False),
    wrong_mrc(reference_volume, PIXEL, is_stack=False),
    st.binary(max_size=1024),
)
OPERATORS = st.one_of(
    st.tuples(st.just("ops.star"), malformed(quiet(operator_star_text()))),
    st.tuples(st.just("ops.star"), malformed(quiet(operator_star_text(geometry=True)))),
    st.tuples(st.just("ops.txt"), malformed(quiet(operator_dm_text()))),
)


def particles_file(kind: str, content: bytes) -> Path:
    """Write the damaged input; the STAR file the job reads."""
    if kind == "star":
        return scratch_file("recon_particles.star", content)
    stack = scratch_file("recon_stack.mrcs", content)
    text = posed_particles_star_text("3.1", stack=stack)
    return scratch_file("recon_stack_particles.star", text.encode())


def valid_particles() -> Path:
    return scratch_file("recon_valid.star", posed_particles_star_text("3.1").encode())


# ---------------------------------------------------------------- the jobs

REFINE_FAST = [
    "iterations=1",
    "angular_step=30",
    "min_angular_step=30",
    "offset_range=1",
    "initial_lowpass=10",
    "logger=none",
]


@cache
def _base(job: str):
    return compose_job(job, REFINE_FAST if job == "refine3d" else [])


def _maps_are_complete(directory: Path, names: list[str]) -> None:
    for name in names:
        volume, _ = read_map_3d(directory / name)
        assert volume.shape == (BOX, BOX, BOX), name
        assert np.isfinite(volume).all(), name


def answer_reconstruct(cfg, target: str = "") -> tuple[int, str]:
    """Run ``reconstruct``; a success must leave the complete, readable output."""
    return answer_job(run_reconstruct, cfg, target, _reconstruct_outputs_are_complete)


def _reconstruct_outputs_are_complete(cfg, output: Path) -> None:
    subset = str(cfg.subset)
    maps = {
        "both": [
            "run_half1_class001_unfil.mrc",
            "run_half2_class001_unfil.mrc",
            "run_class001.mrc",
        ],
        "half1": ["run_half1_class001_unfil.mrc"],
        "half2": ["run_half2_class001_unfil.mrc"],
    }[subset]
    _maps_are_complete(output, maps)
    assert read_star(output / "run_data.star")["particles"].shape[0] > 0
    if subset == "both":
        assert "fsc" in read_star(output / "run_fsc.star")


def answer_refine3d(cfg, target: str = "") -> tuple[int, str]:
    """Run ``refine3d``; a success must leave the final files of a finished run."""
    return answer_job(run_refine3d, cfg, target, _refine3d_outputs_are_complete)


def _refine3d_outputs_are_complete(cfg, output: Path) -> None:
    _maps_are_complete(
        output,
        [
            "run_class001.mrc",
            "run_half1_class001_unfil.mrc",
            "run_half2_class001_unfil.mrc",
        ],
    )
    iteration = int(cfg.iterations)
    assert (output / f"run_it{iteration:03d}_optimiser.star").is_file()
    assert read_star(output / "run_data.star")["particles"].shape[0] > 0
    assert read_star(output / "run_model.star")


def _reconstruct_cfg(particles: Path, **keys):
    output = scratch_dir() / "reconstruct" / "Reconstruct" / "job001"
    values = {"particles": str(particles), "output": str(output), **keys}
    return OmegaConf.merge(_base("reconstruct"), values)


def _refine3d_cfg(particles: Path, reference: Path, **keys):
    output = scratch_dir() / "refine3d" / "Refine3D" / "job001"
    values = {
        "particles": str(particles),
        "reference": str(reference),
        "output": str(output),
        **keys,
    }
    return OmegaConf.merge(_base("refine3d"), values)


def check_reconstruct_particles(case: tuple[str, bytes]) -> None:
    count("reconstruct_particles")
    answer_reconstruct(_reconstruct_cfg(particles_file(*case)), "reconstruct_particles")


def check_reconstruct_local_symmetry(case: tuple[str, bytes]) -> None:
    count("reconstruct_local_symmetry")
    name, content = case
    operators = scratch_file(f"recon_{name}", content)
    cfg = _reconstruct_cfg(valid_particles(), local_symmetry=str(operators))
    answer_reconstruct(cfg, "reconstruct_local_symmetry")


def check_refine3d_particles(case: tuple[str, bytes]) -> None:
    count("refine3d_particles")
    cfg = _refine3d_cfg(particles_file(*case), reference_path())
    answer_refine3d(cfg, "refine3d_particles")


def check_refine3d_reference(content: bytes) -> None:
    count("refine3d_reference")
    reference = scratch_file("refine3d_reference.mrc", content)
    answer_refine3d(_refine3d_cfg(valid_particles(), reference), "refine3d_reference")


def check_refine3d_local_symmetry(case: tuple[str, bytes]) -> None:
    count("refine3d_local_symmetry")
    name, content = case
    operators = scratch_file(f"refine3d_{name}", content)
    cfg = _refine3d_cfg(
        valid_particles(), reference_path(), local_symmetry=str(operators)
    )
    answer_refine3d(cfg, "refine3d_local_symmetry")


# ---------------------------------------------------------------- command lines

#: keys whose values change the work only a little: fuzzed with valid input files
CHEAP_KEYS = {
    "reconstruct": [
        "mask_diameter",
        "mask_soft_edge",
        "ctf",
        "tau2_fudge",
        "batch_size",
        "subset",
        "maxres",
        "angpix",
        "min_regularised_shell",
        "seed",
        "device",
        "preread",
    ],
    "refine3d": [
        "tau2_fudge",
        "particle_diameter",
        "algorithm",
        "initial_lowpass",
        "firstiter_cc",
        "adaptive_fraction",
        "grad_stepsize",
        "mu",
        "subset_size",
        "ctf",
        "scale",
        "seed",
        "pixel_size",
        "preread",
        "continue_from",
    ],
}
#: keys that can ask for a lot of work (pad=1e4, iterations=1e6): fuzzed without input
COSTLY_KEYS = {
    "reconstruct": ["pad", "local_symmetry", "output", "particles"],
    "refine3d": [
        "iterations",
        "angular_step",
        "min_angular_step",
        "global_iterations",
        "offset_range",
        "offset_step",
        "max_significant",
        "chunk_size",
        "local_symmetry",
        "reference",
        "project_dir",
        "logger",
    ],
}
EXTRA_VALUES = {
    "device": ["cpu", "cuda", "cuda:7", "meta", "xla", "cpu:1", "mps", "gpu"],
    "subset": ["half1", "half2", "both", "half3", "HALF1"],
    "algorithm": ["em", "vdam", "EM", "sgd"],
}


@st.composite
def command_lines(draw, job: str) -> tuple[bool, list[str]]:
    """``(with_input, overrides)``: cheap keys run on valid input, the others without."""
    with_input = draw(st.booleans())
    keys = CHEAP_KEYS[job] + ([] if with_input else COSTLY_KEYS[job])
    overrides = draw(overrides_of(keys, EXTRA_VALUES))
    return with_input, overrides


def check_command_line(job: str, case: tuple[bool, list[str]]) -> tuple[int, str]:
    count(f"{job}_command_line")
    with_input, overrides = case
    project = scratch_dir() / f"{job}_cli"
    output = (
        project / ("Reconstruct" if job == "reconstruct" else "Refine3D") / "job001"
    )
    if with_input:
        files = [f"particles={valid_particles()}"]
        if job == "refine3d":
            files.append(f"reference={reference_path()}")
    else:  # the input is missing: a valid command line stops there
        files = ["particles=/nonexistent/particles.star"]
        if job == "refine3d":
            files.append("reference=/nonexistent/reference.mrc")
    fixed = REFINE_FAST if job == "refine3d" else []
    args = [*fixed, *files, *overrides, f"output={output}"]
    line = overrides_answer(job, args)
    if line is not None:
        assert not project.exists()
        return 2, line
    cfg = compose_job(job, args)
    answer = answer_reconstruct if job == "reconstruct" else answer_refine3d
    if Path(str(cfg.output)) != output:  # output= fuzzed: the job writes elsewhere
        cfg.output = str(output)
    status, line = answer(cfg, f"{job}_command_line")
    if not with_input:
        assert status == 2, line
    return status, line


def fuzz_command_line(job: str, case: tuple[bool, list[str]]) -> None:
    check_command_line(job, case)  # a test under @given returns None


# ---------------------------------------------------------------- regressions


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "meta", "xla", "mps"])
def test_reconstruct_unusable_device_is_one_line(device):
    # found by fuzzing: torch.device accepted these, and the first tensor moved there
    # raised AssertionError ("Torch not compiled with CUDA") or NotImplementedError
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has the device")
    status, line = answer_reconstruct(
        _reconstruct_cfg(valid_particles(), device=device)
    )
    assert status == 2
    assert "device" in line


@pytest.mark.parametrize("value", ["abc", "inf", "nan"])
def test_operator_file_box_not_a_number_is_one_line(value):
    # found by fuzzing: int(float(nan)) in the box check of the operator STAR file
    # raised ValueError / OverflowError (a traceback)
    text = operator_star_text(geometry=True).replace(f" {BOX} ", f" {value} ")
    operators = scratch_file("recon_geometry.star", text.encode())
    cfg = _reconstruct_cfg(valid_particles(), local_symmetry=str(operators))
    status, line = answer_reconstruct(cfg)
    assert status == 2
    assert "rlnImageSize is not a finite number" in line


def test_huge_finite_images_give_complete_maps():
    # found by fuzzing: images of 1e20 gave a finite map whose float32 header RMS
    # (computed by mrcfile) overflowed: a RuntimeWarning in the middle of write_mrc
    stack = scratch_file("recon_huge.mrcs", b"")
    write_mrc(stack, np.full((6, BOX, BOX), 1e20, np.float32), PIXEL, is_stack=True)
    text = posed_particles_star_text("3.1", stack=stack)
    particles = scratch_file("recon_huge.star", text.encode())
    cfg = _reconstruct_cfg(particles)
    output = Path(cfg.output)
    status, line = cli_answer(run_reconstruct, cfg)
    assert status == 0, line
    volume, _ = read_map_3d(output / "run_class001.mrc")
    assert np.abs(volume).max() > 1e15
    shutil.rmtree(output.parent.parent)


@pytest.mark.parametrize(
    ("job", "override", "key"),
    [
        ("reconstruct", "batch_size=abc", "batch_size"),
        ("reconstruct", "min_regularised_shell=1e999", "min_regularised_shell"),
        ("reconstruct", "mask_soft_edge=[1,2]", "mask_soft_edge"),
        ("refine3d", "tau2_fudge=abc", "tau2_fudge"),
        ("refine3d", "iterations=1e999", "iterations"),
        ("refine3d", "seed=1.5", "seed"),
        ("refine3d", "ctf=yes", "ctf"),
        ("refine3d", "seed=-1", "seed"),  # numpy's default_rng: ValueError
        ("reconstruct", "seed=-1", "seed"),
    ],
)
def test_bad_value_is_one_line(job, override, key):
    # found by fuzzing: int(cfg.batch_size), float(cfg.tau2_fudge) ... raised a bare
    # ValueError / OverflowError / TypeError before the values were type-checked
    status, line = check_command_line(job, (True, [override]))
    assert status == 2
    assert key in line


@pytest.mark.parametrize("job", ["reconstruct", "refine3d"])
@pytest.mark.parametrize(
    ("release", "old", "label"),
    [
        ("3.1", "mic1.mrc", "rlnMicrographName"),
        ("3.0", "mic1.mrc", "rlnMicrographName"),
        ("3.1", "opticsGroup1", "rlnOpticsGroupName"),
    ],
)
def test_nan_in_a_text_column_is_one_line(job, release, old, label):
    # found after the select fuzzing (a particle named "nan"): the STAR reader turns the
    # text "nan" into a missing value; grouping by micrograph raised a bare TypeError,
    # writing run_data.star a ValueError
    text = posed_particles_star_text(release).replace(old, "nan", 1)
    particles = scratch_file("recon_nan_text.star", text.encode())
    with pytest.raises(InputError, match=f"{label} is missing"):
        validate_particles(particles, ctf=True)
    if job == "reconstruct":
        status, line = answer_reconstruct(_reconstruct_cfg(particles))
    else:
        status, line = answer_refine3d(_refine3d_cfg(particles, reference_path()))
    assert status == 2
    assert f"{label} is missing" in line


@pytest.mark.parametrize(
    ("job", "override"),
    [
        ("reconstruct", "particles=-1"),
        ("refine3d", "particles=-1"),
        ("refine3d", "continue_from=-1"),
    ],
)
def test_number_as_a_file_name_is_one_line(job, override):
    # found by fuzzing: a number given as a file name stays an int in the config and
    # read_particles / Path() raised a bare TypeError
    status, line = check_command_line(job, (False, [override]))
    assert status == 2
    assert line.startswith("error: ")


def test_text_in_a_pose_column_is_one_line():
    # found by fuzzing: refine3d converted rlnAngleRot/Tilt/Psi with to_numpy(float)
    # and raised a bare ValueError for "abc"
    lines = posed_particles_star_text("3.1").splitlines()
    row = next(i for i, line in enumerate(lines) if "@" in line)
    words = lines[row].split()
    words[6] = "abc"  # rlnAngleTilt of particle 1
    lines[row] = " ".join(words)
    particles = scratch_file("recon_abc.star", ("\n".join(lines) + "\n").encode())
    status, line = answer_refine3d(_refine3d_cfg(particles, reference_path()))
    assert status == 2
    assert "non-finite particle angles" in line


def test_sub_pixel_soft_edge_is_a_hard_edge():
    # found by fuzzing: mask_soft_edge=1e-300 underflowed to 0 in float32 and the
    # raised-cosine edge divided by it: NaN maps (mrcfile warned while writing them)
    status, line = check_command_line("reconstruct", (True, ["mask_soft_edge=1e-300"]))
    assert status == 0, line  # answer_reconstruct checked that the maps are finite


def test_templates_run():
    assert answer_reconstruct(_reconstruct_cfg(valid_particles()))[0] == 0
    operators = scratch_file("recon_t.star", operator_star_text().encode())
    cfg = _reconstruct_cfg(valid_particles(), local_symmetry=str(operators))
    assert answer_reconstruct(cfg)[0] == 0
    old = scratch_file("recon_t30.star", posed_particles_star_text("3.0").encode())
    assert answer_reconstruct(_reconstruct_cfg(old))[0] == 0
    operators = scratch_file("refine_t.txt", operator_dm_text().encode())
    cfg = _refine3d_cfg(old, reference_path(), local_symmetry=str(operators))
    assert answer_refine3d(cfg)[0] == 0


# ---------------------------------------------------------------- fuzz targets


@FAST_JOB
@given(PARTICLES)
def test_fuzz_reconstruct_particles(case):
    check_reconstruct_particles(case)


@FAST_JOB
@given(OPERATORS)
def test_fuzz_reconstruct_local_symmetry(case):
    check_reconstruct_local_symmetry(case)


@FAST_JOB
@given(PARTICLES)
def test_fuzz_refine3d_particles(case):
    check_refine3d_particles(case)


@FAST_JOB
@given(MAPS)
def test_fuzz_refine3d_reference(content):
    check_refine3d_reference(content)


@FAST_JOB
@given(OPERATORS)
def test_fuzz_refine3d_local_symmetry(case):
    check_refine3d_local_symmetry(case)


@pytest.mark.parametrize("job", ["reconstruct", "refine3d"])
def test_fuzz_command_lines(job):
    given(command_lines(job))(FAST_JOB(lambda case: fuzz_command_line(job, case)))()


@pytest.mark.slow
@FULL
@given(PARTICLES)
def test_fuzz_reconstruct_particles_full(case):
    check_reconstruct_particles(case)


@pytest.mark.slow
@FULL
@given(OPERATORS)
def test_fuzz_reconstruct_local_symmetry_full(case):
    check_reconstruct_local_symmetry(case)


@pytest.mark.slow
@FULL
@given(PARTICLES)
def test_fuzz_refine3d_particles_full(case):
    check_refine3d_particles(case)


@pytest.mark.slow
@FULL
@given(MAPS)
def test_fuzz_refine3d_reference_full(content):
    check_refine3d_reference(content)


@pytest.mark.slow
@FULL
@given(OPERATORS)
def test_fuzz_refine3d_local_symmetry_full(case):
    check_refine3d_local_symmetry(case)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["reconstruct", "refine3d"])
def test_fuzz_command_lines_full(job):
    given(command_lines(job))(FULL(lambda case: fuzz_command_line(job, case)))()
