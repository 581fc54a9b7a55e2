"""Tests of LIP PCKh@0.5: hand tables, a loop re-implementation of the
authors' calc_pckh.py, and rows of the real LIP validation annotations."""

import math
from pathlib import Path

import numpy as np
import pytest

from nppnet_tf.data.lip_files import read_pose_csv
from nppnet_tf.lip import LIP_JOINT_NAMES
from nppnet_tf.metrics import pckh

FIXTURE = Path(__file__).parent / "fixtures" / "lip_val_pose_rows.csv"


def authors_pckh(predictions, ground_truth, threshold=0.5):
    """calc_pckh.py's steps on row-aligned arrays: NaN -> -1 everywhere,
    predictions' negatives -> 1, head size 0 for a missing head joint,
    distance -1 for excluded pairs, per-joint and pooled means of d <= th."""
    gt = np.where(np.isnan(ground_truth), -1.0, ground_truth)
    pred = np.where(np.isnan(predictions), -1.0, predictions)
    pred[pred < 0] = 1.0
    num_images, num_joints = gt.shape[:2]
    dist = np.zeros((num_images, num_joints))
    for n in range(num_images):
        head = np.linalg.norm(gt[n, 9] - gt[n, 8])
        if gt[n, 8, 0] < 0 or gt[n, 9, 0] < 0:
            head = 0
        for p in range(num_joints):
            if head == 0 or gt[n, p, 0] < 0 or gt[n, p, 1] < 0:
                dist[n, p] = -1
            else:
                dist[n, p] = np.linalg.norm(gt[n, p] - pred[n, p]) / head
    per_joint = [
        100 * np.mean(dist[:, p][dist[:, p] >= 0] <= threshold)
        for p in range(16)
    ]
    upper = dist[:, 8:16]
    average = dist[:, list(range(6)) + list(range(8, 16))]
    return (
        np.array(per_joint),
        100 * np.mean(upper[upper >= 0] <= threshold),
        100 * np.mean(average[average >= 0] <= threshold),
    )


def _random_case(seed, images=40):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 300, size=(images, 16, 2)).astype(float)
    gt[rng.uniform(size=(images, 16)) < 0.15] = np.nan  # missing joints
    gt[:3, 9] = np.nan  # images without a head top
    gt[3, 8] = np.nan  # without an upper neck
    gt[4, 9] = gt[4, 8]  # zero head size
    # Predictions near the ground truth, some NaN, some negative.
    noise = rng.normal(scale=25.0, size=gt.shape)
    pred = np.where(np.isnan(gt), rng.uniform(0, 300, gt.shape), gt) + noise
    pred[rng.uniform(size=(images, 16)) < 0.05] = np.nan
    pred[rng.uniform(size=(images, 16, 2)) < 0.05] = -7.0
    return gt, pred


@pytest.mark.parametrize("seed", range(4))
def test_random_cases_match_the_authors_loops(seed):
    gt, pred = _random_case(seed)
    ids = [f"{1000 + i}_{seed}" for i in range(len(gt))]
    shuffled = np.random.default_rng(seed).permutation(len(ids))
    predictions = {ids[i]: pred[i] for i in shuffled}  # order must not matter
    result = pckh.compute_pckh(dict(zip(ids, gt)), predictions)
    per_joint, upper_body, average = authors_pckh(pred, gt)
    np.testing.assert_allclose(result.per_joint, per_joint, rtol=1e-12)
    assert result.upper_body == pytest.approx(upper_body, rel=1e-12)
    assert result.average == pytest.approx(average, rel=1e-12)
    no_head = np.isnan(gt[:, [8, 9], 0]).any(axis=1) | np.all(
        gt[:, 8] == gt[:, 9], axis=1
    )
    assert result.images_excluded_head_size == np.sum(no_head) >= 5
    for name, (a, b) in pckh.GROUPS.items():
        assert result.groups[name] == pytest.approx(
            (per_joint[a] + per_joint[b]) / 2
        )


def test_hand_table_two_images():
    head = np.full((16, 2), np.nan)
    head[8] = [10, 10]
    head[9] = [10, 30]  # head size 20: correct within 10 px
    first = head.copy()
    first[0] = [100, 100]
    first[12] = [50, 50]
    second = head.copy()
    second[0] = [200, 200]
    second[6] = [0, 0]  # pelvis: per-joint only, not in Avg
    pred_first = first.copy()
    pred_first[0] = [110, 100]  # exactly 0.5 head: correct (<=)
    pred_first[12] = [50, 61]  # 0.55: wrong
    pred_second = second.copy()
    pred_second[0] = [230, 200]  # 1.5: wrong
    pred_second[6] = [0, 0]
    result = pckh.compute_pckh(
        {"a": first, "b": second}, {"b": pred_second, "a": pred_first}
    )
    assert result.per_joint[0] == 50.0  # 1 of 2
    assert result.per_joint[12] == 0.0
    assert result.per_joint[6] == 100.0
    assert result.per_joint[8] == result.per_joint[9] == 100.0
    assert math.isnan(result.per_joint[1])  # never annotated
    # Avg pools joints 0 (2), 8 (2), 9 (2), 12 (1): 5 correct of 7.
    assert result.average == pytest.approx(100 * 5 / 7)
    assert result.joints_counted == 7
    # U.Body pools 8, 9 (4 correct) and 12 (wrong).
    assert result.upper_body == pytest.approx(80.0)
    assert result.groups["head"] == 100.0
    # Ankle = mean(joint 0, joint 5); joint 5 is never annotated, so NaN
    # (the authors' np.mean of an empty selection gives NaN too).
    assert math.isnan(result.groups["ankle"])


