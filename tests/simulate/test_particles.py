import numpy as np
import pytest
import torch

from cryoavg.cli.simulate import demo_map_path, prepare_volume
from cryoavg.errors import ConfigError
from cryoavg.io.particles import read_particles
from cryoavg.io.star import read_star
from cryoavg.ops.projection import project_volume_2d
from cryoavg.ops.shifts import shift_images_2d
from cryoavg.ops.transforms import rotate_images_2d
from cryoavg.simulate.particles import (
    JUNK_TYPES,
    SimulationParameters,
    particle_radius_px,
    simulate_particles,
)


@pytest.fixture(scope="module")
def demo_volume():
    volume, pixel = prepare_volume(demo_map_path(), 48, None, None)
    return volume, pixel


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(-2) - a.flatten(-2).mean(-1, keepdim=True)
    b = b.flatten(-2) - b.flatten(-2).mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_noise_free_particle_aligned_by_origin_and_psi_matches_clean_projection(
    demo_volume,
):
    volume, pixel = demo_volume
    params = SimulationParameters(
        n_particles=24,
        box_size=48,
        pixel_size_angstrom=pixel,
        junk_fraction=0.0,
        snr=None,
        apply_ctf=False,
        shift_sigma_px=2.0,
        seed=5,
    )
    sim = simulate_particles(volume, params)
    # relion-behaviour §0.3: shift by +origin, then rotate by +psi -> the (rot, tilt, 0) view
    aligned = rotate_images_2d(
        shift_images_2d(sim.images, sim.origin_px), sim.angles_degrees[:, 2]
    )
    angles0 = sim.angles_degrees.clone()
    angles0[:, 2] = 0.0
    clean = project_volume_2d(volume, angles0)
    corr = _ncc(aligned, clean)
    assert corr.min() > 0.99, corr
    # and the psi sign matters: rotating the other way does not match
    wrong = rotate_images_2d(
        shift_images_2d(sim.images, sim.origin_px), -sim.angles_degrees[:, 2]
    )
    psi = sim.angles_degrees[:, 2].abs()
    big_psi = (psi > 20) & (psi < 160)
    # (HSP60 is 7-fold symmetric and round, so the wrong sense still correlates somewhat)
    wrong_corr = _ncc(wrong, clean)[big_psi]
    assert wrong_corr.mean() < 0.9
    assert (wrong_corr < corr[big_psi] - 0.005).float().mean() > 0.9


def test_simulation_is_deterministic_and_seed_dependent(demo_volume):
    volume, pixel = demo_volume
    params = SimulationParameters(
        n_particles=30, box_size=48, pixel_size_angstrom=pixel, seed=7
    )
    a = simulate_particles(volume, params)
    b = simulate_particles(volume, params)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert a.junk_type == b.junk_type
    params.seed = 8
    c = simulate_particles(volume, params)
    assert not torch.equal(a.images, c.images)


def test_junk_fraction_types_and_normalisation(demo_volume):
    volume, pixel = demo_volume
    params = SimulationParameters(
        n_particles=200,
        box_size=48,
        pixel_size_angstrom=pixel,
        junk_fraction=0.25,
        seed=1,
    )
    sim = simulate_particles(volume, params)
    assert int(sim.is_junk.sum()) == 50
    counts = {kind: sim.junk_type.count(kind) for kind in JUNK_TYPES}
    assert counts == dict.fromkeys(JUNK_TYPES, 10)
    assert torch.isfinite(sim.images).all()
    # background normalised to mean 0, std 1 outside the particle circle
    coords = torch.arange(48) - 24
    outside = (coords[:, None] ** 2 + coords[None, :] ** 2) > sim.particle_radius_px**2
    background = sim.images[:, outside]
    assert background.mean(1).abs().max() < 1e-4
    assert (background.std(1) - 1).abs().max() < 1e-3
    # micrographs hold 10-50 particles (the last one may be smaller)
    sizes = torch.bincount(sim.micrograph_index)
    assert (sizes[:-1] >= 10).all()
    assert (sizes <= 50).all()


def test_snr_is_as_requested(demo_volume):
    volume, pixel = demo_volume
    params = SimulationParameters(
        n_particles=300,
        box_size=48,
        pixel_size_angstrom=pixel,
        junk_fraction=0.0,
        snr=0.5,
        seed=2,
    )
    clean = simulate_particles(
        volume, SimulationParameters(**{**params.__dict__, "snr": None})
    )
    noisy = simulate_particles(volume, params)
    coords = torch.arange(48) - 24
    inside = (
        coords[:, None] ** 2 + coords[None, :] ** 2
    ) <= clean.particle_radius_px**2
    signal_var = clean.images[:, inside].var(1).mean()
    assert noisy.noise_sigma**2 == pytest.approx(float(signal_var) / 0.5, rel=0.05)


