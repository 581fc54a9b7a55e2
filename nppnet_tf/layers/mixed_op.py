"""`MixedOp`: the softmax-weighted candidate ops of one searchable edge."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from nppnet_tf.layers.blocks import (
    batch_norm,
    channels_shape,
    creation_scope,
)
from nppnet_tf.layers.operations import build_op, channel_shuffle
from nppnet_tf.layers.resize import resize_by_factor


def weight_rows(weights, num: int) -> list:
    """The `num` rows of `weights` (a tensor, array or list of rows) as a
    list.

    One unstack per weight matrix instead of one strided slice per use: a
    search step slices the architecture weights thousands of times, and
    every slice adds a slice op and a full-size slice gradient to both
    traced steps (memory and tracing time of the search).
    """
    if isinstance(weights, (list, tuple)):
        if len(weights) != num:
            raise ValueError(f"expected {num} weight rows, got {len(weights)}")
        return list(weights)
    return ops.unstack(weights, num=num, axis=0)


@keras.saving.register_keras_serializable(package="nppnet")
class MixedOp(keras.layers.Layer):
    """Weighted sum of every candidate op on one edge, with partial channels.

    DARTS eq. 2 with PC-DARTS partial channels, as the authors' search
    `MixedOp` (reference 2.11, 3.2): the first `channels / partial_channels`
    channels go through every candidate (built for that width, non-affine
    BatchNorm), the outputs are summed with the op weights; the other
    channels bypass the ops; `concat(sum, bypass)` is channel-shuffled with
    `partial_channels` groups (2 groups for the authors' K = 2).
    `partial_channels=1` is plain DARTS (no bypass, no shuffle).

    Pool candidates get one extra non-affine BatchNorm, as the authors do, so
    their scale matches the convolutions'. `none` contributes exactly zero
    and is not evaluated.

    An edge that changes resolution (`scale`) resizes the weighted sum once,
    bilinearly with align_corners (resizing is linear, so this equals the
    authors' resize of every candidate output), and the bypass with PyTorch's
    default nearest mode, as the authors do (reference 10.3 item 7). At
    stride 2 the bypass is max-pooled 2x2 (PC-DARTS).

    Args:
        channels: int. Input channels; the output has as many.
        primitives: sequence of str. Keys of `operations.OPS`, the column
            order of the edge's op weights.
        stride: int. 2 on the input edges of a reduction cell, else 1.
        partial_channels: int. The proportion K; `channels` must be a
            multiple of it.
        scale: float or None. Resize factor of the output (None: no resize;
            1.0 is an identity resize, as the authors apply even then).
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.
        op_weights: `(len(primitives),)` softmaxed alphas of this edge.

    Returns:
        `(batch, height', width', channels)`, with `height' =
        ceil(height / stride)` or `floor(height * scale)`.
    """

    def __init__(
        self,
        channels: int,
        primitives: Sequence[str],
        stride: int = 1,
        partial_channels: int = 1,
        scale: float | None = None,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if partial_channels < 1 or channels % partial_channels:
            raise ValueError(
                f"partial_channels must be >= 1 and divide channels "
                f"({channels}), got {partial_channels}."
            )
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}.")
        if scale is not None and stride != 1:
            raise ValueError(
                f"scale and stride cannot be combined (scale={scale}, "
                f"stride={stride})."
            )
        if not primitives:
            raise ValueError("primitives must not be empty.")
        self.channels = channels
        self.primitives = tuple(primitives)
        self.stride = stride
        self.partial_channels = partial_channels
        self.scale = None if scale is None else float(scale)
        self.synchronized = synchronized
        self.op_channels = channels // partial_channels
        self.candidates = [
            build_op(name, self.op_channels, stride, False, synchronized)
            for name in self.primitives
        ]
        self._pool_indices = tuple(
            i for i, name in enumerate(self.primitives) if "pool" in name
        )
        self.pool_norms = [
            batch_norm(False, synchronized, name=f"pool_bn_{i}")
            for i in self._pool_indices
        ]

    def build(self, input_shape):
        with creation_scope():
            op_shape = channels_shape(self.op_channels)
            for layer in (*self.candidates, *self.pool_norms):
                layer.build(op_shape)

    def call(self, inputs, op_weights, training=None):
        if self.partial_channels > 1:
            # One split (its gradient one concat) instead of two slices.
            x, bypass = tf.split(
                inputs,
                [self.op_channels, self.channels - self.op_channels],
                axis=-1,
            )
        else:
            x = inputs
        pool_norms = dict(zip(self._pool_indices, self.pool_norms))
        weights = weight_rows(op_weights, len(self.primitives))
        total = None
        for i, (name, op) in enumerate(zip(self.primitives, self.candidates)):
            if name == "none":
                continue  # 0 * weight: no value and no gradient to add
            y = op(x, training=training)
            if i in pool_norms:
                y = pool_norms[i](y, training=training)
            term = weights[i] * y
            total = term if total is None else total + term
        if total is None:  # only `none` candidates
            total = self.candidates[0](x)
        if self.scale is not None:
            total = resize_by_factor(total, self.scale, "bilinear")
        if self.partial_channels == 1:
            return total
        if self.scale is not None:
            bypass = resize_by_factor(bypass, self.scale, "nearest")
        if self.stride > 1:
            bypass = ops.max_pool(bypass, 2, 2, "valid")
        joined = ops.concatenate([total, bypass], axis=-1)
        return channel_shuffle(joined, self.partial_channels)

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "primitives": list(self.primitives),
            "stride": self.stride,
            "partial_channels": self.partial_channels,
            "scale": self.scale,
            "synchronized": self.synchronized,
        }
