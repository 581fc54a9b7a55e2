"""The candidate ops of reference NPPNET.md 1.1-1.3, built from `OPS`."""

import keras
import numpy as np
import pytest

from nppnet_tf.layers.operations import (
    OPS,
    PoolBN,
    PooledConv,
    SEConnect,
    build_op,
    channel_shuffle,
)
from nppnet_tf.search.primitives import ALL_OPS
from tests.helpers import check_layer

# Learnable parameters of every op on 8 channels at stride 1 (BN affine):
# 3x3 conv 576 + BN 16; depthwise 9*8 (or 25*8) + pointwise 64 + BN 16; ...
PARAMETERS_STRIDE_1 = {
    "none": 0,
    "avg_pool_3x3": 16,
    "max_pool_3x3": 16,
    "skip_connect": 0,
    "std_conv_3x3": 576 + 16,
    "std_conv_1x1": 64 + 16,
    "sep_conv_3x3": 2 * (72 + 64 + 16),
    "sep_conv_5x5": 2 * (200 + 64 + 16),
    "dil_conv_3x3_2": 72 + 64 + 16,
    "dil_conv_3x3_4": 72 + 64 + 16,
    "dil_conv_5x5_4": 200 + 64 + 16,
    "se_connect": (8 * 4 + 4) + (4 * 8 + 8),  # no BN at stride 1
    "conv_7x1_1x7": 2 * 7 * 64 + 16,
    "poled_conv_x1": 576 + 8 + 16,
    "poled_conv_x2": 2 * (576 + 8 + 16),
}


def test_ops_table_covers_every_primitive():
    assert tuple(OPS) == ALL_OPS
    with pytest.raises(ValueError, match="Unknown op 'conv_9x9'"):
        build_op("conv_9x9", 8)


@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_op_contract(tmp_path, name, stride):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 8)).astype("float32")
    op = build_op(name, 8, stride, affine=True)
    y = check_layer(op, [x], (2, 8 // stride, 8 // stride, 8), tmp_path)
    if name == "none":
        np.testing.assert_array_equal(y, 0.0)
    if name == "skip_connect" and stride == 1:
        np.testing.assert_array_equal(y, x)
    if stride == 1:
        assert op.count_params() - _statistics(op) == PARAMETERS_STRIDE_1[name]


def _statistics(layer):
    return sum(int(np.prod(v.shape)) for v in layer.non_trainable_weights)


def test_non_affine_ops_have_no_batch_norm_parameters():
    op = build_op("std_conv_3x3", 8, 1, affine=False)
    op.build((None, None, None, 8))
    assert op.count_params() - _statistics(op) == 576


def test_channel_shuffle_interleaves_the_halves():
    x = np.arange(8, dtype="float32").reshape(1, 1, 1, 8)
    y = np.asarray(channel_shuffle(x, 2)).ravel()
    np.testing.assert_array_equal(y, [0, 4, 1, 5, 2, 6, 3, 7])
    y4 = np.asarray(channel_shuffle(x, 4)).ravel()
    np.testing.assert_array_equal(y4, [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(channel_shuffle(x, 1), x)


def test_se_connect_gates_the_raw_input():
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 4)).astype("float32")
    op = SEConnect(4, 1)
    y = np.asarray(op(x))
    mean = x.mean(axis=(1, 2))
    hidden = np.maximum(mean @ op.squeeze.kernel[0, 0] + op.squeeze.bias, 0)
    gate = 1 / (1 + np.exp(-(hidden @ op.excite.kernel[0, 0] + op.excite.bias)))
    np.testing.assert_allclose(y, x * gate[:, None, None], rtol=1e-5)
    assert not hasattr(op, "norm")  # the authors' unused stride-1 BN
    strided = SEConnect(4, 2)
    strided.build((None, None, None, 4))
    assert strided.norm.affine  # always affine, `affine` is ignored


def test_pool_stride_2_windows_are_centred_like_pytorch():
    x = np.arange(36, dtype="float32").reshape(1, 6, 6, 1)
    y = np.asarray(PoolBN("max", 1, 2, affine=False)(x)) * np.sqrt(1 + 1e-5)
    # PyTorch pads 1 on every side: windows start at -1, 1, 3.
    expected = np.array([[7, 9, 11], [19, 21, 23], [31, 33, 35]], "float32")
    np.testing.assert_allclose(y[0, ..., 0], expected, rtol=1e-5)
    avg = np.asarray(PoolBN("avg", 1, 2, affine=False)(x)) * np.sqrt(1 + 1e-5)
    # Top-left window covers rows/cols 0..1 only: padding is not averaged.
    assert avg[0, 0, 0, 0] == pytest.approx((0 + 1 + 6 + 7) / 4, rel=1e-5)


@pytest.mark.parametrize("size", [3, 5, 6])
def test_pooled_conv_keeps_odd_sizes(size):
    x = np.zeros((1, size, size, 4), "float32")
    assert PooledConv(4, 1, 1)(x).shape == (1, size, size, 4)
    assert PooledConv(4, 2, 1)(x).shape == (1, size, size, 4)


def test_se_connect_needs_two_channels():
    with pytest.raises(ValueError, match="channels >= 2"):
        SEConnect(1)
