import math

import pytest
import torch

from cryoavg.localsym.apply import (
    apply_local_symmetry,
    check_operators_in_sphere,
    duplicate_masked_density,
    soft_sphere_3d,
    transform_map,
)
from cryoavg.localsym.masks import create_mask, create_mask_denovo
from cryoavg.localsym.operators import operators_to_tensors

from ._synthetic import operator_between, two_copy_map

PX = 2.0


@pytest.fixture(scope="module")
def two_copies():
    op = operator_between((37.0, 64.0, -21.0), (-9, 3, 2), (9, -4, -3), PX)
    volume, mask, copy_a, copy_b = two_copy_map(op, 48, PX)
    return op, volume, mask, copy_a, copy_b


def _corr(a, b, weights):
    a = a - (a * weights).sum() / weights.sum()
    b = b - (b * weights).sum() / weights.sum()
    return float(
        (weights * a * b).sum()
        / torch.sqrt((weights * a * a).sum() * (weights * b * b).sum())
    )


def test_apply_averages_noisy_copies_and_keeps_outside(two_copies):
    op, volume, mask, _copy_a, _copy_b = two_copies
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(volume.shape, generator=generator) * 0.3
    noisy = volume + noise
    operators = [operators_to_tensors([op], PX)]
    out = apply_local_symmetry(noisy, [mask], operators)
    # outside every region the map is unchanged
    matrices, shifts = operators[0]
    covered = mask + transform_map(mask, matrices, shifts)[0]
    outside = covered <= 1e-6
    assert torch.equal(out[outside], noisy[outside])
    # inside the reference region the average is closer to the clean copy
    core = (mask > 0.99).float()
    err_before = float(((noisy - volume) ** 2 * core).sum())
    err_after = float(((out - volume) ** 2 * core).sum())
    assert err_after < 0.65 * err_before
    assert _corr(out, volume, core) > _corr(noisy, volume, core)
    # noise-free: symmetrising a symmetric map changes little
    clean = apply_local_symmetry(volume, [mask], operators)
    assert float(((clean - volume) ** 2 * core).sum() / core.sum()) < 1e-3


def test_apply_weights_rules_on_overlap():
    volume = torch.rand(16, 16, 16)
    mask = torch.zeros(16, 16, 16)
    mask[6:10, 6:10, 6:10] = 0.5
    identity = (torch.eye(3)[None], torch.zeros(1, 3))
    # identity operator: V = 2 ori M / 2 = ori M; S = 2 ori M, W = 2 M = 1 -> S
    out = apply_local_symmetry(volume, [mask], [identity])
    torch.testing.assert_close(out, volume)


def test_duplicate_masks(two_copies):
    op, _, mask, _, _ = two_copies
    operators = [operators_to_tensors([op], PX)]
    dup = duplicate_masked_density([mask], operators)
    moved = transform_map(mask, *operators[0])[0]
    torch.testing.assert_close(dup, mask + moved)
    assert abs(float(dup.sum()) - 2 * float(mask.sum())) < 0.02 * float(mask.sum())


def test_sphere_check(two_copies):
    op, _, mask, _, _ = two_copies
    matrices, shifts = operators_to_tensors([op], PX, torch.float64)
    assert check_operators_in_sphere(mask, matrices, shifts) == []
    far = shifts + torch.tensor([[15.0, 0.0, 0.0]], dtype=torch.float64)
    assert check_operators_in_sphere(mask, matrices, far) == [0]


def test_soft_sphere_falling_edge_and_relion_bug():
    volume = torch.ones(32, 32, 32)
    out = soft_sphere_3d(volume, 0.5, 4.0)
    assert float(out[16, 16, 16]) == 1.0
    assert float(out[16, 16, 16 + 10]) == pytest.approx(
        0.5 + 0.5 * math.cos(math.pi * 2 / 4)
    )
    assert float(out[16, 16, 31]) == 0.0
    bug = soft_sphere_3d(volume, 0.5, 4.0, relion_inverted_edge=True)
    assert float(bug[16, 16, 16 + 9]) == pytest.approx(
        0.5 + 0.5 * math.cos(math.pi * 3 / 4)
    )


def test_create_mask_values_at_known_distances():
    volume = torch.zeros(32, 32, 32)
    volume[16, 16, 16] = 1.0
    mask = create_mask(volume, 0.5, extend_inimask_px=3.0, width_soft_edge_px=4.0)
    # binary after extension: distance < 3 from the centre voxel
    assert float(mask[16, 16, 16 + 2]) == 1.0
    # first voxel outside the binary mask: distance to the nearest 1 voxel is 1
    assert float(mask[16, 16, 16 + 3]) == pytest.approx(
        0.5 + 0.5 * math.cos(math.pi / 4)
    )
    assert float(mask[16, 16, 16 + 5]) == pytest.approx(
        0.5 + 0.5 * math.cos(math.pi * 3 / 4)
    )
    assert float(mask[16, 16, 16 + 6]) == 0.0
    shrunk = create_mask(mask, 0.99, extend_inimask_px=-1.5)
    assert float(shrunk[16, 16, 16 + 2]) == 0.0
    assert float(shrunk[16, 16, 17]) == 1.0
    assert float(create_mask(volume, 0.5, invert=True)[16, 16, 16]) == 0.0


def test_create_mask_lowpass_and_denovo():
    volume = torch.zeros(32, 32, 32)
    volume[12:20, 12:20, 12:20] = 1.0
    mask = create_mask(volume, 0.5, lowpass_angstrom=10.0, pixel_size_angstrom=2.0)
    assert float(mask[16, 16, 16]) == 1.0
    assert float(mask[0, 0, 0]) == 0.0
    sphere = create_mask_denovo(32, 0.0, 8.0, 4.0, (2.0, 0.0, 0.0))
    assert float(sphere[16, 16, 18 + 7]) == 1.0
    assert float(sphere[16, 16, 18 + 10]) == pytest.approx(
        0.5 - 0.5 * math.cos(math.pi * 2 / 4)
    )
    assert float(sphere[16, 16, 18 - 13]) == 0.0
