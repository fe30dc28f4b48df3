"""Hypothesis strategies that damage valid text files (STAR, DM text) line by line."""

from hypothesis import strategies as st

JUNK_TOKENS = [
    "nan",
    "inf",
    "-inf",
    "1e400",
    "-1e400",
    "abc",
    '"',
    "'",
    "",
    "@",
    "0@",
    "-3@x.mrcs",
    "1@",
    "999999999999999999999",
    "0x1F",
    "1,5",
    "--",
    "_rlnImageName",
    "loop_",
    "data_",
    "data_particles",
    "data_optics",
    "#",
    "\x00",
    "\ufffd",
    "é",
    "1e-400",
    "-0",
    "True",
]

_line_ops = st.sampled_from(
    ["delete", "duplicate", "junk_token", "insert_line", "swap", "truncate_line"]
)


@st.composite
def damaged_text(draw, template: str) -> bytes:
    """A valid file damaged by 1-4 line edits, then optionally cut or laced with bytes."""
    lines = template.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        op = draw(_line_ops)
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "junk_token":
            words = lines[i].split() or [""]
            j = draw(st.integers(0, len(words) - 1))
            words[j] = draw(st.sampled_from(JUNK_TOKENS) | st.text(max_size=8))
            lines[i] = " ".join(words)
        elif op == "insert_line":
            lines.insert(
                i,
                draw(
                    st.sampled_from(JUNK_TOKENS)
                    | st.text(max_size=40)
                    | st.just("loop_")
                    | st.just("_rlnUnknownLabel #9")
                ),
            )
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    tail = draw(st.sampled_from(["none", "cut", "bytes"]))
    if tail == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif tail == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
    return data


