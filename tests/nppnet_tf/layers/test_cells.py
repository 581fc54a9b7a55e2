"""Encoder/decoder cells, derived and searchable (reference 2.4, 2.6)."""

import numpy as np
import pytest
from keras import ops

from nppnet_tf.layers.architecture import edge_normalization
from nppnet_tf.layers.cells import DerivedCell, DerivedDecoderCell, edge_pairs
from nppnet_tf.layers.search_cells import SearchCell, SearchDecoderCell
from nppnet_tf.search.genotype import Genotype
from tests.helpers import check_layer

GENOTYPE = Genotype.load("configs/genotypes/nppnet_lip.json")


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# The contract does not depend on the candidates; a short list keeps the
# 14-edge cells fast (every op is tested in test_operations/test_mixed_op).
CANDIDATES = ("none", "skip_connect", "std_conv_3x3", "max_pool_3x3")


def _arch(rows=14, seed=0):
    columns = len(CANDIDATES)
    rng = np.random.default_rng(seed)
    op_weights = ops.softmax(rng.normal(size=(rows, columns)), axis=-1)
    return np.asarray(op_weights, "float32"), np.full(rows, 0.5, "float32")


def test_derived_normal_cell_contract(tmp_path):
    cell = DerivedCell(GENOTYPE.pose_encoder_normal, 4)
    check_layer(
        cell,
        [_x(2, 8, 8, 16), _x(2, 8, 8, 16, seed=1)],
        (2, 8, 8, 16),
        tmp_path,
    )


def test_derived_reduction_cell_contract(tmp_path):
    cell = DerivedCell(GENOTYPE.pose_encoder_reduce, 8, reduction=True)
    check_layer(
        cell, [_x(2, 8, 8, 16), _x(2, 8, 8, 16)], (2, 4, 4, 32), tmp_path
    )
    strides = [getattr(op, "stride", 1) for op in cell.edge_ops]
    assert strides == [2, 2, 2, 1, 1, 1, 1, 2]  # ops on sources 0 and 1


def test_cell_after_a_reduction_factorizes_s0(tmp_path):
    cell = DerivedCell(GENOTYPE.pose_encoder_normal, 8, reduction_prev=True)
    check_layer(
        cell, [_x(2, 8, 8, 16), _x(2, 4, 4, 32)], (2, 4, 4, 32), tmp_path
    )
    assert type(cell.preprocess0).__name__ == "FactorizedReduce"


def test_derived_decoder_cell_upsamples_the_deep_input(tmp_path):
    cell = DerivedDecoderCell(GENOTYPE.parsing_decoder, 4)
    check_layer(
        cell, [_x(2, 3, 3, 32), _x(2, 6, 6, 16)], (2, 6, 6, 16), tmp_path
    )


def test_edge_pairs_validate_sources():
    with pytest.raises(ValueError, match=r"edges\[1\].*source must be in 0..1"):
        edge_pairs([("std_conv_3x3", 0), ("std_conv_3x3", 2)], 2)
    with pytest.raises(ValueError, match="two edges per node"):
        edge_pairs([("std_conv_3x3", 0)], 2)


@pytest.mark.parametrize("reduction", [False, True])
def test_search_cell_contract(tmp_path, reduction):
    cell = SearchCell(8, CANDIDATES, reduction, partial_channels=4)
    size = 4 if reduction else 8
    inputs = [_x(2, 8, 8, 16), _x(2, 8, 8, 16), *_arch()]
    check_layer(cell, inputs, (2, size, size, 32), tmp_path)
    assert len(cell.edge_ops) == 14


def test_search_decoder_cell_contract(tmp_path):
    cell = SearchDecoderCell(8, CANDIDATES, partial_channels=2)
    inputs = [_x(2, 4, 4, 32), _x(2, 8, 8, 16), *_arch()]
    check_layer(cell, inputs, (2, 8, 8, 32), tmp_path)


def test_search_cell_nodes_sum_edge_weighted_mixed_ops():
    # With skip_connect as the only candidate a node is sum_j w_j state_j.
    cell = SearchCell(4, ("skip_connect",), partial_channels=1)
    s0, s1 = _x(1, 4, 4, 6), _x(1, 4, 4, 6, seed=1)
    op_weights = np.ones((14, 1), "float32")
    betas = np.random.default_rng(2).normal(size=14).astype("float32")
    edge_weights = np.asarray(edge_normalization(betas, [2, 3, 4, 5]))
    y = np.asarray(cell(s0, s1, op_weights, edge_weights, training=False))
    states = [
        np.asarray(cell.preprocess0(s0, training=False)),
        np.asarray(cell.preprocess1(s1, training=False)),
    ]
    row = 0
    for _ in range(4):
        total = sum(
            edge_weights[row + j] * states[j] for j in range(len(states))
        )
        row += len(states)
        states.append(total)
    np.testing.assert_allclose(y, np.concatenate(states[2:], -1), atol=1e-5)
