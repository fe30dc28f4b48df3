"""``cryoavg refine3d`` end to end: RELION files, continuation, local symmetry, bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoavg.cli.refine3d import run_refine3d
from cryoavg.errors import ConfigError, InputError
from cryoavg.io.mrc import read_map_3d, write_mrc
from cryoavg.io.particles import read_particles
from cryoavg.io.star import read_star, write_star
from cryoavg.localsym.io import write_operator_star
from cryoavg.localsym.operators import LocalSymmetryOperator, MaskOperators
from cryoavg.simulate.particles import SimulationParameters, simulate_particles
from cryoavg.simulate.writer import write_simulation
from tests.conftest import compose_job
from tests.recon._synthetic3d import blob_map

BOX = 32
PIXEL = 8.0
FAST = [
    "iterations=2",
    "angular_step=30",
    "offset_range=2",
    "initial_lowpass=50",
    "particle_diameter=220",
    "logger=none",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refine3d")
    volume = blob_map(BOX, sigma_px=1.5, seed=2)
    params = SimulationParameters(
        n_particles=120,
        box_size=BOX,
        pixel_size_angstrom=PIXEL,
        junk_fraction=0.0,
        snr=1.0,
        shift_sigma_px=1.0,
        seed=4,
    )
    write_simulation(
        root / "Simulate", simulate_particles(volume, params), params, project_dir=root
    )
    write_mrc(root / "ref.mrc", volume.numpy(), PIXEL)
    write_mrc(root / "ref_wrong_box.mrc", volume[:30, :30, :30].numpy(), PIXEL)
    write_mrc(root / "ref_wrong_pixel.mrc", volume.numpy(), 2 * PIXEL)
    axis = np.arange(BOX) - BOX // 2
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    mask = (((xx + 6) ** 2 + yy**2 + zz**2) <= 25).astype(np.float32)  # ball at x=-6
    write_mrc(root / "mask.mrc", mask, PIXEL)
    write_mrc(root / "mask_other_pixel.mrc", mask, 2 * PIXEL)
    op = LocalSymmetryOperator(0.0, 0.0, 180.0, (0.0, 0.0, 0.0))
    write_operator_star(
        root / "ops.star", [MaskOperators(str(root / "mask.mrc"), [op])]
    )
    write_operator_star(
        root / "ops_other_pixel.star",
        [MaskOperators(str(root / "mask_other_pixel.mrc"), [op])],
    )
    # operators written for a 4x larger pixel size: translations move the mask out
    far = LocalSymmetryOperator(0.0, 0.0, 180.0, (20 * PIXEL, 0.0, 0.0))
    write_operator_star(
        root / "ops_far.star", [MaskOperators(str(root / "mask.mrc"), [far])]
    )
    return root


def mask_values(project: Path) -> np.ndarray:
    return read_map_3d(project / "mask.mrc")[0]


def _cfg(project: Path, output: str, *overrides: str):
    return compose_job(
        "refine3d",
        [
            f"particles={project / 'Simulate' / 'particles.star'}",
            f"reference={project / 'ref.mrc'}",
            f"output={project / output}",
            f"project_dir={project}",
            *FAST,
            *overrides,
        ],
    )


def test_issue_keys_exist():
    cfg = compose_job("refine3d")
    for key in (
        "particles",
        "reference",
        "output",
        "local_symmetry",
        "tau2_fudge",
        "particle_diameter",
        "continue_from",
    ):
        assert key in cfg


@pytest.mark.slow
def test_refine3d_writes_relion_files_and_continues(project):
    result = run_refine3d(
        _cfg(
            project,
            "Refine3D/job020",
            f"local_symmetry={project / 'ops.star'}",
            # a binary mask: exact symmetry is checked below, i.e. RELION's trilinear
            # on the map grid (the 2x Fourier round trip rings at hard mask edges)
            "local_symmetry_oversampling=1",
            "tau2_fudge=2",
        )
    )
    job = result["job_dir"]
    for name in (
        "run_it001_half1_class001.mrc",
        "run_it001_half2_class001.mrc",
        "run_it001_model.star",
        "run_it001_data.star",
        "run_it001_optimiser.star",
        "run_it002_half1_class001.mrc",
        "run_half1_class001_unfil.mrc",
        "run_half2_class001_unfil.mrc",
        "run_class001.mrc",
        "run_model.star",
        "run_data.star",
        "config.yaml",
        "note.txt",
    ):
        assert (job / name).is_file(), name
    model = read_star(job / "run_model.star")
    general = model["model_general"]
    assert float(general["rlnCurrentResolution"]) == pytest.approx(
        result["resolution_angstrom"], rel=1e-4
    )
    assert float(general["rlnTau2FudgeFactor"]) == 2.0
    fsc = model["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    assert fsc.shape == (BOX // 2 + 1,)
    assert fsc[1] > 0.9
    data = read_particles(job / "run_data.star", project_dir=project)
    frame = data.particles
    for label in (
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnRandomSubset",
        "rlnMaxValueProbDistribution",
    ):
        assert label in frame
    assert set(frame["rlnRandomSubset"]) == {1, 2}
    volume, pixel = read_map_3d(job / "run_class001.mrc")
    assert volume.shape == (BOX,) * 3
    assert pixel == pytest.approx(PIXEL)
    # intermediate half-references carry the local symmetry (180° about z: the ball at
    # x = -6 is copied onto x = +6)
    half, _ = read_map_3d(job / "run_it001_half1_class001.mrc")
    half = torch.from_numpy(half)
    turned = torch.roll(torch.flip(half, (1, 2)), (1, 1), (1, 2))  # half(-x, -y, z)
    inside = torch.from_numpy(mask_values(project)) > 0.999
    difference = (half - turned)[inside].abs().max()
    assert float(difference) < 1e-3 * float(half.abs().max())
    optimiser = read_star(job / "run_it001_optimiser.star")["optimiser_general"]
    assert str(optimiser["rlnLocalSymmetryFile"]).endswith("ops.star")
    # continue one more iteration into the same directory
    cont = compose_job(
        "refine3d",
        [
            f"continue_from={job / 'run_it002_optimiser.star'}",
            "iterations=3",
            "logger=tensorboard",
            f"project_dir={project}",
        ],
    )
    again = run_refine3d(cont)
    assert again["state"].iteration == 3
    assert (job / "run_it003_model.star").is_file()
    assert any((job / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reference={root}/ref_wrong_box.mrc", "box"),
        ("reference={root}/ref_wrong_pixel.mrc", "pixel size"),
        ("local_symmetry={root}/ops_other_pixel.star", "pixel size"),
        ("local_symmetry={root}/ops_far.star", "out of"),
        ("reference={root}/missing.mrc", "missing.mrc"),
    ],
)
def test_bad_input_leaves_nothing(project, override, message):
    output = f"Refine3D/bad_{abs(hash(override)) % 1000}"
    cfg = _cfg(project, output, override.format(root=project))
    with pytest.raises(InputError, match=message):
        run_refine3d(cfg)
    assert not (project / output).exists()


def test_empty_half_is_an_error(project):
    star = read_star(project / "Simulate" / "particles.star")
    particles = star["particles"].copy()
    particles["rlnRandomSubset"] = 1
    path = project / "one_half.star"
    write_star(path, {"optics": star["optics"], "particles": particles})
    cfg = _cfg(project, "Refine3D/one_half", f"particles={path}")
    with pytest.raises(InputError, match="half set 2"):
        run_refine3d(cfg)
    assert not (project / "Refine3D" / "one_half").exists()


def test_bad_config_value(project):
    with pytest.raises(ConfigError):
        run_refine3d(_cfg(project, "Refine3D/badcfg", "algorithm=sgd"))


@pytest.mark.slow
def test_command_line_one_error_line(project, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "cryoavg.cli.main",
        "refine3d",
        f"particles={project / 'Simulate' / 'particles.star'}",
        f"reference={project / 'ref_wrong_box.mrc'}",
        f"output={tmp_path / 'Refine3D' / 'job001'}",
        f"project_dir={project}",
        "logger=none",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error:")
    assert not (tmp_path / "Refine3D" / "job001").exists()
