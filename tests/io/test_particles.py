import numpy as np
import pandas as pd
import pytest

from cryoavg.errors import ConfigError, InputError
from cryoavg.io.particles import (
    CTF_KEYS,
    ParticleTable,
    format_image_name,
    parse_image_name,
    read_particles,
    resolve_stack_path,
    strip_pipeline_prefix,
    write_particles,
)
from cryoavg.io.star import read_star, write_star
from tests.io.helpers import leftover_temp_files, make_dataset


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("000012@Extract/job007/mic.mrcs", (11, "Extract/job007/mic.mrcs")),
        ("1@empiar_10076_7.mrc", (0, "empiar_10076_7.mrc")),
        ("00000001@/abs/path stack.mrcs", (0, "/abs/path stack.mrcs")),
        ("single_image.mrc", (0, "single_image.mrc")),
    ],
)
def test_parse_image_name(name, expected):
    assert parse_image_name(name) == expected


@pytest.mark.parametrize("name", ["", "abc@stack.mrcs", "0@stack.mrcs", "12@"])
def test_parse_image_name_errors(name):
    with pytest.raises(ValueError, match=r"image"):
        parse_image_name(name)


def test_format_image_name():
    assert format_image_name(0, "a.mrcs") == "000001@a.mrcs"
    assert format_image_name(41, "Class2D/job001/run.mrcs", digits=8) == (
        "00000042@Class2D/job001/run.mrcs"
    )
    assert parse_image_name(format_image_name(123, "x/y.mrcs")) == (123, "x/y.mrcs")
    with pytest.raises(ValueError, match=r"index"):
        format_image_name(-1, "a.mrcs")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MotionCorr/job002/Movies/mic001.mrc", "Movies/mic001.mrc"),
        ("CtfFind/job1234/Movies/a/b.mrc", "Movies/a/b.mrc"),
        ("Movies/mic001.mrc", "Movies/mic001.mrc"),
        ("job002/mic.mrc", "job002/mic.mrc"),  # RELION needs a directory before jobNNN
        ("mic.mrc", "mic.mrc"),
    ],
)
def test_strip_pipeline_prefix(name, expected):
    assert strip_pipeline_prefix(name) == expected


def test_resolve_stack_path(tmp_path, monkeypatch):
    star_dir = tmp_path / "Select" / "job010"
    project = tmp_path / "project"
    (star_dir / "Extract").mkdir(parents=True)
    (project / "Extract").mkdir(parents=True)
    (project / "Extract" / "a.mrcs").write_bytes(b"x")
    (star_dir / "Extract" / "b.mrcs").write_bytes(b"x")
    (project / "Extract" / "b.mrcs").write_bytes(b"x")
    # next to the STAR file first, then the project directory
    assert resolve_stack_path("Extract/b.mrcs", star_dir, project) == (
        star_dir / "Extract" / "b.mrcs"
    )
    assert resolve_stack_path("Extract/a.mrcs", star_dir, project) == (
        project / "Extract" / "a.mrcs"
    )
    # the default project directory is the current directory
    monkeypatch.chdir(project)
    assert resolve_stack_path("Extract/a.mrcs", star_dir).resolve() == (
        project / "Extract" / "a.mrcs"
    )
    absolute = project / "Extract" / "a.mrcs"
    assert resolve_stack_path(str(absolute), star_dir, project) == absolute
    with pytest.raises(InputError) as info:
        resolve_stack_path(
            "Extract/c.mrcs",
            star_dir,
            project,
            star_file=star_dir / "particles.star",
            image_name="000003@Extract/c.mrcs",
        )
    message = str(info.value)
    assert message.startswith(str(star_dir / "particles.star"))
    assert "000003@Extract/c.mrcs" in message
    assert str(star_dir / "Extract" / "c.mrcs") in message
    assert str(project / "Extract" / "c.mrcs") in message


