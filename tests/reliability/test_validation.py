"""Validation at the door: every problem of a particle set in one error, before work."""

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from cryoavg.errors import InputError
from cryoavg.io.mrc import write_mrc
from cryoavg.io.star import read_star, write_star
from cryoavg.io.validate import validate_particles


def _dataset(tmp_path, n=8, box=16):
    stacks = tmp_path / "Particles"
    stacks.mkdir()
    images = np.zeros((4, box, box), dtype=np.float32)
    for m in range(n // 4):
        write_mrc(stacks / f"mic{m}.mrcs", images, 2.0, is_stack=True)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["g1", "g2"],
            "rlnOpticsGroup": [1, 2],
            "rlnVoltage": [300.0, 300.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.1],
            "rlnImagePixelSize": [2.0, 2.0],
            "rlnImageSize": [box, box],
            "rlnImageDimensionality": [2, 2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [
                f"{i % 4 + 1:06d}@Particles/mic{i // 4}.mrcs" for i in range(n)
            ],
            "rlnDefocusU": np.full(n, 1e4),
            "rlnDefocusV": np.full(n, 1e4),
            "rlnDefocusAngle": np.zeros(n),
            "rlnOpticsGroup": np.arange(n) % 2 + 1,
        }
    )
    star = tmp_path / "particles.star"
    write_star(star, {"optics": optics, "particles": particles})
    return star


def test_valid_set_passes(tmp_path):
    validate_particles(_dataset(tmp_path), ctf=True)


def test_every_problem_is_reported_at_once(tmp_path):
    star = _dataset(tmp_path)
    blocks = read_star(star)
    optics, particles = blocks["optics"], blocks["particles"]
    optics.loc[1, "rlnImagePixelSize"] = 2.5  # pixel size mismatch between groups
    particles = particles.drop(columns=["rlnDefocusAngle"])  # CTF column missing
    particles.loc[2, "rlnDefocusU"] = np.nan  # NaN in a numeric column
    particles.loc[5, "rlnImageName"] = "000001@Particles/gone.mrcs"  # missing stack
    particles.loc[6, "rlnImageName"] = "000009@Particles/mic1.mrcs"  # beyond the end
    write_mrc(
        tmp_path / "Particles" / "mic0.mrcs",
        np.zeros((4, 20, 20), np.float32),
        2.0,
        is_stack=True,
    )  # box mismatch
    write_star(star, {"optics": optics, "particles": particles})
    with pytest.raises(InputError) as caught:
        validate_particles(star, ctf=True, project_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in (
        "rlnDefocusU is not a finite number in particle 3",
        "different pixel sizes (2, 2.5 Å)",
        "rlnDefocusAngle are missing",
        "gone.mrcs",
        "different box sizes",
        "beyond the end",
    ):
        assert fragment in message, (fragment, message)
    assert message.count("(") >= 6
    assert "problems:" in message


def test_ctf_columns_only_needed_with_ctf(tmp_path):
    star = _dataset(tmp_path)
    blocks = read_star(star)
    write_star(
        star,
        {
            "optics": blocks["optics"],
            "particles": blocks["particles"].drop(columns=["rlnDefocusU"]),
        },
    )
    validate_particles(star, ctf=False)
    with pytest.raises(InputError, match="rlnDefocusU"):
        validate_particles(star, ctf=True)


@pytest.mark.slow
def test_fast_for_a_hundred_thousand_particles(tmp_path):
    star = _dataset(tmp_path, n=8)
    blocks = read_star(star)
    n = 100_000
    particles = pd.DataFrame(
        {
            "rlnImageName": [
                f"{i % 4 + 1:06d}@Particles/mic{i % 2}.mrcs" for i in range(n)
            ],
            "rlnDefocusU": np.full(n, 1e4),
            "rlnDefocusV": np.full(n, 1e4),
            "rlnDefocusAngle": np.zeros(n),
            "rlnOpticsGroup": np.arange(n) % 2 + 1,
        }
    )
    write_star(star, {"optics": blocks["optics"], "particles": particles})
    started = time.perf_counter()
    validate_particles(star, ctf=True)
    assert time.perf_counter() - started < 10.0


def test_command_line_reports_all_problems_before_creating_the_job(tmp_path):
    star = _dataset(tmp_path)
    blocks = read_star(star)
    particles = blocks["particles"]
    particles.loc[0, "rlnImageName"] = "000001@Particles/gone.mrcs"
    particles["rlnDefocusV"] = particles["rlnDefocusV"].astype(object)
    particles.loc[1, "rlnDefocusV"] = "abc"
    write_star(star, {"optics": blocks["optics"], "particles": particles})
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cryoavg.cli.main",
            "class2d",
            f"particles={star}",
            "output=Class2D/job001",
            "logger=none",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "2 problems" in lines[0]
    assert "gone.mrcs" in lines[0]
    assert "rlnDefocusV" in lines[0]
    assert not (tmp_path / "Class2D").exists()
