"""The ``cryoavg select`` job end to end, with the real class ranker.

A tiny Class2D run (240 simulated particles of 32 px with 30 % junk, K = 5, two EM
iterations) is shared by the module; a hand-made RELION 4.0 Class2D result
(:func:`tests.select.write_relion_class2d`) proves RELION input; bad input must give one
line on stderr, exit status 2 and no job directory.
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest

from cryoavg.cli._jobs import run_job
from cryoavg.cli.select import run_select
from cryoavg.io.mrc import write_mrc
from cryoavg.io.star import read_star, write_star
from cryoavg.select.ranker import score_classes
from tests.conftest import compose_job
from tests.select import write_relion_class2d

K = 5

#: keys of the issue's command lines
ISSUE_KEYS = [
    "optimiser",
    "output",
    "min_score",
    "max_score",
    "classes",
    "min_particles",
    "min_classes",
    "min_class_particles",
    "max_resolution",
    "regroup",
    "class_stack",
    "angpix",
    "model",
    "data",
]


@pytest.fixture(scope="module")
def class2d(tmp_path_factory):
    """A finished tiny Class2D job: ``project/Class2D/job002/run_it002_*``."""
    from cryoavg.cli.class2d import run_class2d
    from cryoavg.cli.simulate import run_simulate

    project = tmp_path_factory.mktemp("select_project")
    sim = project / "Simulate" / "job001"
    run_simulate(
        compose_job(
            "simulate",
            [
                f"output={sim}",
                "n_particles=240",
                "box=32",
                "pixel_size=15.68",
                "junk_fraction=0.3",
                "seed=5",
            ],
        )
    )
    job = project / "Class2D" / "job002"
    run_class2d(
        compose_job(
            "class2d",
            [
                f"output={job}",
                f"particles={sim / 'particles.star'}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "trainer.accelerator=cpu",
                f"classes={K}",
                "psi_step=10",
                "offset_range=3",
                "algorithm=em",
                "iterations=2",
                "write_every=2",
            ],
        )
    )
    return SimpleNamespace(
        project=project,
        job=job,
        optimiser=job / "run_it002_optimiser.star",
        data=read_star(job / "run_it002_data.star")["particles"],
        model=read_star(job / "run_it002_model.star"),
    )


def _select(*overrides: str):
    return run_select(compose_job("select", list(overrides)))


def _no_temp_files(job: Path) -> bool:
    return not [p for p in job.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- config


def test_issue_keys_compose_and_misspelt_keys_fail():
    cfg = compose_job(
        "select",
        [
            "optimiser=Class2D/job013/run_it100_optimiser.star",
            "output=Select/job014",
            "min_score=0.25",
            "classes=[1,4,7]",
            "min_particles=5000",
            "regroup=5",
        ],
    )
    for key in ISSUE_KEYS:
        assert key in cfg, key
    assert list(cfg.classes) == [1, 4, 7]
    assert cfg.min_score == 0.25
    defaults = compose_job("select")
    assert defaults.min_score == 0.5
    assert defaults.max_score == 999
    with pytest.raises(Exception, match="min_scor"):
        compose_job("select", ["min_scor=0.3"])


# ---------------------------------------------------------------- Class2D input


@pytest.fixture(scope="module")
def auto(class2d):
    out = class2d.project / "Select" / "job003"
    metrics, objects = _select(
        f"optimiser={class2d.optimiser}", f"output={out}", "min_score=0.25"
    )
    return SimpleNamespace(out=out, metrics=metrics, **objects)


def test_auto_selection_writes_the_relion_file_set(class2d, auto):
    out = auto.out
    for name in (
        "particles.star",
        "class_averages.star",
        "backup_selection.star",
        "rank_optimiser.star",
        "rank_model.star",
        "rank_data.star",
        "features.npy",
        "images.npy",
        "selection_gallery.png",
        "selection.html",
        "note.txt",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    assert _no_temp_files(out)

    scores = auto.scores
    counts = class2d.model["model_classes"]["rlnClassDistribution"].to_numpy() * 240
    scored = counts > 10
    assert np.all((scores[scored] >= 0) & (scores[scored] <= 1))
    assert np.all(scores[~scored] == -999)
    # min_score=0.25, no guards: exactly the scored classes with score >= 0.25
    expected = scored & (scores >= 0.25)
    assert auto.selected.tolist() == expected.tolist()

    rank_model = read_star(out / "rank_model.star")["model_classes"]
    np.testing.assert_allclose(rank_model["rlnClassScore"], scores, atol=1e-6)
    backup = read_star(out / "backup_selection.star")[""]["rlnSelected"]
    assert backup.tolist() == expected.astype(int).tolist()
    averages = read_star(out / "class_averages.star")[""]
    names = class2d.model["model_classes"]["rlnReferenceImage"].to_numpy()
    assert averages["rlnReferenceImage"].tolist() == names[expected].tolist()
    np.testing.assert_allclose(
        averages["rlnPredictedClassScore"], scores[expected], atol=1e-6
    )

    particles = read_star(out / "particles.star")
    data = class2d.data
    keep = np.isin(data["rlnClassNumber"], np.flatnonzero(expected) + 1)
    assert list(particles["particles"].columns) == list(data.columns)
    assert (
        particles["particles"]["rlnImageName"].tolist()
        == data.loc[keep, "rlnImageName"].tolist()
    )
    assert auto.metrics["n_selected_particles"] == int(keep.sum())
    assert read_star(out / "rank_data.star")["particles"].shape[0] == 240

    optimiser = read_star(out / "rank_optimiser.star")["optimiser_general"]
    assert optimiser["rlnModelStarFile"] == f"{out}/rank_model.star"
    assert optimiser["rlnExperimentalDataStarFile"] == f"{out}/rank_data.star"

    features = np.load(out / "features.npy")
    images = np.load(out / "images.npy")
    assert features.shape == (int(scored.sum()), len(auto.ranked.feature_names))
    assert images.shape == (int(scored.sum()), 64, 64)
    assert np.isfinite(features).all()
    html = (out / "selection.html").read_text()
    assert html.count("data:image/png;base64,") == K
    assert html.count('class="kept"') == int(expected.sum())


def test_scores_are_the_ranker_scores_of_the_class_images(class2d, auto):
    """The job passes the model's values through: the ranker called directly agrees."""
    model = class2d.model["model_classes"]
    counts = model["rlnClassDistribution"].to_numpy() * 240
    scored = counts > 10
    images = mrcfile.read(class2d.job / "run_it002_classes.mrcs").astype(np.float32)
    optimiser = read_star(class2d.optimiser)["optimiser_general"]
    import torch

    direct = score_classes(
        torch.from_numpy(images[scored]),
        pixel_size_angstrom=15.68,
        particle_diameter_angstrom=float(optimiser["rlnParticleDiameter"]),
        class_distribution=model["rlnClassDistribution"].to_numpy()[scored],
        n_particles=counts[scored],
        accuracy_rotation_deg=model["rlnAccuracyRotations"].to_numpy()[scored],
        accuracy_translation_angst=model["rlnAccuracyTranslationsAngst"].to_numpy()[
            scored
        ],
        resolution_angstrom=model["rlnEstimatedResolution"].to_numpy()[scored],
    )
    np.testing.assert_allclose(auto.scores[scored], direct.scores, atol=1e-5)


