#!/usr/bin/env python
"""Train the cryoavg class ranker on class averages that cryoavg itself produced.

Pipeline (every stage is cached under ``--work``, so re-running resumes):

1. ``maps``: 3D maps = the bundled HSP60 map, ``$CRYOAVG_SHARED/data/maps/*.mrc`` (default
   ``../shared`` beside the checkout) when present (``--shared-maps``), random "blob
   proteins" (sums of anisotropic Gaussians, compact, elongated or ring-like;
   :func:`blob_protein`) and random *dense* maps (250–600 small Gaussians in 1–3 lobes, a
   pseudo-atomic texture that gives projections fine detail; :func:`dense_protein`,
   ``--n-dense``).
2. ``datasets``: for each of ``--n-datasets`` random settings (seeded from ``--seed``; HSP60,
   the blobs and the shared maps): ``cryoavg simulate`` (800–1400 particles, box 32–56, SNR
   0.02–0.3 log-uniform, CTF on in 85 %, junk fraction 0.1–0.4 with a random subset of the
   five junk types) and ``cryoavg class2d`` (VDAM, K 8–16, 25–30 iterations, snapshots every
   5 iterations). Then ``--n-sharp-datasets`` more with the same draws but SNR 0.3–3
   (``SHARP_SNR``; one round over the dense maps, HSP60 and three blobs): averages of
   high-SNR data are sharp and detailed. Held-out maps (``HELD_OUT``: ribosome70S,
   prohibitin and blob seeds 9001/9002) are never used here; ``scripts/eval_ranker.py``
   uses them. The real class averages in ``shared/data/class_averages`` are never used for
   training (they are a test).
3. ``samples``: every class of every snapshot from iteration 10 on is one sample: its
   features + 64×64 image computed twice (with the Class2D mask diameter, and with the
   default diameter as in bare-stack mode), its particle count and its purity from
   ``ground_truth.star`` (fraction of real particles).

   **Label rule** (also used by the evaluation): a class is *good* when it holds at least
   ``MIN_PARTICLES`` = 10 particles and at least ``GOOD_PURITY`` = 85 % of them are real
   particles. For training the target is soft: ``clip((purity − 0.6) / 0.3, 0, 1)`` for
   classes with ≥ 10 particles, 0 otherwise.

   **Synthetic sharp averages** (``--n-synthetic-jobs``, :func:`synthetic_job`): the
   Class2D averages above are all small (≤ 56 px) and noisy, while real averages are
   often large (hundreds of px), sharp, slightly off-centre and sometimes clipped. Each
   synthetic "job" holds 4–8 good images (clean, CTF-free, noise-free projections of a
   training map, 0–9 % of the box off-centre; target 1) and 4–8 high-SNR junk analogues of
   the simulator's five kinds (target 0), all with the same random noise, B-factor, dark
   halo, mask and clipping, in boxes of 48–160 px. Only image features (all model groups
   marked missing, as a bare stack).
4. ``train``: Adam, BCE on the soft target, balanced by class weights; augmentation by the 8
   rotations/flips of the 64×64 images and random drop-out (set to "missing") of the model
   feature groups (job contrast, distribution, counts, resolution, accuracies; all of them
   together in 30 % of the samples = bare-stack mode). CPU, ``torch`` seeded from ``--seed``.
   Writes ``cryoavg/select/weights/class_ranker_v1.pt`` + ``.sha256`` (or ``--output``).

Usage::

    python scripts/train_ranker.py --work /tmp/ranker_work --seed 1 --n-datasets 24 \\
        --n-sharp-datasets 8 --n-dense 4 --n-synthetic-jobs 64 --epochs 20 \\
        --jobs 1 --threads 1 --cryoavg-path <copy of the checkout>

The shipped class_ranker_v1.pt (sha256 248478ae…) was made by exactly this (32 Class2D
datasets = 3288 samples, plus 1540 synthetic samples; 4828 in all). Measured on a shared
2-core CPU that other jobs kept at a load of 4–6 (everything ``nice -n 10``, one thread):
datasets 38 min wall (32 × 35–270 s), samples 10 min, training 13 min wall (with about
10 % of one core); the defaults of the data and training options are these values.
"""

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch
from scipy import ndimage

from cryoavg.ops.fourier import fftfreq_grid, resize_fourier_2d
from cryoavg.ops.projection import project_volume_2d
from cryoavg.ops.rotations import random_rotations
from cryoavg.ops.shifts import shift_images_2d
from cryoavg.select.features import compute_features, feature_names, group_columns
from cryoavg.select.network import ClassRankerNet, save_checkpoint
from cryoavg.simulate.particles import JUNK_TYPES, particle_radius_px

