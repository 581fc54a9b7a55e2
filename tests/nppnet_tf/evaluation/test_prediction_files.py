"""Tests of scoring LIP challenge-format prediction files."""

import json

import numpy as np
import pytest
from PIL import Image

from nppnet_tf.data.lip_files import format_prediction_row, read_pose_csv
from nppnet_tf.evaluation.prediction_files import (
    evaluate_prediction_files,
    json_ready,
    read_label_png,
    read_prediction_csv,
)
from nppnet_tf.lip import CLASS_NAMES, LIP_JOINT_NAMES
from nppnet_tf.metrics.confusion import confusion_matrix
from nppnet_tf.metrics.mean_iou import mean_iou


def _write_pngs(directory, labels_by_id):
    directory.mkdir(parents=True, exist_ok=True)
    for image_id, labels in labels_by_id.items():
        Image.fromarray(np.asarray(labels, np.uint8)).save(
            directory / f"{image_id}.png"
        )


def _perfect_pose_csv(lip_root, path, ids, shuffle=False):
    gt = read_pose_csv(
        lip_root / "TrainVal_pose_annotations" / "lip_val_set.csv"
    )
    order = list(ids)[::-1] if shuffle else list(ids)
    rows = [
        format_prediction_row(i + (".jpg" if shuffle else ""), gt[i].joints)
        for i in order
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_perfect_predictions_score_100(
    lip_root, lip_ids, ground_truth_labels, tmp_path
):
    predictions = {
        i: np.where(gt == 255, 0, gt) for i, gt in ground_truth_labels.items()
    }
    _write_pngs(tmp_path / "parsing", predictions)
    csv = _perfect_pose_csv(
        lip_root, tmp_path / "pose.csv", lip_ids, shuffle=True
    )
    report = evaluate_prediction_files(
        lip_root, "val", tmp_path / "parsing", csv
    )
    parsing, pose = report["parsing"], report["pose"]
    assert parsing["mean_iou"] == 100.0 and parsing["pixel_accuracy"] == 100.0
    assert list(parsing["per_class_iou"]) == list(CLASS_NAMES)
    assert parsing["images_scored"] == 4 and parsing["ignored_pixels"] == 12
    assert pose["average"] == 100.0
    assert list(pose["per_joint"]) == list(LIP_JOINT_NAMES)
    assert pose["images_excluded_head_size"] == 1
    assert pose["images_scored"] == 3
    assert report["units"] == "percent" and report["images"] == 4


def test_missing_predictions_count_as_misses_and_are_listed(
    lip_root, lip_ids, ground_truth_labels, tmp_path
):
    rng = np.random.default_rng(1)
    predictions = {
        i: np.where(
            rng.uniform(size=gt.shape) < 0.3, rng.integers(0, 20, gt.shape), gt
        )
        for i, gt in ground_truth_labels.items()
    }
    predictions = {i: np.where(p == 255, 0, p) for i, p in predictions.items()}
    del predictions["100142_449784"]
    _write_pngs(tmp_path / "parsing", predictions)
    csv = _perfect_pose_csv(lip_root, tmp_path / "pose.csv", lip_ids[1:])
    report = evaluate_prediction_files(
        lip_root, "val", tmp_path / "parsing", csv
    )
    # Reference: the missing image's pixels are ground truth nobody predicted.
    confusion = sum(
        confusion_matrix(ground_truth_labels[i], p)
        for i, p in predictions.items()
    )
    missed = ground_truth_labels["100142_449784"]
    unpredicted = np.bincount(missed[missed < 20], minlength=20)
    assert report["parsing"]["mean_iou"] == pytest.approx(
        100 * mean_iou(confusion, unpredicted)
    )
    assert report["parsing"]["mean_iou"] < 100 * mean_iou(confusion)
    assert report["parsing"]["missing_prediction_ids"] == ["100142_449784"]
    pose = report["pose"]
    assert pose["missing_prediction_ids"] == ["100034_483681"]
    # Avg counts 14 joints (pelvis, thorax out); 100034_483681 lacks joint 2,
    # so 13 of its joints count, all wrong.
    assert pose["joints_counted"] == 13 + 14 + 14
    assert pose["average"] == pytest.approx(100 * 28 / 41)


def test_wrong_size_prediction_is_resized_nearest_and_reported(
    lip_root, ground_truth_labels, tmp_path
):
    labels = ground_truth_labels["10024_490664"]
    clean = np.where(labels == 255, 0, labels)
    half = clean[::2, ::2]  # nearest upsampling by 2 restores the bands
    _write_pngs(tmp_path / "parsing", {"10024_490664": half})
    report = evaluate_prediction_files(
        lip_root, "val", parsing_dir=tmp_path / "parsing"
    )
    parsing = report["parsing"]
    assert parsing["resized_prediction_ids"] == ["10024_490664"]
    assert parsing["images_missing_predictions"] == 3
    assert "pose" not in report
    expected = np.asarray(
        Image.fromarray(half.astype(np.int32)).resize(
            (labels.shape[1], labels.shape[0]), Image.Resampling.NEAREST
        )
    )
    confusion = confusion_matrix(labels, expected)
    assert parsing["confusion_matrix"] == confusion.tolist()


def test_malformed_pngs_are_named(lip_root, ground_truth_labels, tmp_path):
    directory = tmp_path / "parsing"
    directory.mkdir()
    (directory / "100034_483681.png").write_text("not a png")
    with pytest.raises(
        ValueError, match="100034_483681.png: not a readable image"
    ):
        evaluate_prediction_files(lip_root, "val", parsing_dir=directory)
    Image.new("RGB", (4, 4)).save(directory / "100034_483681.png")
    with pytest.raises(ValueError, match="single-channel.*'RGB'"):
        evaluate_prediction_files(lip_root, "val", parsing_dir=directory)
    bad = np.full(ground_truth_labels["100034_483681"].shape, 20, np.uint8)
    _write_pngs(directory, {"100034_483681": bad})
    with pytest.raises(
        ValueError, match=r"100034_483681.png: prediction values.*\[20\]"
    ):
        evaluate_prediction_files(lip_root, "val", parsing_dir=directory)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("100034_483681,1,2,3", r"pose.csv:2: prediction row has 4 fields"),
        (
            "100034_483681," + ",".join(["1"] * 31) + ",x",
            r"pose.csv:2: .*non-numeric value 'x'",
        ),
        (
            "10024_490664," + ",".join(["1"] * 32),
            r"pose.csv:2: duplicate prediction",
        ),
    ],
)
def test_malformed_csv_rows_name_file_and_line(
    lip_root, tmp_path, line, message
):
    csv = tmp_path / "pose.csv"
    csv.write_text("10024_490664," + ",".join(["5"] * 32) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        evaluate_prediction_files(lip_root, "val", pose_csv=csv)


def test_missing_inputs(lip_root, tmp_path):
    with pytest.raises(ValueError, match="parsing predictions"):
        evaluate_prediction_files(lip_root, "val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate_prediction_files(
            lip_root, "val", parsing_dir=tmp_path / "nowhere"
        )
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_prediction_csv(tmp_path / "absent.csv")
    with pytest.raises(FileNotFoundError, match="val_id.txt"):
        evaluate_prediction_files(tmp_path, "val", pose_csv=tmp_path / "x.csv")


def test_read_label_png_palette_gives_indices(tmp_path):
    image = Image.fromarray(np.array([[0, 5], [19, 2]], np.uint8)).convert("P")
    image.putpalette([255, 0, 0] * 256)
    image.save(tmp_path / "p.png")
    labels = read_label_png(tmp_path / "p.png")
    assert labels.dtype == np.int32 and labels.shape == (2, 2)


def test_json_ready_replaces_nan_by_null():
    value = {"a": float("nan"), "b": [np.float64(1.5), (np.nan,)], "c": "x"}
    assert (
        json.dumps(json_ready(value), allow_nan=False)
        == '{"a": null, "b": [1.5, [null]], "c": "x"}'
    )
