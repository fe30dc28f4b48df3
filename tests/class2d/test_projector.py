import pytest
import torch

from cryoavg.class2d.projector import (
    ClassProjector,
    gridding_correction_map,
    interpolate_rows,
)
from cryoavg.class2d.sampling import PixelSet
from cryoavg.ops.fourier import dft_2d
from tests.class2d.conftest import blob_image

N = 32


@pytest.fixture(scope="module")
def classes():
    return torch.stack([blob_image(i, N) for i in range(3)])  # (3, N, N)


@pytest.fixture(scope="module")
def pixel_set():
    return PixelSet.for_size(N, N)


def gathered_dft(images, ps):
    return dft_2d(images).reshape(images.shape[0], -1)[:, ps.indices]


def rotate_90(images):
    """``p(x) = c(Rz(90°) x)``: p[y, x] = c[x, −y] about pixel N//2 (zero fill)."""
    out = torch.zeros_like(images)
    c = N // 2
    for i in range(N):
        for j in range(N):
            y, x = i - c, j - c
            ii, jj = x + c, -y + c
            if 0 <= ii < N and 0 <= jj < N:
                out[..., i, j] = images[..., ii, jj]
    return out


def test_psi_zero_and_90_exact_without_gridding_correction(classes, pixel_set):
    classes = classes.clone()
    classes[:, [0, -1], :] = (
        0  # compact support: the 90° rotation is a pixel permutation
    )
    classes[:, :, [0, -1]] = 0
    proj = ClassProjector(classes, gridding_correction=False)
    refs = proj.rotated_references(torch.tensor([0.0, 90.0]), pixel_set)  # (k, 2, p)
    inside = pixel_set.ires < N // 2  # r ≤ r_max everywhere there
    expected0 = gathered_dft(classes, pixel_set)
    torch.testing.assert_close(
        refs[:, 0, inside], expected0[:, inside], atol=1e-12, rtol=0
    )
    expected90 = gathered_dft(rotate_90(classes), pixel_set)
    torch.testing.assert_close(
        refs[:, 1, inside], expected90[:, inside], atol=1e-12, rtol=0
    )


def test_psi_zero_with_gridding_correction(classes, pixel_set):
    proj = ClassProjector(classes)
    ref = proj.rotated_references(torch.tensor([0.0]), pixel_set)[:, 0]
    inside = pixel_set.ires < N // 2
    corrected = classes / gridding_correction_map(N, 2)
    torch.testing.assert_close(
        ref[:, inside],
        gathered_dft(corrected, pixel_set)[:, inside],
        atol=1e-12,
        rtol=0,
    )
    # for a smooth, centred image the correction is a small effect
    plain = gathered_dft(classes, pixel_set)
    rel = (ref - plain).abs().norm() / plain.abs().norm()
    assert float(rel) < 0.05


@pytest.mark.parametrize("psi", [33.0, -117.0])
def test_general_angle_matches_rotated_image(classes, pixel_set, psi):
    expected = gathered_dft(
        torch.stack([blob_image(i, N, psi) for i in range(3)]), pixel_set
    )
    inside = pixel_set.ires < N // 2 - 2
    errs = []
    for corr in (False, True):
        ref = ClassProjector(classes, gridding_correction=corr).rotated_references(
            torch.tensor([psi]), pixel_set
        )[:, 0]
        errs.append(
            float((ref - expected)[:, inside].norm() / expected[:, inside].norm())
        )
    assert errs[1] < 0.02
    assert errs[1] < errs[0]  # the sinc² pre-correction helps


def test_sample_matches_rotated_references(classes, pixel_set):
    proj = ClassProjector(classes)
    psi = torch.tensor([10.0, 200.0, -45.0])
    refs = proj.rotated_references(psi, pixel_set, max_chunk_bytes=1)  # chunked
    cls = torch.tensor([2, 0, 1, 1])
    idx = torch.tensor([0, 1, 2, 0])
    pairs = proj.sample(cls, psi[idx], pixel_set, start=3, stop=50)
    torch.testing.assert_close(pairs, refs[cls, idx, 3:50])


