"""High-level fusion cells of stage 2 (reference NPPNET.md 2.9, 2.11).

A fusion cell has three inputs: 0 = the cell's own auxiliary feature (pose
aux A in the pose cell, edge E in the parsing cell), 1 = the pose feature P,
2 = the parsing feature S. Each is preprocessed by `ReLUConvBN 1x1` to the
node width; 4 nodes (indices 3..6) follow. The cell returns two features:
`concat(inputs')` (3 x width, the next aux/edge feature) and
`concat(nodes)` (4 x width, the next P or S).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from nppnet_tf.layers.blocks import (
    ReLUConvBN,
    channels_shape,
    creation_scope,
)
from nppnet_tf.layers.cells import EdgeLike, edge_pairs
from nppnet_tf.layers.mixed_op import MixedOp, weight_rows
from nppnet_tf.layers.operations import build_op
from nppnet_tf.layers.search_cells import cell_node_sizes

NUM_INPUTS = 3


class _FusionBase(keras.layers.Layer):
    """Preprocessing and outputs shared by the derived and search cells."""

    def __init__(self, filters: int, synchronized: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.synchronized = synchronized
        self.preprocess = [
            ReLUConvBN(
                filters, 1, synchronized=synchronized, name=f"preprocess{i}"
            )
            for i in range(NUM_INPUTS)
        ]

    def build(self, aux_shape, pose_shape, parsing_shape):
        with creation_scope():
            for pre, shape in zip(
                self.preprocess, (aux_shape, pose_shape, parsing_shape)
            ):
                pre.build(shape)
            for op in self.edge_ops:
                op.build(channels_shape(self.filters))

    def _inputs(self, aux, pose, parsing, training):
        return [
            pre(x, training=training)
            for pre, x in zip(self.preprocess, (aux, pose, parsing))
        ]

    @staticmethod
    def _outputs(states):
        return (
            ops.concatenate(states[:NUM_INPUTS], axis=-1),
            ops.concatenate(states[NUM_INPUTS:], axis=-1),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class DerivedFusionCell(_FusionBase):
    """Fusion cell with the genotype's ops, all at stride 1 (reference 2.9).

    Args:
        edges: sequence of `Edge` or `[op, source]`, two per node; sources
            0 (aux/edge), 1 (pose), 2 (parsing), k >= 3 node k.
        filters: int. Node width (`c4`, 128 in the final network).
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        aux: `(batch, h, w, ca)` the cell's own auxiliary feature (A or E).
        pose: `(batch, h, w, cp)` pose feature P.
        parsing: `(batch, h, w, cs)` parsing feature S.

    Returns:
        Tuple `(batch, h, w, 3 * filters)` new aux/edge feature and
        `(batch, h, w, len(edges) / 2 * filters)` new P or S.
    """

    def __init__(
        self,
        edges: Sequence[EdgeLike],
        filters: int,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(filters, synchronized, **kwargs)
        self.edges = edge_pairs(edges, NUM_INPUTS)
        self.edge_ops = [
            build_op(op, filters, 1, True, synchronized) for op, _ in self.edges
        ]

    def call(self, aux, pose, parsing, training=None):
        states = self._inputs(aux, pose, parsing, training)
        for node in range(len(self.edges) // 2):
            total = 0
            for i in (2 * node, 2 * node + 1):
                source = self.edges[i][1]
                total = total + self.edge_ops[i](
                    states[source], training=training
                )
            states.append(total)
        return self._outputs(states)

    def get_config(self):
        return {
            **super().get_config(),
            "edges": [list(edge) for edge in self.edges],
        }


@keras.saving.register_keras_serializable(package="nppnet")
class SearchFusionCell(_FusionBase):
    """Searchable fusion cell (the authors' `PoseCell`/`ParCell`, 2.11).

    Every node is connected to every earlier state (3 + 4 + 5 + 6 = 18
    candidate edges, no resizing, no 1x1 conv); a node is the edge-weighted
    sum of its partial-channel mixed ops (reference 3.2). Preprocessing is
    affine, as the authors'.

    Args:
        filters: int. Node width.
        primitives: sequence of str. Candidate ops (columns of the alphas).
        partial_channels: int. Proportion K of every `MixedOp` (2 as the
            authors).
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        aux: `(batch, h, w, ca)` the cell's own auxiliary feature (A or E).
        pose: `(batch, h, w, cp)` pose feature P.
        parsing: `(batch, h, w, cs)` parsing feature S.
        op_weights: `(18, len(primitives))` softmaxed alphas.
        edge_weights: `(18,)` edge-normalised betas.

    Returns:
        Tuple `(batch, h, w, 3 * filters)` and `(batch, h, w, 4 * filters)`.
    """

    def __init__(
        self,
        filters: int,
        primitives: Sequence[str],
        partial_channels: int = 2,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(filters, synchronized, **kwargs)
        self.primitives = tuple(primitives)
        self.partial_channels = partial_channels
        self.edge_ops = [
            MixedOp(
                filters,
                self.primitives,
                1,
                partial_channels,
                synchronized=synchronized,
                name=f"edge_{index}",
            )
            for index in range(sum(cell_node_sizes(NUM_INPUTS)))
        ]

    def call(self, aux, pose, parsing, op_weights, edge_weights, training=None):
        states = self._inputs(aux, pose, parsing, training)
        op_weights = weight_rows(op_weights, len(self.edge_ops))
        edge_weights = weight_rows(edge_weights, len(self.edge_ops))
        offset = 0
        for num_states in cell_node_sizes(NUM_INPUTS):
            total = 0
            for source in range(num_states):
                row = offset + source
                y = self.edge_ops[row](
                    states[source], op_weights[row], training=training
                )
                total = total + edge_weights[row] * y
            offset += num_states
            states.append(total)
        return self._outputs(states)

    def get_config(self):
        return {
            **super().get_config(),
            "primitives": list(self.primitives),
            "partial_channels": self.partial_channels,
        }
