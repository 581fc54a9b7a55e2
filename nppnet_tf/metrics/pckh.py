"""LIP PCKh@0.5 as the authors' `utils/calc_pckh.py` computes it (reference 7.2).

* Joints in LIP order, coordinates in original image pixels.
* Head size of an image = distance between the ground-truth head top (LIP 9)
  and upper neck (LIP 8); an image lacking either (or with a zero head size)
  is excluded entirely (294 of the 10,000 LIP validation images).
* A ground-truth joint that is missing (NaN or a negative coordinate) is not
  counted; the annotation's visibility flag is ignored.
* Predicted coordinates: NaN becomes -1, then every negative value becomes 1
  (so an unlocated joint is scored at (1, 1), as the authors' reader does).
* A joint is correct iff `||pred - gt|| / head_size <= threshold` (0.5).
* Per-joint PCKh in percent; groups Head = mean(8, 9), Shoulder =
  mean(12, 13), Elbow = mean(11, 14), Wrist = mean(10, 15), Hip = mean(2, 3),
  Knee = mean(1, 4), Ankle = mean(0, 5) of the per-joint values; U.Body is
  pooled over joints 8-15 and Avg (the selection value) pooled over joints
  0-5 and 8-15 (pelvis and thorax excluded); pooled = every counted
  (image, joint) pair weighs the same.

Unlike the authors' script, predictions are matched to ground truth by image
id, not by row order (reference 7.1 step 6), and an image with ground truth
but no prediction counts every one of its joints as wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from nppnet_tf.lip import (
    LIP_HEAD_TOP,
    LIP_JOINT_NAMES,
    LIP_UPPER_NECK,
    NUM_JOINTS,
)

# Printed groups of the authors' table: name -> the two LIP joints averaged.
GROUPS: dict[str, tuple[int, int]] = {
    "head": (8, 9),
    "shoulder": (12, 13),
    "elbow": (11, 14),
    "wrist": (10, 15),
    "hip": (2, 3),
    "knee": (1, 4),
    "ankle": (0, 5),
}
UPPER_BODY_JOINTS: tuple[int, ...] = tuple(range(8, 16))
AVERAGE_JOINTS: tuple[int, ...] = tuple(range(0, 6)) + tuple(range(8, 16))


def _xy(joints: np.ndarray, what: str) -> np.ndarray:
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[1] != NUM_JOINTS or joints.shape[2] < 2:
        raise ValueError(
            f"{what} must have shape (images, 16, 2 or 3), got {joints.shape}"
        )
    return joints[:, :, :2]


def ground_truth_present(ground_truth: np.ndarray) -> np.ndarray:
    """`(images, 16)` bool: the joint is annotated (finite, non-negative x, y)."""
    xy = _xy(ground_truth, "ground_truth")
    with np.errstate(invalid="ignore"):
        return np.all(np.isfinite(xy) & (xy >= 0), axis=-1)


def head_sizes(ground_truth: np.ndarray) -> np.ndarray:
    """Head size of each image, NaN when the image is excluded.

    Args:
        ground_truth: `(images, 16, 2 or 3)` LIP-order joints, NaN = missing.

    Returns:
        `(images,)` float64: distance between head top and upper neck; NaN if
        either is missing or they coincide.
    """
    xy = _xy(ground_truth, "ground_truth")
    present = ground_truth_present(ground_truth)
    size = np.linalg.norm(xy[:, LIP_HEAD_TOP] - xy[:, LIP_UPPER_NECK], axis=-1)
    usable = present[:, LIP_HEAD_TOP] & present[:, LIP_UPPER_NECK] & (size > 0)
    return np.where(usable, size, np.nan)


def clean_predictions(predictions: np.ndarray) -> np.ndarray:
    """The authors' prediction reader: NaN -> -1, then negative -> 1."""
    xy = np.array(_xy(predictions, "predictions"))
    xy[np.isnan(xy)] = -1.0
    xy[xy < 0] = 1.0
    return xy


def normalized_distances(
    predictions: np.ndarray, ground_truth: np.ndarray
) -> np.ndarray:
    """`||pred - gt|| / head_size` per image and joint, NaN where not counted.

    Args:
        predictions: `(images, 16, 2)` LIP-order predictions (row i belongs to
            the same image as ground-truth row i); NaN allowed.
        ground_truth: `(images, 16, 2 or 3)` LIP-order ground truth.

    Returns:
        `(images, 16)` float64; NaN for missing ground-truth joints and for
        every joint of an excluded image.

    Raises:
        ValueError: shapes do not match.
    """
    gt_xy = _xy(ground_truth, "ground_truth")
    pred_xy = clean_predictions(predictions)
    if pred_xy.shape != gt_xy.shape:
        raise ValueError(
            f"predictions {pred_xy.shape[:2]} and ground truth {gt_xy.shape[:2]} differ"
        )
    size = head_sizes(ground_truth)
    with np.errstate(invalid="ignore"):
        distance = np.linalg.norm(pred_xy - gt_xy, axis=-1) / size[:, None]
    counted = ground_truth_present(ground_truth) & np.isfinite(size)[:, None]
    return np.where(counted, distance, np.nan)


