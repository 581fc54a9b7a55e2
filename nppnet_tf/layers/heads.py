"""Stems, the four stage-1 projections and the prediction heads.

Reference NPPNET.md 2.2 (stems) and 2.8 (projections and heads).
"""

from __future__ import annotations

import keras
from keras import ops

from nppnet_tf.layers.blocks import (
    PaddedConv2D,
    batch_norm,
    channels_shape,
    creation_scope,
)


@keras.saving.register_keras_serializable(package="nppnet")
class Stem(keras.layers.Layer):
    """Three 3x3 convs from the image to 1/4 resolution (reference 2.2).

    conv stride 2 -> BN -> ReLU (C channels, 1/2); conv stride 2 -> BN -> ReLU
    (2C, 1/4); conv stride 1 -> BN, no ReLU (2C, 1/4). Convs have no bias and
    pad 1 on every side.

    Args:
        init_channels: int. C.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        images: `(batch, height, width, 3)` normalised images.

    Returns:
        Tuple of two `(batch, height / 4, width / 4, 2 * init_channels)`
        maps: the second conv's output (the first cell's s0) and the third
        conv's output (its s1).
    """

    def __init__(
        self, init_channels: int, synchronized: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        self.init_channels = init_channels
        self.synchronized = synchronized
        widths = (init_channels, 2 * init_channels, 2 * init_channels)
        strides = (2, 2, 1)
        self.convs = [
            PaddedConv2D(width, 3, stride, name=f"conv_{i}")
            for i, (width, stride) in enumerate(zip(widths, strides))
        ]
        self.norms = [
            batch_norm(True, synchronized, name=f"bn_{i}") for i in range(3)
        ]

    def build(self, images_shape):
        with creation_scope():
            self.convs[0].build(images_shape)
            self.convs[1].build(channels_shape(self.init_channels))
            self.convs[2].build(channels_shape(2 * self.init_channels))
            for norm, width in zip(self.norms, (1, 2, 2)):
                norm.build(channels_shape(width * self.init_channels))

    def call(self, images, training=None):
        x = ops.relu(self.norms[0](self.convs[0](images), training=training))
        s0 = ops.relu(self.norms[1](self.convs[1](x), training=training))
        s1 = self.norms[2](self.convs[2](s0), training=training)
        return s0, s1

    def get_config(self):
        return {
            **super().get_config(),
            "init_channels": self.init_channels,
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class Projection(keras.layers.Layer):
    """ReLU -> 1x1 conv with bias -> BN: the P, A, S, E features (2.8).

    Args:
        filters: int. Output channels.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, h, w, c)` aggregated branch feature X.

    Returns:
        `(batch, h, w, filters)`.
    """

    def __init__(self, filters: int, synchronized: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.synchronized = synchronized
        self.conv = PaddedConv2D(filters, 1, use_bias=True, name="conv")
        self.norm = batch_norm(True, synchronized, name="bn")

    def build(self, input_shape):
        with creation_scope():
            self.conv.build(input_shape)
            self.norm.build(channels_shape(self.filters))

    def call(self, inputs, training=None):
        return self.norm(self.conv(ops.relu(inputs)), training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class Head(keras.layers.Layer):
    """ReLU -> conv -> BN -> ReLU -> 1x1 conv with bias (reference 2.8).

    Pose: hidden 256, 1x1; pose aux: hidden 128, 3x3; parsing: hidden 256,
    1x1; edge: hidden 6, 3x3 without bias. The hidden widths do not scale
    with the init channels.

    Args:
        hidden_channels: int. Width of the hidden conv.
        output_channels: int. Heatmaps or class logits.
        kernel_size: int. Kernel of the hidden conv (1 or 3, pad keeps size).
        hidden_bias: bool. Whether the hidden conv has a bias.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, h, w, c)` feature (P, A, S or E).

    Returns:
        `(batch, h, w, output_channels)` heatmaps or logits.
    """

    def __init__(
        self,
        hidden_channels: int,
        output_channels: int,
        kernel_size: int = 1,
        hidden_bias: bool = True,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_channels = hidden_channels
        self.output_channels = output_channels
        self.kernel_size = kernel_size
        self.hidden_bias = hidden_bias
        self.synchronized = synchronized
        self.hidden = PaddedConv2D(
            hidden_channels, kernel_size, use_bias=hidden_bias, name="hidden"
        )
        self.norm = batch_norm(True, synchronized, name="bn")
        self.output_conv = PaddedConv2D(
            output_channels, 1, use_bias=True, name="output"
        )

    def build(self, input_shape):
        with creation_scope():
            self.hidden.build(input_shape)
            self.norm.build(channels_shape(self.hidden_channels))
            self.output_conv.build(channels_shape(self.hidden_channels))

    def call(self, inputs, training=None):
        x = self.norm(self.hidden(ops.relu(inputs)), training=training)
        return self.output_conv(ops.relu(x))

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_channels": self.hidden_channels,
            "output_channels": self.output_channels,
            "kernel_size": self.kernel_size,
            "hidden_bias": self.hidden_bias,
            "synchronized": self.synchronized,
        }
