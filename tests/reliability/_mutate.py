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