def test_read_synthetic_relion31(dataset):
    table = read_particles(dataset.star)
    n = len(dataset.images)
    assert table.n_particles == n == len(table)
    assert table.box_size == 16
    assert not table.is_relion30
    assert table.n_optics_groups == 2
    np.testing.assert_array_equal(table.optics_group_index, np.arange(n) % 2)
    np.testing.assert_allclose(table.pixel_size_angstrom, 1.5)
    assert not table.has_mixed_pixel_sizes
    pd.testing.assert_frame_equal(
        table.particles[["rlnImageName", "rlnClassNumber"]],
        dataset.particles[["rlnImageName", "rlnClassNumber"]],
        check_dtype=False,
    )
    ctf = table.ctf_parameters()
    assert list(ctf) == list(CTF_KEYS)
    assert all(
        values.dtype == np.float32 and values.shape == (n,) for values in ctf.values()
    )
    np.testing.assert_allclose(
        ctf["defocus_u_angstrom"], dataset.particles["rlnDefocusU"], rtol=1e-6
    )
    np.testing.assert_allclose(
        ctf["voltage_kv"], np.where(np.arange(n) % 2 == 0, 300, 200)
    )
    np.testing.assert_allclose(
        ctf["cs_mm"], np.where(np.arange(n) % 2 == 0, 2.7, 0.01), rtol=1e-6
    )
    np.testing.assert_allclose(ctf["scale"], 1.0)
    np.testing.assert_array_equal(table.ctf_premultiplied, [False, True])
    assert table.has_ctf
    merged = table.merged()
    assert list(merged.columns[: len(table.particles.columns)]) == list(
        table.particles.columns
    )
    np.testing.assert_allclose(merged["rlnVoltage"], ctf["voltage_kv"])
    np.testing.assert_array_equal(merged["rlnImageSize"], 16)


def test_micrograph_groups_follow_relion_numbering(tmp_path):
    # RELION sorts on rlnMicrographName, then numbers groups by first appearance.
    particles = pd.DataFrame(
        {
            "rlnImageName": [format_image_name(k, "s.mrcs") for k in range(4)],
            "rlnMicrographName": [
                "MotionCorr/job002/Movies/b.mrc",
                "MotionCorr/job002/Movies/a.mrc",
                "MotionCorr/job002/Movies/b.mrc",
                "MotionCorr/job002/Movies/c.mrc",
            ],
            "rlnImagePixelSize": [1.0] * 4,
        }
    )
    table = ParticleTable(particles, None, tmp_path / "p.star")
    np.testing.assert_array_equal(table.micrograph_group_index, [1, 0, 1, 2])
    assert table.group_names == ["Movies/a.mrc", "Movies/b.mrc", "Movies/c.mrc"]
    assert table.n_groups == 3
    # rlnGroupName wins over micrograph names
    grouped = ParticleTable(
        particles.assign(rlnGroupName=["g2", "g1", "g1", "g2"]),
        None,
        tmp_path / "p.star",
    )
    np.testing.assert_array_equal(grouped.micrograph_group_index, [1, 0, 0, 1])
    assert grouped.group_names == ["g1", "g2"]
    # neither: a single group
    single = ParticleTable(
        particles.drop(columns="rlnMicrographName"), None, tmp_path / "p.star"
    )
    np.testing.assert_array_equal(single.micrograph_group_index, 0)


def _write_relion30(path, **columns):
    n = 3
    table = {
        "rlnImageName": [format_image_name(k, "s.mrcs") for k in range(n)],
        "rlnMicrographName": ["m1.mrc", "m1.mrc", "m2.mrc"],
        "rlnDefocusU": [10000.0, 11000.0, 12000.0],
        "rlnVoltage": [300.0, 300.0, 200.0],
        "rlnSphericalAberration": [2.7] * n,
        "rlnAmplitudeContrast": [0.1] * n,
    }
    table.update(columns)
    write_star(path, {"": pd.DataFrame(table)})


def test_read_relion30_detector_pixel_size(tmp_path):
    path = tmp_path / "p30.star"
    _write_relion30(
        path, rlnDetectorPixelSize=[5.0] * 3, rlnMagnification=[38168.0] * 3
    )
    table = read_particles(path)
    assert table.is_relion30
    assert table.optics is None
    np.testing.assert_allclose(table.pixel_size_angstrom, 5.0 * 1e4 / 38168.0)
    # two optics groups: voltage differs
    np.testing.assert_array_equal(table.optics_group_index, [0, 0, 1])
    ctf = table.ctf_parameters()
    # defocus V defaults to defocus U, angle to 0, as in RELION's CTF::readByGroup
    np.testing.assert_allclose(ctf["defocus_v_angstrom"], ctf["defocus_u_angstrom"])
    np.testing.assert_allclose(ctf["defocus_angle_degrees"], 0.0)
    assert not table.has_ctf


