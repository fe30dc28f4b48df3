"""Gradient-based refinement of local-symmetry operators (replaces manual grid rounds).

Conventions
-----------
* Operators ``T(x) = A x + t`` (xyz pixels from the box centre, RELION ``A``).
* Loss for operator ``i`` of a mask ``M``: the mask-weighted mean squared difference
  ``sum_x M(x) (V(T_i x) - V(x))^2 / sum_x M(x)`` (the square of RELION's search score),
  where ``V(T_i x)`` is computed with the differentiable
  :func:`cryoavg.ops.transforms.transform_volumes_3d` (inverse operator applied to the
  whole map). All operators of a mask are refined together in one batch.
* Parametrisation (per operator, 6 numbers): a small rotation vector ``w`` applied about
  the target centre ``c1 = A0 c0 + t0`` (``c0`` = mask centre of mass) and a shift ``s``
  in pixels: ``A = exp(w / L) A0``, ``t = exp(w / L) (t0 - c1) + c1 + s``; ``L`` is the
  radius of the masked region so that ``w`` and ``s`` are both in pixels of motion at
  the region's edge (good conditioning for L-BFGS).
* Coarse to fine: the map is low-pass filtered at a sequence of resolutions (factors of
  the input map's Nyquist); each stage runs L-BFGS until the per-step change is below
  ``tol_degrees`` and ``tol_px`` (0.01° and 0.01 px by default). The last stage stops
  at 1.2 x Nyquist by default: a map is band-limited to a *cube* in Fourier space, and
  the cube's corners of one copy rotate outside the other copy's cube, so comparing
  copies beyond the inscribed sphere biases the optimum (0.1-0.3° on a 20-px subunit).
* Oversampling: the region that matters (the mask support, every target region and a
  margin) is cropped and Fourier-upsampled by ``oversample`` (2 by default) before the
  trilinear ``grid_sample``: trilinear interpolation of the map at its own sampling
  blurs by a sub-pixel-position-dependent amount, which pulls the optimum by a few
  tenths of a degree; on the 2x sinc-interpolated grid that bias is ~50x smaller.
  Operators are converted exactly between the full box and the crop
  (``t_crop = A c + t - c`` for a crop centred at ``c``, then scaled by the factor).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cryoavg.localsym.operators import LocalSymmetryOperator
from cryoavg.localsym.search import _crop as _crop_cube
from cryoavg.localsym.search import mask_center_px
from cryoavg.ops.fourier import lowpass_filter, resize_fourier_3d
from cryoavg.ops.rotations import axis_angle_to_matrix, rotation_angle_degrees
from cryoavg.ops.transforms import transform_volumes_3d

__all__ = ["RefineSettings", "RefineTrace", "refine_operators"]


@dataclass
class RefineSettings:
    """Settings of :func:`refine_operators`.

    Attributes
    ----------
    lowpass_nyquist_factors
        Resolution of each stage as a multiple of Nyquist (``2 * pixel size``);
        0 = unfiltered.
    max_iterations
        Maximum L-BFGS steps per stage.
    tol_degrees, tol_px
        Convergence: stop a stage when one step changes every rotation by less than
        ``tol_degrees`` and every translation by less than ``tol_px``.
    backend
        ``"points"``: sample ``V(T x)`` with ``grid_sample`` only at the voxels of the
        mask support (fast); ``"volume"``: resample the whole map with
        :func:`~cryoavg.ops.transforms.transform_volumes_3d` (identical loss, slower).
    oversample
        Fourier-upsampling factor of the cropped region (1 = refine on the map's own
        grid).
    margin_px
        Margin (input pixels) around the mask support and the target regions kept in
        the crop.
    """

    lowpass_nyquist_factors: Sequence[float] = (3.0, 1.5, 1.2)
    max_iterations: int = 60
    tol_degrees: float = 0.01
    tol_px: float = 0.01
    backend: str = "points"
    oversample: int = 2
    margin_px: float = 8.0


@dataclass
class RefineTrace:
    """What happened during refinement.

    Attributes
    ----------
    losses
        Loss after each L-BFGS step (mean over operators).
    steps
        Number of L-BFGS steps per stage.
    converged
        Whether the final stage met the tolerances.
    """

    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    converged: bool = False


def _support(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask support: zyx indices (p, 3), xyz positions from the centre (p, 3), weights."""
    index = torch.nonzero(mask > 1e-6)
    centre = torch.tensor([n // 2 for n in mask.shape], device=mask.device)
    points = torch.flip(index - centre, (-1,)).to(mask.dtype)
    return index, points, mask[index[:, 0], index[:, 1], index[:, 2]]


@dataclass
class _TargetSampler:
    """Samples a map at full-box positions from a cropped, Fourier-upsampled copy.

    ``centre_px``: xyz offset (input pixels) of the crop centre from the box centre;
    ``factor``: upsampling factor. A full-box position ``y`` (pixels from the box
    centre) is ``factor (y - centre_px)`` pixels from the crop centre.
    """

    volume: torch.Tensor  # (m, m, m) upsampled crop (or the map itself, factor 1)
    centre_px: torch.Tensor  # (3,) xyz
    factor: int

    def __call__(self, positions_px: torch.Tensor) -> torch.Tensor:
        """Trilinear samples at ``(k, p, 3)`` xyz full-box positions -> ``(k, p)``."""
        local = self.factor * (positions_px - self.centre_px)
        size = self.volume.shape[-1]
        grid = 2.0 * (local + size // 2) / (size - 1) - 1.0  # xyz, align_corners
        return F.grid_sample(
            self.volume[None, None],
            grid[None, :, :, None, :],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )[0, 0, :, :, 0]


def _target_sampler(
    volume: torch.Tensor,
    points_px: torch.Tensor,
    matrices: torch.Tensor,
    translations_px: torch.Tensor,
    oversample: int,
    margin_px: float,
) -> _TargetSampler:
    """Crop the target regions ``A x + t`` of the support (plus a margin), upsample.

    Parameters
    ----------
    volume
        ``(n, n, n)`` map (already low-pass filtered for the stage).
    points_px
        ``(p, 3)`` xyz support positions from the box centre.
    matrices, translations_px
        ``(k, 3, 3)`` and ``(k, 3)`` starting operators (full-box pixels).
    oversample
        Upsampling factor (1: sample the map itself).
    margin_px
        Margin around the target regions, input pixels (covers the refinement's
        motion).
    """
    if oversample == 1:
        return _TargetSampler(volume, torch.zeros(3, dtype=volume.dtype), 1)
    targets = (
        torch.einsum("kij,pj->kpi", matrices, points_px) + translations_px[:, None]
    )
    targets = targets.reshape(-1, 3)
    low, high = targets.min(0).values, targets.max(0).values
    centre = torch.round((low + high) / 2.0)
    half = float(torch.maximum(high - centre, centre - low).max()) + margin_px
    size = min(2 * math.ceil(half + 1.0), 2 * math.ceil(max(volume.shape) / 2.0))
    crop = _crop_cube(volume, [int(v) for v in centre], size)
    return _TargetSampler(
        resize_fourier_3d(crop, oversample * size), centre, oversample
    )


def _operator_loss_points(
    sampler: _TargetSampler,
    reference: torch.Tensor,
    points_px: torch.Tensor,
    weights: torch.Tensor,
    matrices: torch.Tensor,
    translations: torch.Tensor,
) -> torch.Tensor:
    """(k,) ``sum_x M(x) (V(A x + t) - V(x))^2 / sum_x M(x)`` over the mask support.

    ``reference`` ``(p,)``: the map at the support voxels, ``points_px`` ``(p, 3)``
    their xyz positions, ``weights`` ``(p,)`` the mask values.
    """
    coordinates = (
        torch.einsum("kij,pj->kpi", matrices, points_px) + translations[:, None]
    )
    samples = sampler(coordinates)  # (k, p)
    return ((samples - reference) ** 2 * weights).sum(-1) / weights.sum()


def _operator_loss(
    volume: torch.Tensor,
    mask: torch.Tensor,
    matrices: torch.Tensor,
    translations: torch.Tensor,
) -> torch.Tensor:
    """(k,) mask-weighted mean squared differences ``V(A x + t)`` vs ``V(x)``."""
    inverse = matrices.transpose(-1, -2)
    inverse_t = -torch.einsum("kij,kj->ki", inverse, translations)
    pulled = transform_volumes_3d(volume, inverse, inverse_t)  # (k, n, n, n)
    difference = (pulled - volume) ** 2 * mask
    return difference.flatten(1).sum(-1) / mask.sum()


def refine_operators(
    volume: torch.Tensor,
    mask: torch.Tensor,
    operators: Sequence[LocalSymmetryOperator],
    pixel_size_angstrom: float,
    settings: RefineSettings | None = None,
) -> tuple[list[LocalSymmetryOperator], RefineTrace]:
    """Refine all operators of one mask by L-BFGS through ``grid_sample``.

    Parameters
    ----------
    volume
        ``(n, n, n)`` map.
    mask
        ``(n, n, n)`` reference mask in [0, 1].
    operators
        Starting operators (e.g. the result of a search).
    pixel_size_angstrom
        Pixel size in Å.
    settings
        Stages and tolerances.

    Returns
    -------
    operators : list of LocalSymmetryOperator
        Refined operators; ``score`` is RELION's RMS difference at the end.
    trace : RefineTrace
        Loss history and convergence flag.
    """
    settings = settings or RefineSettings()
    if not operators:
        return [], RefineTrace(converged=True)
    if settings.backend not in ("points", "volume"):
        raise ValueError(
            f"backend must be 'points' or 'volume', got {settings.backend!r}"
        )
    if int(settings.oversample) < 1:
        raise ValueError(f"oversample must be >= 1, got {settings.oversample}")
    oversample = int(settings.oversample) if settings.backend == "points" else 1
    dtype = torch.float64
    pixel = float(pixel_size_angstrom)
    base = volume.to(dtype)
    weights = mask.to(dtype)
    a0 = torch.stack([op.matrix(dtype) for op in operators])  # (k, 3, 3)
    t0 = torch.stack([op.translation_px(pixel, dtype) for op in operators])  # (k, 3)
    com0 = mask_center_px(weights)
    c1 = torch.einsum("kij,j->ki", a0, com0) + t0  # (k, 3)
    index, points, point_weights = _support(weights)
    # the loss is scaled to unit signal inside the mask: L-BFGS's absolute tolerances
    # would otherwise stop at once on maps stored with tiny values (e.g. 1e-4)
    inside = base[index[:, 0], index[:, 1], index[:, 2]]
    spread = float(torch.sqrt((point_weights * (inside - inside.mean()) ** 2).mean()))
    spread = spread if spread > 0 else 1.0
    scaled = base / spread
    radius = float((points - com0).norm(dim=-1).max().clamp(min=1.0))
    rotation = torch.zeros_like(t0, requires_grad=True)
    shift = torch.zeros_like(t0, requires_grad=True)

    def current() -> tuple[torch.Tensor, torch.Tensor]:
        delta = axis_angle_to_matrix(rotation / radius)
        matrices = delta @ a0
        translations = torch.einsum("kij,kj->ki", delta, t0 - c1) + c1 + shift
        return matrices, translations

    trace = RefineTrace()
    for nyquist_factor in settings.lowpass_nyquist_factors:
        if nyquist_factor and nyquist_factor > 0:
            stage_volume = lowpass_filter(
                scaled, nyquist_factor * 2.0 * pixel, pixel, 2, ndim=3
            )
        else:
            stage_volume = scaled
        if settings.backend == "points":
            with torch.no_grad():
                start_m, start_t = current()
            sampler = _target_sampler(
                stage_volume, points, start_m, start_t, oversample, settings.margin_px
            )
            reference = stage_volume[index[:, 0], index[:, 1], index[:, 2]]

            def stage_loss(
                matrices: torch.Tensor,
                translations: torch.Tensor,
                sampler: _TargetSampler = sampler,
                reference: torch.Tensor = reference,
            ) -> torch.Tensor:
                return _operator_loss_points(
                    sampler, reference, points, point_weights, matrices, translations
                )
        else:

            def stage_loss(
                matrices: torch.Tensor,
                translations: torch.Tensor,
                stage_volume: torch.Tensor = stage_volume,
            ) -> torch.Tensor:
                return _operator_loss(stage_volume, weights, matrices, translations)

        optimiser = torch.optim.LBFGS(
            [rotation, shift],
            lr=1.0,
            max_iter=20,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure(
            stage_loss=stage_loss,
            optimiser: torch.optim.LBFGS = optimiser,
        ) -> torch.Tensor:
            optimiser.zero_grad()
            matrices, translations = current()
            loss = stage_loss(matrices, translations).sum()
            loss.backward()
            return loss

        steps = 0
        converged = False
        for _ in range(settings.max_iterations):
            with torch.no_grad():
                before_m, before_t = current()
            loss = optimiser.step(closure)
            steps += 1
            trace.losses.append(float(loss.detach()) * spread**2 / len(operators))
            with torch.no_grad():
                after_m, after_t = current()
                d_angle = float(
                    rotation_angle_degrees(before_m.transpose(-1, -2) @ after_m).max()
                )
                d_shift = float((after_t - before_t).norm(dim=-1).max())
            if d_angle < settings.tol_degrees and d_shift < settings.tol_px:
                converged = True
                break
        trace.steps.append(steps)
        trace.converged = converged
    with torch.no_grad():
        matrices, translations = current()
        # RELION's score on the input map itself
        final = _operator_loss(base, weights, matrices, translations)
    refined = [
        LocalSymmetryOperator.from_matrix(m, t * pixel, math.sqrt(max(float(s), 0.0)))
        for m, t, s in zip(matrices, translations, final, strict=True)
    ]
    return refined, trace
