"""Reading Select inputs: RELION 4.0 Class2D files, model/data pairs, bare stacks, bad input."""

import mrcfile
import numpy as np
import pytest

from cryoavg.errors import ConfigError, InputError
from cryoavg.io.mrc import write_mrc
from cryoavg.io.references import locate_relion_file
from cryoavg.io.star import read_star, write_star
from cryoavg.select.inputs import load_select_input
from tests.select import write_relion_class2d


@pytest.fixture(scope="module")
def relion(tmp_path_factory):
    return write_relion_class2d(tmp_path_factory.mktemp("relion_project"))


def test_relion_optimiser_from_the_project_directory(relion, monkeypatch):
    monkeypatch.chdir(relion.project)
    source = load_select_input(optimiser="Class2D/job003/run_it025_optimiser.star")
    k = relion.class_counts.size
    assert source.n_classes == k
    np.testing.assert_array_equal(source.class_images, relion.images)
    assert source.pixel_size_angstrom == pytest.approx(7.0)
    assert source.particle_diameter_angstrom == pytest.approx(180.0)
    assert source.class_numbers.tolist() == list(range(1, k + 1))
    assert source.n_particles == relion.class_counts.sum()
    np.testing.assert_allclose(
        source.estimated_particle_counts(), relion.class_counts, atol=1e-3
    )
    assert source.particle_counts().tolist() == relion.class_counts.tolist()
    np.testing.assert_array_equal(source.particle_class_numbers, relion.particle_class)
    assert source.accuracy_rotations_degrees[1] == 999.0
    assert np.isinf(source.estimated_resolution_angstrom[-1])
    assert source.star_version == 30001
    assert source.optics.shape[0] == 2
    assert source.model_groups.shape[0] == 8
    assert source.reference_names[0] == "000001@Class2D/job003/run_it025_classes.mrcs"


def test_relion_optimiser_from_elsewhere_resolves_via_its_directory(
    relion, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # names are project-relative: found via the parents
    source = load_select_input(
        optimiser=relion.optimiser, particle_diameter_angstrom=150
    )
    assert source.model_path.resolve() == relion.model.resolve()
    assert source.particle_diameter_angstrom == 150  # the key overrides the file
    explicit = load_select_input(
        model=relion.model, data=relion.data, project_dir=relion.project
    )
    np.testing.assert_array_equal(explicit.class_images, relion.images)
    assert explicit.particle_diameter_angstrom is None
    assert explicit.optimiser_values is None


def test_missing_model_file_names_the_optimiser(relion, tmp_path):
    values = read_star(relion.optimiser)["optimiser_general"]
    values["rlnModelStarFile"] = "Class2D/job003/run_it099_model.star"
    bad = tmp_path / "run_it099_optimiser.star"
    write_star(bad, {"optimiser_general": values})
    with pytest.raises(InputError, match=r"run_it099_model\.star") as info:
        load_select_input(optimiser=bad)
    assert str(info.value).startswith(str(bad))
    values.pop("rlnExperimentalDataStarFile")
    write_star(bad, {"optimiser_general": values})
    with pytest.raises(InputError, match="lacks rlnExperimentalDataStarFile"):
        load_select_input(optimiser=bad)


def test_class_stack_that_does_not_match_the_model(relion, tmp_path):
    k = relion.class_counts.size
    short = tmp_path / "short.mrcs"
    write_mrc(short, relion.images[: k - 1], 7.0, is_stack=True)
    with pytest.raises(InputError, match=f"model has {k} classes"):
        load_select_input(model=relion.model, data=relion.data, class_stack=short)
    wrong_box = tmp_path / "box.mrcs"
    write_mrc(wrong_box, np.zeros((k, 24, 24), np.float32), 7.0, is_stack=True)
    with pytest.raises(InputError, match="32 px"):
        load_select_input(model=relion.model, data=relion.data, class_stack=wrong_box)
    # the model's own rlnReferenceImage stack with one image too few
    model = read_star(relion.model)
    model["model_classes"]["rlnReferenceImage"] = [
        f"{i + 1:06d}@{short}" for i in range(k)
    ]
    bad_model = tmp_path / "model.star"
    write_star(bad_model, model)
    with pytest.raises(InputError, match=r"short\.mrcs") as info:
        load_select_input(model=bad_model, data=relion.data)
    assert "refers to" in str(info.value)


def test_class_stack_override_replaces_the_reference_images(relion, tmp_path):
    flipped = tmp_path / "flipped.mrcs"
    write_mrc(flipped, relion.images[:, ::-1], 7.0, is_stack=True)
    source = load_select_input(
        model=relion.model, data=relion.data, class_stack=flipped
    )
    np.testing.assert_array_equal(source.class_images, relion.images[:, ::-1])
    assert source.reference_names[1] == f"000002@{flipped}"


def test_data_star_problems(relion, tmp_path):
    blocks = read_star(relion.data)
    blocks["particles"].loc[3, "rlnClassNumber"] = 42
    bad = tmp_path / "bad_class.star"
    write_star(bad, blocks)
    with pytest.raises(InputError, match="class 42"):
        load_select_input(model=relion.model, data=bad)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnClassNumber"])
    write_star(bad, blocks)
    with pytest.raises(InputError, match="lacks rlnClassNumber"):
        load_select_input(model=relion.model, data=bad)


def test_bare_stack_pixel_size(relion, tmp_path):
    source = load_select_input(class_stack=relion.stack)
    assert source.is_bare
    assert source.pixel_size_angstrom == pytest.approx(7.0)  # MRC header
    assert source.estimated_particle_counts() is None
    assert load_select_input(
        class_stack=relion.stack, pixel_size_angstrom=3.5
    ).pixel_size_angstrom == pytest.approx(3.5)
    no_header = tmp_path / "nohdr.mrcs"
    write_mrc(no_header, relion.images, 1.0, is_stack=True)
    with mrcfile.open(no_header, "r+") as handle:
        handle.voxel_size = 0.0
    with pytest.raises(ConfigError, match="angpix"):
        load_select_input(class_stack=no_header)
    nan = tmp_path / "nan.mrcs"
    write_mrc(nan, relion.images, 7.0, is_stack=True)
    with mrcfile.open(nan, "r+") as handle:
        handle.data[2, 3, 3] = np.nan
    with pytest.raises(InputError, match="image 3"):
        load_select_input(class_stack=nan)


def test_key_combinations():
    with pytest.raises(ConfigError, match="no input"):
        load_select_input()
    with pytest.raises(ConfigError, match="together"):
        load_select_input(model="m.star")
    with pytest.raises(ConfigError, match="not both"):
        load_select_input(optimiser="o.star", model="m.star", data="d.star")
    with pytest.raises(ConfigError, match="angpix"):
        load_select_input(class_stack="x.mrcs", pixel_size_angstrom=-1)


def test_resolve_relion_path_fallbacks(tmp_path):
    job = tmp_path / "Class2D" / "job001"
    job.mkdir(parents=True)
    (job / "a.star").write_text("x")
    anchor = job / "run_optimiser.star"
    # project-relative name found via the anchor's parents; bare name beside the anchor
    assert locate_relion_file("Class2D/job001/a.star", anchor, "/nonexistent", "m") == (
        tmp_path / "Class2D/job001/a.star",
        tmp_path,
    )
    assert locate_relion_file("Moved/job009/a.star", anchor, None, "m")[0] == (
        job / "a.star"
    )
    with pytest.raises(InputError, match=r"model file 'b\.star' not found"):
        locate_relion_file("b.star", anchor, None, "model")
