"""M-step: EM reconstruction, VDAM moments/steps/replacement, §A.9 post-processing."""

import math

import pytest
import torch

from cryoavg.class2d import mstep
from cryoavg.class2d.schedule import VdamSchedule
from cryoavg.class2d.state import Class2DState
from cryoavg.class2d.statistics import Class2DStatistics
from cryoavg.ops.fourier import power_spectrum_1d, shell_pixel_counts
from cryoavg.ops.masks import center_of_mass_2d

N = 32


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """32-px tensors: one intra-op thread avoids oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(y: float, x: float, sigma: float, n: int = N) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float32) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


def target_image() -> torch.Tensor:
    return gaussian(2.0, -3.0, 3.0) - 0.5 * gaussian(-4.0, 2.0, 2.0)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def make_state(images: torch.Tensor, **kwargs) -> Class2DState:
    state = Class2DState(images.shape[0], images.shape[-1], **kwargs)
    state.class_images.copy_(images)
    return state


def zero_stats(state: Class2DState) -> Class2DStatistics:
    return Class2DStatistics.zeros(
        state.n_classes,
        state.box_size,
        n_optics_groups=state.n_optics_groups,
        n_groups=state.n_scale_groups,
    )


def residual_stats(state: Class2DState, targets: torch.Tensor) -> Class2DStatistics:
    """VDAM statistics with W = 1 and g = F_target − F_current in both halves."""
    stats = zero_stats(state)
    gradient = mstep.padded_dft_2d(targets) - mstep.padded_dft_2d(state.class_images)
    stats.data[:] = gradient
    stats.weight[:] = 1.0
    stats.class_weight[:] = 1.0
    return stats


# --------------------------------------------------------------------------- EM
def test_em_update_reproduces_noise_free_image():
    truth = target_image()
    state = make_state(truth[None])
    stats = zero_stats(state)
    dft = mstep.padded_dft_2d(truth[None])
    stats.data[0], stats.data[1] = 0.5 * dft, 0.5 * dft  # halves are summed
    stats.weight[:] = 0.5
    stats.class_weight[:] = 10.0
    mstep.em_update(state, stats, tau2_fudge=1e8)  # huge T·τ²: negligible prior
    out = state.class_images[0]
    assert torch.isfinite(out).all()
    assert correlation(out, truth) > 0.99
    # ML estimate from a blank start (no prior at all)
    blank = make_state(torch.zeros(1, N, N))
    mstep.em_update(blank, stats, tau2_fudge=1.0, do_map=False)
    assert correlation(blank.class_images[0], truth) > 0.99


def test_em_update_regularisation_shrinks_and_ssnr_limited_to_current_size():
    truth = target_image()
    state = make_state(truth[None])
    state.current_size.fill_(16)
    stats = zero_stats(state)
    stats.data[0] = 1e-3 * mstep.padded_dft_2d(truth[None])  # D = W·F
    stats.weight[0] = 1e-3
    stats.class_weight[:] = 1.0
    mstep.em_update(state, stats, tau2_fudge=2.0)
    out = state.class_images[0]
    assert torch.isfinite(out).all()
    assert correlation(out, truth) > 0.9
    ratio = power_spectrum_1d(out) / power_spectrum_1d(truth)
    assert ((ratio[1:4] > 0.8) & (ratio[1:4] < 1.5)).all()  # unregularised shells
    assert (ratio[6:8] < 0.5).all()  # W ≪ 1/(osc·T·τ²): strongly shrunk
    assert (state.ssnr[0, 9:] == 0).all()
    assert (state.ssnr[0, 1:8] > 0).all()
    assert float(state.tau2_fudge) == 2.0


#: (priors, in the window, threshold) for which no class may be re-seeded
NO_REPLACEMENT_CASES = [
    ([0.6, 0.39, 0.01], False, 0.1),  # outside the window
    ([0.5, 0.3, 0.2], True, 0.1),  # above 0.1 / K_active
    ([0.6, 0.39, 0.01], True, 0.0),  # threshold off
]


def _em_split_setup(priors):
    """Class 0 is seen as image A in half 0 and image B in half 1; class 1 as itself."""
    a, b = gaussian(-3, 0, 2), gaussian(3, 0, 2)
    images = torch.stack([0.5 * (a + b), gaussian(0, 3, 3), gaussian(1, 1, 2)])
    state = make_state(images)
    state.class_prior.copy_(torch.tensor(priors))
    state.class_offset_prior_angstrom[0] = torch.tensor([2.0, -1.0])
    stats = zero_stats(state)
    stats.data[0, 0] = mstep.padded_dft_2d(a[None])[0]
    stats.data[1, 0] = mstep.padded_dft_2d(b[None])[0]
    stats.data[0, 1] = mstep.padded_dft_2d(images[1:2])[0]
    stats.weight[:, :2] = 1.0
    stats.class_weight[:] = torch.tensor([6.0, 3.9, 0.1])
    return state, stats, a, b


def test_em_reseeding_splits_the_largest_class_into_its_halves():
    state, stats, a, b = _em_split_setup([0.6, 0.39, 0.01])
    result = mstep.em_update(
        state,
        stats,
        tau2_fudge=1e8,
        allow_class_replacement=True,
        class_inactivity_threshold=0.1,
    )
    assert (result.expanded_class, result.replaced_class) == (0, 2)
    assert correlation(state.class_images[0], a) > 0.99
    assert correlation(state.class_images[2], b) > 0.99
    assert float(state.class_prior[0]) == pytest.approx(float(state.class_prior[2]))
    assert float(state.class_prior.sum()) == pytest.approx(1.0)
    assert torch.equal(
        state.class_offset_prior_angstrom[2], state.class_offset_prior_angstrom[0]
    )
    assert torch.equal(state.tau2[2], state.tau2[0])


@pytest.mark.parametrize(("priors", "allow", "threshold"), NO_REPLACEMENT_CASES)
def test_em_no_reseeding(priors, allow, threshold):
    state, stats, a, b = _em_split_setup(priors)
    result = mstep.em_update(
        state,
        stats,
        tau2_fudge=1e8,
        allow_class_replacement=allow,
        class_inactivity_threshold=threshold,
    )
    assert (result.expanded_class, result.replaced_class) == (None, None)
    assert correlation(state.class_images[0], a + b) > 0.99  # both halves summed


def test_em_replacement_window():
    from cryoavg.class2d.optim import em_replacement_window

    assert [i for i in range(1, 26) if em_replacement_window(i, 25)] == list(
        range(2, 21)
    )


def test_em_update_empty_classes_are_zero_and_finite():
    images = torch.stack([target_image(), gaussian(0, 0, 3), gaussian(1, 1, 2)])
    state = make_state(images)
    state.class_prior.copy_(torch.tensor([0.5, 0.5, 0.0]))
    stats = zero_stats(state)
    stats.data[0, 0] = mstep.padded_dft_2d(images[:1])[0]
    stats.weight[0, 0] = 1.0
    stats.class_weight[0] = 5.0
    mstep.em_update(state, stats, tau2_fudge=2.0)
    assert torch.isfinite(state.class_images).all()
    assert torch.count_nonzero(state.class_images[1]) == 0  # no data
    assert torch.count_nonzero(state.class_images[2]) == 0  # π = 0
    assert torch.allclose(state.class_prior, torch.tensor([1.0, 0.0, 0.0]))
    for name in ("tau2", "ssnr", "fourier_completeness", "sigma2_class"):
        assert torch.isfinite(getattr(state, name)).all(), name


def test_em_other_parameters():
    state = make_state(torch.zeros(2, N, N), n_optics_groups=1, n_scale_groups=3)
    state.scale_group_particle_count.copy_(torch.tensor([1.0, 1.0, 2.0]))
    stats = zero_stats(state)
    stats.class_weight.copy_(torch.tensor([3.0, 1.0], dtype=torch.float64))
    stats.offset_sum_angstrom.copy_(
        torch.tensor([[3.0, 6.0], [1.0, -2.0]], dtype=torch.float64)
    )
    stats.sigma2_offset_sum.fill_(8.0)  # / (2·4) = 1 Å² → floored at 2 Å²
    stats.norm_sum.fill_(4.4)
    stats.pmax_sum.fill_(2.0)
    stats.log_likelihood.fill_(-123.0)
    npix = shell_pixel_counts((N, N)).double()
    wanted = torch.linspace(1.0, 0.1, N // 2 + 1, dtype=torch.float64)
    stats.noise_weight.fill_(4.0)
    stats.noise_power[0] = wanted * 2.0 * 4.0 * npix
    stats.noise_power[0, 3] = 0.0  # < 1e-14 → previous shell
    stats.scale_xa.copy_(torch.tensor([1.0, 2.0, 100.0], dtype=torch.float64))
    stats.scale_aa.fill_(1.0)
    mstep.em_update(state, stats, tau2_fudge=2.0)

    assert torch.allclose(state.class_prior, torch.tensor([0.75, 0.25]))
    assert torch.allclose(
        state.class_offset_prior_angstrom, torch.tensor([[1.0, 2.0], [1.0, -2.0]])
    )
    assert float(state.sigma2_offset_angstrom2) == pytest.approx(2.0)
    assert float(state.avg_norm) == pytest.approx(1.1)
    assert float(state.average_pmax) == pytest.approx(0.5)
    assert float(state.log_likelihood) == pytest.approx(-123.0)
    expected = wanted.float().clone()
    expected[3] = expected[2]
    assert torch.allclose(state.sigma2_noise[0], expected, rtol=1e-5)
    # s = [1, 2, 100] → clamp to 5·median = 10 → divide by count-weighted mean 23/4
    scale = torch.tensor([1.0, 2.0, 10.0]) / (23.0 / 4.0)
    assert torch.allclose(state.scale, scale, rtol=1e-5)
    counts = state.scale_group_particle_count
    assert float((counts * state.scale).sum() / counts.sum()) == pytest.approx(1.0)


def test_other_parameters_floor_switch_and_momentum():
    state = make_state(torch.zeros(2, N, N))
    stats = zero_stats(state)
    stats.class_weight.copy_(torch.tensor([1.0, 0.0], dtype=torch.float64))
    stats.sigma2_offset_sum.fill_(2.0)
    state.class_offset_prior_angstrom.fill_(7.0)
    mstep.update_other_parameters(
        state, stats, mu=0.9, min_sigma2_offset_angstrom2=None
    )
    # π: 0.9·0.5 + 0.1·[1, 0] = [0.55, 0.45] (already normalised)
    assert torch.allclose(state.class_prior, torch.tensor([0.55, 0.45]))
    assert float(state.sigma2_offset_angstrom2) == pytest.approx(
        0.9 * 100.0 + 0.1 * 1.0
    )
    assert torch.allclose(state.class_offset_prior_angstrom[0], torch.tensor(6.3))
    assert (state.class_offset_prior_angstrom[1] == 0).all()  # no weight → reset
    before = {k: v.clone() for k, v in state.state_dict().items()}
    mstep.update_other_parameters(state, zero_stats(state), mu=0.9)  # no weight
    for key, value in state.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------- VDAM
def test_vdam_first_moments_initialise_to_gradient():
    state = make_state(gaussian(0, 0, 4)[None])
    stats = zero_stats(state)
    g0 = mstep.padded_dft_2d(target_image()[None], r_max=N / 2)[0]
    g1 = mstep.padded_dft_2d(gaussian(1, 2, 3)[None], r_max=N / 2)[0]
    stats.data[0, 0], stats.data[1, 0] = 2.0 * g0, 2.0 * g1
    stats.weight[:] = 2.0  # g_h = D_h / max(1, W_h)
    stats.class_weight[:] = 1.0
    mstep.vdam_update(state, stats, step_size=0.3, tau2_fudge=2.0, mu=0.9)
    assert torch.allclose(state.moment1[0, 0], g0, atol=1e-6)
    assert torch.allclose(state.moment1[1, 0], g1, atol=1e-6)
    noise = (g1 - g0).abs() ** 2
    signal = (0.5 * (g0 + g1)).abs() ** 2
    expected_m2 = 0.999 + 0.001 * noise / (signal + 1e-12)
    # RELION updates the moments only for r < r_max (= current_size / 2)
    inside = mstep._padded_grid(
        N, state.pad, int(state.current_size) / 2.0, device="cpu", dtype=torch.float64
    ).inside
    expected_m2 = torch.where(inside, expected_m2, torch.ones_like(expected_m2))
    assert torch.allclose(state.moment2[0], expected_m2, rtol=1e-4)
    # second call: exponential moving average with 0.9
    mstep.vdam_update(state, stats, step_size=0.3, tau2_fudge=2.0, mu=0.9)
    assert torch.allclose(state.moment1[0, 0], g0, atol=1e-6)  # same gradient again
    stats.data.mul_(0.5)
    mstep.vdam_update(state, stats, step_size=0.3, tau2_fudge=2.0, mu=0.9)
    assert torch.allclose(state.moment1[0, 0], 0.95 * g0, atol=1e-6)
    assert float(state.step_size) == pytest.approx(0.3)


def test_vdam_moments_untouched_beyond_current_size():
    state = make_state(gaussian(0, 0, 4)[None])
    state.current_size.fill_(N // 2)
    old1 = torch.full_like(state.moment1, 0.5 + 0.25j)
    state.moment1.copy_(old1)
    state.moment2.fill_(3.0)
    stats = zero_stats(state)
    g0 = mstep.padded_dft_2d(target_image()[None], r_max=N / 2)[0]
    stats.data[0, 0], stats.data[1, 0] = g0, 0.5 * g0
    stats.weight[:] = 1.0
    stats.class_weight[:] = 1.0
    result = mstep.vdam_update(state, stats, step_size=0.3, tau2_fudge=2.0, mu=0.9)
    grid = mstep._padded_grid(N, state.pad, N / 4.0, device="cpu", dtype=torch.float64)
    outside = ~grid.inside
    assert torch.equal(state.moment1[:, :, outside], old1[:, :, outside])
    assert (state.moment2[:, outside] == 3.0).all()
    assert not torch.equal(state.moment1[:, :, grid.inside], old1[:, :, grid.inside])
    # the class error only sees the direction inside r_max
    m1 = state.moment1[:, 0]
    direction = 0.5 * (m1[0] + m1[1]) / (state.moment2[0].sqrt() + 1e-12) * grid.inside
    expected = (direction.abs() ** 2).mean() * 1.0
    assert float(result.class_error[0]) == pytest.approx(float(expected), rel=1e-6)


def test_vdam_step_moves_towards_target_and_converges():
    target = target_image()
    state = make_state(gaussian(0.0, 0.0, 4.0)[None])

    def error() -> float:
        return float((state.class_images[0] - target).norm() / target.norm())

    start = error()
    mstep.vdam_update(state, residual_stats(state, target[None]), 0.3, 2.0, 0.9)
    assert error() < start
    for _ in range(100):
        result = mstep.vdam_update(
            state, residual_stats(state, target[None]), 0.3, 2.0, 0.9
        )
    assert torch.isfinite(state.class_images).all()
    assert bool(result.updated[0])
    assert error() < 0.02
    assert correlation(state.class_images[0], target) > 0.999


def test_vdam_small_class_takes_small_steps_and_empty_class_is_kept():
    target = target_image()
    start = torch.stack([gaussian(0, 0, 4), gaussian(0, 0, 4), gaussian(3, 3, 2)])
    state = make_state(start)
    state.class_prior.copy_(torch.tensor([0.9, 1e-4, 0.0]))
    stats = residual_stats(state, target.expand(3, N, N))
    result = mstep.vdam_update(state, stats, 0.5, 2.0, 0.9)
    moved = (state.class_images - start).flatten(1).norm(dim=1)
    assert moved[0] > 100 * moved[1] > 0
    assert torch.equal(state.class_images[2], start[2])  # π = 0: untouched
    assert result.updated.tolist() == [True, True, False]
    assert torch.isfinite(state.class_images).all()


def test_vdam_with_empty_statistics_changes_nothing_and_stays_finite():
    state = make_state(torch.stack([target_image(), gaussian(0, 0, 3)]))
    images = state.class_images.clone()
    result = mstep.vdam_update(state, zero_stats(state), 0.3, 2.0, 0.9)
    assert torch.equal(state.class_images, images)
    assert not result.updated.any()
    for name, value in state.state_dict().items():
        assert torch.isfinite(value).all(), name


def replacement_setup(priors):
    images = torch.stack([gaussian(0, 0, 4), gaussian(2, 2, 3), gaussian(-3, 1, 2)])
    state = make_state(images)
    state.class_prior.copy_(torch.tensor(priors))
    targets = torch.stack([5.0 * target_image(), images[1], images[2] * 1.01])
    return state, residual_stats(state, targets)


def update_with_replacement(state, stats, expand_class="gradient"):
    """One VDAM update inside the replacement window, c = 0.1 (0.1 / 3 > 0.01)."""
    return mstep.vdam_update(
        state,
        stats,
        0.3,
        2.0,
        0.9,
        allow_class_replacement=True,
        class_inactivity_threshold=0.1,
        expand_class=expand_class,
    )


def test_class_replacement_in_window_below_threshold():
    state, stats = replacement_setup([0.6, 0.39, 0.01])
    old_images = state.class_images.clone()
    result = update_with_replacement(state, stats)
    assert (result.expanded_class, result.replaced_class) == (0, 2)
    assert int(torch.argmax(result.class_error)) == 0
    assert not bool(result.updated[2])
    assert torch.equal(state.class_images[2], old_images[0])  # pre-step copy
    assert not torch.equal(state.class_images[0], old_images[0])  # 0 took its step
    assert torch.allclose(state.moment1[0, 2], 0.9 * state.moment1[0, 0])
    assert torch.equal(state.moment1[1, 2], state.moment1[1, 0])
    assert torch.equal(state.moment2[2], state.moment2[0])
    assert torch.equal(state.tau2[2], state.tau2[0])
    assert state.class_prior.sum() == pytest.approx(1.0)
    assert state.class_prior[2] > 0.2  # copied share, renormalised


def test_replacement_copies_the_offset_prior():
    """The copy must not keep the dropped class's (junk) offset prior."""
    state, stats = replacement_setup([0.6, 0.39, 0.01])
    state.class_offset_prior_angstrom.copy_(
        torch.tensor([[1.0, -2.0], [0.0, 0.0], [15.0, 9.0]])
    )
    result = update_with_replacement(state, stats)
    assert result.replaced_class == 2
    # after the EMA with this batch both sit near the expanded class's prior
    offsets = state.class_offset_prior_angstrom
    assert float((offsets[2] - offsets[0]).norm()) < 2.0
    assert float(offsets[2].norm()) < 5.0


