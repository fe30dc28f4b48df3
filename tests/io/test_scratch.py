"""Scratch copies of particle stacks (``scratch_dir``)."""

import numpy as np
import pytest

from cryoavg.errors import InputError, OutputError
from cryoavg.io.mrc import write_mrc
from cryoavg.io.particles import read_particles
from cryoavg.io.scratch import scratch_copies
from cryoavg.io.stack import ImageSource


def test_reads_from_scratch_copies_and_cleans_up(dataset, tmp_path):
    source = ImageSource.from_table(read_particles(dataset.star))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    originals = source.stack_paths
    with scratch_copies(originals, scratch) as copies:
        assert all(c.parent.parent == scratch for c in copies)
        assert [c.stat().st_size for c in copies] == [
            p.stat().st_size for p in originals
        ]
        source.relocate(copies)
        assert source.stack_paths == copies
        np.testing.assert_array_equal(source[:], dataset.images)
    assert list(scratch.iterdir()) == []  # removed at the end


def test_files_that_do_not_fit_stay_in_place(dataset, tmp_path):
    source = ImageSource.from_table(read_particles(dataset.star))
    with scratch_copies(source.stack_paths, tmp_path, reserve_bytes=1 << 62) as paths:
        assert paths == source.stack_paths


def test_cleanup_on_failure(dataset, tmp_path):
    source = ImageSource.from_table(read_particles(dataset.star))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with (
        pytest.raises(RuntimeError),
        scratch_copies(source.stack_paths, scratch),
    ):
        raise RuntimeError("job failed")
    assert list(scratch.iterdir()) == []


def test_bad_scratch_dir_and_wrong_copy(dataset, tmp_path):
    source = ImageSource.from_table(read_particles(dataset.star))
    with (
        pytest.raises(OutputError, match="scratch_dir does not exist"),
        scratch_copies(source.stack_paths, tmp_path / "nope"),
    ):
        pass
    other = tmp_path / "other.mrcs"
    write_mrc(other, np.zeros((1, 4, 4), np.float32), 1.0, is_stack=True)
    with pytest.raises(InputError, match="is not a copy"):
        source.relocate([other] * len(source.stack_paths))
