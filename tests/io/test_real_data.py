"""Real RELION files from ../shared/data/particles (skipped when absent)."""

import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryoavg.io.particles import read_particles, write_particles
from cryoavg.io.stack import ImageSource
from cryoavg.io.star import format_star, read_star, write_star

# file, n particles, box, pixel size (Å), RELION 3.0?, CTF values of row 1 (STAR text)
REAL_FILES = [
    (
        "relion31/relion31.star",
        5,
        256,
        2.806,
        False,
        {
            "defocus_u_angstrom": 13108.082418,
            "defocus_v_angstrom": 12845.582418,
            "defocus_angle_degrees": -160.39,
            "voltage_kv": 300.0,
            "cs_mm": 0.01,
            "amplitude_contrast": 0.1,
            "phase_shift_degrees": 0.0,
            "bfactor_angstrom2": 0.0,
            "scale": 1.0,
        },
    ),
    (
        "empiar10076/empiar_10076_7.star",
        7,
        320,
        5.0 * 1e4 / 38168,  # 1.31 Å: detector pixel 5 µm / magnification
        True,
        {
            "defocus_u_angstrom": 15301.1,
            "defocus_v_angstrom": 14916.4,
            "defocus_angle_degrees": 5.28,
            "voltage_kv": 300.0,
            "cs_mm": 2.7,
            "amplitude_contrast": 0.07,
        },
    ),
    (
        "aspire_sample/sample_particles_relion30.star",
        17,
        200,
        5.0 * 1e4 / 37369.207031,  # 1.338 Å
        True,
        {
            "defocus_u_angstrom": 21186.804688,
            "defocus_v_angstrom": 21363.109375,
            "defocus_angle_degrees": 7.476096,
            "voltage_kv": 300.0,
            "cs_mm": 2.7,
            "amplitude_contrast": 0.1,
            "bfactor_angstrom2": 0.0,
            "scale": 1.0,
        },
    ),
    (
        "aspire_sample/sample_particles_relion31.star",
        17,
        200,
        1.4,
        False,
        {
            "defocus_u_angstrom": 21186.804688,
            "defocus_v_angstrom": 21363.109375,
            "defocus_angle_degrees": 7.476096,
            "voltage_kv": 300.0,
            "cs_mm": 2.7,
            "amplitude_contrast": 0.1,
        },
    ),
]


def _mrcfile_images(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # e.g. missing MAP ID
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)


@pytest.mark.parametrize(
    ("name", "n", "box", "pixel", "relion30", "ctf_row0"),
    REAL_FILES,
    ids=[f[0].split("/")[-1] for f in REAL_FILES],
)
def test_read_real_particles(
    real_particles_dir, name, n, box, pixel, relion30, ctf_row0
):
    table = read_particles(real_particles_dir / name)
    assert table.n_particles == n
    assert table.box_size == box
    assert table.is_relion30 == relion30
    np.testing.assert_allclose(table.pixel_size_angstrom, pixel, rtol=1e-6)
    ctf = table.ctf_parameters()
    for key, value in ctf_row0.items():
        assert float(ctf[key][0]) == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert table.has_ctf

    source = ImageSource.from_table(table)
    assert source.box_size == box
    paths, stack_index = table.stack_paths()
    reference = _mrcfile_images(paths[0])
    expected = reference[table.image_index0]
    assert np.all(stack_index == 0)
    np.testing.assert_array_equal(source[:], expected)
    np.testing.assert_array_equal(source[np.array([n - 1, 0])], expected[[n - 1, 0]])


def test_aspire_optics_groups(real_particles_dir):
    new = read_particles(
        real_particles_dir / "aspire_sample/sample_particles_relion31.star"
    )
    old = read_particles(
        real_particles_dir / "aspire_sample/sample_particles_relion30.star"
    )
    assert new.n_optics_groups == 2
    np.testing.assert_array_equal(new.optics_group_index, old.optics_group_index)
    voltages = new.ctf_parameters()["voltage_kv"]
    np.testing.assert_allclose(
        voltages, np.where(new.optics_group_index == 0, 300, 200)
    )
    np.testing.assert_allclose(old.ctf_parameters()["voltage_kv"], voltages)


def test_empiar_micrograph_groups(real_particles_dir):
    table = read_particles(real_particles_dir / "empiar10076/empiar_10076_7.star")
    # micrograph names are "1" ... "7": kept as strings, one group each
    assert table.group_names == [str(i) for i in range(1, 8)]
    np.testing.assert_array_equal(table.micrograph_group_index, np.arange(7))


def test_relion31_star_is_rewritten_byte_for_byte(real_particles_dir):
    path = real_particles_dir / "relion31/relion31.star"
    original = path.read_text()
    rewritten = format_star(read_star(path), version=30001)
    # the example file lacks only the final " " line that ends every RELION table
    assert rewritten == original + " \n"


@pytest.mark.parametrize("name", [f[0] for f in REAL_FILES])
def test_rewritten_real_stars_read_back_identical(real_particles_dir, tmp_path, name):
    path = real_particles_dir / name
    blocks = read_star(path)
    out = tmp_path / "rewritten.star"
    write_star(out, blocks)
    original = starfile.read(path, always_dict=True)
    back = starfile.read(out, always_dict=True)
    assert list(back) == list(original)
    for block_name, frame in original.items():
        written = back[block_name]
        assert list(written.columns) == list(frame.columns)
        for label in frame.columns:
            if pd.api.types.is_float_dtype(frame[label]):
                # RELION writes negative doubles with 5 decimals (%12.5f)
                np.testing.assert_allclose(
                    written[label], frame[label], rtol=1e-6, atol=1e-5
                )
            else:
                assert list(written[label].astype(str)) == list(
                    frame[label].astype(str)
                )


@pytest.mark.parametrize("name", [f[0] for f in REAL_FILES])
def test_real_particles_write_read_roundtrip(real_particles_dir, tmp_path, name):
    table = read_particles(real_particles_dir / name)
    out = tmp_path / "particles.star"
    write_particles(out, table)
    back = read_particles(out, project_dir=real_particles_dir / name.split("/")[0])
    assert not back.is_relion30
    np.testing.assert_allclose(
        back.pixel_size_angstrom, table.pixel_size_angstrom, rtol=1e-6
    )
    for key, values in table.ctf_parameters().items():
        np.testing.assert_allclose(back.ctf_parameters()[key], values, rtol=1e-6)
    np.testing.assert_array_equal(back.optics_group_index, table.optics_group_index)
    np.testing.assert_array_equal(
        back.micrograph_group_index, table.micrograph_group_index
    )
    np.testing.assert_array_equal(
        ImageSource.from_table(back)[:], ImageSource.from_table(table)[:]
    )
