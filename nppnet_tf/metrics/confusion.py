"""Pixel confusion matrices of parsing predictions (reference 7.1, 7.3).

Rows are ground-truth classes, columns predicted classes; ground-truth pixels
labelled 255 (or any value outside `0..num_classes-1`, as the official
`calc_miou.py` does) are not counted. Two accumulators share this layout:

* `ConfusionMatrix`: numpy, for scoring prediction files image by image. It
  also counts *unpredicted* ground-truth pixels (an image whose prediction is
  missing): they count towards their class's ground truth but towards no
  prediction, i.e. as misses.
* `streaming_confusion.StreamingConfusionMatrix`: a `keras.metrics.Metric`
  whose int64 state is summed over replicas when read, for an evaluation
  loop under a `tf.distribute` strategy (kept apart so that this module
  does not import TensorFlow).

The scores derived from a matrix live in `mean_iou.py`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nppnet_tf.lip import NUM_CLASSES


def confusion_matrix(
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """Counts (ground truth, prediction) pixel pairs.

    Args:
        labels: int array of ground-truth classes; values outside
            `[0, num_classes)` (255 = ignore) are not counted.
        predictions: int array of the same shape, values in `[0, num_classes)`.
        num_classes: number of classes.

    Returns:
        `(num_classes, num_classes)` int64 matrix, rows ground truth.

    Raises:
        ValueError: shapes differ, or a counted pixel has a prediction outside
            `[0, num_classes)`.
    """
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels and predictions must have the same shape, got "
            f"{labels.shape} and {predictions.shape}"
        )
    counted = (labels >= 0) & (labels < num_classes)
    truth = labels[counted].astype(np.int64)
    predicted = predictions[counted].astype(np.int64)
    bad = (predicted < 0) | (predicted >= num_classes)
    if bad.any():
        values = np.unique(predicted[bad])[:5].tolist()
        raise ValueError(
            f"predictions must be classes in [0, {num_classes}), got values {values}"
        )
    counts = np.bincount(
        truth * num_classes + predicted, minlength=num_classes**2
    )
    return counts.reshape(num_classes, num_classes)


@dataclasses.dataclass
class ConfusionMatrix:
    """A numpy accumulator of `confusion_matrix` over many images.

    Attributes:
        num_classes: number of classes.
        matrix: `(num_classes, num_classes)` int64 counts, rows ground truth.
        unpredicted: `(num_classes,)` int64 ground-truth pixels per class that
            had no prediction at all (counted as misses by the scores).
        ignored: pixels not counted (label 255 or outside the classes).
    """

    num_classes: int = NUM_CLASSES
    matrix: np.ndarray = dataclasses.field(init=False)
    unpredicted: np.ndarray = dataclasses.field(init=False)
    ignored: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(
                f"num_classes must be >= 1, got {self.num_classes}"
            )
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.unpredicted = np.zeros(self.num_classes, np.int64)

    def update(self, labels: np.ndarray, predictions: np.ndarray) -> None:
        """Adds one image (or batch) of labels and predicted classes.

        Raises:
            ValueError: see `confusion_matrix`.
        """
        self.matrix += confusion_matrix(labels, predictions, self.num_classes)
        self.ignored += int(np.sum(~_counted(labels, self.num_classes)))

    def update_unpredicted(self, labels: np.ndarray) -> None:
        """Adds the ground truth of an image that has no prediction."""
        labels = np.asarray(labels)
        counted = _counted(labels, self.num_classes)
        self.unpredicted += np.bincount(
            labels[counted].astype(np.int64), minlength=self.num_classes
        )
        self.ignored += int(np.sum(~counted))

    def merge(self, other: ConfusionMatrix) -> None:
        """Adds another accumulator's counts (e.g. of another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge {other.num_classes} classes into {self.num_classes}"
            )
        self.matrix += other.matrix
        self.unpredicted += other.unpredicted
        self.ignored += other.ignored


def _counted(labels, num_classes):
    labels = np.asarray(labels)
    return (labels >= 0) & (labels < num_classes)
