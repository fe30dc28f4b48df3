"""Atomic file writes: a reader never sees a half-written output file.

Every output of cryoavg (STAR files, MRC stacks, JSON/YAML notes) is written to a
temporary file in the destination directory, flushed and ``fsync``-ed, and only then
renamed onto the final name with :func:`os.replace` (atomic on POSIX file systems).
If anything fails on the way, the temporary file is removed and the final file is left
untouched (the previous version, if there was one, survives).

Example
-------
>>> with atomic_write("run_it001_model.star") as handle:  # doctest: +SKIP
...     handle.write(text)
>>> with atomic_path("run_it001_classes.mrcs") as tmp:  # doctest: +SKIP
...     write_with_a_library_that_wants_a_filename(tmp)
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cryoavg.errors import OutputError

__all__ = ["atomic_path", "atomic_write"]


def _describe(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _new_temp_path(final: Path) -> Path:
    """Create (empty) and return a unique temporary file next to ``final``."""
    try:
        handle, name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=".tmp", dir=final.parent
        )
    except OSError as err:
        raise OutputError(
            f"{final}: cannot create a file there ({_describe(err)})"
        ) from err
    os.close(handle)
    return Path(name)


def _target_mode(final: Path) -> int:
    """Permission bits for the final file: those of the file it replaces, else umask."""
    try:
        return final.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; silently skipped where directories cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _publish(temp: Path, final: Path) -> None:
    """Flush ``temp`` to disk, set the final permissions, rename it onto ``final``."""
    _fsync_file(temp)
    os.chmod(temp, _target_mode(final))
    os.replace(temp, final)
    _fsync_directory(final.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; it replaces ``path`` when the block succeeds.

    For libraries that want a file name (``mrcfile.new``): write the complete file to
    the yielded path and close it inside the ``with`` block.

    Parameters
    ----------
    path
        Final file name. Its directory must exist.

    Yields
    ------
    Path
        A temporary file (already created, empty) in the same directory as ``path``.

    Raises
    ------
    OutputError
        The file could not be written (disk full, permission denied, no such directory).
    """
    final = Path(path)
    temp = _new_temp_path(final)
    try:
        yield temp
        _publish(temp, final)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{final}: cannot write ({_describe(err)})") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``path`` when the block succeeds.

    Parameters
    ----------
    path
        Final file name. Its directory must exist.
    mode
        ``"w"`` (text, UTF-8, Unix line endings) or ``"wb"`` (binary).
    encoding
        Text encoding (ignored in binary mode).

    Yields
    ------
    IO
        The open temporary file. It is flushed, fsync-ed, closed and renamed onto
        ``path`` when the ``with`` block ends without an exception; on an exception it
        is closed and removed and ``path`` is left as it was.

    Raises
    ------
    OutputError
        The file could not be written (disk full, permission denied, no such directory).
    ValueError
        ``mode`` is not a write mode.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    final = Path(path)
    temp = _new_temp_path(final)
    try:
        if mode == "w":
            handle: IO[Any] = open(temp, mode, encoding=encoding, newline="\n")  # noqa: SIM115
        else:
            handle = open(temp, mode)  # noqa: SIM115
        with handle:
            yield handle
            handle.flush()
        _publish(temp, final)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{final}: cannot write ({_describe(err)})") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
