"""Validation of ``cryoavg refine3d`` with local symmetry on a pseudo-dimer (issue #6).

A β-tubulin subunit (``../shared/data/maps/beta_tubulin_20px.mrc``, resampled to 14 px at
7.35 Å/px) is placed twice in a 32-px box, the second copy related to the first by a known
operator ``T(x) = R x + t`` (spec §D.1; 160° about a tilted axis, so the dimer is
pseudo-2-fold). The dimer is built on a 2× grid and Fourier-cropped, so copy B is an
accurate copy of A. The local-symmetry mask is made from copy A's density as
``relion_mask_create`` would and does not reach copy B; mask and operator are written as a
RELION STAR file and read back as ``refine3d`` reads them. Particles (CTF, SNR ``--snr``)
are refined from the truth low-passed to ``--lowpass`` Å, for T = 1 and T = 2, each with
and without ``local_symmetry`` — same data, seed and settings, only that switch differs —
for every seed of ``--seeds``.

Printed per run: the gold-standard resolution; the FSC to the truth inside the mask of
both copies (mean over shells 1..N/2, and at a few shells) of the final map (the final
iteration imposes no local symmetry, as RELION), of the final map after imposing the
operators (what a user does next: ``localsym apply``) and of each half-reference before
the final iteration (what local symmetry acts on during refinement); the particles' pose
errors against the simulated truth (angle of ``A_found A_trueᵀ``; median per iteration,
fraction > 90°: mostly the pseudo-2-fold swap of the copies) and the CPU time.

Pose errors are calibrated by an *oracle*: one E-step of the same particles against the
TRUE map on the 15° grid (σ²-weighted cross-correlation, as ``firstiter_cc``). Uniformly
random poses have a median error of ≈ 126.5°.

Usage::

    python scripts/benchmark_refine3d.py [--particles 800] [--snr 0.2] [--iterations 8]
        [--seeds 7 8] [--oversampling 2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryoavg.class2d.preprocess import ctf_images, prepare_estep_batch
from cryoavg.class2d.sampling import PixelSet
from cryoavg.io.mrc import read_map_3d, write_mrc
from cryoavg.localsym.apply import transform_map
from cryoavg.localsym.io import read_mask_info, write_operator_star
from cryoavg.localsym.masks import create_mask
from cryoavg.localsym.operators import (
    LocalSymmetryOperator,
    MaskOperators,
    operators_to_tensors,
)
from cryoavg.ops.fourier import resize_fourier_3d
from cryoavg.ops.rotations import axis_angle_to_matrix, euler_angles_to_matrix
from cryoavg.ops.shifts import translation_grid_2d
from cryoavg.recon.estep3d import SliceProjector, expectation_step_3d
from cryoavg.recon.fsc import fourier_shell_correlation
from cryoavg.recon.orientations import OrientationGrid, rotation_distance_degrees
from cryoavg.recon.refine import (
    LocalSymmetry,
    RefineData,
    RefineSettings,
    initial_noise_spectrum,
    initial_state,
    refine_iteration,
)
from cryoavg.simulate.particles import (
    SimulationParameters,
    fit_volume_to_box,
    simulate_particles,
)

BOX = 32
SUBUNIT_PX = 14
MAP = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "maps"
    / "beta_tubulin_20px.mrc"
)


def pseudo_dimer(
    path: Path,
    separation_px: float = 5.5,
    mask_threshold: float = 0.1,
    oversampling: int = 2,
):
    """The truth, the mask of copy A, the operator (Å) and the pixel size.

    The dimer is built on a grid ``oversampling`` times finer and Fourier-cropped to
    the box, so copy B is an accurate copy of A (one trilinear resampling at the
    finer sampling) rather than a blurred one. The mask is made from copy A's density
    as ``relion_mask_create`` would (low-pass 20 Å, threshold ``mask_threshold`` ×
    max, extended 1.5 px, 2-px soft edge); it must not reach copy B.
    """
    data, header = read_map_3d(path)
    pixel = float(header or 5.144) * data.shape[0] / SUBUNIT_PX
    q = int(oversampling)
    subunit = resize_fourier_3d(torch.from_numpy(data).float(), SUBUNIT_PX * q)
    subunit = fit_volume_to_box(subunit, BOX * q)
    centre_a = torch.tensor([-separation_px, 0.5, 0.0], dtype=torch.float64)  # xyz px
    rotation = axis_angle_to_matrix(
        torch.tensor([0.25, 0.35, 1.0], dtype=torch.float64)
        / math.sqrt(0.25**2 + 0.35**2 + 1.0)
        * math.radians(160.0)
    )
    centre_b = torch.tensor([separation_px, -0.5, 0.5], dtype=torch.float64)
    translation = centre_b - rotation @ centre_a  # T(c_A) = c_B
    fine_a = transform_map(subunit, torch.eye(3), (centre_a * q).float())
    fine_b = transform_map(fine_a, rotation.float(), (translation * q).float())
    copy_a = resize_fourier_3d(fine_a, BOX)
    truth = resize_fourier_3d(fine_a + fine_b, BOX)
    mask_a = create_mask(
        copy_a,
        mask_threshold * float(copy_a.max()),
        1.5,
        2.0,
        lowpass_angstrom=20.0,
        pixel_size_angstrom=pixel,
    )
    operator = LocalSymmetryOperator.from_matrix(rotation, translation * pixel)
    return truth, mask_a, operator, pixel


def masked_fsc(volume, truth, mask):
    return fourier_shell_correlation(volume * mask, truth * mask)


def pose_errors(angles_degrees, true_angles_degrees):
    """``(n,)`` rotation angle (degrees) between found and true poses."""
    return rotation_distance_degrees(
        euler_angles_to_matrix(angles_degrees.double()),
        euler_angles_to_matrix(true_angles_degrees.double()),
    ).diagonal()


def oracle_poses(truth, data, images, step_degrees, mask_radius_px, offset_range_px):
    """Best poses of one E-step against the true map (σ²-weighted CC, full size)."""
    n, box = data.n_particles, data.box_size
    pixel_set = PixelSet.for_size(box, box)
    grid = OrientationGrid.uniform(step_degrees)
    references = SliceProjector(truth)(grid.angles_degrees, pixel_set)
    translations = translation_grid_2d(offset_range_px, 1.0, dtype=torch.float64)
    sigma2 = initial_noise_spectrum(data)
    ctf = ctf_images(data.ctf_parameters, box)
    angles, offsets = [], []
    for start in range(0, n, 200):
        rows = torch.arange(start, min(n, start + 200))
        batch = prepare_estep_batch(
            images[rows],
            index=rows,
            optics_group=data.optics_group[rows],
            group=data.group[rows],
            offset_px=torch.zeros(rows.numel(), 2),
            norm_correction=torch.ones(rows.numel()),
            ctf=ctf[rows],
            sigma2_noise=sigma2,
            scale=torch.ones(1),
            avg_norm=1.0,
            pixel_set=pixel_set,
            mask_radius_px=mask_radius_px,
            mask_edge_px=5.0,
            zero_mask=True,
            do_norm=False,
        )
        result = expectation_step_3d(
            batch, references, translations, pixel_set, mode="cc"
        )
        angles.append(grid.angles_degrees[result.best_orientation])
        offsets.append(result.best_offset_px)
    return torch.cat(angles), torch.cat(offsets)


def _simulate(truth, pixel, args, seed):
    params = SimulationParameters(
        n_particles=args.particles,
        box_size=BOX,
        pixel_size_angstrom=pixel,
        junk_fraction=0.0,
        snr=args.snr,
        shift_sigma_px=1.0,
        defocus_min_um=1.0,
        defocus_max_um=2.5,
        seed=seed,
    )
    sim = simulate_particles(truth, params)
    n = args.particles
    images = sim.images
    data = RefineData(
        read_images=lambda idx: images[torch.as_tensor(np.asarray(idx))],
        n_particles=n,
        box_size=BOX,
        pixel_size_angstrom=pixel,
        halves=torch.as_tensor(np.where(np.arange(n) % 2 == 0, 1, 2)),
        optics_group=torch.zeros(n, dtype=torch.long),
        group=torch.zeros(n, dtype=torch.long),
        ctf_parameters=sim.ctf_parameters(params),
    )
    return sim, data


def _run(truth, data, sim, symmetry, apply_symmetry, region, pixel, args, tau2, seed):
    """One refinement; returns the figures of one table row."""
    step = 15.0
    settings = RefineSettings(
        n_iterations=args.iterations,
        algorithm=args.algorithm,
        tau2_fudge=tau2,
        particle_diameter_angstrom=(BOX - 4) * pixel,
        angular_step_degrees=step,
        offset_range_px=2.0,
        initial_lowpass_angstrom=args.lowpass,
        seed=seed,
    )
    started = time.process_time()
    state = initial_state(truth, data, settings)
    refs = None
    medians = []
    for _ in range(args.iterations):
        if state.iteration == args.iterations - 1:
            refs = state.references.clone()  # last (symmetrised) half-references
        refine_iteration(state, data, settings, local_symmetry=symmetry)
        err = pose_errors(state.angles_degrees, sim.angles_degrees)
        medians.append(float(err.median()))
    fsc_map = masked_fsc(state.final_map, truth, region)
    # each half-reference against the truth (what local symmetry acts on), averaged
    fsc_ref = 0.5 * (
        masked_fsc(refs[0], truth, region) + masked_fsc(refs[1], truth, region)
    )
    # what a user does next: impose the operators on the final map (localsym apply)
    fsc_applied = masked_fsc(apply_symmetry.apply(state.final_map), truth, region)
    return {
        "resolution": state.resolution_angstrom,
        "map_fsc": fsc_map,
        "applied_fsc": fsc_applied,
        "ref_fsc": fsc_ref,
        "medians": medians,
        "flipped": float((err > 90).double().mean()),
        "time": time.process_time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=800)
    parser.add_argument("--snr", type=float, default=0.2)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--lowpass", type=float, default=30.0)
    parser.add_argument("--algorithm", default="vdam")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8])
    parser.add_argument("--tau2", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--map", type=Path, default=MAP)
    parser.add_argument("--separation", type=float, default=5.5, help="px from centre")
    parser.add_argument(
        "--mask-threshold", type=float, default=0.1, help="× max of copy A"
    )
    parser.add_argument(
        "--oversampling",
        type=int,
        default=2,
        help="resampling grid of local symmetry (1 = RELION's trilinear on the map)",
    )
    parser.add_argument("--no-oracle", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    truth, mask_a, operator, pixel = pseudo_dimer(
        args.map, args.separation, args.mask_threshold
    )
    with tempfile.TemporaryDirectory() as tmp:
        mask_path = Path(tmp) / "mask_a.mrc"
        write_mrc(mask_path, mask_a.numpy(), pixel)
        star = Path(tmp) / "localsym.star"
        write_operator_star(star, [MaskOperators(str(mask_path), [operator])])
        groups = read_mask_info(star)  # the file as refine3d reads it
        matrices, translations = operators_to_tensors(groups[0].operators, pixel)
        symmetry = LocalSymmetry(
            masks=[mask_a],
            operators=[(matrices, translations)],
            oversampling=args.oversampling,
        )
    mask_b = transform_map(mask_a, matrices[0], translations[0]).clamp(0, 1)
    region = torch.maximum(mask_a, mask_b)  # the symmetric region (both copies)
    overlap = float((mask_a * mask_b).sum() / mask_a.sum())
    # the operator really relates the copies: imposing it leaves the truth unchanged
    kept = masked_fsc(symmetry.apply(truth), truth, region)
    shells = [s for s in (4, 8, 11, 13, 15) if s <= BOX // 2]
    print(
        f"pseudo-dimer: box {BOX} px, {pixel:.3f} Å/px, operator "
        f"{tuple(round(a, 2) for a in operator.angles_degrees)} deg, "
        f"t {tuple(round(v, 2) for v in operator.translation_angstrom)} Å; mask of "
        f"copy A {float(mask_a.sum()):.0f} voxels, overlap with its image "
        f"{overlap:.1%}; truth after imposing: FSC mean {float(kept[1:].mean()):.4f}\n"
        f"{args.particles} particles, SNR {args.snr}, {args.algorithm}, "
        f"{args.iterations} iterations, start {args.lowpass} Å, local symmetry "
        f"oversampling {args.oversampling}; shells "
        + ", ".join(f"{s}={BOX * pixel / s:.1f} Å" for s in shells)
    )
    header = (
        f"{'seed':>4} {'run':<16}{'res':>6}{'map <FSC>':>10}{'+apply':>7}"
        f"{'halves':>7}{'map FSC at shells':>26}"
        f"{'pose err median/it (°)':>34}{'>90°':>6}{'cpu':>6}"
    )
    rows = []
    for seed in args.seeds:
        sim, data = _simulate(truth, pixel, args, seed)
        if not args.no_oracle:
            step = 15.0
            angles, _ = oracle_poses(truth, data, sim.images, step, (BOX - 4) / 2, 2.0)
            err = pose_errors(angles, sim.angles_degrees)
            print(
                f"seed {seed}: oracle (E-step against the TRUE map, {step:g}° grid): "
                f"pose error median {float(err.median()):.1f}°, >90°: "
                f"{float((err > 90).double().mean()):.0%} (random poses: 126.5°)"
            )
        print(header)
        for tau2 in args.tau2:
            for use in (False, True):
                r = _run(
                    truth,
                    data,
                    sim,
                    symmetry if use else None,
                    symmetry,
                    region,
                    pixel,
                    args,
                    tau2,
                    seed,
                )
                r.update(seed=seed, tau2=tau2, localsym=use)
                rows.append(r)
                name = f"T={tau2:g} " + ("localsym" if use else "none")
                at = " ".join(f"{float(r['map_fsc'][s]):.2f}" for s in shells)
                print(
                    f"{seed:>4} {name:<16}{r['resolution']:>5.1f}Å"
                    f"{float(r['map_fsc'][1:].mean()):>10.3f}"
                    f"{float(r['applied_fsc'][1:].mean()):>7.3f}"
                    f"{float(r['ref_fsc'][1:].mean()):>7.3f}{at:>26}"
                    f"{'/'.join(f'{m:.0f}' for m in r['medians']):>34}"
                    f"{r['flipped']:>6.0%}{r['time']:>5.0f}s",
                    flush=True,
                )
    print("with − without local symmetry (per seed):")
    for tau2 in args.tau2:
        for seed in args.seeds:
            pair = {
                r["localsym"]: r
                for r in rows
                if r["seed"] == seed and r["tau2"] == tau2
            }
            on, off = pair[True], pair[False]
            print(
                f"  T={tau2:g} seed {seed}: map <FSC> "
                f"{float(on['map_fsc'][1:].mean() - off['map_fsc'][1:].mean()):+.3f}, "
                f"map+apply "
                f"{float(on['applied_fsc'][1:].mean() - off['applied_fsc'][1:].mean()):+.3f}, "
                f"half-refs <FSC> "
                f"{float(on['ref_fsc'][1:].mean() - off['ref_fsc'][1:].mean()):+.3f}, "
                f"pose median {on['medians'][-1] - off['medians'][-1]:+.1f}°"
            )


if __name__ == "__main__":
    main()
