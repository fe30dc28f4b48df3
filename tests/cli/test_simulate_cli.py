import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cryoavg.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _assert_one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_simulate_command_line_auto_numbers_jobs(tmp_path):
    args = ("simulate", "n_particles=40", "box=32", "pixel_size=15.68", "seed=2")
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = _cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    job1, job2 = tmp_path / "Simulate" / "job001", tmp_path / "Simulate" / "job002"
    for job in (job1, job2):
        assert (job / "particles.star").is_file()
        assert (job / "ground_truth.star").is_file()
        assert "cryoavg simulate n_particles=40" in (job / "note.txt").read_text()
        assert (job / "config.yaml").is_file()
    # image names are relative to the project directory (the cwd), as RELION writes them
    star = (job1 / "particles.star").read_text()
    assert "@Simulate/job001/Particles/mic00001.mrcs" in star
    # deterministic: same seed, same images
    a = mrcfile.read(job1 / "Particles" / "mic00001.mrcs")
    b = mrcfile.read(job2 / "Particles" / "mic00001.mrcs")
    np.testing.assert_array_equal(a, b)


def test_missing_map_is_one_line_error_and_no_output(tmp_path):
    out = _cli("simulate", "map=nothere.mrc", "output=Sim/job001", cwd=tmp_path)
    _assert_one_line_error(out, "nothere.mrc")
    assert not (tmp_path / "Sim").exists()


def test_truncated_map_is_one_line_error(tmp_path):
    good = tmp_path / "map.mrc"
    with mrcfile.new(good) as handle:
        handle.set_data(np.zeros((16, 16, 16), np.float32))
        handle.voxel_size = 5.0
    data = good.read_bytes()
    bad = tmp_path / "cut.mrc"
    bad.write_bytes(data[: len(data) - 4000])
    out = _cli("simulate", f"map={bad}", "output=Sim/job001", "box=32", cwd=tmp_path)
    _assert_one_line_error(out, "cut.mrc")
    assert not (tmp_path / "Sim").exists()


def test_bad_value_is_one_line_error(tmp_path):
    out = _cli("simulate", "n_particles=0", "box=32", "pixel_size=15.68", cwd=tmp_path)
    _assert_one_line_error(out, "n_particles")
    out = _cli(
        "simulate", "junk_fraction=1.5", "box=32", "pixel_size=15.68", cwd=tmp_path
    )
    _assert_one_line_error(out, "junk_fraction")
    assert not (tmp_path / "Simulate").exists()


def test_unknown_key_is_rejected(tmp_path):
    out = _cli("simulate", "n_particle=10", cwd=tmp_path)
    assert out.returncode != 0
    assert "n_particle" in out.stderr
    assert "Traceback" not in out.stderr


def test_map_with_a_tiny_pixel_size_is_one_line_error(tmp_path):
    """A header cell of ~1e-27 Å (found by the full MRC fuzz test) once gave NaN images."""
    path = tmp_path / "tiny.mrc"
    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    with mrcfile.new(path) as handle:
        handle.set_data(data)
        handle.voxel_size = (3.4e-28, 2.0, 2.0)
    out = _cli("simulate", f"map={path}", "output=Sim/job001", "box=16", cwd=tmp_path)
    _assert_one_line_error(out, "tiny.mrc", "implausible pixel size")
    assert not (tmp_path / "Sim").exists()
    out = _cli("simulate", "pixel_size=0.001", "box=16", cwd=tmp_path)
    _assert_one_line_error(out, "pixel_size")
