"""The ``cryoavg`` command: ``cryoavg <job> [key=value ...]``.

Each job is a Hydra application with one primary config in ``configs/<job>.yaml``;
``cryoavg <job> --help`` prints that job's keys and defaults, and any key can be overridden
on the command line the usual Hydra way (``key=value``, ``group=option``, ``+new=1``).
"""

import importlib
import os
import sys

from cryoavg import __version__

#: job name -> (module holding ``main``, one-line description)
JOBS: dict[str, tuple[str, str]] = {
    "class2d": (
        "cryoavg.cli.class2d",
        "reference-free 2D class averaging (RELION Class2D: VDAM or EM)",
    ),
    "localsym": (
        "cryoavg.cli.localsym",
        "local symmetry: operator search, refine, apply, duplicate, masks",
    ),
    "reconstruct": (
        "cryoavg.cli.reconstruct",
        "3D reconstruction from particles with poses: half maps, FSC, local symmetry",
    ),
    "select": (
        "cryoavg.cli.select",
        "rank 2D class averages and select their particles (RELION Select)",
    ),
    "refine3d": (
        "cryoavg.cli.refine3d",
        "gold-standard 3D refinement (RELION Refine3D: VDAM or EM, local symmetry)",
    ),
    "simulate": (
        "cryoavg.cli.simulate",
        "simulate particles (STAR + MRCS) from a 3D map, with junk and ground truth",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in JOBS)
    lines = [
        f"cryoavg {__version__}: RELION-compatible cryo-EM processing in PyTorch",
        "",
        "usage: cryoavg <job> [key=value ...]     (Hydra overrides)",
        "       cryoavg <job> --help              (the job's keys and defaults)",
        "       cryoavg --version",
        "",
        "jobs:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in JOBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``cryoavg <job> ...`` to the job's Hydra entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if args[0] in ("-V", "--version"):
        print(f"cryoavg {__version__}")
        return
    job = args[0]
    if job not in JOBS:
        sys.stderr.write(f"error: unknown job '{job}'; jobs: {', '.join(JOBS)}\n")
        raise SystemExit(2)
    from cryoavg.cli._malloc import keep_freed_memory

    keep_freed_memory()  # before the job allocates: no page faults for large tensors
    from cryoavg.cli._jobs import check_overrides

    check_overrides(job, args[1:])  # a bad key or value: one line, exit 2
    module = importlib.import_module(JOBS[job][0])
    os.environ["CRYOAVG_PROG"] = f"cryoavg {job}"
    sys.argv = [f"cryoavg {job}", *args[1:]]
    module.main()


if __name__ == "__main__":
    main()
