"""Class selection semantics (spec §C.4) with given scores: thresholds, guards, manual."""

import numpy as np
import pytest

from cryoavg.errors import ConfigError
from cryoavg.select.selection import (
    UNSCORED,
    SelectionCriteria,
    estimated_particle_counts,
    scored_classes,
    select_classes,
    selected_particles,
)

SCORES = np.array([0.9, 0.2, 0.6, 0.5, 0.45, UNSCORED])
COUNTS = np.array([100.0, 400.0, 50.0, 30.0, 200.0, 8.0])


def test_score_window_is_inclusive_and_skips_unscored():
    result = select_classes(SCORES, SelectionCriteria(min_score=0.5))
    assert result.selected.tolist() == [True, False, True, True, False, False]
    assert result.n_added == 0
    narrow = select_classes(SCORES, SelectionCriteria(min_score=0.5, max_score=0.6))
    assert narrow.selected.tolist() == [False, False, True, True, False, False]


def test_unscored_class_is_never_kept_even_with_min_score_zero():
    result = select_classes(SCORES, SelectionCriteria(min_score=0.0))
    assert result.selected.tolist() == [True] * 5 + [False]
    assert "not scored" in result.reasons[5]


def test_min_particles_adds_classes_in_descending_score_order():
    # kept by score: classes 1, 3, 4 -> 180 particles; next best: 0.45 (200), 0.2 (400)
    result = select_classes(
        SCORES,
        SelectionCriteria(min_score=0.5, min_particles=300),
        particle_counts=COUNTS,
    )
    assert result.selected.tolist() == [True, False, True, True, True, False]
    assert result.n_added == 1
    assert "min_particles" in result.reasons[4]
    everything = select_classes(
        SCORES,
        SelectionCriteria(min_score=0.5, min_particles=10_000),
        particle_counts=COUNTS,
    )
    # cannot reach the target: every scored class is added, never the unscored one
    assert everything.selected.tolist() == [True] * 5 + [False]


def test_min_classes_guard_and_particles_take_precedence():
    result = select_classes(SCORES, SelectionCriteria(min_score=0.95, min_classes=2))
    assert result.selected.tolist() == [True, False, True, False, False, False]
    both = select_classes(
        SCORES,
        SelectionCriteria(min_score=0.95, min_classes=4, min_particles=120),
        particle_counts=COUNTS,
    )
    # min_particles (100 + 50 >= 120) wins over min_classes=4
    assert both.selected.tolist() == [True, False, True, False, False, False]


def test_size_and_resolution_criteria_combine_with_the_score():
    resolution = np.array([12.0, 15.0, 40.0, np.inf, 10.0, 9.0])
    result = select_classes(
        SCORES,
        SelectionCriteria(
            min_score=0.4, min_class_particles=60, max_resolution_angstrom=20
        ),
        particle_counts=COUNTS,
        resolution_angstrom=resolution,
    )
    # 0.4 <= score: classes 1,3,4,5; >= 60 particles: 1, 5; <= 20 Å: 1, 5
    assert result.selected.tolist() == [True, False, False, False, True, False]
    assert "particles" in result.reasons[2]
    no_score = select_classes(
        SCORES,
        SelectionCriteria(min_score=None, max_resolution_angstrom=20),
        resolution_angstrom=resolution,
    )
    # score criterion off: resolution only (unscored class 6 still excluded)
    assert no_score.selected.tolist() == [True, True, False, False, True, False]
    assert "Å" in no_score.reasons[3]


def test_manual_selection_uses_class_numbers():
    numbers = np.array([3, 1, 2, 6, 5, 4])
    result = select_classes(
        SCORES, SelectionCriteria(classes=(1, 4)), class_numbers=numbers
    )
    assert result.selected.tolist() == [False, True, False, False, False, True]
    assert result.reasons[1] == "manual"
    with pytest.raises(ConfigError, match="class 9"):
        select_classes(SCORES, SelectionCriteria(classes=(1, 9)))


def test_empty_selection_is_a_config_error_naming_the_keys():
    with pytest.raises(ConfigError, match="min_score") as info:
        select_classes(SCORES, SelectionCriteria(min_score=0.95))
    assert "0.900" in str(info.value)  # the best score is reported
    assert "\n" not in str(info.value)


def test_criteria_that_need_counts_fail_without_them():
    with pytest.raises(ConfigError, match="bare"):
        select_classes(SCORES, SelectionCriteria(min_particles=10))
    with pytest.raises(ConfigError, match="max_resolution"):
        select_classes(SCORES, SelectionCriteria(max_resolution_angstrom=8))
    with pytest.raises(ConfigError, match="max_score"):
        SelectionCriteria(min_score=0.7, max_score=0.6)
    with pytest.raises(ConfigError, match="classes"):
        SelectionCriteria(classes=())


def test_scored_classes_follow_relion_more_than_ten_particles():
    counts = estimated_particle_counts(np.array([0.5, 0.45, 0.05]), 200)
    assert counts.tolist() == pytest.approx([100.0, 90.0, 10.0])
    assert scored_classes(counts, 3).tolist() == [True, True, False]
    assert scored_classes(None, 4).tolist() == [True] * 4


def test_selected_particles_keep_file_order():
    particle_class = np.array([2, 1, 3, 2, 0, 1])
    mask = selected_particles(particle_class, np.array([1, 2, 3]), np.array([1, 0, 1]))
    assert mask.tolist() == [False, True, True, False, False, True]
