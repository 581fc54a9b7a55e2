"""Parsing scores from an accumulated confusion matrix (reference 7.1, 7.3).

All scores are fractions in [0, 1] computed from counts summed over all
images (never averaged per image). With `tp_c` the diagonal, `gt_c` the
ground-truth pixels of class c (row sum plus unpredicted pixels, see
`confusion.ConfusionMatrix`) and `pred_c` the pixels predicted as c:

* `mean_iou`: IoU_c = tp_c / max(1, gt_c + pred_c - tp_c), mean over *all*
  classes, a class absent from ground truth and prediction scoring 0. This
  is the authors' training-time validation value used for model selection.
* `mean_iou_present_classes`: IoU_c = tp_c / (gt_c + pred_c - tp_c), NaN for
  a class absent from both, then the NaN-mean: the official LIP script
  (`utils/calc_miou.py`). On the full LIP validation set every class is
  present and both agree.
* `pixel_accuracy` = sum tp / sum gt; `mean_accuracy` = NaN-mean of
  tp_c / gt_c; `frequency_weighted_iou` = sum over classes with gt_c > 0 of
  (gt_c / sum gt) IoU_c.

Scores that are undefined (no counted pixel at all) are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nppnet_tf.lip import CLASS_NAMES


def _counts(
    confusion: np.ndarray, unpredicted: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(
            f"confusion must be a square matrix, got shape {confusion.shape}"
        )
    ground_truth = confusion.sum(axis=1)
    if unpredicted is not None:
        unpredicted = np.asarray(unpredicted, dtype=np.float64)
        if unpredicted.shape != ground_truth.shape:
            raise ValueError(
                f"unpredicted must have shape {ground_truth.shape}, got {unpredicted.shape}"
            )
        ground_truth = ground_truth + unpredicted
    return np.diag(confusion), ground_truth, confusion.sum(axis=0)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def per_class_iou(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> np.ndarray:
    """IoU of each class, tp / max(1, union): absent classes score 0.

    Args:
        confusion: `(classes, classes)` counts, rows ground truth.
        unpredicted: optional `(classes,)` ground-truth pixels with no
            prediction (misses).

    Returns:
        `(classes,)` float64 array.
    """
    tp, ground_truth, predicted = _counts(confusion, unpredicted)
    return tp / np.maximum(1.0, ground_truth + predicted - tp)


def mean_iou(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> float:
    """Mean of `per_class_iou` over all classes (the selection value, 7.1)."""
    return float(np.mean(per_class_iou(confusion, unpredicted)))


def per_class_iou_or_nan(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> np.ndarray:
    """IoU of each class, NaN for a class absent from ground truth and
    prediction (the official `calc_miou.py` definition)."""
    tp, ground_truth, predicted = _counts(confusion, unpredicted)
    return _divide(tp, ground_truth + predicted - tp)


def mean_iou_present_classes(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> float:
    """NaN-mean of `per_class_iou_or_nan` (the official LIP mIoU, 7.3)."""
    return _nanmean(per_class_iou_or_nan(confusion, unpredicted))


def pixel_accuracy(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> float:
    """Correct pixels / counted pixels."""
    tp, ground_truth, _ = _counts(confusion, unpredicted)
    return float(_divide(tp.sum(), ground_truth.sum()))


def per_class_accuracy(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> np.ndarray:
    """tp_c / gt_c, NaN for classes without ground-truth pixels."""
    tp, ground_truth, _ = _counts(confusion, unpredicted)
    return _divide(tp, ground_truth)


def mean_accuracy(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> float:
    """NaN-mean of `per_class_accuracy`."""
    return _nanmean(per_class_accuracy(confusion, unpredicted))


def frequency_weighted_iou(
    confusion: np.ndarray, unpredicted: np.ndarray | None = None
) -> float:
    """Sum over classes with ground truth of (gt_c / total) * IoU_c."""
    tp, ground_truth, predicted = _counts(confusion, unpredicted)
    total = ground_truth.sum()
    if total == 0:
        return float("nan")
    present = ground_truth > 0
    iou = tp[present] / (ground_truth + predicted - tp)[present]
    return float(np.sum(ground_truth[present] / total * iou))


def parsing_scores(
    confusion: np.ndarray,
    unpredicted: np.ndarray | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict:
    """Every parsing score of a confusion matrix, as plain Python values.

    Args:
        confusion: `(classes, classes)` counts, rows ground truth.
        unpredicted: optional `(classes,)` ground-truth pixels with no
            prediction.
        class_names: one name per class (LIP's by default).

    Returns:
        A dict: `mean_iou`, `mean_iou_present_classes`, `pixel_accuracy`,
        `mean_accuracy`, `frequency_weighted_iou` (floats, NaN if undefined),
        `per_class_iou` and `per_class_accuracy` (`{class name: value}`,
        IoU as in `per_class_iou`, accuracy NaN for a class without ground
        truth), `absent_classes` (names of classes in neither ground truth
        nor prediction) and `pixels` (counted pixels).

    Raises:
        ValueError: the number of class names does not match the matrix.
    """
    confusion = np.asarray(confusion)
    if len(class_names) != confusion.shape[0]:
        raise ValueError(
            f"{len(class_names)} class names for a {confusion.shape[0]}-class matrix"
        )
    tp, ground_truth, predicted = _counts(confusion, unpredicted)
    iou = per_class_iou(confusion, unpredicted)
    accuracy = per_class_accuracy(confusion, unpredicted)
    absent = (ground_truth + predicted - tp) == 0
    return {
        "mean_iou": mean_iou(confusion, unpredicted),
        "mean_iou_present_classes": mean_iou_present_classes(
            confusion, unpredicted
        ),
        "pixel_accuracy": pixel_accuracy(confusion, unpredicted),
        "mean_accuracy": mean_accuracy(confusion, unpredicted),
        "frequency_weighted_iou": frequency_weighted_iou(
            confusion, unpredicted
        ),
        "per_class_iou": {name: float(v) for name, v in zip(class_names, iou)},
        "per_class_accuracy": {
            name: float(v) for name, v in zip(class_names, accuracy)
        },
        "absent_classes": [name for name, a in zip(class_names, absent) if a],
        "pixels": int(ground_truth.sum()),
    }