def test_manual_classes_with_regroup(class2d, tmp_path):
    counts = np.bincount(class2d.data["rlnClassNumber"], minlength=K + 1)[1:]
    chosen = [int(c) for c in np.argsort(-counts)[:2] + 1]  # the two largest
    _, objects = _select(
        f"optimiser={class2d.optimiser}",
        f"output={tmp_path / 'Select' / 'job005'}",
        f"classes=[{chosen[0]},{chosen[1]}]",
        "regroup=2",
    )
    particles = read_star(tmp_path / "Select/job005/particles.star")["particles"]
    assert set(particles["rlnClassNumber"]) == set(chosen)
    assert particles.shape[0] == counts[chosen[0] - 1] + counts[chosen[1] - 1]
    assert "rlnGroupNumber" not in particles.columns
    assert set(particles["rlnGroupName"]) <= {"group_1", "group_2", "group_3"}
    assert len(set(particles["rlnGroupName"])) >= 2
    assert objects["selection"].reasons[chosen[0] - 1] == "manual"


def test_min_particles_guard_adds_best_classes(class2d, tmp_path):
    metrics, objects = _select(
        f"optimiser={class2d.optimiser}",
        f"output={tmp_path / 'Select' / 'job006'}",
        "min_score=0.999",
        "max_score=0.9995",
        "min_particles=100",
    )
    scores = objects["scores"]
    estimate = objects["input"].estimated_particle_counts()
    # the classes in the score window, then the best-scored others (RELION's order)
    # until they hold 100 (estimated) particles
    expected = (scores >= 0.999) & (scores <= 0.9995)
    in_window = int(expected.sum())
    for c in np.argsort(-scores, kind="stable"):
        if estimate[expected].sum() >= 100:
            break
        if scores[c] >= 0:
            expected[c] = True
    selected = objects["selected"]
    assert selected.tolist() == expected.tolist()
    assert estimate[selected].sum() >= 100
    assert selected[np.argmax(scores)]
    assert metrics["n_added_by_guard"] == int(expected.sum()) - in_window


