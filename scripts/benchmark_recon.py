"""Validation and speed of ``cryoavg reconstruct`` (issue #6).

(1) Known poses: particles of the bundled HSP60 map are simulated (``cryoavg simulate``
    machinery, no junk), given their true poses, reconstructed (gold standard), and the
    full map is compared with the true map (FSC, both under the same soft sphere).
    Information limit: noise-free data -> the last shell where the true map has power
    (>= 1e-6 of its strongest shell beyond DC), capped at Nyquist; noisy data -> the
    shell where the half-map FSC crosses 0.143, which by Rosenthal & Henderson (2003) is
    where the full map's FSC against the truth should reach 0.5. The check is that
    FSC(full, truth) >= 0.5 up to within 2 shells of that limit.
(2) Speed: back-projection (CTF computed per particle, shifts, insertion) of 10 000
    random 64 px particles on the CPU, in particles per second.

    python scripts/benchmark_recon.py [--threads 1] [--n-speed 10000] [--quick]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryoavg.cli.simulate import demo_map_path, prepare_volume
from cryoavg.io.dataset import ParticleDataset
from cryoavg.io.particles import read_particles
from cryoavg.io.star import read_star, write_star
from cryoavg.ops.fourier import power_spectrum_1d
from cryoavg.ops.rotations import euler_angles_to_matrix, random_rotations
from cryoavg.recon import (
    BackprojectionAccumulator,
    ReconstructionSettings,
    fourier_shell_correlation,
    half_sets,
    particle_poses,
    reconstruct_gold_standard,
    soft_sphere_mask,
)
from cryoavg.recon.reconstruct import backproject_dataset
from cryoavg.simulate.particles import SimulationParameters, simulate_particles
from cryoavg.simulate.writer import write_simulation

POSE_LABELS = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
)


def simulate_posed(directory: Path, n: int, box: int, snr: float | None, seed: int):
    """Simulate particles and write ``posed.star`` (particles + CTF + true poses)."""
    volume, pixel = prepare_volume(demo_map_path(), box, None, None)
    params = SimulationParameters(
        n_particles=n,
        box_size=box,
        pixel_size_angstrom=pixel,
        junk_fraction=0.0,
        snr=snr,
        seed=seed,
    )
    result = simulate_particles(volume, params)
    write_simulation(directory, result, params, project_dir=directory)
    particles = read_star(directory / "particles.star")
    truth = read_star(directory / "ground_truth.star")["particles"]
    table = particles["particles"].copy()
    for label in POSE_LABELS:
        table[label] = truth[label].to_numpy()
    write_star(
        directory / "posed.star", {"optics": particles["optics"], "particles": table}
    )
    return volume, pixel


def information_limit(volume: torch.Tensor, fsc_half: torch.Tensor | None) -> int:
    """Shell of the simulation's information limit (see the module docstring)."""
    nyquist = volume.shape[0] // 2
    if fsc_half is not None:
        below = torch.nonzero(fsc_half[1:] < 0.143).flatten()
        return int(below[0]) if below.numel() else nyquist  # last shell >= 0.143
    power = power_spectrum_1d(volume.double(), ndim=3)
    strong = torch.nonzero(power[1:] >= 1e-6 * power[1:].max()).flatten() + 1
    return min(nyquist, int(strong.max()))


