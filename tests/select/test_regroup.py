"""Regrouping of selected particles (spec §C.6), checked against hand-worked examples."""

import logging

import numpy as np
import pandas as pd
import pytest

from cryoavg.errors import ConfigError, InputError
from cryoavg.select.regroup import regroup_old_groups, regroup_particles


def _particles_of(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_relion_walk_over_sorted_groups():
    # counts 10,20,15,25,5,25 (100 particles), n = 2 -> target 50
    # sorted by scale: g3(25) g0(10) g5(25) g2(15) g1(20) g4(5)
    # running totals 25, 35 -> id 1; 60 > 50 -> g5 starts id 2 (reset); 15, 35, 40 -> id 2
    old = _particles_of([10, 20, 15, 25, 5, 25])
    scale = np.array([0.9, 1.1, 1.0, 0.8, 1.2, 0.95])
    result = regroup_old_groups(old, scale, np.ones(old.size, int), 2)
    assert result.target == 50
    assert result.new_group_id.tolist() == [1, 2, 2, 1, 2, 2]
    assert result.new_group_names == [
        "group_1",
        "group_2",
        "group_2",
        "group_1",
        "group_2",
        "group_2",
    ]


def test_overflow_group_gets_the_new_id_and_is_not_counted():
    # target 10: g0 (11) overflows at once -> id 2 with total reset to 0;
    # g1 (6) -> 6, id 2; g2 (6) -> 12 > 10 -> id 3 (reset); g3 (1) -> id 3
    old = _particles_of([11, 6, 6, 1, 0, 0, 0, 0, 0, 0])[:24]
    old = np.concatenate([old, np.full(76, 9)])  # a big last group: 100 particles
    scale = np.arange(10, dtype=float)
    result = regroup_old_groups(old, scale, np.ones(old.size, int), 10)
    assert result.target == 10
    ids = result.new_group_id.tolist()
    assert ids[:4] == [2, 2, 3, 3]
    assert ids[4:9] == [-1] * 5  # no selected particles: no group
    assert ids[9] == 4  # 76 > 10: overflows into a new id
    assert result.new_group_names[0] == "group_02"  # 2 digits for n = 10


def test_each_optics_group_starts_a_new_group():
    old = _particles_of([30, 30, 30, 30])
    optics = np.array([1] * 60 + [2] * 60)
    scale = np.array([1.0, 0.9, 1.1, 0.8])
    result = regroup_old_groups(old, scale, optics, 2)  # target 60
    # optics 1: g1 (30), g0 (60, not > 60) -> 1; optics 2: g3 (30), g2 (60) -> 2
    assert result.new_group_id.tolist() == [1, 1, 2, 2]


def test_too_few_particles_per_group_is_a_config_error():
    old = _particles_of([5, 4])
    with pytest.raises(ConfigError, match="regroup=2"):
        regroup_old_groups(old, np.ones(2), np.ones(9, int), 2)
    with pytest.raises(ConfigError, match=">= 1"):
        regroup_old_groups(old, np.ones(2), np.ones(9, int), 0)


def _frame(n_per_group: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
    groups = pd.DataFrame(
        {
            "rlnGroupNumber": np.arange(1, 5),
            "rlnGroupName": [f"mic{i}" for i in range(1, 5)],
            "rlnGroupNrParticles": [n_per_group] * 4,
            "rlnGroupScaleCorrection": [1.2, 0.8, 1.0, 0.9],
        }
    )
    number = np.tile(np.arange(1, 5), n_per_group)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(number.size)],
            "rlnMicrographName": [f"mic{g}" for g in number],
            "rlnGroupNumber": number,
            "rlnOpticsGroup": np.ones(number.size, dtype=np.int64),
            "rlnClassNumber": np.ones(number.size, dtype=np.int64),
        }
    )
    return particles, groups


def test_regroup_particles_renames_groups_and_drops_group_numbers():
    particles, groups = _frame()
    out, result = regroup_particles(particles, 2, groups)  # 48 particles, target 24
    # sorted: g2 (0.8) 12, g4 (0.9) 24 -> id 1; g3 (1.0) 36 > 24 -> id 2; g1 (1.2) -> 2
    expected = {1: "group_2", 2: "group_1", 3: "group_2", 4: "group_1"}
    assert "rlnGroupNumber" not in out.columns
    assert out["rlnGroupName"].tolist() == [
        expected[g] for g in particles["rlnGroupNumber"]
    ]
    assert out["rlnImageName"].tolist() == particles["rlnImageName"].tolist()
    assert result.target == 24
    # by name when there is no rlnGroupNumber column
    by_name = particles.drop(columns=["rlnGroupNumber"]).assign(
        rlnGroupName=particles["rlnMicrographName"]
    )
    out_name, _ = regroup_particles(by_name, 2, groups)
    assert out_name["rlnGroupName"].tolist() == out["rlnGroupName"].tolist()


def test_without_groups_table_micrographs_are_the_old_groups():
    particles, _ = _frame()
    out, result = regroup_particles(particles.drop(columns=["rlnGroupNumber"]), 2)
    # equal scales: micrographs in name order mic1..mic4, 12 each, target 24
    assert result.new_group_id.tolist() == [1, 1, 2, 2]
    assert out["rlnGroupName"].tolist() == [
        "group_1" if m in ("mic1", "mic2") else "group_2"
        for m in particles["rlnMicrographName"]
    ]


def test_unknown_groups_and_mixed_optics(caplog):
    particles, groups = _frame()
    bad = particles.assign(rlnGroupNumber=particles["rlnGroupNumber"] + 10)
    with pytest.raises(InputError, match="groups the model does not have"):
        regroup_particles(bad, 2, groups, where="model.star")
    mixed = particles.copy()
    mixed.loc[0, "rlnOpticsGroup"] = 2
    with caplog.at_level(logging.WARNING, logger="cryoavg"):
        regroup_particles(mixed, 2, groups)
    assert "optics groups 1, 2" in caplog.text