def test_nan_and_negative_predictions_are_scored_at_one():
    gt = np.full((16, 2), np.nan)
    gt[8] = [1, 1]
    gt[9] = [1, 21]
    gt[0] = [1, 1]
    gt[1] = [1, 1]
    gt[2] = [50, 50]
    pred = np.full((16, 2), np.nan)  # everything NaN -> (1, 1)
    pred[1] = [-3, -4]  # negative -> (1, 1)
    result = pckh.compute_pckh({"x": gt}, {"x": pred})
    assert result.per_joint[0] == 100.0
    assert result.per_joint[1] == 100.0
    assert result.per_joint[2] == 0.0
    assert result.per_joint[8] == 100.0  # upper neck at (1, 1)
    assert result.per_joint[9] == 0.0  # head top 20 px away, threshold 10


def test_missing_and_unmatched_predictions():
    gt = np.zeros((16, 2))
    gt[9] = [0, 10]
    result = pckh.compute_pckh({"a": gt, "b": gt}, {"a": gt, "zzz": gt})
    assert result.missing_predictions == ("b",)
    assert result.unmatched_predictions == ("zzz",)
    assert result.average == 50.0  # a: all correct, b: all wrong
    summary = result.as_dict()
    assert summary["images_missing_predictions"] == 1
    assert summary["missing_prediction_ids"] == ["b"]
    assert list(summary["per_joint"]) == list(LIP_JOINT_NAMES)


def test_bad_shapes_and_threshold_are_rejected():
    with pytest.raises(ValueError, match="prediction of 'a'"):
        pckh.compute_pckh({"a": np.zeros((16, 2))}, {"a": np.zeros((15, 2))})
    with pytest.raises(ValueError, match="threshold"):
        pckh.compute_pckh({}, {}, threshold=0)


# Per-joint annotated counts of the 9 fixture images that have a head size
# (read off the fixture rows by hand).
FIXTURE_COUNTS = [6, 6, 6, 7, 6, 6, 9, 9, 9, 9, 7, 6, 8, 9, 8, 8]


def test_real_rows_perfect_predictions():
    ground_truth = {k: a.joints for k, a in read_pose_csv(FIXTURE).items()}
    assert len(ground_truth) == 15
    predictions = {k: joints[:, :2] for k, joints in ground_truth.items()}
    result = pckh.compute_pckh(ground_truth, predictions)
    assert result.images == 15
    assert (
        result.images_excluded_head_size == 6
    )  # 2 no top, 2 no neck, 2 neither
    np.testing.assert_array_equal(result.counted, FIXTURE_COUNTS)
    np.testing.assert_array_equal(result.per_joint, 100.0)
    assert result.average == 100.0 and result.upper_body == 100.0
    assert result.joints_counted == 101


def test_real_rows_boundary_at_half_the_head_size():
    ground_truth = {k: a.joints for k, a in read_pose_csv(FIXTURE).items()}
    sizes = {
        k: float(pckh.head_sizes(j[None])[0]) for k, j in ground_truth.items()
    }
    at_boundary = {}
    beyond = {}
    for image_id, joints in ground_truth.items():
        head = joints[9, :2] - joints[8, :2]
        if not np.isfinite(sizes[image_id]):
            head = np.array([10.0, 0.0])
        # Every joint moved by exactly half the head vector (exact in binary),
        # downwards so that no coordinate turns negative (negatives become 1).
        head = head if head[1] > 0 else -head
        at_boundary[image_id] = joints[:, :2] + 0.5 * head
        beyond[image_id] = joints[:, :2] + 0.5001 * head
    assert pckh.compute_pckh(ground_truth, at_boundary).average == 100.0
    assert pckh.compute_pckh(ground_truth, beyond).average == 0.0


def test_real_rows_missing_prediction_rows_count_as_wrong():
    ground_truth = {k: a.joints for k, a in read_pose_csv(FIXTURE).items()}
    predictions = {k: j[:, :2] for k, j in ground_truth.items()}
    del predictions["100142_449784"]  # scored, all 16 joints annotated
    del predictions["102588_1250988"]  # excluded anyway (no head)
    result = pckh.compute_pckh(ground_truth, predictions)
    assert result.missing_predictions == ("100142_449784", "102588_1250988")
    assert result.average == pytest.approx(100 * (101 - 14) / 101)
    expected = 100 * (np.array(FIXTURE_COUNTS) - 1) / np.array(FIXTURE_COUNTS)
    np.testing.assert_allclose(result.per_joint, expected)
