"""Fuzzing ``cryoavg select`` through :func:`run_job`.

The inputs are a RELION 4.0 Class2D iteration (project-relative names, ``# version
30001``) and one written by cryoavg (absolute names), both of four 16 px classes and 52
particles. Damaged ``_optimiser.star``, ``_model.star`` and ``_data.star`` files,
damaged or mismatched class-average stacks (``class_stack=`` alone with ``angpix``, or
replacing the model's images) and bad command lines (``classes=[...]``, ``min_score``,
``regroup`` ...) must each end in a normal run with complete outputs, or in one
``error:`` line (exit status 2) with no job directory: never a traceback, a hang or a
partial output. One input takes about 0.1 s (the class ranker runs on every success).
"""

import struct
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from cryoavg.cli.select import run_select
from cryoavg.errors import InputError
from cryoavg.io.mrc import read_mrc
from cryoavg.io.star import read_star, write_star
from tests.conftest import compose_job

from ._data import CLASS_COUNTS, CLASS_PIXEL, cryoavg_class2d, relion_class2d
from ._fuzz import (
    FAST_JOB,
    FULL,
    answer_job,
    count,
    overrides_answer,
    scratch_dir,
    scratch_file,
    torch_threads,
)
from ._mutate import malformed, overrides_of, quiet, wrong_mrc
from .test_fuzz_mrc import damaged_mrc

K = len(CLASS_COUNTS)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


# ---------------------------------------------------------------- the valid inputs


def relion_files() -> dict[str, Path]:
    root = relion_class2d() / "Class2D" / "job003"
    return {
        kind: root / f"run_it025_{kind}.{'mrcs' if kind == 'classes' else 'star'}"
        for kind in ("optimiser", "model", "data", "classes")
    }


def cryoavg_files() -> dict[str, Path]:
    optimiser = cryoavg_class2d()
    stem = str(optimiser).removesuffix("_optimiser.star")
    return {
        "optimiser": optimiser,
        "model": Path(f"{stem}_model.star"),
        "data": Path(f"{stem}_data.star"),
        "classes": Path(f"{stem}_classes.mrcs"),
    }


FLAVOURS = {"relion": relion_files, "cryoavg": cryoavg_files}


def _text(flavour: str, kind: str) -> str:
    return FLAVOURS[flavour]()[kind].read_text()


