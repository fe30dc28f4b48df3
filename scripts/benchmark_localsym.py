"""Benchmark local-symmetry operator search and refinement on cases built from real maps.

``synthetic`` (default): for each real map in ``../shared/data/maps`` a subunit (the
map itself, a Fourier-binned copy, or an off-axis sub-region) is soft-masked and placed
as copy A in a 64^3 box; copy B = T(A) for a known operator with non-trivial angles and
a translation of tens of Å. B is made as a band-limited transform (A Fourier-upsampled
4x, transformed, Fourier-downsampled): a trilinear copy would itself be blurred by a
sub-pixel-dependent amount (~0.3° on a 20-px subunit) and the truth would be wrong.
Cases are noise-free and with white noise at SNR 1 and 0.3 (variance ratio inside the
mask). Stages, each timed on this machine:

* ``global``: global search at 5° (``--use-healpix``: HEALPix grid), bin 2;
* ``scheme``: the recommended scheme as ``cryoavg localsym scheme`` runs it (global,
  local rounds 2° / 0.5° / 0.1°, then the autograd refinement), cumulative time;
* ``refine_from_global``: the autograd refinement started straight from the global
  result (its own time).

``hsp60``: the real D7 map ``hsp60_D7_48px.mrc``: masks around each of the 14 subunits
are made from the map (density threshold x an azimuthal sector of the ring), the first
is the reference, and the 13 operators are found by the global search, the local rounds
and the refinement. The deposited map is not exactly D7 about the box centre (the found
operators fit it better than the ideal elements do); ``--symmetrise`` first averages
the map over the ideal group (band-limited transforms), so that the truth is exact. Each operator is compared with the D7 element it should be (a
rotation of k x 360/7 about z, or a two-fold about an axis in the xy plane, both through
the box centre), with the verification correlation before and after.

    python scripts/benchmark_localsym.py [synthetic|hsp60] [--quick] [--threads 2]
"""

import argparse
import math
import time
from pathlib import Path

import pandas as pd
import torch

from cryoavg.io.mrc import read_map_3d, write_mrc
from cryoavg.io.star import write_star
from cryoavg.localsym.io import write_operator_star
from cryoavg.localsym.masks import create_mask
from cryoavg.localsym.operators import LocalSymmetryOperator, MaskOperators
from cryoavg.localsym.refine import refine_operators
from cryoavg.localsym.search import SearchSettings, mask_center_px, search_operator
from cryoavg.localsym.verify import verify_operators
from cryoavg.ops._grids import centred_coordinate_grid
from cryoavg.ops.fourier import resize_fourier_3d
from cryoavg.ops.masks import spherical_mask_3d
from cryoavg.ops.rotations import matrix_to_axis_angle, rotation_angle_degrees
from cryoavg.ops.transforms import transform_volumes_3d

MAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "maps"
#: local rounds of the scheme: (ang_range, ang_step, offset_range_px, offset_step_px)
ROUNDS = [(6.0, 2.0, 2.0, 1.0), (2.0, 0.5, 1.0, 0.5), (0.5, 0.1, 0.3, 0.1)]
BOX = 64
SUBUNIT = 22
#: name -> (file, pixel size if missing from the header, how to make the subunit)
CASES = {
    "beta_tubulin": ("beta_tubulin_20px.mrc", None, "whole"),
    "hsp60_region": ("hsp60_D7_48px.mrc", None, "region"),
    "prohibitin": ("prohibitin_ring_56px.mrc", None, "region"),
    "ribosome70S": ("ribosome70S_65px.mrc", 5.0, "bin"),
}
#: per case: Euler angles (degrees) and the centres of copies A and B (xyz px)
GEOMETRY = [
    ((63.0, 118.0, -37.0), (1.0, 2.0, -15.0), (-2.0, -3.0, 15.0)),
    ((-141.0, 52.0, 77.0), (-15.0, 1.0, 2.0), (14.0, -4.0, -3.0)),
    ((24.0, 71.0, 166.0), (3.0, -15.0, -1.0), (-3.0, 15.0, 4.0)),
    ((-75.0, 143.0, -112.0), (-10.0, -11.0, 1.0), (11.0, 10.0, -2.0)),
]


def errors(found, truth, pixel):
    """Rotation error (degrees) and translation error (px) of an operator."""
    angle = float(rotation_angle_degrees(found.matrix().T @ truth.matrix()))
    shift = torch.tensor(found.translation_angstrom) - torch.tensor(
        truth.translation_angstrom
    )
    return angle, float(shift.norm()) / pixel


