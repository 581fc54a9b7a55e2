"""Derived (genotype) encoder and decoder cells (reference NPPNET.md 2.4, 2.6).

A cell maps its two inputs to 4 intermediate nodes, each the sum of two op
outputs on earlier states, and returns the concatenation of the nodes.
Source indices: 0 = first input (s0), 1 = second input (s1), k >= 2 = node k.
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
from nppnet_tf.layers.operations import build_op
from nppnet_tf.layers.resize import resize_bilinear

EdgeLike = Sequence  # an `Edge(op, source)` or an `[op, source]` pair


def edge_pairs(
    edges: Sequence[EdgeLike], num_inputs: int, name: str = "edges"
) -> tuple[tuple[str, int], ...]:
    """Normalises genotype edges to `(op, source)` pairs and checks them.

    Two edges per node, in node order; each source must be an input or an
    earlier node.

    Args:
        edges: sequence of `genotype.Edge` or `[op, source]` pairs.
        num_inputs: int. Cell inputs before the first node.
        name: str. Argument name for error messages.

    Raises:
        ValueError: on an odd count or a source that is not earlier.
    """
    pairs = []
    for edge in edges:
        op, source = (edge.op, edge.source) if hasattr(edge, "op") else edge
        pairs.append((str(op), int(source)))
    if not pairs or len(pairs) % 2:
        raise ValueError(
            f"{name} must hold two edges per node, got {len(pairs)} edges."
        )
    for i, (op, source) in enumerate(pairs):
        node = num_inputs + i // 2
        if not 0 <= source < node:
            raise ValueError(
                f"{name}[{i}] = {[op, source]}: source must be in 0..{node - 1}."
            )
    return tuple(pairs)


@keras.saving.register_keras_serializable(package="nppnet")
class DerivedCell(keras.layers.Layer):
    """Encoder cell with the genotype's ops (reference 2.3, 2.4).

    Preprocessing: `s0` by `FactorizedReduce` if the previous cell reduced the
    resolution, else by `ReLUConvBN 1x1`; `s1` by `ReLUConvBN 1x1` (affine).
    In a reduction cell the ops on the inputs (sources 0, 1) have stride 2.

    Args:
        edges: sequence of `Edge` or `[op, source]`, two per node.
        filters: int. Node width; the output has `len(edges) / 2 * filters`
            channels.
        reduction: bool. Halve the resolution.
        reduction_prev: bool. `s0` has twice the resolution of `s1`.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        s0: `(batch, h0, w0, c0)`, output of the cell two steps back.
        s1: `(batch, h, w, c1)`, output of the previous cell.

    Returns:
        `(batch, h / r, w / r, 4 * filters)` with r = 2 in reduction cells.
    """

    def __init__(
        self,
        edges: Sequence[EdgeLike],
        filters: int,
        reduction: bool = False,
        reduction_prev: bool = False,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.edges = edge_pairs(edges, 2)
        self.filters = filters
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.synchronized = synchronized
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(
                filters, synchronized=synchronized, name="preprocess0"
            )
        else:
            self.preprocess0 = ReLUConvBN(
                filters, 1, synchronized=synchronized, name="preprocess0"
            )
        self.preprocess1 = ReLUConvBN(
            filters, 1, synchronized=synchronized, name="preprocess1"
        )
        self.edge_ops = [
            build_op(
                op,
                filters,
                2 if reduction and source < 2 else 1,
                True,
                synchronized,
            )
            for op, source in self.edges
        ]

    def build(self, s0_shape, s1_shape):
        with creation_scope():
            self.preprocess0.build(s0_shape)
            self.preprocess1.build(s1_shape)
            for op in self.edge_ops:
                op.build(channels_shape(self.filters))

    def call(self, s0, s1, training=None):
        states = [
            self.preprocess0(s0, training=training),
            self.preprocess1(s1, training=training),
        ]
        for node in range(len(self.edges) // 2):
            total = 0
            for i in (2 * node, 2 * node + 1):
                source = self.edges[i][1]
                total = total + self.edge_ops[i](
                    states[source], training=training
                )
            states.append(total)
        return ops.concatenate(states[2:], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "edges": [list(edge) for edge in self.edges],
            "filters": self.filters,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class DerivedDecoderCell(keras.layers.Layer):
    """Decoder (upsampling) cell with the genotype's ops (reference 2.6).

    Both inputs are preprocessed by `ReLUConvBN 1x1` to the node width (the
    deep input stays at its low resolution). An op on source 0 runs at the low
    resolution and is followed by a bilinear align-corners resize to the skip
    input's size (x2); every other op runs at the high resolution.

    Args:
        edges: sequence of `Edge` or `[op, source]`, two per node; source 0 is
            the deep input, 1 the skip input.
        filters: int. Node width (the authors use skip channels / 4).
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        deep: `(batch, h / 2, w / 2, c0)` low-resolution input.
        skip: `(batch, h, w, c1)` skip input.

    Returns:
        `(batch, h, w, len(edges) / 2 * filters)`.
    """

    def __init__(
        self,
        edges: Sequence[EdgeLike],
        filters: int,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.edges = edge_pairs(edges, 2)
        self.filters = filters
        self.synchronized = synchronized
        self.preprocess0 = ReLUConvBN(
            filters, 1, synchronized=synchronized, name="preprocess0"
        )
        self.preprocess1 = ReLUConvBN(
            filters, 1, synchronized=synchronized, name="preprocess1"
        )
        self.edge_ops = [
            build_op(op, filters, 1, True, synchronized) for op, _ in self.edges
        ]

    def build(self, deep_shape, skip_shape):
        with creation_scope():
            self.preprocess0.build(deep_shape)
            self.preprocess1.build(skip_shape)
            for op in self.edge_ops:
                op.build(channels_shape(self.filters))

    def call(self, deep, skip, training=None):
        states = [
            self.preprocess0(deep, training=training),
            self.preprocess1(skip, training=training),
        ]
        size = ops.shape(states[1])[1:3]
        for node in range(len(self.edges) // 2):
            total = 0
            for i in (2 * node, 2 * node + 1):
                source = self.edges[i][1]
                y = self.edge_ops[i](states[source], training=training)
                if source == 0:
                    y = resize_bilinear(y, size)
                total = total + y
            states.append(total)
        return ops.concatenate(states[2:], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "edges": [list(edge) for edge in self.edges],
            "filters": self.filters,
            "synchronized": self.synchronized,
        }
