import subprocess
import sys
import warnings

import mrcfile
import numpy as np
import pytest

from cryoavg.cli.localsym import run_localsym
from cryoavg.errors import CryoavgError
from cryoavg.io.mrc import read_map_3d, write_mrc
from cryoavg.localsym.io import read_mask_info, write_operator_star
from cryoavg.localsym.operators import (
    LocalSymmetryOperator,
    MaskOperators,
    same_operator,
)
from tests.conftest import compose_job

from ._synthetic import operator_between, two_copy_map

PX = 2.0


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("localsym")
    truth = operator_between((37.0, 64.0, -21.0), (-9, 3, 2), (9, -4, -3), PX)
    volume, mask, _, _ = two_copy_map(truth, 48, PX)
    write_mrc(root / "map.mrc", volume, PX)
    write_mrc(root / "mask.mrc", mask, PX)
    write_operator_star(
        root / "ops.star", [MaskOperators(str(root / "mask.mrc"), [truth])]
    )
    return root, truth


def _cfg(function, **keys):
    return compose_job(
        "localsym", [f"function={function}", *[f"{k}={v}" for k, v in keys.items()]]
    )


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "cryoavg.cli.main", "localsym", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _one_line_error(out, *fragments):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_apply_duplicate_transform_run(project, tmp_path):
    root, _truth = project
    run_localsym(
        _cfg(
            "apply",
            i_map=root / "map.mrc",
            i_mask_info=root / "ops.star",
            o_map=tmp_path / "sym.mrc",
            angpix=PX,
        )
    )
    sym, pixel = read_map_3d(tmp_path / "sym.mrc")
    assert sym.shape == (48, 48, 48)
    assert pixel == pytest.approx(PX)
    run_localsym(
        _cfg(
            "duplicate",
            i_mask_info=root / "ops.star",
            o_map=tmp_path / "dup.mrc",
            angpix=PX,
        )
    )
    dup, _ = read_map_3d(tmp_path / "dup.mrc")
    assert dup.max() > 0.9
    run_localsym(
        _cfg(
            "transform",
            i_map=root / "map.mrc",
            o_map=tmp_path / "t.mrc",
            rot=10,
            tilt=20,
            psi=30,
            xoff=4,
        )
    )
    assert (tmp_path / "t.mrc").is_file()


def _local_search(project, tmp_path, angle_offsets, out_name, **keys):
    """Run ``search`` from the truth turned by ``angle_offsets``; return start, result."""
    root, truth = project
    start = LocalSymmetryOperator(
        *(a + d for a, d in zip(truth.angles_degrees, angle_offsets, strict=True)),
        truth.translation_angstrom,
    )
    write_operator_star(
        tmp_path / "start.star", [MaskOperators(str(root / "mask.mrc"), [start])]
    )
    out = tmp_path / out_name
    run_localsym(
        _cfg(
            "search",
            i_map=root / "map.mrc",
            i_mask_info=tmp_path / "start.star",
            o_mask_info=out,
            angpix=PX,
            offset_range=2,
            offset_step=2,
            **keys,
        )
    )
    return start, read_mask_info(out)[0].operators[0]


def test_local_search_and_refine_write_star(project, tmp_path):
    truth = project[1]
    _, found = _local_search(
        project,
        tmp_path,
        (1, 0, -1),
        "maskinfo_iter001.star",
        ang_range=2,
        ang_step=1,
        refine_after_search="true",
    )
    assert same_operator(found, truth, 0.2)
    assert (tmp_path / "maskinfo_iter001_cc_mask001_op001.star").is_file()


def test_local_search_on_the_healpix_grid(project, tmp_path):
    truth = project[1]
    start, found = _local_search(
        project,
        tmp_path,
        (1, 1, 0),
        "healpix.star",
        ang_range=3,
        ang_step=2,
        use_healpix="true",
    )
    # order 5 (1.875°): the grid holds a rotation within ~1.5° of the truth
    assert same_operator(found, truth, 2.0)
    assert not same_operator(found, start, 1e-3)


