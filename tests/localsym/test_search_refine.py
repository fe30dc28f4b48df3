import pytest
import torch

from cryoavg.localsym.microtubule import microtubule_operators
from cryoavg.localsym.operators import LocalSymmetryOperator
from cryoavg.localsym.refine import RefineSettings, refine_operators
from cryoavg.localsym.search import (
    SearchSettings,
    healpix_rotation_grid,
    mask_center_px,
    search_operator,
    translation_grid_3d,
    uniform_rotation_grid,
)
from cryoavg.ops.rotations import rotation_angle_degrees

from ._synthetic import operator_between, two_copy_map

PX = 2.0


@pytest.fixture(scope="module")
def case():
    truth = operator_between((37.0, 64.0, -21.0), (-9, 3, 2), (9, -4, -3), PX)
    volume, mask, _, copy_b = two_copy_map(truth, 48, PX)
    return truth, volume, mask, copy_b


def _errors(found, truth):
    angle = float(rotation_angle_degrees(found.matrix().T @ truth.matrix()))
    shift_px = float(
        (
            torch.tensor(found.translation_angstrom)
            - torch.tensor(truth.translation_angstrom)
        ).norm()
        / PX
    )
    return angle, shift_px


def test_truth_has_translation_of_tens_of_angstrom(case):
    truth = case[0]
    assert torch.tensor(truth.translation_angstrom).norm() > 30.0


def test_local_search_recovers_operator_on_grid(case):
    truth, volume, mask, _ = case
    com0 = torch.round(mask_center_px(mask))
    c1 = truth.matrix() @ com0 + truth.translation_px(PX)
    angles = (
        truth.rot_degrees + 2.0,
        truth.tilt_degrees - 4.0,
        truth.psi_degrees + 2.0,
    )
    start_matrix = LocalSymmetryOperator(*angles).matrix()
    start = LocalSymmetryOperator(
        *angles, tuple(((c1 - start_matrix @ com0) * PX).tolist())
    )
    settings = SearchSettings(
        ang_range=4.0, ang_step=2.0, offset_range=2.0, offset_step=2.0
    )
    result = search_operator(volume, mask, PX, settings, initial=start)
    angle, shift = _errors(result.best, truth)
    assert angle < 1e-3
    assert shift < 1e-3
    assert result.candidates[0].score <= result.candidates[-1].score
    assert result.n_candidates == 125 * 7


def test_local_search_cc_score_and_binning(case):
    truth, volume, mask, _ = case
    start = LocalSymmetryOperator(
        truth.rot_degrees + 1.0,
        truth.tilt_degrees - 1.0,
        truth.psi_degrees,
        truth.translation_angstrom,
    )
    settings = SearchSettings(
        ang_range=3.0,
        ang_step=1.0,
        offset_range=2.0,
        offset_step=1.0,
        bin=2,
        score="cc",
        local_grid="axis_angle",
    )
    best = search_operator(volume, mask, PX, settings, initial=start).best
    angle, shift = _errors(best, truth)
    assert angle <= 1.5
    assert shift <= 1.0


def test_global_search_finds_rotation_within_step(case):
    truth, volume, mask, copy_b = case
    settings = SearchSettings(ang_step=15.0, global_search=True, bin=2)
    result = search_operator(
        volume, mask, PX, settings, target_mask=(copy_b > 0.05).float()
    )
    angle, shift = _errors(result.best, truth)
    assert angle < 15.0
    assert shift < 3.0


def test_global_search_with_healpix_finds_rotation_within_step(case):
    truth, volume, mask, copy_b = case
    settings = SearchSettings(
        ang_step=16.0, global_search=True, bin=2, use_healpix=True
    )
    result = search_operator(
        volume, mask, PX, settings, target_mask=(copy_b > 0.05).float()
    )
    # order 2 (15°): 192 directions x 24 psi
    assert result.n_candidates == 192 * 24
    angle, shift = _errors(result.best, truth)
    assert angle < 15.0
    assert shift < 3.0


