"""Fuzzing the local-symmetry operator files (STAR and DM text), the mask lists and
``cryoavg localsym apply``: one InputError line, never a traceback or a partial map."""

import pytest
from hypothesis import given
from omegaconf import OmegaConf

from cryoavg.cli.localsym import run_localsym
from cryoavg.localsym.io import (
    read_dm_text,
    read_mask_list,
    read_operator_star,
)
from tests.conftest import compose_job

from ._data import map_bytes
from ._fuzz import (
    FAST,
    FULL,
    accepts_or_input_error,
    cli_answer,
    count,
    scratch_dir,
    scratch_file,
)
from ._mutate import malformed

OPERATOR_STAR = """
# version 50001

data_

loop_
_rlnMaskName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
_rlnOriginZAngst #7
mask_a.mrc 10.000000 20.000000 30.000000 1.000000 -2.000000 0.500000
mask_a.mrc -40.000000 50.000000 60.000000 0.000000 0.000000 0.000000
mask_b.mrc 90.000000 90.000000 0.000000 3.000000 0.000000 -1.000000
"""

MASK_LIST = """
data_

loop_
_rlnMaskName #1
_rlnAreaId #2
mask_a.mrc 1
mask_b.mrc 1
mask_c.mrc 2
mask_d.mrc 2
"""

DM_TEXT = """MASKFILENAME mask_a.mrc
 ROTA EULER 10.0 20.0 30.0
       TRAN 1.0 -2.0 0.5
 ROTA POLAR 45.0 30.0 72.0
       TRAN 0.0 0.0 0.0
MASKFILENAME mask_b.mrc
 ROTA MATRIX 0 -1 0
   1 0 0
   0 0 1
       TRAN 1 2 3
 OMAT
   1 0 0
   0 0 -1
   0 1 0
   4 5 6
"""

OPERATORS = malformed(OPERATOR_STAR)
MASK_LISTS = malformed(MASK_LIST)
DM_FILES = malformed(DM_TEXT)


def _operators_are_usable(groups) -> None:
    assert groups
    for group in groups:
        assert group.operators
        for operator in group.operators:
            assert all(v == v for v in operator.angles_degrees)  # no NaN
            assert all(abs(v) < float("inf") for v in operator.translation_angstrom)


def check_operator_star(content: bytes) -> None:
    count("operator_star")
    groups = accepts_or_input_error(
        read_operator_star, scratch_file("ops.star", content)
    )
    if groups is not None:
        _operators_are_usable(groups)


def check_dm_text(content: bytes) -> None:
    count("dm_text")
    groups = accepts_or_input_error(read_dm_text, scratch_file("ops.txt", content))
    if groups is not None:
        _operators_are_usable(groups)


def check_mask_list(content: bytes) -> None:
    count("mask_list")
    areas = accepts_or_input_error(read_mask_list, scratch_file("masks.star", content))
    if areas is not None:
        assert areas
        for area in areas:
            assert area.area_id >= 1
            assert len(area.mask_names) >= 2


_CFG = None


def check_apply_cli(content: bytes, name: str) -> None:
    """``localsym apply`` with a damaged operator file: one line, no output map."""
    global _CFG
    count("localsym_cli")
    if _CFG is None:
        _CFG = compose_job("localsym", ["function=apply"])
    map_path = scratch_file("localsym_map.mrc", map_bytes())
    ops = scratch_file(name, content)
    out = scratch_dir() / "localsym_out.mrc"
    cfg = OmegaConf.merge(
        _CFG, {"i_map": str(map_path), "i_mask_info": str(ops), "o_map": str(out)}
    )
    status, line = cli_answer(run_localsym, cfg)
    # the masks named in the files do not exist: a file that parses still stops there
    assert status == 2, line
    assert not out.exists()


def test_templates_are_valid():
    assert len(read_operator_star(scratch_file("t.star", OPERATOR_STAR.encode()))) == 2
    assert len(read_dm_text(scratch_file("t.txt", DM_TEXT.encode()))) == 2
    assert len(read_mask_list(scratch_file("m.star", MASK_LIST.encode()))) == 2


@FAST
@given(OPERATORS)
def test_fuzz_operator_star(content):
    check_operator_star(content)


@FAST
@given(DM_FILES)
def test_fuzz_dm_text(content):
    check_dm_text(content)


@FAST
@given(MASK_LISTS)
def test_fuzz_mask_list(content):
    check_mask_list(content)


@FAST
@given(OPERATORS)
def test_fuzz_localsym_apply_command_line(content):
    check_apply_cli(content, "cli_ops.star")


@pytest.mark.slow
@FULL
@given(OPERATORS)
def test_fuzz_operator_star_full(content):
    check_operator_star(content)


@pytest.mark.slow
@FULL
@given(DM_FILES)
def test_fuzz_dm_text_full(content):
    check_dm_text(content)


@pytest.mark.slow
@FULL
@given(MASK_LISTS)
def test_fuzz_mask_list_full(content):
    check_mask_list(content)


@pytest.mark.slow
@FULL
@given(DM_FILES)
def test_fuzz_localsym_apply_command_line_full(content):
    check_apply_cli(content, "cli_ops.txt")
