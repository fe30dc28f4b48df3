"""Select output files (spec §C.4) and the gallery, written from given scores."""

import base64
import re

import numpy as np
import pytest

from cryoavg.io.star import read_star
from cryoavg.select.gallery import (
    score_order,
    write_selection_gallery_png,
    write_selection_html,
)
from cryoavg.select.inputs import load_select_input
from cryoavg.select.outputs import (
    write_backup_selection,
    write_class_averages,
    write_class_scores,
    write_npy,
    write_particles_star,
    write_rank_files,
)
from cryoavg.select.regroup import regroup_particles
from cryoavg.select.selection import UNSCORED, selected_particles
from tests.select import write_relion_class2d

SCORES = np.array([0.91, 0.12, 0.77, 0.55, 0.3, UNSCORED])
SELECTED = np.array([True, False, True, True, False, False])


@pytest.fixture(scope="module")
def relion(tmp_path_factory):
    return write_relion_class2d(tmp_path_factory.mktemp("relion_out"))


@pytest.fixture
def source(relion, monkeypatch):
    monkeypatch.chdir(relion.project)
    return load_select_input(optimiser="Class2D/job003/run_it025_optimiser.star")


def _no_temp_files(directory) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def test_particles_star_keeps_columns_order_and_optics(relion, source, tmp_path):
    mask = selected_particles(
        source.particle_class_numbers, source.class_numbers, SELECTED
    )
    write_particles_star(tmp_path / "particles.star", source, mask)
    text = (tmp_path / "particles.star").read_text()
    assert text.count("# version 30001") == 2  # the input's version is kept
    blocks = read_star(tmp_path / "particles.star")
    assert list(blocks) == ["optics", "particles"]
    written = blocks["particles"]
    expected = relion.particles.loc[np.isin(relion.particle_class, [1, 3, 4])]
    assert list(written.columns) == list(relion.particles.columns)
    assert written["rlnImageName"].tolist() == expected["rlnImageName"].tolist()
    assert written["rlnClassNumber"].dtype == np.int64
    np.testing.assert_allclose(
        written["rlnDefocusU"], expected["rlnDefocusU"], rtol=1e-6
    )
    assert blocks["optics"].shape == (2, 10)
    assert _no_temp_files(tmp_path)


def test_regrouped_particles_star(relion, source, tmp_path):
    mask = selected_particles(
        source.particle_class_numbers, source.class_numbers, SELECTED
    )
    rows = source.particles.loc[mask].reset_index(drop=True)
    regrouped, _ = regroup_particles(rows, 3, source.model_groups)
    write_particles_star(tmp_path / "particles.star", source, mask, regrouped)
    written = read_star(tmp_path / "particles.star")["particles"]
    assert "rlnGroupNumber" not in written.columns
    assert set(written["rlnGroupName"]) <= {"group_1", "group_2", "group_3", "group_4"}
    assert written.shape[0] == int(mask.sum())


def test_class_averages_and_backup_selection(source, tmp_path):
    write_class_averages(tmp_path / "class_averages.star", source, SCORES, SELECTED)
    table = read_star(tmp_path / "class_averages.star")[""]
    assert list(table.columns) == [
        "rlnReferenceImage",
        "rlnPredictedClassScore",
        "rlnClassDistribution",
        "rlnAccuracyRotations",
        "rlnAccuracyTranslationsAngst",
        "rlnEstimatedResolution",
    ]
    assert table["rlnReferenceImage"].tolist() == [
        f"{c:06d}@Class2D/job003/run_it025_classes.mrcs" for c in (1, 3, 4)
    ]
    np.testing.assert_allclose(table["rlnPredictedClassScore"], [0.91, 0.77, 0.55])
    write_backup_selection(tmp_path / "backup.star", SELECTED, version=30001)
    selected = read_star(tmp_path / "backup.star")[""]["rlnSelected"]
    assert selected.tolist() == [1, 0, 1, 1, 0, 0]


def test_rank_files_point_to_each_other_and_read_back(relion, source):
    job = relion.project / "Select" / "job004"
    job.mkdir(parents=True)
    paths = write_rank_files(job, "Select/job004/", source, SCORES)
    optimiser = read_star(paths["optimiser"])["optimiser_general"]
    assert optimiser["rlnModelStarFile"] == "Select/job004/rank_model.star"
    assert optimiser["rlnExperimentalDataStarFile"] == "Select/job004/rank_data.star"
    assert float(optimiser["rlnParticleDiameter"]) == pytest.approx(180.0)
    assert optimiser["rlnOutputRootName"] == "Class2D/job003/run"  # rest copied
    model = read_star(paths["model"])
    assert list(model) == ["model_classes"]
    classes = model["model_classes"]
    assert list(classes.columns)[:2] == ["rlnReferenceImage", "rlnClassScore"]
    assert classes["rlnClassScore"].tolist() == pytest.approx(SCORES.tolist())
    data = read_star(paths["data"])["particles"]
    assert data["rlnImageName"].tolist() == relion.particles["rlnImageName"].tolist()
    # the rank files are a valid Select input again (project-relative names)
    again = load_select_input(optimiser=paths["optimiser"])
    np.testing.assert_array_equal(again.class_images, relion.images)
    assert again.n_particles == relion.particles.shape[0]


def test_bare_scores_star_and_npy(relion, tmp_path):
    bare = load_select_input(class_stack=relion.stack)
    write_class_scores(tmp_path / "class_scores.star", bare, SCORES, SELECTED)
    table = read_star(tmp_path / "class_scores.star")[""]
    assert table["rlnReferenceImage"].iloc[2] == f"000003@{relion.stack}"
    assert table["rlnSelected"].tolist() == [1, 0, 1, 1, 0, 0]
    features = np.arange(12, dtype=np.float64).reshape(3, 4)
    write_npy(tmp_path / "features.npy", features)
    loaded = np.load(tmp_path / "features.npy")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, features)


def test_gallery_png_and_html(relion, tmp_path):
    counts = relion.class_counts
    numbers = np.arange(1, 7)
    png = tmp_path / "gallery.png"
    write_selection_gallery_png(png, relion.images, SCORES, SELECTED, numbers, counts)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html_path = tmp_path / "selection.html"
    write_selection_html(
        html_path, relion.images, SCORES, SELECTED, numbers, counts, summary="3 kept"
    )
    text = html_path.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 6
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert text.count('class="kept"') == 3
    assert text.count('class="rejected"') == 3
    # sorted by score: classes 1, 3, 4, 5, 2, 6 (unscored last)
    order = [int(n) for n in re.findall(r'alt="class (\d+)"', text)]
    assert order == [1, 3, 4, 5, 2, 6]
    assert score_order(SCORES).tolist() == [0, 2, 3, 4, 1, 5]
    assert "n=90" in text
    assert "http" not in text.replace("http-equiv", "")  # self-contained