def test_local_healpix_grid_stays_within_the_ranges():
    start = LocalSymmetryOperator(30.0, 70.0, -40.0)
    rotations = healpix_rotation_grid(8.0, start.angles_degrees, (16.0, 16.0, 15.0))
    assert torch.allclose(rotations[0], start.matrix())
    # order 3 (7.5°): psi -40 + (-15, -7.5, 0, 7.5, 15)
    assert rotations.shape[0] % 5 == 1
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    view = rotations.mT @ z  # viewing direction of each rotation
    view0 = start.matrix().mT @ z
    spread = torch.rad2deg(torch.acos((view @ view0).clamp(-1, 1)))
    assert float(spread.max()) <= 16.0 + 1e-6
    assert rotations.shape[0] > 1 + 5 * 10
    # a local search on the HEALPix grid from a start inside the range
    only_current = healpix_rotation_grid(8.0, start.angles_degrees, (0.0, 0.0, 0.0))
    assert only_current.shape[0] == 2
    assert torch.allclose(only_current[1], start.matrix())


def test_refine_reaches_0_1_degree_and_0_1_px(case):
    truth, volume, mask, _ = case
    start = LocalSymmetryOperator(
        truth.rot_degrees - 2.0,
        truth.tilt_degrees - 2.0,
        truth.psi_degrees - 1.0,
        tuple(v + 1.5 for v in truth.translation_angstrom),
    )
    refined, trace = refine_operators(volume, mask, [start], PX, RefineSettings())
    angle, shift = _errors(refined[0], truth)
    assert angle < 0.1
    assert shift < 0.1
    assert trace.converged
    # the 2x-oversampled target (default) beats trilinear sampling of the map itself
    plain, _ = refine_operators(volume, mask, [start], PX, RefineSettings(oversample=1))
    assert angle < _errors(plain[0], truth)[0]


def test_refine_does_not_depend_on_the_map_scale(case):
    """Maps stored with tiny values (e.g. 1e-4) must refine as well as unit maps."""
    truth, volume, mask, _ = case
    start = LocalSymmetryOperator(
        truth.rot_degrees + 1.5,
        truth.tilt_degrees,
        truth.psi_degrees - 1.0,
        tuple(v + 1.0 for v in truth.translation_angstrom),
    )
    settings = RefineSettings(oversample=1)
    unit, _ = refine_operators(volume, mask, [start], PX, settings)
    tiny, trace = refine_operators(volume * 1e-4, mask, [start], PX, settings)
    assert _errors(tiny[0], truth)[0] < 0.1
    assert _errors(tiny[0], unit[0])[0] < 1e-3
    assert tiny[0].score == pytest.approx(unit[0].score * 1e-4, rel=1e-3)
    assert trace.losses[-1] < 1e-8


def test_refine_moves_operators_in_the_full_box_frame(case):
    """Cropping + upsampling must not change the frame: a pure shift start comes back."""
    truth, volume, mask, _ = case
    start = LocalSymmetryOperator(
        *truth.angles_degrees, tuple(v + 0.8 for v in truth.translation_angstrom)
    )
    refined, _ = refine_operators(
        volume, mask, [start, truth], PX, RefineSettings(margin_px=4.0)
    )
    for operator in refined:
        angle, shift = _errors(operator, truth)
        assert angle < 0.1
        assert shift < 0.05


def test_grids():
    grid = translation_grid_3d((2.0, 2.0, 0.0), 1.0)
    assert (grid[:, 2] == 0).all()
    assert grid.norm(dim=-1).max() <= 2.0 + 1e-9
    assert grid.shape[0] == 13
    rotations = uniform_rotation_grid(30.0)
    assert torch.allclose(
        rotations @ rotations.mT,
        torch.eye(3, dtype=torch.float64).expand_as(rotations),
        atol=1e-9,
    )


def test_microtubule_13pf_3start():
    ops = microtubule_operators(13, 3)
    assert len(ops) == 12
    # protofilament 8 (k = +1) and 6 (k = -1) around the reference #7
    plus = ops[6]
    assert plus.rot_degrees == 0.0
    assert plus.tilt_degrees == 0.0
    assert plus.psi_degrees == pytest.approx(-360.0 / 13)
    assert plus.translation_angstrom[2] == pytest.approx(3 * 40.0 / 13)
    minus = ops[5]
    assert minus.psi_degrees == pytest.approx(360.0 / 13)
    assert minus.translation_angstrom[2] == pytest.approx(-3 * 40.0 / 13)
    # active rotation about z by +twist: x axis goes towards +y
    moved = plus.matrix() @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert float(moved[1]) > 0
    # the operators compose: k = 2 equals k = 1 applied twice (no seam crossing)
    twice = plus.compose(plus)
    assert twice.psi_degrees == pytest.approx(ops[7].psi_degrees)
    assert twice.translation_angstrom[2] == pytest.approx(
        ops[7].translation_angstrom[2]
    )
