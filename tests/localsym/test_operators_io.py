import mrcfile
import numpy as np
import pytest
import torch

from cryoavg.errors import InputError
from cryoavg.io.mrc import write_mrc
from cryoavg.localsym.io import (
    load_mask,
    read_dm_text,
    read_mask_info,
    read_mask_list,
    read_operator_star,
    write_dm_text,
    write_operator_star,
)
from cryoavg.localsym.operators import (
    LocalSymmetryOperator,
    MaskOperators,
    operators_to_tensors,
    same_operator,
)
from cryoavg.ops.rotations import rotation_angle_degrees


def test_inverse_and_compose_give_identity():
    op = LocalSymmetryOperator(37.0, 64.0, -21.0, (31.0, -19.5, 2.0))
    ident = op.compose(op.inverse())
    assert ident.is_identity(1e-6)
    assert op.inverse().inverse() == pytest.approx(op) or same_operator(
        op.inverse().inverse(), op
    )


def test_matrix_is_relion_a_and_translation_in_px():
    op = LocalSymmetryOperator(0.0, 0.0, 90.0, (2.0, 4.0, 6.0))
    matrix = op.matrix()
    # for rot = tilt = 0, A restricted to xy is Rz(-psi)
    np.testing.assert_allclose(matrix[:2, :2], [[0, 1], [-1, 0]], atol=1e-12)
    np.testing.assert_allclose(op.translation_px(2.0), [1, 2, 3])
    matrices, shifts = operators_to_tensors([op, op], 2.0)
    assert matrices.shape == (2, 3, 3)
    assert shifts.shape == (2, 3)


def test_standardisation_keeps_rotation():
    op = LocalSymmetryOperator(185.0, 0.5, 200.0, (1.0, 2.0, 3.0))
    std = op.standardised()
    assert abs(std.rot_degrees) <= 180
    assert abs(std.psi_degrees) <= 180
    angle = rotation_angle_degrees(op.matrix().T @ std.matrix())
    assert float(angle) < 1e-6
    regular = LocalSymmetryOperator(30.0, 40.0, 50.0)
    assert regular.standardised() == regular


