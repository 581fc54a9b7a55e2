"""LIP file readers: reason codes and image ids on bad rows, real quirks."""

import io
import json

import numpy as np
import pytest

from nppnet_tf.data import lip_files

GOOD = "100034_483681.jpg," + ",".join(["1,2,0"] * 15 + ["nan,nan,nan"])


def test_good_row_and_missing_joint():
    row = lip_files.parse_pose_row(GOOD)
    assert row.image_id == "100034_483681"
    assert row.present.tolist() == [True] * 15 + [False]


@pytest.mark.parametrize(
    "line, reason, image_id",
    [
        ("a.jpg,1,2,3", "field_count", "a"),
        ("," + ",".join(["1"] * 48), "empty_name", None),
        ("b.jpg," + ",".join(["x"] * 48), "non_numeric", "b"),
        ("c.jpg,inf," + ",".join(["1"] * 47), "non_numeric", "c"),
        ("d.jpg,1,nan,0," + ",".join(["1"] * 45), "partial_joint", "d"),
    ],
)
def test_bad_rows_carry_reason_and_id(line, reason, image_id):
    with pytest.raises(lip_files.AnnotationError) as info:
        lip_files.parse_pose_row(line)
    assert info.value.reason == reason
    assert info.value.image_id == image_id


def test_iter_pose_lines_numbers_lines_and_keeps_errors():
    text = GOOD + "\n\nbad.jpg,1\n" + GOOD.replace("100034", "7")
    items = list(lip_files.iter_pose_lines(io.StringIO(text)))
    assert [number for number, _, _ in items] == [1, 3, 4]
    assert isinstance(items[1][2], lip_files.AnnotationError)
    assert items[2][2].image_id == "7_483681"


def test_strict_reader_names_file_line_and_reason(tmp_path):
    path = tmp_path / "pose.csv"
    path.write_text(GOOD + "\n" + GOOD)
    with pytest.raises(
        lip_files.AnnotationError, match=":2: duplicate"
    ) as info:
        lip_files.read_pose_csv(path)
    assert info.value.reason == "duplicate_id"


def test_annotation_json_text_and_reasons():
    joints = np.ones((16, 3)).tolist()
    joints[3] = [0, 0, 0]
    text = json.dumps(
        {
            "root": [
                {"im_name": "1_2.jpg", "joint_self": joints, "objpos": [5, 6]},
                {"im_name": "3_4.jpg", "joint_self": [[1, 2]]},
                {"joint_self": joints},
            ]
        }
    )
    good, short, nameless = lip_files.parse_annotation_json(text, "x.json")
    assert good.center == (5.0, 6.0)
    assert np.isnan(good.joints[3]).all()
    assert (short.reason, short.image_id) == ("field_count", "3_4")
    assert (nameless.reason, nameless.image_id) == ("empty_name", None)
    with pytest.raises(lip_files.AnnotationError, match="x.json"):
        lip_files.parse_annotation_json("[1, 2", "x.json")


def test_real_validation_rows_parse():
    # Three rows copied from the authors' pose_gt.csv (LIP validation set).
    rows = [
        "100034_483681.jpg,153,351,0,122,284,0,nan,nan,nan,152,198,0,79,294,0,118,389,0,"
        "40,49,0,71,132,0,59,77,0,38,27,0,118,201,1,96,162,1,74,95,1,93,98,0,121,157,0,"
        "81,208,0",
        "10005_205677.jpg,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan,"
        "nan,nan,nan,63,236,0,57,128,0,60,87,0,13,36,0,18,214,1,15,164,1,20,102,0,112,"
        "93,0,127,169,0,105,238,0",
    ]
    first, second = (lip_files.parse_pose_row(r) for r in rows)
    assert first.present.sum() == 15
    assert second.present.sum() == 10
