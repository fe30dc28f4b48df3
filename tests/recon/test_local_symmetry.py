"""Local symmetry as refine3d imposes it on each half-reference (spec §D.1, §D.3, §D.7).

A pseudo-dimer of Gaussian blobs: copy B is copy A moved by a known operator
``T(x) = A x + t`` (a 150° rotation and a shift, not a 2-fold), and the operator is
written to a RELION STAR file in Å and read back exactly as ``refine3d`` reads it
(:func:`cryoavg.cli.refine3d.load_local_symmetry`), so the direction of the operator,
the mask and the pixel size are all exercised.
"""

import math

import pytest
import torch

from cryoavg.cli.refine3d import load_local_symmetry
from cryoavg.errors import InputError
from cryoavg.io.mrc import write_mrc
from cryoavg.localsym.apply import transform_map
from cryoavg.localsym.io import write_operator_star
from cryoavg.localsym.operators import LocalSymmetryOperator, MaskOperators
from cryoavg.ops.fourier import resize_fourier_3d
from cryoavg.ops.masks import spherical_mask_3d
from cryoavg.ops.rotations import axis_angle_to_matrix
from cryoavg.recon.fsc import fourier_shell_correlation

BOX = 40
PIXEL = 4.0  # Å/px


def _subunit(centre_xyz: torch.Tensor, box: int, scale: int) -> torch.Tensor:
    """Asymmetric cluster of blobs (σ 1.3 px of the final box) around ``centre_xyz``
    (px of the final box), sampled on a ``scale`` times finer ``box`` grid."""
    generator = torch.Generator().manual_seed(3)
    axis = (torch.arange(box, dtype=torch.float64) - box // 2) / scale
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = torch.zeros((box,) * 3, dtype=torch.float64)
    offsets = torch.randn(6, 3, generator=generator, dtype=torch.float64) * 2.0
    weights = 0.5 + torch.rand(6, generator=generator, dtype=torch.float64)
    for (x, y, z), weight in zip(centre_xyz + offsets, weights, strict=True):
        r2 = (xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2
        volume += weight * torch.exp(-r2 / (2 * 1.3**2))
    return volume.float()


@pytest.fixture(scope="module")
def dimer():
    """Copies built on a 2× grid and Fourier-cropped: band-limited, B an exact copy."""
    centre_a = torch.tensor([-7.0, 1.0, 0.0], dtype=torch.float64)
    centre_b = torch.tensor([7.0, -1.0, 1.0], dtype=torch.float64)
    axis = torch.tensor([0.3, 0.2, 1.0], dtype=torch.float64)
    rotation = axis_angle_to_matrix(axis / axis.norm() * math.radians(150.0))
    translation = centre_b - rotation @ centre_a  # T(c_A) = c_B (px)
    fine_a = _subunit(centre_a, 2 * BOX, 2)
    fine_b = transform_map(fine_a, rotation.float(), 2 * translation.float())
    copy_a = resize_fourier_3d(fine_a, BOX)
    copy_b = resize_fourier_3d(fine_b, BOX)
    mask = spherical_mask_3d((BOX,) * 3, 5.5, 1.5, dtype=torch.float32)
    mask_a = transform_map(mask, torch.eye(3), centre_a.float()).clamp(0, 1)
    operator = LocalSymmetryOperator.from_matrix(rotation, translation * PIXEL)
    return copy_a, copy_b, mask_a, operator


def _load(tmp_path, mask_a, operator, pixel=PIXEL):
    mask_path = tmp_path / "mask_a.mrc"
    write_mrc(mask_path, mask_a.numpy(), pixel)
    star = tmp_path / "localsym.star"
    write_operator_star(star, [MaskOperators(str(mask_path), [operator])])
    return load_local_symmetry(str(star), BOX, pixel)


def _region(symmetry):
    matrices, translations = symmetry.operators[0]
    mask_a = symmetry.masks[0]
    mask_b = transform_map(mask_a, matrices[0], translations[0]).clamp(0, 1)
    return mask_a, mask_b


def test_masks_of_the_copies_do_not_overlap(dimer, tmp_path):
    _, _, mask_a, operator = dimer
    mask_a, mask_b = _region(_load(tmp_path, mask_a, operator))
    assert float((mask_a * mask_b).sum()) < 1e-3 * float(mask_a.sum())


def _shell_amplitude_ratio(out, truth, region, shells):
    """``|FT(out·region)| / |FT(truth·region)|`` over a band of shells."""
    n = truth.shape[0]
    k = torch.fft.fftfreq(n) * n
    radius = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k**2).round()
    band = (radius >= shells[0]) & (radius <= shells[1])
    a = torch.fft.fftn(out * region)[band].abs().pow(2).sum()
    b = torch.fft.fftn(truth * region)[band].abs().pow(2).sum()
    return float((a / b).sqrt())


@pytest.mark.parametrize("oversampling", [1, 2])
def test_symmetric_map_is_unchanged(dimer, tmp_path, oversampling):
    copy_a, copy_b, mask_a, operator = dimer
    truth = copy_a + copy_b
    symmetry = _load(tmp_path, mask_a, operator)
    symmetry.oversampling = oversampling
    out = symmetry.apply(truth)
    mask_a, mask_b = _region(symmetry)
    region = torch.maximum(mask_a, mask_b)
    change = float(((out - truth) * region).norm() / (truth * region).norm())
    fsc = fourier_shell_correlation(out * region, truth * region)
    high = _shell_amplitude_ratio(out, truth, region, (BOX // 4, BOX // 2))
    if oversampling == 1:
        # RELION: trilinear on the map's grid blurs the copies near Nyquist
        assert high < 0.85
        assert change > 0.05
        assert float(fsc[BOX // 2 - 1]) < 0.8
    else:
        assert high > 0.92
        assert change < 0.05
        assert float(fsc[1 : BOX // 2].min()) > 0.95
    # outside every mask the map is untouched
    far = (mask_a <= 1e-6) & (mask_b <= 1e-6)
    assert torch.equal(out[far], truth[far])


def test_translation_is_converted_with_the_pixel_size(dimer, tmp_path):
    """The operator's translation is stored in Å and used in pixels of the map: read
    for another pixel size, it maps copy A elsewhere (or out of the box: an error)."""
    copy_a, copy_b, mask_a, operator = dimer
    truth = copy_a + copy_b
    symmetry = _load(tmp_path, mask_a, operator)
    expected = torch.tensor(operator.translation_angstrom, dtype=torch.float64) / PIXEL
    assert torch.allclose(symmetry.operators[0][1][0].double(), expected, atol=1e-4)
    try:
        symmetry = _load(tmp_path, mask_a, operator, pixel=PIXEL * 0.8)
    except InputError:  # pragma: no cover - depends on the geometry
        return
    out = symmetry.apply(truth)
    region = torch.maximum(*_region(_load(tmp_path, mask_a, operator)))
    change = float(((out - truth) * region).norm() / (truth * region).norm())
    assert change > 0.2


@pytest.mark.parametrize("noise", [0.5, 1.0])
@pytest.mark.parametrize("oversampling", [1, 2])
def test_noisy_pair_gets_closer_to_the_truth(dimer, tmp_path, noise, oversampling):
    copy_a, copy_b, mask_a, operator = dimer
    truth = copy_a + copy_b
    symmetry = _load(tmp_path, mask_a, operator)
    symmetry.oversampling = oversampling
    mask_a, mask_b = _region(symmetry)
    region = torch.maximum(mask_a, mask_b)
    generator = torch.Generator().manual_seed(11)
    noisy = truth + noise * float(truth.max()) * torch.randn(
        truth.shape, generator=generator
    )
    out = symmetry.apply(noisy)
    before = float(((noisy - truth) * region).norm())
    after = float(((out - truth) * region).norm())
    # two copies averaged: noise amplitude × ~1/√2 (less inside soft mask edges)
    assert after < 0.8 * before
    fsc_before = fourier_shell_correlation(noisy * region, truth * region)
    fsc_after = fourier_shell_correlation(out * region, truth * region)
    assert float(fsc_after[1:].mean()) > float(fsc_before[1:].mean()) + 0.03
    # imposing the inverse operator instead (wrong direction) does not help
    matrices, translations = symmetry.operators[0]
    inverse = matrices.transpose(-1, -2)
    wrong = type(symmetry)(
        masks=symmetry.masks,
        operators=[(inverse, -torch.einsum("kij,kj->ki", inverse, translations))],
        oversampling=oversampling,
    )
    assert float(((wrong.apply(noisy) - truth) * region).norm()) > after * 1.2
