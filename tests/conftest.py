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
