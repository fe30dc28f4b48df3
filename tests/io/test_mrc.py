import io

import mrcfile
import numpy as np
import pytest
import torch

from cryoavg.errors import InputError
from cryoavg.io import mrc as mrc_module
from cryoavg.io.mrc import (
    header_pixel_size,
    open_stack,
    read_image_stack,
    read_map_3d,
    read_mrc,
    read_mrc_header,
    write_mrc,
)
from tests.io.helpers import leftover_temp_files


def _valid(path) -> bool:
    return mrcfile.validate(path, print_file=io.StringIO())


def test_write_read_stack_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(5, 12, 12)).astype(np.float32)
    path = tmp_path / "stack.mrcs"
    write_mrc(path, data, 1.25, is_stack=True)
    assert _valid(path)
    back, pixel = read_mrc(path)
    np.testing.assert_array_equal(back, data)
    assert back.dtype == np.float32
    assert pixel == pytest.approx(1.25)
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.ispg) == 0
        assert mrc.is_image_stack()
        assert float(mrc.header.dmin) == pytest.approx(data.min())
        assert float(mrc.header.dmax) == pytest.approx(data.max())
        assert float(mrc.header.dmean) == pytest.approx(data.mean(), abs=1e-6)
        assert float(mrc.header.rms) == pytest.approx(data.std(), rel=1e-5)
    stack, stack_pixel = read_image_stack(path)
    np.testing.assert_array_equal(stack, data)
    assert stack_pixel == pytest.approx(1.25)
    assert leftover_temp_files(tmp_path) == []


def test_write_read_volume_and_image(tmp_path):
    volume = np.arange(4 * 6 * 8, dtype=np.float64).reshape(4, 6, 8)
    write_mrc(tmp_path / "map.mrc", volume, 3.5)
    back, pixel = read_map_3d(tmp_path / "map.mrc")
    np.testing.assert_array_equal(back, volume.astype(np.float32))
    assert pixel == pytest.approx(3.5)
    with mrcfile.open(tmp_path / "map.mrc") as mrc:
        assert mrc.is_volume()

    image = torch.arange(30, dtype=torch.float32).reshape(5, 6)  # torch input works too
    write_mrc(tmp_path / "image.mrc", image, 0.9)
    back, pixel = read_mrc(tmp_path / "image.mrc")
    assert back.shape == (5, 6)
    np.testing.assert_array_equal(back, image.numpy())
    stack, _ = read_image_stack(tmp_path / "image.mrc")
    assert stack.shape == (1, 5, 6)


def test_read_map_3d_needs_3d_data(tmp_path):
    # maps written with space group 0 (as many programs do) are still maps
    volume = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    write_mrc(tmp_path / "ispg0.mrc", volume, 1.0, is_stack=True)
    np.testing.assert_array_equal(read_map_3d(tmp_path / "ispg0.mrc")[0], volume)
    write_mrc(tmp_path / "image.mrc", np.zeros((4, 4)), 1.0)
    with pytest.raises(InputError, match=r"image\.mrc: expected a 3D map"):
        read_map_3d(tmp_path / "image.mrc")


def test_header_pixel_size_zero_is_none(tmp_path):
    path = tmp_path / "nopix.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 4, 4), dtype=np.float32))
        mrc.voxel_size = 0.0
    assert header_pixel_size(path) is None
    assert read_mrc(path)[1] is None
    write_mrc(tmp_path / "one.mrcs", np.zeros((2, 4, 4)), 1.0, is_stack=True)
    assert header_pixel_size(tmp_path / "one.mrcs") == pytest.approx(1.0)


def test_open_stack_is_lazy_read_only_memmap(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 8, 8)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    write_mrc(path, data, 2.0, is_stack=True)
    stack = open_stack(path)
    assert isinstance(stack, np.memmap)
    assert stack.shape == (6, 8, 8)
    assert not stack.flags.writeable
    np.testing.assert_array_equal(stack[[4, 1]], data[[4, 1]])
    write_mrc(tmp_path / "single.mrc", data[0], 2.0)
    assert open_stack(tmp_path / "single.mrc").shape == (1, 8, 8)


def test_integer_mode_is_converted_to_float32(tmp_path):
    path = tmp_path / "int16.mrcs"
    data = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4) - 10
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
    back, _ = read_mrc(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, data)


def test_stack_without_map_id_is_accepted(tmp_path):
    # some programs do not write the MAP identifier (e.g. the relion31 example stack)
    path = tmp_path / "nomap.mrcs"
    data = np.ones((2, 4, 4), dtype=np.float32)
    write_mrc(path, data, 1.0, is_stack=True)
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"\x00\x00\x00\x00"  # map ID
    raw[212:216] = b"\x00\x00\x00\x00"  # machine stamp
    path.write_bytes(bytes(raw))
    back, _ = read_mrc(path)
    np.testing.assert_array_equal(back, data)


def test_truncated_stack(tmp_path):
    path = tmp_path / "cut.mrcs"
    write_mrc(path, np.zeros((4, 8, 8)), 1.0, is_stack=True)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    for reader in (read_mrc, open_stack, read_mrc_header):
        with pytest.raises(InputError, match=r"cut.mrcs: truncated") as info:
            reader(path)
        assert "3 complete sections" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"just some text\n" * 200, b"short", bytes(1024) + b"\x01" * 100],
)
def test_not_an_mrc_file(tmp_path, content):
    path = tmp_path / "fake.mrcs"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"fake.mrcs: not an MRC file"):
        read_mrc(path)
    with pytest.raises(InputError, match=r"fake.mrcs: not an MRC file"):
        open_stack(path)


def test_complex_mode_is_rejected(tmp_path):
    path = tmp_path / "complex.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 4), dtype=np.complex64))
    with pytest.raises(InputError, match=r"complex.mrc: unsupported MRC mode 4"):
        read_mrc(path)


def test_missing_mrc(tmp_path):
    with pytest.raises(InputError, match=r"missing.mrcs: file not found"):
        read_mrc(tmp_path / "missing.mrcs")


def test_write_mrc_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"2D or 3D"):
        write_mrc(tmp_path / "x.mrc", np.zeros(5), 1.0)
    with pytest.raises(ValueError, match=r"positive"):
        write_mrc(tmp_path / "x.mrc", np.zeros((4, 4)), 0.0)
    assert list(tmp_path.iterdir()) == []


def test_write_mrc_failure_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "classes.mrcs"
    write_mrc(path, np.ones((2, 4, 4)), 1.0, is_stack=True)
    before = path.read_bytes()

    real_new = mrcfile.new

    def failing_new(name, *args, **kwargs):
        handle = real_new(name, *args, **kwargs)
        handle._iostream.write(b"partial data")
        handle.close()
        raise RuntimeError("crash while writing")

    monkeypatch.setattr(mrc_module.mrcfile, "new", failing_new)
    with pytest.raises(RuntimeError, match=r"crash"):
        write_mrc(path, np.zeros((2, 4, 4)), 1.0, is_stack=True)
    assert path.read_bytes() == before
    assert leftover_temp_files(tmp_path) == []
