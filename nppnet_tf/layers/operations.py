"""Candidate operations of every search space and their helper blocks.

Every primitive of reference NPPNET.md 1.1 (and the DARTS ops the project
lists in `primitives.ALL_OPS`) is built from one table, `OPS`, as
`OPS[name](channels, stride, affine, synchronized)`; each maps `channels`
channels to `channels` channels and divides the resolution by `stride`.

The porting notes of reference 0 (NHWC, BatchNorm epsilon and momentum,
symmetric padding, initialisation) live in `blocks.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from nppnet_tf.layers.blocks import (
    FactorizedReduce,
    Operation,
    PaddedConv2D,
    ReLUConvBN,
    batch_norm,
    channels_shape,
    creation_scope,
)
from nppnet_tf.layers.resize import resize_bilinear, resize_by_factor
from nppnet_tf.search.primitives import ALL_OPS


def channel_shuffle(x, groups: int):
    """Interleaves `groups` channel groups (ShuffleNet; reference 1.3).

    Channels are viewed as `(groups, channels / groups)`, transposed and
    flattened, so for 2 groups output channel `2k` is channel `k` of the first
    half and `2k + 1` is channel `k` of the second half.
    """
    if groups == 1:
        return x
    shape = ops.shape(x)
    channels = shape[-1]
    grouped = ops.reshape(x, (*shape[:-1], groups, channels // groups))
    swapped = ops.swapaxes(grouped, -1, -2)
    return ops.reshape(swapped, shape)


@keras.saving.register_keras_serializable(package="nppnet")
class Zero(Operation):
    """`none`: zeros, subsampled at stride 2 (DARTS `Zero`; reference 1.1).

    Args:
        channels: int. Channels of the input (and output).
        stride: int. 1 or 2.
        affine, synchronized: unused, kept for the `OPS` signature.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        Zeros of shape `(batch, ceil(height / stride), ceil(width / stride),
        channels)`.
    """

    def call(self, inputs):
        if self.stride > 1:
            inputs = inputs[:, :: self.stride, :: self.stride, :]
        return ops.zeros_like(inputs)


@keras.saving.register_keras_serializable(package="nppnet")
class PoolBN(Operation):
    """3x3 max or average pooling (pad 1), then BatchNorm (reference 1.1).

    Average pooling excludes the padding from the mean
    (`count_include_pad=False`), as TF "same" pooling does. At stride 2 the
    stride-1 pooling is subsampled from index 0, which equals PyTorch's
    symmetric padding (Keras' strided "same" would shift by one pixel).

    Args:
        pool_type: str. `"max"` or `"avg"`.
        channels: int. Channels of the input.
        stride: int. 1 or 2.
        affine: bool. Learn the BatchNorm's gamma and beta.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, ceil(height / stride), ceil(width / stride), channels)`.
    """

    def __init__(
        self, pool_type: str, channels: int, stride: int = 1, **kwargs
    ):
        super().__init__(channels, stride, **kwargs)
        if pool_type not in ("max", "avg"):
            raise ValueError(
                f"pool_type must be 'max' or 'avg', got {pool_type!r}."
            )
        self.pool_type = pool_type
        self.norm = batch_norm(self.affine, self.synchronized, name="bn")

    def build(self, input_shape):
        with creation_scope():
            self.norm.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        # Pools are `keras.ops` calls, not layers: supernets hold hundreds.
        pool = ops.max_pool if self.pool_type == "max" else ops.average_pool
        x = pool(inputs, 3, 1, "same")
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride, :]
        return self.norm(x, training=training)

    def get_config(self):
        return {**super().get_config(), "pool_type": self.pool_type}


@keras.saving.register_keras_serializable(package="nppnet")
class DilConv(Operation):
    """Dilated depthwise-separable conv (`dil_conv_*`; authors' `DilConvS`).

    ReLU, depthwise conv (groups = channels, no bias), pointwise 1x1 conv
    (no bias), BatchNorm (reference 1.1; the older full-conv `DilConv` in the
    authors' notebook checkpoint is not what their code uses, 10.3 item 4).

    Args:
        channels: int. Input and output channels.
        kernel_size: int. Odd depthwise kernel size.
        stride: int. 1 or 2 (applied by the depthwise conv).
        dilation: int. Dilation of the depthwise conv; padding keeps the size.
        affine: bool. Learn the BatchNorm's gamma and beta.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, ceil(height / stride), ceil(width / stride), channels)`.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        **kwargs,
    ):
        super().__init__(channels, stride, **kwargs)
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.depthwise = PaddedConv2D(
            channels,
            kernel_size,
            stride,
            dilation,
            depthwise=True,
            name="depthwise",
        )
        self.pointwise = PaddedConv2D(channels, 1, name="pointwise")
        self.norm = batch_norm(self.affine, self.synchronized, name="bn")

    def build(self, input_shape):
        with creation_scope():
            self.depthwise.build(input_shape)
            self.pointwise.build(input_shape)
            self.norm.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        x = self.pointwise(self.depthwise(ops.relu(inputs)))
        return self.norm(x, training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_size": self.kernel_size,
            "dilation": self.dilation,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class SepConv(Operation):
    """Two stacked undilated `DilConv` blocks (`sep_conv_*`; reference 1.1).

    Args:
        channels: int. Input and output channels.
        kernel_size: int. Odd depthwise kernel size.
        stride: int. Stride of the first block.
        affine: bool. Learn the BatchNorms' gamma and beta.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, ceil(height / stride), ceil(width / stride), channels)`.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, stride: int = 1, **kwargs
    ):
        super().__init__(channels, stride, **kwargs)
        self.kernel_size = kernel_size
        common = dict(affine=self.affine, synchronized=self.synchronized)
        self.first = DilConv(
            channels, kernel_size, stride, 1, name="first", **common
        )
        self.second = DilConv(
            channels, kernel_size, 1, 1, name="second", **common
        )

    def build(self, input_shape):
        with creation_scope():
            self.first.build(input_shape)
            self.second.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        x = self.first(inputs, training=training)
        return self.second(x, training=training)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="nppnet")
class FactorizedConv(Operation):
    """ReLU, `k x 1` conv, `1 x k` conv, BatchNorm (`conv_7x1_1x7`).

    Args:
        channels: int. Input and output channels.
        kernel_length: int. Odd length `k` of both factor kernels.
        stride: int. The `k x 1` conv strides rows, the `1 x k` conv columns.
        affine: bool. Learn the BatchNorm's gamma and beta.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, ceil(height / stride), ceil(width / stride), channels)`.
    """

    def __init__(
        self, channels: int, kernel_length: int = 7, stride: int = 1, **kwargs
    ):
        super().__init__(channels, stride, **kwargs)
        self.kernel_length = kernel_length
        self.rows = PaddedConv2D(
            channels, (kernel_length, 1), (stride, 1), name="rows"
        )
        self.columns = PaddedConv2D(
            channels, (1, kernel_length), (1, stride), name="columns"
        )
        self.norm = batch_norm(self.affine, self.synchronized, name="bn")

    def build(self, input_shape):
        with creation_scope():
            self.rows.build(input_shape)
            self.columns.build(channels_shape(self.channels))
            self.norm.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        x = self.columns(self.rows(ops.relu(inputs)))
        return self.norm(x, training=training)

    def get_config(self):
        return {**super().get_config(), "kernel_length": self.kernel_length}


@keras.saving.register_keras_serializable(package="nppnet")
class SEConnect(Operation):
    """Squeeze-and-excitation edge (`se_connect`; reference 1.2).

    Global average pool, 1x1 conv to `channels / 2` (with bias), ReLU, 1x1
    conv back (with bias), sigmoid gate on the un-activated input (no leading
    ReLU). At stride 2 the gated map is average-pooled 2x2 and batch
    normalised (always affine: the authors ignore `affine` here). At stride 1
    the authors' module also owns a BatchNorm that it never applies; it is
    omitted here, so it adds no parameters (reference 9).

    Args:
        channels: int. Input and output channels, at least 2.
        stride: int. 1 or 2.
        affine: ignored (kept for the `OPS` signature).
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, height // stride, width // stride, channels)`.
    """

    def __init__(self, channels: int, stride: int = 1, **kwargs):
        super().__init__(channels, stride, **kwargs)
        if channels < 2:
            raise ValueError(f"se_connect needs channels >= 2, got {channels}.")
        self.squeeze = PaddedConv2D(
            channels // 2, 1, use_bias=True, name="squeeze"
        )
        self.excite = PaddedConv2D(channels, 1, use_bias=True, name="excite")
        if stride > 1:
            self.norm = batch_norm(True, self.synchronized, name="bn")

    def build(self, input_shape):
        with creation_scope():
            self.squeeze.build(input_shape)
            self.excite.build(channels_shape(self.channels // 2))
            if self.stride > 1:
                self.norm.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        gate = ops.mean(inputs, axis=(1, 2), keepdims=True)
        gate = ops.sigmoid(self.excite(ops.relu(self.squeeze(gate))))
        x = inputs * gate
        if self.stride > 1:
            x = ops.average_pool(x, self.stride, self.stride, "valid")
            x = self.norm(x, training=training)
        return x


@keras.saving.register_keras_serializable(package="nppnet")
class PooledConv(Operation):
    """2x2 average pool, n x (ReLU, 3x3 conv with bias, BatchNorm), bilinear
    upsampling (`poled_conv_x1/x2`, the authors' `Pooled_Conv`; reference 1.2).

    A cheap large receptive field: the convs run at half resolution. The
    authors upsample by 2 (twice for two convs at stride 2); the last
    upsampling here resizes to the size every other op of that stride
    produces (`height` at stride 1, `ceil(height / 2)` at stride 2), which is
    the same x2 resize whenever the authors' sizes work and keeps odd sizes
    valid.

    Args:
        channels: int. Input and output channels.
        num_convs: int. 1 (`poled_conv_x1`) or 2 (`poled_conv_x2`).
        stride: int. Stride of every conv.
        affine: bool. Learn the BatchNorms' gamma and beta.
        synchronized: bool. Synchronised BatchNorm.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, ceil(height / stride), ceil(width / stride), channels)`.
    """

    def __init__(
        self, channels: int, num_convs: int = 1, stride: int = 1, **kwargs
    ):
        super().__init__(channels, stride, **kwargs)
        if num_convs not in (1, 2):
            raise ValueError(f"num_convs must be 1 or 2, got {num_convs}.")
        self.num_convs = num_convs
        self.convs = [
            PaddedConv2D(channels, 3, stride, use_bias=True, name=f"conv_{i}")
            for i in range(num_convs)
        ]
        self.norms = [
            batch_norm(self.affine, self.synchronized, name=f"bn_{i}")
            for i in range(num_convs)
        ]

    def build(self, input_shape):
        with creation_scope():
            for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
                conv.build(
                    input_shape if i == 0 else channels_shape(self.channels)
                )
                norm.build(channels_shape(self.channels))

    def call(self, inputs, training=None):
        shape = ops.shape(inputs)
        size = [(shape[1] + self.stride - 1) // self.stride]
        size.append((shape[2] + self.stride - 1) // self.stride)
        x = ops.average_pool(inputs, 2, 2, "valid")
        for conv, norm in zip(self.convs, self.norms):
            x = norm(conv(ops.relu(x)), training=training)
        if self.num_convs == 2 and self.stride == 2:
            x = resize_by_factor(x, 2.0)
        return resize_bilinear(x, size)

    def get_config(self):
        return {**super().get_config(), "num_convs": self.num_convs}


def _skip_connect(channels, stride, affine, synchronized):
    if stride == 1:
        return keras.layers.Identity()
    return FactorizedReduce(
        channels, stride, affine=affine, synchronized=synchronized
    )


def _op(cls, *args, **fixed):
    def build(channels, stride, affine, synchronized):
        return cls(
            channels,
            *args,
            stride=stride,
            affine=affine,
            synchronized=synchronized,
            **fixed,
        )

    return build


def _pool(pool_type):
    def build(channels, stride, affine, synchronized):
        return PoolBN(
            pool_type,
            channels,
            stride,
            affine=affine,
            synchronized=synchronized,
        )

    return build


OpBuilder = Callable[[int, int, bool, bool], keras.layers.Layer]

# name -> builder(channels, stride, affine, synchronized); reference 1.1.
OPS: dict[str, OpBuilder] = {
    "none": _op(Zero),
    "avg_pool_3x3": _pool("avg"),
    "max_pool_3x3": _pool("max"),
    "skip_connect": _skip_connect,
    "std_conv_3x3": _op(ReLUConvBN, 3),
    "std_conv_1x1": _op(ReLUConvBN, 1),
    "sep_conv_3x3": _op(SepConv, 3),
    "sep_conv_5x5": _op(SepConv, 5),
    "dil_conv_3x3_2": _op(DilConv, 3, dilation=2),
    "dil_conv_3x3_4": _op(DilConv, 3, dilation=4),
    # "_4" is the authors' padding: kernel 5, dilation 2 (reference 1.1).
    "dil_conv_5x5_4": _op(DilConv, 5, dilation=2),
    "se_connect": _op(SEConnect),
    "conv_7x1_1x7": _op(FactorizedConv, 7),
    "poled_conv_x1": _op(PooledConv, 1),
    "poled_conv_x2": _op(PooledConv, 2),
}
assert tuple(OPS) == ALL_OPS, "OPS must cover primitives.ALL_OPS in order"


def build_op(
    name: str,
    channels: int,
    stride: int = 1,
    affine: bool = True,
    synchronized: bool = False,
) -> keras.layers.Layer:
    """Builds the candidate op `name` (a key of `OPS`).

    Args:
        name: str. One of `primitives.ALL_OPS`.
        channels: int. Input and output channels.
        stride: int. 1, or 2 on the input edges of a reduction cell.
        affine: bool. False for search-time candidates (reference 0.2).
        synchronized: bool. Synchronised BatchNorm.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in OPS:
        raise ValueError(f"Unknown op {name!r}; known ops: {', '.join(OPS)}.")
    return OPS[name](channels, stride, affine, synchronized)
