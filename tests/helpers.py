"""`check_layer`: the contract every NPPNet layer and model must meet."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import tree


def check_layer(layer, inputs, expected_shapes=None, tmp_path=None, tol=1e-5):
    """Builds and calls `layer(*inputs)` eagerly and in a `tf.function`,
    checks the output shapes (a structure like the outputs), the
    `get_config`/`from_config` round trip and that a `.keras` save/load gives
    equal outputs (a Model is saved itself, a layer inside a functional
    Model). Returns the eager outputs as numpy."""
    inputs = list(inputs)
    eager = tree.map_structure(np.asarray, layer(*inputs, training=False))
    graph = tf.function(lambda *a: layer(*a, training=False))(*inputs)
    _all_close(eager, graph, tol)
    if expected_shapes is not None:
        shapes = tree.map_structure(lambda a: tuple(a.shape), eager)
        assert shapes == expected_shapes, (shapes, expected_shapes)
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    if tmp_path is not None:
        if isinstance(layer, keras.Model):
            model, flat = layer, inputs
        else:
            flat = tree.flatten(inputs)
            symbolic = [keras.Input(batch_shape=tuple(x.shape)) for x in flat]
            nested = tree.pack_sequence_as(inputs, symbolic)
            model = keras.Model(symbolic, layer(*nested))
        path = str(tmp_path / "layer.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        actual = loaded(*flat) if model is layer else loaded(flat)
        _all_close(eager, actual, 0.0)  # inference mode in both calls
    return eager


def _all_close(a, b, tol):
    a, b = tree.flatten(a), tree.flatten(b)  # a loaded model returns lists
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), tol, tol)
