import numpy as np
import pandas as pd
import pytest
import starfile

from cryoavg.errors import InputError
from cryoavg.io.star import format_star, format_value, read_star, write_star
from tests.io.helpers import leftover_temp_files

# RELION 5.0 layout (MetaDataTable::write), written out by hand.
EXPECTED_LAYOUT = (
    "\n"
    "# version 50001\n"
    "\n"
    "data_model_general\n"
    "\n"
    "_rlnReferenceDimensionality                       2\n"
    "_rlnCurrentResolution                      0.012300\n"
    "_rlnOutputRootName                     Class2D/job001/run\n"
    "_rlnTau2FudgeFactor                        -2.50000\n"
    '_rlnSolventMaskName                    ""\n'
    " \n"
    "\n"
    "# version 50001\n"
    "\n"
    "data_model_classes\n"
    "\n"
    "loop_ \n"
    "_rlnClassNumber #1 \n"
    "_rlnReferenceImage #2 \n"
    "_rlnClassDistribution #3 \n"
    "_rlnAccuracyRotations #4 \n"
    "           1 000001@run_classes.mrcs     0.750000     -1.50000 \n"
    '           2      "x y" 2.000000e-04 1.234567e+05 \n'
    " \n"
)


def _layout_blocks():
    general = {
        "rlnReferenceDimensionality": 2,
        "rlnCurrentResolution": 0.0123,
        "rlnOutputRootName": "Class2D/job001/run",
        "rlnTau2FudgeFactor": -2.5,
        "rlnSolventMaskName": "",
    }
    classes = pd.DataFrame(
        {
            "rlnClassNumber": np.array([1, 2], dtype=np.int64),
            "rlnReferenceImage": ["000001@run_classes.mrcs", "x y"],
            "rlnClassDistribution": [0.75, 0.0002],
            "rlnAccuracyRotations": [-1.5, 123456.7],
        }
    )
    return {"model_general": general, "model_classes": classes}


def test_exact_relion_layout():
    assert format_star(_layout_blocks()) == EXPECTED_LAYOUT


def test_short_strings_are_right_aligned_in_ten_columns():
    table = pd.DataFrame({"rlnA": ["abc", "abcdefghijkl"], "rlnB": [-3, 4]})
    text = format_star({"t": table})
    rows = text.splitlines()[-3:-1]
    assert rows == [
        "       abc           -3 ",
        "abcdefghijkl            4 ",
    ]


def test_version_and_header_comments():
    text = format_star(
        {"optimiser_general": {"rlnCurrentIteration": 3}},
        version=30001,
        header_comments=[
            "RELION optimiser; version 5.0",
            "# --o Class2D/job001/run --K 5 ",
        ],
    )
    lines = text.splitlines()
    assert lines[:6] == [
        "# RELION optimiser; version 5.0",
        "# --o Class2D/job001/run --K 5 ",
        "",
        "# version 30001",
        "",
        "data_optimiser_general",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, "    0.000000"),
        (1.5, "    1.500000"),
        (-0.5, "    -0.50000"),
        (0.001, "    0.001000"),
        (0.00099, "9.900000e-04"),
        (-0.00099, "-9.90000e-04"),
        (100000.0, "100000.00000"),  # RELION's 12-character buffer cuts one decimal
        (100000.5, "1.000005e+05"),
        (-123456.0, "-1.23456e+05"),
        (np.float32(2.5), "    2.500000"),
        (5, "           5"),
        (np.int64(-3), "          -3"),
        (True, "           1"),
        (np.bool_(False), "           0"),
        ("", '""'),
        ("a b", '"a b"'),
        ("tab\there", '"tab\there"'),
        ("plain.mrcs", "plain.mrcs"),
    ],
)
def test_format_value(value, expected):
    assert format_value(value) == expected


def test_format_value_rejects_missing_and_newlines():
    with pytest.raises(ValueError, match=r"missing"):
        format_value(None)
    with pytest.raises(ValueError, match=r"line break"):
        format_value("a\nb")
    with pytest.raises(ValueError, match=r"missing"):
        format_star({"t": pd.DataFrame({"rlnA": ["x", None]}, dtype=object)})


def test_empty_tables_are_not_written():
    text = format_star({"empty": pd.DataFrame({"rlnA": []}), "nothing": {}})
    assert text == "\n"


def _roundtrip_blocks():
    general = {
        "rlnNrClasses": 50,
        "rlnPixelSize": 1.34,
        "rlnNegative": -7.25,
        "rlnTiny": 3.5e-7,
        "rlnHuge": -2.5e9,
        "rlnOutputRootName": "Class2D/job001/run",
        "rlnSolventMaskName": "",
        "rlnWithSpace": "name with spaces",
    }
    loop = pd.DataFrame(
        {
            "rlnClassNumber": np.array([1, 2, 3], dtype=np.int64),
            "rlnNegativeInts": np.array([-1, 0, 7], dtype=np.int64),
            "rlnValue": [0.5, -0.25, 12.0],
            "rlnTinyHuge": [1.25e-5, -3.75e8, 0.0],
            "rlnFlag": np.array([True, False, True]),
            "rlnComment": ["a b c", "", "plain"],
        }
    )
    return {"general": general, "table": loop}


