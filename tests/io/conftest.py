"""Fixtures for the cryoavg.io tests."""

from pathlib import Path

import pytest

from tests.io.helpers import SyntheticDataset, make_dataset, shared_dir


@pytest.fixture
def real_particles_dir() -> Path:
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared (real example data) is not available")
    return shared / "data" / "particles"


@pytest.fixture
def dataset(tmp_path: Path) -> SyntheticDataset:
    return make_dataset(tmp_path)
