"""Shared plumbing of every ``cryoavg <job>`` command.

* :func:`run_job` wraps a job's ``run(cfg)``: user errors (:class:`cryoavg.errors.CryoavgError`,
  missing or invalid config values) become one line on standard error and exit status 2,
  with no traceback.
* :func:`job_directory` picks the RELION-style output directory ``JobType/jobNNN/`` (numbered
  across the whole project directory, as RELION's pipeline does), records the command line
  (``note.txt``) and the resolved config (``config.yaml``), and removes a directory that it
  created itself when the job fails, so a failed job leaves no partial output.
"""

import contextlib
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cryoavg.errors import ConfigError, CryoavgError, OutputError
from cryoavg.io.atomic import atomic_write

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cryoavg")

_JOB_NAME = re.compile(r"^job(\d{3,})$")


def setup_logging(verbose: bool = True) -> None:
    """Send cryoavg's log records to a rich console handler on standard output."""
    from rich.logging import RichHandler

    if any(isinstance(h, RichHandler) for h in log.handlers):
        return
    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def command_line() -> str:
    """The command line as the user typed it (``cryoavg <job> key=value ...``)."""
    args = sys.argv[1:]
    prog = os.environ.get("CRYOAVG_PROG", "cryoavg")
    return " ".join([prog, *[shlex.quote(a) for a in args]])


def next_job_directory(job_type: str, project_dir: str | Path = ".") -> Path:
    """Return ``<project_dir>/<job_type>/jobNNN`` with NNN one above every job in the project.

    Parameters
    ----------
    job_type
        RELION-style job type directory, e.g. ``"Class2D"``.
    project_dir
        The project root (RELION projects are run from it).

    Returns
    -------
    Path
        A directory path that does not exist yet.
    """
    root = Path(project_dir)
    highest = 0
    if root.is_dir():
        for type_dir in root.iterdir():
            if not type_dir.is_dir() or type_dir.name.startswith("."):
                continue
            with contextlib.suppress(OSError):
                for job in type_dir.iterdir():
                    match = _JOB_NAME.match(job.name)
                    if match and job.is_dir():
                        highest = max(highest, int(match.group(1)))
    return root / job_type / f"job{highest + 1:03d}"


@contextlib.contextmanager
def job_directory(
    output: str | None,
    job_type: str,
    cfg: DictConfig | None = None,
    *,
    record: bool = True,
    keep_if: str | None = None,
) -> Iterator[Path]:
    """Create (or reuse) a job's output directory for the duration of a job.

    Parameters
    ----------
    output
        Directory asked for on the command line, or ``None`` for the next ``jobNNN``.
    job_type
        RELION job type used for automatic numbering (``Simulate``, ``Class2D``, ...).
    cfg
        Resolved config, saved as ``config.yaml`` in the directory.
    record
        Write ``note.txt`` and ``config.yaml`` and own the directory (remove it on failure).
        ``False`` for the other ranks of a multi-process job, which use the directory of
        rank 0.
    keep_if
        Glob of files that mark completed work (e.g. ``"*_optimiser.star"`` for Class2D,
        written last for each iteration): a failed or interrupted job whose directory holds
        such a file keeps it, so finished iterations are never lost and can be continued.

    Yields
    ------
    Path
        The job directory. If the block raises and the directory did not exist before,
        the directory is removed again so that no partial output is left behind.
    """
    path = Path(output) if output else next_job_directory(job_type)
    if not record:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    existed = path.exists()
    if existed and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    # parent directories created for this job (deepest first), removed again on failure
    new_parents = [parent for parent in path.parents if not parent.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"{path}: cannot create the output directory ({err.strerror})"
        ) from err
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        note = path / "note.txt"
        previous = note.read_text() if note.exists() else ""
        with atomic_write(note) as handle:
            handle.write(previous + f" ++++ {stamp} with the following command:\n")
            handle.write(command_line() + "\n ++++\n")
        if cfg is not None:
            with atomic_write(path / "config.yaml") as handle:
                handle.write(OmegaConf.to_yaml(cfg, resolve=True))
        yield path
    except BaseException:
        completed = keep_if is not None and any(path.glob(keep_if))
        if not existed and not completed:
            shutil.rmtree(path, ignore_errors=True)
            for parent in new_parents:
                with contextlib.suppress(OSError):  # only while empty
                    parent.rmdir()
        raise


