"""Pixel confusion matrices of parsing predictions (reference 7.1, 7.3).

Rows are ground-truth classes, columns predicted classes; ground-truth pixels
labelled 255 (or any value outside `0..num_classes-1`, as the official
`calc_miou.py` does) are not counted. Two accumulators share this layout:

* `ConfusionMatrix`: numpy, for scoring prediction files image by image. It
  also counts *unpredicted* ground-truth pixels (an image whose prediction is
  missing): they count towards their class's ground truth but towards no
  prediction, i.e. as misses.
* `StreamingConfusionMatrix`: a `keras.metrics.Metric` whose int64 state is
  summed over replicas when read, for an evaluation loop under a
  `tf.distribute` strategy.

The scores derived from a matrix live in `mean_iou.py`.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from nppnet_tf.lip import IGNORE_LABEL, NUM_CLASSES


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


@keras.saving.register_keras_serializable(package="nppnet")
class StreamingConfusionMatrix(keras.metrics.Metric):
    """Confusion matrix accumulated in a metric variable (rows ground truth).

    The state is an int64 `(num_classes, num_classes)` variable with sum
    aggregation, so `update_state` may run inside `strategy.run` and
    `result()` read in the cross-replica context returns the sum over
    replicas. Derive scores with `nppnet_tf.metrics.mean_iou` on
    `result().numpy()`.

    Args:
        num_classes: int. Number of classes.
        ignore_label: int. Label value that is not counted.

    Call arguments (`update_state`):
        labels: `(batch, height, width)` int labels.
        predictions: `(batch, height, width)` int classes, or
            `(batch, height, width, num_classes)` scores (argmax is taken).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_label: int = IGNORE_LABEL,
        name: str = "confusion_matrix",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = self.add_variable(
            shape=(num_classes, num_classes),
            initializer="zeros",
            dtype="int64",
            aggregation="sum",
            name="matrix",
        )

    def update_state(self, labels, predictions, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("StreamingConfusionMatrix takes no sample_weight")
        labels = tf.convert_to_tensor(labels)
        predictions = tf.convert_to_tensor(predictions)
        if predictions.shape.rank == labels.shape.rank + 1:
            predictions = tf.argmax(predictions, axis=-1)
        labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
        predictions = tf.reshape(tf.cast(predictions, tf.int64), [-1])
        counted = labels != self.ignore_label
        in_range = (labels >= 0) & (labels < self.num_classes)
        predicted_ok = (predictions >= 0) & (predictions < self.num_classes)
        check = tf.debugging.assert_equal(
            tf.reduce_all(~counted | (in_range & predicted_ok)),
            True,
            message=(
                f"labels must be in [0, {self.num_classes}) or "
                f"{self.ignore_label} and predictions in [0, {self.num_classes})"
            ),
        )
        with tf.control_dependencies([check]):
            pairs = tf.boolean_mask(
                labels * self.num_classes + predictions, counted
            )
        size = self.num_classes**2
        counts = tf.math.bincount(
            pairs, minlength=size, maxlength=size, dtype=tf.int64
        )
        self.matrix.assign_add(
            tf.reshape(counts, (self.num_classes, self.num_classes))
        )

    def result(self):
        return tf.convert_to_tensor(self.matrix)

    def reset_state(self):
        self.matrix.assign(tf.zeros_like(self.matrix))

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "ignore_label": self.ignore_label,
        }
