"""Exhaustive search of local-symmetry operators (``relion_localsym --search``, §D.5).

Conventions owned by this module
--------------------------------
* Positions are xyz pixels relative to a box (or crop) centre ``n // 2``; rotation
  matrices are RELION ``A`` (xyz columns); ``T(x) = A x + t``.
* For a reference mask with (rounded) centre of mass ``com0`` and a target centre
  ``c1`` (``A com0 + t`` for a local search, the other mask's centre of mass for a
  global one), a cube of side ``cropdim`` is cropped around ``com0`` from the map and
  the mask ("src") and around ``round(c1)`` from the map ("dest"); both are optionally
  Fourier-binned by ``bin``. A candidate ``(R, u)`` in crop coordinates compares
  ``dest(R x + u)`` with ``src(x)`` over the mask support and converts back to the
  full box as ``t = round(c1) + beta u - R com0`` (``beta`` = binning factor).
* Scores (lower is better): ``"rms"`` = RELION's mask-weighted RMS difference
  ``sqrt(sum m (v - s)^2 / sum m)``; ``"cc"`` = ``1 - `` mask-weighted normalised
  cross-correlation.
* Candidates are scored in chunks of many operators at once: one ``grid_sample`` call
  samples ``dest`` at ``(chunk, points)`` positions, where the points are only the
  voxels inside the mask (no full volumes are resampled).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cryoavg.localsym.operators import LocalSymmetryOperator
from cryoavg.ops.fourier import resize_fourier_3d
from cryoavg.ops.healpix import (
    healpix_order_for_step,
    healpix_pixel_centres,
    healpix_step_degrees,
)
from cryoavg.ops.masks import center_of_mass_3d
from cryoavg.ops.rotations import (
    axis_angle_to_matrix,
    euler_angles_to_matrix,
    matrix_to_euler_angles,
)

__all__ = [
    "SearchResult",
    "SearchSettings",
    "euler_local_grid",
    "healpix_rotation_grid",
    "mask_center_px",
    "score_candidates",
    "search_operator",
    "translation_grid_3d",
    "uniform_rotation_grid",
]

ScoreName = Literal["rms", "cc"]
MASK_EPS = 1e-6
#: binned mask values below this are set to 0 (Fourier ringing)
BINNED_MASK_FLOOR = 0.01


@dataclass
class SearchSettings:
    """Search ranges and steps (RELION names; angles in degrees, offsets in Å).

    Attributes
    ----------
    ang_range, ang_rot_range, ang_tilt_range, ang_psi_range
        Angular half-ranges in degrees; ``ang_range > 0`` overrides the three others.
        A global search (``global_search=True``) ignores them and samples SO(3)
        uniformly.
    ang_step
        Angular step in degrees, ``0.0001 < step <= 30``.
    offset_range, offset_x_range, offset_y_range, offset_z_range
        Translation half-ranges in Å; ``offset_range > 0`` overrides x/y/z.
    offset_step
        Translation step in Å.
    bin
        Binning factor (> 1 to bin, otherwise none).
    score
        ``"rms"`` (RELION) or ``"cc"``.
    local_grid
        ``"euler"``: RELION's rot/tilt/psi grid around the current angles;
        ``"axis_angle"``: a cubic grid of small rotation vectors ``d`` (step
        ``ang_step``, inside the ball of radius ``max range``) applied as
        ``exp(d) A``, uniform in every direction (no gimbal degeneracy at tilt 0).
    global_search
        Sample all rotations (uniform SO(3) grid at ``ang_step``).
    use_healpix
        RELION's ``--use_healpix``: viewing directions on the HEALPix grid of the
        first order whose step is below ``ang_step``, in-plane angles at the same
        step (:func:`healpix_rotation_grid`); replaces the Fibonacci (global) or the
        Euler / axis-angle (local) grid.
    max_samples_per_chunk
        Interpolated samples per ``grid_sample`` call (memory bound).
    device
        Torch device that scores the candidates (``"cuda"`` on a GPU); everything
        else (crops, grids, bookkeeping) stays on the CPU.
    """

    ang_range: float = 0.0
    ang_rot_range: float = 0.0
    ang_tilt_range: float = 0.0
    ang_psi_range: float = 0.0
    ang_step: float = 1.0
    offset_range: float = 0.0
    offset_x_range: float = 0.0
    offset_y_range: float = 0.0
    offset_z_range: float = 0.0
    offset_step: float = 1.0
    bin: int = -1
    score: ScoreName = "rms"
    local_grid: Literal["euler", "axis_angle"] = "euler"
    global_search: bool = False
    use_healpix: bool = False
    max_samples_per_chunk: int = 20_000_000
    device: str = "cpu"

    def angular_ranges(self) -> tuple[float, float, float]:
        """``(rot, tilt, psi)`` half-ranges after the ``ang_range`` override."""
        if self.ang_range > 0:
            return (self.ang_range,) * 3
        return (self.ang_rot_range, self.ang_tilt_range, self.ang_psi_range)

    def offset_ranges_angstrom(self) -> tuple[float, float, float]:
        """``(x, y, z)`` half-ranges after the ``offset_range`` override."""
        if self.offset_range > 0:
            return (self.offset_range,) * 3
        return (self.offset_x_range, self.offset_y_range, self.offset_z_range)

    def validate(self, pixel_size_angstrom: float) -> None:
        """Raise ``ValueError`` for steps out of range or ranges below their step."""
        if not 0.0001 < self.ang_step <= 30.0:
            raise ValueError(
                f"ang_step must be in (0.0001, 30] degrees, got {self.ang_step}"
            )
        step_px = self.offset_step / pixel_size_angstrom / max(self.bin, 1)
        if not 0.0001 < step_px <= 5.0:
            raise ValueError(
                f"offset_step must be in (0.0001, 5] px after binning, got {step_px:.4g} px"
            )
        if self.score not in ("rms", "cc"):
            raise ValueError(f"score must be 'rms' or 'cc', got {self.score!r}")
        if self.local_grid not in ("euler", "axis_angle"):
            raise ValueError(
                f"local_grid must be 'euler' or 'axis_angle', got {self.local_grid!r}"
            )
        if not self.global_search:
            for name, value in zip(
                ("rot", "tilt", "psi"), self.angular_ranges(), strict=True
            ):
                if 0 < value < self.ang_step:
                    raise ValueError(
                        f"ang_{name}_range {value} is smaller than ang_step"
                    )
        for name, value in zip("xyz", self.offset_ranges_angstrom(), strict=True):
            if 0 < value < self.offset_step:
                raise ValueError(
                    f"offset_{name}_range {value} Å is smaller than offset_step"
                )


@dataclass
class SearchResult:
    """Outcome of the search for one operator.

    Attributes
    ----------
    best
        The best operator (full-box convention, Å), with its score.
    candidates
        All candidates (or the best ``max_candidates``), sorted by score ascending.
    n_candidates
        Number of candidates scored.
    """

    best: LocalSymmetryOperator
    candidates: list[LocalSymmetryOperator]
    n_candidates: int


def _grid_1d(half_range: float, step: float) -> torch.Tensor:
    """RELION's 1D grid ``r - rho .. rho`` (step ``s``, contains 0); ``[0]`` if rho=0."""
    if half_range <= 0:
        return torch.zeros(1, dtype=torch.float64)
    start = half_range - step * math.floor(half_range / step + 1e-9) - half_range
    count = math.floor((half_range - start) / step + 1e-9) + 1
    return start + step * torch.arange(count, dtype=torch.float64)


