"""A confusion matrix that accumulates in a Keras metric variable.

For an evaluation loop under a `tf.distribute` strategy: the int64 state
has sum aggregation, so `update_state` runs inside `strategy.run` and
`result()` read in the cross-replica context is the sum over replicas. Same
layout as `confusion.confusion_matrix` (rows ground truth); derive scores
with `nppnet_tf.metrics.mean_iou` on `result().numpy()`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from nppnet_tf.lip import IGNORE_LABEL, NUM_CLASSES


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
