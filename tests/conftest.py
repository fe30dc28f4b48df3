"""Shared fixtures: the real-data directory, config composition and a tiny simulated dataset."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from cryoavg.cli._configs import config_dir

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """``../shared`` beside the checkout (or ``$CRYOAVG_SHARED``); None when absent."""
    env = os.environ.get("CRYOAVG_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    return path if (path / "data").is_dir() else None


@pytest.fixture
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared is not present")
    return path


def compose_job(job: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a job's real primary config with overrides (as the command line would)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=job, overrides=overrides or [])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


@pytest.fixture(scope="session")
def tiny_simulation(tmp_path_factory) -> Path:
    """A 120-particle, 32 px simulation of the demo map (binned to 15.68 Å/px), 20 % junk."""
    from cryoavg.cli.simulate import run_simulate

    root = tmp_path_factory.mktemp("sim")
    cfg = compose_job(
        "simulate",
        [
            f"output={root / 'Simulate' / 'job001'}",
            "n_particles=120",
            "box=32",
            "pixel_size=15.68",
            "seed=3",
        ],
    )
    run_simulate(cfg)
    return root / "Simulate" / "job001"


@pytest.fixture(scope="session")
def two_views(tmp_path_factory):
    """60 top and 60 side views of the demo map (no junk, SNR 1), with the true view.

    In 2D, ψ is the in-plane angle that classification aligns away; the *view* is the
    direction of projection (rot, tilt). For the D7 demo map, tilt ≈ 0°/180° looks down the
    7-fold axis (a ring) and tilt ≈ 90° gives a striped side view at any rot.
    ``view`` is 1 for a side view, 0 for a top view (per row of ``star``).
    """
    from types import SimpleNamespace

    import numpy as np

    from cryoavg.cli.simulate import run_simulate
    from cryoavg.io.star import read_star, write_star

    root = tmp_path_factory.mktemp("views")
    sim = root / "Simulate" / "job001"
    run_simulate(
        compose_job(
            "simulate",
            [
                f"output={sim}",
                "n_particles=800",
                "box=32",
                "pixel_size=15.68",
                "junk_fraction=0",
                "snr=1",
                "seed=5",
            ],
        )
    )
    blocks = read_star(sim / "particles.star")
    tilt = read_star(sim / "ground_truth.star")["particles"]["rlnAngleTilt"].to_numpy()
    top = np.nonzero((tilt < 25) | (tilt > 155))[0][:60]
    side = np.nonzero(np.abs(tilt - 90) < 12)[0][:60]
    assert len(top) == len(side) == 60
    rows = np.sort(np.concatenate([top, side]))
    star = root / "views.star"
    write_star(
        star,
        {
            "optics": blocks["optics"],
            "particles": blocks["particles"].iloc[rows].reset_index(drop=True),
        },
    )
    return SimpleNamespace(star=star, view=np.isin(rows, side).astype(int), root=root)
