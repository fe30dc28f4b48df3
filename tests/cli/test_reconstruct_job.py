import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryoavg.io.star import read_star, write_star
from cryoavg.ops.masks import spherical_mask_3d
from cryoavg.simulate.particles import SimulationParameters, simulate_particles
from cryoavg.simulate.writer import write_simulation

BOX = 32
PIXEL = 7.84
POSE_LABELS = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recon_project")
    volume = torch.zeros((BOX,) * 3)
    volume[10:22, 12:20, 14:18] = 1.0
    volume[8:12, 16:24, 10:14] = 0.5
    params = SimulationParameters(
        n_particles=160,
        box_size=BOX,
        pixel_size_angstrom=PIXEL,
        junk_fraction=0.0,
        snr=None,
        seed=5,
    )
    result = simulate_particles(volume, params)
    sim = root / "Sim"
    sim.mkdir()
    write_simulation(sim, result, params, project_dir=root)
    particles = read_star(sim / "particles.star")
    truth = read_star(sim / "ground_truth.star")["particles"]
    table = particles["particles"].copy()
    for label in POSE_LABELS:
        table[label] = truth[label].to_numpy()
    write_star(root / "posed.star", {"optics": particles["optics"], "particles": table})
    return root


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cryoavg.cli.main", "reconstruct", *args],
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
    for fragment in fragments:
        assert fragment in lines[0]


def _rewrite(project: Path, name: str, change) -> str:
    blocks = read_star(project / "posed.star")
    optics, particles = blocks["optics"].copy(), blocks["particles"].copy()
    change(optics, particles)
    write_star(project / name, {"optics": optics, "particles": particles})
    return name


def _write_map(path: Path, data: np.ndarray, pixel: float) -> None:
    with mrcfile.new(path, overwrite=True) as handle:
        handle.set_data(data.astype(np.float32))
        handle.voxel_size = pixel


def _operators(project: Path, name: str, mask_name: str) -> str:
    table = pd.DataFrame(
        {
            "rlnMaskName": [mask_name],
            "rlnAngleRot": [0.0],
            "rlnAngleTilt": [0.0],
            "rlnAnglePsi": [180.0],
            "rlnOriginXAngst": [0.0],
            "rlnOriginYAngst": [0.0],
            "rlnOriginZAngst": [0.0],
        }
    )
    write_star(project / name, {"": table})
    return name


@pytest.mark.slow  # two CLI runs (~10-20 s each on a loaded 2-core machine)
def test_end_to_end(project):
    out = _cli(
        "particles=posed.star", "output=Rec/job001", "mask_diameter=200", cwd=project
    )
    assert out.returncode == 0, out.stderr
    job = project / "Rec" / "job001"
    names = (
        "run_half1_class001_unfil.mrc",
        "run_half2_class001_unfil.mrc",
        "run_class001.mrc",
        "run_fsc.star",
        "run_data.star",
        "note.txt",
    )
    for name in names:
        assert (job / name).is_file(), name
    half1 = mrcfile.read(job / names[0])
    half2 = mrcfile.read(job / names[1])
    assert half1.shape == (BOX,) * 3
    assert mrcfile.open(job / names[2]).voxel_size.x == pytest.approx(PIXEL)
    blocks = read_star(job / "run_fsc.star")
    fsc = blocks["fsc"]
    assert list(fsc.columns[:4]) == [
        "rlnSpectralIndex",
        "rlnResolution",
        "rlnAngstromResolution",
        "rlnFourierShellCorrelation",
    ]
    assert len(fsc) == BOX // 2 + 1
    assert float(fsc["rlnFourierShellCorrelation"].iloc[1:10].min()) > 0.9
    resolution = float(blocks["general"]["rlnFinalResolution"])
    assert 2 * PIXEL <= resolution < 4 * PIXEL
    data = read_star(job / "run_data.star")["particles"]
    assert set(data["rlnRandomSubset"]) == {1, 2}
    np.testing.assert_allclose(
        float(np.corrcoef(half1.ravel(), half2.ravel())[0, 1]), 1.0, atol=0.05
    )

    # local symmetry (a 2-fold about z over the whole box) makes the map symmetric
    mask = spherical_mask_3d((BOX,) * 3, BOX / 2 - 3, 2).numpy()
    _write_map(project / "mask.mrc", mask, PIXEL)
    ops = _operators(project, "ops.star", "mask.mrc")
    out = _cli(
        "particles=posed.star",
        "output=Rec/job002",
        f"local_symmetry={ops}",
        cwd=project,
    )
    assert out.returncode == 0, out.stderr
    symmetric = mrcfile.read(project / "Rec" / "job002" / "run_class001.mrc")
    rotated = np.roll(np.flip(symmetric, axis=(1, 2)), shift=(1, 1), axis=(1, 2))
    inner = mask > 0.99
    np.testing.assert_allclose(
        symmetric[inner], rotated[inner], atol=1e-3 * np.abs(symmetric).max()
    )


def test_missing_pose_columns(project):
    out = _cli("particles=Sim/particles.star", "output=Bad/job001", cwd=project)
    _assert_one_line_error(out, "rlnAngleRot")
    assert not (project / "Bad").exists()


def test_box_differs_from_optics_image_size(project):
    name = _rewrite(
        project, "wrong_box.star", lambda o, p: o.__setitem__("rlnImageSize", [40])
    )
    out = _cli(f"particles={name}", "output=Bad/job002", cwd=project)
    _assert_one_line_error(out, "rlnImageSize")
    assert not (project / "Bad").exists()


def test_empty_half(project):
    name = _rewrite(
        project,
        "one_half.star",
        lambda o, p: p.__setitem__("rlnRandomSubset", np.ones(len(p), dtype=np.int64)),
    )
    out = _cli(f"particles={name}", "output=Bad/job003", cwd=project)
    _assert_one_line_error(out, "no particles in half 2")
    assert not (project / "Bad").exists()


@pytest.mark.slow
def test_operators_of_another_pixel_size(project):
    mask = spherical_mask_3d((BOX,) * 3, 8, 2).numpy()
    _write_map(project / "mask_px.mrc", mask, 2 * PIXEL)
    ops = _operators(project, "ops_px.star", "mask_px.mrc")
    out = _cli(
        "particles=posed.star",
        "output=Bad/job004",
        f"local_symmetry={ops}",
        cwd=project,
    )
    _assert_one_line_error(out, "mask_px.mrc", "pixel size")
    assert not (project / "Bad").exists()
    # a pixel size recorded in the operator file itself is checked too
    table = read_star(project / "ops_px.star")[""].copy()
    table["rlnImagePixelSize"] = 2 * PIXEL
    write_star(project / "ops_px2.star", {"": table})
    out = _cli(
        "particles=posed.star",
        "output=Bad/job005",
        "local_symmetry=ops_px2.star",
        cwd=project,
    )
    _assert_one_line_error(out, "ops_px2.star", "pixel size")
    assert not (project / "Bad").exists()