def validate(n: int, box: int, snr: float | None, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        volume, pixel = simulate_posed(directory, n, box, snr, seed)
        table = read_particles(directory / "posed.star", project_dir=directory)
        dataset = ParticleDataset(table, preread=True)
        angles, shifts, _ = particle_poses(table)
        halves, _ = half_sets(table, seed=0)
        settings = ReconstructionSettings()
        start = time.perf_counter()
        accumulators = []
        for half in (1, 2):
            positions = np.flatnonzero(halves == half)
            index = torch.from_numpy(positions)
            accumulators.append(
                backproject_dataset(
                    dataset.get_batch,
                    positions,
                    angles[index],
                    shifts[index],
                    box,
                    pixel,
                    settings,
                )
            )
        result = reconstruct_gold_standard(*accumulators, pixel, settings)
        seconds = time.perf_counter() - start
    mask = soft_sphere_mask(box, pixel, None, settings.mask_soft_edge_px)
    fsc_truth = fourier_shell_correlation(result.full, volume * mask)
    limit = information_limit(volume, None if snr is None else result.fsc)
    above = torch.nonzero(fsc_truth[1:] < 0.5).flatten()
    last_good = int(above[0]) if above.numel() else box // 2  # last shell >= 0.5
    return {
        "n": n,
        "box": box,
        "snr": snr,
        "pixel": pixel,
        "seconds": seconds,
        "resolution_0143": result.resolution_angstrom,
        "limit_shell": limit,
        "last_shell_fsc_truth_ge_0.5": last_good,
        "pass": last_good >= limit - 2,
        "fsc_truth": fsc_truth,
        "fsc_half": result.fsc,
    }


def speed(n: int, box: int, batch: int) -> float:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((n, box, box), generator=generator)
    matrices = euler_angles_to_matrix(random_rotations(n, generator=generator).double())
    shifts = torch.randn((n, 2), generator=generator)
    ctf = {
        "defocus_u_angstrom": 10000 + 5000 * torch.rand(n, generator=generator),
        "defocus_v_angstrom": 10000 + 5000 * torch.rand(n, generator=generator),
        "defocus_angle_degrees": 180 * torch.rand(n, generator=generator),
        "voltage_kv": torch.full((n,), 300.0),
        "cs_mm": torch.full((n,), 2.7),
        "amplitude_contrast": torch.full((n,), 0.1),
        "pixel_size_angstrom": torch.full((n,), 1.5),
    }
    accumulator = BackprojectionAccumulator(box, 2.0)
    start = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        accumulator.insert(
            images[lo:hi],
            matrices[lo:hi].float(),
            ctf={k: v[lo:hi] for k, v in ctf.items()},
            shifts_px=shifts[lo:hi],
        )
    return n / (time.perf_counter() - start)


def library_ratio(n: int, box: int, batch: int) -> tuple[float, float]:
    """Our trilinear insertion vs torch-fourier-slice's, same slices, same run.

    Both insert ``n`` plain central slices (no CTF, no shifts) into a grid padded 2x;
    returns (our particles/s, library particles/s).
    """
    import torch_fourier_slice

    from cryoavg.recon.backproject import insert_particles

    generator = torch.Generator().manual_seed(1)
    images = torch.randn((n, box, box), generator=generator)
    matrices = euler_angles_to_matrix(random_rotations(n, generator=generator).double())
    matrices = matrices.float()
    start = time.perf_counter()
    for lo in range(0, n, batch):
        insert_particles(images[lo : lo + batch], matrices[lo : lo + batch])
    ours = n / (time.perf_counter() - start)
    size = 2 * box
    padded = torch.nn.functional.pad(images, [box // 2] * 4)  # (n, 2·box, 2·box)
    start = time.perf_counter()
    for lo in range(0, n, batch):
        spectra = torch.fft.rfftn(
            torch.fft.ifftshift(padded[lo : lo + batch], dim=(-2, -1)), dim=(-2, -1)
        )
        torch_fourier_slice.insert_central_slices_rfft_3d(
            image_rfft=torch.fft.fftshift(spectra, dim=(-2,)),
            volume_shape=(size,) * 3,
            rotation_matrices=matrices[lo : lo + batch].mT,
            fftfreq_max=0.5,
        )
    library = n / (time.perf_counter() - start)
    return ours, library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = default)"
    )
    parser.add_argument("--n-speed", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="smaller validation sets")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    runs = [(1000, 48, None, 1), (4000, 48, 0.1, 2)]
    if args.quick:
        runs = [(400, 48, None, 1), (1500, 48, 0.1, 2)]
    for n, box, snr, seed in runs:
        r = validate(n, box, snr, seed)
        print(
            f"[validation] n={r['n']} box={r['box']} px={r['pixel']:.2f} Å snr={r['snr']}: "
            f"{r['seconds']:.1f} s, half-map resolution {r['resolution_0143']:.2f} Å; "
            f"information limit shell {r['limit_shell']} "
            f"({r['box'] * r['pixel'] / max(r['limit_shell'], 1):.1f} Å), "
            f"FSC(full, truth) >= 0.5 up to shell {r['last_shell_fsc_truth_ge_0.5']} "
            f"-> {'PASS' if r['pass'] else 'FAIL'}"
        )
        curve = " ".join(f"{v:.3f}" for v in r["fsc_truth"].tolist())
        print(f"  FSC(full, truth) per shell: {curve}")
        curve = " ".join(f"{v:.3f}" for v in r["fsc_half"].tolist())
        print(f"  FSC(half1, half2) per shell: {curve}")
    ours, library = library_ratio(2000, 64, 256)
    print(
        f"[insertion] 2000 slices of 64 px into a 2x padded grid: cryoavg "
        f"{ours:.0f}/s, torch-fourier-slice {library:.0f}/s, ratio {ours / library:.2f}"
    )
    rate = speed(args.n_speed, 64, 256)
    print(
        f"[speed] {args.n_speed} particles of 64 px, CTF + shifts, pad 2, CPU: "
        f"{rate:.0f} particles/s ({args.n_speed / rate:.1f} s)"
    )


if __name__ == "__main__":
    main()