def test_pixel_size_argument_overrides_and_is_required(tmp_path):
    path = tmp_path / "nopix.star"
    _write_relion30(path)
    with pytest.raises(InputError, match=r"nopix\.star: no pixel size") as info:
        read_particles(path)
    assert "pixel_size_angstrom" in str(info.value)
    table = read_particles(path, pixel_size_angstrom=2.0)
    np.testing.assert_allclose(table.pixel_size_angstrom, 2.0)
    with pytest.raises(ConfigError, match=r"positive"):
        read_particles(path, pixel_size_angstrom=-1.0)


def test_mixed_pixel_sizes_are_recorded(tmp_path):
    data = make_dataset(tmp_path)
    optics = data.optics.assign(rlnImagePixelSize=[1.5, 1.6])
    write_star(data.star, {"optics": optics, "particles": data.particles})
    table = read_particles(data.star)
    assert table.has_mixed_pixel_sizes
    np.testing.assert_allclose(table.pixel_size_per_optics_group_angstrom, [1.5, 1.6])
    np.testing.assert_allclose(
        table.pixel_size_angstrom, np.where(table.optics_group_index == 0, 1.5, 1.6)
    )


def test_unsorted_optics_table(tmp_path):
    data = make_dataset(tmp_path)
    optics = data.optics.iloc[::-1].reset_index(drop=True)
    write_star(data.star, {"optics": optics, "particles": data.particles})
    table = read_particles(data.star)
    # index g is the g-th group by number, whatever the row order in the file
    np.testing.assert_array_equal(
        table.optics_group_index, data.particles["rlnOpticsGroup"] - 1
    )
    assert table.optics_group_names == ["opticsGroup1", "opticsGroup2"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("no_particles_block", "no data_particles table"),
        ("empty_particles", "no data_particles table"),
        ("no_image_name", "no rlnImageName column"),
        ("unknown_optics_group", "refers to optics group 7"),
        ("bad_image_name", "malformed rlnImageName in particle 2"),
        ("zero_image_number", "image numbers start at 1"),
        ("text_defocus", "rlnDefocusU in particle 1 is not a finite number"),
        ("no_optics_column", "no rlnOpticsGroup column but there are 2 optics groups"),
        ("negative_pixel", "invalid pixel size"),
        ("particles_is_list", "data_particles is not a loop"),
    ],
)
def test_bad_particle_tables(tmp_path, change, problem):
    data = make_dataset(tmp_path)
    particles, optics = data.particles.copy(), data.optics.copy()
    blocks = {"optics": optics, "particles": particles}
    if change == "no_particles_block":
        blocks = {"optics": optics}
    elif change == "empty_particles":
        blocks["particles"] = particles.iloc[:0]  # RELION writes no empty table
    elif change == "no_image_name":
        blocks["particles"] = particles.drop(columns="rlnImageName")
    elif change == "unknown_optics_group":
        particles.loc[3, "rlnOpticsGroup"] = 7
    elif change == "bad_image_name":
        particles.loc[1, "rlnImageName"] = "one@stack.mrcs"
    elif change == "zero_image_number":
        particles.loc[0, "rlnImageName"] = "0@Particles/mic001.mrcs"
    elif change == "text_defocus":
        particles["rlnDefocusU"] = particles["rlnDefocusU"].astype(object)
        particles.loc[0, "rlnDefocusU"] = "abc"
    elif change == "no_optics_column":
        blocks["particles"] = particles.drop(columns="rlnOpticsGroup")
    elif change == "negative_pixel":
        optics.loc[1, "rlnImagePixelSize"] = -1.0
    elif change == "particles_is_list":
        blocks["particles"] = {"rlnImageName": "1@a.mrcs"}
    write_star(data.star, blocks)
    with pytest.raises(InputError, match=problem) as info:
        read_particles(data.star)
    assert str(info.value).startswith(str(data.star))


