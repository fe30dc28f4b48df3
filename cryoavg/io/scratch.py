"""Copy particle stacks to a fast local scratch directory for a job (``--scratch_dir``).

RELION's ``--scratch_dir`` copies the particles to a local disk before the first
iteration, so that the many random reads of a classification hit an SSD rather than a
network file system. :func:`scratch_copies` does the same for a list of stack files: it
copies as many of them as fit (keeping a reserve of free space), returns the paths to
read from (copies where made, originals otherwise) and removes its copies when the job
ends, also on failure.
"""

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryoavg.errors import OutputError

__all__ = ["scratch_copies"]

log = logging.getLogger("cryoavg")

#: Free space (bytes) left on the scratch disk after copying.
DEFAULT_RESERVE_BYTES = 1 << 30


@contextlib.contextmanager
def scratch_copies(
    paths: Sequence[str | os.PathLike[str]],
    scratch_dir: str | os.PathLike[str],
    *,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
) -> Iterator[list[Path]]:
    """Copy files into a private folder of ``scratch_dir`` for the duration of a block.

    Parameters
    ----------
    paths
        The files (stacks) to copy.
    scratch_dir
        An existing, writable directory on a local disk.
    reserve_bytes
        Free space to leave on the scratch disk; files that do not fit stay where they
        are (and are read from there).

    Yields
    ------
    list of Path
        One path per input: the copy, or the original when it did not fit.

    Raises
    ------
    OutputError
        ``scratch_dir`` does not exist or is not writable, or a copy fails.
    """
    root = Path(scratch_dir)
    if not root.is_dir():
        raise OutputError(f"{root}: scratch_dir does not exist or is not a directory")
    try:
        folder = Path(tempfile.mkdtemp(prefix="cryoavg_", dir=root))
    except OSError as err:
        raise OutputError(
            f"{root}: cannot write to scratch_dir ({err.strerror})"
        ) from err
    try:
        free = shutil.disk_usage(folder).free - int(reserve_bytes)
        result: list[Path] = []
        copied = skipped = 0
        for i, path in enumerate(Path(p) for p in paths):
            size = path.stat().st_size
            if size > free:
                result.append(path)
                skipped += 1
                continue
            target = folder / f"{i:06d}_{path.name}"
            try:
                shutil.copyfile(path, target)
            except OSError as err:
                raise OutputError(
                    f"{target}: cannot copy {path} to scratch_dir ({err.strerror})"
                ) from err
            free -= size
            copied += 1
            result.append(target)
        log.info(
            "copied %d stack(s) to %s%s",
            copied,
            folder,
            f"; {skipped} did not fit and are read in place" if skipped else "",
        )
        yield result
    finally:
        shutil.rmtree(folder, ignore_errors=True)
