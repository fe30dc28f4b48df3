"""Fuzzing the MRC reader (headers, modes, sizes, truncation) and the simulate CLI.

Damaged headers (absurd or negative dimensions, unknown or complex modes, extended
header sizes, byte order stamps, missing MAP id), truncated and padded files and random
bytes must each be answered by a :class:`~cryoavg.errors.InputError` (one line), or read
consistently with the header; at the command line by one ``error:`` line.
"""

import shutil
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from cryoavg.cli.simulate import run_simulate
from cryoavg.io.mrc import (
    open_stack,
    read_image_stack,
    read_map_3d,
    read_mrc,
    read_mrc_header,
)
from cryoavg.io.stack import ImageSource
from tests.conftest import compose_job

from ._data import map_bytes, stack_bytes
from ._fuzz import (
    FAST,
    FULL,
    accepts_or_input_error,
    cli_answer,
    count,
    scratch_dir,
    scratch_file,
)

#: (byte offset, struct format) of the header words worth damaging
FIELDS = {
    "nx": (0, "<i"),
    "ny": (4, "<i"),
    "nz": (8, "<i"),
    "mode": (12, "<i"),
    "mx": (28, "<i"),
    "my": (32, "<i"),
    "mz": (36, "<i"),
    "cella_x": (40, "<f"),
    "mapc": (64, "<i"),
    "ispg": (88, "<i"),
    "nsymbt": (92, "<i"),
    "nversion": (108, "<i"),
}
INTERESTING_INTS = [
    0,
    1,
    -1,
    2,
    3,
    4,
    5,
    6,
    12,
    101,
    401,
    2**15,
    2**31 - 1,
    -(2**31),
    1024,
    16,
    8,
]


@st.composite
def damaged_mrc(draw, template: bytes) -> bytes:
    data = bytearray(template)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(FIELDS)))
        offset, form = FIELDS[name]
        if form == "<i":
            value = draw(
                st.sampled_from(INTERESTING_INTS) | st.integers(-(2**31), 2**31 - 1)
            )
        else:
            value = draw(st.floats(width=32, allow_nan=True, allow_infinity=True))
        struct.pack_into(form, data, offset, value)
    if draw(st.booleans()):
        data[208:212] = draw(st.sampled_from([b"MAP ", b"\0\0\0\0", b"XXXX"]))
    if draw(st.booleans()):
        data[212:216] = draw(
            st.sampled_from(
                [b"DA\0\0", b"\x11\x11\0\0", b"\0\0\0\0", b"\xff\xff\xff\xff"]
            )
        )
    tail = draw(st.sampled_from(["none", "cut", "pad", "splice"]))
    if tail == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif tail == "pad":
        data += draw(st.binary(min_size=1, max_size=2048))
    elif tail == "splice":
        at = draw(st.integers(0, len(data)))
        junk = draw(st.binary(min_size=1, max_size=64))
        data[at : at + len(junk)] = junk
    return bytes(data)


def _files(template: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        damaged_mrc(template),
        damaged_mrc(template),
        st.binary(max_size=2048),
        st.just(b""),
        st.just(b"\0" * 1024),
    )


STACKS = _files(stack_bytes())
MAPS = _files(map_bytes())


def check_mrc_readers(content: bytes) -> None:
    count("mrc")
    path = scratch_file("fuzz.mrcs", content)
    header = accepts_or_input_error(read_mrc_header, path)
    results = [
        accepts_or_input_error(read_mrc, path),
        accepts_or_input_error(read_image_stack, path),
        accepts_or_input_error(read_map_3d, path),
    ]
    stack = accepts_or_input_error(open_stack, path)
    source = accepts_or_input_error(ImageSource.from_stack, path)
    if header is None:  # a bad header: every reader refuses the file
        assert all(r is None for r in results)
        assert stack is None
        assert source is None
        return
    assert stack is not None
    assert stack.shape == (header.nz, header.ny, header.nx)
    data, _ = results[1] if results[1] is not None else (None, None)
    if data is not None:
        assert data.shape == stack.shape
        assert data.dtype == np.float32
    if source is not None and len(source):
        accepts_or_input_error(source.__getitem__, 0)  # NaN/Inf images: InputError


_CFG = None


def check_simulate_cli(content: bytes) -> None:
    global _CFG
    count("simulate_cli")
    if _CFG is None:
        _CFG = compose_job(
            "simulate", ["n_particles=4", "box=16", "particles_per_micrograph=[2,4]"]
        )
    path = scratch_file("fuzz_map.mrc", content)
    project = scratch_dir() / "simulate"
    output = project / "Simulate" / "job001"
    cfg = OmegaConf.merge(_CFG, {"map": str(path), "output": str(output)})
    status, line = cli_answer(run_simulate, cfg)
    if status == 2:
        assert not project.exists(), line
    else:  # a map that is still valid: the complete output
        assert (output / "particles.star").is_file()
        shutil.rmtree(project)


def test_templates_are_valid():
    path = scratch_file("template.mrcs", stack_bytes())
    assert read_mrc_header(path).nz == 6
    path = scratch_file("template_map.mrc", map_bytes())
    assert read_map_3d(path)[0].shape == (8, 8, 8)


@pytest.mark.parametrize("cell_angstrom", [1.7e38, 4e5, float("inf")])
def test_simulate_refuses_an_absurd_header_pixel_size(cell_angstrom):
    # found by the full fuzz run: a 1.7e38 Å cell (2e37 Å/px) overflowed the cell size
    # of the output stack (a numpy warning deep in mrcfile, not an error line)
    content = bytearray(map_bytes())
    content[40:52] = struct.pack("<3f", *[cell_angstrom] * 3)  # cella = 8 · pixel
    check_simulate_cli(bytes(content))


@FAST
@given(STACKS)
def test_fuzz_mrc_stack_readers(content):
    check_mrc_readers(content)


@FAST
@given(MAPS)
def test_fuzz_simulate_command_line(content):
    check_simulate_cli(content)


@pytest.mark.slow
@FULL
@given(STACKS)
def test_fuzz_mrc_stack_readers_full(content):
    check_mrc_readers(content)


@pytest.mark.slow
@FULL
@given(MAPS)
def test_fuzz_mrc_map_readers_full(content):
    check_mrc_readers(content)


@pytest.mark.slow
@FULL
@given(MAPS)
def test_fuzz_simulate_command_line_full(content):
    check_simulate_cli(content)
