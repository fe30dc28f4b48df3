"""Writing a Class2D iteration in RELION's layout and reading it back (spec §B)."""

import math
import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryoavg.class2d.continuation import (
    read_iteration,
    restore_state,
    state_from_continuation,
)
from cryoavg.class2d.export import (
    IterationChanges,
    SamplingInfo,
    decode_moment_sections,
    encode_moment_sections,
    iteration_paths,
    overall_fourier_completeness,
    relion_command_line,
    write_iteration,
)
from cryoavg.class2d.settings import Class2DSettings
from cryoavg.class2d.state import Class2DState
from cryoavg.errors import InputError
from cryoavg.io.mrc import write_mrc
from cryoavg.io.star import read_star

K, BOX, N_PARTICLES, PIXEL = 3, 32, 32, 2.5
N_OPTICS, N_GROUPS = 2, 4
ROOT = "Class2D/job013/run"

MODEL_GENERAL = [
    "rlnReferenceDimensionality",
    "rlnDataDimensionality",
    "rlnOriginalImageSize",
    "rlnCurrentResolution",
    "rlnCurrentImageSize",
    "rlnPaddingFactor",
    "rlnIsHelix",
    "rlnFourierSpaceInterpolator",
    "rlnMinRadiusNnInterpolation",
    "rlnPixelSize",
    "rlnNrClasses",
    "rlnNrBodies",
    "rlnNrGroups",
    "rlnNrOpticsGroups",
    "rlnTau2FudgeFactor",
    "rlnNormCorrectionAverage",
    "rlnSigmaOffsetsAngst",
    "rlnOrientationalPriorMode",
    "rlnSigmaPriorRotAngle",
    "rlnSigmaPriorTiltAngle",
    "rlnSigmaPriorPsiAngle",
    "rlnLogLikelihood",
    "rlnAveragePmax",
]
MODEL_CLASSES = [
    "rlnReferenceImage",
    "rlnGradMoment1",
    "rlnGradMoment2",
    "rlnClassDistribution",
    "rlnAccuracyRotations",
    "rlnAccuracyTranslationsAngst",
    "rlnEstimatedResolution",
    "rlnOverallFourierCompleteness",
    "rlnClassPriorOffsetX",
    "rlnClassPriorOffsetY",
]
MODEL_CLASS_N = [
    "rlnSpectralIndex",
    "rlnResolution",
    "rlnAngstromResolution",
    "rlnSsnrMap",
    "rlnGoldStandardFsc",
    "rlnFourierCompleteness",
    "rlnReferenceSigma2",
    "rlnReferenceTau2",
]
SAMPLING_GENERAL = [
    "rlnIs3DSampling",
    "rlnIs3DTranslationalSampling",
    "rlnPsiStep",
    "rlnOffsetRange",
    "rlnOffsetStep",
    "rlnHelicalOffsetStep",
    "rlnSamplingPerturbInstance",
    "rlnSamplingPerturbFactor",
    "rlnHealpixOrderOriginal",
    "rlnPsiStepOriginal",
    "rlnOffsetRangeOriginal",
    "rlnOffsetStepOriginal",
]
ADDED = [
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnClassNumber",
    "rlnNormCorrection",
    "rlnLogLikeliContribution",
    "rlnMaxValueProbDistribution",
    "rlnNrOfSignificantSamples",
    "rlnGroupNumber",
]


def make_settings(**overrides) -> Class2DSettings:
    values = {
        "n_classes": K,
        "tau2_fudge": 1.5,
        "n_iterations": 40,
        "algorithm": "vdam",
        "particle_diameter_angstrom": 70.0,
        "zero_mask": False,
        "flatten_solvent": True,
        "highres_limit_angstrom": 8.0,
        "center_classes": False,
        "psi_step_degrees": 5.0,
        "offset_range_px": 4.0,
        "offset_step_px": 0.5,
        "do_ctf": False,
        "ctf_intact_first_peak": True,
        "do_norm": False,
        "do_scale": True,
        "class_inactivity_threshold": 0.2,
        "seed": 1234,
        "write_every": 5,
        "mask_edge_px": 4.0,
        "offset_prior_sigma_angstrom": 7.5,
        "adaptive_fraction": 0.99,
        "grad_ini_frac": 0.25,
        "grad_fin_frac": 0.15,
        "grad_stepsize": 0.4,
        "mu": 0.8,
        "grad_ini_subset": 300,
        "grad_fin_subset": 1500,
        "preread_images": True,
    }
    values.update(overrides)
    return Class2DSettings(**values)


