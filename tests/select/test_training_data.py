"""The class-ranker training data (``scripts/train_ranker.py``): maps, plans, synthetic jobs."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoavg.select.features import group_columns

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_ranker.py"


@pytest.fixture(scope="module")
def tr():
    spec = importlib.util.spec_from_file_location("train_ranker_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _disc_offset(image: torch.Tensor) -> float:
    """Distance (px) of the positive centre of mass from the box centre."""
    size = image.shape[-1]
    c = torch.arange(size, dtype=torch.float64) - size // 2
    positive = (image.double() - image.double().median()).clamp_min(0)
    total = float(positive.sum())
    cy = float((positive.sum(1) * c).sum()) / total
    cx = float((positive.sum(0) * c).sum()) / total
    return float(np.hypot(cy, cx))


def test_maps_are_deterministic_and_held_out_stay_out(tr, tmp_path: Path):
    a, b = tr.dense_protein(5), tr.dense_protein(5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, tr.dense_protein(6))
    assert a.shape == (64, 64, 64)
    maps = tr.prepare_maps(tmp_path, ["blob9001", "dense101"])
    assert maps["dense101"][1] == 4.0
    # a "blob" name is still a blob protein (the held-out maps did not change kind)
    assert np.array_equal(tr.mrcfile.read(maps["blob9001"][0]), tr.blob_protein(9001))
    assert np.array_equal(tr.mrcfile.read(maps["dense101"][0]), tr.dense_protein(101))
    assert "blob9001" in tr.HELD_OUT
    assert "ribosome70S_65px" in tr.HELD_OUT


def test_eval_plan_does_not_depend_on_training_options(tr, tmp_path: Path):
    maps = tr.prepare_maps(tmp_path, ["blob9001", "blob9002"])
    first = tr.dataset_plan(7, 2, maps, eval_mode=True)
    again = tr.dataset_plan(7, 2, maps, eval_mode=True)
    assert first == again
    assert [name for name, _ in first] == ["eval000_blob9001", "eval001_blob9002"]
    sharp = tr.dataset_plan(
        [1, 1], 2, maps, eval_mode=False, prefix="sharp", snr_range=tr.SHARP_SNR
    )
    assert [name[:8] for name, _ in sharp] == ["sharp000", "sharp001"]
    for _, settings in sharp:
        assert tr.SHARP_SNR[0] <= settings["snr"] <= tr.SHARP_SNR[1]


def test_synthetic_job_labels_and_geometry(tr, tmp_path: Path):
    maps = tr.prepare_maps(tmp_path, ["dense101"])
    path, map_pixel = maps["dense101"]
    volume = torch.from_numpy(tr.mrcfile.read(path).astype(np.float32).copy())
    diameter = tr.map_diameter_angstrom(path, map_pixel)
    rng = np.random.default_rng(3)
    job = tr.synthetic_job(rng, volume, map_pixel, diameter)
    images, good = job["images"], job["good"]
    assert images.ndim == 3
    assert images.shape[0] == len(good)
    assert images.shape[-1] in (48, 64, 96, 128, 160)
    assert 4 <= good.sum() <= 8
    assert 4 <= (~good).sum() <= 8
    assert bool(good[: good.sum()].all())  # good first, then junk
    assert torch.isfinite(images).all()
    size = images.shape[-1]
    for image in images[good]:
        assert _disc_offset(image) < 0.15 * size  # good views stay near the centre
    assert diameter < job["mask_diameter"] <= (size - 3) * job["pixel"] + 1e-6
    again = tr.synthetic_job(np.random.default_rng(3), volume, map_pixel, diameter)
    assert torch.equal(again["images"], images)


def test_synthetic_samples_are_bare_stack_samples(tr, tmp_path: Path):
    maps = tr.prepare_maps(tmp_path, ["dense101", "blob101"])
    samples = tr.synthetic_samples(tmp_path, maps, seed=2, n_jobs=2)
    n = len(samples["good"])
    assert samples["features"].shape[0] == n
    assert samples["images"].shape == (n, 64, 64)
    assert set(np.unique(samples["variant"])) == {0, 1}
    assert np.array_equal(samples["target"], samples["good"].astype(float))
    for cols in group_columns().values():
        assert (samples["features"][:, cols[-1]] == 1).all()
        assert (samples["features"][:, cols[:-1]] == 0).all()
    cached = tr.synthetic_samples(tmp_path, maps, seed=2, n_jobs=2)
    assert np.array_equal(cached["features"], samples["features"])
