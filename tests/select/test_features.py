"""Class-ranker features: resampling, masks, moments and the model feature groups."""

import math

import numpy as np
import pytest
import torch

from cryoavg.select import features as F


def _disc(size: int, radius: float, centre=(0.0, 0.0)) -> torch.Tensor:
    c = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    return torch.clamp(radius + 0.5 - r, 0.0, 1.0)


def _blob(size: int, sigma: float, centre=(0.0, 0.0)) -> torch.Tensor:
    c = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def _named(features: np.ndarray) -> list[dict[str, float]]:
    names = F.feature_names()
    return [dict(zip(names, row.tolist(), strict=True)) for row in features]


@pytest.fixture(scope="module")
def three_kinds():
    """A centred disc, an edge-of-box blob and pure noise, 48 px at 5 Å/px."""
    gen = torch.Generator().manual_seed(0)
    size = 48
    centred = _disc(size, 9.0) + 0.05 * torch.randn(size, size, generator=gen)
    edge = _blob(size, 3.0, centre=(0.0, 19.0)) + 0.05 * torch.randn(
        size, size, generator=gen
    )
    noise = torch.randn(size, size, generator=gen)
    images = torch.stack([centred, edge, noise])
    feats, images64 = F.compute_features(
        images, pixel_size_angstrom=5.0, particle_diameter_angstrom=200.0
    )
    return _named(feats), feats, images64


def test_resample_to_4a_keeps_physical_size():
    img = _disc(64, 10.0)[None]
    out = F.resample_to_pixel_size(img, 2.0)
    assert out.shape == (1, 32, 32)
    out = F.resample_to_pixel_size(_disc(40, 6.0)[None], 6.0)
    assert out.shape == (1, 60, 60)
    # the disc keeps its physical radius: area (px at 4 Å) ≈ π (10·2/4)²
    small = F.resample_to_pixel_size(img, 2.0)[0]
    area = float((small > 0.5).sum())
    assert area == pytest.approx(math.pi * 5.0**2, rel=0.25)
    # a constant image stays constant
    const = F.resample_to_pixel_size(torch.full((1, 30, 30), 3.0), 3.0)
    assert torch.allclose(const, torch.full_like(const, 3.0), atol=1e-4)


def test_moments_match_formulas():
    values = np.array([1.0, 2.0, 2.0, 3.0, 10.0])
    mean, std, skew, kurt = F.moments(values)
    d = values - values.mean()
    assert mean == pytest.approx(3.6)
    assert std == pytest.approx(values.std())
    assert skew == pytest.approx((d**3).mean() / values.std() ** 3)
    assert kurt == pytest.approx((d**4).mean() / values.std() ** 4)
    assert F.moments(np.array([])) == (0.0, 0.0, 0.0, 0.0)


def test_protein_mask_finds_centred_disc_only():
    img = F.normalise_in_disc(_disc(40, 8.0).numpy().astype(np.float64), 15.0)
    protein, solvent, scattered = F.protein_solvent_masks(img, 15.0)
    assert scattered == 0
    assert abs(int(protein.sum()) - math.pi * 64) < 0.35 * math.pi * 64
    assert not (protein & solvent).any()
    off = F.normalise_in_disc(
        _disc(40, 3.0, centre=(0, 13)).numpy().astype(np.float64), 15.0
    )
    protein_off, _, _ = F.protein_solvent_masks(off, 15.0)
    assert int(protein_off.sum()) == 0


def test_feature_ordering_disc_edge_noise(three_kinds):
    named, feats, images64 = three_kinds
    centred, edge, noise = named
    assert feats.shape == (3, len(F.feature_names()))
    assert feats.dtype == np.float32
    assert images64.shape == (3, 64, 64)
    assert np.isfinite(feats).all()
    # protein: a compact centred object; nothing for the off-centre blob
    assert centred["protein_fraction"] > 0.15
    assert edge["protein_fraction"] < 0.05
    assert centred["protein_mean"] > centred["solvent_mean"] + 1.0
    # the centred particle's solvent is flat, noise's is not
    assert centred["solvent_std"] < noise["solvent_std"]
    # the edge blob puts its density far from the centre and on the ring
    assert edge["centre_offset"] > 0.6 > centred["centre_offset"]
    assert edge["ring_std"] > centred["ring_std"]
    # noise scatters
    assert noise["scattered_signal"] > centred["scattered_signal"]
    assert centred["edge_signal"] == 0.0
    # granulometry: a large disc survives openings with big discs, noise does not
    assert centred["granulo_6"] > noise["granulo_6"]


def test_cnn_window_normalised_and_centred():
    img = _disc(80, 10.0)[None]
    out = F.cnn_window(img, 2.0, 60.0)  # window 31 -> 32 px, resized to 64
    assert out.shape == (1, 64, 64)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-3)
    # the disc (radius 10 px of 32) fills ~ π (10/32)² of the window
    assert float(out[0, 32, 32]) > 1.0
    assert float(out[0, 2, 2]) < 0.0
    assert torch.equal(
        F.cnn_window(torch.zeros(1, 40, 40), 2.0, 60.0), torch.zeros(1, 64, 64)
    )


def test_model_features_missing_indicators():
    names = F.feature_names()
    k = 4
    bare = F.model_features(
        k, box_size=48, pixel_size_angstrom=4.0, relative_contrast=None
    )
    indicators = [
        i
        for i, n in enumerate(names[len(F.IMAGE_FEATURES) :])
        if n.endswith("_missing")
    ]
    assert (bare[:, indicators] == 1).all()
    assert (np.delete(bare, indicators, axis=1) == 0).all()
    full = F.model_features(
        k,
        box_size=48,
        pixel_size_angstrom=4.0,
        relative_contrast=np.array([1.0, 2.0, 0.5, 1.0]),
        class_distribution=np.array([0.4, 0.3, 0.2, 0.1]),
        n_particles=np.array([400, 300, 200, 100]),
        accuracy_rotation_deg=np.array([3.0, 999.0, 5.0, 2.0]),
        accuracy_translation_angst=np.array([4.0, 999.0, 6.0, 2.0]),
        resolution_angstrom=np.array([16.0, np.inf, 20.0, 8.0]),
    )
    cols = dict(zip(names[len(F.IMAGE_FEATURES) :], full.T, strict=True))
    np.testing.assert_array_equal(cols["accuracy_missing"], [0, 1, 0, 0])
    assert cols["log_accuracy_rotation"][1] == 0.0
    assert cols["nyquist_resolution"][1] == 0.0  # inf resolution
    assert cols["relative_resolution"][1] == 1.0
    assert cols["nyquist_resolution"][3] == pytest.approx(
        1.0
    )  # 8 Å at 4 Å/px = Nyquist
    assert cols["log_relative_distribution"][0] > cols["log_relative_distribution"][3]
    assert (cols["distribution_missing"] == 0).all()
    with pytest.raises(ValueError):
        F.model_features(
            k, box_size=48, pixel_size_angstrom=4.0, relative_contrast=None,
            class_distribution=np.ones(3),
        )  # fmt: skip


def test_group_columns_cover_model_features():
    groups = F.group_columns()
    cols = sorted(c for group in groups.values() for c in group)
    n_image = len(F.IMAGE_FEATURES)
    assert cols == list(range(n_image, len(F.feature_names())))