REPO = Path(__file__).resolve().parents[1]
#: the per-class lists of a sample table (Class2D snapshots and synthetic jobs alike)
SAMPLE_FIELDS = (
    "features",
    "images",
    "target",
    "good",
    "n",
    "purity",
    "iteration",
    "variant",
)
WEIGHTS = REPO / "cryoavg" / "select" / "weights" / "class_ranker_v1.pt"
#: ``../shared`` beside the checkout (or ``$CRYOAVG_SHARED``, as for the tests)
SHARED = Path(os.environ.get("CRYOAVG_SHARED") or REPO.parent / "shared")
SHARED_MAPS = SHARED / "data" / "maps"
MIN_PARTICLES = 10
GOOD_PURITY = 0.85
#: maps (by name) that only the evaluation uses
HELD_OUT = ("ribosome70S_65px", "prohibitin_ring_56px", "blob9001", "blob9002")
#: Å/px of maps whose header is wrong (see /work/shared/data/README.md)
MAP_PIXEL_SIZES = {"ribosome70S_65px": 5.0}
#: SNR range (log-uniform) of the extra "sharp" Class2D datasets
SHARP_SNR = (0.3, 3.0)
CRYOAVG = [sys.executable, "-m", "cryoavg.cli.main"]
#: optional copy of the cryoavg source tree that the simulate/class2d subprocesses run
#: (PYTHONPATH), so that edits to the working tree during a long generation do not matter
SUBPROCESS_PYTHONPATH: list[str] = []


# ----------------------------------------------------------------------------- maps
def blob_protein(seed: int, size: int = 64) -> np.ndarray:
    """A random "protein": 4–14 anisotropic Gaussian blobs, compact / elongated / ring."""
    rng = np.random.default_rng(seed)
    c = np.arange(size) - size // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    grid = np.stack([zz, yy, xx], -1).astype(np.float64)
    volume = np.zeros((size, size, size))
    shape = rng.choice(["compact", "elongated", "ring"], p=[0.5, 0.25, 0.25])
    n_blobs = int(rng.integers(4, 15))
    extent = rng.uniform(6, 13)
    if shape == "compact":
        centres = rng.normal(size=(n_blobs, 3)) * extent / 2
    elif shape == "elongated":
        centres = rng.normal(size=(n_blobs, 3)) * np.array([extent, 0.3, 0.3]) * 0.8
    else:
        phi = np.linspace(0, 2 * np.pi, n_blobs, endpoint=False)
        centres = np.stack(
            [
                rng.normal(size=n_blobs) * 1.5,
                extent * np.sin(phi),
                extent * np.cos(phi),
            ],
            -1,
        )
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    centres = centres @ q.T
    for centre in centres:
        r, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        sig = rng.uniform(1.5, 4.0, size=3)
        cov_inv = r @ np.diag(1 / sig**2) @ r.T
        d = grid - centre
        volume += rng.uniform(0.5, 1.5) * np.exp(
            -0.5 * np.einsum("...i,ij,...j->...", d, cov_inv, d)
        )
    return volume.astype(np.float32)


