import pickle

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryoavg.errors import InputError
from cryoavg.io.mrc import write_mrc
from cryoavg.io.particles import format_image_name, read_particles
from cryoavg.io.stack import ImageSource
from cryoavg.io.star import write_star
from tests.io.helpers import make_dataset


def test_reads_images_in_requested_order(dataset):
    source = ImageSource.from_table(read_particles(dataset.star))
    n = len(dataset.images)
    assert len(source) == n
    assert source.box_size == 16
    assert source.image_shape == (16, 16)
    assert len(source.stack_paths) == 2
    np.testing.assert_array_equal(source[:], dataset.images)
    image = source[3]
    assert image.shape == (16, 16)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, dataset.images[3])
    np.testing.assert_array_equal(source[-1], dataset.images[-1])
    order = np.array([6, 0, 3, 3, 1])
    np.testing.assert_array_equal(source[order], dataset.images[order])
    np.testing.assert_array_equal(source.images(order.tolist()), dataset.images[order])
    np.testing.assert_array_equal(source[1:6:2], dataset.images[1:6:2])
    mask = np.arange(n) % 3 == 0
    np.testing.assert_array_equal(source[mask], dataset.images[mask])
    assert source[np.array([], dtype=np.int64)].shape == (0, 16, 16)
    with pytest.raises(IndexError):
        source[n]
    with pytest.raises(IndexError):
        source[np.array([0.5])]


def test_preread_equals_lazy(dataset):
    table = read_particles(dataset.star)
    lazy = ImageSource.from_table(table)
    eager = ImageSource.from_table(table, preread=True)
    assert eager.is_preread
    assert not lazy.is_preread
    order = np.array([4, 2, 0])
    np.testing.assert_array_equal(eager[order], lazy[order])
    np.testing.assert_array_equal(eager[2], lazy[2])
    result = eager[order]
    result[:] = 0  # a copy, never a view of the cache
    np.testing.assert_array_equal(eager[order], dataset.images[order])


def test_few_open_stacks_and_pickle(tmp_path):
    data = make_dataset(tmp_path, stack_sizes=(2, 3, 1, 2))
    table = read_particles(data.star)
    source = ImageSource.from_table(table, max_open_stacks=1)
    order = np.random.default_rng(0).permutation(len(data.images))
    np.testing.assert_array_equal(source[order], data.images[order])
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[order], data.images[order])
    with source:
        source[0]
    assert "ImageSource(n=8" in repr(source)


def test_from_stack(tmp_path):
    images = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", images, 1.0, is_stack=True)
    source = ImageSource.from_stack(tmp_path / "s.mrcs")
    np.testing.assert_array_equal(source[:], images)
    assert source.header_pixel_sizes_angstrom == [pytest.approx(1.0)]


def test_stacks_with_different_box_sizes(dataset):
    write_mrc(dataset.stacks[1], np.zeros((3, 12, 12)), 1.5, is_stack=True)
    table = read_particles(dataset.star)
    with pytest.raises(InputError, match=r"different box sizes") as info:
        ImageSource.from_table(table)
    message = str(info.value)
    assert message.startswith(str(dataset.star))
    assert "mic001.mrcs" in message
    assert "mic002.mrcs" in message
    assert "16x16" in message
    assert "12x12" in message


def test_non_square_images(tmp_path):
    write_mrc(tmp_path / "rect.mrcs", np.zeros((2, 8, 10)), 1.0, is_stack=True)
    with pytest.raises(InputError, match=r"rect\.mrcs: images are not square"):
        ImageSource.from_stack(tmp_path / "rect.mrcs")


def test_image_index_beyond_stack(dataset):
    particles = dataset.particles.copy()
    particles.loc[2, "rlnImageName"] = format_image_name(9, "Particles/mic002.mrcs")
    write_star(dataset.star, {"optics": dataset.optics, "particles": particles})
    table = read_particles(dataset.star)
    with pytest.raises(InputError, match=r"beyond the end of the stack") as info:
        ImageSource.from_table(table)
    message = str(info.value)
    assert "mic002.mrcs" in message
    assert "000010@Particles/mic002.mrcs" in message
    assert "holds 3 images" in message