def _star(path, header, rows):
    lines = ["", "data_", "", "loop_"]
    lines += [f"_{name} #{i + 1}" for i, name in enumerate(header)]
    lines += [" ".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def test_star_round_trip(tmp_path):
    groups = [
        MaskOperators(
            "masks/a.mrc",
            [
                LocalSymmetryOperator(10.0, 20.0, 30.0, (1.5, -2.5, 3.25)),
                LocalSymmetryOperator(-40.0, 120.0, 170.0, (10.0, 0.0, -7.0)),
            ],
        ),
        MaskOperators("masks/b.mrc", [LocalSymmetryOperator(5, 95, -5, (0, 1, 2))]),
    ]
    path = tmp_path / "ops.star"
    write_operator_star(path, groups)
    back = read_mask_info(path)
    assert [g.mask_name for g in back] == ["masks/a.mrc", "masks/b.mrc"]
    for g0, g1 in zip(groups, back, strict=True):
        for a, b in zip(g0.operators, g1.operators, strict=True):
            assert same_operator(a, b, 1e-4)
    text = path.read_text()
    assert "_rlnOriginXAngst" in text
    assert "# version 50001" in text


def test_dm_text_round_trip_and_matrix_forms(tmp_path):
    groups = [MaskOperators("m.mrc", [LocalSymmetryOperator(10, 20, 30, (1, 2, 3))])]
    path = tmp_path / "ops.txt"
    write_dm_text(path, groups)
    back = read_dm_text(path)
    assert same_operator(back[0].operators[0], groups[0].operators[0], 1e-4)
    # ROTA MATRIX M: angles are those of M^T
    m = LocalSymmetryOperator(10, 20, 30).matrix().T.numpy()
    rows = [" ".join(f"{v:.9f}" for v in row) for row in m]
    (tmp_path / "mat.txt").write_text(
        f"MASKFILENAME m.mrc\nROTA MATRIX {rows[0]}\n{rows[1]}\n{rows[2]}\n"
        "TRAN 1 2 3\nOMAT\n" + "\n".join(rows) + "\n4 5 6\n"
    )
    parsed = read_dm_text(tmp_path / "mat.txt")[0].operators
    assert same_operator(parsed[0], LocalSymmetryOperator(10, 20, 30, (1, 2, 3)), 1e-4)
    assert parsed[1].translation_angstrom == (4.0, 5.0, 6.0)


def test_old_origin_columns_identity_dropped(tmp_path):
    path = tmp_path / "old.star"
    header = ["rlnMaskName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    header += ["rlnOriginX", "rlnOriginY", "rlnOriginZ"]
    _star(path, header, [["a.mrc", 0, 0, 0, 0, 0, 0], ["a.mrc", 10, 20, 30, 1, 2, 3]])
    groups = read_mask_info(path)
    assert len(groups[0].operators) == 1
    assert groups[0].operators[0].translation_angstrom == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        (
            [["a.mrc", 10, 20, 30, 1, 2, 3], ["a.mrc", 10, 20, 30, 1, 2, 3]],
            "duplicated",
        ),
        (
            [["x/a.mrc", 10, 20, 30, 1, 2, 3], ["y/a.mrc", 10, 20, 30, 1, 2, 3]],
            "basename",
        ),
        ([["a.mrc", 0, 0, 0, 0, 0, 0]], "no non-identity"),
    ],
)
def test_operator_star_errors(tmp_path, rows, fragment):
    path = tmp_path / "bad.star"
    header = ["rlnMaskName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    header += ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]
    _star(path, header, rows)
    with pytest.raises(InputError, match=fragment):
        read_mask_info(path)


def test_table_without_rows_is_error(tmp_path):
    # a loop header and no rows (found by the full operator-STAR fuzz test)
    path = tmp_path / "empty.star"
    path.write_text(
        "data_\n\nloop_\n_rlnMaskName #1\n_rlnAngleRot #2\n_rlnAngleTilt #3\n"
        "_rlnAnglePsi #4\n_rlnOriginXAngst #5\n_rlnOriginYAngst #6\n"
        "_rlnOriginZAngst #7\n"
    )
    with pytest.raises(InputError, match="no operators"):
        read_operator_star(path)
    text = tmp_path / "empty.txt"
    text.write_text("\n")
    with pytest.raises(InputError):
        read_dm_text(text)


def test_missing_columns_is_error(tmp_path):
    path = tmp_path / "bad.star"
    _star(path, ["rlnMaskName", "rlnAngleRot"], [["a.mrc", 1]])
    with pytest.raises(InputError, match="missing column"):
        read_mask_info(path)


def test_mask_list(tmp_path):
    path = tmp_path / "list.star"
    _star(
        path, ["rlnMaskName", "rlnAreaId"], [["a.mrc", 1], ["b.mrc", 1], ["c.mrc", 1]]
    )
    areas = read_mask_list(path)
    assert areas[0].mask_names == ["a.mrc", "b.mrc", "c.mrc"]
    _star(path, ["rlnMaskName", "rlnAreaId"], [["a.mrc", 1], ["b.mrc", 2]])
    with pytest.raises(InputError, match="area 1"):
        read_mask_list(path)


def test_mask_validation(tmp_path):
    good = np.zeros((16, 16, 16), np.float32)
    good[6:10, 6:10, 6:10] = 1
    write_mrc(tmp_path / "m.mrc", good, 2.0)
    mask = load_mask(tmp_path / "m.mrc", (16, 16, 16), 2.0)
    assert torch.is_tensor(mask)
    assert float(mask.max()) == 1.0
    with pytest.raises(InputError, match="shape"):
        load_mask(tmp_path / "m.mrc", (20, 20, 20), 2.0)
    with pytest.raises(InputError, match="pixel size"):
        load_mask(tmp_path / "m.mrc", (16, 16, 16), 3.0)
    write_mrc(tmp_path / "z.mrc", np.zeros_like(good), 2.0)
    with pytest.raises(InputError, match="entirely zero"):
        load_mask(tmp_path / "z.mrc", (16, 16, 16), 2.0)
    write_mrc(tmp_path / "r.mrc", good * 3, 2.0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_mask(tmp_path / "r.mrc", (16, 16, 16), 2.0)
    with mrcfile.open(tmp_path / "m.mrc", "r+") as handle:
        handle.header.origin.x = 10.0
    notes = []
    load_mask(tmp_path / "m.mrc", (16, 16, 16), 2.0, notes)
    assert notes
    assert "origin" in notes[0]
