"""Keep freed memory in the process for reuse (glibc), so large tensors cost no page faults.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. A job that allocates and frees tensors
of tens of MiB for every mini-batch then faults in every page of them again each time:
the tutorial-sized Class2D job (10k particles, K = 100) took 33 million page faults and
79 s of system time on 2 cores, 301 s wall; with the settings below, 0.35 million faults,
4 s of system time and 230 s wall, for 8 % more peak RSS (docs/scaleout.md).

The settings: no ``mmap`` for allocations (``mmap_max = 0``; glibc still uses it where the
heap cannot grow), freed memory at the top of the heap kept up to 2 GiB
(``trim_threshold``), and the heap grown 256 MiB at a time (``top_pad``). They are applied
to the running process with ``mallopt`` and exported as ``GLIBC_TUNABLES`` for the
processes it starts (DDP ranks, ``ddp_spawn`` workers).
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

TRIM_THRESHOLD_BYTES = (1 << 31) - 1
TOP_PAD_BYTES = 1 << 28

#: the same settings for child processes (read by glibc at their start)
GLIBC_TUNABLES = (
    f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD_BYTES}"
    f":glibc.malloc.top_pad={TOP_PAD_BYTES}"
)

#: set to 0 to leave the C library's allocator as it is
OPT_OUT_VARIABLE = "CRYOAVG_MALLOC_TUNING"


def _user_settings(environ: dict[str, str]) -> bool:
    """Whether the environment already tunes glibc's allocator (the user's choice wins)."""
    return "GLIBC_TUNABLES" in environ or any(
        key.startswith("MALLOC_") and key.endswith("_") for key in environ
    )


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Apply the allocator settings of this module to this process and its children.

    Does nothing (and returns False) off Linux, without glibc's ``mallopt``, when
    ``CRYOAVG_MALLOC_TUNING=0``, or when the environment already holds ``GLIBC_TUNABLES``
    or ``MALLOC_*_`` settings.

    Parameters
    ----------
    environ
        Environment to read and to export ``GLIBC_TUNABLES`` into (default ``os.environ``).

    Returns
    -------
    bool
        True if the settings were applied.
    """
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or env.get(OPT_OUT_VARIABLE) == "0":
        return False
    if _user_settings(env):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_TOP_PAD, TOP_PAD_BYTES),
            (M_MMAP_MAX, 0),
        )
    )
    if applied:
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    return applied
