#!/usr/bin/env python
"""Train the cryoavg class ranker on class averages that cryoavg itself produced.

Pipeline (every stage is cached under ``--work``, so re-running resumes):

1. ``maps``: 3D maps = the bundled HSP60 map, ``/work/shared/data/maps/*.mrc`` when present
   (``--shared-maps``) and random "blob proteins" (sums of anisotropic Gaussians, compact,
   elongated or ring-like) written by :func:`blob_protein`.
2. ``datasets``: for each of ``--n-datasets`` random settings (seeded from ``--seed``):
   ``cryoavg simulate`` (800–1400 particles, box 32–56, SNR 0.02–0.3 log-uniform, CTF on
   in 85 %, junk fraction 0.1–0.4 with a random subset of the five junk types) and
   ``cryoavg class2d`` (VDAM, K 8–16, 25–30 iterations, snapshots every 5 iterations).
   Held-out maps (``HELD_OUT``: ribosome70S, prohibitin and blob seeds 9001/9002) are never
   used here; ``scripts/eval_ranker.py`` uses them.
3. ``samples``: every class of every snapshot from iteration 10 on is one sample: its
   features + 64×64 image computed twice (with the Class2D mask diameter, and with the
   default diameter as in bare-stack mode), its particle count and its purity from
   ``ground_truth.star`` (fraction of real particles).

   **Label rule** (also used by the evaluation): a class is *good* when it holds at least
   ``MIN_PARTICLES`` = 10 particles and at least ``GOOD_PURITY`` = 85 % of them are real
   particles. For training the target is soft: ``clip((purity − 0.6) / 0.3, 0, 1)`` for
   classes with ≥ 10 particles, 0 otherwise.
4. ``train``: Adam, BCE on the soft target, balanced by class weights; augmentation by the 8
   rotations/flips of the 64×64 images and random drop-out (set to "missing") of the model
   feature groups (job contrast, distribution, counts, resolution, accuracies; all of them
   together in 30 % of the samples = bare-stack mode). CPU, ``torch`` seeded from ``--seed``.
   Writes ``cryoavg/select/weights/class_ranker_v1.pt`` + ``.sha256``.

Usage::

    python scripts/train_ranker.py --work /tmp/ranker_work --seed 1 --n-datasets 24 \\
        --jobs 2 --epochs 20 --cryoavg-path <copy of the checkout>

(the shipped class_ranker_v1.pt was made by exactly this: 24 datasets, 2398 samples, ~45 min
wall on a shared 2-core CPU, of which ~12 min training).
"""

import argparse
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

from cryoavg.select.features import compute_features, feature_names, group_columns
from cryoavg.select.network import ClassRankerNet, save_checkpoint
from cryoavg.simulate.particles import JUNK_TYPES, particle_radius_px

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "cryoavg" / "select" / "weights" / "class_ranker_v1.pt"
SHARED_MAPS = REPO.parent / "shared" / "data" / "maps"
MIN_PARTICLES = 10
GOOD_PURITY = 0.85
#: maps (by name) that only the evaluation uses
HELD_OUT = ("ribosome70S_65px", "prohibitin_ring_56px", "blob9001", "blob9002")
#: Å/px of maps whose header is wrong (see /work/shared/data/README.md)
MAP_PIXEL_SIZES = {"ribosome70S_65px": 5.0}
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


def prepare_maps(work: Path, names: list[str]) -> dict[str, tuple[Path, float]]:
    """Write/locate the maps; returns name -> (path, Å/px)."""
    out = {}
    (work / "maps").mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.startswith("blob"):
            path = work / "maps" / f"{name}.mrc"
            if not path.exists():
                with mrcfile.new(path, overwrite=True) as mrc:
                    mrc.set_data(blob_protein(int(name[4:])))
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
    seed: int, n_datasets: int, maps: dict, eval_mode: bool, **overrides
) -> list[tuple[str, dict]]:
    """Names and settings of the datasets (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    names = sorted(maps)
    plan = []
    for i in range(n_datasets):
        map_name = names[i % len(names)]
        settings = dataset_settings(
            rng, map_name, maps[map_name], eval_mode, **overrides
        )
        plan.append((f"{'eval' if eval_mode else 'train'}{i:03d}_{map_name}", settings))
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
    out: dict[str, list] = {
        k: []
        for k in (
            "features",
            "images",
            "target",
            "good",
            "n",
            "purity",
            "iteration",
            "variant",
        )
    }
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
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--n-blobs", type=int, default=8, help="random blob-protein maps"
    )
    parser.add_argument(
        "--shared-maps", action="store_true", default=SHARED_MAPS.is_dir()
    )
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
    torch.set_num_threads(2)
    names = ["hsp60_D7_48px"] + [
        f"blob{args.seed * 100 + i}" for i in range(args.n_blobs)
    ]
    if args.shared_maps:
        names += [
            p.stem for p in sorted(SHARED_MAPS.glob("*.mrc")) if p.stem not in names
        ]
    names = [n for n in names if n not in HELD_OUT]
    maps = prepare_maps(args.work, names)
    plan = dataset_plan(args.seed, args.n_datasets, maps, eval_mode=False)
    directories = run_plan(args.work, plan, args.jobs)
    print(f"{len(directories)}/{len(plan)} datasets ready", flush=True)
    if args.generate_only:
        return
    parts = [dataset_samples(d) for d in directories]
    samples = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    good = samples["good"]
    print(f"{len(good)} samples, {int(good.sum())} good, maps {names}", flush=True)
    meta = {
        "seed": args.seed,
        "n_datasets": len(directories),
        "n_samples": len(good),
        "maps": ",".join(names),
        "label_rule": f"n >= {MIN_PARTICLES} and purity >= {GOOD_PURITY}",
    }
    train(samples, args.seed, args.epochs, args.output, meta)


if __name__ == "__main__":
    main()