def dense_protein(seed: int, size: int = 64) -> np.ndarray:
    """A random detailed "complex": 250–600 small Gaussians (σ 0.7–1.8 voxels) in 1–3 lobes.

    The pseudo-atomic texture gives projections fine detail (like a large complex at
    4–8 Å/px), which the smooth :func:`blob_protein` maps do not have.
    """
    rng = np.random.default_rng(seed)
    n_lobes = int(rng.integers(1, 4))
    half_axes = rng.uniform(7, 17, size=(n_lobes, 3))
    lobe_centres = rng.normal(size=(n_lobes, 3)) * 5.0
    lobe_centres -= lobe_centres.mean(0)
    n_atoms = int(rng.integers(250, 601))
    lobe = rng.integers(0, n_lobes, size=n_atoms)
    direction = rng.normal(size=(n_atoms, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = rng.uniform(0, 1, size=n_atoms) ** (1 / 3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    points = (direction * radius[:, None] * half_axes[lobe] + lobe_centres[lobe]) @ q.T
    points = np.clip(points + size // 2, 1, size - 2)
    sigmas = rng.uniform(0.7, 1.8, size=n_atoms)
    weights = rng.uniform(0.5, 1.5, size=n_atoms)
    volume = np.zeros((size, size, size))
    edges = np.linspace(0.7, 1.8, 5)
    for lo, hi in itertools.pairwise(edges):
        chosen = (sigmas >= lo) & (sigmas <= hi)
        if not chosen.any():
            continue
        splat = np.zeros_like(volume)
        idx = np.round(points[chosen]).astype(int)
        np.add.at(splat, (idx[:, 0], idx[:, 1], idx[:, 2]), weights[chosen])
        volume += ndimage.gaussian_filter(splat, 0.5 * (lo + hi))
    return volume.astype(np.float32)


def prepare_maps(work: Path, names: list[str]) -> dict[str, tuple[Path, float]]:
    """Write/locate the maps; returns name -> (path, Å/px)."""
    out = {}
    (work / "maps").mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.startswith(("blob", "dense")):
            path = work / "maps" / f"{name}.mrc"
            if not path.exists():
                make = blob_protein if name.startswith("blob") else dense_protein
                with mrcfile.new(path, overwrite=True) as mrc:
                    mrc.set_data(make(int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))))
                    mrc.voxel_size = 4.0
            out[name] = (path, 4.0)
        elif name == "hsp60_D7_48px":
            out[name] = (REPO / "cryoavg" / "data" / "hsp60_D7_48px.mrc", 7.84)
        else:
            path = SHARED_MAPS / f"{name}.mrc"
            with mrcfile.open(path, permissive=True) as mrc:
                header = float(mrc.voxel_size.x)
            out[name] = (path, MAP_PIXEL_SIZES.get(name, header if header > 0 else 5.0))
    return out


def map_diameter_angstrom(path: Path, pixel_size: float) -> float:
    """Diameter (Å) of the sphere holding 99 % of the positive density."""
    data = torch.from_numpy(mrcfile.read(path).astype(np.float32).copy())
    return 2.0 * particle_radius_px(data) * pixel_size


# ----------------------------------------------------------------------------- datasets
def dataset_settings(
    rng: np.random.Generator,
    map_name: str,
    map_info,
    eval_mode: bool,
    snr_range: tuple[float, float] | None = None,
    iterations: int | None = None,
) -> dict:
    """Random simulation + Class2D settings for one dataset."""
    path, map_pixel = map_info
    diameter = map_diameter_angstrom(path, map_pixel)
    box = int(rng.choice([48, 56, 64] if eval_mode else [32, 40, 48, 48, 56]))
    frac = rng.uniform(0.5, 0.75)
    pixel = diameter / (frac * box)
    if eval_mode:
        junk_fraction, junk_types = 0.2, list(JUNK_TYPES)
    else:
        junk_fraction = float(rng.choice([0.1, 0.2, 0.3, 0.4]))
        n_types = int(rng.integers(2, len(JUNK_TYPES) + 1))
        junk_types = sorted(
            rng.choice(JUNK_TYPES, size=n_types, replace=False).tolist()
        )
    mask = min(diameter * rng.uniform(1.05, 1.25), (box - 3) * pixel)
    settings = {
        "map": str(path),
        "map_name": map_name,
        "map_pixel_size": float(map_pixel),
        "box": box,
        "pixel_size": round(float(pixel), 3),
        "n_particles": int(
            rng.integers(1200, 1601) if eval_mode else rng.integers(800, 1401)
        ),
        "junk_fraction": junk_fraction,
        "junk_types": junk_types,
        "snr": round(
            float(math.exp(rng.uniform(math.log(0.03), math.log(0.15))))
            if eval_mode
            else float(math.exp(rng.uniform(math.log(0.02), math.log(0.3)))),
            4,
        ),
        "ctf": bool(eval_mode or rng.random() < 0.85),
        "defocus_max_um": round(float(rng.uniform(1.5, 3.0)), 2),
        "classes": int(rng.integers(10, 15) if eval_mode else rng.integers(8, 17)),
        "iterations": 30 if eval_mode else int(rng.choice([25, 30])),
        "mask_diameter": round(float(mask), 1),
        "seed": int(rng.integers(1, 10**6)),
    }
    # overrides (applied after all draws, so the random sequence stays the same)
    if snr_range is not None:
        lo, hi = snr_range
        settings["snr"] = round(lo * (hi / lo) ** ((settings["seed"] % 1000) / 999), 4)
    if iterations is not None:
        settings["iterations"] = int(iterations)
    return settings


def run_dataset(directory: Path, settings: dict) -> bool:
    """Simulate + Class2D into ``directory`` (skipped when already complete)."""
    done = directory / "done.json"
    if done.exists():
        return True
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if SUBPROCESS_PYTHONPATH:
        env["PYTHONPATH"] = os.pathsep.join(SUBPROCESS_PYTHONPATH)
    s = settings
    simulate = [
        *CRYOAVG, "simulate", f"map={s['map']}", f"output={directory / 'sim'}",
        f"n_particles={s['n_particles']}", f"junk_fraction={s['junk_fraction']}",
        f"junk_types=[{','.join(s['junk_types'])}]", f"snr={s['snr']}", f"box={s['box']}",
        f"pixel_size={s['pixel_size']}", f"map_pixel_size={s['map_pixel_size']}",
        f"ctf={str(s['ctf']).lower()}", f"defocus_max_um={s['defocus_max_um']}",
        f"seed={s['seed']}",
    ]  # fmt: skip
    class2d = [
        *CRYOAVG, "class2d", f"particles={directory / 'sim' / 'particles.star'}",
        f"output={directory / 'c2d'}", f"classes={s['classes']}",
        f"iterations={s['iterations']}", "write_every=5",
        f"mask_diameter={s['mask_diameter']}", f"ctf={str(s['ctf']).lower()}",
        f"seed={s['seed']}", "logger.enabled=false", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    start = time.time()
    for name, cmd in (("simulate", simulate), ("class2d", class2d)):
        if name == "simulate" and (directory / "sim" / "ground_truth.star").exists():
            continue
        with open(directory / f"{name}.log", "w") as log:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
            )
        if rc.returncode != 0:
            print(f"FAILED {name} in {directory} (see log)", flush=True)
            return False
    done.write_text(json.dumps({**settings, "seconds": time.time() - start}))
    print(f"done {directory.name} in {time.time() - start:.0f} s", flush=True)
    return True


def dataset_plan(
    seed: int | list[int],
    n_datasets: int,
    maps: dict,
    eval_mode: bool,
    prefix: str | None = None,
    **overrides,
) -> list[tuple[str, dict]]:
    """Names and settings of the datasets (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    prefix = prefix or ("eval" if eval_mode else "train")
    names = sorted(maps)
    plan = []
    for i in range(n_datasets):
        map_name = names[i % len(names)]
        settings = dataset_settings(
            rng, map_name, maps[map_name], eval_mode, **overrides
        )
        plan.append((f"{prefix}{i:03d}_{map_name}", settings))
    return plan


def run_plan(work: Path, plan: list[tuple[str, dict]], jobs: int) -> list[Path]:
    """Run the datasets of ``plan`` with ``jobs`` parallel workers."""

    def one(item):
        name, settings = item
        return work / name if run_dataset(work / name, settings) else None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, plan))
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- samples
def class_table(
    c2d: Path, gt: pd.DataFrame, iteration: int
) -> tuple[pd.DataFrame, dict]:
    """Per-class model values, counts and purity of one Class2D snapshot."""
    model = starfile.read(c2d / f"run_it{iteration:03d}_model.star", always_dict=True)
    classes = model["model_classes"].reset_index(drop=True)
    general = model["model_general"]
    data = starfile.read(c2d / f"run_it{iteration:03d}_data.star", always_dict=True)[
        "particles"
    ]
    merged = data[["rlnImageName", "rlnClassNumber"]].merge(
        gt[["rlnImageName", "rlnIsJunk"]], on="rlnImageName", how="left"
    )
    k = len(classes)
    number = merged.rlnClassNumber.to_numpy().astype(int)
    assigned = (number >= 1) & (number <= k)  # VDAM: 0 = not yet seen
    counts = np.bincount(number[assigned] - 1, minlength=k)
    real = np.bincount(
        number[assigned] - 1,
        weights=(merged.rlnIsJunk.to_numpy()[assigned] == 0).astype(float),
        minlength=k,
    )
    classes["n_assigned"] = counts
    classes["n_real"] = real
    classes["purity"] = np.where(counts > 0, real / np.maximum(counts, 1), 0.0)
    return classes, general


def is_good(n_assigned: np.ndarray, purity: np.ndarray) -> np.ndarray:
    """The label rule: ≥ MIN_PARTICLES particles and ≥ GOOD_PURITY real."""
    return (np.asarray(n_assigned) >= MIN_PARTICLES) & (
        np.asarray(purity) >= GOOD_PURITY
    )


def soft_target(n_assigned: np.ndarray, purity: np.ndarray) -> np.ndarray:
    """Training target in [0, 1]."""
    t = np.clip((np.asarray(purity) - 0.6) / 0.3, 0.0, 1.0)
    return np.where(np.asarray(n_assigned) >= MIN_PARTICLES, t, 0.0)


def snapshot_features(
    c2d: Path, classes: pd.DataFrame, general: dict, iteration: int, diameter
) -> tuple[np.ndarray, np.ndarray]:
    """Features / images of one snapshot's classes (with all model values)."""
    images = torch.from_numpy(
        mrcfile.read(c2d / f"run_it{iteration:03d}_classes.mrcs")
        .astype(np.float32)
        .copy()
    )
    n_total = float(classes.n_assigned.sum())
    dist = classes.rlnClassDistribution.to_numpy(dtype=float)
    return compute_features(
        images,
        pixel_size_angstrom=float(general["rlnPixelSize"]),
        particle_diameter_angstrom=diameter,
        class_distribution=dist,
        n_particles=dist * n_total,
        accuracy_rotation_deg=classes.rlnAccuracyRotations.to_numpy(dtype=float),
        accuracy_translation_angst=classes.rlnAccuracyTranslationsAngst.to_numpy(
            dtype=float
        ),
        resolution_angstrom=classes.rlnEstimatedResolution.to_numpy(dtype=float),
    )


def dataset_samples(directory: Path, min_iteration: int = 10) -> dict[str, np.ndarray]:
    """All samples of one dataset (cached in ``samples.npz``)."""
    cache = directory / "samples.npz"
    if cache.exists():
        return dict(np.load(cache))
    settings = json.loads((directory / "done.json").read_text())
    gt = starfile.read(directory / "sim" / "ground_truth.star", always_dict=True)[
        "particles"
    ]
    c2d = directory / "c2d"
    iterations = sorted(
        int(p.name[6:9])
        for p in c2d.glob("run_it*_model.star")
        if int(p.name[6:9]) >= min_iteration
    )
    out: dict[str, list] = {k: [] for k in SAMPLE_FIELDS}
    for it in iterations:
        classes, general = class_table(c2d, gt, it)
        for variant, diameter in enumerate((settings["mask_diameter"], None)):
            feats, imgs = snapshot_features(c2d, classes, general, it, diameter)
            out["features"].append(feats)
            out["images"].append(imgs.astype(np.float16))
            out["target"].append(soft_target(classes.n_assigned, classes.purity))
            out["good"].append(is_good(classes.n_assigned, classes.purity))
            out["n"].append(classes.n_assigned.to_numpy())
            out["purity"].append(classes.purity.to_numpy())
            out["iteration"].append(np.full(len(classes), it))
            out["variant"].append(np.full(len(classes), variant))
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    np.savez_compressed(cache, **arrays)
    return arrays


# ----------------------------------------------------------------------------- synthetic
#: junk kinds of the synthetic (sharp, high-SNR) averages: the simulator's five kinds
SYNTHETIC_JUNK = ("noise", "ice", "carbon", "aggregate", "offcentre")


def _projections(
    volume: torch.Tensor,
    n: int,
    map_pixel: float,
    pixel: float,
    canvas: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(n, canvas, canvas)`` noise-free, CTF-free projections at ``pixel`` Å/px."""
    if n == 0:
        return torch.zeros(0, canvas, canvas, dtype=torch.float64)
    proj = project_volume_2d(volume, random_rotations(n, generator=generator))
    size = proj.shape[-1]
    new_size = max(8, round(size * map_pixel / pixel))
    proj = resize_fourier_2d(proj.to(torch.float64), new_size)
    out = torch.zeros(n, canvas, canvas, dtype=torch.float64)
    if new_size <= canvas:
        lo = canvas // 2 - new_size // 2
        out[:, lo : lo + new_size, lo : lo + new_size] = proj
    else:
        lo = new_size // 2 - canvas // 2
        out = proj[:, lo : lo + canvas, lo : lo + canvas].clone()
    return out


def synthetic_job(
    rng: np.random.Generator,
    volume: torch.Tensor,
    map_pixel: float,
    diameter: float,
) -> dict:
    """One "job" of sharp class averages: 4–8 good views and 4–8 junk analogues.

    Good: a clean (noise-free, CTF-free) projection of the map at a random orientation,
    0–9 % of the box off-centre (a class average need not be perfectly centred). Junk: the simulator's five kinds (structureless
    noise, ice discs, a carbon edge, 2–4 overlapping projections, one projection 30–48 %
    of the box off-centre). Every image then gets the same random treatment: white noise
    at an "average SNR" of 0.5–300 (log-uniform), a B-factor of 0–1200 Å², a low-frequency
    suppression (the dark halo of CTF-corrected averages; amplitude 0–0.95, cut-off
    100–400 Å), in half of the jobs a soft circular mask (zero background), in a third a
    clipping of the brightest 1–25 % (saturated export) — so sharpness, masking and
    clipping say nothing about the label. Box 48–160 px, particle 40–75 % of the box.
    """
    box = int(rng.choice([48, 64, 96, 128, 160]))
    pixel = diameter / (rng.uniform(0.4, 0.75) * box)
    canvas = 2 * box
    n_good = int(rng.integers(4, 9))
    kinds = rng.choice(SYNTHETIC_JUNK, size=int(rng.integers(4, 9))).tolist()
    generator = torch.Generator().manual_seed(int(rng.integers(1, 2**31)))
    radius = diameter / (2 * pixel)
    c = torch.arange(canvas, dtype=torch.float64) - canvas // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    signals = [_projections(volume, n_good, map_pixel, pixel, canvas, generator)]
    good_direction = rng.uniform(0, 2 * np.pi, n_good)
    good_distance = rng.uniform(0, 0.09, n_good) * box
    shifts = [
        torch.from_numpy(
            np.stack(
                [
                    good_distance * np.sin(good_direction),
                    good_distance * np.cos(good_direction),
                ],
                1,
            )
        )
    ]
    for kind in kinds:
        if kind in ("aggregate", "offcentre"):
            n_copies = int(rng.integers(2, 5)) if kind == "aggregate" else 1
            copies = _projections(volume, n_copies, map_pixel, pixel, canvas, generator)
            direction = rng.uniform(0, 2 * np.pi, n_copies)
            if kind == "aggregate":
                distance = rng.uniform(0.35, 0.7, n_copies) * 2 * radius
                distance[0] *= rng.uniform(0.0, 0.5)
            else:
                distance = rng.uniform(0.3, 0.48, n_copies) * box
            offsets = torch.from_numpy(
                np.stack(
                    [distance * np.sin(direction), distance * np.cos(direction)], 1
                )
            )
            signals.append(shift_images_2d(copies, offsets).sum(0, keepdim=True))
        elif kind == "ice":
            image = torch.zeros(canvas, canvas, dtype=torch.float64)
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(-0.5, 0.5, 2) * box
                disc = rng.uniform(0.2, 0.5) * box
                dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
                sign = rng.choice([-1.0, 1.0])
                image += (
                    sign
                    * rng.uniform(1, 3)
                    * 0.5
                    * (1 - torch.tanh((dist - disc) / rng.uniform(1.5, 4.0)))
                )
            signals.append(image[None])
        elif kind == "carbon":
            angle = rng.uniform(0, 2 * np.pi)
            along = np.cos(angle) * xx + np.sin(angle) * yy
            offset = rng.uniform(-0.3, 0.3) * box
            signals.append(
                (0.5 * (1 + torch.tanh((along - offset) / rng.uniform(1.0, 3.0))))[None]
            )
        else:  # noise: no signal at all
            signals.append(torch.zeros(1, canvas, canvas, dtype=torch.float64))
        shifts.append(torch.zeros(1, 2, dtype=torch.float64))
    signal = shift_images_2d(torch.cat(signals), torch.cat(shifts))
    k = signal.shape[0]
    disc = (yy**2 + xx**2) <= radius**2
    scale = signal[:, disc].std(dim=-1)
    signal = (
        signal / torch.where(scale > 1e-9, scale, torch.ones_like(scale))[:, None, None]
    )
    snr = np.exp(rng.uniform(np.log(0.5), np.log(300.0), k))
    noisy = (
        signal
        + torch.randn(signal.shape, generator=generator, dtype=torch.float64)
        / torch.from_numpy(np.sqrt(snr))[:, None, None]
    )
    s = (
        torch.sqrt(
            (
                fftfreq_grid(
                    (canvas, canvas), rfft=True, fftshift=False, dtype=torch.float64
                )
                ** 2
            ).sum(-1)
        )
        / pixel
    )  # 1/Å
    bfactor = torch.from_numpy(rng.uniform(0, 1200, k))[:, None, None]
    halo = torch.from_numpy(rng.uniform(0, 0.95, k))[:, None, None]
    cutoff = torch.from_numpy(1.0 / rng.uniform(100, 400, k))[:, None, None]
    weights = torch.exp(-bfactor * s**2 / 4) * (
        1 - halo * torch.exp(-((s / cutoff) ** 2))
    )
    images = torch.fft.irfft2(torch.fft.rfft2(noisy) * weights, s=(canvas, canvas))
    lo = canvas // 2 - box // 2
    images = images[:, lo : lo + box, lo : lo + box]
    mask_diameter = float(min(diameter * rng.uniform(1.05, 1.25), (box - 3) * pixel))
    if rng.random() < 0.5:
        r = torch.sqrt(
            yy[lo : lo + box, lo : lo + box] ** 2
            + xx[lo : lo + box, lo : lo + box] ** 2
        )
        edge = rng.uniform(2, 6)
        mask = 0.5 * (1 - torch.tanh((r - mask_diameter / (2 * pixel)) / edge * 2))
        images = images * mask
    if rng.random() < 1 / 3:
        flat = images.reshape(k, -1)
        top = torch.quantile(flat, float(1 - rng.uniform(0.01, 0.25)), dim=1)
        images = torch.minimum(images, top[:, None, None])
    good = np.zeros(k, dtype=bool)
    good[:n_good] = True
    return {
        "images": images.float(),
        "good": good,
        "pixel": float(pixel),
        "mask_diameter": mask_diameter,
    }


def synthetic_samples(
    work: Path, maps: dict[str, tuple[Path, float]], seed: int, n_jobs: int
) -> dict[str, np.ndarray]:
    """Samples from ``n_jobs`` synthetic jobs (:func:`synthetic_job`), cached in ``work``.

    Targets are 1 (good) and 0 (junk); the model feature groups are all marked missing (a
    bare stack), the job-relative contrast included. Both CNN-window variants (mask
    diameter, default diameter) are kept, as for the Class2D samples.
    """
    cache = work / f"synthetic_s{seed}_n{n_jobs}.npz"
    if cache.exists():
        return dict(np.load(cache))
    rng = np.random.default_rng([seed, 20251122])
    names = sorted(maps)
    volumes = {}
    for name in names:
        path, map_pixel = maps[name]
        data = mrcfile.read(path).astype(np.float32)
        volumes[name] = (
            torch.from_numpy(data.copy()),
            map_pixel,
            map_diameter_angstrom(path, map_pixel),
        )
    out: dict[str, list] = {k: [] for k in SAMPLE_FIELDS}
    job_cols = group_columns()["job"]
    for j in range(n_jobs):
        volume, map_pixel, diameter = volumes[names[j % len(names)]]
        job = synthetic_job(rng, volume, map_pixel, diameter)
        k = len(job["good"])
        for variant, d in enumerate((job["mask_diameter"], None)):
            feats, imgs = compute_features(
                job["images"],
                pixel_size_angstrom=job["pixel"],
                particle_diameter_angstrom=d,
            )
            feats[:, job_cols[:-1]] = 0.0
            feats[:, job_cols[-1]] = 1.0
            out["features"].append(feats)
            out["images"].append(imgs.astype(np.float16))
            out["target"].append(job["good"].astype(np.float64))
            out["good"].append(job["good"])
            out["n"].append(np.full(k, -1))
            out["purity"].append(job["good"].astype(np.float64))
            out["iteration"].append(np.full(k, -1))
            out["variant"].append(np.full(k, variant))
    arrays = {key: np.concatenate(v) for key, v in out.items()}
    np.savez_compressed(cache, **arrays)
    return arrays


# ----------------------------------------------------------------------------- training
def drop_groups(
    features: torch.Tensor,
    generator: torch.Generator,
    p_all: float = 0.3,
    p_each: float = 0.25,
) -> torch.Tensor:
    """Randomly mark model feature groups missing (values 0, indicator 1)."""
    features = features.clone()
    b = features.shape[0]
    drop_all = torch.rand(b, generator=generator) < p_all
    for cols in group_columns().values():
        drop = drop_all | (torch.rand(b, generator=generator) < p_each)
        features[drop.nonzero()[:, 0][:, None], torch.tensor(cols[:-1])[None]] = 0.0
        features[drop, cols[-1]] = 1.0
    return features


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation by a multiple of 90° and random flip per image."""
    out = images.clone()
    k = torch.randint(0, 4, (images.shape[0],), generator=generator)
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    for r in range(4):
        idx = (k == r).nonzero()[:, 0]
        if len(idx):
            out[idx] = torch.rot90(out[idx], r, dims=(-2, -1))
    out[flip] = out[flip].flip(-1)
    return out


def train(
    samples: dict[str, np.ndarray], seed: int, epochs: int, out_path: Path, meta: dict
):
    """Train and save the network."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    features = torch.from_numpy(samples["features"]).float()
    images = torch.from_numpy(samples["images"].astype(np.float32))
    target = torch.from_numpy(samples["target"]).float()
    model = ClassRankerNet(n_features=features.shape[1])
    # feature standardisation from the training data (indicator columns left as is)
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-3)
    indicator = torch.tensor([n.endswith("_missing") for n in feature_names()])
    mean[indicator] = 0.0
    std[indicator] = 1.0
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    n = len(target)
    pos_weight = float((target < 0.5).sum()) / max(float((target >= 0.5).sum()), 1.0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 64
    steps = epochs * math.ceil(n / batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=steps
    )
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            x = augment_images(images[idx], generator)
            f = drop_groups(features[idx], generator)
            y = target[idx]
            w = torch.where(y >= 0.5, torch.ones_like(y), torch.full_like(y, 1.0))
            w = torch.where(
                y < 0.5, w * min(max(1.0 / max(pos_weight, 1e-3), 0.5), 2.0), w
            )
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model.logits(x, f), y, weight=w
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 5 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch:3d} loss {total / n:.4f}", flush=True)
    model.eval()
    digest = save_checkpoint(out_path, model, feature_names(), meta)
    print(f"saved {out_path} ({out_path.stat().st_size / 1e6:.2f} MB) sha256 {digest}")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="cache directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n-datasets", type=int, default=24)
    parser.add_argument(
        "--jobs", type=int, default=2, help="parallel simulate/class2d runs"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--n-blobs", type=int, default=8, help="random blob-protein maps"
    )
    parser.add_argument(
        "--shared-maps", action="store_true", default=SHARED_MAPS.is_dir()
    )
    parser.add_argument(
        "--n-sharp-datasets",
        type=int,
        default=8,
        help="extra Class2D datasets at SNR 0.3-3 (dense maps, HSP60, 3 blobs)",
    )
    parser.add_argument(
        "--n-dense", type=int, default=4, help="random detailed (dense) maps"
    )
    parser.add_argument(
        "--n-synthetic-jobs",
        type=int,
        default=64,
        help="jobs of sharp synthetic averages (projections + junk analogues)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    parser.add_argument(
        "--cryoavg-path",
        default=None,
        help="source tree (with configs/) for subprocesses",
    )
    args = parser.parse_args(argv)
    if args.cryoavg_path:
        SUBPROCESS_PYTHONPATH.append(str(Path(args.cryoavg_path).resolve()))
    torch.set_num_threads(args.threads)
    names = ["hsp60_D7_48px"] + [
        f"blob{args.seed * 100 + i}" for i in range(args.n_blobs)
    ]
    if args.shared_maps:
        names += [
            p.stem for p in sorted(SHARED_MAPS.glob("*.mrc")) if p.stem not in names
        ]
    names = [n for n in names if n not in HELD_OUT]
    dense = [f"dense{args.seed * 100 + i}" for i in range(args.n_dense)]
    all_maps = prepare_maps(args.work, names + dense)
    maps = {n: all_maps[n] for n in names}
    plan = dataset_plan(args.seed, args.n_datasets, maps, eval_mode=False)
    # sharp datasets: the dense maps, HSP60 and three blob maps (one round of 8)
    sharp_maps = {n: all_maps[n] for n in dense + names[:4] if n in all_maps}
    plan += dataset_plan(
        [args.seed, 1],
        args.n_sharp_datasets,
        sharp_maps,
        eval_mode=False,
        prefix="sharp",
        snr_range=SHARP_SNR,
    )
    start = time.time()
    directories = run_plan(args.work, plan, args.jobs)
    print(
        f"{len(directories)}/{len(plan)} datasets ready ({time.time() - start:.0f} s)",
        flush=True,
    )
    if args.generate_only:
        return
    start = time.time()
    parts = [dataset_samples(d) for d in directories]
    n_class2d = sum(len(p["good"]) for p in parts)
    if args.n_synthetic_jobs > 0:
        parts.append(
            synthetic_samples(args.work, all_maps, args.seed, args.n_synthetic_jobs)
        )
    samples = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    good = samples["good"]
    print(
        f"{len(good)} samples ({n_class2d} Class2D, {len(good) - n_class2d} "
        f"synthetic), {int(good.sum())} good, maps {sorted(all_maps)} "
        f"({time.time() - start:.0f} s)",
        flush=True,
    )
    meta = {
        "seed": args.seed,
        "n_datasets": len(directories),
        "n_sharp_datasets": args.n_sharp_datasets,
        "n_synthetic_jobs": args.n_synthetic_jobs,
        "n_samples": len(good),
        "n_synthetic_samples": len(good) - n_class2d,
        "maps": ",".join(sorted(all_maps)),
        "label_rule": f"n >= {MIN_PARTICLES} and purity >= {GOOD_PURITY}",
    }
    start = time.time()
    train(samples, args.seed, args.epochs, args.output, meta)
    print(f"training took {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