def translation_grid_3d(ranges_px: Sequence[float], step_px: float) -> torch.Tensor:
    """Translations on a grid inside the ellipsoid of half-axes ``ranges_px``.

    Parameters
    ----------
    ranges_px
        ``(x, y, z)`` half-ranges in pixels (0: only 0 along that axis).
    step_px
        Grid step in pixels.

    Returns
    -------
    torch.Tensor
        ``(m, 3)`` xyz translations (float64), including 0.
    """
    axes = [_grid_1d(r, step_px) for r in ranges_px]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    radii = torch.tensor([r if r > 0 else 1.0 for r in ranges_px], dtype=torch.float64)
    inside = ((grid / radii) ** 2).sum(-1) <= 1.0 + 1e-9
    return grid[inside]


def euler_local_grid(
    angles_degrees: Sequence[float],
    ranges_degrees: Sequence[float],
    step_degrees: float,
) -> torch.Tensor:
    """RELION's local Euler grid around ``(rot, tilt, psi)`` (§D.5.6), standardised.

    Returns
    -------
    torch.Tensor
        ``(m, 3, 3)`` rotation matrices (float64).
    """
    limits = (180.0, 90.0, 180.0)
    axes = [
        a0 + _grid_1d(min(r, lim), step_degrees)
        for a0, r, lim in zip(angles_degrees, ranges_degrees, limits, strict=True)
    ]
    angles = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    return euler_angles_to_matrix(angles)