def test_bad_parameters_raise_config_error(demo_volume):
    volume, pixel = demo_volume
    for bad in (
        {"n_particles": 0},
        {"junk_fraction": 1.5},
        {"snr": -1.0},
        {"defocus_min_um": 3.0, "defocus_max_um": 1.0},
        {"junk_types": ("lava",)},
    ):
        params = SimulationParameters(box_size=48, pixel_size_angstrom=pixel, **bad)
        with pytest.raises(ConfigError):
            simulate_particles(volume, params)


def test_particle_radius_of_a_ball():
    coords = torch.arange(40, dtype=torch.float32) - 20
    r = torch.sqrt(
        coords[:, None, None] ** 2
        + coords[None, :, None] ** 2
        + coords[None, None, :] ** 2
    )
    ball = (r <= 8).float()
    assert particle_radius_px(ball) == pytest.approx(8.0, abs=0.6)


def test_written_star_reads_back_identical(tiny_simulation):
    table = read_particles(
        tiny_simulation / "particles.star", project_dir=tiny_simulation.parents[1]
    )
    truth = read_star(tiny_simulation / "ground_truth.star")["particles"]
    assert table.n_particles == 120 == len(truth)
    assert table.optics is not None
    np.testing.assert_allclose(table.pixel_size_angstrom, 15.68)
    parts = table.particles
    assert list(parts["rlnImageName"]) == list(truth["rlnImageName"])
    assert parts["rlnOpticsGroup"].dtype.kind == "i"
    assert set(truth["rlnJunkType"]) <= {*JUNK_TYPES, "none"}
    assert int(truth["rlnIsJunk"].sum()) == 24
    text = (tiny_simulation / "particles.star").read_text()
    assert text.startswith("\n# version 50001\n\ndata_optics\n")
    assert "data_particles" in text
    assert "loop_" in text


def test_simulated_star_values_read_back_identical(demo_volume, tmp_path):
    """Every value written for a simulation reads back as written (to STAR precision)."""
    from cryoavg.simulate.writer import write_simulation

    volume, pixel = demo_volume
    params = SimulationParameters(
        n_particles=60,
        box_size=48,
        pixel_size_angstrom=pixel,
        junk_fraction=0.2,
        seed=11,
    )
    sim = simulate_particles(volume, params)
    write_simulation(tmp_path, sim, params, project_dir=tmp_path)
    table = read_particles(tmp_path / "particles.star", project_dir=tmp_path)
    ctf = table.ctf_parameters()
    np.testing.assert_allclose(
        ctf["defocus_u_angstrom"], sim.defocus_u_angstrom, atol=0.006
    )
    np.testing.assert_allclose(
        ctf["defocus_v_angstrom"], sim.defocus_v_angstrom, atol=0.006
    )
    np.testing.assert_allclose(
        ctf["defocus_angle_degrees"], sim.defocus_angle_degrees, atol=6e-4
    )
    np.testing.assert_allclose(ctf["voltage_kv"], 300.0)
    np.testing.assert_allclose(ctf["cs_mm"], 2.7)
    np.testing.assert_allclose(ctf["amplitude_contrast"], 0.1)
    truth = read_star(tmp_path / "ground_truth.star")["particles"]
    np.testing.assert_allclose(
        truth["rlnAngleRot"], sim.angles_degrees[:, 0], atol=6e-5
    )
    np.testing.assert_allclose(
        truth["rlnAngleTilt"], sim.angles_degrees[:, 1], atol=6e-5
    )
    np.testing.assert_allclose(
        truth["rlnAnglePsi"], sim.angles_degrees[:, 2], atol=6e-5
    )
    np.testing.assert_allclose(
        truth["rlnOriginXAngst"], sim.origin_px[:, 1] * pixel, atol=6e-5
    )
    np.testing.assert_allclose(
        truth["rlnOriginYAngst"], sim.origin_px[:, 0] * pixel, atol=6e-5
    )
    assert list(truth["rlnJunkType"]) == sim.junk_type
    np.testing.assert_array_equal(truth["rlnIsJunk"], sim.is_junk.numpy().astype(int))
    # and the images read through the particle table equal the simulated ones
    from cryoavg.io.stack import ImageSource

    images = ImageSource.from_table(table)[np.arange(60)]
    np.testing.assert_array_equal(images, sim.images.numpy())