def test_roundtrip_through_read_star(tmp_path):
    path = tmp_path / "round.star"
    blocks = _roundtrip_blocks()
    write_star(path, blocks)
    back = read_star(path)
    assert list(back) == ["general", "table"]
    general = back["general"]
    assert general["rlnNrClasses"] == 50
    assert isinstance(general["rlnNrClasses"], int)
    for key in ("rlnPixelSize", "rlnNegative", "rlnTiny", "rlnHuge"):
        assert general[key] == pytest.approx(blocks["general"][key], rel=1e-6)
    assert general["rlnOutputRootName"] == "Class2D/job001/run"
    assert general["rlnSolventMaskName"] == ""
    assert general["rlnWithSpace"] == "name with spaces"
    table = back["table"]
    original = blocks["table"]
    assert list(table.columns) == list(original.columns)
    for label in ("rlnClassNumber", "rlnNegativeInts"):
        assert pd.api.types.is_integer_dtype(table[label])
        np.testing.assert_array_equal(table[label], original[label])
    for label in ("rlnValue", "rlnTinyHuge"):
        assert pd.api.types.is_float_dtype(table[label])
        np.testing.assert_allclose(table[label], original[label], rtol=1e-6)
    np.testing.assert_array_equal(table["rlnFlag"], [1, 0, 1])
    assert list(table["rlnComment"]) == ["a b c", "", "plain"]


def test_written_file_is_readable_by_starfile(tmp_path):
    path = tmp_path / "round.star"
    blocks = _roundtrip_blocks()
    write_star(
        path, blocks, header_comments=["RELION optimiser; version 5.0", "# args "]
    )
    back = starfile.read(path, always_dict=True)
    assert back["general"]["rlnWithSpace"] == "name with spaces"
    np.testing.assert_allclose(
        back["table"]["rlnTinyHuge"], blocks["table"]["rlnTinyHuge"]
    )
    assert list(back["table"]["rlnComment"]) == ["a b c", "", "plain"]
    assert leftover_temp_files(tmp_path) == []


def test_unnamed_block_and_numeric_looking_strings(tmp_path):
    path = tmp_path / "plain.star"
    path.write_text(
        "data_\n\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n"
        "1@stack.mrcs 001\n2@stack.mrcs 002\n"
    )
    blocks = read_star(path)
    assert list(blocks) == [""]
    # rlnMicrographName is a string label: "001" must not become 1
    assert list(blocks[""]["rlnMicrographName"]) == ["001", "002"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (b"hello world\nthis is not a STAR file\n", "no data_ block"),
        (b"data_\nloop_\n_rlnA #1\n1 2 3\n4 5 6\n", "not a readable STAR"),
        (b"data_x\n_rlnA\n", "not a readable STAR"),
        (b"data_x\n", "not a readable STAR"),
        (bytes(range(256)) * 8, "STAR"),
    ],
)
def test_bad_star_files(tmp_path, content, problem):
    path = tmp_path / "bad.star"
    path.write_bytes(content)
    with pytest.raises(InputError, match=problem) as info:
        read_star(path)
    assert "bad.star" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_star_file(tmp_path):
    with pytest.raises(InputError, match=r"missing.star: file not found"):
        read_star(tmp_path / "missing.star")
    with pytest.raises(InputError, match=r"directory"):
        read_star(tmp_path)


def test_write_star_failure_leaves_no_file(tmp_path):
    path = tmp_path / "bad_value.star"
    with pytest.raises(ValueError, match=r"rlnA"):
        write_star(path, {"t": pd.DataFrame({"rlnA": ["x", None]}, dtype=object)})
    assert not path.exists()
    assert leftover_temp_files(tmp_path) == []


def test_loop_columns_format_like_format_value():
    rng = np.random.default_rng(4)
    values = rng.normal(size=500) * 10.0 ** rng.integers(-9, 9, 500)
    values = np.concatenate([values, [0.0, 1e5, -1e5, 1e-3, -1e-3, np.nan, np.inf]])
    text = format_star({"t": pd.DataFrame({"rlnValue": values})})
    rows = text.splitlines()[7:-1]
    assert rows == [format_value(v) + " " for v in values]


def test_duplicated_block_names_are_refused(tmp_path):
    """starfile would merge two data_optics blocks quietly; cryoavg names the problem."""
    path = tmp_path / "dup.star"
    block = "\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 1.5\n"
    path.write_text(
        block + block + "\ndata_particles\n\nloop_\n_rlnImageName #1\n1@a.mrcs\n"
    )
    with pytest.raises(InputError, match="data_optics appears twice"):
        read_star(path)
    # a name that only starts another (data_optics vs data_optics2) is not a duplicate
    path.write_text(block + block.replace("data_optics", "data_optics2"))
    assert set(read_star(path)) == {"optics", "optics2"}