def axis_angle_local_grid(
    matrix: torch.Tensor, range_degrees: float, step_degrees: float
) -> torch.Tensor:
    """Rotations ``exp(d) A`` with ``d`` on a cubic grid inside a ball (degrees).

    Returns
    -------
    torch.Tensor
        ``(m, 3, 3)`` matrices (float64), the first one ``A`` itself.
    """
    deltas = translation_grid_3d((range_degrees,) * 3, step_degrees)
    order = torch.argsort(deltas.norm(dim=-1))
    deltas = torch.deg2rad(deltas[order])
    return axis_angle_to_matrix(deltas) @ matrix.to(torch.float64)


def uniform_rotation_grid(step_degrees: float) -> torch.Tensor:
    """Near-uniform sampling of SO(3) with angular spacing ``~step_degrees``.

    Viewing directions on a Fibonacci sphere (``4 pi / step^2`` points) times
    ``ceil(360 / step)`` in-plane angles, as RELION Euler ``(rot, tilt, psi)``.

    Returns
    -------
    torch.Tensor
        ``(m, 3, 3)`` matrices (float64).
    """
    step = math.radians(step_degrees)
    n_dirs = max(1, math.ceil(4.0 * math.pi / step**2))
    index = torch.arange(n_dirs, dtype=torch.float64) + 0.5
    cos_tilt = 1.0 - 2.0 * index / n_dirs
    tilt = torch.rad2deg(torch.acos(cos_tilt.clamp(-1, 1)))
    golden = math.pi * (3.0 - math.sqrt(5.0))
    rot = torch.rad2deg(torch.remainder(golden * index, 2 * math.pi)) - 180.0
    n_psi = max(1, math.ceil(360.0 / step_degrees))
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi) - 180.0
    angles = torch.stack(
        [
            rot[:, None].expand(n_dirs, n_psi),
            tilt[:, None].expand(n_dirs, n_psi),
            psi[None, :].expand(n_dirs, n_psi),
        ],
        dim=-1,
    ).reshape(-1, 3)
    return euler_angles_to_matrix(angles)