def garbage() -> st.SearchStrategy[bytes]:
    """Files that are not the format at all."""
    return st.one_of(
        st.just(b""),
        st.just(b"# only a comment\n# and another\n"),
        st.just(b"\n\n   \n"),
        st.just(b"data_\n"),
        st.just(b"data_\nloop_\n"),
        st.just(b"data_x\nloop_\n_rlnImageName\n"),
        st.just(b"data_x\nloop_\n_rlnImageName #1\n_rlnImageName #2\n1@a 1@b\n"),
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


def malformed(template: str) -> st.SearchStrategy[bytes]:
    return st.one_of(damaged_text(template), damaged_text(template), garbage())


# --------------------------------------------------------------------------------------
# MRC files that are valid but wrong for the job (box, count, pixel size, values, mode)
# --------------------------------------------------------------------------------------

_MRC_CHANGES = [
    "none",
    "fewer",
    "more",
    "crop",
    "pad",
    "nonsquare",
    "pixel",
    "nan",
    "inf",
    "zero",
    "constant",
    "tiny",
    "huge",
    "single",
    "mode",
]


@st.composite
def wrong_mrc(draw, data, pixel_size_angstrom: float, *, is_stack: bool) -> bytes:
    """``data()`` written as a valid MRC file after one change that the job must notice.

    ``data`` returns the template, ``(n, N, N)`` (a stack, ``is_stack``) or ``(N, N, N)`` (a map). The
    changes: fewer or more sections, a cropped / padded / non-square box, another header
    pixel size (0 = unknown), a NaN or Inf voxel, all zero, constant, values scaled by
    1e-30 or 1e30, a single 2D section, another MRC mode (int8/int16/uint16/float16).
    """
    import tempfile
    import warnings
    from pathlib import Path

    import mrcfile
    import numpy as np

    array = np.array(data(), dtype=np.float32, copy=True)
    pixel = pixel_size_angstrom
    change = draw(st.sampled_from(_MRC_CHANGES))
    n = array.shape[0]
    if change == "fewer":
        array = array[: draw(st.integers(1, max(1, n - 1)))]
    elif change == "more":
        array = np.concatenate([array, array[: draw(st.integers(1, n))]])
    elif change == "crop":
        size = draw(st.integers(1, array.shape[-1] - 1))
        array = array[..., :size, :size]
        if not is_stack:
            array = array[:size]
    elif change == "pad":
        width = draw(st.integers(1, 8))
        pads = ((0, 0) if is_stack else (0, width), (0, width), (0, width))
        array = np.pad(array, pads)
    elif change == "nonsquare":
        array = array[..., : draw(st.integers(1, array.shape[-2] - 1)), :]
    elif change == "pixel":
        pixel = draw(st.sampled_from([0.0, 0.5, 1.0, 1.9, 2.5, 1e-6, 1e6, 3.4e38]))
    elif change in ("nan", "inf"):
        index = tuple(draw(st.integers(0, s - 1)) for s in array.shape)
        array[index] = np.nan if change == "nan" else -np.inf
    elif change == "zero":
        array[:] = 0.0
    elif change == "constant":
        array[:] = draw(st.sampled_from([1.0, -3.5, 1e20]))
    elif change == "tiny":
        array *= 1e-30
    elif change == "huge":
        with np.errstate(over="ignore"):
            array *= 1e30
    elif change == "single":
        array = array[0]
    elif change == "mode":
        dtype = draw(st.sampled_from([np.int8, np.int16, np.uint16, np.float16]))
        info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
        scaled = array * 40.0
        if info is not None:
            scaled = np.clip(np.rint(scaled), info.min, info.max)
        array = scaled.astype(dtype)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "variant.mrc"
        with (
            warnings.catch_warnings(),  # NaN / overflow in the header statistics
            np.errstate(all="ignore"),
            mrcfile.new(path, overwrite=True) as mrc,
        ):
            warnings.simplefilter("ignore")
            mrc.set_data(array)
            if array.ndim == 3:
                if is_stack:
                    mrc.set_image_stack()
                else:
                    mrc.set_volume()
            mrc.voxel_size = pixel
        return path.read_bytes()


# --------------------------------------------------------------------------------------
# command lines
# --------------------------------------------------------------------------------------

#: values that a key=value override may be given by mistake
CLI_VALUES = [
    "abc",
    "",
    "-1",
    "0",
    "1",
    "2",
    "1e999",
    "-1e999",
    "nan",
    "inf",
    "-inf",
    "1e-300",
    "1e300",
    "0.5",
    "true",
    "false",
    "null",
    "[1,2]",
    "[]",
    "{a:1}",
    "[1,",
    "'unterminated",
    "${oops}",
    "2**40",
    "99999999999999999999",
    "é",
    "\\",
    "/nonexistent/file.star",
]


def overrides_of(
    keys: list[str], extra_values: dict[str, list[str]] | None = None
) -> st.SearchStrategy[list[str]]:
    """1-3 ``key=value`` overrides of ``keys`` (and a few unknown keys) with odd values.

    ``extra_values`` adds values worth trying for particular keys (``subset=half3``).
    """
    extra_values = extra_values or {}

    @st.composite
    def build(draw) -> list[str]:
        overrides = []
        for _ in range(draw(st.integers(1, 3))):
            key = draw(
                st.sampled_from(keys)
                | st.sampled_from(["nope", "foo.bar", "hydra.x", "trainer.nope"])
            )
            choices = st.sampled_from(CLI_VALUES) | st.integers(-(10**6), 10**6).map(
                str
            )
            choices |= st.floats(allow_nan=True).map(repr)
            choices |= st.text(
                alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=10
            )
            if key in extra_values:
                choices |= st.sampled_from(extra_values[key])
            value = draw(choices)
            prefix = draw(st.sampled_from(["", "", "", "", "+", "++", "~"]))
            overrides.append(f"{prefix}{key}={value}")
        return overrides

    return build()


class _QuietText(str):
    def __repr__(self) -> str:
        return f"<template: {len(self)} characters>"


class _QuietBytes(bytes):
    def __repr__(self) -> str:
        return f"<template: {len(self)} bytes>"


def quiet(template: str | bytes) -> str | bytes:
    """``template`` with a short ``repr``.

    Hypothesis puts the repr of a strategy (its arguments included) into the message of
    an error raised while drawing; for a template over ~15 kB that repr is larger than
    30 kB and hypothesis warns (an error under ``filterwarnings=error``).
    """
    return (
        _QuietBytes(template) if isinstance(template, bytes) else _QuietText(template)
    )