@pytest.mark.parametrize(
    ("label", "value", "problem"),
    [
        ("rlnAmplitudeContrast", 2.0, r"rlnAmplitudeContrast must be in \[0, 1\)"),
        ("rlnAmplitudeContrast", -0.1, "rlnAmplitudeContrast must be in"),
        ("rlnVoltage", 0.0, "rlnVoltage must be positive"),
    ],
)
def test_unusable_ctf_is_an_error_when_the_ctf_is_applied(
    tmp_path, label, value, problem
):
    # values in swapped columns (found by the full reconstruct fuzz test) read fine, but
    # a job that applies the CTF must refuse them with the file named
    data = make_dataset(tmp_path)
    optics = data.optics.copy()
    optics.loc[1, label] = value
    write_star(data.star, {"optics": optics, "particles": data.particles})
    table = read_particles(data.star)
    with pytest.raises(InputError, match=problem) as info:
        table.check_ctf()
    assert str(info.value).startswith(str(data.star))
    read_particles(make_dataset(tmp_path / "good").star).check_ctf()


def test_star_without_particles_table(tmp_path):
    path = tmp_path / "model.star"
    write_star(path, {"model_general": {"rlnNrClasses": 3}})
    with pytest.raises(InputError, match=r"model\.star: no particles table"):
        read_particles(path)


def test_write_read_particles_roundtrip(dataset, tmp_path):
    table = read_particles(dataset.star)
    out = tmp_path / "out.star"
    write_particles(out, table)
    assert leftover_temp_files(tmp_path) == []
    blocks = read_star(out)
    assert list(blocks) == ["optics", "particles"]
    back = read_particles(out)
    assert list(back.particles.columns) == list(table.particles.columns)
    for label in table.particles.columns:
        original, written = table.particles[label], back.particles[label]
        if pd.api.types.is_float_dtype(original):
            np.testing.assert_allclose(written, original, rtol=1e-6, atol=1e-6)
        else:
            assert written.dtype.kind == original.dtype.kind
            assert list(written) == list(original)
    pd.testing.assert_frame_equal(back.optics, table.optics, check_exact=False)
    for key in CTF_KEYS:
        np.testing.assert_allclose(
            back.ctf_parameters()[key], table.ctf_parameters()[key], rtol=1e-6
        )


def test_write_particles_image_name_digits_and_dataframes(dataset, tmp_path):
    out = tmp_path / "renamed.star"
    write_particles(out, dataset.particles, dataset.optics, image_name_digits=8)
    back = read_particles(out)
    assert back.particles["rlnImageName"][0].split("@")[0] == "00000004"
    np.testing.assert_array_equal(
        back.image_index0, read_particles(dataset.star).image_index0
    )
    with pytest.raises(ValueError, match=r"optics"):
        write_particles(out, dataset.particles)


def test_write_relion30_table_as_relion31(tmp_path):
    path = tmp_path / "p30.star"
    _write_relion30(
        path,
        rlnDetectorPixelSize=[5.0] * 3,
        rlnMagnification=[50000.0] * 3,
        rlnOriginX=[1.0, -2.0, 0.5],
        rlnOriginY=[0.0, 3.0, -1.0],
    )
    table = read_particles(path)
    out = tmp_path / "p31.star"
    write_particles(out, table)
    back = read_particles(out)
    assert not back.is_relion30
    assert back.n_optics_groups == 2
    np.testing.assert_allclose(back.pixel_size_angstrom, 1.0)
    for key in CTF_KEYS:
        np.testing.assert_allclose(
            back.ctf_parameters()[key], table.ctf_parameters()[key]
        )
    np.testing.assert_allclose(back.particles["rlnOriginXAngst"], [1.0, -2.0, 0.5])
    assert "rlnVoltage" not in back.particles.columns
    np.testing.assert_array_equal(
        back.micrograph_group_index, table.micrograph_group_index
    )


def test_subset(dataset):
    table = read_particles(dataset.star)
    sub = table.subset([5, 0])
    assert sub.n_particles == 2
    assert list(sub.particles["rlnImageName"]) == [
        table.particles["rlnImageName"][5],
        table.particles["rlnImageName"][0],
    ]
    mask = np.zeros(table.n_particles, dtype=bool)
    mask[[1, 2]] = True
    assert table.subset(mask).n_particles == 2


def test_particles_loop_without_rows(tmp_path):
    path = tmp_path / "empty.star"
    path.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 1.0\n\n"
        "data_particles\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n"
    )
    with pytest.raises(InputError, match=r"empty\.star: the particles table is empty"):
        read_particles(path)