@dataclasses.dataclass(frozen=True)
class PCKhResult:
    """PCKh of a set of images (percentages; NaN where nothing was counted).

    Attributes:
        per_joint: `(16,)` PCKh of each LIP joint.
        groups: `{group name: PCKh}` as in `GROUPS`.
        upper_body: pooled over joints 8-15.
        average: pooled over joints 0-5 and 8-15 (the selection value).
        correct: `(16,)` correct (image, joint) pairs per joint.
        counted: `(16,)` counted (image, joint) pairs per joint.
        images: images with ground truth.
        images_excluded_head_size: images excluded for lack of a head size.
        missing_predictions: ids of images with ground truth but no
            prediction (all their joints count as wrong), sorted.
        unmatched_predictions: ids of predictions without ground truth
            (ignored), sorted.
        threshold: the PCKh threshold.
    """

    per_joint: np.ndarray
    groups: dict[str, float]
    upper_body: float
    average: float
    correct: np.ndarray
    counted: np.ndarray
    images: int
    images_excluded_head_size: int
    missing_predictions: tuple[str, ...]
    unmatched_predictions: tuple[str, ...]
    threshold: float

    @property
    def joints_counted(self) -> int:
        """Counted (image, joint) pairs of the Avg joints."""
        return int(self.counted[list(AVERAGE_JOINTS)].sum())

    def as_dict(self) -> dict:
        """Plain Python values, joints by LIP name (NaN stays NaN)."""
        return {
            "threshold": self.threshold,
            "average": self.average,
            "upper_body": self.upper_body,
            "groups": dict(self.groups),
            "per_joint": {
                name: float(v)
                for name, v in zip(LIP_JOINT_NAMES, self.per_joint)
            },
            "counted_per_joint": {
                name: int(v) for name, v in zip(LIP_JOINT_NAMES, self.counted)
            },
            "images": self.images,
            "images_scored": self.images - self.images_excluded_head_size,
            "images_excluded_head_size": self.images_excluded_head_size,
            "images_missing_predictions": len(self.missing_predictions),
            "missing_prediction_ids": list(self.missing_predictions),
            "unmatched_prediction_ids": list(self.unmatched_predictions),
            "joints_counted": self.joints_counted,
        }


def _percent(correct: float, counted: float) -> float:
    return 100.0 * correct / counted if counted else float("nan")


def pckh_from_distances(
    distances: np.ndarray, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """`(correct, counted)` per joint from `normalized_distances` (NaN = not
    counted, +inf = counted and wrong)."""
    distances = np.asarray(distances, dtype=np.float64)
    counted = ~np.isnan(distances)
    with np.errstate(invalid="ignore"):
        correct = counted & (distances <= threshold)
    return correct.sum(axis=0), counted.sum(axis=0)


def summarize(
    correct: np.ndarray,
    counted: np.ndarray,
) -> tuple[np.ndarray, dict[str, float], float, float]:
    """Per-joint, group, U.Body and Avg PCKh (percent) from per-joint counts."""
    correct = np.asarray(correct, dtype=np.float64)
    counted = np.asarray(counted, dtype=np.float64)
    per_joint = np.array([_percent(c, n) for c, n in zip(correct, counted)])
    groups = {
        name: float((per_joint[a] + per_joint[b]) / 2)
        for name, (a, b) in GROUPS.items()
    }
    upper = list(UPPER_BODY_JOINTS)
    average = list(AVERAGE_JOINTS)
    upper_body = _percent(correct[upper].sum(), counted[upper].sum())
    mean = _percent(correct[average].sum(), counted[average].sum())
    return per_joint, groups, upper_body, mean


def compute_pckh(
    ground_truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    threshold: float = 0.5,
) -> PCKhResult:
    """PCKh of predictions matched to ground truth by image id.

    Args:
        ground_truth: `{image_id: (16, 2 or 3) LIP-order joints}`, NaN =
            missing (e.g. `PoseAnnotation.joints` of `read_pose_csv`).
        predictions: `{image_id: (16, 2) LIP-order x, y}`. Images of
            `ground_truth` without a prediction count every joint as wrong;
            predictions of other images are ignored (and listed).
        threshold: fraction of the head size (0.5 for PCKh@0.5).

    Returns:
        A `PCKhResult`.

    Raises:
        ValueError: a joints array has the wrong shape or the threshold is
            not positive.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    ids = sorted(ground_truth)
    gt = np.zeros((len(ids), NUM_JOINTS, 2))
    pred = np.zeros((len(ids), NUM_JOINTS, 2))
    has_prediction = np.zeros(len(ids), bool)
    for row, image_id in enumerate(ids):
        gt[row] = _joints(
            ground_truth[image_id], f"ground truth of {image_id!r}"
        )
        if image_id in predictions:
            pred[row] = _joints(
                predictions[image_id], f"prediction of {image_id!r}"
            )
            has_prediction[row] = True
    distances = normalized_distances(pred, gt)
    # A missing prediction: every counted joint is wrong.
    distances[~has_prediction] = np.where(
        np.isnan(distances[~has_prediction]), np.nan, np.inf
    )
    correct, counted = pckh_from_distances(distances, threshold)
    per_joint, groups, upper_body, average = summarize(correct, counted)
    return PCKhResult(
        per_joint=per_joint,
        groups=groups,
        upper_body=upper_body,
        average=average,
        correct=correct,
        counted=counted,
        images=len(ids),
        images_excluded_head_size=int(np.sum(np.isnan(head_sizes(gt)))),
        missing_predictions=tuple(
            i for i, p in zip(ids, has_prediction) if not p
        ),
        unmatched_predictions=tuple(
            sorted(set(predictions) - set(ground_truth))
        ),
        threshold=float(threshold),
    )


def _joints(joints: np.ndarray, what: str) -> np.ndarray:
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 2 or joints.shape[0] != NUM_JOINTS or joints.shape[1] < 2:
        raise ValueError(
            f"{what}: expected (16, 2 or 3) joints, got shape {joints.shape}"
        )
    return joints[:, :2]
