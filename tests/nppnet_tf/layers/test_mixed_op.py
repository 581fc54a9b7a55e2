"""`MixedOp`: softmax-weighted candidates with partial channels (2.11, 3.2)."""

import keras
import numpy as np
import pytest
from keras import ops

from nppnet_tf.layers.mixed_op import MixedOp, weight_rows
from nppnet_tf.layers.resize import resize_bilinear
from nppnet_tf.search.primitives import (
    PRIMITIVES_ENCODER_DECODER,
    PRIMITIVES_INTER,
)
from tests.helpers import check_layer

BN_SCALE = 1 / np.sqrt(1 + 1e-5)  # inference BatchNorm with fresh statistics


def _inputs(channels=8, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, size, size, channels)).astype("float32")
    weights = np.asarray(ops.softmax(rng.normal(size=len(PRIMITIVES_INTER))))
    return x, weights.astype("float32")


def _weighted_sum(mixed, x, weights):
    """sum_k w_k op_k(x), pool candidates with their extra BN."""
    total = 0
    for i, (name, op) in enumerate(zip(mixed.primitives, mixed.candidates)):
        y = np.asarray(op(x, training=False))
        if "pool" in name:
            y = y * BN_SCALE
        total = total + weights[i] * y
    return total


def test_plain_darts_equals_softmax_weighted_sum():
    keras.utils.set_random_seed(0)
    x, weights = _inputs()
    mixed = MixedOp(8, PRIMITIVES_INTER, partial_channels=1)
    y = np.asarray(mixed(x, weights, training=False))
    np.testing.assert_allclose(y, _weighted_sum(mixed, x, weights), atol=1e-5)
    assert len(mixed.pool_norms) == 1  # max_pool_3x3 gets the extra BN


def test_partial_channels_process_the_first_half_and_shuffle():
    keras.utils.set_random_seed(0)
    x, weights = _inputs()
    mixed = MixedOp(8, PRIMITIVES_INTER, partial_channels=2)
    y = np.asarray(mixed(x, weights, training=False))
    assert all(
        op.channels == 4 for op in mixed.candidates if hasattr(op, "channels")
    )
    # Channel shuffle with 2 groups: even channels = op sum, odd = bypass.
    np.testing.assert_array_equal(y[..., 1::2], x[..., 4:])
    expected = _weighted_sum(mixed, x[..., :4], weights)
    np.testing.assert_allclose(y[..., 0::2], expected, atol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 2.0, 1.0])
def test_resized_edge_is_bilinear_and_bypass_nearest(scale):
    keras.utils.set_random_seed(0)
    x, weights = _inputs()
    mixed = MixedOp(8, PRIMITIVES_INTER, partial_channels=2, scale=scale)
    y = np.asarray(mixed(x, weights, training=False))
    size = int(8 * scale)
    assert y.shape == (2, size, size, 8)
    if scale <= 1:
        step = int(1 / scale)
        bypass = x[:, ::step, ::step, 4:]
    else:
        bypass = x[:, :, :, 4:].repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(y[..., 1::2], bypass)
    expected = resize_bilinear(
        _weighted_sum(mixed, x[..., :4], weights).astype("float32"),
        (size, size),
    )
    np.testing.assert_allclose(y[..., 0::2], expected, atol=1e-5)


def test_stride_2_max_pools_the_bypass():
    keras.utils.set_random_seed(0)
    x, _ = _inputs(size=8)
    weights = np.full(len(PRIMITIVES_ENCODER_DECODER), 1 / 9, "float32")
    mixed = MixedOp(8, PRIMITIVES_ENCODER_DECODER, stride=2, partial_channels=4)
    y = np.asarray(mixed(x, weights, training=False))
    assert y.shape == (2, 4, 4, 8)
    bypass = x[..., 2:].reshape(2, 4, 2, 4, 2, 6).max(axis=(2, 4))
    shuffled = y.reshape(2, 4, 4, 2, 4)  # out channel = k * 4 + group
    np.testing.assert_array_equal(
        shuffled[..., 1:].transpose(0, 1, 2, 4, 3).reshape(2, 4, 4, 6), bypass
    )


def test_none_contributes_nothing():
    x, _ = _inputs()
    mixed = MixedOp(8, ("none", "skip_connect"))
    y = mixed(x, np.array([0.3, 0.7], "float32"))
    np.testing.assert_allclose(y, 0.7 * x, rtol=1e-6)


def test_gradients_reach_the_op_weights():
    import tensorflow as tf

    x, weights = _inputs()
    mixed = MixedOp(8, PRIMITIVES_INTER, partial_channels=2)
    weights = tf.Variable(weights)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(mixed(x, weights, training=True) ** 2)
    grad = tape.gradient(loss, weights)
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


def test_gradient_graph_slices_the_op_weights_once():
    """The op weights are unstacked once and the partial channels split
    once: no strided slice per candidate in the forward or the backward
    graph (each added a slice gradient; thousands in a search step)."""
    import tensorflow as tf

    x, weights = _inputs()
    mixed = MixedOp(8, PRIMITIVES_INTER, partial_channels=2)
    mixed(x, weights)

    @tf.function
    def step(x, weights):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss = tf.reduce_sum(mixed(x, weights, training=True))
        return tape.gradient(loss, weights)

    graph = step.get_concrete_function(
        tf.TensorSpec(x.shape), tf.TensorSpec(weights.shape)
    ).graph
    types = [op.type for op in graph.get_operations()]
    assert "StridedSlice" not in types and "StridedSliceGrad" not in types
    assert types.count("Unpack") == 1 and types.count("SplitV") == 1


def test_weight_rows_of_tensors_arrays_and_lists():
    matrix = np.arange(6, dtype="float32").reshape(3, 2)
    rows = weight_rows(ops.convert_to_tensor(matrix), 3)
    assert len(rows) == 3
    np.testing.assert_array_equal(np.asarray(rows[2]), matrix[2])
    assert weight_rows(list(rows), 3) == list(rows)
    with pytest.raises(ValueError, match="expected 4 weight rows, got 3"):
        weight_rows(list(rows), 4)


def test_mixed_op_contract(tmp_path):
    x, weights = _inputs()
    mixed = MixedOp(8, PRIMITIVES_INTER, partial_channels=2, scale=0.5)
    check_layer(mixed, [x, weights], (2, 4, 4, 8), tmp_path)


def test_mixed_op_rejects_bad_arguments():
    with pytest.raises(ValueError, match="partial_channels"):
        MixedOp(6, PRIMITIVES_INTER, partial_channels=4)
    with pytest.raises(ValueError, match="scale and stride"):
        MixedOp(8, PRIMITIVES_INTER, stride=2, scale=0.5)
