"""Shared hypothesis settings and helpers of the fuzz tests.

Every fuzz test runs twice: a fast, derandomised subset in the default suite
(``FAST``, 60 inputs per reader) and the full run under ``slow`` (``FULL``, 1000
inputs per reader). Any exception other than :class:`cryoavg.errors.CryoavgError` is a
bug, and so is a reader that accepts garbage and returns something inconsistent.
"""

import io
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager, redirect_stderr
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


#: seconds one fuzz input may take through a job before it counts as a hang
HANG_SECONDS = 60


@contextmanager
def time_limit(seconds: float = HANG_SECONDS):
    """Fail the example (not the whole run) when the block runs longer than ``seconds``.

    Uses ``SIGALRM`` (main thread, POSIX); elsewhere the block runs without a limit.
    """
    if not hasattr(signal, "setitimer") or (
        threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def hang(signum, frame):
        pytest.fail(f"no answer within {seconds:g} s (a hang)")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def no_temporary_files(directory: Path) -> None:
    """A finished job left no hidden ``.name.XXXX.tmp`` file (cryoavg.io.atomic)."""
    leftovers = sorted(
        str(p)
        for p in directory.rglob("*")
        if p.name.endswith(".tmp") or p.name.startswith(".")
    )
    if leftovers:
        pytest.fail(f"temporary files left behind: {leftovers}")


__all__ += ["HANG_SECONDS", "no_temporary_files", "time_limit"]


def overrides_answer(job: str, overrides: list[str]) -> str | None:
    """Check a command line as ``cryoavg <job>`` does before Hydra runs.

    Returns the one ``error:`` line (exit status 2) for a command line that does not
    compose, ``None`` for one that does.
    """
    from cryoavg.cli._jobs import check_overrides

    buffer = io.StringIO()
    try:
        with redirect_stderr(buffer):
            check_overrides(job, overrides)
    except SystemExit as stop:
        code, text = stop.code, buffer.getvalue()
    else:
        return None
    assert code == 2, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    return lines[0]


__all__ += ["overrides_answer"]


#: inputs per target in the default suite for fuzz targets that run a whole job
FAST_JOB_EXAMPLES = 20
FAST_JOB = settings(FAST, max_examples=FAST_JOB_EXAMPLES)


def count_outcome(name: str, status: int) -> None:
    """Count the inputs of a job target that ran to the end (``<name> ran``)."""
    if status == 0 and name:
        count(f"{name} ran")


__all__ += ["FAST_JOB", "FAST_JOB_EXAMPLES", "count_outcome"]


def answer_job(run, cfg, target: str, outputs_are_complete) -> tuple[int, str]:
    """Run a job on one fuzzed input and check how it ended.

    ``run(cfg)`` runs in ``cfg.output`` (a job directory two levels below its project).
    Exit status 2 must leave no partial output; success must leave what
    ``outputs_are_complete(cfg, output)`` checks and no temporary files. The project is
    removed either way, so that the next input starts clean.
    """
    output = Path(cfg.output)
    project = output.parent.parent
    with time_limit():
        status, line = cli_answer(run, cfg)
    count_outcome(target, status)
    if status == 2:
        try:
            no_partial_output(project)
        finally:  # a failure here must not spill over into the next input
            shutil.rmtree(project, ignore_errors=True)
        return status, line
    try:
        outputs_are_complete(cfg, output)
        no_temporary_files(project)
    finally:  # the next input starts from a clean project
        shutil.rmtree(project)
    return status, line


__all__ += ["answer_job"]


@contextmanager
def torch_threads(n: int = 1):
    """Run the block with ``n`` torch threads (the tiny jobs of the fuzz tests run 3-5x
    faster on one thread than on two contended ones)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ += ["torch_threads"]
