"""Building blocks shared by the candidate ops, cells and heads.

`PaddedConv2D` gives every convolution PyTorch's symmetric padding and the
authors' initialisation; `batch_norm` the authors' BatchNorm settings;
`ReLUConvBN` and `FactorizedReduce` are the cell preprocessing blocks
(reference NPPNET.md 1.3) and also candidate ops (`std_conv_*`,
`skip_connect` at stride 2).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from keras import ops

from nppnet_tf.layers.batch_norm import BatchNorm, SyncBatchNorm

BATCHNORM_MOMENTUM = 0.9  # PyTorch momentum 0.1 (reference 0.2)
BATCHNORM_EPSILON = 1e-5  # PyTorch default; Keras' default is 1e-3


def batch_norm(
    affine: bool = True, synchronized: bool = False, name: str | None = None
) -> keras.layers.Layer:
    """BatchNorm with the authors' settings (reference 0.2).

    Epsilon 1e-5 and PyTorch momentum 0.1 (Keras 0.9). Unsynchronised
    BatchNorm uses the fused `BatchNorm`; synchronised BatchNorm
    `SyncBatchNorm`, Keras' `BatchNormalization(synchronized=True)` (batch
    statistics all-reduced over the replicas, the authors' SyncBatchNorm)
    with PyTorch's unbiased moving variance, as the fused one.

    Args:
        affine: bool. Learn gamma and beta; False inside search-time
            candidate ops.
        synchronized: bool. Synchronise the batch statistics over replicas.
        name: optional layer name.
    """
    if not synchronized:
        return BatchNorm(
            BATCHNORM_MOMENTUM, BATCHNORM_EPSILON, affine=affine, name=name
        )
    return SyncBatchNorm(
        momentum=BATCHNORM_MOMENTUM,
        epsilon=BATCHNORM_EPSILON,
        center=affine,
        scale=affine,
        synchronized=True,
        name=name,
    )


def channels_shape(channels: int) -> tuple:
    """A build shape that fixes only the channels.

    Convs and BatchNorms need only the channel count to create their
    weights, so composite layers build their children from their config
    instead of tracing `call` symbolically.
    """
    return (None, None, None, channels)


def creation_scope() -> contextlib.AbstractContextManager:
    """Name scope for building child layers (their variables).

    A build-time speed fix, hence `tf`: TF names every variable handle after
    the current TF name scope, and a new name misses the eager kernel cache
    (about 3 ms per variable). Under this absolute scope the names repeat
    (`nppnet/conv/kernel`, `nppnet/bn/gamma`), so a supernet's thousands of
    variables build several times faster. Keras variable paths (saving,
    `variable.path`) come from Keras' own scope stack and are unaffected.
    """
    return tf.name_scope("nppnet/")


def conv_initializer() -> keras.initializers.Initializer:
    """Untruncated Glorot normal, as PyTorch's `xavier_normal` (reference 0.6).

    Keras' `GlorotNormal` is truncated. With "fan_avg" the standard deviation
    of depthwise kernels is the same in both frameworks.
    """
    return keras.initializers.VarianceScaling(
        1.0, mode="fan_avg", distribution="untruncated_normal"
    )


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(
            f"{name} must be a positive int or pair, got {value!r}."
        )
    return pair


@keras.saving.register_keras_serializable(package="nppnet")
class PaddedConv2D(keras.layers.Layer):
    """Convolution with PyTorch's symmetric padding (reference 0.3, 0.4).

    Pads `(kernel - 1) / 2 * dilation` on every side. At stride 1 that is
    Keras "same"; at stride 2 the input is padded explicitly and convolved
    "valid". TF refuses a stride above 1 together with a dilation above 1;
    such a conv is evaluated at stride 1 and every second row and column is
    kept, starting at index 0, which is exactly the strided result. A strided
    1x1 conv subsamples its input first and convolves at stride 1 (the same
    result, without the discarded work): TensorFlow 2.16's oneDNN kernel for
    the filter gradient of a strided 1x1 conv crashes the process on some
    shapes (batch 2, 64 x 64 x 8, docs/deviations.md).

    Args:
        filters: int. Output channels (ignored when `depthwise`).
        kernel_size: int or pair of odd ints.
        stride: int or pair.
        dilation: int.
        use_bias: bool. Biases start at zero.
        depthwise: bool. One filter per input channel (PyTorch groups = C).

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, ceil(height / stride), ceil(width / stride), filters)`.
    """

    def __init__(
        self,
        filters: int,
        kernel_size=3,
        stride=1,
        dilation: int = 1,
        use_bias: bool = False,
        depthwise: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        kernel = _pair(kernel_size, "kernel_size")
        strides = _pair(stride, "stride")
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"kernel_size must be odd, got {kernel_size!r}.")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}.")
        self.filters = filters
        self.kernel_size = kernel
        self.stride = strides
        self.dilation = dilation
        self.use_bias = use_bias
        self.depthwise = depthwise
        strided = strides != (1, 1)
        pointwise = kernel == (1, 1)
        # Rows and columns 0, s, 2s, ... are the only ones a strided conv
        # reads (1x1) or keeps (dilated): take them before or after.
        self._presample = strided and pointwise
        self._subsample = strided and dilation > 1 and not pointwise
        self._explicit_pad = strided and dilation == 1 and not pointwise
        self._padding = [(k - 1) // 2 * dilation for k in kernel]
        self._conv_strides = strides if self._explicit_pad else (1, 1)
        self._conv_padding = "valid" if self._explicit_pad else "same"

    def build(self, input_shape):
        # The kernel is owned here (no inner Keras Conv2D): half the layers,
        # which matters for supernets with thousands of convs.
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError("PaddedConv2D needs a known channel count.")
        out_channels = in_channels if self.depthwise else self.filters
        last = 1 if self.depthwise else self.filters
        self.kernel = self.add_weight(
            shape=(*self.kernel_size, in_channels, last),
            initializer=conv_initializer(),
            name="kernel",
        )
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(out_channels,), initializer="zeros", name="bias"
            )

    def call(self, inputs):
        x = inputs
        if self._presample:
            x = x[:, :: self.stride[0], :: self.stride[1], :]
        if self._explicit_pad:
            pad_h, pad_w = self._padding
            x = ops.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
        conv = ops.depthwise_conv if self.depthwise else ops.conv
        x = conv(
            x,
            self.kernel,
            strides=self._conv_strides,
            padding=self._conv_padding,
            dilation_rate=self.dilation,
        )
        if self.use_bias:
            x = x + self.bias
        if self._subsample:
            x = x[:, :: self.stride[0], :: self.stride[1], :]
        return x

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "dilation": self.dilation,
            "use_bias": self.use_bias,
            "depthwise": self.depthwise,
        }


class Operation(keras.layers.Layer):
    """Base of the candidate ops: the `OPS` arguments as attributes and config.

    Args:
        channels: int. Input and output channels of the op.
        stride: int. 1, or 2 on the input edges of a reduction cell.
        affine: bool. Learn the BatchNorms' gamma and beta (False inside
            search-time candidate ops; reference 0.2).
        synchronized: bool. Synchronised BatchNorm over replicas.
    """

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        affine: bool = True,
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}.")
        self.channels = channels
        self.stride = stride
        self.affine = affine
        self.synchronized = synchronized

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "stride": self.stride,
            "affine": self.affine,
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class ReLUConvBN(Operation):
    """ReLU, convolution without bias, BatchNorm (`std_conv_*`; reference 1.1).

    Args:
        channels: int. Output channels.
        kernel_size: int. Odd kernel size; padding keeps the size at stride 1.
        stride: int. 1 or 2.
        affine: bool. Learn the BatchNorm's gamma and beta.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, in_channels)` feature map.

    Returns:
        `(batch, ceil(height / stride), ceil(width / stride), channels)`.
    """

    def __init__(
        self, channels: int, kernel_size: int = 1, stride: int = 1, **kwargs
    ):
        super().__init__(channels, stride, **kwargs)
        self.kernel_size = kernel_size
        self.conv = PaddedConv2D(channels, kernel_size, stride, name="conv")
        self.norm = batch_norm(self.affine, self.synchronized, name="bn")

    def build(self, input_shape):
        with creation_scope():
            self.conv.build(input_shape)
            self.norm.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        x = self.conv(ops.relu(inputs))
        return self.norm(x, training=training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="nppnet")
class FactorizedReduce(Operation):
    """Halves the resolution with two offset 1x1 convs (reference 1.3).

    ReLU; one 1x1 conv (no bias) on the even rows/columns and one on the odd
    rows/columns (the authors' stride-2 convs on `x` and on `x[1:, 1:]`), each
    to `channels / 2`; concatenated in that order; BatchNorm. Subsampling
    before a 1x1 conv equals the strided conv and skips the discarded work.

    Args:
        channels: int. Output channels, even.
        stride: int. Must be 2 (kept for the `OPS` signature).
        affine: bool. Learn the BatchNorm's gamma and beta.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, in_channels)`, even height and width.

    Returns:
        `(batch, height / 2, width / 2, channels)`.
    """

    def __init__(self, channels: int, stride: int = 2, **kwargs):
        super().__init__(channels, stride, **kwargs)
        if stride != 2 or channels % 2:
            raise ValueError(
                "FactorizedReduce needs stride 2 and even channels, got "
                f"stride={stride}, channels={channels}."
            )
        self.even = PaddedConv2D(channels // 2, 1, name="even")
        self.odd = PaddedConv2D(channels // 2, 1, name="odd")
        self.norm = batch_norm(self.affine, self.synchronized, name="bn")

    def build(self, input_shape):
        with creation_scope():
            self.even.build(input_shape)
            self.odd.build(input_shape)
            self.norm.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        x = ops.relu(inputs)
        even = self.even(x[:, ::2, ::2, :])
        odd = self.odd(x[:, 1::2, 1::2, :])
        return self.norm(
            ops.concatenate([even, odd], axis=-1), training=training
        )
