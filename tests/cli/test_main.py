import subprocess
import sys

from cryoavg.cli.main import JOBS
from tests.conftest import compose_job


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cryoavg.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_help_lists_jobs():
    out = _cli("--help")
    assert out.returncode == 0
    for job in JOBS:
        assert job in out.stdout


def test_unknown_job_is_one_line_error():
    out = _cli("nosuchjob")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: unknown job 'nosuchjob'")
    assert len(out.stderr.strip().splitlines()) == 1


def test_job_help_shows_config():
    out = _cli("simulate", "--help")
    assert out.returncode == 0
    for key in ("n_particles", "junk_fraction", "defocus_min_um", "pixel_size", "seed"):
        assert key in out.stdout


def test_every_primary_config_composes():
    for job in JOBS:
        cfg = compose_job(job)
        assert len(cfg) > 0
    for job in ("simulate", "class2d"):
        assert "output" in compose_job(job)


def test_a_number_given_as_a_file_name_is_that_name(tmp_path):
    """``particles=-1`` / ``i_map=-1``: Hydra parses numbers; the jobs see text."""
    for args in (
        ("class2d", "particles=-1", "iterations=1"),
        ("simulate", "map=-1", f"output={tmp_path / 'sim'}"),
        ("localsym", "apply", "i_map=-1", "i_mask_info=-1", "o_map=5"),
    ):
        out = _cli(*args, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert lines == ["error: -1: file not found"], out.stderr
    assert list(tmp_path.iterdir()) == []
