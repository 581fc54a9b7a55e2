"""Architecture parameters and edge normalisation (reference 3.1, 3.2)."""

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from nppnet_tf.layers.architecture import (
    ArchitectureWeights,
    edge_normalization,
)
from nppnet_tf.search.primitives import PRIMITIVES_INTER


def test_parameters_start_at_1e_3():
    space = ArchitectureWeights([1, 2, 3, 4], PRIMITIVES_INTER, name="encoder")
    assert space.alphas.shape == (10, 7) and space.betas.shape == (10,)
    np.testing.assert_allclose(space.alphas, 1e-3)
    np.testing.assert_allclose(space.betas, 1e-3)
    assert space.alphas.regularizer is None and space.alphas.trainable
    np.testing.assert_allclose(space.op_weights(), 1 / 7, rtol=1e-6)


def test_edge_normalization_is_a_softmax_per_node():
    betas = np.random.default_rng(0).normal(size=18).astype("float32")
    weights = np.asarray(edge_normalization(betas, [3, 4, 5, 6]))
    start = 0
    for size in (3, 4, 5, 6):
        node = betas[start : start + size]
        expected = np.exp(node) / np.exp(node).sum()
        np.testing.assert_allclose(
            weights[start : start + size], expected, rtol=1e-5
        )
        start += size
    single = np.asarray(edge_normalization(betas[:3], [1, 2]))
    assert single[0] == 1.0  # a node with one incoming edge


def test_node_slices_and_config_round_trip():
    space = ArchitectureWeights([5, 6, 7], PRIMITIVES_INTER)
    assert space.node_slices() == [(0, 5), (5, 11), (11, 18)]
    clone = ArchitectureWeights.from_config(space.get_config())
    assert clone.get_config() == space.get_config()


def test_variables_are_mirrored_under_a_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        space = ArchitectureWeights([2, 3], PRIMITIVES_INTER)
    assert isinstance(space.alphas.value, tf.distribute.DistributedValues)

    @tf.function
    def step():
        def replica_fn():
            replica = (
                tf.distribute.get_replica_context().replica_id_in_sync_group
            )
            with tf.GradientTape() as tape:
                loss = tf.cast(replica + 1, tf.float32) * tf.reduce_sum(
                    ops.softmax(space.alphas, axis=-1)[:, 0]
                )
            grad = tape.gradient(loss, space.alphas.value)
            tf.distribute.get_replica_context().merge_call(
                lambda strategy, g: space.alphas.value.assign_sub(
                    strategy.reduce("MEAN", g, axis=None)
                ),
                args=(grad,),
            )

        strategy.run(replica_fn)

    step()
    replicas = strategy.experimental_local_results(space.alphas.value)
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0], replicas[1])
    assert not np.allclose(replicas[0], 1e-3)


def test_bad_node_sizes_fail_early():
    with pytest.raises(ValueError, match="node_sizes"):
        ArchitectureWeights([2, 0], PRIMITIVES_INTER)
