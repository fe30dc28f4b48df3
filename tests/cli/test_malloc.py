"""The allocator settings of ``cryoavg.cli._malloc``: applied, inherited, and effective."""

import os
import subprocess
import sys
import textwrap

import pytest

from cryoavg.cli._malloc import GLIBC_TUNABLES, keep_freed_memory

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's allocator only",
)

#: allocates and frees a 64 MiB tensor 20 times, prints the median of the minor page
#: faults each time took (glibc reuses the freed memory once the heap has grown into its
#: settled size; the median ignores the odd time the heap grows once more)
FAULTS = textwrap.dedent(
    """
    import os, resource, statistics
    from cryoavg.cli._malloc import keep_freed_memory
    applied = keep_freed_memory()
    import torch
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    each = []
    for _ in range(20):  # 64 MiB a time
        before = faults()
        torch.ones(1 << 24).sum()
        each.append(faults() - before)
    median = int(statistics.median(each))
    print(applied, median, os.environ.get("GLIBC_TUNABLES", ""))
    """
)


def _faults(**env: str) -> tuple[bool, int, str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
    }
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", FAULTS],
        env=environ,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0] == "True", int(out[1]), out[2] if len(out) > 2 else ""


@glibc_only
def test_large_tensors_reuse_memory_without_page_faults() -> None:
    applied, faults_tuned, exported = _faults()
    not_applied, faults_default, _ = _faults(CRYOAVG_MALLOC_TUNING="0")
    assert applied
    assert not not_applied
    assert exported == GLIBC_TUNABLES  # child processes (DDP ranks) get the same
    # 64 MiB freshly mapped = about 16k faults of 4 KiB pages by default
    assert faults_default > 5_000
    assert faults_tuned < faults_default / 20


@glibc_only
def test_children_read_the_exported_tunables() -> None:
    applied, faults_child, _ = _faults(GLIBC_TUNABLES=GLIBC_TUNABLES)
    assert not applied  # the environment's own setting is left as it is ...
    assert faults_child < 1_000  # ... and glibc applies it at the child's start


@pytest.mark.parametrize(
    "environ",
    [
        {"CRYOAVG_MALLOC_TUNING": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"MALLOC_ARENA_MAX_": "2"},
    ],
)
def test_opt_out_and_user_settings_win(environ: dict[str, str]) -> None:
    env = dict(environ)
    assert keep_freed_memory(env) is False
    assert env == environ
