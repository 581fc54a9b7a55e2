"""Stage-2 fusion cells (reference 2.9, 2.11)."""

import numpy as np
from keras import ops

from nppnet_tf.layers.architecture import edge_normalization
from nppnet_tf.layers.fusion import DerivedFusionCell, SearchFusionCell
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.search.primitives import PRIMITIVES_INTER
from tests.helpers import check_layer

GENOTYPE = Genotype.load("configs/genotypes/nppnet_lip.json")


def _features(width=8, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(2, 8, 8, c * width)).astype("float32")
        for c in (3, 4, 4)
    ]


def test_derived_fusion_cell_contract(tmp_path):
    cell = DerivedFusionCell(GENOTYPE.parsing_fusion, 8)
    expected = ((2, 8, 8, 24), (2, 8, 8, 32))
    check_layer(cell, _features(), expected, tmp_path)


def test_search_fusion_cell_contract(tmp_path):
    # A short candidate list keeps the 18 edges fast; every op of
    # PRIMITIVES_INTER is tested in test_operations and test_mixed_op.
    cell = SearchFusionCell(8, PRIMITIVES_INTER[3:6], 2)
    op_weights = np.asarray(ops.softmax(np.ones((18, 3)), axis=-1), "float32")
    edge_weights = np.asarray(edge_normalization(np.zeros(18), [3, 4, 5, 6]))
    inputs = [*_features(), op_weights, edge_weights.astype("float32")]
    check_layer(cell, inputs, ((2, 8, 8, 24), (2, 8, 8, 32)), tmp_path)


def test_first_output_forwards_the_preprocessed_inputs():
    cell = DerivedFusionCell(GENOTYPE.pose_fusion, 8)
    aux, pose, parsing = _features()
    new_aux, _ = cell(aux, pose, parsing, training=False)
    expected = [
        pre(x, training=False)
        for pre, x in zip(cell.preprocess, (aux, pose, parsing))
    ]
    np.testing.assert_allclose(new_aux, np.concatenate(expected, -1), atol=1e-6)


def test_search_fusion_nodes_are_edge_normalised_sums():
    cell = SearchFusionCell(4, ("skip_connect",), partial_channels=1)
    aux, pose, parsing = _features(width=2)
    betas = np.random.default_rng(3).normal(size=18).astype("float32")
    edge_weights = np.asarray(edge_normalization(betas, [3, 4, 5, 6]))
    _, nodes = cell(
        aux, pose, parsing, np.ones((18, 1), "float32"), edge_weights
    )
    states = [
        np.asarray(pre(x, training=False))
        for pre, x in zip(cell.preprocess, (aux, pose, parsing))
    ]
    row = 0
    for _ in range(4):
        states.append(
            sum(edge_weights[row + j] * s for j, s in enumerate(states))
        )
        row += len(states) - 1
    np.testing.assert_allclose(nodes, np.concatenate(states[3:], -1), atol=1e-5)