def make_subunit(name):
    """A ``SUBUNIT``^3 soft-masked subunit cut from a real map, and its pixel size."""
    file, default_pixel, how = CASES[name]
    data, pixel = read_map_3d(MAPS / file)
    pixel = pixel or default_pixel
    volume = torch.from_numpy(data).double()
    n = volume.shape[0]
    if how == "whole":
        sub = torch.zeros((SUBUNIT,) * 3, dtype=torch.float64)
        lo = (SUBUNIT - n) // 2
        sub[lo : lo + n, lo : lo + n, lo : lo + n] = volume
    elif how == "bin":
        size = n - n % 2
        sub = resize_fourier_3d(volume[:size, :size, :size], SUBUNIT)
        pixel = pixel * size / SUBUNIT
    else:  # an off-axis sub-region (the maps are (pseudo-)symmetric about z or y)
        lo = [n // 2 + 2, n // 2 - SUBUNIT // 2 + 3, n // 2 - 4]
        sub = volume[
            lo[0] : lo[0] + SUBUNIT, lo[1] : lo[1] + SUBUNIT, lo[2] : lo[2] + SUBUNIT
        ].clone()
        sub = sub - float(sub[sub < sub.quantile(0.3)].mean())  # solvent level to 0
    sphere = spherical_mask_3d((SUBUNIT,) * 3, SUBUNIT / 2 - 2.0, 2.0).double()
    return sub * sphere, float(pixel)


def band_limited_copy(volume, matrix, translation_px, factor=4):
    """``T(volume)`` computed on a ``factor``-times Fourier-upsampled grid."""
    n = volume.shape[-1]
    up = resize_fourier_3d(volume.float(), factor * n)
    moved = transform_volumes_3d(up, matrix.float(), (factor * translation_px).float())
    del up
    return resize_fourier_3d(moved, n).double()


def build_case(name, geometry, snr, seed):
    """Map with copies A and B, A's mask, B's mask and the true operator."""
    sub, pixel = make_subunit(name)
    angles, centre_a, centre_b = geometry
    volume_a = torch.zeros((BOX,) * 3, dtype=torch.float64)
    start = [BOX // 2 + int(centre_a[2 - axis]) - SUBUNIT // 2 for axis in range(3)]
    volume_a[
        start[0] : start[0] + SUBUNIT,
        start[1] : start[1] + SUBUNIT,
        start[2] : start[2] + SUBUNIT,
    ] = sub
    mask = create_mask(volume_a.float(), float(sub.max()) * 0.05, 2.0, 3.0).double()
    com = mask_center_px(mask)
    rotation = LocalSymmetryOperator(*angles).matrix()
    target = torch.tensor(centre_b, dtype=torch.float64)
    t_px = target - rotation @ com
    truth = LocalSymmetryOperator(*angles, tuple((t_px * pixel).tolist()))
    copy_b = band_limited_copy(volume_a, rotation, t_px)
    volume = volume_a + copy_b
    if snr is not None:
        generator = torch.Generator().manual_seed(seed)
        signal_var = float(volume[mask > 0.5].var())
        noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64)
        volume = volume + noise * math.sqrt(signal_var / snr)
    target_mask = (copy_b > 0.05 * float(copy_b.max())).double()
    return volume.float(), mask.float(), target_mask.float(), truth, pixel


def global_search(volume, mask, target_mask, pixel, step, use_healpix):
    settings = SearchSettings(
        ang_step=step, global_search=True, bin=2, use_healpix=use_healpix
    )
    return search_operator(volume, mask, pixel, settings, target_mask=target_mask).best


def local_rounds(volume, mask, pixel, operator):
    for ang_range, ang_step, off_px, step_px in ROUNDS:
        settings = SearchSettings(
            ang_range=ang_range,
            ang_step=ang_step,
            offset_range=off_px * pixel,
            offset_step=step_px * pixel,
            local_grid="axis_angle",
        )
        operator = search_operator(volume, mask, pixel, settings, initial=operator).best
    return operator


def write_case(args):
    """Write each noise-free case as files for ``cryoavg localsym scheme`` (timing)."""
    out = Path(args.write)
    out.mkdir(parents=True, exist_ok=True)
    names = args.cases or list(CASES)
    for name in names:
        geometry = GEOMETRY[list(CASES).index(name)]
        volume, mask, target, truth, pixel = build_case(name, geometry, None, 0)
        write_mrc(out / f"{name}_map.mrc", volume, pixel)
        write_mrc(out / f"{name}_maskA.mrc", mask, pixel)
        write_mrc(out / f"{name}_maskB.mrc", target, pixel)
        write_star(
            out / f"{name}_masklist.star",
            {
                "": pd.DataFrame(
                    {
                        "rlnMaskName": [
                            str(out / f"{name}_maskA.mrc"),
                            str(out / f"{name}_maskB.mrc"),
                        ],
                        "rlnAreaId": [1, 1],
                    }
                )
            },
        )
        write_operator_star(
            out / f"{name}_truth.star",
            [MaskOperators(str(out / f"{name}_maskA.mrc"), [truth])],
        )
        print(
            f"{name}: {out}/{name}_{{map,maskA,maskB}}.mrc, _masklist.star, _truth.star"
        )


def run_synthetic(args):
    step = 10.0 if args.quick else 5.0
    grid = "HEALPix" if args.use_healpix else "Fibonacci x psi"
    print(f"box {BOX}^3, subunit {SUBUNIT}^3, global step {step}° ({grid}), bin 2")
    header = f"{'case':<14} {'noise':<10} {'stage':<19} {'err_deg':>8} {'err_px':>7} {'time_s':>7}"
    print(header)
    names = args.cases or list(CASES)
    for name in names:
        geometry = GEOMETRY[list(CASES).index(name)]
        for snr in (None, 1.0, 0.3):
            volume, mask, target, truth, pixel = build_case(name, geometry, snr, 0)
            noise = "none" if snr is None else f"SNR {snr}"
            rows = []
            start = time.perf_counter()
            found = global_search(volume, mask, target, pixel, step, args.use_healpix)
            t_global = time.perf_counter() - start
            rows.append(("global", found, t_global))
            local = local_rounds(volume, mask, pixel, found)
            rows.append(("local rounds", local, time.perf_counter() - start))
            refined, _ = refine_operators(volume, mask, [local], pixel)
            rows.append(("scheme (refined)", refined[0], time.perf_counter() - start))
            t0 = time.perf_counter()
            direct, _ = refine_operators(volume, mask, [found], pixel)
            rows.append(("refine_from_global", direct[0], time.perf_counter() - t0))
            for stage, operator, seconds in rows:
                deg, px = errors(operator, truth, pixel)
                print(
                    f"{name:<14} {noise:<10} {stage:<19} {deg:>8.3f} {px:>7.3f} {seconds:>7.1f}",
                    flush=True,
                )


def hsp60_masks(volume, pixel):
    """Soft masks of the 14 subunits: density x an azimuthal sector of each ring.

    Returns the masks (reference first) and, for each, the ideal D7 element that maps
    the reference subunit onto it (matrix about the box centre), given the two-fold
    axis azimuth found from the map.
    """
    n = volume.shape[0]
    zyx = centred_coordinate_grid((n,) * 3, dtype=torch.float64)
    z, y, x = zyx[..., 0], zyx[..., 1], zyx[..., 2]
    phi = torch.rad2deg(torch.atan2(y, x))  # azimuth, degrees
    density = create_mask(volume.float(), 0.25 * float(volume.max()), 1.0, 2.0).double()
    # azimuth of subunit 1: the densest 7-fold phase of the upper ring
    upper = volume.clamp(min=0) * (z > 0)
    phases = torch.arange(0.0, 360.0 / 7, 0.5, dtype=torch.float64)
    wedge = 360.0 / 7

    def in_sector(centre):
        delta = torch.remainder(phi - centre + 180.0, 360.0) - 180.0
        return (delta.abs() <= wedge / 2).double()

    scores = torch.stack([(upper * in_sector(p)).sum() for p in phases])
    # the subunit sits where the sector around it holds the most density
    phi0 = float(phases[int(scores.argmax())])
    # two-fold axis azimuth: the lower-ring phase that mirrors the upper one
    lower = volume.clamp(min=0) * (z < 0)
    lower_scores = torch.stack([(lower * in_sector(p)).sum() for p in phases])
    phi_lower = float(phases[int(lower_scores.argmax())])
    # a two-fold about azimuth alpha maps azimuth phi to 2 alpha - phi
    alpha = (phi0 + phi_lower) / 2.0
    masks, ideals = [], []
    for ring in (1, -1):
        for k in range(7):
            if ring == 1:
                centre = phi0 + k * wedge
                ideal = _rotation_z(k * wedge)
            else:
                centre = 2.0 * alpha - phi0 - k * wedge
                ideal = _two_fold(alpha - k * wedge / 2.0)
            side = (z > 0) if ring == 1 else (z < 0)
            sector = in_sector(centre) * side.double()
            masks.append((density * sector).float())
            ideals.append(ideal)
    return masks, ideals, phi0, alpha


def _rotation_z(degrees):
    a = math.radians(degrees)
    return torch.tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0, 0, 1]],
        dtype=torch.float64,
    )