@pytest.mark.parametrize(("rule", "expected"), [("largest", 1), ("gradient", 0)])
def test_expand_class_rule(rule, expected):
    """Class 0 has the largest error, class 1 the largest share; the rule picks."""
    state, stats = replacement_setup([0.39, 0.6, 0.01])
    old_images = state.class_images.clone()
    result = update_with_replacement(state, stats, expand_class=rule)
    assert int(torch.argmax(result.class_error)) == 0
    assert (result.expanded_class, result.replaced_class) == (expected, 2)
    assert torch.equal(state.class_images[2], old_images[expected])


def test_expand_class_rule_is_checked():
    state, stats = replacement_setup([0.6, 0.39, 0.01])
    with pytest.raises(ValueError, match="expand_class"):
        mstep.vdam_update(state, stats, 0.3, 2.0, 0.9, expand_class="random")


@pytest.mark.parametrize(("priors", "allow", "threshold"), NO_REPLACEMENT_CASES)
def test_no_class_replacement(priors, allow, threshold):
    state, stats = replacement_setup(priors)
    old = state.class_images[2].clone()
    result = mstep.vdam_update(
        state,
        stats,
        0.3,
        2.0,
        0.9,
        allow_class_replacement=allow,
        class_inactivity_threshold=threshold,
    )
    assert result.replaced_class is None
    assert result.expanded_class is None
    assert not torch.equal(state.class_images[2], old)


