"""Shared hypothesis settings and helpers of the fuzz tests.

Every fuzz test runs twice: a fast, derandomised subset in the default suite
(``FAST``, 60 inputs per reader) and the full run under ``slow`` (``FULL``, 1000
inputs per reader). Any exception other than :class:`cryoavg.errors.CryoavgError` is a
bug, and so is a reader that accepts garbage and returns something inconsistent.
"""

import io
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cryoavg.cli._jobs import run_job
from cryoavg.errors import CryoavgError

FAST_EXAMPLES = 60
FULL_EXAMPLES = 1000

_COMMON = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
FAST = settings(max_examples=FAST_EXAMPLES, **_COMMON)
FULL = settings(max_examples=FULL_EXAMPLES, **_COMMON)

#: examples run per fuzz target (read by the report at the end of the session)
COUNTS: dict[str, int] = {}


def count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


_SCRATCH = Path(tempfile.mkdtemp(prefix="cryoavg-fuzz-"))


def scratch_file(name: str, content: bytes) -> Path:
    """Write ``content`` to a scratch file (overwritten by the next example)."""
    path = _SCRATCH / name
    path.write_bytes(content)
    return path


def scratch_dir() -> Path:
    return _SCRATCH


def accepts_or_input_error(read, *args, **kwargs):
    """Call a reader; a CryoavgError is the expected answer to garbage.

    Returns the reader's result, or ``None`` when it raised a CryoavgError (whose message
    must be one non-empty line). Any other exception propagates and fails the test.
    """
    try:
        return read(*args, **kwargs)
    except CryoavgError as err:
        message = str(err)
        assert message
        assert "\n" not in message
        return None


def cli_answer(run, cfg) -> tuple[int, str]:
    """Run a job through :func:`run_job` as the command line does.

    Returns ``(status, stderr)``: 0 when the job ran, 2 and the one error line
    otherwise. A traceback (any exception escaping ``run_job``) fails the test.
    """
    buffer = io.StringIO()
    try:
        with redirect_stderr(buffer):
            run_job(run, cfg)
    except SystemExit as stop:
        code, text = stop.code, buffer.getvalue()
    else:
        return 0, buffer.getvalue()
    assert code == 2, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    return 2, lines[0]


def no_partial_output(directory: Path) -> None:
    """The failed job left nothing: no job directory, no temporary file."""
    if directory.exists():
        leftovers = sorted(str(p) for p in directory.rglob("*"))
        pytest.fail(f"partial output left behind: {leftovers}")


__all__ = [
    "COUNTS",
    "FAST",
    "FULL",
    "accepts_or_input_error",
    "cli_answer",
    "count",
    "no_partial_output",
    "scratch_dir",
    "scratch_file",
]
