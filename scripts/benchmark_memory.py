"""Peak memory of Class2D on data larger than memory (issue: scale-out).

Two steps::

    # 1. a synthetic data set of 200k particles (64 px) on disk, ~3.3 GB:
    #    2000 simulated particles (20 % junk), copied into 100 micrograph "batches"
    python scripts/benchmark_memory.py make --out /tmp/big --n 200000

    # 2. peak RSS of (a) streaming every image through the E-step data path and
    #    (b) a full Class2D EM iteration over all particles, for growing subsets
    python scripts/benchmark_memory.py measure --star /tmp/big/particles.star \\
        --sizes 20000 200000

Each measurement runs in a fresh child process; the script prints peak RSS (MB), the
wall time and the ratio against the smallest subset measured in the same run, so that
"bounded by batch size, not data-set size" reads as a ratio close to 1.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PYTHON = sys.executable


def _cryoavg(*args: str, cwd: Path) -> None:
    command = [PYTHON, "-m", "cryoavg.cli.main", *args]
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def make(out: Path, n_particles: int, box: int, seed: int) -> Path:
    """Write ``out/particles.star`` with ``n_particles`` rows over copied stacks."""
    from cryoavg.io.star import read_star, write_star

    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "Simulate" / "base"
    if not (base_dir / "particles.star").exists():
        _cryoavg(
            "simulate",
            "output=Simulate/base",
            "n_particles=2000",
            f"box={box}",
            "junk_fraction=0.2",
            f"seed={seed}",
            cwd=out,
        )
    blocks = read_star(base_dir / "particles.star")
    optics, particles = blocks["optics"], blocks["particles"]
    n_base = len(particles)
    copies = -(-n_particles // n_base)
    stacks = sorted({name.split("@", 1)[1] for name in particles["rlnImageName"]})
    frames = []
    for c in range(copies):
        folder = Path("Copies") / f"c{c:04d}"
        (out / folder).mkdir(parents=True, exist_ok=True)
        for stack in stacks:
            target = out / folder / Path(stack).name
            if not target.exists():
                shutil.copyfile(out / stack, target)
        frame = particles.copy()
        index, stack = zip(
            *(name.split("@", 1) for name in frame["rlnImageName"]), strict=True
        )
        frame["rlnImageName"] = [
            f"{i}@{folder / Path(s).name}" for i, s in zip(index, stack, strict=True)
        ]
        frame["rlnMicrographName"] = [
            f"{folder}/{Path(m).name}" for m in frame["rlnMicrographName"]
        ]
        frames.append(frame)
    import pandas as pd

    table = pd.concat(frames, ignore_index=True).iloc[:n_particles]
    star = out / "particles.star"
    write_star(star, {"optics": optics, "particles": table})
    size_gb = sum(f.stat().st_size for f in (out / "Copies").rglob("*.mrcs")) / 1e9
    print(
        f"wrote {star}: {len(table)} particles of {box} px, {size_gb:.2f} GB of stacks"
    )
    return star


def _subset_star(star: Path, n: int, work: Path) -> Path:
    from cryoavg.io.star import read_star, write_star

    blocks = read_star(star)
    blocks["particles"] = blocks["particles"].iloc[:n]
    path = work / f"particles_{n}.star"
    write_star(path, blocks)
    return path


def _stream_child(star: str, chunk_size: int) -> None:
    """Child process: read every image once through the E-step data path."""
    import torch

    from cryoavg.io.dataset import ParticleDataset
    from cryoavg.io.particles import read_particles
    from cryoavg.io.stack import ImageSource

    table = read_particles(star)
    source = ImageSource.from_table(table)
    dataset = ParticleDataset(table, source)
    n = len(dataset)
    total = 0.0
    for start in range(0, n, chunk_size):
        batch = dataset.get_batch(np.arange(start, min(n, start + chunk_size)))
        total += float(torch.as_tensor(batch["image"]).double().sum())
    print(json.dumps({"checksum": total}))


def run_measured(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``command`` in a child; return (peak RSS MB, wall s) of that child alone."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # wait4 gives the resource usage of this child only (not of earlier children)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    err = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(command)}\n{err[-2000:]}")
    return usage.ru_maxrss / 1024.0, wall


def measure(star: Path, sizes: list[int], work: Path, class2d_args: list[str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    project = star.parent
    rows = []
    for n in sizes:
        subset = _subset_star(star, n, project)
        stream_rss, stream_wall = run_measured(
            [PYTHON, __file__, "_stream", str(subset)], cwd=project
        )
        output = work / f"class2d_{n}"
        shutil.rmtree(output, ignore_errors=True)
        job_rss, job_wall = run_measured(
            [
                PYTHON,
                "-m",
                "cryoavg.cli.main",
                "class2d",
                f"particles={subset}",
                f"output={output}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                *class2d_args,
            ],
            cwd=project,
        )
        rows.append((n, stream_rss, stream_wall, job_rss, job_wall))
        print(
            f"n={n:>7}  stream: peak RSS {stream_rss:7.0f} MB, {stream_wall:6.1f} s "
            f"({n / stream_wall:8.0f} particles/s)   class2d: peak RSS {job_rss:7.0f} MB, "
            f"{job_wall:6.1f} s",
            flush=True,
        )
    base = rows[0]
    for n, s_rss, _, j_rss, _ in rows[1:]:
        print(
            f"n={n} vs n={base[0]} ({n / base[0]:.0f}x the particles): "
            f"stream RSS ratio {s_rss / base[1]:.2f}, class2d RSS ratio {j_rss / base[3]:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write the synthetic data set")
    p_make.add_argument("--out", type=Path, required=True)
    p_make.add_argument("--n", type=int, default=200_000)
    p_make.add_argument("--box", type=int, default=64)
    p_make.add_argument("--seed", type=int, default=1)
    p_measure = sub.add_parser("measure", help="peak RSS for growing subsets")
    p_measure.add_argument("--star", type=Path, required=True)
    p_measure.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    p_measure.add_argument("--work", type=Path, default=None)
    p_measure.add_argument(
        "--class2d",
        nargs="*",
        default=[
            "algorithm=em",
            "iterations=1",
            "classes=10",
            "psi_step=15",
            "offset_range=2",
            "offset_step=2",
        ],
        help="Class2D overrides for the measured job",
    )
    p_stream = sub.add_parser("_stream")
    p_stream.add_argument("star")
    p_stream.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    if args.command == "make":
        make(args.out.resolve(), args.n, args.box, args.seed)
    elif args.command == "measure":
        star = args.star.resolve()
        measure(
            star, sorted(args.sizes), args.work or star.parent / "bench", args.class2d
        )
    else:
        _stream_child(args.star, args.chunk_size)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