def make_state(seed: int = 0) -> Class2DState:
    g = torch.Generator().manual_seed(seed)
    f = BOX // 2 + 1
    state = Class2DState(K, BOX, N_OPTICS, N_GROUPS, sigma2_offset_angstrom2=37.3)
    with torch.no_grad():
        state.class_images.copy_(torch.randn(K, BOX, BOX, generator=g))
        noise = torch.rand(N_OPTICS, f, generator=g) * 1e-2 + 1e-4
        noise[1, 0] = 0.0  # a shell that is never written
        state.sigma2_noise.copy_(noise)
        state.scale.copy_(0.5 + torch.rand(N_GROUPS, generator=g))
        ssnr = 50.0 * torch.exp(-torch.arange(f) / 4.0).repeat(K, 1)
        ssnr[2] = 0.0  # an empty class
        state.ssnr.copy_(ssnr)
        state.tau2.copy_(torch.rand(K, f, generator=g) * 1e-3)
        state.fourier_completeness.copy_(torch.rand(K, f, generator=g))
        state.sigma2_class.copy_(torch.rand(K, f, generator=g))
        state.class_prior.copy_(torch.tensor([0.5, 0.3, 0.2]))
        state.class_offset_prior_angstrom.copy_(
            torch.tensor([[1.25, -0.5], [0.0, 2.0], [-3.5, 0.75]])  # (y, x)
        )
        state.avg_norm.fill_(0.87)
        state.scale_group_particle_count.fill_(8.0)
        state.moment1.copy_(
            torch.randn(2, K, 2 * BOX, BOX + 1, dtype=torch.complex64, generator=g)
        )
        state.moment2.copy_(torch.rand(K, 2 * BOX, BOX + 1, generator=g) + 0.5)
        state.current_size.fill_(24)
        state.current_resolution_shell.fill_(7)
        state.step_size.fill_(0.45)
        state.tau2_fudge.fill_(1.25)
        state.log_likelihood.fill_(-12345.625)
        state.average_pmax.fill_(0.25)
    return state


def make_particles(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Input tables as read, then the iteration's columns added by the caller."""
    rng = np.random.default_rng(seed)
    n = N_PARTICLES
    particles = pd.DataFrame(
        {
            "rlnCoordinateX": rng.uniform(0, 4000, n),
            "rlnCoordinateY": rng.uniform(0, 4000, n),
            "rlnImageName": [
                f"{i % 8 + 1:06d}@Extract/job007/mic{i // 8}.mrcs" for i in range(n)
            ],
            "rlnMicrographName": [
                f"MotionCorr/job002/mic{i // 8}.mrc" for i in range(n)
            ],
            "rlnAnglePsi": rng.uniform(-180, 180, n),  # input already has psi
            "rlnOpticsGroup": np.arange(n, dtype=np.int64) % N_OPTICS + 1,
            "rlnDefocusU": rng.uniform(1e4, 2e4, n),
        }
    )
    input_columns = list(particles.columns)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnOpticsGroup": [1, 2],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.1],
            "rlnImagePixelSize": [PIXEL, PIXEL],
            "rlnImageSize": [BOX, BOX],
            "rlnImageDimensionality": [2, 2],
        }
    )
    updated = particles.copy()
    updated["rlnClassNumber"] = rng.integers(1, K + 1, n)
    updated["rlnOriginXAngst"] = rng.normal(0, 3, n)
    updated["rlnOriginYAngst"] = rng.normal(0, 3, n)
    updated["rlnNormCorrection"] = rng.uniform(0.8, 1.2, n)
    updated["rlnAnglePsi"] = rng.uniform(-180, 180, n)
    updated["rlnLogLikeliContribution"] = rng.normal(1e4, 10, n)
    updated["rlnMaxValueProbDistribution"] = rng.uniform(0, 1, n)
    updated["rlnNrOfSignificantSamples"] = rng.integers(1, 50, n)
    updated["rlnGroupNumber"] = np.arange(n) // 8 + 1
    return updated, optics, input_columns


