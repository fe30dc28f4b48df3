"""Fuzzing the STAR reader, the particle table, the door validation and the class2d CLI.

Every damaged or random file must be answered by a :class:`~cryoavg.errors.CryoavgError`
(one line), or read consistently; at the command line by one ``error:`` line, exit
status 2 and no job directory. Never a traceback, a hang or a partial output.
"""

import pandas as pd
import pytest
from hypothesis import given
from omegaconf import OmegaConf

from cryoavg.cli.class2d import run_class2d
from cryoavg.io.particles import read_particles
from cryoavg.io.stack import ImageSource
from cryoavg.io.star import read_star
from cryoavg.io.validate import validate_particles
from tests.conftest import compose_job

from ._data import particles_star_text
from ._fuzz import (
    FAST,
    FULL,
    accepts_or_input_error,
    cli_answer,
    count,
    no_partial_output,
    scratch_dir,
    scratch_file,
)
from ._mutate import malformed

TEMPLATE = particles_star_text()
STAR_FILES = malformed(TEMPLATE)


def check_star_reader(content: bytes) -> None:
    count("star")
    path = scratch_file("fuzz.star", content)
    blocks = accepts_or_input_error(read_star, path)
    if blocks is None:
        return
    assert isinstance(blocks, dict)
    assert blocks
    for block in blocks.values():
        assert isinstance(block, pd.DataFrame | dict)


def check_particles(content: bytes) -> None:
    """read_particles, the image source and the door validation agree on bad input."""
    count("particles")
    path = scratch_file("fuzz_particles.star", content)
    table = accepts_or_input_error(read_particles, path)
    door = accepts_or_input_error(validate_particles, path, ctf=True)
    if table is not None:
        source = accepts_or_input_error(ImageSource.from_table, table)
        if source is not None and door is not None:
            images = source[: min(2, len(source))]
            assert images.shape[-1] == source.box_size


_CFG = None


def check_class2d_cli(content: bytes) -> None:
    """At the command line: one error line (exit 2) and no job directory."""
    global _CFG
    count("class2d_cli")
    if _CFG is None:
        _CFG = compose_job(
            "class2d",
            ["logger=none", "trainer.enable_progress_bar=false", "classes=1000"],
        )
    path = scratch_file("fuzz_cli.star", content)
    output = scratch_dir() / "cli" / "Class2D" / "job001"
    cfg = OmegaConf.merge(_CFG, {"particles": str(path), "output": str(output)})
    # classes=1000 > particles: a file that passes every check still stops before work
    status, line = cli_answer(run_class2d, cfg)
    assert status == 2, line
    no_partial_output(output.parent.parent)


def test_template_is_valid():
    path = scratch_file("template.star", TEMPLATE.encode())
    validate_particles(path, ctf=True)
    assert read_particles(path).n_particles == 6


@FAST
@given(STAR_FILES)
def test_fuzz_star_reader(content):
    check_star_reader(content)


@FAST
@given(STAR_FILES)
def test_fuzz_particles_and_door_validation(content):
    check_particles(content)


@FAST
@given(STAR_FILES)
def test_fuzz_class2d_command_line(content):
    check_class2d_cli(content)


@pytest.mark.slow
@FULL
@given(STAR_FILES)
def test_fuzz_star_reader_full(content):
    check_star_reader(content)


@pytest.mark.slow
@FULL
@given(STAR_FILES)
def test_fuzz_particles_and_door_validation_full(content):
    check_particles(content)


@pytest.mark.slow
@FULL
@given(STAR_FILES)
def test_fuzz_class2d_command_line_full(content):
    check_class2d_cli(content)
