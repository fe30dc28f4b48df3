import math

import pytest
import torch

from cryoavg.class2d.estep import (
    EStepBatch,
    accumulate_statistics,
    expectation_step,
    phase_shifts,
    squared_differences,
    statistics_update,
)
from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import PixelSet, PsiGrid, TranslationGrid
from cryoavg.class2d.statistics import Class2DStatistics
from cryoavg.ops.fourier import dft_2d
from tests.class2d.conftest import blob_image, make_batch, simple_ctf

N = 32
K = 3


@pytest.fixture(scope="module")
def grids():
    return PsiGrid.build(6.0), TranslationGrid.build(3.0, 1.0), PixelSet.for_size(N, N)


def run_estep(syn_batch, classes, grids, **kw):
    psi, trans, ps = grids
    opts = {
        "class_prior": torch.full((classes.shape[0],), 1.0 / classes.shape[0]),
        "class_offset_prior_angstrom": torch.zeros(classes.shape[0], 2),
        "sigma2_offset_angstrom2": 100.0,
        "pixel_size": 1.0,
        "coarse_size": 16,
    }
    opts.update(kw)
    proj = ClassProjector(classes)
    return proj, expectation_step(syn_batch, proj, psi, trans, ps, **opts)


def angle_error(a, b):
    d = torch.remainder(a - b + 180.0, 360.0) - 180.0
    return d.abs()


def segment_sum(values, rows, n):
    return torch.zeros(n, dtype=values.dtype).index_add_(0, rows, values)


# ------------------------------------------------------------------------------------