def write(iteration: int = 10, settings: Class2DSettings | None = None, **kwargs):
    settings = settings or make_settings()
    particles, optics, input_columns = make_particles()
    arguments = {
        "state": make_state(),
        "particles": particles,
        "optics": optics,
        "group_names": [f"mic{i}.mrc" for i in range(N_GROUPS)],
        "group_particle_counts": [8, 8, 8, 8],
        "settings": settings,
        "sampling": SamplingInfo.from_settings(settings, perturbation=0.125),
        "command_line": relion_command_line(
            settings, output_root=ROOT, input_star="Select/job012/particles.star"
        ),
        "pixel_size_angstrom": PIXEL,
        "n_particles_total": N_PARTICLES,
        "accuracy_rotations_degrees": [2.5, 3.0, 999.0],
        "accuracy_translations_angstrom": [1.5, 1.0, 999.0],
        "changes": IterationChanges(12.0, 3.5, 0.25, 12.0, 3.5, 1),
        "input_columns": input_columns,
    }
    arguments.update(kwargs)
    return write_iteration(ROOT, iteration, **arguments), arguments


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "Class2D" / "job013").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_round_trip(project):
    paths, args = write()
    state = args["state"]
    cont = read_iteration(paths.optimiser)

    assert cont.iteration == 10
    assert cont.output_root == ROOT
    assert cont.settings == args["settings"]
    assert cont.step_size == pytest.approx(0.45)
    assert cont.subset_size == -1  # 300 > 32 particles: all of them
    assert cont.sampling.perturbation == pytest.approx(0.125)
    assert cont.changes.classes == pytest.approx(0.25)

    model = cont.model
    np.testing.assert_array_equal(model.class_images, state.class_images.numpy())
    close = {"rtol": 1e-5, "atol": 1e-6}
    for name in ("ssnr", "tau2", "fourier_completeness", "sigma2_class"):
        np.testing.assert_allclose(
            getattr(model, name), getattr(state, name).double().numpy(), **close
        )
    np.testing.assert_allclose(model.sigma2_noise, state.sigma2_noise.numpy(), **close)
    np.testing.assert_allclose(model.class_prior, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(
        model.class_offset_prior_angstrom, state.class_offset_prior_angstrom.numpy()
    )
    assert model.sigma2_offset_angstrom2 == pytest.approx(37.3, rel=1e-6)
    assert model.group_names == [f"mic{i}.mrc" for i in range(N_GROUPS)]
    np.testing.assert_allclose(model.scale, state.scale.numpy(), **close)
    np.testing.assert_array_equal(model.moment1, state.moment1.numpy())
    np.testing.assert_array_equal(model.moment2, state.moment2.numpy())
    assert model.current_resolution_shell == 7
    np.testing.assert_allclose(model.accuracy_rotations_degrees, [2.5, 3.0, 999.0])
    assert math.isinf(model.estimated_resolution_angstrom[2])

    restored = state_from_continuation(cont)
    state.accuracy_rotations_degrees.copy_(torch.tensor([2.5, 3.0, 999.0]))
    state.accuracy_translations_angstrom.copy_(torch.tensor([1.5, 1.0, 999.0]))
    for name, tensor in state.state_dict().items():
        if name == "class_age":
            continue
        np.testing.assert_allclose(
            restored.state_dict()[name].numpy(), tensor.numpy(), err_msg=name, **close
        )


def test_restore_into_mismatching_state_names_model(project):
    paths, _ = write()
    cont = read_iteration(paths.optimiser)
    with pytest.raises(InputError, match=r"run_it010_model\.star"):
        restore_state(Class2DState(K + 1, BOX, N_OPTICS, N_GROUPS), cont)


def test_blocks_and_label_order(project):
    paths, _ = write()
    model = read_star(paths.model)
    assert list(model) == [
        "model_general",
        "model_classes",
        "model_class_1",
        "model_class_2",
        "model_class_3",
        "model_groups",
        "model_optics_group_1",
        "model_optics_group_2",
    ]
    assert list(model["model_general"]) == MODEL_GENERAL
    assert list(model["model_classes"].columns) == MODEL_CLASSES
    assert list(model["model_class_1"].columns) == MODEL_CLASS_N
    assert list(model["model_groups"].columns) == [
        "rlnGroupNumber",
        "rlnGroupName",
        "rlnGroupNrParticles",
        "rlnGroupScaleCorrection",
    ]
    optics_noise = model["model_optics_group_2"]
    assert list(optics_noise.columns) == [
        "rlnSpectralIndex",
        "rlnResolution",
        "rlnSigma2Noise",
    ]
    assert optics_noise["rlnSpectralIndex"].tolist() == list(range(1, BOX // 2 + 1))

    general = model["model_general"]
    assert general["rlnCurrentResolution"] == pytest.approx(BOX * PIXEL / 7, rel=1e-6)
    assert general["rlnTau2FudgeFactor"] == pytest.approx(1.25)
    assert general["rlnSigmaOffsetsAngst"] == pytest.approx(math.sqrt(37.3), rel=1e-6)
    assert general["rlnPaddingFactor"] == 2
    classes = model["model_classes"]
    np.testing.assert_allclose(classes["rlnClassPriorOffsetX"], [-0.5, 2.0, 0.75])
    np.testing.assert_allclose(classes["rlnClassPriorOffsetY"], [1.25, 0.0, -3.5])

    optimiser = read_star(paths.optimiser)
    assert list(optimiser) == ["optimiser_general"]
    labels = list(optimiser["optimiser_general"])
    assert labels[0] == "rlnOutputRootName"
    assert labels[-1] == "rlnOffsetRangeZ"
    assert len(labels) == 102
    assert labels.index("rlnDoGradientRefine") == 31
    values = optimiser["optimiser_general"]
    assert values["rlnModelStarFile"] == f"{ROOT}_it010_model.star"
    assert values["rlnDoGradientRefine"] == 1
    assert values["rlnRandomSeed"] == 1234
    assert values["rlnTau2FudgeArg"] == pytest.approx(1.5)
    assert values["rlnSgdStepsize"] == pytest.approx(0.4)

    sampling = read_star(paths.sampling)
    assert list(sampling) == ["sampling_general"]
    assert list(sampling["sampling_general"]) == SAMPLING_GENERAL
    assert sampling["sampling_general"]["rlnPsiStep"] == pytest.approx(10.0)
    assert sampling["sampling_general"]["rlnOffsetStep"] == pytest.approx(2.5)


def test_optimiser_header_lines(project):
    paths, args = write()
    with open(paths.optimiser) as handle:
        first, second, third = (handle.readline() for _ in range(3))
    assert first.startswith("# RELION optimiser; version cryoavg-")
    assert second == "# " + " ".join(args["command_line"]) + " \n"
    assert second.startswith("# --o Class2D/job013/run --grad ")
    assert third == "\n"
    cont = read_iteration(paths.optimiser)
    assert cont.relion_version.startswith("cryoavg-")
    assert cont.command_line == " ".join(args["command_line"]) + " "


def test_reference_image_names(project):
    paths, _ = write()
    classes = read_star(paths.model)["model_classes"]
    assert classes["rlnReferenceImage"].tolist() == [
        f"00000{i}@Class2D/job013/run_it010_classes.mrcs" for i in (1, 2, 3)
    ]
    assert (
        classes["rlnGradMoment1"].iloc[2]
        == "000003@Class2D/job013/run_it010_1moment.mrcs"
    )
    assert (
        classes["rlnGradMoment2"].iloc[0]
        == "000001@Class2D/job013/run_it010_2moment.mrcs"
    )
    with mrcfile.open(paths.classes) as mrc:
        assert mrc.data.shape == (K, BOX, BOX)
        assert mrc.voxel_size.x == pytest.approx(PIXEL)
    with mrcfile.open(paths.moment1) as mrc:
        assert mrc.data.shape == (2 * K, 2 * BOX, 2 * (BOX + 1))


def test_data_star_keeps_input_columns_and_adds_new_ones(project):
    paths, args = write()
    blocks = read_star(paths.data)
    assert list(blocks) == ["optics", "particles"]
    pd.testing.assert_frame_equal(blocks["optics"], args["optics"], check_dtype=False)
    particles = blocks["particles"]
    input_columns = [
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnImageName",
        "rlnMicrographName",
        "rlnAnglePsi",
        "rlnOpticsGroup",
        "rlnDefocusU",
    ]
    added = [c for c in ADDED if c != "rlnAnglePsi"]
    assert list(particles.columns) == input_columns + added
    expected = args["particles"]
    np.testing.assert_array_equal(
        particles["rlnClassNumber"], expected["rlnClassNumber"]
    )
    assert particles["rlnClassNumber"].dtype == np.int64
    np.testing.assert_allclose(
        particles["rlnAnglePsi"], expected["rlnAnglePsi"], atol=1e-5
    )
    assert (particles["rlnAngleRot"] == 0).all()

    # without input_columns: table order for input columns, then the added ones
    paths, _ = write(iteration=11, input_columns=None)
    columns = list(read_star(paths.data)["particles"].columns)
    assert columns == [c for c in input_columns if c != "rlnAnglePsi"] + ADDED


def test_relion30_input_gets_an_optics_block(project):
    particles, _, _ = make_particles()
    particles = particles.drop(columns=["rlnOpticsGroup", "rlnGroupNumber"])
    particles.insert(3, "rlnOriginX", 0.0)
    particles.insert(4, "rlnOriginY", 0.0)
    particles["rlnVoltage"] = 300.0
    particles["rlnSphericalAberration"] = 2.7
    particles["rlnAmplitudeContrast"] = 0.1
    particles["rlnDetectorPixelSize"] = 5.0
    particles["rlnMagnification"] = 20000.0  # 2.5 Å
    paths, _ = write(particles=particles, optics=None, input_columns=None)
    blocks = read_star(paths.data)
    optics = blocks["optics"]
    assert optics["rlnOpticsGroup"].tolist() == [1]
    assert optics["rlnImagePixelSize"].tolist() == [pytest.approx(PIXEL)]
    assert optics["rlnImageSize"].tolist() == [BOX]
    columns = list(blocks["particles"].columns)
    assert "rlnOpticsGroup" in columns
    assert "rlnOriginX" not in columns
    assert "rlnVoltage" not in columns
    assert columns[-len(ADDED) :] == ADDED
    # group numbers assigned as RELION does: one group per micrograph
    groups = blocks["particles"]["rlnGroupNumber"].tolist()
    assert groups == [i // 8 + 1 for i in range(N_PARTICLES)]


def test_iteration0_has_no_sampling_star(project):
    paths, args = write(iteration=0)
    assert not Path(paths.sampling).exists()
    assert (
        read_star(paths.optimiser)["optimiser_general"]["rlnOrientSamplingStarFile"]
        == paths.sampling
    )
    cont = read_iteration(paths.optimiser)
    assert cont.iteration == 0
    assert cont.sampling is None
    # sampling settings recovered from the command line of the header
    assert cont.settings == args["settings"]


def test_em_writes_no_moments(project):
    settings = make_settings(algorithm="em")
    unmasked = np.ones((K, BOX, BOX), np.float32)
    paths, _ = write(settings=settings, unmasked_class_images=unmasked)
    assert Path(f"{ROOT}_unmasked_classes.mrcs").is_file()
    assert not Path(paths.moment1).exists()
    assert not Path(paths.moment2).exists()
    classes = read_star(paths.model)["model_classes"]
    assert "rlnGradMoment1" not in classes.columns
    assert read_star(paths.optimiser)["optimiser_general"]["rlnDoGradientRefine"] == 0
    cont = read_iteration(paths.optimiser)
    assert cont.settings.algorithm == "em"
    assert cont.model.moment1 is None
    assert cont.model.moment2 is None


def test_starfile_reads_every_file(project):
    paths, _ = write()
    for name in (paths.model, paths.data, paths.sampling, paths.optimiser):
        blocks = starfile.read(name, always_dict=True)
        assert blocks, name
    classes = starfile.read(paths.model, always_dict=True)["model_classes"]
    assert np.isinf(classes["rlnEstimatedResolution"].iloc[2])
    text = Path(paths.model).read_text()
    assert "         inf " in text


def test_missing_model_star_is_named(project):
    paths, _ = write()
    os.remove(paths.model)
    with pytest.raises(InputError, match=r"run_it010_model\.star"):
        read_iteration(paths.optimiser)


def test_class_stack_count_mismatch(project):
    paths, _ = write()
    write_mrc(
        paths.classes, np.zeros((K + 1, BOX, BOX), np.float32), PIXEL, is_stack=True
    )
    with pytest.raises(InputError, match="4 class images but the model has 3"):
        read_iteration(paths.optimiser)
    write_mrc(
        paths.classes, np.zeros((K, BOX + 2, BOX + 2), np.float32), PIXEL, is_stack=True
    )
    with pytest.raises(InputError, match="box"):
        read_iteration(paths.optimiser)


def test_missing_required_label(project):
    paths, _ = write()
    text = Path(paths.optimiser).read_text()
    Path(paths.optimiser).write_text(text.replace("_rlnRandomSeed", "_rlnRandomSeeX"))
    with pytest.raises(InputError, match="rlnRandomSeed"):
        read_iteration(paths.optimiser)


def test_relative_names_resolve_from_another_directory(project, monkeypatch):
    paths, _ = write()
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cont = read_iteration(project / paths.optimiser)
    assert cont.project_dir == project
    assert cont.model.n_classes == K
    assert cont.particles.n_particles == N_PARTICLES


def test_moment_sections_layout():
    p = 8
    moments = torch.randn(2, p, p // 2 + 1, dtype=torch.complex64)
    sections = encode_moment_sections(moments)
    assert sections.shape == (2, p, 2 * (p // 2 + 1))
    # first row of a section is ky = -P/2, i.e. row P/2 of the un-shifted layout
    assert sections[1, 0, 2] == moments[1, p // 2, 1].real
    assert sections[1, 0, 3] == moments[1, p // 2, 1].imag
    assert sections[0, p // 2, 0] == moments[0, 0, 0].real  # ky = 0
    np.testing.assert_array_equal(decode_moment_sections(sections), moments.numpy())


def test_overall_fourier_completeness_matches_brute_force():
    f = 9
    rng = np.random.default_rng(1)
    completeness = rng.uniform(size=(3, f))
    ssnr = np.ones((3, f)) * 5.0
    ssnr[0, 5:] = 0.5  # maxres 4
    ssnr[2, 0] = 0.0  # maxres 0
    result = overall_fourier_completeness(ssnr, completeness)

    def brute(values, maxres):
        c = np.arange(-(maxres - 1), maxres)
        z, y, x = np.meshgrid(c, c, c, indexing="ij")
        r = np.floor(np.sqrt(x**2 + y**2 + z**2)).astype(int)
        return values[r[r <= maxres]].mean()

    assert result[0] == pytest.approx(brute(completeness[0], 4))
    assert result[1] == pytest.approx(brute(completeness[1], f - 1))
    assert result[2] == 0.0


def test_command_line_matches_the_gui():
    settings = Class2DSettings(
        n_classes=100,
        tau2_fudge=2,
        n_iterations=100,
        particle_diameter_angstrom=200,
    )
    args = relion_command_line(
        settings, output_root="Class2D/job0NN/run", input_star="<particles.star>"
    )
    seed = args.index("--random_seed")
    assert args[seed + 1] == "1"
    del args[seed : seed + 2]
    expected = (
        "--o Class2D/job0NN/run --grad --class_inactivity_threshold 0.1 "
        "--grad_write_iter 10 --iter 100 --i <particles.star> "
        "--dont_combine_weights_via_disc --pool 3 --pad 2 --ctf --tau2_fudge 2 "
        "--particle_diameter 200 --K 100 --flatten_solvent --zero_mask "
        "--center_classes --oversampling 1 --psi_step 12 --offset_range 5 "
        "--offset_step 2 --norm --scale --j 1 --pipeline_control Class2D/job0NN/"
    )
    assert " ".join(args) == expected


def test_iteration_paths():
    paths = iteration_paths("Class2D/job013/run", 7)
    assert paths.optimiser == "Class2D/job013/run_it007_optimiser.star"
    assert paths.moment2 == "Class2D/job013/run_it007_2moment.mrcs"
    with pytest.raises(ValueError, match="iteration"):
        iteration_paths("run", -1)


def test_relion_nan_completeness_and_bad_numbers(project):
    paths, _ = write()
    model = Path(paths.model)
    lines = model.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("000003@"))
    fields = lines[row].split()
    fields[7] = "nan"  # RELION writes nan for the completeness of an empty class
    lines[row] = " ".join(fields)
    model.write_text("\n".join(lines) + "\n")
    cont = read_iteration(paths.optimiser)
    assert np.isnan(cont.model.overall_fourier_completeness[2])

    fields[3] = "abc"  # rlnClassDistribution
    lines[row] = " ".join(fields)
    model.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="rlnClassDistribution"):
        read_iteration(paths.optimiser)
