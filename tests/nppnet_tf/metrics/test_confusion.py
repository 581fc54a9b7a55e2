"""Tests of the numpy and streaming (keras, distributed) confusion matrices."""

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.metrics.confusion import ConfusionMatrix, confusion_matrix
from nppnet_tf.metrics.streaming_confusion import StreamingConfusionMatrix


def reference_confusion(labels, predictions, num_classes):
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for truth, predicted in zip(labels.ravel(), predictions.ravel()):
        if 0 <= truth < num_classes:
            matrix[truth, predicted] += 1
    return matrix


def test_confusion_matrix_table():
    labels = np.array([[0, 1, 2], [2, 255, 1], [1, 1, 0]])
    predictions = np.array([[0, 2, 2], [1, 0, 1], [1, 0, 0]])
    expected = np.array(
        [
            [2, 0, 0],  # two background pixels, both right
            [1, 2, 1],  # four class-1 pixels: 2 right, one as 0, one as 2
            [0, 1, 1],
        ]
    )
    np.testing.assert_array_equal(
        confusion_matrix(labels, predictions, 3), expected
    )


def test_confusion_matrix_random_against_loop():
    rng = np.random.default_rng(0)
    labels = rng.choice([*range(20), 255], size=(3, 17, 11))
    predictions = rng.integers(0, 20, size=labels.shape)
    np.testing.assert_array_equal(
        confusion_matrix(labels, predictions),
        reference_confusion(labels, predictions, 20),
    )


def test_confusion_matrix_rejects_bad_predictions_and_shapes():
    with pytest.raises(ValueError, match=r"values \[20\]"):
        confusion_matrix(np.array([1, 2]), np.array([1, 20]))
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)))
    # A bad prediction on an ignored pixel is not looked at.
    assert confusion_matrix(np.array([255]), np.array([99])).sum() == 0


def test_accumulator_counts_unpredicted_and_ignored_pixels():
    accumulator = ConfusionMatrix(num_classes=3)
    accumulator.update(np.array([[0, 1], [255, 2]]), np.array([[0, 2], [0, 2]]))
    accumulator.update_unpredicted(np.array([1, 1, 2, 255, 7]))
    np.testing.assert_array_equal(
        accumulator.matrix, [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    )
    np.testing.assert_array_equal(accumulator.unpredicted, [0, 2, 1])
    assert accumulator.ignored == 3
    other = ConfusionMatrix(num_classes=3)
    other.update(np.array([2]), np.array([2]))
    accumulator.merge(other)
    assert accumulator.matrix[2, 2] == 2
    with pytest.raises(ValueError, match="merge"):
        accumulator.merge(ConfusionMatrix(num_classes=4))


def test_streaming_matches_numpy_eagerly_and_in_tf_function():
    rng = np.random.default_rng(1)
    labels = rng.choice([*range(20), 255], size=(2, 9, 7)).astype(np.int32)
    logits = rng.normal(size=(2, 9, 7, 20)).astype(np.float32)
    metric = StreamingConfusionMatrix()
    metric.update_state(labels, logits)  # scores: argmax is taken
    tf.function(metric.update_state)(labels, logits.argmax(-1))
    expected = 2 * confusion_matrix(labels, logits.argmax(-1))
    np.testing.assert_array_equal(metric.result().numpy(), expected)
    metric.reset_state()
    assert metric.result().numpy().sum() == 0
    clone = StreamingConfusionMatrix.from_config(metric.get_config())
    assert clone.num_classes == 20 and clone.ignore_label == 255


def test_streaming_rejects_labels_outside_classes():
    metric = StreamingConfusionMatrix(num_classes=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels must be"):
        metric.update_state(np.array([[1, 5]]), np.array([[1, 1]]))


def test_streaming_sums_over_two_replicas(make_mirrored_strategy):
    strategy = make_mirrored_strategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(2)
    labels = rng.choice([*range(20), 255], size=(4, 6, 6)).astype(np.int32)
    predictions = rng.integers(0, 20, size=(4, 6, 6)).astype(np.int32)
    with strategy.scope():
        metric = StreamingConfusionMatrix()
    inputs = strategy.experimental_distribute_values_from_function(
        lambda c: (
            labels[
                2 * c.replica_id_in_sync_group : 2 * c.replica_id_in_sync_group
                + 2
            ],
            predictions[
                2 * c.replica_id_in_sync_group : 2 * c.replica_id_in_sync_group
                + 2
            ],
        )
    )

    @tf.function
    def step(batch):
        strategy.run(lambda b: metric.update_state(b[0], b[1]), args=(batch,))

    step(inputs)
    np.testing.assert_array_equal(
        metric.result().numpy(), confusion_matrix(labels, predictions)
    )
