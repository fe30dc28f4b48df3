#!/usr/bin/env python
"""Evaluate the shipped class ranker on held-out simulated data and real class averages.

Held-out datasets: one ``cryoavg simulate`` + ``cryoavg class2d`` run per held-out map
(``train_ranker.HELD_OUT``: ribosome70S, prohibitin, blob proteins 9001 and 9002 — never
seen in training), 20 % junk of all five types, 1200–1600 particles, the last iteration.

Reported:

* particle-level precision / recall / F1 of the particles in the selected classes
  (class score ≥ ``min_score``; positives = real particles, ground truth), for min_score
  0.25 and 0.5, with all model values (``full``) and as a bare stack (``bare``);
* ROC-AUC of the class score against the class label (``train_ranker.is_good``) over all
  snapshots from iteration 10 on;
* the scores of the real class averages ``$CRYOAVG_SHARED/data/class_averages/*.mrc``
  (bare-stack mode, pixel size ``--real-pixel-size`` and 1.0 / 2.0 Å/px), and what drives
  them (:func:`explain_real_averages`; alone with ``--explain-only``).

``--weights`` evaluates another checkpoint than the shipped one.

Usage::

    python scripts/eval_ranker.py --work /tmp/ranker_eval --seed 7 --jobs 1 --threads 1 \\
        --cryoavg-path <copy of the checkout>

Figures of the shipped weights (sha256 248478ae…) on the seed-7 held-out datasets (class
score ≥ 0.25, all model values; in brackets the previous weights bb942087… on the same
datasets): particle F1 blob9001 0.941 (0.971), blob9002 0.956 (0.956), prohibitin 0.897
(0.730), ribosome70S 0.617 (0.000); pooled ROC-AUC 0.945 (0.891), bare stack 0.914 (0.869).
Real averages, bare stack at 1.3 Å/px: fiftys 0.979 (0.969), seventys 0.864 (0.157).
docs/select.md has the full table.
"""

import argparse
import json
import sys
from pathlib import Path

import mrcfile
import numpy as np
import starfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_ranker as tr

from cryoavg.select.features import IMAGE_FEATURES
from cryoavg.select.ranker import load_ranker, score_classes

REAL_AVERAGES = tr.SHARED / "data" / "class_averages"
#: the checkpoint evaluated (``--weights``; None = the shipped one)
WEIGHTS: list[Path | None] = [None]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half)."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (
        pos[:, None] == neg[None, :]
    ).sum()
    return float(greater) / (len(pos) * len(neg))