def healpix_rotation_grid(
    step_degrees: float,
    initial_degrees: Sequence[float] | None = None,
    ranges_degrees: Sequence[float] | None = None,
) -> torch.Tensor:
    """Rotations on RELION's HEALPix grid (``--use_healpix``, §D.5.6).

    The order is the first whose step ``360 / (6 * 2**order)`` is below
    ``step_degrees``; in-plane angles use the same step.

    Parameters
    ----------
    step_degrees
        Requested angular step (degrees).
    initial_degrees
        Current ``(rot, tilt, psi)``; None = global (every direction, every psi).
    ranges_degrees
        ``(rot, tilt, psi)`` half-ranges of a local search: directions within
        ``max(rot, tilt)`` degrees of the current viewing direction (only the current
        one if that is 0) and psi on a grid through the current psi within the psi
        range. All three < 0 (or None) = every direction and psi.

    Returns
    -------
    torch.Tensor
        ``(m, 3, 3)`` matrices (float64); in local mode the first is the current
        rotation itself, so a local search never scores worse than its start.
    """
    order = healpix_order_for_step(step_degrees)
    step = healpix_step_degrees(order)
    tilt, rot = healpix_pixel_centres(order)
    rot = torch.where(rot > 180.0, rot - 360.0, rot)
    n_psi = max(1, round(360.0 / step))
    all_psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi) - 180.0
    local = initial_degrees is not None and (
        ranges_degrees is not None and max(ranges_degrees) >= 0
    )
    if not local:
        directions = torch.stack([rot, tilt], dim=-1)
        psi = all_psi
        first = None
    else:
        assert initial_degrees is not None
        assert ranges_degrees is not None
        rot0, tilt0, psi0 = (float(v) for v in initial_degrees)
        direction_range = max(float(ranges_degrees[0]), float(ranges_degrees[1]))
        directions = torch.tensor([[rot0, tilt0]], dtype=torch.float64)
        if direction_range > 0:
            unit = _unit_vectors(rot, tilt)
            centre = _unit_vectors(
                torch.tensor([rot0], dtype=torch.float64),
                torch.tensor([tilt0], dtype=torch.float64),
            )[0]
            angle = torch.rad2deg(torch.acos((unit @ centre).clamp(-1.0, 1.0)))
            near = angle <= direction_range + 1e-9
            directions = torch.cat(
                [directions, torch.stack([rot[near], tilt[near]], dim=-1)]
            )
        psi_range = min(float(ranges_degrees[2]), 180.0)
        psi = psi0 + _grid_1d(psi_range, step)
        first = torch.tensor([[rot0, tilt0, psi0]], dtype=torch.float64)
    n_dirs, n_in_plane = directions.shape[0], psi.shape[0]
    angles = torch.cat(
        [
            directions[:, None, :].expand(n_dirs, n_in_plane, 2),
            psi[None, :, None].expand(n_dirs, n_in_plane, 1),
        ],
        dim=-1,
    ).reshape(-1, 3)
    if first is not None:
        angles = torch.cat([first, angles])
    return euler_angles_to_matrix(angles)


def _unit_vectors(
    rot_degrees: torch.Tensor, tilt_degrees: torch.Tensor
) -> torch.Tensor:
    """Viewing directions ``(m, 3)`` of Euler ``(rot, tilt)``: polar ``tilt``, azimuth ``rot``."""
    rot = torch.deg2rad(rot_degrees)
    tilt = torch.deg2rad(tilt_degrees)
    return torch.stack(
        [tilt.sin() * rot.cos(), tilt.sin() * rot.sin(), tilt.cos()], dim=-1
    )


def mask_center_px(mask: torch.Tensor) -> torch.Tensor:
    """Centre of mass of a mask over its positive voxels, ``(3,)`` xyz pixels."""
    return torch.flip(center_of_mass_3d(mask.double(), positive_only=True), dims=(-1,))


def _crop(volume: torch.Tensor, centre_xyz: Sequence[int], size: int) -> torch.Tensor:
    """Cube of side ``size`` whose centre voxel ``size // 2`` is ``n // 2 + centre``."""
    padded = F.pad(volume, (size,) * 6)
    starts = [
        volume.shape[axis] // 2 + int(centre_xyz[2 - axis]) - size // 2 + size
        for axis in range(3)
    ]
    return padded[
        starts[0] : starts[0] + size,
        starts[1] : starts[1] + size,
        starts[2] : starts[2] + size,
    ]


