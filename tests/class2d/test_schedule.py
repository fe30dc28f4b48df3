"""VDAM schedules: RELION's documented numbers for 100 iterations (spec §A.1, §A.8)."""

from itertools import pairwise

import pytest

from cryoavg.class2d.schedule import VdamSchedule, parse_step_scheme


@pytest.fixture
def relion_run() -> VdamSchedule:
    """The GUI run of spec §A.1: 100 iterations, 100 000 particles, K = 100, T = 2."""
    return VdamSchedule(100, 100_000, 100, tau2_fudge=2.0)


def test_phases_30_50_20(relion_run):
    assert (relion_run.ini_iter, relion_run.inbetween_iter, relion_run.fin_iter) == (
        30,
        50,
        20,
    )
    long_run = VdamSchedule(200, 100_000, 10)
    assert (long_run.ini_iter, long_run.inbetween_iter, long_run.fin_iter) == (
        60,
        100,
        40,
    )


def test_fractions_above_point_nine_are_rescaled():
    schedule = VdamSchedule(100, 10_000, 5, ini_frac=0.6, fin_frac=0.6)
    # both divided by 0.6 + 0.6 + 0.1 = 1.3
    assert schedule.ini_iter == int(100 * 0.6 / 1.3)
    assert schedule.fin_iter == int(100 * 0.6 / 1.3)


def test_subset_sizes_documented_numbers(relion_run):
    assert (relion_run.ini_subset, relion_run.fin_subset) == (500, 5000)
    assert all(relion_run.subset_size(it) == 500 for it in range(1, 30))
    ramp = [relion_run.subset_size(it) for it in range(30, 80)]
    assert ramp[0] == 500
    assert ramp[-1] == 500 + round(49 / 50 * 4500)
    assert all(b >= a for a, b in pairwise(ramp))
    assert all(relion_run.subset_size(it) == 5000 for it in range(80, 100))
    assert relion_run.subset_size(100) == -1
    assert relion_run.is_full_pass(100)
    assert relion_run.batch_size(100) == 100_000
    assert relion_run.batch_size(50) == relion_run.subset_size(50)


def test_subset_defaults_small_data_set():
    schedule = VdamSchedule(100, 5000, 10)
    assert (schedule.ini_subset, schedule.fin_subset) == (200, 1000)
    huge = VdamSchedule(100, 10_000_000, 10)
    assert (huge.ini_subset, huge.fin_subset) == (10_000, 100_000)


def test_subset_all_particles_cases():
    single_class = VdamSchedule(100, 100_000, 1)
    assert single_class.subset_size(100) == 5000  # K = 1: no final full pass
    tiny = VdamSchedule(100, 150, 3)
    assert all(tiny.subset_size(it) == -1 for it in range(1, 101))
    explicit = VdamSchedule(100, 100_000, 3, ini_subset=1000, fin_subset=2000)
    assert (explicit.subset_size(1), explicit.subset_size(90)) == (1000, 2000)
    with_em = VdamSchedule(100, 100_000, 3, em_iters=5)
    assert with_em.do_grad(95)
    assert not with_em.do_grad(96)
    assert with_em.subset_size(96) == -1
    assert with_em.momentum(96) == 0.0


def test_step_size_sigmoid(relion_run):
    assert relion_run.stepsize_scheme == "3-step"
    assert relion_run.step_size(1) == pytest.approx(0.9, abs=1e-4)
    assert relion_run.step_size(42.5) == pytest.approx(0.6, abs=1e-9)
    assert relion_run.step_size(100) == pytest.approx(0.3, abs=1e-6)
    steps = [relion_run.step_size(it) for it in range(1, 101)]
    assert all(b <= a for a, b in pairwise(steps))
    plain = VdamSchedule(100, 100_000, 10, stepsize_scheme="plain")
    assert plain.step_size(1) == plain.step_size(100) == 0.3


def test_tau2_fudge_sigmoid(relion_run):
    assert relion_run.tau2_scheme == "2-step"
    assert relion_run.tau2_fudge(1) == pytest.approx(1.0, abs=1e-4)
    assert relion_run.tau2_fudge(36) == pytest.approx(1.5, abs=1e-9)
    assert relion_run.tau2_fudge(100) == pytest.approx(2.0, abs=1e-6)
    values = [relion_run.tau2_fudge(it) for it in range(1, 101)]
    assert all(b >= a for a, b in pairwise(values))
    default_t = VdamSchedule(100, 100_000, 10, tau2_fudge=-1)
    assert default_t.tau2_fudge(100) == pytest.approx(4.0, abs=1e-6)
    assert VdamSchedule(100, 1000, 2, tau2_scheme="plain").tau2_fudge(1) == 4.0


def test_replacement_window_and_momentum(relion_run):
    window = [it for it in range(0, 101) if relion_run.in_replacement_window(it)]
    assert window == list(range(31, 80))
    assert relion_run.momentum(50) == 0.9
    assert relion_run.momentum(100) == 0.0


def test_centering_iterations(relion_run):
    centred = [it for it in range(1, 101) if relion_run.do_centering(it)]
    assert centred == [*range(1, 80), 100]


def test_write_iterations(relion_run):
    written = [it for it in range(0, 101) if relion_run.is_write_iteration(it, 10)]
    assert written == list(range(0, 101, 10))
    assert relion_run.max_significant == 500


def test_scheme_parsing():
    assert parse_step_scheme("plain") is None
    assert parse_step_scheme("3-step") == 3.0
    assert parse_step_scheme("0.5-step") == 0.5
    for bad in ("3step", "fast", "-2-step", "0-step"):
        with pytest.raises(ValueError, match="step"):
            parse_step_scheme(bad)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="n_iterations"):
        VdamSchedule(0, 10, 1)
    with pytest.raises(ValueError, match="mu"):
        VdamSchedule(10, 10, 1, mu=1.0)
    with pytest.raises(ValueError, match="scheme"):
        VdamSchedule(10, 10, 1, stepsize_scheme="wild")