def test_microtubule_and_txt2rln(tmp_path):
    run_localsym(
        _cfg("microtubule", o_mask_info=tmp_path / "mt.txt", mask_name="pf7.mrc")
    )
    run_localsym(
        _cfg(
            "txt2rln", i_mask_info=tmp_path / "mt.txt", o_mask_info=tmp_path / "mt.star"
        )
    )
    groups = read_mask_info(tmp_path / "mt.star")
    assert groups[0].mask_name == "pf7.mrc"
    assert len(groups[0].operators) == 12


def test_bad_inputs_raise_one_line_errors(project, tmp_path):
    root, truth = project
    bad_ops = tmp_path / "far.star"
    far = LocalSymmetryOperator(
        *truth.angles_degrees, (truth.translation_angstrom[0] + 40, 0.0, 0.0)
    )
    write_operator_star(bad_ops, [MaskOperators(str(root / "mask.mrc"), [far])])
    with pytest.raises(CryoavgError, match="sphere"):
        run_localsym(
            _cfg(
                "apply",
                i_map=root / "map.mrc",
                i_mask_info=bad_ops,
                o_map=tmp_path / "x.mrc",
            )
        )
    nan_map = np.zeros((48, 48, 48), np.float32)
    nan_map[0, 0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.new(tmp_path / "nan.mrc") as handle:
            handle.set_data(nan_map)
            handle.voxel_size = PX
    with pytest.raises(CryoavgError, match="NaN"):
        run_localsym(
            _cfg(
                "apply",
                i_map=tmp_path / "nan.mrc",
                i_mask_info=root / "ops.star",
                o_map=tmp_path / "x.mrc",
            )
        )
    small = np.zeros((32, 32, 32), np.float32)
    small[10:20, 10:20, 10:20] = 1
    write_mrc(tmp_path / "small.mrc", small, PX)
    write_operator_star(
        tmp_path / "small.star", [MaskOperators(str(tmp_path / "small.mrc"), [truth])]
    )
    with pytest.raises(CryoavgError, match="shape"):
        run_localsym(
            _cfg(
                "apply",
                i_map=root / "map.mrc",
                i_mask_info=tmp_path / "small.star",
                o_map=tmp_path / "x.mrc",
            )
        )
    with pytest.raises(CryoavgError, match="needs"):
        run_localsym(_cfg("apply", i_map=root / "map.mrc"))
    assert not (tmp_path / "x.mrc").exists()


def test_command_line(project, tmp_path):
    root, _ = project
    ok = _cli(
        "apply",
        f"i_map={root / 'map.mrc'}",
        f"i_mask_info={root / 'ops.star'}",
        "o_map=sym.mrc",
        "angpix=2",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "sym.mrc").is_file()
    zero = np.zeros((48, 48, 48), np.float32)
    write_mrc(tmp_path / "zero.mrc", zero, PX)
    write_operator_star(
        tmp_path / "zero.star",
        [
            MaskOperators(
                str(tmp_path / "zero.mrc"),
                [LocalSymmetryOperator(10, 20, 30, (2, 0, 0))],
            )
        ],
    )
    out = _cli(
        "apply",
        f"i_map={root / 'map.mrc'}",
        "i_mask_info=zero.star",
        "o_map=bad.mrc",
        cwd=tmp_path,
    )
    _one_line_error(out, "zero.mrc", "entirely zero")
    (tmp_path / "cols.star").write_text(
        "data_\nloop_\n_rlnMaskName #1\n_rlnAngleRot #2\nm.mrc 1\n"
    )
    out = _cli(
        "search",
        f"i_map={root / 'map.mrc'}",
        "i_mask_info=cols.star",
        "o_mask_info=o.star",
        cwd=tmp_path,
    )
    _one_line_error(out, "cols.star", "missing column")
    assert not (tmp_path / "bad.mrc").exists()
    assert not (tmp_path / "o.star").exists()
    out = _cli("nosuchfunction", cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown localsym function" in out.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="needs a machine without CUDA"
)
def test_search_on_a_missing_gpu_is_one_line(project, tmp_path):
    root, _ = project
    out = _cli(
        "search",
        f"i_map={root / 'map.mrc'}",
        f"i_mask_info={root / 'ops.star'}",
        f"o_mask_info={tmp_path / 'out.star'}",
        "ang_range=1",
        "device=cuda",
        cwd=tmp_path,
    )
    _one_line_error(out, "device=cuda", "no CUDA device")
    assert not (tmp_path / "out.star").exists()