def _mask_points(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support of a crop mask: positions ``(p, 3)`` xyz from the centre, weights ``(p,)``."""
    index = torch.nonzero(mask >= MASK_EPS)  # (p, 3) zyx
    centre = torch.tensor([n // 2 for n in mask.shape], device=mask.device)
    points = torch.flip(index - centre, dims=(-1,)).to(mask.dtype)
    return points, mask[index[:, 0], index[:, 1], index[:, 2]]


def score_candidates(
    dest: torch.Tensor,
    points_px: torch.Tensor,
    weights: torch.Tensor,
    src_values: torch.Tensor,
    matrices: torch.Tensor,
    translations_px: torch.Tensor,
    score: ScoreName = "rms",
    max_samples_per_chunk: int = 20_000_000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Score candidate operators ``vol(x) = dest(R x + u)`` against ``src`` (batched).

    Parameters
    ----------
    dest
        ``(d, d, d)`` target crop (centre voxel ``d // 2``).
    points_px
        ``(p, 3)`` xyz positions of the mask support relative to the crop centre.
    weights
        ``(p,)`` mask values at the points.
    src_values
        ``(p,)`` reference density at the points.
    matrices
        ``(c, 3, 3)`` candidate rotations ``R`` (xyz).
    translations_px
        ``(c, 3)`` candidate crop-frame translations ``u`` (xyz pixels).
    score
        ``"rms"`` or ``"cc"`` (see the module docstring).
    max_samples_per_chunk
        Samples per ``grid_sample`` call.
    device
        Where the candidates are scored (None: ``dest``'s device); the crops are
        moved there once and the candidates chunk by chunk.

    Returns
    -------
    torch.Tensor
        ``(c,)`` scores (lower is better), on ``matrices``'s device.
    """
    dtype = dest.dtype
    device = torch.device(device) if device is not None else dest.device
    size = dest.shape[-1]
    chunk = max(1, int(max_samples_per_chunk) // max(1, points_px.shape[0]))
    volume = dest.to(device)[None, None]
    points = points_px.to(device=device, dtype=dtype)
    w = weights.to(device=device, dtype=dtype)
    s = src_values.to(device=device, dtype=dtype)
    w_sum = w.sum()
    if score == "cc":
        s_centred = s - (w * s).sum() / w_sum
        s_norm = torch.sqrt((w * s_centred**2).sum())
    out = []
    for first in range(0, matrices.shape[0], chunk):
        rot = matrices[first : first + chunk].to(device=device, dtype=dtype)
        shift = translations_px[first : first + chunk].to(device=device, dtype=dtype)
        coordinates = torch.einsum("cij,pj->cpi", rot, points) + shift[:, None, :]
        grid = 2.0 * (coordinates + size // 2) / (size - 1) - 1.0  # xyz order
        samples = F.grid_sample(
            volume,
            grid[None, :, :, None, :],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )[0, 0, :, :, 0]  # (c, p)
        if score == "rms":
            value = torch.sqrt(((samples - s) ** 2 * w).sum(-1) / w_sum)
        else:
            centred = samples - (samples * w).sum(-1, keepdim=True) / w_sum
            norm = torch.sqrt((w * centred**2).sum(-1)).clamp(min=1e-20)
            value = 1.0 - (w * centred * s_centred).sum(-1) / (
                norm * s_norm.clamp(min=1e-20)
            )
        out.append(value.to(matrices.device))
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype)


def search_operator(
    volume: torch.Tensor,
    mask: torch.Tensor,
    pixel_size_angstrom: float,
    settings: SearchSettings,
    *,
    initial: LocalSymmetryOperator | None = None,
    target_mask: torch.Tensor | None = None,
    max_candidates: int | None = 1000,
) -> SearchResult:
    """Search one operator of a reference mask (§D.5).

    Parameters
    ----------
    volume
        ``(n, n, n)`` map.
    mask
        ``(n, n, n)`` reference mask in [0, 1].
    pixel_size_angstrom
        Pixel size in Å.
    settings
        Ranges, steps, binning and score.
    initial
        Current operator (local search: candidates are centred on it).
    target_mask
        Global search: the mask of the target copy (its centre of mass is the target
        centre). Exactly one of ``initial`` / ``target_mask`` must be given.
    max_candidates
        Keep only the best candidates in the result (None = all).

    Returns
    -------
    SearchResult
        The best operator and the sorted candidates.
    """
    if (initial is None) == (target_mask is None):
        raise ValueError("give exactly one of initial (local) or target_mask (global)")
    settings.validate(pixel_size_angstrom)
    dtype = torch.float32
    volume = volume.to(dtype)
    mask = mask.to(dtype)
    pixel = float(pixel_size_angstrom)
    com0 = torch.round(mask_center_px(mask))
    offsets_px = [r / pixel for r in settings.offset_ranges_angstrom()]
    index = torch.nonzero(mask > MASK_EPS)
    if index.numel() == 0:
        raise ValueError("mask is entirely zero")
    centre = torch.tensor([n // 2 for n in mask.shape])
    support = torch.flip(index - centre, dims=(-1,)).double()
    max_distance = float((support - com0).norm(dim=-1).max())
    cropdim = 2 * math.ceil(max_distance + max(offsets_px) + 1.0)
    if initial is not None:
        a0 = initial.matrix()
        c1 = a0 @ com0 + initial.translation_px(pixel)
    else:
        assert target_mask is not None
        c1 = mask_center_px(target_mask.to(dtype))
    c1_int = torch.round(c1)
    delta = c1 - c1_int
    com0_list = [int(v) for v in com0]
    src = _crop(volume, com0_list, cropdim)
    crop_mask = _crop(mask, com0_list, cropdim)
    dest = _crop(volume, [int(v) for v in c1_int], cropdim)
    beta = 1.0
    if settings.bin > 1:
        newdim = math.ceil(cropdim / settings.bin)
        newdim += newdim % 2
        if newdim + 1 < cropdim:
            src = resize_fourier_3d(src, newdim)
            dest = resize_fourier_3d(dest, newdim)
            crop_mask = resize_fourier_3d(crop_mask, newdim).clamp(0.0, 1.0)
            # Fourier ringing leaves tiny positive values everywhere: drop them so that
            # only the (binned) mask support is scored
            crop_mask = torch.where(
                crop_mask < BINNED_MASK_FLOOR, torch.zeros_like(crop_mask), crop_mask
            )
            beta = cropdim / newdim
    points, weights = _mask_points(crop_mask)
    src_index = torch.nonzero(crop_mask >= MASK_EPS)
    src_values = src[src_index[:, 0], src_index[:, 1], src_index[:, 2]]
    # candidate rotations
    if settings.use_healpix:
        rotations = healpix_rotation_grid(
            settings.ang_step,
            None if settings.global_search else initial.angles_degrees,  # type: ignore[union-attr]
            None if settings.global_search else settings.angular_ranges(),
        )
    elif settings.global_search:
        rotations = uniform_rotation_grid(settings.ang_step)
    elif settings.local_grid == "euler":
        assert initial is not None
        rotations = euler_local_grid(
            initial.angles_degrees, settings.angular_ranges(), settings.ang_step
        )
    else:
        assert initial is not None
        rotations = axis_angle_local_grid(
            initial.matrix(), max(settings.angular_ranges()), settings.ang_step
        )
    shifts = translation_grid_3d(
        [r / beta for r in offsets_px], settings.offset_step / pixel / beta
    ) + (delta / beta)
    n_rot, n_shift = rotations.shape[0], shifts.shape[0]
    all_rot = rotations[:, None].expand(n_rot, n_shift, 3, 3).reshape(-1, 3, 3)
    all_shift = shifts[None].expand(n_rot, n_shift, 3).reshape(-1, 3)
    scores = score_candidates(
        dest,
        points,
        weights,
        src_values,
        all_rot,
        all_shift,
        settings.score,
        settings.max_samples_per_chunk,
        settings.device,
    ).double()
    order = torch.argsort(scores)
    if max_candidates is not None:
        order = order[:max_candidates]
    kept_rot = all_rot[order]
    translations_px = c1_int + beta * all_shift[order] - kept_rot @ com0
    angles = matrix_to_euler_angles(kept_rot)
    candidates = [
        LocalSymmetryOperator(
            float(a[0]),
            float(a[1]),
            float(a[2]),
            tuple(float(v) * pixel for v in t),  # type: ignore[arg-type]
            float(sc),
        )
        for a, t, sc in zip(angles, translations_px, scores[order], strict=True)
    ]
    return SearchResult(candidates[0], candidates, int(scores.numel()))