def test_vdam_update_for_iteration_uses_schedule_window():
    schedule = VdamSchedule(100, 100_000, 3, tau2_fudge=2.0)
    state, stats = replacement_setup([0.6, 0.39, 0.01])
    outside = mstep.vdam_update_for_iteration(
        state, stats, schedule, 10, class_inactivity_threshold=0.1
    )
    assert outside.replaced_class is None
    assert float(state.step_size) == pytest.approx(schedule.step_size(10))
    assert float(state.tau2_fudge) == pytest.approx(schedule.tau2_fudge(10))
    state, stats = replacement_setup([0.6, 0.39, 0.01])
    inside = mstep.vdam_update_for_iteration(
        state, stats, schedule, 40, class_inactivity_threshold=0.1
    )
    assert inside.replaced_class == 2


# ------------------------------------------------------------------- §A.9, §A.10
def test_center_classes_moves_off_centre_blob():
    images = torch.stack([gaussian(4.3, -3.2, 2.5), gaussian(0.0, 0.0, 2.5)])
    state = make_state(images)
    shifts = mstep.center_classes(state, offset_range_px=10.0)
    com = center_of_mass_2d(state.class_images)
    assert float(com[0].norm()) < 1.0
    assert torch.allclose(shifts[0], torch.tensor([-4.3, 3.2]), atol=0.1)
    assert torch.allclose(state.class_images[1], images[1], atol=1e-5)  # centred


