"""Class ranker: checkpoint integrity, score_classes outputs and the shipped weights."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cryoavg.errors import CryoavgError
from cryoavg.select.features import CNN_SIZE, feature_names
from cryoavg.select.network import (
    ClassRankerNet,
    checksum_path,
    load_checkpoint,
    save_checkpoint,
)
from cryoavg.select.ranker import DEFAULT_WEIGHTS, ClassScores, score_classes

HSP60 = Path(__file__).resolve().parents[2] / "cryoavg" / "data" / "hsp60_D7_48px.mrc"


@pytest.fixture
def random_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = ClassRankerNet(n_features=len(feature_names()))
    path = tmp_path / "ranker.pt"
    save_checkpoint(path, model.eval(), feature_names(), {"test": 1})
    return path


def _stack(k: int = 5, size: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(k, size, size, generator=gen)


def test_checkpoint_roundtrip(random_weights: Path):
    model, names, meta = load_checkpoint(random_weights)
    assert names == feature_names()
    assert meta == {"test": 1}
    assert not model.training
    x = torch.randn(3, CNN_SIZE, CNN_SIZE)
    f = torch.randn(3, len(names))
    out = model(x, f)
    assert out.shape == (3,)
    assert bool(((out >= 0) & (out <= 1)).all())


def test_tampered_checkpoint_is_refused(random_weights: Path):
    data = bytearray(random_weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    random_weights.write_bytes(bytes(data))
    with pytest.raises(CryoavgError, match="sha256 mismatch") as info:
        load_checkpoint(random_weights)
    assert str(random_weights) in str(info.value)


def test_missing_weights_or_checksum(tmp_path: Path, random_weights: Path):
    with pytest.raises(CryoavgError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    checksum_path(random_weights).unlink()
    with pytest.raises(CryoavgError, match="checksum file"):
        load_checkpoint(random_weights)


def test_score_classes_shapes_and_range(random_weights: Path):
    k = 5
    result = score_classes(
        _stack(k),
        pixel_size_angstrom=5.0,
        particle_diameter_angstrom=150.0,
        class_distribution=np.full(k, 1 / k),
        n_particles=np.full(k, 100),
        accuracy_rotation_deg=np.array([3.0, 999.0, 4.0, 5.0, 6.0]),
        accuracy_translation_angst=np.array([3.0, 999.0, 4.0, 5.0, 6.0]),
        resolution_angstrom=np.array([20.0, np.inf, 30.0, 25.0, 40.0]),
        weights=random_weights,
    )
    assert isinstance(result, ClassScores)
    assert result.scores.shape == (k,)
    assert result.features.shape == (k, len(feature_names()))
    assert result.images64.shape == (k, 64, 64)
    assert result.features.dtype == np.float32
    assert result.images64.dtype == np.float32
    assert result.feature_names == feature_names()
    assert bool(((result.scores >= 0) & (result.scores <= 1)).all())


def test_bare_stack_mode_marks_model_groups_missing(random_weights: Path):
    result = score_classes(
        _stack(2, 36), pixel_size_angstrom=3.0, weights=random_weights
    )
    names = result.feature_names
    for name in (
        "distribution_missing",
        "count_missing",
        "resolution_missing",
        "accuracy_missing",
        "job_missing",  # fewer than 3 classes
    ):
        assert (result.features[:, names.index(name)] == 1).all()
    assert np.isfinite(result.scores).all()
    with pytest.raises(ValueError, match="class_distribution"):
        score_classes(
            _stack(2, 36),
            pixel_size_angstrom=3.0,
            class_distribution=np.ones(3),
            weights=random_weights,
        )


def _hsp60_cases() -> tuple[torch.Tensor, float]:
    """Clean projection averages of HSP60, pure noise and an edge-of-box blob."""
    from cryoavg.io.mrc import read_map_3d
    from cryoavg.ops.projection import project_volume_2d

    volume, _ = read_map_3d(HSP60)
    volume = torch.from_numpy(np.ascontiguousarray(volume))
    angles = torch.tensor([[0.0, 0.0, 0.0], [30.0, 90.0, 10.0], [100.0, 50.0, 70.0]])
    proj = project_volume_2d(volume, angles)
    gen = torch.Generator().manual_seed(3)
    size = proj.shape[-1]
    proj = proj / proj.std(dim=(-2, -1), keepdim=True)
    clean = proj + 0.1 * torch.randn(proj.shape, generator=gen)
    noise = torch.randn(3, size, size, generator=gen) * 0.3
    c = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    edge = torch.stack(
        [
            torch.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / (2 * 4.0**2))
            for dy, dx in ((0, 19), (-19, 0), (14, 14))
        ]
    )
    edge = edge / edge.std() + 0.1 * torch.randn(edge.shape, generator=gen)
    return torch.cat([clean, noise, edge]), 7.84


def test_shipped_ranker_prefers_clean_projection():
    assert DEFAULT_WEIGHTS.is_file(), f"shipped weights {DEFAULT_WEIGHTS} missing"
    assert checksum_path(DEFAULT_WEIGHTS).is_file()
    images, pixel = _hsp60_cases()
    for kwargs in ({}, {"particle_diameter_angstrom": 280.0}):
        scores = score_classes(images, pixel_size_angstrom=pixel, **kwargs).scores
        clean, noise, edge = scores[:3], scores[3:6], scores[6:]
        assert clean.min() > noise.max(), scores
        assert clean.min() > edge.max(), scores
        assert clean.min() > 0.5, scores
        assert max(noise.max(), edge.max()) < 0.5, scores


def test_shipped_ranker_scores_the_real_averages_as_good(shared: Path):
    """The real 50S / 70S ribosome class averages (good classes, 384 px) score high.

    Bare-stack mode at the guessed 1.3 Å/px (the header has none), and at 1.0 and
    2.0 Å/px: the score must not hinge on the pixel-size guess.
    """
    import mrcfile

    for name in ("fiftys.mrc", "seventys.mrc"):
        data = mrcfile.read(shared / "data" / "class_averages" / name)
        images = torch.from_numpy(np.asarray(data, dtype=np.float32).copy())
        for pixel in (1.0, 1.3, 2.0):
            scores = score_classes(images, pixel_size_angstrom=pixel).scores
            assert scores.shape == (1,)
            assert scores[0] > 0.7, (name, pixel, scores)