def test_r_max_zeroes_references(classes, pixel_set):
    proj = ClassProjector(classes, r_max=6)
    refs = proj.rotated_references(torch.tensor([0.0, 17.0]), pixel_set)
    radius = torch.sqrt((pixel_set.ky**2 + pixel_set.kx**2).double())
    assert float(refs[..., radius > 6.0].abs().max()) == 0.0
    assert float(refs[..., radius < 5.0].abs().min()) > 0.0


def test_hermitian_consistency(classes, pixel_set):
    """Rotating by 180° maps q to −q: the reference is the conjugate of ψ = 0."""
    proj = ClassProjector(classes)
    refs = proj.rotated_references(torch.tensor([0.0, 180.0]), pixel_set)
    ok = pixel_set.ires < N // 2
    torch.testing.assert_close(
        refs[:, 1, ok], refs[:, 0, ok].conj(), atol=1e-12, rtol=0
    )


def test_backproject_is_adjoint(classes, pixel_set):
    gen = torch.Generator().manual_seed(0)
    proj = ClassProjector(classes)
    k = proj.n_classes
    big = proj.padded_size
    psi = torch.tensor([0.0, 7.5, 90.0, 133.3, -61.0])
    x = torch.complex(
        torch.randn(k, big, big // 2 + 1, generator=gen, dtype=torch.float64),
        torch.randn(k, big, big // 2 + 1, generator=gen, dtype=torch.float64),
    )
    proj.data = x  # use an arbitrary (non-Hermitian) grid
    y = torch.complex(
        torch.randn(k, 5, pixel_set.n_pixels, generator=gen, dtype=torch.float64),
        torch.randn(k, 5, pixel_set.n_pixels, generator=gen, dtype=torch.float64),
    )
    ax = proj.rotated_references(psi, pixel_set)
    aty = torch.zeros_like(x)
    proj.backproject(y, psi, pixel_set, aty, max_chunk_bytes=1)
    lhs = (ax.conj() * y).real.sum()
    rhs = (x.conj() * aty).real.sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)

    # pairwise version, several targets
    cls = torch.tensor([0, 2, 2, 1])
    ang = torch.tensor([3.0, 91.0, -170.0, 45.0])
    target = torch.tensor([5, 0, 2, 5])
    yp = y[0, :4]
    bx = proj.sample(cls, ang, pixel_set)
    out = torch.zeros(6, big, big // 2 + 1, dtype=torch.complex128)
    proj.backproject_pairs(yp, cls, ang, pixel_set, out, target_index=target)
    lhs = (bx.conj() * yp).real.sum()
    rhs = sum(
        (
            x[cls[i]].conj()
            * _single(proj, yp[i : i + 1], cls[i : i + 1], ang[i : i + 1], pixel_set)
        ).real.sum()
        for i in range(4)
    )
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)
    # and the batched call equals the sum of single calls
    total = torch.zeros_like(out)
    for i in range(4):
        total[target[i]] += _single(
            proj, yp[i : i + 1], cls[i : i + 1], ang[i : i + 1], pixel_set
        )
    torch.testing.assert_close(out, total)


def _single(proj, values, cls, ang, ps):
    big = proj.padded_size
    out = torch.zeros(1, big, big // 2 + 1, dtype=torch.complex128)
    proj.backproject_pairs(
        values, cls, ang, ps, out, target_index=torch.zeros_like(cls)
    )
    return out[0]


def test_backproject_weights_are_bilinear(pixel_set):
    proj = ClassProjector(torch.zeros(2, N, N, dtype=torch.float64))
    big = proj.padded_size
    psi = torch.tensor([0.0, 23.0])
    w = torch.ones(2, 2, pixel_set.n_pixels, dtype=torch.float64)
    out_w = torch.zeros(2, big, big // 2 + 1, dtype=torch.float64)
    proj.backproject(None, psi, pixel_set, None, weights=w, out_weight=out_w)
    # every inserted unit weight is split over the corners, inside r_max
    inside = (torch.sqrt((pixel_set.ky**2 + pixel_set.kx**2).double()) <= N / 2).sum()
    assert float(out_w[0].sum()) == pytest.approx(2.0 * float(inside))
    # ψ = 0 lands exactly on the even grid points
    out0 = torch.zeros_like(out_w)
    proj.backproject(None, psi[:1], pixel_set, None, weights=w[:, :1], out_weight=out0)
    assert float(out0[0, 0, 2]) == pytest.approx(1.0)  # (ky, kx) = (0, 1) → (0, 2)
    assert float(out0[0, 0, 1]) == 0.0  # odd padded points receive nothing
    assert float(out0[0].sum()) == pytest.approx(float(inside))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backproject_rows_equals_pairs(pixel_set, dtype):
    """The sparse-product insertion of rows on an angle table equals the per-row one."""
    gen = torch.Generator().manual_seed(3)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    proj = ClassProjector(torch.randn(3, N, N, generator=gen, dtype=dtype))
    big = proj.padded_size
    psi = torch.arange(0.0, 360.0, 15.0, dtype=dtype)  # (24,), both half planes
    n_targets, r, p = 7, psi.shape[0], pixel_set.n_pixels
    # 40 distinct (target, angle) rows; target 4 has none
    keys = torch.randperm(n_targets * r, generator=gen)
    keys = keys[(keys // r) != 4][:40].sort().values
    target, angle = keys // r, keys % r
    values = torch.randn(40, p, generator=gen, dtype=cdtype)
    weights = torch.rand(40, p, generator=gen, dtype=dtype)
    expected_d = torch.zeros(n_targets, big, big // 2 + 1, dtype=cdtype)
    expected_w = torch.zeros(n_targets, big, big // 2 + 1, dtype=dtype)
    proj.backproject_pairs(
        values,
        target,
        psi,
        pixel_set,
        expected_d,
        weights=weights,
        out_weight=expected_w,
        target_index=target,
        angle_index=angle,
    )
    out_d = torch.ones_like(expected_d)  # adds to what is there
    out_w = torch.ones_like(expected_w)
    proj.backproject_rows(values, weights, target, angle, psi, pixel_set, out_d, out_w)
    torch.testing.assert_close(out_d - 1, expected_d)
    torch.testing.assert_close(out_w - 1, expected_w)
    assert float(expected_d[4].abs().sum()) == 0.0
    # the sparse matrix is memoised per angle table and dtype
    m1 = proj.splat_matrix(psi, pixel_set, dtype)[0]
    assert proj.splat_matrix(psi, pixel_set, dtype)[0] is m1


def test_half_turn_is_the_complex_conjugate(classes, pixel_set):
    """A real image turned by 180°: its transform is the conjugate (the E-step uses it)."""
    proj = ClassProjector(classes)
    psi = torch.tensor([7.5, 40.0, 133.0])
    refs = proj.rotated_references(psi, pixel_set)
    turned = proj.rotated_references(psi + 180.0, pixel_set)
    torch.testing.assert_close(turned, refs.conj(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sparse", [True, False])
def test_interpolate_rows_sums_weighted_rows(sparse):
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 50, (30, 4), generator=gen)
    index[0] = 7  # a repeated row (a zero-weight corner clamped onto its neighbour)
    weight = torch.rand(30, 4, generator=gen, dtype=torch.float64)
    weight[0, 1:] = 0.0
    expected = torch.einsum("nc,ncw->nw", weight, table[index])
    got = interpolate_rows(table, index, weight, sparse=sparse)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert interpolate_rows(table, index[:0], weight[:0], sparse=sparse).shape == (0, 6)
