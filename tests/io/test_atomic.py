import errno
import os
import stat

import pytest

from cryoavg.errors import OutputError
from cryoavg.io.atomic import atomic_path, atomic_write
from tests.io.helpers import leftover_temp_files


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_write_text(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_write(target) as handle:
        handle.write("hello\n")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "hello\n"
    assert stat.S_IMODE(target.stat().st_mode) == _umask_mode()
    assert leftover_temp_files(tmp_path) == []


def test_atomic_write_binary_and_replace_keeps_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with atomic_write(target, "wb") as handle:
        handle.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def _write_then_fail(target, error):
    with atomic_write(target) as handle:
        handle.write("partial content")
        handle.flush()
        raise error


def test_exception_inside_block_leaves_nothing(tmp_path):
    target = tmp_path / "out.star"
    with pytest.raises(RuntimeError, match=r"boom"):
        _write_then_fail(target, RuntimeError("boom"))
    assert not target.exists()
    assert leftover_temp_files(tmp_path) == []


def test_exception_keeps_previous_version(tmp_path):
    target = tmp_path / "out.star"
    target.write_text("complete old version\n")
    with pytest.raises(KeyError):
        _write_then_fail(target, KeyError("x"))
    assert target.read_text() == "complete old version\n"
    assert leftover_temp_files(tmp_path) == []


def test_disk_full_becomes_output_error(tmp_path):
    target = tmp_path / "out.star"
    with pytest.raises(OutputError, match=r"out\.star") as info:
        _write_then_fail(target, OSError(errno.ENOSPC, "No space left on device"))
    assert "No space left on device" in str(info.value)
    assert "\n" not in str(info.value)
    assert not target.exists()
    assert leftover_temp_files(tmp_path) == []


def test_missing_directory_is_output_error(tmp_path):
    target = tmp_path / "no_such_dir" / "out.star"
    with (
        pytest.raises(OutputError, match=r"no_such_dir"),
        atomic_write(target) as handle,
    ):
        handle.write("x")
    with pytest.raises(OutputError, match=r"no_such_dir"), atomic_path(target):
        pass


def test_atomic_path(tmp_path):
    target = tmp_path / "data.bin"
    with atomic_path(target) as temp:
        assert temp.parent == tmp_path
        assert temp != target
        temp.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    assert leftover_temp_files(tmp_path) == []


def test_atomic_path_failure_removes_temp(tmp_path):
    target = tmp_path / "data.bin"

    def fail_midway():
        with atomic_path(target) as temp:
            temp.write_bytes(b"half")
            raise ValueError("half written")

    with pytest.raises(ValueError, match=r"half"):
        fail_midway()
    assert not target.exists()
    assert leftover_temp_files(tmp_path) == []


def test_bad_mode():
    with pytest.raises(ValueError, match=r"mode"), atomic_write("x", "a"):
        pass