def test_center_classes_threshold_and_cap():
    images = torch.stack([gaussian(1.0, 1.0, 2.5), gaussian(0.0, 5.0, 2.0)])
    state = make_state(images)
    shifts = mstep.center_classes(state, offset_range_px=2.0, min_shift_px=2.0)
    assert torch.equal(state.class_images[0], images[0])  # |c| ≈ 1.4 < 2: skipped
    assert torch.equal(shifts[0], torch.zeros(2))
    assert float(shifts[1].norm()) == pytest.approx(2.0, abs=1e-4)  # capped
    assert float(center_of_mass_2d(state.class_images[1])[1]) == pytest.approx(
        3.0, abs=0.1
    )


def test_center_classes_shifts_both_moment_halves():
    image = gaussian(3.0, -2.0, 2.5)
    state = make_state(image[None])
    half0 = mstep.padded_dft_2d(image[None])[0]
    half1 = mstep.padded_dft_2d(gaussian(3.0, -2.0, 1.5)[None])[0]
    state.moment1[0, 0] = half0
    state.moment1[1, 0] = half1
    shifts = mstep.center_classes(state, offset_range_px=10.0, shift_moments=True)
    big = state.padded_size
    ky = torch.fft.fftfreq(big, 1.0 / big)[:, None]
    kx = torch.arange(big // 2 + 1)[None, :]
    phase = -2 * math.pi * (ky * shifts[0, 0] + kx * shifts[0, 1]) / big
    factor = torch.polar(torch.ones_like(phase), phase)
    assert torch.allclose(state.moment1[0, 0], half0 * factor, atol=1e-5)
    assert torch.allclose(state.moment1[1, 0], half1 * factor, atol=1e-5)
    # each half keeps its own content (no RELION half-1 overwrite)
    assert not torch.allclose(state.moment1[1, 0], state.moment1[0, 0], atol=1e-3)


def test_solvent_flatten_zeroes_outside_mask():
    state = make_state(torch.ones(1, N, N))
    mstep.solvent_flatten(state, mask_radius_px=8.0, soft_edge_px=5.0)
    c = torch.arange(N, dtype=torch.float32) - N // 2
    radius = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    image = state.class_images[0]
    assert (image[radius > 13.0] == 0).all()
    assert (image[radius <= 8.0] == 1).all()


def test_current_size_grows_with_ssnr():
    state = Class2DState(2, 64)
    state.ssnr.zero_()
    assert mstep.update_resolution(state) == 5  # minres_map
    assert int(state.current_size) == 30
    state.ssnr[0, :8] = 10.0  # shells 0..7 above 1
    assert mstep.update_resolution(state) == 7
    assert int(state.current_size) == 34
    assert int(state.current_resolution_shell) == 7
    state.ssnr.fill_(100.0)
    assert mstep.update_resolution(state) == 31
    assert int(state.current_size) == 64  # capped at N


def test_estimated_resolution():
    ssnr = torch.zeros(3, 17)
    ssnr[0, :3] = 5.0  # first shell below 1 is 3 → maxres 2
    ssnr[2] = 9.0  # never below 1 → last shell
    resolution = mstep.estimated_resolution_angstrom(ssnr, 32, 1.5)
    assert float(resolution[0]) == pytest.approx(32 * 1.5 / 2)
    assert math.isinf(float(resolution[1]))  # empty class
    assert float(resolution[2]) == pytest.approx(3.0)  # Nyquist


def test_fill_shells():
    values = torch.tensor([[0.0, 2.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    filled = mstep._fill_shells(values, values > 0)
    assert filled.tolist() == [[2.0, 2.0, 2.0, 3.0, 3.0], [1.0] * 5]


def test_invalid_arguments():
    state = make_state(torch.zeros(1, N, N))
    with pytest.raises(ValueError, match="tau2_fudge"):
        mstep.em_update(state, zero_stats(state), tau2_fudge=0.0)
    with pytest.raises(ValueError, match="accumulators"):
        mstep.vdam_update(state, Class2DStatistics.zeros(1, 16), 0.3, 1.0, 0.9)
    with pytest.raises(ValueError, match="mu"):
        mstep.update_other_parameters(state, zero_stats(state), mu=1.5)


def test_scale_of_group_without_reference_power_is_pulled_towards_one():
    # RELION maximizationOtherParameters: AA = 0 → the group's estimate is 1
    state = make_state(torch.zeros(2, N, N), n_scale_groups=3)
    state.scale.copy_(torch.tensor([1.0, 2.0, 4.0]))
    state.scale_group_particle_count.fill_(1.0)
    stats = zero_stats(state)
    stats.class_weight.fill_(1.0)
    stats.scale_xa.copy_(torch.tensor([1.0, 0.0, 0.0], dtype=stats.scale_xa.dtype))
    stats.scale_aa.copy_(torch.tensor([1.0, 0.0, 0.0], dtype=stats.scale_aa.dtype))
    mstep.update_other_parameters(state, stats, mu=0.5)
    raw = torch.tensor([1.0, 1.5, 2.5])  # 0.5·old + 0.5·[1, 1, 1]
    assert torch.allclose(state.scale, raw / raw.mean(), rtol=1e-5)