def _two_fold(azimuth_degrees):
    a = math.radians(azimuth_degrees)
    u = torch.tensor([math.cos(a), math.sin(a), 0.0], dtype=torch.float64)
    return 2.0 * torch.outer(u, u) - torch.eye(3, dtype=torch.float64)


def run_hsp60(args):
    data, pixel = read_map_3d(MAPS / "hsp60_D7_48px.mrc")
    volume = torch.from_numpy(data).float()
    masks, ideals, phi0, alpha = hsp60_masks(volume.double(), pixel)
    if args.symmetrise:
        # the exact D7 truth: average the map over the ideal group (band-limited)
        zero = torch.zeros(3, dtype=torch.float64)
        copies = [band_limited_copy(volume.double(), g, zero) for g in ideals]
        volume = torch.stack(copies).mean(0).float()
        print("map D7-symmetrised about the box centre: the ideal elements are exact")
    step = 10.0 if args.quick else 5.0
    print(
        f"HSP60 D7 48^3 at {pixel:.2f} Å: subunit 1 at azimuth {phi0:.1f}°, two-fold "
        f"axis azimuth {alpha:.1f}°; global step {step}°, bin 2"
    )
    print(
        f"{'op':>3} {'found: rotation':<26} {'dev_D7_deg':>10} {'|t|_px':>7}"
        f" {'cc_global':>9} {'cc_final':>8} {'cc_D7':>6} {'time_s':>7}"
    )
    reference = masks[0]
    total = time.perf_counter()
    deviations = []
    for index in range(1, 14):
        start = time.perf_counter()
        first = global_search(volume, reference, masks[index], pixel, step, False)
        found = local_rounds(volume, reference, pixel, first)
        refined, _ = refine_operators(volume, reference, [found], pixel)
        op = refined[0]
        seconds = time.perf_counter() - start
        ideal = LocalSymmetryOperator.from_matrix(ideals[index], (0.0, 0.0, 0.0))
        deg = float(rotation_angle_degrees(op.matrix().T @ ideal.matrix()))
        deviations.append(deg)
        # the ideal element is about the box centre (t = 0)
        shift = float(torch.tensor(op.translation_angstrom).norm()) / pixel
        cc = [
            verify_operators(volume, reference, [o], pixel)[0].correlation
            for o in (first, op, ideal)
        ]
        axis_angle = matrix_to_axis_angle(op.matrix())
        angle = math.degrees(float(axis_angle.norm()))
        axis = axis_angle / axis_angle.norm()
        # axis direction: tilt from +z and azimuth
        tilt = math.degrees(math.acos(max(-1.0, min(1.0, abs(float(axis[2]))))))
        azimuth = math.degrees(math.atan2(float(axis[1]), float(axis[0]))) % 180.0
        kind = (
            f"{angle:6.2f}° axis tilt {tilt:4.1f}°"
            if index < 7
            else f"{angle:6.2f}° axis az {azimuth:5.1f}°"
        )
        print(
            f"{index:>3} {kind:<26} {deg:>10.3f} {shift:>7.3f} {cc[0]:>9.3f}"
            f" {cc[1]:>8.3f} {cc[2]:>6.3f} {seconds:>7.1f}",
            flush=True,
        )
    print(
        f"13 operators in {time.perf_counter() - total:.1f} s; deviation from the "
        f"ideal D7 elements about the box centre: median "
        f"{sorted(deviations)[6]:.2f}°, max {max(deviations):.2f}°"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "case", nargs="?", default="synthetic", choices=["synthetic", "hsp60"]
    )
    parser.add_argument("--cases", nargs="*", choices=list(CASES))
    parser.add_argument("--quick", action="store_true", help="10° global step")
    parser.add_argument("--use-healpix", action="store_true")
    parser.add_argument(
        "--write", metavar="DIR", help="only write the noise-free cases as files"
    )
    parser.add_argument(
        "--symmetrise",
        action="store_true",
        help="hsp60: impose exact D7 first (known truth)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.write:
        write_case(args)
    elif args.case == "hsp60":
        run_hsp60(args)
    else:
        run_synthetic(args)


if __name__ == "__main__":
    main()