def test_phase_shift_convention():
    """φ_t shifts the image by +t (content moves to larger indices)."""
    ps = PixelSet.for_size(N, N)
    img = blob_image(0, N)
    moved = torch.roll(img, shifts=(2, -3), dims=(0, 1))  # +t = (2, −3)
    phase = phase_shifts(torch.tensor([[2.0, -3.0]]), ps, dtype=torch.complex128)[0]
    a = dft_2d(img).reshape(-1)[ps.indices] * phase
    b = dft_2d(moved).reshape(-1)[ps.indices]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gemm_diff2_matches_naive_loop(dtype):
    gen = torch.Generator().manual_seed(0)
    b, k, r, t, p = 3, 2, 4, 5, 40
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64

    def crandn(*shape):
        return torch.complex(
            torch.randn(shape, generator=gen, dtype=torch.float64),
            torch.randn(shape, generator=gen, dtype=torch.float64),
        )

    x = crandn(b, p)
    refs = crandn(k, r, p)
    phases = torch.polar(
        torch.ones(t, p, dtype=torch.float64),
        torch.rand(t, p, generator=gen, dtype=torch.float64) * 6,
    )
    ctf = torch.rand(b, p, generator=gen, dtype=torch.float64) * 2 - 1
    sigma2 = torch.rand(b, p, generator=gen, dtype=torch.float64) + 0.5
    scale = torch.rand(b, generator=gen, dtype=torch.float64) + 0.5
    naive = torch.empty(b, k, r, t, dtype=torch.float64)
    for ib in range(b):
        for ik in range(k):
            for ir in range(r):
                for it in range(t):
                    resid = scale[ib] * ctf[ib] * refs[ik, ir] - x[ib] * phases[it]
                    naive[ib, ik, ir, it] = (resid.abs() ** 2 / (2 * sigma2[ib])).sum()
    fast = squared_differences(
        x.to(cdtype),
        ctf.to(dtype),
        scale.to(dtype),
        sigma2.to(dtype),
        refs.to(cdtype),
        phases.to(cdtype),
        max_chunk_bytes=1,  # one particle per chunk
    )
    assert fast.shape == (b, k, r, t)
    assert fast.dtype == dtype
    rel = ((fast.double() - naive).abs() / naive.abs()).max()
    assert float(rel) < (1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("ctf_strength", [0.0, 40.0])
def test_recovery_mild_noise(synthetic, grids, ctf_strength):
    psi, trans, ps = grids
    syn = synthetic(
        psi, trans, ps, n_particles=60, snr=0.5, ctf_strength=ctf_strength, seed=1
    )
    _, res = run_estep(syn.batch, syn.classes, grids)
    ok_class = res.best_class == syn.true_class
    ok_psi = (
        angle_error(res.best_psi_degrees, psi.fine_degrees[syn.true_psi_index])
        <= psi.fine_step_degrees + 1e-6
    )
    ok_t = (res.best_offset_px - trans.fine_px[syn.true_trans_index]).abs().max(
        1
    ).values <= trans.fine_step_px + 1e-6
    ok = ok_class & ok_psi & ok_t
    assert float(ok.double().mean()) >= 0.95
    exact = ok_class & (
        angle_error(res.best_psi_degrees, psi.fine_degrees[syn.true_psi_index]) < 1e-6
    )
    assert float(exact.double().mean()) >= 0.85
    assert float(res.pmax.median()) > 0.5
    assert bool(torch.isfinite(res.log_likelihood).all())


def test_recovery_with_perturbed_grids(synthetic):
    """Perturbed grids: particles made on the perturbed fine grid are recovered."""
    psi = PsiGrid.build(6.0, perturbation=-0.3)
    trans = TranslationGrid.build(3.0, 1.0, perturbation=0.2)
    ps = PixelSet.for_size(N, N)
    syn = synthetic(psi, trans, ps, n_particles=30, snr=0.5, seed=11)
    _, res = run_estep(syn.batch, syn.classes, (psi, trans, ps))
    psi_err = angle_error(res.best_psi_degrees, psi.fine_degrees[syn.true_psi_index])
    t_err = (
        (res.best_offset_px - trans.fine_px[syn.true_trans_index]).abs().max(1).values
    )
    assert bool((res.best_class == syn.true_class).all())
    assert float((psi_err <= psi.fine_step_degrees + 1e-6).double().mean()) >= 0.95
    assert float((t_err <= trans.fine_step_px + 1e-6).double().mean()) >= 0.95
    # exact fine pose for most; the rest are one fine ψ step off, because at high SNR
    # the coarse pass can trade a 0.7 px coarse-translation misfit for a rotation and
    # keep a single significant coarse sample (a property of the adaptive scheme)
    exact = (psi_err < 1e-4) & (t_err < 1e-6)
    assert float(exact.double().mean()) >= 0.75


def test_strong_noise_spreads_weights(synthetic, grids):
    psi, trans, ps = grids
    mild = synthetic(psi, trans, ps, n_particles=30, snr=0.5, seed=2)
    strong = synthetic(psi, trans, ps, n_particles=30, snr=0.002, seed=2)
    _, res_mild = run_estep(mild.batch, mild.classes, grids)
    _, res_strong = run_estep(strong.batch, strong.classes, grids)
    assert float(res_strong.n_significant.double().mean()) > 5 * float(
        res_mild.n_significant.double().mean()
    )
    assert float(res_strong.pmax.mean()) < float(res_mild.pmax.mean())
    assert res_strong.samples.n_entries > res_mild.samples.n_entries
    assert int(res_strong.n_significant.max()) <= 5 * K  # default cap 5·K


def test_significance_cap_and_weights(synthetic, grids):
    psi, trans, ps = grids
    syn = synthetic(psi, trans, ps, n_particles=12, snr=0.002, seed=3)
    _, res = run_estep(syn.batch, syn.classes, grids, max_significant=3)
    assert int(res.n_significant.max()) <= 3
    assert int(res.n_significant.max()) == 3
    assert int(res.n_significant.min()) >= 1
    sm = res.samples
    # at most 8 fine samples per significant coarse sample
    per = torch.bincount(sm.particle_row, minlength=12)
    assert bool((per >= 1).all())
    assert bool((per <= 8 * res.n_significant).all())
    sums = segment_sum(sm.weight, sm.particle_row, 12)
    assert bool((sums <= 1 + 1e-9).all())
    torch.testing.assert_close(sums, res.weight_sum.to(sums.dtype))
    maxima = torch.zeros(12, dtype=sm.weight.dtype).scatter_reduce(
        0, sm.particle_row, sm.weight, "amax"
    )
    torch.testing.assert_close(maxima, res.pmax)
    # best pose is the max-weight sample
    first = torch.nonzero(sm.weight == maxima[sm.particle_row]).squeeze(-1)
    rows = sm.particle_row[first]
    torch.testing.assert_close(sm.class_index[first], res.best_class[rows])
    torch.testing.assert_close(
        psi.fine_degrees[sm.psi_fine_index[first]], res.best_psi_degrees[rows]
    )
    # no cap: more coarse samples become significant
    _, res_free = run_estep(syn.batch, syn.classes, grids, max_significant=None)
    assert int(res_free.n_significant.max()) > 3


def test_log_likelihood_stable_for_huge_diff2(synthetic, grids):
    psi, trans, ps = grids
    syn = synthetic(psi, trans, ps, n_particles=6, sigma2=1e-30, seed=4)
    syn.batch.images_masked_rfft *= 1e10
    _, res = run_estep(syn.batch, syn.classes, grids)
    assert bool(torch.isfinite(res.log_likelihood).all())
    assert bool(torch.isfinite(res.min_diff2).all())
    assert float(res.min_diff2.min()) > 1e20
    torch.testing.assert_close(res.pmax, torch.ones(6, dtype=res.pmax.dtype))
    assert bool((torch.bincount(res.samples.particle_row, minlength=6) == 1).all())


def test_zero_prior_class_is_skipped(synthetic, grids):
    psi, trans, ps = grids
    syn = synthetic(psi, trans, ps, n_particles=12, snr=0.5, seed=5)
    prior = torch.tensor([0.5, 0.0, 0.5])
    _, res = run_estep(syn.batch, syn.classes, grids, class_prior=prior)
    assert not bool((res.samples.class_index == 1).any())
    assert bool(torch.isfinite(res.log_likelihood).all())


def _noise_batch(ps, seed: int, b: int = 8) -> EStepBatch:
    """``b`` particles of pure complex white noise (σ² = 1): uninformative data."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.complex(
        torch.randn(b, ps.n_pixels, generator=gen, dtype=torch.float64),
        torch.randn(b, ps.n_pixels, generator=gen, dtype=torch.float64),
    )
    return make_batch(noise, ps, sigma2=1.0)


def test_offset_prior_uses_angstrom(grids):
    """Uninformative data (zero classes): the offset prior picks the translation."""
    _, _, ps = grids
    batch = _noise_batch(ps, seed=6)
    mu = torch.tensor([[4.0, 0.0]]).expand(K, 2)  # Å → (2, 0) px at 2 Å/px
    _, res = run_estep(
        batch,
        torch.zeros(K, N, N, dtype=torch.float64),
        grids,
        class_offset_prior_angstrom=mu,
        sigma2_offset_angstrom2=1.0,
        pixel_size=2.0,
    )
    parent = res.best_offset_px - torch.tensor([2.0, 0.0], dtype=torch.float64)
    assert float(parent.abs().max()) <= 0.5 + 1e-9


def test_far_class_offset_prior_costs_class_weight(grids):
    """Identical classes, class 1's prior offset 3σ away: class 0 gets the particles.

    The offset prior is normalised per particle, not per class (§A.6.4), so a class
    whose prior offset lies far from the particle pays for it in the class posterior.
    """
    _, _, ps = grids
    batch = _noise_batch(ps, seed=9)
    mu = torch.zeros(K, 2, dtype=torch.float64)
    mu[1] = torch.tensor([30.0, 0.0])  # Å; σ_off = 10 Å
    _, res = run_estep(
        batch,
        torch.zeros(K, N, N, dtype=torch.float64),
        grids,
        class_offset_prior_angstrom=mu,
        sigma2_offset_angstrom2=100.0,
        pixel_size=2.0,
    )
    assert not bool((res.best_class == 1).any())


def test_float32_batch(synthetic, grids):
    psi, trans, ps = grids
    syn = synthetic(psi, trans, ps, n_particles=15, snr=0.5, seed=7)
    b = syn.batch
    b32 = EStepBatch(
        b.images_masked_rfft.to(torch.complex64),
        b.images_unmasked_rfft.to(torch.complex64),
        b.ctf.float(),
        b.scale.float(),
        b.sigma2.float(),
        b.offset_px.float(),
        b.index,
        b.optics_group,
        b.group,
        b.masked_power_beyond.float(),
        b.masked_shell_power_beyond.float(),
    )
    _, r64 = run_estep(b, syn.classes, grids)
    _, r32 = run_estep(b32, syn.classes.float(), grids)
    assert r32.pmax.dtype == torch.float32
    assert float((r32.best_class == r64.best_class).double().mean()) >= 0.9
    torch.testing.assert_close(
        r32.log_likelihood, r64.log_likelihood, rtol=1e-3, atol=0.5
    )


# ------------------------------------------------------------------------------------
# statistics


def test_statistics_zeros_add_reduce():
    st = Class2DStatistics.zeros(4, 16, n_optics_groups=2, n_groups=3)
    assert st.data.shape == (2, 4, 32, 17)
    assert st.data.dtype == torch.complex64
    assert st.weight.shape == (2, 4, 32, 17)
    assert st.noise_power.shape == (2, 9)
    assert st.scale_xa.shape == (3,)
    assert st.offset_sum_angstrom.shape == (4, 2)
    other = st.clone()
    other.class_weight += 1
    other.data += 1j
    total = st + other
    st.add_(other).add_(other)
    torch.testing.assert_close(
        st.class_weight, torch.full((4,), 2.0, dtype=torch.float64)
    )
    torch.testing.assert_close(total.class_weight, torch.ones(4, dtype=torch.float64))
    assert st.all_reduce() is st  # no process group: no-op
    d = st.as_dict()
    assert set(d) >= {"data", "weight", "noise_power", "log_likelihood", "n_particles"}
    again = Class2DStatistics.from_dict(d)
    torch.testing.assert_close(again.data, st.data)
    st.zero_()
    assert float(st.class_weight.sum()) == 0.0


@pytest.mark.parametrize("mode", ["vdam", "em"])
def test_accumulate_single_particle_by_hand(grids, mode):
    psi, trans, ps = grids
    classes = torch.stack([blob_image(i, N) for i in range(K)])
    proj = ClassProjector(classes)
    k_true, r_true, t_true = 1, 17, 9
    s = 1.3
    ctf = simple_ctf(ps, 30.0)
    sigma2 = 1e-8 * (1.0 + ps.ires.double() / 4)  # (p,) varies per shell
    ref = proj.sample(
        torch.tensor([k_true]), psi.fine_degrees[r_true : r_true + 1], ps
    )[0]
    phase = phase_shifts(
        trans.fine_px[t_true : t_true + 1], ps, dtype=torch.complex128
    )[0]
    gen = torch.Generator().manual_seed(8)
    noise = (
        torch.complex(
            torch.randn(ps.n_pixels, generator=gen, dtype=torch.float64),
            torch.randn(ps.n_pixels, generator=gen, dtype=torch.float64),
        )
        * 1e-4
    )
    x = (s * ctf * ref + noise) * phase.conj()  # shifted by +t it matches s·CTF·P
    batch = make_batch(
        x[None],
        ps,
        sigma2=1.0,
        ctf=ctf[None],
        scale=torch.tensor([s], dtype=torch.float64),
    )
    batch.sigma2 = sigma2[None].clone()
    batch.images_unmasked_rfft = (
        x[None] * 0.5 + 0.01
    )  # different, to check which is used where
    batch.index = torch.tensor([7])  # half 1
    batch.offset_px = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    f = N // 2 + 1
    batch.masked_shell_power_beyond = torch.arange(f, dtype=torch.float64)[None] * 1e-3
    batch.masked_power_beyond = batch.masked_shell_power_beyond.sum(1)
    mu = torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    res = expectation_step(
        batch,
        proj,
        psi,
        trans,
        ps,
        class_prior=torch.full((K,), 1 / K),
        class_offset_prior_angstrom=mu,
        sigma2_offset_angstrom2=400.0,
        pixel_size=1.5,
        coarse_size=16,
    )
    sm = res.samples
    assert sm.n_entries == 1
    assert int(sm.class_index[0]) == k_true
    assert int(sm.psi_fine_index[0]) == r_true
    assert int(sm.trans_fine_index[0]) == t_true
    w = float(sm.weight[0])
    assert w == pytest.approx(float(res.pmax[0]))
    assert w > 0.99

    ssnr = torch.full((K, f), 10.0, dtype=torch.float64)
    ssnr[k_true, 5:] = 1.0  # shells ≥ 5 excluded from the scale sums
    st = Class2DStatistics.zeros(K, N, dtype=torch.float64)
    update = statistics_update(
        batch,
        res,
        proj,
        psi,
        trans,
        ps,
        st,
        mode=mode,
        class_offset_prior_angstrom=mu,
        pixel_size=1.5,
        ssnr=ssnr,
    )
    update.apply_to(st, proj)

    # by hand
    model = s * ctf * ref
    xm = x * phase
    resid2 = (model - xm).abs() ** 2
    noise_shell = torch.zeros(f, dtype=torch.float64).index_add_(0, ps.ires, w * resid2)
    noise_shell += batch.masked_shell_power_beyond[0]
    torch.testing.assert_close(st.noise_power[0], noise_shell)
    assert float(st.noise_weight[0]) == pytest.approx(w)
    good = ps.ires < 5
    xa = w * ((model.conj() * xm).real * good).sum() / s
    aa = w * ((model.abs() ** 2) * good).sum() / s**2
    assert float(st.scale_xa[0]) == pytest.approx(float(xa), rel=1e-10)
    assert float(st.scale_aa[0]) == pytest.approx(float(aa), rel=1e-10)
    o_abs = 1.5 * (batch.offset_px[0] + trans.fine_px[t_true])
    expected_cw = torch.zeros(K, dtype=torch.float64)
    expected_cw[k_true] = w
    torch.testing.assert_close(st.class_weight, expected_cw)
    torch.testing.assert_close(st.offset_sum_angstrom[k_true], w * o_abs)
    assert float(st.sigma2_offset_sum) == pytest.approx(
        w * float(((mu[k_true] - o_abs) ** 2).sum())
    )
    torch.testing.assert_close(
        res.best_offset_px[0], batch.offset_px[0] + trans.fine_px[t_true]
    )
    assert float(st.log_likelihood) == pytest.approx(float(res.log_likelihood[0]))
    assert float(st.pmax_sum) == pytest.approx(w)
    assert float(st.n_particles) == 1.0
    # norm correction: sqrt(2·(Σ w·|resid|² + power beyond))
    assert float(update.norm_correction[0]) == pytest.approx(
        math.sqrt(2 * (w * float(resid2.sum()) + float(batch.masked_power_beyond[0]))),
        rel=1e-9,
    )
    assert float(st.norm_sum) == pytest.approx(float(update.norm_correction[0]))
    # reconstruction: into half 1 only, at ψ_fine, with the projector adjoint
    xu = batch.images_unmasked_rfft[0] * phase
    if mode == "vdam":
        xu = xu - model
    values = (w * s * ctf / sigma2 * xu)[None, None]  # (k=1, r=1, p)
    weights = (w * (s * ctf) ** 2 / sigma2)[None, None]
    big = proj.padded_size
    exp_data = torch.zeros(K, big, big // 2 + 1, dtype=torch.complex128)
    exp_weight = torch.zeros(K, big, big // 2 + 1, dtype=torch.float64)
    one = ClassProjector(classes[k_true : k_true + 1])
    one.backproject(
        values,
        psi.fine_degrees[r_true : r_true + 1],
        ps,
        exp_data[k_true : k_true + 1],
        weights=weights,
        out_weight=exp_weight[k_true : k_true + 1],
    )
    torch.testing.assert_close(st.data[1], exp_data)
    torch.testing.assert_close(st.weight[1], exp_weight)
    assert float(st.data[0].abs().sum()) == 0.0
    assert float(st.weight[0].sum()) == 0.0


def test_accumulate_many_particles_consistent(synthetic, grids):
    psi, trans, ps = grids
    syn = synthetic(psi, trans, ps, n_particles=20, snr=0.05, seed=9)
    proj, res = run_estep(syn.batch, syn.classes, grids)
    st = Class2DStatistics.zeros(K, N, dtype=torch.float64)
    accumulate_statistics(
        syn.batch,
        res,
        proj,
        psi,
        trans,
        ps,
        st,
        mode="em",
        class_offset_prior_angstrom=torch.zeros(K, 2),
        pixel_size=1.0,
        max_chunk_bytes=2_000_000,
        dense_threshold=None,
    )
    assert float(st.class_weight.sum()) == pytest.approx(float(res.weight_sum.sum()))
    assert float(st.weight_sum) == pytest.approx(float(res.weight_sum.sum()))
    assert float(st.n_particles) == 20.0
    # even/odd particles go to different halves; both receive data
    assert float(st.weight[0].sum()) > 0
    assert float(st.weight[1].sum()) > 0
    # chunking does not change the result
    st2 = Class2DStatistics.zeros(K, N, dtype=torch.float64)
    accumulate_statistics(
        syn.batch,
        res,
        proj,
        psi,
        trans,
        ps,
        st2,
        mode="em",
        class_offset_prior_angstrom=torch.zeros(K, 2),
        pixel_size=1.0,
    )
    for name, value in st.as_dict().items():
        torch.testing.assert_close(value, st2.as_dict()[name], msg=name)
    # the dense-GEMM form of the per-pixel sums gives the same statistics
    st3 = Class2DStatistics.zeros(K, N, dtype=torch.float64)
    accumulate_statistics(
        syn.batch,
        res,
        proj,
        psi,
        trans,
        ps,
        st3,
        mode="vdam",
        class_offset_prior_angstrom=torch.zeros(K, 2),
        pixel_size=1.0,
        max_chunk_bytes=300_000,
        dense_threshold=0.0,
    )
    st4 = Class2DStatistics.zeros(K, N, dtype=torch.float64)
    accumulate_statistics(
        syn.batch,
        res,
        proj,
        psi,
        trans,
        ps,
        st4,
        mode="vdam",
        class_offset_prior_angstrom=torch.zeros(K, 2),
        pixel_size=1.0,
        dense_threshold=None,
    )
    for name, value in st4.as_dict().items():
        torch.testing.assert_close(st3.as_dict()[name], value, msg=name)


# ------------------------------------------------------------------------------------
# the optimised E-step and statistics against a dense brute-force reference


def _naive_estep_and_statistics(
    batch, proj, psi, trans, ps, *, opts, ssnr, mode, avg_norm
):
    """Dense float64 reference of §A.6.4–§A.6.6: every diff2 by direct summation."""
    x, xu = batch.images_masked_rfft, batch.images_unmasked_rfft
    b, p = x.shape
    k = proj.n_classes
    sigma2 = batch.sigma2
    s_ctf = batch.scale[:, None] * batch.ctf
    n_coarse = ps.count_within(opts["coarse_size"])
    refs_c = proj.rotated_references(psi.coarse_degrees, ps)  # (k, r_c, p)
    refs_f = proj.rotated_references(psi.fine_degrees, ps)  # (k, r_f, p)
    ph_c = phase_shifts(trans.coarse_px, ps, dtype=torch.complex128)
    ph_f = phase_shifts(trans.fine_px, ps, dtype=torch.complex128)

    def diff2(i, refs, ph, hi):  # (t, k, r) of particle i on pixels [1:hi]
        model = s_ctf[i, None, None, None, 1:hi] * refs[None, :, :, 1:hi]
        data = (x[i, 1:hi] * ph[:, 1:hi])[:, None, None]
        return ((model - data).abs() ** 2 / (2 * sigma2[i, 1:hi])).sum(-1)

    pi = opts["class_prior"].double()
    log_pi = torch.log(pi / pi.mean())
    o_abs = opts["pixel_size"] * (batch.offset_px[:, None] + trans.coarse_px[None])
    d_mu = o_abs[:, :, None, :] - opts["class_offset_prior_angstrom"][None, None]
    log_off = -(d_mu**2).sum(-1) / (2 * opts["sigma2_offset_angstrom2"])
    # one constant per particle (mean over translations and classes), §A.6.4
    log_off = log_off - torch.logsumexp(log_off.flatten(1), 1)[:, None, None]
    log_off = log_off + math.log(trans.n_coarse * k)
    log_prior = log_off + log_pi  # (b, t_c, k)
    af, m = 0.999, 5 * k
    r_c, r_f = psi.n_coarse, psi.n_fine
    out = {
        key: []
        for key in ("row", "cls", "psi", "trans", "w", "pmax", "best", "min", "ll")
    }
    out["norm"] = []
    shells = ps.box_size // 2 + 1
    noise = torch.zeros(2, shells, dtype=torch.float64)
    xa = torch.zeros(2, dtype=torch.float64)
    aa = torch.zeros(2, dtype=torch.float64)
    data = torch.zeros(2, k, r_f, p, dtype=torch.complex128)
    weight = torch.zeros(2, k, r_f, p, dtype=torch.float64)
    good = (ssnr[:, ps.ires] > 3.0).double()  # (k, p)
    for i in range(b):
        d = diff2(i, refs_c, ph_c, n_coarse)  # (t_c, k, r_c)
        lw = log_prior[i][:, :, None] - (d - d.min())
        lw = lw.masked_fill(d - d.min() > 700, -math.inf).reshape(-1)
        top, order = torch.sort(lw, descending=True, stable=True)
        wc = torch.exp(top - top[0])
        total = wc.sum()
        count = int(1 + (torch.cumsum(wc, 0) <= af * total)[:m].sum())
        count = max(1, min(count, int((wc > 0).sum()), m))
        df = diff2(i, refs_f, ph_f, p)  # (t_f, k, r_f)
        cand = []
        for flat in order[:count].tolist():
            tc, kc, rc = flat // (k * r_c), (flat // r_c) % k, flat % r_c
            for mm in range(2):
                for j in range(4):
                    tf, rf = 4 * tc + j, 2 * rc + mm
                    cand.append(
                        (kc, rf, tf, float(log_prior[i, tc, kc]), float(df[tf, kc, rf]))
                    )
        dmin = min(c[4] for c in cand)
        lw = torch.tensor(
            [c[3] - (c[4] - dmin) if c[4] - dmin <= 700 else -math.inf for c in cand],
            dtype=torch.float64,
        )
        log_s = torch.logsumexp(lw, 0)
        w = torch.exp(lw - log_s)
        ws, order = torch.sort(w, descending=True, stable=True)
        count = int(1 + (torch.cumsum(ws, 0) <= af * ws.sum()).sum())
        count = max(1, min(count, int((ws > 0).sum())))
        out["pmax"].append(float(ws[0]))
        out["best"].append(cand[int(order[0])][:3])
        out["min"].append(dmin)
        beyond = float(batch.masked_power_beyond[i])
        out["ll"].append(
            float(log_s)
            - (dmin + 0.5 * beyond)
            - float(torch.log(2 * math.pi * sigma2[i, 1:]).sum())
        )
        h, og, grp = (
            int(batch.index[i]) % 2,
            int(batch.optics_group[i]),
            int(batch.group[i]),
        )
        energy = beyond
        noise[og] += batch.masked_shell_power_beyond[i]
        for q in order[:count].tolist():
            kc, rf, tf = cand[q][:3]
            wq = float(w[q])
            out["row"].append(i)
            out["cls"].append(kc)
            out["psi"].append(rf)
            out["trans"].append(tf)
            out["w"].append(wq)
            model = s_ctf[i] * refs_f[kc, rf]
            xm = x[i] * ph_f[tf]
            resid2 = (model - xm).abs() ** 2
            energy += wq * float(resid2.sum())
            noise[og].index_add_(0, ps.ires, wq * resid2)
            xa[grp] += (
                wq * float(((model.conj() * xm).real * good[kc]).sum()) / batch.scale[i]
            )
            aa[grp] += (
                wq * float((model.abs() ** 2 * good[kc]).sum()) / batch.scale[i] ** 2
            )
            xs = xu[i] * ph_f[tf] - (model if mode == "vdam" else 0)
            data[h, kc, rf] += wq * s_ctf[i] / sigma2[i] * xs
            weight[h, kc, rf] += wq * s_ctf[i] ** 2 / sigma2[i]
        out["norm"].append(
            math.sqrt(2 * energy) * float(batch.norm_correction[i]) / avg_norm
        )
    big = proj.padded_size
    data_grid = torch.zeros(2, k, big, big // 2 + 1, dtype=torch.complex128)
    weight_grid = torch.zeros(2, k, big, big // 2 + 1, dtype=torch.float64)
    for h in range(2):
        proj.backproject(
            data[h],
            psi.fine_degrees,
            ps,
            data_grid[h],
            weights=weight[h],
            out_weight=weight_grid[h],
        )
    stats = {
        "noise": noise,
        "xa": xa,
        "aa": aa,
        "data": data_grid,
        "weight": weight_grid,
    }
    return out, stats


@pytest.mark.parametrize("mode", ["vdam", "em"])
@pytest.mark.parametrize("dense_threshold", [None, 0.0])
@pytest.mark.parametrize("n_spectra", [1, 2])
def test_optimised_estep_matches_dense_reference(mode, dense_threshold, n_spectra):
    n = 24
    psi = PsiGrid.build(6.0, perturbation=0.3)
    trans = TranslationGrid.build(3.0, 1.0, perturbation=-0.2)
    ps = PixelSet.for_size(n, 20)
    gen = torch.Generator().manual_seed(3)
    classes = torch.stack([blob_image(i, n) for i in range(K)])
    proj = ClassProjector(classes, r_max=10)
    b = 7
    true_k = torch.arange(b) % K
    true_r = torch.randint(0, psi.n_fine, (b,), generator=gen)
    refs = proj.rotated_references(psi.fine_degrees, ps)
    ctf = torch.stack([simple_ctf(ps, 20.0 + 5 * i) for i in range(b)])
    scale = 0.8 + 0.1 * torch.arange(b, dtype=torch.float64)
    clean = scale[:, None] * ctf * refs[true_k, true_r]
    sigma2 = (4.0 + 2.0 * ps.ires.double() / 10)[None].repeat(b, 1) * float(
        (clean.abs() ** 2).mean()
    )
    noise = (
        torch.complex(
            torch.randn(b, ps.n_pixels, generator=gen, dtype=torch.float64),
            torch.randn(b, ps.n_pixels, generator=gen, dtype=torch.float64),
        )
        * sigma2.sqrt()
    )
    shift = phase_shifts(
        trans.fine_px[torch.randint(0, trans.n_fine, (b,), generator=gen)],
        ps,
        dtype=torch.complex128,
    )
    x = (clean + noise) * shift.conj()
    optics_group = torch.arange(b) % 2
    if n_spectra == 2:  # a noise spectrum per optics group
        sigma2 = sigma2 * (1.0 + 0.2 * optics_group.double())[:, None]
    batch = make_batch(x, ps, sigma2=1.0, ctf=ctf, scale=scale)
    batch.sigma2 = sigma2
    batch.images_unmasked_rfft = 0.9 * x + 0.001
    batch.offset_px = torch.randint(-2, 3, (b, 2), generator=gen).double()
    batch.index = torch.arange(b) + 3
    batch.optics_group = optics_group
    batch.group = (torch.arange(b) // 4).long()
    f = n // 2 + 1
    batch.masked_shell_power_beyond = torch.rand(
        b, f, generator=gen, dtype=torch.float64
    )
    batch.masked_shell_power_beyond[:, : 20 // 2 + 1] = 0
    batch.masked_power_beyond = batch.masked_shell_power_beyond.sum(1)
    batch.norm_correction = 1.0 + 0.1 * torch.rand(
        b, generator=gen, dtype=torch.float64
    )
    opts = {
        "class_prior": torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        "class_offset_prior_angstrom": torch.tensor(
            [[0.5, -1.0], [0.0, 0.0], [1.5, 1.0]], dtype=torch.float64
        ),
        "sigma2_offset_angstrom2": 9.0,
        "pixel_size": 1.2,
        "coarse_size": 12,
    }
    avg_norm = 1.05
    ssnr = torch.full((K, f), 10.0, dtype=torch.float64)
    ssnr[1, 6:] = 1.0
    ref, ref_stats = _naive_estep_and_statistics(
        batch, proj, psi, trans, ps, opts=opts, ssnr=ssnr, mode=mode, avg_norm=avg_norm
    )
    res = expectation_step(batch, proj, psi, trans, ps, **opts)
    sm = res.samples
    assert sm.n_entries > 3 * b  # several contributing samples per particle
    got = sorted(
        zip(
            sm.particle_row.tolist(),
            sm.class_index.tolist(),
            sm.psi_fine_index.tolist(),
            sm.trans_fine_index.tolist(),
            sm.weight.tolist(),
            strict=True,
        )
    )
    want = sorted(
        zip(ref["row"], ref["cls"], ref["psi"], ref["trans"], ref["w"], strict=True)
    )
    assert [g[:4] for g in got] == [r[:4] for r in want]
    torch.testing.assert_close(
        torch.tensor([g[4] for g in got]), torch.tensor([r[4] for r in want])
    )
    # samples are ordered by particle, then by decreasing weight
    key = sm.particle_row.double() * 2 - sm.weight
    assert bool((key[1:] >= key[:-1]).all())
    best = list(
        zip(
            res.best_class.tolist(),
            torch.searchsorted(
                psi.fine_degrees.sort().values, res.best_psi_degrees
            ).tolist(),
            strict=True,
        )
    )
    assert [bb[0] for bb in ref["best"]] == [bb[0] for bb in best]
    torch.testing.assert_close(
        res.best_psi_degrees, psi.fine_degrees[[bb[1] for bb in ref["best"]]]
    )
    torch.testing.assert_close(
        res.best_offset_px,
        batch.offset_px + trans.fine_px[[bb[2] for bb in ref["best"]]],
    )
    d64 = torch.float64
    torch.testing.assert_close(res.pmax, torch.tensor(ref["pmax"], dtype=d64))
    torch.testing.assert_close(res.min_diff2, torch.tensor(ref["min"], dtype=d64))
    torch.testing.assert_close(res.log_likelihood, torch.tensor(ref["ll"], dtype=d64))
    st = Class2DStatistics.zeros(K, n, n_optics_groups=2, n_groups=2, dtype=d64)
    update = statistics_update(
        batch,
        res,
        proj,
        psi,
        trans,
        ps,
        st,
        mode=mode,
        class_offset_prior_angstrom=opts["class_offset_prior_angstrom"],
        pixel_size=opts["pixel_size"],
        ssnr=ssnr,
        avg_norm=avg_norm,
        max_chunk_bytes=50_000,  # several chunks everywhere
        dense_threshold=dense_threshold,  # per-row sums, or dense GEMMs
    )
    update.apply_to(st, proj, max_chunk_bytes=50_000)
    # the new norm corrections come with the statistics (from the same pixel sums)
    torch.testing.assert_close(
        update.norm_correction, torch.tensor(ref["norm"], dtype=d64)
    )
    torch.testing.assert_close(
        st.norm_sum, torch.tensor(ref["norm"], dtype=d64).sum().to(st.norm_sum.dtype)
    )
    torch.testing.assert_close(st.noise_power, ref_stats["noise"])
    torch.testing.assert_close(st.scale_xa, ref_stats["xa"])
    torch.testing.assert_close(st.scale_aa, ref_stats["aa"])
    torch.testing.assert_close(st.data, ref_stats["data"])
    torch.testing.assert_close(st.weight, ref_stats["weight"])
    torch.testing.assert_close(
        st.class_weight,
        torch.zeros(K, dtype=d64).index_add_(
            0, torch.tensor(ref["cls"]), torch.tensor(ref["w"], dtype=d64)
        ),
    )


def test_size_classes_pad_by_at_most_an_eighth():
    from cryoavg.class2d.estep import _size_classes

    counts = torch.arange(1, 5000)
    padded = _size_classes(counts)
    assert torch.equal(padded[:8], counts[:8])  # small groups are not padded
    assert bool((padded >= counts).all())
    assert float((padded / counts).max()) <= 1.125
    assert len(torch.unique(padded)) < 120  # few size classes, few batched GEMMs


@pytest.mark.parametrize("tile_bytes", [1 << 21, 1 << 12])
def test_fine_cross_matches_per_sample_products(monkeypatch, tile_bytes):
    """Batched, padded fine-pass GEMMs give each sample's own 8 cross terms."""
    import cryoavg.class2d.estep as estep

    monkeypatch.setattr(estep, "FINE_TILE_BYTES", tile_bytes)
    gen = torch.Generator().manual_seed(5)
    b, p, t_c, n_pairs = 9, 40, 5, 12
    fine_q = torch.randn(n_pairs, 8, 2 * p, generator=gen)
    images = torch.complex(
        torch.randn(b, p, generator=gen), torch.randn(b, p, generator=gen)
    )
    phases = torch.exp(1j * torch.rand(t_c, p, generator=gen) * 6.28).to(
        torch.complex64
    )
    # skewed group sizes: pair 0 is used by every sample of particles 0..5, others rarely
    rows, pairs, trans = [], [], []
    for i in range(b):
        n_i = int(torch.randint(1, 30, (1,), generator=gen))
        for _ in range(n_i):
            rows.append(i)
            pairs.append(
                0
                if i < 6 and torch.rand(1, generator=gen) < 0.7
                else int(torch.randint(0, n_pairs, (1,), generator=gen))
            )
            trans.append(int(torch.randint(0, t_c, (1,), generator=gen)))
    row, pair, tc = (torch.tensor(v) for v in (rows, pairs, trans))
    offsets = [0, *torch.cumsum(torch.bincount(row, minlength=b), 0).tolist()]
    shifted = images[row] * phases[tc]  # (e, p)
    z = torch.view_as_real(shifted).reshape(-1, 2 * p)  # (e, 2p)
    expected = torch.einsum("ep,ejp->ej", z, fine_q[pair])
    for chunk_bytes in (1 << 30, 3 * t_c * 2 * p * 4):  # one chunk, 3 particles
        got = estep._fine_cross(
            fine_q, images, phases, row, pair, tc, offsets, chunk_bytes
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("with_rows", [False, True])
def test_top_samples_through_group_maxima_match_a_full_topk(with_rows):
    """The top-q through the q best groups are the row's top-q (values and indices)."""
    from cryoavg.class2d.estep import _top_samples

    gen = torch.Generator().manual_seed(3)
    b, t, u = 12, 7, 50
    # distinct values (no ties); rows from peaked to flat; one row with dropped samples
    spread = torch.logspace(-1, 3, b, dtype=torch.float64)[:, None, None]
    log_w = (-spread * torch.rand(b, t, u, generator=gen, dtype=torch.float64)).float()
    log_w[4, :, 10:] = -math.inf
    rows = torch.tensor([0, 4, 5, 11]) if with_rows else torch.arange(b)
    for q in (1, 5, 16, 60, t * u):
        top, index = _top_samples(log_w, log_w.amax(1), q, rows if with_rows else None)
        flat = log_w.reshape(b, t * u)[rows]
        want_top, want_index = torch.topk(flat, q, dim=1)
        assert torch.equal(top, want_top)
        finite = want_top > -math.inf  # the order of −inf ties is arbitrary
        assert torch.equal(index[finite], want_index[finite])
        assert torch.equal(flat.gather(1, index), top)


@pytest.mark.parametrize("with_margin", [False, True])
def test_significance_by_translation_groups_matches_flat_rows(with_margin):
    """Counts and order are those of the rows taken as one flat group each."""
    import cryoavg.class2d.estep as estep

    gen = torch.Generator().manual_seed(12)
    b, t, u, cap = 48, 6, 70, 40
    spread = torch.logspace(-1, 4, b, dtype=torch.float64)[:, None]
    log_w = (-spread * torch.rand(b, t * u, generator=gen, dtype=torch.float64)).float()
    margin = torch.full((b,), 2.0) if with_margin else None
    order1, count1 = estep._significant_dense(log_w.clone(), 0.999, cap, margin)
    order2, count2 = estep._significant_dense(
        log_w.clone(), 0.999, cap, margin, n_translations=t
    )
    assert torch.equal(count1, count2)
    assert int(count1.min()) < estep.SIGNIFICANT_FIRST_TOPK  # both stages are used
    assert int(count1.max()) == cap
    for i in range(b):
        c = int(count1[i])
        assert torch.equal(order1[i, :c], order2[i, :c])


@pytest.mark.parametrize("with_margin", [False, True])
def test_significance_in_two_stages_matches_one(monkeypatch, with_margin):
    """A short top-k for all rows, then the full one for long rows: same counts."""
    import cryoavg.class2d.estep as estep

    gen = torch.Generator().manual_seed(11)
    b, n, cap = 64, 500, 40
    # rows from peaked (a few significant samples) to flat (at the cap)
    spread = torch.logspace(-1, 4, b, dtype=torch.float64)[:, None]
    log_w = (-spread * torch.rand(b, n, generator=gen, dtype=torch.float64)).float()
    log_w[3, 100:] = -math.inf  # a row with dropped samples
    margin = torch.full((b,), 2.0) if with_margin else None
    monkeypatch.setattr(estep, "SIGNIFICANT_FIRST_TOPK", 1000)  # one stage
    order1, count1 = estep._significant_dense(log_w.clone(), 0.999, cap, margin)
    monkeypatch.setattr(estep, "SIGNIFICANT_FIRST_TOPK", 8)
    order2, count2 = estep._significant_dense(log_w.clone(), 0.999, cap, margin)
    assert torch.equal(count1, count2)
    # both stages are used
    assert int(count1.min()) < 8
    assert int(count1.max()) == cap
    for i in range(b):
        c = int(count1[i])
        assert torch.equal(order1[i, :c], order2[i, :c])


def test_half_turn_grids_are_recognised():
    from cryoavg.class2d.estep import _half_turn_grid

    assert _half_turn_grid(PsiGrid.build(6.0).coarse_degrees)  # 30 angles
    assert _half_turn_grid(PsiGrid.build(6.0, perturbation=0.37).coarse_degrees)
    assert _half_turn_grid(PsiGrid.build(6.0).fine_degrees)
    assert not _half_turn_grid(PsiGrid.build(8.0).coarse_degrees)  # 23 angles
    assert not _half_turn_grid(
        torch.tensor([0.0, 90.0, 180.0, 250.0], dtype=torch.float64)
    )
    assert not _half_turn_grid(torch.tensor([10.0], dtype=torch.float64))


def test_estep_without_half_turns_gives_the_same_result(synthetic, grids, monkeypatch):
    """The half-turn tables (coarse and fine) change rounding only, not the result."""
    import cryoavg.class2d.estep as estep

    psi, trans, ps = grids
    syn = synthetic(psi, trans, ps, n_particles=40, snr=0.05, seed=5)
    _, with_turns = run_estep(syn.batch, syn.classes, grids)
    monkeypatch.setattr(estep, "_half_turn_grid", lambda degrees: False)
    _, without = run_estep(syn.batch, syn.classes, grids)
    assert torch.equal(with_turns.best_class, without.best_class)
    assert torch.equal(with_turns.n_significant, without.n_significant)
    assert torch.allclose(with_turns.pmax, without.pmax, rtol=1e-3, atol=1e-4)
    assert torch.allclose(
        with_turns.log_likelihood, without.log_likelihood, rtol=1e-6, atol=1e-3
    )
    assert int(with_turns.n_significant.max()) > 1  # spread posteriors are compared


@pytest.mark.parametrize("step", [6.0, 8.0])
def test_fine_tables_store_half_turns_as_conjugates(step):
    """On a half-turn fine grid, the turned half is the conjugate of the first half.

    It matches the interpolated references at those angles, and the |P|² of a row and
    its turned row are equal (the fine pass computes the power once for both).
    """
    import cryoavg.class2d.estep as estep

    psi = PsiGrid.build(step, perturbation=0.21)
    trans = TranslationGrid.build(3.0, 1.0, perturbation=-0.3)
    ps = PixelSet.for_size(N, 24)
    classes = torch.stack([blob_image(i, N) for i in range(K)]).float()
    proj = ClassProjector(classes, r_max=12)
    fine = estep._fine_tables(proj, psi, trans, ps, torch.complex64, 1 << 28)
    r_f = psi.fine_degrees.shape[0]
    # 2·n_coarse equally spaced fine angles: a half-turn grid even where the coarse
    # grid (23 angles at 8°) is not
    assert fine.half_turn
    refs = fine.references.view(K, r_f, -1)
    every = proj.rotated_references(psi.fine_degrees, ps)  # (K, r_f, p)
    scale = float(every.abs().max())
    assert float((refs - every).abs().max()) < 1e-5 * scale
    h = r_f // 2
    assert torch.equal(refs[:, h:], refs[:, :h].conj())
    power = fine.ref_power.view(K, r_f, -1)
    assert torch.equal(power[:, h:], power[:, :h])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("step", [6.0, 8.0])
def test_coarse_scores_by_half_turns_match_every_angle(step, precision):
    """Scoring half the ψ grid and the rest as 180° turns equals scoring every angle."""
    import cryoavg.class2d.estep as estep

    psi = PsiGrid.build(step, perturbation=0.21)
    trans = TranslationGrid.build(3.0, 1.0, perturbation=-0.3)
    ps = PixelSet.for_size(N, 24)
    classes = torch.stack([blob_image(i, N) for i in range(K)]).float()
    proj = ClassProjector(classes, r_max=12)
    n_coarse = ps.count_within(16)
    tables = estep._coarse_tables(
        proj, psi, trans, ps, n_coarse, torch.complex64, 1 << 28
    )
    half = psi.n_coarse % 2 == 0
    assert tables.half_turn == half
    h = psi.n_coarse // 2 if half else psi.n_coarse
    assert tables.references.shape[1:3] == (K, h)
    gen = torch.Generator().manual_seed(4)
    b = 5
    y = torch.randn(b, n_coarse - 1, generator=gen, dtype=torch.complex64)
    a = torch.rand(b, n_coarse - 1, generator=gen)
    operand = estep._coarse_operand(proj, tables, precision)
    got = estep._coarse_block(
        y,
        a,
        tables.references,
        tables.ref_power,
        tables.phases,
        half_turn=tables.half_turn,
        precision=precision,
        references_operand=operand,
    ).view(b, trans.n_coarse, K, psi.n_coarse)
    refs = proj.rotated_references(psi.coarse_degrees, ps, start=1, stop=n_coarse)
    phases = phase_shifts(trans.coarse_px, ps, start=1, stop=n_coarse)
    every = estep._coarse_cross_terms(
        y.to(torch.complex128), a.double(), refs.to(torch.complex128), phases
    )
    scale = float(every.abs().max())
    tol = 1e-5 if precision == "fp32" else 2.0**-6
    assert float((got.double() - every).abs().max()) < tol * scale
