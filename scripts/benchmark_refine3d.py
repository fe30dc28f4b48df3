"""Validation of ``cryoavg refine3d`` with local symmetry on a pseudo-dimer (issue #6).

A β-tubulin subunit (``../shared/data/maps/beta_tubulin_20px.mrc``, resampled to 14 px at
7.35 Å/px) is placed twice in a 32-px box, the second copy related to the first by a known
operator ``T(x) = R x + t`` (spec §D.1). Particles are simulated at low SNR with CTF, then
refined from the truth low-passed to ``--lowpass`` Å, with and without
``local_symmetry`` (a soft mask on copy A + the operator, written as a RELION STAR file with
:mod:`cryoavg.localsym.io`), for T = 1 and T = 2. Printed per run: the gold-standard
resolution, the FSC to the truth inside the mask of both copies (mean over shells 1..N/2
and the 0.5 crossing) for the final map and for the (symmetrised) half-references of the
last regular iteration, the particles' pose errors against the simulated truth (angle of
``A_found A_trueᵀ``: median per iteration, and the fraction within 2 × the 15° step after
the last one) and the run time.

Pose errors are calibrated by an *oracle*: one E-step of the same particles against the
TRUE map on the same 15° grid (the best a refinement could assign; σ²-weighted
cross-correlation, as ``firstiter_cc``). Uniformly random poses have a median error of
≈ 126.5°. At SNR 0.05 in this 32-px box the oracle itself is mostly wrong (the
data do not determine the poses; see docs/recon.md), at SNR ≥ 0.5 it is right to within
the grid.

Usage::

    python scripts/benchmark_refine3d.py [--particles 800] [--snr 0.05] [--iterations 4]
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
from cryoavg.localsym.operators import (
    LocalSymmetryOperator,
    MaskOperators,
    operators_to_tensors,
)
from cryoavg.ops.fourier import resize_fourier_3d
from cryoavg.ops.masks import spherical_mask_3d
from cryoavg.ops.rotations import axis_angle_to_matrix, euler_angles_to_matrix
from cryoavg.ops.shifts import translation_grid_2d
from cryoavg.recon.estep3d import SliceProjector, expectation_step_3d
from cryoavg.recon.fsc import fourier_shell_correlation, resolution_at
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


def pseudo_dimer(path: Path, separation_px: float = 5.5, mask_radius_px: float = 7.0):
    data, header = read_map_3d(path)
    pixel = float(header or 5.144) * data.shape[0] / SUBUNIT_PX
    subunit = resize_fourier_3d(torch.from_numpy(data).float(), SUBUNIT_PX)
    subunit = fit_volume_to_box(subunit, BOX)
    centre_a = torch.tensor([-separation_px, 0.5, 0.0], dtype=torch.float64)  # xyz px
    copy_a = transform_map(subunit, torch.eye(3), centre_a.float())
    rotation = axis_angle_to_matrix(
        torch.tensor([0.25, 0.35, 1.0], dtype=torch.float64)
        / math.sqrt(0.25**2 + 0.35**2 + 1.0)
        * math.radians(160.0)
    )
    centre_b = torch.tensor([separation_px, -0.5, 0.5], dtype=torch.float64)
    translation = centre_b - rotation @ centre_a  # T(c_A) = c_B
    copy_b = transform_map(copy_a, rotation.float(), translation.float())
    truth = copy_a + copy_b
    mask_a = spherical_mask_3d((BOX,) * 3, mask_radius_px, 2.0, dtype=torch.float32)
    mask_a = transform_map(mask_a, torch.eye(3), centre_a.float()).clamp(0, 1)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=800)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--lowpass", type=float, default=30.0)
    parser.add_argument("--algorithm", default="vdam")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--map", type=Path, default=MAP)
    parser.add_argument("--separation", type=float, default=5.5, help="px from centre")
    parser.add_argument("--mask-radius", type=float, default=7.0, help="px")
    args = parser.parse_args()
    torch.set_num_threads(2)

    truth, mask_a, operator, pixel = pseudo_dimer(
        args.map, args.separation, args.mask_radius
    )
    with tempfile.TemporaryDirectory() as tmp:
        mask_path = Path(tmp) / "mask_a.mrc"
        write_mrc(mask_path, mask_a.numpy(), pixel)
        star = Path(tmp) / "localsym.star"
        write_operator_star(star, [MaskOperators(str(mask_path), [operator])])
        groups = read_mask_info(star)  # the file as refine3d reads it
        matrices, translations = operators_to_tensors(groups[0].operators, pixel)
        symmetry = LocalSymmetry(masks=[mask_a], operators=[(matrices, translations)])
    mask_b = transform_map(mask_a, matrices[0], translations[0]).clamp(0, 1)
    region = torch.maximum(mask_a, mask_b)  # the symmetric region (both copies)
    # the operator really relates the copies
    moved = transform_map(truth * mask_a, matrices[0], translations[0])
    op_error = float(((moved - truth) * mask_b).norm() / (truth * mask_b).norm())

    params = SimulationParameters(
        n_particles=args.particles,
        box_size=BOX,
        pixel_size_angstrom=pixel,
        junk_fraction=0.0,
        snr=args.snr,
        shift_sigma_px=1.0,
        defocus_min_um=1.0,
        defocus_max_um=2.5,
        seed=args.seed,
    )
    sim = simulate_particles(truth, params)
    n = args.particles
    ctf = sim.ctf_parameters(params)
    images = sim.images
    data = RefineData(
        read_images=lambda idx: images[torch.as_tensor(np.asarray(idx))],
        n_particles=n,
        box_size=BOX,
        pixel_size_angstrom=pixel,
        halves=torch.as_tensor(np.where(np.arange(n) % 2 == 0, 1, 2)),
        optics_group=torch.zeros(n, dtype=torch.long),
        group=torch.zeros(n, dtype=torch.long),
        ctf_parameters=ctf,
    )
    print(
        f"pseudo-dimer: box {BOX} px, {pixel:.3f} Å/px, operator "
        f"{tuple(round(a, 2) for a in operator.angles_degrees)} deg, "
        f"t {tuple(round(v, 2) for v in operator.translation_angstrom)} Å "
        f"(operator residual on the truth {op_error:.3f}); {n} particles, SNR {args.snr}, "
        f"{args.algorithm}, {args.iterations} iterations, start {args.lowpass} Å"
    )
    start_map = initial_state(
        truth, data, RefineSettings(initial_lowpass_angstrom=args.lowpass)
    ).references[0]
    fsc0 = masked_fsc(start_map, truth, region)
    print(
        f"initial reference: masked FSC mean {float(fsc0[1:].mean()):.3f}, "
        f"FSC=0.5 at {resolution_at(fsc0, pixel, 0.5):.1f} Å"
    )
    step = 15.0
    oracle_angles, oracle_offsets = oracle_poses(
        truth, data, images, step, (BOX - 4) / 2.0, 2.0
    )
    oracle_err = pose_errors(oracle_angles, sim.angles_degrees)
    oracle_origin = (oracle_offsets - sim.origin_px.double()).norm(dim=-1)
    print(
        f"oracle (E-step against the TRUE map, {step:g}° grid): pose error median "
        f"{float(oracle_err.median()):.1f}°, within {2 * step:g}°: "
        f"{float((oracle_err < 2 * step).double().mean()):.0%}; origin error median "
        f"{float(oracle_origin.median()):.2f} px (random poses: median 126.5°)"
    )
    header = (
        f"{'run':<18}{'gold-std res':>13}{'final map: <FSC>':>18}{'FSC0.5':>8}"
        f"{'half-refs: <FSC>':>18}{'FSC0.5':>8}{'pose err median/it (°)':>26}"
        f"{'<30°':>6}{'time':>7}"
    )
    print(header)
    for tau2 in (1.0, 2.0):
        for use_symmetry in (False, True):
            settings = RefineSettings(
                n_iterations=args.iterations,
                algorithm=args.algorithm,
                tau2_fudge=tau2,
                particle_diameter_angstrom=(BOX - 4) * pixel,
                angular_step_degrees=step,
                offset_range_px=2.0,
                initial_lowpass_angstrom=args.lowpass,
                seed=args.seed,
            )
            started = time.perf_counter()
            state = initial_state(truth, data, settings)
            refs = None
            medians = []
            for _ in range(args.iterations):
                if state.iteration == args.iterations - 1:
                    refs = state.references.mean(0)
                refine_iteration(
                    state,
                    data,
                    settings,
                    local_symmetry=symmetry if use_symmetry else None,
                )
                err = pose_errors(state.angles_degrees, sim.angles_degrees)
                medians.append(f"{float(err.median()):.0f}")
            elapsed = time.perf_counter() - started
            fsc_map = masked_fsc(state.final_map, truth, region)
            fsc_ref = masked_fsc(refs, truth, region)
            name = f"T={tau2:g} " + ("localsym" if use_symmetry else "no localsym")
            print(
                f"{name:<18}{state.resolution_angstrom:>11.1f} Å"
                f"{float(fsc_map[1:].mean()):>18.3f}"
                f"{resolution_at(fsc_map, pixel, 0.5):>7.1f}Å"
                f"{float(fsc_ref[1:].mean()):>18.3f}"
                f"{resolution_at(fsc_ref, pixel, 0.5):>7.1f}Å"
                f"{'/'.join(medians):>26}"
                f"{float((err < 2 * step).double().mean()):>6.0%}{elapsed:>6.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
