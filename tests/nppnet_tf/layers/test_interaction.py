"""Multi-scale interaction edges, derived and searchable (2.5, 2.7, 2.11)."""

import numpy as np
import pytest
from keras import ops

from nppnet_tf.layers.interaction import DerivedInteraction, SearchInteraction
from nppnet_tf.layers.resize import resize_bilinear
from nppnet_tf.search.primitives import PRIMITIVES_INTER
from tests.helpers import check_layer

CHANNELS = [8, 16, 32]  # stages 0..2 of a tiny encoder
SCALES = [1.0, 0.5, 0.25]


def _sources(seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(2, 16 // 2**i, 16 // 2**i, c)).astype("float32")
        for i, c in enumerate(CHANNELS)
    ]


def test_derived_interaction_contract(tmp_path):
    layer = DerivedInteraction(
        [("std_conv_1x1", 1), ("std_conv_3x3", 2), ("std_conv_3x3", 0)],
        CHANNELS,
        SCALES,
    )
    sources = _sources()
    check_layer(layer, [sources, sources[-1]], (2, 4, 4, 32), tmp_path)
    assert len(layer.projections) == 2  # none for the target's own source


def test_derived_edge_is_op_then_resize_then_projection():
    layer = DerivedInteraction([("std_conv_1x1", 0)], CHANNELS, SCALES)
    sources = _sources()
    target = np.zeros((2, 4, 4, 32), "float32")
    y = np.asarray(layer(sources, target, training=False))
    op = np.asarray(layer.edge_ops[0](sources[0], training=False))
    resized = np.asarray(resize_bilinear(op, (4, 4)))
    conv = layer.projections[0]
    expected = resized @ np.asarray(conv.kernel[0, 0]) + np.asarray(conv.bias)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_equal_scale_edges_keep_the_projection():
    # Decoder step 0: encoder stage 2 (1/4 of the 1/4 feature) feeds decoder
    # step 0 at the same scale; the authors still add a 1x1 conv (10.3.6).
    layer = DerivedInteraction(
        [("std_conv_3x3", 2)], [8, 16, 32, 64, 32], [1, 0.5, 0.25, 0.125, 0.25]
    )
    assert len(layer.projections) == 1


def test_search_interaction_contract(tmp_path):
    layer = SearchInteraction(CHANNELS, SCALES, PRIMITIVES_INTER, 2)
    op_weights = np.asarray(ops.softmax(np.ones((3, 7)), axis=-1), "float32")
    edge_weights = np.full(3, 1 / 3, "float32")
    sources = _sources()
    check_layer(
        layer,
        [sources, sources[-1], op_weights, edge_weights],
        (2, 4, 4, 32),
        tmp_path,
    )
    assert [m.scale for m in layer.edge_ops] == [0.25, 0.5, 1.0]
    assert len(layer.projections) == 2


def test_sources_are_checked():
    layer = DerivedInteraction([("std_conv_3x3", 0)], CHANNELS, SCALES)
    with pytest.raises(ValueError, match="expected 3 sources"):
        layer.build([(None, None, None, 8)], (None, None, None, 32))
    with pytest.raises(ValueError, match="source must be in 0..2"):
        DerivedInteraction([("std_conv_3x3", 3)], CHANNELS, SCALES)