def particle_metrics(
    selected_classes: np.ndarray, classes: np.ndarray, real: np.ndarray
):
    """Precision, recall, F1 of the particles in ``selected_classes`` (1-based numbers)."""
    chosen = np.isin(classes, selected_classes)
    tp = int((chosen & real).sum())
    precision = tp / max(int(chosen.sum()), 1)
    recall = tp / max(int(real.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return precision, recall, f1


def score_snapshot(c2d: Path, classes, general, iteration: int, mode: str, diameter):
    images = torch.from_numpy(
        mrcfile.read(c2d / f"run_it{iteration:03d}_classes.mrcs")
        .astype(np.float32)
        .copy()
    )
    if mode == "bare":
        return score_classes(
            images,
            pixel_size_angstrom=float(general["rlnPixelSize"]),
            weights=WEIGHTS[0],
        ).scores
    dist = classes.rlnClassDistribution.to_numpy(dtype=float)
    return score_classes(
        images,
        pixel_size_angstrom=float(general["rlnPixelSize"]),
        particle_diameter_angstrom=diameter,
        class_distribution=dist,
        n_particles=dist * float(classes.n_assigned.sum()),
        accuracy_rotation_deg=classes.rlnAccuracyRotations.to_numpy(dtype=float),
        accuracy_translation_angst=classes.rlnAccuracyTranslationsAngst.to_numpy(
            dtype=float
        ),
        resolution_angstrom=classes.rlnEstimatedResolution.to_numpy(dtype=float),
        weights=WEIGHTS[0],
    ).scores


def evaluate_dataset(directory: Path) -> dict:
    settings = json.loads((directory / "done.json").read_text())
    gt = starfile.read(directory / "sim" / "ground_truth.star", always_dict=True)[
        "particles"
    ]
    c2d = directory / "c2d"
    iterations = sorted(
        int(p.name[6:9])
        for p in c2d.glob("run_it*_model.star")
        if int(p.name[6:9]) >= 10
    )
    out: dict = {
        "name": directory.name,
        "map": settings["map_name"],
        "snr": settings["snr"],
    }
    auc_scores: dict[str, list] = {"full": [], "bare": []}
    auc_labels: list = []
    for it in iterations:
        classes, general = tr.class_table(c2d, gt, it)
        auc_labels.append(tr.is_good(classes.n_assigned, classes.purity))
        for mode in ("full", "bare"):
            scores = score_snapshot(
                c2d, classes, general, it, mode, settings["mask_diameter"]
            )
            auc_scores[mode].append(scores)
            if it != iterations[-1]:
                continue
            data = starfile.read(c2d / f"run_it{it:03d}_data.star", always_dict=True)[
                "particles"
            ]
            merged = data[["rlnImageName", "rlnClassNumber"]].merge(
                gt[["rlnImageName", "rlnIsJunk"]], on="rlnImageName"
            )
            real = merged.rlnIsJunk.to_numpy() == 0
            numbers = merged.rlnClassNumber.to_numpy()
            for threshold in (0.25, 0.5):
                selected = np.nonzero(scores >= threshold)[0] + 1
                p, r, f = particle_metrics(selected, numbers, real)
                out[f"{mode}@{threshold}"] = {"precision": p, "recall": r, "f1": f}
            out[f"{mode}_class_scores"] = [
                (round(float(s), 3), int(n), round(float(q), 2))
                for s, n, q in zip(
                    scores, classes.n_assigned, classes.purity, strict=True
                )
            ]
    labels = np.concatenate(auc_labels)
    for mode in ("full", "bare"):
        out[f"{mode}_auc"] = roc_auc(np.concatenate(auc_scores[mode]), labels)
    out["n_classes_auc"] = len(labels)
    out["n_good_auc"] = int(labels.sum())
    return (
        out,
        np.concatenate(auc_scores["full"]),
        np.concatenate(auc_scores["bare"]),
        labels,
    )


def real_average_scores(pixel_size: float, diameter: float | None) -> dict:
    out = {}
    for path in sorted(REAL_AVERAGES.glob("*.mrc")):
        data = mrcfile.read(path).astype(np.float32)
        images = torch.from_numpy(data.reshape(-1, *data.shape[-2:]).copy())
        result = score_classes(
            images,
            pixel_size_angstrom=pixel_size,
            particle_diameter_angstrom=diameter,
            weights=WEIGHTS[0],
        )
        out[path.name] = [round(float(s), 3) for s in result.scores]
    return out


def explain_real_averages(pixel_size: float, n_top: int = 6) -> None:
    """What drives the bare-stack score of each real average (printed).

    For every image: the score; the score with the CNN image blanked (features only);
    the score with all 27 image features set to their training means (CNN only); the
    image features furthest from the training distribution (z-scores against the
    standardisation stored in the weights); and the ``n_top`` features whose reset to the
    training mean changes the score most.
    """
    model, names = load_ranker(WEIGHTS[0])
    mean = model.feature_mean.numpy()
    std = model.feature_std.numpy()
    n_image = len(IMAGE_FEATURES)
    for path in sorted(REAL_AVERAGES.glob("*.mrc")):
        data = mrcfile.read(path).astype(np.float32)
        images = torch.from_numpy(data.reshape(-1, *data.shape[-2:]).copy())
        result = score_classes(
            images, pixel_size_angstrom=pixel_size, weights=WEIGHTS[0]
        )
        feats = torch.from_numpy(result.features)
        imgs = torch.from_numpy(result.images64)
        with torch.no_grad():
            blank = model(torch.zeros_like(imgs), feats).numpy()
            reset = feats.clone()
            reset[:, :n_image] = torch.from_numpy(mean[:n_image])
            cnn_only = model(imgs, reset).numpy()
            for i, score in enumerate(result.scores):
                z = (result.features[i, :n_image] - mean[:n_image]) / std[:n_image]
                far = np.argsort(-np.abs(z))[:n_top]
                deltas = []
                for j in range(n_image):
                    f = feats[i : i + 1].clone()
                    f[0, j] = float(mean[j])
                    deltas.append(float(model(imgs[i : i + 1], f)) - float(score))
                top = np.argsort(-np.abs(deltas))[:n_top]
                print(
                    f"{path.name}[{i}] score {score:.3f}; image blanked {blank[i]:.3f}; "
                    f"image features at training mean {cnn_only[i]:.3f}\n"
                    "  furthest from training (z): "
                    + ", ".join(f"{names[j]} {z[j]:+.1f}" for j in far)
                    + "\n  reset to training mean changes the score by: "
                    + ", ".join(f"{names[j]} {deltas[j]:+.3f}" for j in top)
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--real-pixel-size", type=float, default=1.3)
    parser.add_argument("--real-diameter", type=float, default=None)
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument(
        "--explain-only",
        action="store_true",
        help="only print what drives the scores of the real averages",
    )
    parser.add_argument("--cryoavg-path", default=None)
    parser.add_argument("--snr", type=float, nargs=2, default=None, help="SNR range")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--weights", type=Path, default=None, help="checkpoint (default: shipped)"
    )
    args = parser.parse_args(argv)
    if args.cryoavg_path:
        tr.SUBPROCESS_PYTHONPATH.append(str(Path(args.cryoavg_path).resolve()))
    torch.set_num_threads(args.threads)
    WEIGHTS[0] = args.weights
    if args.explain_only:
        explain_real_averages(args.real_pixel_size)
        return
    maps = tr.prepare_maps(
        args.work,
        [n for n in tr.HELD_OUT if n.startswith("blob") or tr.SHARED_MAPS.is_dir()],
    )
    plan = tr.dataset_plan(
        args.seed,
        len(maps),
        maps,
        eval_mode=True,
        snr_range=args.snr,
        iterations=args.iterations,
    )
    directories = tr.run_plan(args.work, plan, args.jobs)
    if args.generate_only:
        return
    all_full, all_bare, all_labels = [], [], []
    summary = []
    for directory in directories:
        result, full, bare, labels = evaluate_dataset(directory)
        all_full.append(full)
        all_bare.append(bare)
        all_labels.append(labels)
        summary.append(result)
        print(json.dumps(result, indent=1), flush=True)
    labels = np.concatenate(all_labels)
    print(
        f"\npooled ROC-AUC full {roc_auc(np.concatenate(all_full), labels):.3f} "
        f"bare {roc_auc(np.concatenate(all_bare), labels):.3f} "
        f"({len(labels)} classes, {int(labels.sum())} good)"
    )
    print(f"{'dataset':32s} {'mode@thr':10s} {'prec':>6s} {'recall':>6s} {'F1':>6s}")
    for result in summary:
        for key in ("full@0.25", "full@0.5", "bare@0.25", "bare@0.5"):
            m = result[key]
            print(
                f"{result['name']:32s} {key:10s} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f}"
            )
    if REAL_AVERAGES.is_dir():
        for pixel in sorted({args.real_pixel_size, 1.0, 2.0}):
            print(
                f"real averages (bare, {pixel} Å/px, D={args.real_diameter}):",
                real_average_scores(pixel, args.real_diameter),
            )
        explain_real_averages(args.real_pixel_size)


if __name__ == "__main__":
    main()