def test_bare_class_stack_is_scored(class2d, tmp_path):
    out = tmp_path / "Select" / "job007"
    metrics, _ = _select(
        f"class_stack={class2d.job / 'run_it002_classes.mrcs'}",
        "angpix=15.68",
        f"output={out}",
        "min_score=0",
    )
    table = read_star(out / "class_scores.star")[""]
    assert table.shape[0] == K
    assert np.all((table["rlnClassScore"] >= 0) & (table["rlnClassScore"] <= 1))
    assert table["rlnSelected"].tolist() == [1] * K  # min_score=0 keeps all
    assert not (out / "particles.star").exists()
    assert np.load(out / "features.npy").shape[0] == K
    assert (out / "selection_gallery.png").is_file()
    assert metrics["n_selected_particles"] is None


# ---------------------------------------------------------------- RELION input


@pytest.fixture(scope="module")
def relion(tmp_path_factory):
    return write_relion_class2d(tmp_path_factory.mktemp("relion_select"))


def test_relion_class2d_input(relion, monkeypatch):
    monkeypatch.chdir(relion.project)
    metrics, objects = _select(
        "optimiser=Class2D/job003/run_it025_optimiser.star",
        "output=Select/job004",
        "min_score=0",
        "max_resolution=20",
        "regroup=3",
    )
    out = relion.project / "Select" / "job004"
    scores = objects["scores"]
    assert scores[-1] == -999  # 8 particles: not scored, as RELION
    assert metrics["n_scored"] == 5
    # resolutions 15, 30, 18, 45, inf, inf Å: classes 1 and 3 are <= 20 Å
    assert objects["selected"].tolist() == [True, False, True, False, False, False]
    particles = read_star(out / "particles.star")
    assert (out / "particles.star").read_text().count("# version 30001") == 2
    keep = np.isin(relion.particle_class, [1, 3])
    assert (
        particles["particles"]["rlnImageName"].tolist()
        == relion.particles.loc[keep, "rlnImageName"].tolist()
    )
    groups = particles["particles"]["rlnGroupName"]
    assert groups.str.fullmatch(r"group_\d").all()
    optimiser = read_star(out / "rank_optimiser.star")["optimiser_general"]
    assert optimiser["rlnModelStarFile"] == "Select/job004/rank_model.star"
    assert float(optimiser["rlnParticleDiameter"]) == pytest.approx(180.0)
    rank = read_star(out / "rank_model.star")["model_classes"]
    assert rank["rlnClassScore"].iloc[-1] == -999


# ---------------------------------------------------------------- bad input


def _bad_optimiser(tmp_path: Path, class2d) -> list[str]:
    values = read_star(class2d.optimiser)["optimiser_general"]
    values["rlnModelStarFile"] = str(class2d.job / "run_it077_model.star")
    path = tmp_path / "run_it077_optimiser.star"
    write_star(path, {"optimiser_general": values})
    return [f"optimiser={path}"]


def _short_stack(tmp_path: Path, class2d) -> list[str]:
    images = mrcfile.read(class2d.job / "run_it002_classes.mrcs")
    path = tmp_path / "short.mrcs"
    write_mrc(path, images[: K - 1], 15.68, is_stack=True)
    return [f"optimiser={class2d.optimiser}", f"class_stack={path}"]


def _wrong_box(tmp_path: Path, class2d) -> list[str]:
    path = tmp_path / "box.mrcs"
    write_mrc(path, np.ones((K, 24, 24), np.float32), 15.68, is_stack=True)
    return [f"optimiser={class2d.optimiser}", f"class_stack={path}"]


def _empty(tmp_path: Path, class2d) -> list[str]:
    return [f"optimiser={class2d.optimiser}", "min_score=1.5", "max_score=2"]


BAD_INPUT = {
    "missing model file": (_bad_optimiser, "run_it077_model.star"),
    "class stack with too few images": (_short_stack, "short.mrcs"),
    "class stack with another box": (_wrong_box, "box.mrcs"),
    "empty selection": (_empty, "no class selected"),
    "bad regroup": (
        lambda t, c: [f"optimiser={c.optimiser}", "min_score=0", "regroup=1000"],
        "regroup=1000",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_error_and_no_job_directory(
    case, class2d, tmp_path, capsys
):
    make, fragment = BAD_INPUT[case]
    out = tmp_path / "Select" / "job009"
    cfg = compose_job("select", [*make(tmp_path, class2d), f"output={out}"])
    with pytest.raises(SystemExit) as info:
        run_job(run_select, cfg)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert not (tmp_path / "Select").exists()


def test_command_line_empty_selection(class2d, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cryoavg.cli.main",
            "select",
            f"optimiser={class2d.optimiser}",
            "min_score=1.5",
            "max_score=2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no class selected")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "Select").exists()