def _star_files(kind: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """``(flavour, damaged file)`` for both flavours of one kind of STAR file."""
    return st.one_of(
        *(
            st.tuples(st.just(flavour), malformed(quiet(_text(flavour, kind))))
            for flavour in FLAVOURS
        )
    )


@cache
def _class_images() -> np.ndarray:
    return read_mrc(relion_files()["classes"])[0]


OPTIMISERS = _star_files("optimiser")
MODELS = _star_files("model")
DATA = _star_files("data")
STACKS = st.tuples(
    st.sampled_from(["bare", "bare_header_pixel", "relion", "cryoavg"]),
    st.one_of(
        damaged_mrc(quiet(relion_files()["classes"].read_bytes())),
        wrong_mrc(_class_images, CLASS_PIXEL, is_stack=True),
        wrong_mrc(_class_images, CLASS_PIXEL, is_stack=True),
        st.binary(max_size=1024),
    ),
)

# ---------------------------------------------------------------- the job


@cache
def _base():
    return compose_job("select", ["min_score=0", "gallery=false"])


def _output() -> Path:
    return scratch_dir() / "select" / "Select" / "job001"


def answer(cfg, target: str) -> tuple[int, str]:
    """Run ``select``; a success must leave the complete, readable output."""
    return answer_job(run_select, cfg, target, _outputs_are_complete)


def _outputs_are_complete(cfg, output: Path) -> None:
    bare = not (cfg.optimiser or cfg.model)
    backup = read_star(output / "backup_selection.star")[""]
    assert set(backup["rlnSelected"].tolist()) <= {0, 1}
    if bare:
        scores = read_star(output / "class_scores.star")[""]
        assert scores.shape[0] == backup.shape[0]
    else:
        # the particle block keeps the input's name (data_particles, or RELION 3.0's)
        blocks = read_star(output / "particles.star")
        particles = [table for name, table in blocks.items() if name != "optics"]
        assert len(particles) == 1
        assert 0 < particles[0].shape[0] <= sum(CLASS_COUNTS)
        rank = read_star(output / "rank_model.star")["model_classes"]
        assert rank.shape[0] == backup.shape[0]
        assert np.isfinite(rank["rlnClassScore"].to_numpy(np.float64)).all()
        assert (output / "rank_optimiser.star").is_file()
    features = np.load(output / "features.npy")
    assert np.isfinite(features).all()
    assert np.load(output / "images.npy").shape[1:] == (64, 64)
    if bool(cfg.gallery):
        assert (output / "selection_gallery.png").stat().st_size > 0
        assert "</html>" in (output / "selection.html").read_text()


def _cfg(**keys):
    values = {"output": str(_output()), **keys}
    return OmegaConf.merge(_base(), values)


def check_optimiser(case: tuple[str, bytes]) -> None:
    count("select_optimiser")
    _, content = case
    optimiser = scratch_file("select_optimiser.star", content)
    cfg = _cfg(optimiser=str(optimiser), project_dir=str(relion_class2d()))
    answer(cfg, "select_optimiser")


def check_model(case: tuple[str, bytes]) -> None:
    count("select_model")
    flavour, content = case
    model = scratch_file("select_model.star", content)
    data = FLAVOURS[flavour]()["data"]
    cfg = _cfg(model=str(model), data=str(data), project_dir=str(relion_class2d()))
    answer(cfg, "select_model")


def check_data(case: tuple[str, bytes]) -> None:
    count("select_data")
    flavour, content = case
    data = scratch_file("select_data.star", content)
    model = FLAVOURS[flavour]()["model"]
    cfg = _cfg(model=str(model), data=str(data), project_dir=str(relion_class2d()))
    answer(cfg, "select_data")


def check_class_stack(case: tuple[str, bytes]) -> None:
    """A bare stack (``angpix`` given, or the header's), or one replacing a model's."""
    count("select_class_stack")
    use, content = case
    stack = scratch_file("select_classes.mrcs", content)
    if use.startswith("bare"):
        angpix = None if use == "bare_header_pixel" else CLASS_PIXEL
        cfg = _cfg(class_stack=str(stack), angpix=angpix)
    else:
        cfg = _cfg(
            optimiser=str(FLAVOURS[use]()["optimiser"]),
            project_dir=str(relion_class2d()),
            class_stack=str(stack),
        )
    answer(cfg, "select_class_stack")


# ---------------------------------------------------------------- command lines

KEYS = [
    "classes",
    "min_score",
    "max_score",
    "min_particles",
    "min_classes",
    "min_class_particles",
    "max_resolution",
    "regroup",
    "gallery",
    "angpix",
    "particle_diameter",
    "project_dir",
    "optimiser",
    "model",
    "data",
    "class_stack",
]
EXTRA_VALUES = {
    "classes": [
        "[1,4,7]",
        "[1,2]",
        "[2]",
        "[4]",
        "[0]",
        "[-1]",
        "[99]",
        "[1,1]",
        "[1.5]",
        "[1e999]",
        "[nan]",
        "[true]",
        "['a']",
        "[[1]]",
        "[]",
        "3",
    ],
    "regroup": ["1", "2", "3", "52", "1000", "0"],
    "min_score": ["0", "0.5", "0.99", "1", "-0.1", "null"],
    "max_score": ["0", "0.5", "999", "-1"],
    "min_particles": ["10", "40", "1000"],
    "min_classes": ["1", "2", "4", "5"],
    "min_class_particles": ["12", "21"],
    "max_resolution": ["10", "18", "20"],
}


@st.composite
def command_lines(draw) -> tuple[str, list[str]]:
    """``(input, overrides)``: the overrides act on valid RELION, cryoavg or bare input."""
    use = draw(st.sampled_from(["relion", "cryoavg", "bare"]))
    return use, draw(overrides_of(KEYS, EXTRA_VALUES))


def check_command_line(case: tuple[str, list[str]]) -> tuple[int, str]:
    count("select_command_line")
    use, overrides = case
    if use == "bare":
        files = [f"class_stack={relion_files()['classes']}", f"angpix={CLASS_PIXEL}"]
    else:
        files = [
            f"optimiser={FLAVOURS[use]()['optimiser']}",
            f"project_dir={relion_class2d()}",
        ]
    output = _output()
    args = ["min_score=0", "gallery=false", *files, *overrides, f"output={output}"]
    line = overrides_answer("select", args)
    if line is not None:
        assert not output.parent.parent.exists()
        return 2, line
    return answer(compose_job("select", args), "select_command_line")


# ---------------------------------------------------------------- regressions


@pytest.mark.parametrize(
    "override",
    [
        "regroup=abc",
        "min_classes=1.5",
        "max_score=[1,2]",
        "gallery=maybe",
        "angpix=x",
        "classes=1e999",
        "classes=[2,1e999]",
        "classes=[1.5]",
        "classes=[true]",
    ],
)
def test_bad_value_is_one_line(override):
    # found by fuzzing: int(cfg.regroup), float(cfg.max_score) ... raised a bare
    # ValueError / TypeError (a traceback) before the values were type-checked;
    # classes=1e999 an OverflowError (classes=[1.5] was silently class 1)
    status, line = check_command_line(("relion", [override]))
    assert status == 2
    assert override.split("=")[0] in line


def _stack_case(content: bytes, angpix: float | None = CLASS_PIXEL) -> tuple[int, str]:
    stack = scratch_file("select_regression.mrcs", content)
    return answer(_cfg(class_stack=str(stack), angpix=angpix), "regression")


def test_volume_stack_header_that_does_not_divide_is_one_line():
    # found by fuzzing: nz = 3 sections with mz = 2 and space group 401 (a volume
    # stack): mrcfile maps whole volumes only and the reshape to (nz, ny, nx) raised
    # a bare ValueError (cryoavg.io.mrc._mmap_sections)
    content = bytearray(relion_files()["classes"].read_bytes())
    struct.pack_into("<i", content, 8, 3)  # nz (the file holds 4 sections)
    struct.pack_into("<i", content, 36, 2)  # mz
    struct.pack_into("<i", content, 88, 401)  # ispg: volume stack
    status, line = _stack_case(bytes(content))
    assert status == 2
    assert "invalid MRC header" in line


@pytest.mark.parametrize(
    ("angpix", "diameter", "fragment"),
    [
        (1e-6, None, "particle diameter"),  # (16 - 5) px of 1e-6 Å: a sub-pixel disc
        (CLASS_PIXEL, 1e-300, "particle diameter"),
        (1e6, None, "wide"),  # 16e6 Å at 4 Å/px: 4e6² pixels per class
        (CLASS_PIXEL, 1e9, "times the box"),  # a CNN window of 1.4e8² pixels
    ],
)
def test_class_geometry_that_cannot_be_ranked_is_one_line(angpix, diameter, fragment):
    # found by fuzzing: a disc of at most one pixel at 4 Å/px made torch warn
    # (std with no degrees of freedom) and gave NaN features; absurd pixel sizes or
    # diameters asked for gigabytes (an allocation error, or the OOM killer)
    cfg = _cfg(
        class_stack=str(relion_files()["classes"]),
        angpix=angpix,
        particle_diameter=diameter,
    )
    status, line = answer(cfg, "regression")
    assert status == 2
    assert fragment in line


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("label", ["rlnImageName", "rlnMicrographName"])
def test_nan_in_a_text_column_is_one_line(flavour, label):
    # found by fuzzing: a particle named "nan" (read as a missing value) passed every
    # check and made the STAR writer raise ValueError inside the job directory
    data = read_star(FLAVOURS[flavour]()["data"])
    data["particles"].loc[1, label] = "nan"
    path = scratch_dir() / "select_nan.star"
    write_star(path, data)
    cfg = _cfg(
        model=str(FLAVOURS[flavour]()["model"]),
        data=str(path),
        project_dir=str(relion_class2d()),
    )
    status, line = answer(cfg, "regression")
    assert status == 2
    assert f"{label} in data_particles row 2 is missing" in line


@pytest.mark.parametrize("value", ["1e300", "-1e300"])
def test_absurd_class_number_is_one_line(value):
    # found by fuzzing: a finite rlnClassNumber beyond int64 made the cast to int64
    # warn (RuntimeWarning "invalid value encountered in cast") and gave garbage
    data = read_star(relion_files()["data"])
    data["particles"]["rlnClassNumber"] = data["particles"]["rlnClassNumber"].astype(
        object
    )
    data["particles"].loc[3, "rlnClassNumber"] = value
    path = scratch_dir() / "select_class_number.star"
    write_star(path, data)
    cfg = _cfg(
        model=str(relion_files()["model"]),
        data=str(path),
        project_dir=str(relion_class2d()),
    )
    status, line = answer(cfg, "regression")
    assert status == 2
    assert "rlnClassNumber has absurdly large values" in line


def test_particles_read_into_data_optics_is_one_line():
    # found by fuzzing: a duplicated "data_optics" line before data_particles gave the
    # particle loop to a second optics block; select wrote particles.star with only a
    # data_optics block holding the particles (read_star now refuses duplicated blocks)
    text = _text("relion", "data").replace(
        "\n# version 30001\n\ndata_particles",
        "data_optics\n# version 30001\n\ndata_particles",
        1,
    )
    path = scratch_file("select_two_optics.star", text.encode())
    cfg = _cfg(
        model=str(relion_files()["model"]),
        data=str(path),
        project_dir=str(relion_class2d()),
    )
    status, line = answer(cfg, "regression")
    assert status == 2
    assert "data_optics appears twice" in line


def test_a_failed_star_read_leaves_no_stale_lines():
    # found by the select fuzzing (only ~0.3 % of the damaged optimiser / model files
    # ran): starfile reads lines through linecache and clears it only after a parse
    # that succeeds, so after one malformed file every later read of the same path saw
    # the old lines and failed the same way (cryoavg.io.star.read_star now clears it)
    text = _text("relion", "model")
    path = scratch_dir() / "select_stale.star"
    broken = text.replace("_rlnClassDistribution #2 \n", "", 1)
    path.write_text(broken)
    with pytest.raises(InputError, match="not a readable STAR file"):
        read_star(path)
    path.write_text(text)
    assert read_star(path)["model_classes"].shape[0] == K


def test_templates_run():
    for flavour in FLAVOURS:
        files = FLAVOURS[flavour]()
        cfg = _cfg(optimiser=str(files["optimiser"]), project_dir=str(relion_class2d()))
        assert answer(cfg, "template")[0] == 0
        cfg = _cfg(
            model=str(files["model"]),
            data=str(files["data"]),
            project_dir=str(relion_class2d()),
            regroup=2,
            gallery=True,
        )
        assert answer(cfg, "template")[0] == 0
    cfg = _cfg(class_stack=str(relion_files()["classes"]))
    assert answer(cfg, "template")[0] == 0


# ---------------------------------------------------------------- fuzz targets


@FAST_JOB
@given(OPTIMISERS)
def test_fuzz_select_optimiser(case):
    check_optimiser(case)


@FAST_JOB
@given(MODELS)
def test_fuzz_select_model(case):
    check_model(case)


@FAST_JOB
@given(DATA)
def test_fuzz_select_data(case):
    check_data(case)


@FAST_JOB
@given(STACKS)
def test_fuzz_select_class_stack(case):
    check_class_stack(case)


@FAST_JOB
@given(command_lines())
def test_fuzz_select_command_line(case):
    check_command_line(case)


@pytest.mark.slow
@FULL
@given(OPTIMISERS)
def test_fuzz_select_optimiser_full(case):
    check_optimiser(case)


@pytest.mark.slow
@FULL
@given(MODELS)
def test_fuzz_select_model_full(case):
    check_model(case)


@pytest.mark.slow
@FULL
@given(DATA)
def test_fuzz_select_data_full(case):
    check_data(case)


@pytest.mark.slow
@FULL
@given(STACKS)
def test_fuzz_select_class_stack_full(case):
    check_class_stack(case)


@pytest.mark.slow
@FULL
@given(command_lines())
def test_fuzz_select_command_line_full(case):
    check_command_line(case)