def run_job(run: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``run(cfg)`` and turn user errors into one line on stderr and exit status 2.

    Parameters
    ----------
    run
        The job's testable entry point.
    cfg
        The composed Hydra config.

    Returns
    -------
    Any
        Whatever ``run`` returns.
    """
    setup_logging()
    try:
        _file_names_as_text(cfg)
        return run(cfg)
    except CryoavgError as err:
        _fail(str(err))
    except OmegaConfBaseException as err:
        _fail(str(ConfigError(_omegaconf_message(err))))
    except KeyboardInterrupt:
        _fail("interrupted")
    return None


#: keys that name files or directories in any job's config
FILE_NAME_KEYS = (
    "particles",
    "output",
    "continue_from",
    "project_dir",
    "scratch_dir",
    "map",
    "reference",
    "local_symmetry",
    "optimiser",
    "model",
    "data",
    "class_stack",
    "i_map",
    "o_map",
    "i_mask_info",
    "i_op_mask_info",
    "o_mask_info",
)


def _file_names_as_text(cfg: DictConfig) -> None:
    """A number given as a file name (``output=5``, ``particles=-1``) is that name.

    Hydra parses such values as numbers; every job expects text there.
    """
    for key in FILE_NAME_KEYS:
        value = cfg.get(key) if isinstance(cfg, DictConfig) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            cfg[key] = str(value)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Missing mandatory value" in first and key:
        return f"the key '{key}' is required: add {key}=... to the command line"
    return f"config key '{key}': {first}" if key else first


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


#: what :func:`check_config_types` accepts for each kind of value
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _converts(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return False  # a list, a dict, None, or true/false where a number is due
    if kind is str:
        return True
    try:
        number = float(value)
    except ValueError:
        return False
    if kind is int:
        return math.isfinite(number) and number == int(number) and abs(number) < 2**62
    return not math.isnan(number)


def check_config_types(
    cfg: DictConfig, kinds: dict[str, type], *, optional: tuple[str, ...] = ()
) -> None:
    """Raise :class:`ConfigError` naming the first key whose value has the wrong type.

    Parameters
    ----------
    cfg
        The composed job config.
    kinds
        Key (dotted for nested keys) -> ``int``, ``float``, ``bool`` or ``str``.
    optional
        Keys that may also be ``null``.
    """
    for key, kind in kinds.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key in optional:
            continue
        if not _converts(value, kind):
            shown = value if not isinstance(value, str) else repr(value)
            raise ConfigError(f"{key}={shown}: expected {_KIND_NAMES[kind]}")


def check_overrides(job: str, overrides: list[str]) -> None:
    """Compose ``configs/<job>.yaml`` with the command line's overrides before Hydra does.

    Hydra reports a bad override (an unknown key, a missing config group option, a syntax
    error) with several lines and exit status 1; this reports it as every other user error:
    one line ``error: ...`` and exit status 2. Command lines with Hydra flags (``--help``,
    ``--cfg``, ``-m``) and jobs without a primary config are left to Hydra.
    """
    from cryoavg.cli._configs import config_dir

    if any(arg.startswith("-") for arg in overrides):
        return
    directory = Path(config_dir())
    if not (directory / f"{job}.yaml").is_file():
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            compose(
                config_name=job,
                overrides=[arg for arg in overrides if "=" in arg or arg[:1] == "~"],
                return_hydra_config=True,
            )
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as err:
        # Hydra raises a bare ValueError or TypeError for a config group given a
        # number or a list of numbers (``trainer=-1``, ``trainer=[1,2]``, ``~trainer=1``)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        text = "; ".join(lines[:2]) if lines else type(err).__name__
        _fail(str(ConfigError(f"bad command line: {text}")))


def torch_device(value: Any, key: str = "device") -> "torch.device":
    """The torch device of a ``device=`` key: the CPU or a CUDA device that exists here.

    Raises
    ------
    ConfigError
        Not a device name, not cpu/cuda, or no such CUDA device on this machine.
    """
    import torch

    try:
        device = torch.device(str(value))
    except RuntimeError as err:
        raise ConfigError(f"{key}: {err}") from err
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{key}={value}: use cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={value}: no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{key}={value}: only {torch.cuda.device_count()} CUDA device(s)"
        )
    return device
