"""Multi-scale feature interaction between the branches (reference 2.5, 2.7).

An interaction updates one target feature of a branch with edges from the
other branch's candidate sources: `target + sum(edge(source))`. The sources
are listed in index order; the last one sits at the target's position (same
scale and channels, e.g. the other branch's pre-interaction output of the
same stage) and its edges are bare ops. Every other edge is: op at the
source's resolution and width -> bilinear align-corners resize by
`target_scale / source_scale` -> 1x1 conv with bias to the target width. The
resize and the 1x1 conv are present even when the scales are equal (the
authors' structure, reference 10.3 item 6).

Encoder stage i: sources = the other branch's stages 0..i (scales 1, 1/2,
1/4, 1/8). Decoder step k: sources = the other branch's encoder stages 0..3
and decoder steps 0..k (scales `[1, 1/2, 1/4, 1/8, 1/4, 1/2, 1]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from nppnet_tf.layers.blocks import (
    PaddedConv2D,
    channels_shape,
    creation_scope,
)
from nppnet_tf.layers.mixed_op import MixedOp, weight_rows
from nppnet_tf.layers.operations import build_op
from nppnet_tf.layers.resize import resize_by_factor


class _InteractionBase(keras.layers.Layer):
    """Source bookkeeping, projections and config shared by both forms."""

    def __init__(
        self,
        source_channels: Sequence[int],
        source_scales: Sequence[float],
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not source_channels or len(source_channels) != len(source_scales):
            raise ValueError(
                "source_channels and source_scales must be non-empty and of "
                f"equal length, got {list(source_channels)!r} and "
                f"{list(source_scales)!r}."
            )
        self.source_channels = tuple(int(c) for c in source_channels)
        self.source_scales = tuple(float(s) for s in source_scales)
        self.synchronized = synchronized
        self.target_index = len(self.source_channels) - 1

    def _scale(self, source: int) -> float:
        """Resize factor of an edge from `source` to the target."""
        return self.source_scales[-1] / self.source_scales[source]

    def _projection(self, index: int) -> PaddedConv2D:
        """1x1 conv with bias from a source to the target width."""
        return PaddedConv2D(
            self.source_channels[-1], 1, use_bias=True, name=f"project_{index}"
        )

    def build(self, sources_shape, target_shape):
        with creation_scope():
            self._check_sources(sources_shape)
            for source, shape in enumerate(sources_shape):
                if shape[-1] != self.source_channels[source]:
                    raise ValueError(
                        f"source {source} has {shape[-1]} channels, expected "
                        f"{self.source_channels[source]}."
                    )
            for source, op in zip(self._edge_sources(), self.edge_ops):
                op.build(channels_shape(self.source_channels[source]))
            for source, conv in zip(
                self._projected_sources(), self.projections
            ):
                conv.build(channels_shape(self.source_channels[source]))

    def _check_sources(self, sources):
        if len(sources) != len(self.source_channels):
            raise ValueError(
                f"expected {len(self.source_channels)} sources, got "
                f"{len(sources)}."
            )

    def get_config(self):
        return {
            **super().get_config(),
            "source_channels": list(self.source_channels),
            "source_scales": list(self.source_scales),
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class DerivedInteraction(_InteractionBase):
    """The genotype's interaction edges into one target (reference 2.5, 2.7).

    The chosen edges are summed without weights, as in the authors' final
    network.

    Args:
        edges: sequence of `Edge` or `[op, source]`; any number, several ops
            may share a source.
        source_channels: sequence of int. Width of every candidate source.
        source_scales: sequence of float. Resolution of every candidate
            source relative to the 1/4 feature (the last one is the target's).
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        sources: list of the other branch's candidate features, in index
            order, `(batch, h_j, w_j, source_channels[j])`.
        target: `(batch, h, w, source_channels[-1])` feature to update.

    Returns:
        `target + sum of the edges`, shaped like `target`.
    """

    def __init__(
        self,
        edges: Sequence,
        source_channels: Sequence[int],
        source_scales: Sequence[float],
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(source_channels, source_scales, synchronized, **kwargs)
        pairs = []
        for edge in edges:
            op, source = (edge.op, edge.source) if hasattr(edge, "op") else edge
            if not 0 <= int(source) <= self.target_index:
                raise ValueError(
                    f"edge {[op, source]}: source must be in "
                    f"0..{self.target_index}."
                )
            pairs.append((str(op), int(source)))
        self.edges = tuple(pairs)
        self.edge_ops = [
            build_op(op, self.source_channels[source], 1, True, synchronized)
            for op, source in self.edges
        ]
        # 1x1 convs of the edges whose source is not the last one, in edge
        # order; `_projection_index[i]` is edge i's conv (or None).
        self.projections, self._projection_index = [], []
        for index, (_, source) in enumerate(self.edges):
            if source == self.target_index:
                self._projection_index.append(None)
                continue
            self._projection_index.append(len(self.projections))
            self.projections.append(self._projection(index))

    def _edge_sources(self):
        return [source for _, source in self.edges]

    def _projected_sources(self):
        return [s for s in self._edge_sources() if s != self.target_index]

    def call(self, sources, target, training=None):
        self._check_sources(sources)
        total = target
        for index, (_, source) in enumerate(self.edges):
            y = self.edge_ops[index](sources[source], training=training)
            position = self._projection_index[index]
            if position is not None:
                y = resize_by_factor(y, self._scale(source))
                y = self.projections[position](y)
            total = total + y
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "edges": [list(edge) for edge in self.edges],
        }


@keras.saving.register_keras_serializable(package="nppnet")
class SearchInteraction(_InteractionBase):
    """Every candidate source of one target as a mixed edge (reference 2.11).

    Edge `j`: partial-channel `MixedOp` on source j resized by the scale ratio
    (applied even when it is 1, as the authors), then the 1x1 conv for every
    source but the last; `target += sum_j edge_weight_j * edge_j(source_j)`.

    Args:
        source_channels: sequence of int. Width of every candidate source.
        source_scales: sequence of float. Relative resolution of every
            source; the last one is the target's.
        primitives: sequence of str. Candidate ops (columns of the alphas).
        partial_channels: int. Proportion K of every `MixedOp` (2 as the
            authors).
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        sources: list of the other branch's candidate features, index order.
        target: feature to update, `(batch, h, w, source_channels[-1])`.
        op_weights: `(len(sources), len(primitives))` softmaxed alphas.
        edge_weights: `(len(sources),)` edge-normalised betas.

    Returns:
        The updated target.
    """

    def __init__(
        self,
        source_channels: Sequence[int],
        source_scales: Sequence[float],
        primitives: Sequence[str],
        partial_channels: int = 2,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(source_channels, source_scales, synchronized, **kwargs)
        self.primitives = tuple(primitives)
        self.partial_channels = partial_channels
        self.edge_ops = [
            MixedOp(
                channels,
                self.primitives,
                1,
                partial_channels,
                scale=self._scale(source),
                synchronized=synchronized,
                name=f"edge_{source}",
            )
            for source, channels in enumerate(self.source_channels)
        ]
        self.projections = [
            self._projection(source) for source in range(self.target_index)
        ]

    def _edge_sources(self):
        return list(range(len(self.source_channels)))

    def _projected_sources(self):
        return list(range(self.target_index))

    def call(self, sources, target, op_weights, edge_weights, training=None):
        self._check_sources(sources)
        op_weights = weight_rows(op_weights, len(self.edge_ops))
        edge_weights = weight_rows(edge_weights, len(self.edge_ops))
        total = target
        for source, state in enumerate(sources):
            y = self.edge_ops[source](
                state, op_weights[source], training=training
            )
            if source != self.target_index:
                y = self.projections[source](y)
            total = total + edge_weights[source] * y
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "primitives": list(self.primitives),
            "partial_channels": self.partial_channels,
        }
