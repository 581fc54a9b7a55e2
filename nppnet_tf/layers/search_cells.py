"""Searchable encoder and decoder cells (our encoder-decoder search).

The authors did not release this search stage (reference NPPNET.md 5.1,
10.1 item 2); these cells follow DARTS/PC-DARTS: 4 nodes, every node
connected to every earlier state (2 + 3 + 4 + 5 = 14 candidate edges), each
edge a partial-channel `MixedOp`, a node the edge-normalised sum of its
incoming edges (reference 3.2). See docs/model.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from nppnet_tf.layers.blocks import (
    FactorizedReduce,
    ReLUConvBN,
    channels_shape,
    creation_scope,
)
from nppnet_tf.layers.mixed_op import MixedOp, weight_rows
from nppnet_tf.layers.resize import resize_bilinear

NUM_NODES = 4


def cell_node_sizes(num_inputs: int, num_nodes: int = NUM_NODES) -> list[int]:
    """Incoming candidate edges per node: `[2, 3, 4, 5]` for two inputs."""
    return [num_inputs + node for node in range(num_nodes)]


class _SearchCellBase(keras.layers.Layer):
    """Shared arguments, node loop and config of the two search cells."""

    def __init__(
        self,
        filters: int,
        primitives: Sequence[str],
        partial_channels: int = 1,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.primitives = tuple(primitives)
        self.partial_channels = partial_channels
        self.synchronized = synchronized

    def _mixed(self, stride: int, index: int) -> MixedOp:
        return MixedOp(
            self.filters,
            self.primitives,
            stride,
            self.partial_channels,
            synchronized=self.synchronized,
            name=f"edge_{index}",
        )

    def _build(self, s0_shape, s1_shape):
        with creation_scope():
            self.preprocess0.build(s0_shape)
            self.preprocess1.build(s1_shape)
            for op in self.edge_ops:
                op.build(channels_shape(self.filters))

    def _nodes(self, states, op_weights, edge_weights, training, low_size=None):
        num_edges = len(self.edge_ops)
        op_weights = weight_rows(op_weights, num_edges)
        edge_weights = weight_rows(edge_weights, num_edges)
        offset = 0
        for _ in range(NUM_NODES):
            total = 0
            for source, state in enumerate(list(states)):
                row = offset + source
                y = self.edge_ops[row](
                    state, op_weights[row], training=training
                )
                y = edge_weights[row] * y
                if low_size is not None and source == 0:
                    # Upsample once after the weighted mixed op: the resize is
                    # linear, so this equals resizing every candidate output.
                    y = resize_bilinear(y, low_size)
                total = total + y
            offset += len(states)
            states.append(total)
        return ops.concatenate(states[2:], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "primitives": list(self.primitives),
            "partial_channels": self.partial_channels,
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class SearchCell(_SearchCellBase):
    """Searchable encoder cell (normal or reduction), DARTS-style.

    Preprocessing as in `DerivedCell` but with non-affine BatchNorm (DARTS
    search cells). In a reduction cell the edges from the inputs have stride
    2.

    Args:
        filters: int. Node width; the output has `4 * filters` channels.
        primitives: sequence of str. Candidate ops (columns of the alphas).
        reduction: bool. Halve the resolution.
        reduction_prev: bool. `s0` has twice the resolution of `s1`.
        partial_channels: int. PC-DARTS proportion K of every `MixedOp`.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        s0: `(batch, h0, w0, c0)`, output of the cell two steps back.
        s1: `(batch, h, w, c1)`, output of the previous cell.
        op_weights: `(14, len(primitives))` softmaxed alphas.
        edge_weights: `(14,)` edge-normalised betas.

    Returns:
        `(batch, h / r, w / r, 4 * filters)` with r = 2 in reduction cells.
    """

    def __init__(
        self,
        filters: int,
        primitives: Sequence[str],
        reduction: bool = False,
        reduction_prev: bool = False,
        partial_channels: int = 1,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(
            filters, primitives, partial_channels, synchronized, **kwargs
        )
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        common = dict(affine=False, synchronized=synchronized)
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(
                filters, name="preprocess0", **common
            )
        else:
            self.preprocess0 = ReLUConvBN(
                filters, 1, name="preprocess0", **common
            )
        self.preprocess1 = ReLUConvBN(filters, 1, name="preprocess1", **common)
        self.edge_ops = []
        for num_states in cell_node_sizes(2):
            for source in range(num_states):
                stride = 2 if reduction and source < 2 else 1
                self.edge_ops.append(self._mixed(stride, len(self.edge_ops)))

    def build(self, s0_shape, s1_shape):
        self._build(s0_shape, s1_shape)

    def call(self, s0, s1, op_weights, edge_weights, training=None):
        states = [
            self.preprocess0(s0, training=training),
            self.preprocess1(s1, training=training),
        ]
        return self._nodes(states, op_weights, edge_weights, training)

    def get_config(self):
        return {
            **super().get_config(),
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class SearchDecoderCell(_SearchCellBase):
    """Searchable decoder (upsampling) cell.

    As `DerivedDecoderCell`: both inputs are preprocessed by `ReLUConvBN 1x1`
    (non-affine here); mixed ops on the deep input (source 0) run at the low
    resolution and their weighted output is upsampled x2 (bilinear,
    align_corners) to the skip input's size.

    Args:
        filters: int. Node width; the output has `4 * filters` channels.
        primitives: sequence of str. Candidate ops (columns of the alphas).
        partial_channels: int. PC-DARTS proportion K of every `MixedOp`.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        deep: `(batch, h / 2, w / 2, c0)` low-resolution input.
        skip: `(batch, h, w, c1)` skip input.
        op_weights: `(14, len(primitives))` softmaxed alphas.
        edge_weights: `(14,)` edge-normalised betas.

    Returns:
        `(batch, h, w, 4 * filters)`.
    """

    def __init__(
        self,
        filters: int,
        primitives: Sequence[str],
        partial_channels: int = 1,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(
            filters, primitives, partial_channels, synchronized, **kwargs
        )
        common = dict(affine=False, synchronized=synchronized)
        self.preprocess0 = ReLUConvBN(filters, 1, name="preprocess0", **common)
        self.preprocess1 = ReLUConvBN(filters, 1, name="preprocess1", **common)
        self.edge_ops = [
            self._mixed(1, index) for index in range(sum(cell_node_sizes(2)))
        ]

    def build(self, deep_shape, skip_shape):
        self._build(deep_shape, skip_shape)

    def call(self, deep, skip, op_weights, edge_weights, training=None):
        states = [
            self.preprocess0(deep, training=training),
            self.preprocess1(skip, training=training),
        ]
        size = ops.shape(states[1])[1:3]
        return self._nodes(states, op_weights, edge_weights, training, size)