def test_image_size_must_match_optics(dataset):
    optics = dataset.optics.assign(rlnImageSize=[16, 32])
    write_star(dataset.star, {"optics": optics, "particles": dataset.particles})
    table = read_particles(dataset.star)
    with pytest.raises(InputError, match=r"rlnImageSize 32") as info:
        ImageSource.from_table(table)
    assert str(info.value).startswith(str(dataset.star))


def test_missing_stack_names_star_file(dataset):
    dataset.stacks[1].unlink()
    table = read_particles(dataset.star)
    with pytest.raises(InputError, match=r"not found") as info:
        ImageSource.from_table(table)
    message = str(info.value)
    assert message.startswith(str(dataset.star))
    assert "@Particles/mic002.mrcs" in message


def test_truncated_stack_in_table(dataset):
    raw = dataset.stacks[0].read_bytes()
    dataset.stacks[0].write_bytes(raw[:-10])
    with pytest.raises(InputError, match=r"mic001\.mrcs: truncated"):
        ImageSource.from_table(read_particles(dataset.star))


def test_nan_image_is_reported(dataset):
    with mrcfile.open(dataset.stacks[1], mode="r+") as mrc:
        mrc.data[2, 5, 5] = np.nan
    # particle order: stack images are visited in reverse order, see helpers
    table = read_particles(dataset.star)
    source = ImageSource.from_table(table)
    names = table.particles["rlnImageName"]
    bad = int(np.flatnonzero(names == "000003@Particles/mic002.mrcs")[0])
    good = [i for i in range(len(source)) if i != bad]
    source[good]  # other images read fine
    with pytest.raises(InputError, match=r"mic002\.mrcs: image 3 .*NaN") as info:
        source[np.array([0, bad])]
    assert "000003@Particles/mic002.mrcs" in str(info.value)
    with pytest.raises(InputError, match=r"NaN"):
        ImageSource.from_table(table, preread=True)


def test_relative_stacks_found_from_project_dir(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "project")
    # the STAR file lives in a job directory; stack paths are relative to the project
    job = tmp_path / "project" / "Select" / "job005"
    job.mkdir(parents=True)
    moved = job / "particles.star"
    moved.write_text(data.star.read_text())
    table = read_particles(moved, project_dir=tmp_path / "project")
    np.testing.assert_array_equal(ImageSource.from_table(table)[:], data.images)
    monkeypatch.chdir(tmp_path / "project")
    table = read_particles(moved)
    np.testing.assert_array_equal(ImageSource.from_table(table)[:], data.images)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"not found"):
        ImageSource.from_table(read_particles(moved))


def test_plain_image_name_is_a_single_image(tmp_path):
    image = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    write_mrc(tmp_path / "one.mrc", image, 1.0)
    particles = pd.DataFrame({"rlnImageName": ["one.mrc"], "rlnImagePixelSize": [1.0]})
    write_star(tmp_path / "one.star", {"particles": particles})
    source = ImageSource.from_table(read_particles(tmp_path / "one.star"))
    np.testing.assert_array_equal(source[0], image)


@pytest.mark.parametrize("mode_dtype", [np.float32, np.int16, np.float16])
def test_positioned_reads_with_gaps_and_repeats(tmp_path, mode_dtype):
    """Runs of nearby sections, far jumps and repeats all come back in order."""
    rng = np.random.default_rng(5)
    stack = (rng.normal(size=(60, 8, 8)) * 100).astype(mode_dtype)
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(stack)
        mrc.header.ispg = 0
    source = ImageSource.from_stack(path)
    order = np.array([59, 0, 1, 2, 3, 40, 12, 12, 30, 31, 58, 5])
    np.testing.assert_array_equal(source[order], stack[order].astype(np.float32))


def test_stack_truncated_after_opening_is_reported(tmp_path):
    path = tmp_path / "s.mrcs"
    write_mrc(path, np.ones((10, 8, 8), np.float32), 1.0, is_stack=True)
    source = ImageSource.from_stack(path)
    np.testing.assert_array_equal(source[9], np.ones((8, 8), np.float32))
    source.close()
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 8 * 8 * 4 * 3)
    with pytest.raises(InputError, match="file ended while reading"):
        source[np.array([8, 9])]
