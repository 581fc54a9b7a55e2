"""Resizing with PyTorch semantics (reference NPPNET.md 0.5, 2.11)."""

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.layers.resize import (
    Interpolate,
    resize_bilinear,
    resize_by_factor,
    resize_nearest,
)
from tests.helpers import check_layer


def reference_bilinear(x, out_h, out_w):
    """PyTorch `interpolate(mode="bilinear", align_corners=True)`, NHWC."""

    def axis_weights(size_in, size_out):
        scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        weights = np.zeros((size_out, size_in))
        for o in range(size_out):
            src = o * scale
            i0 = min(int(np.floor(src)), size_in - 1)
            i1 = min(i0 + 1, size_in - 1)
            frac = src - i0
            weights[o, i0] += 1 - frac
            weights[o, i1] += frac
        return weights

    rows = axis_weights(x.shape[1], out_h)
    cols = axis_weights(x.shape[2], out_w)
    return np.einsum("oh,bhwc,pw->bopc", rows, x.astype(np.float64), cols)


def reference_nearest(x, out_h, out_w):
    """PyTorch default `interpolate(mode="nearest")`: floor(o * in / out)."""
    rows = [min(o * x.shape[1] // out_h, x.shape[1] - 1) for o in range(out_h)]
    cols = [min(o * x.shape[2] // out_w, x.shape[2] - 1) for o in range(out_w)]
    return x[:, rows][:, :, cols]


@pytest.mark.parametrize(
    "in_size, out_size",
    [
        ((6, 6), (12, 12)),
        ((3, 5), (24, 40)),
        ((12, 12), (3, 3)),
        ((7, 4), (1, 9)),
    ],
)
def test_bilinear_matches_align_corners_reference(in_size, out_size):
    x = np.random.default_rng(0).normal(size=(2, *in_size, 3)).astype("float32")
    actual = np.asarray(resize_bilinear(x, out_size))
    np.testing.assert_allclose(
        actual, reference_bilinear(x, *out_size), atol=1e-5
    )


def test_bilinear_corners_are_kept_and_equal_size_is_identity():
    x = np.random.default_rng(1).normal(size=(1, 5, 7, 2)).astype("float32")
    y = np.asarray(resize_bilinear(x, (9, 13)))
    np.testing.assert_allclose(
        y[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]], atol=1e-6
    )
    assert resize_bilinear(x, (5, 7)) is x


@pytest.mark.parametrize(
    "in_size, out_size",
    [((6, 6), (12, 12)), ((12, 8), (3, 2)), ((3, 3), (24, 24))],
)
def test_nearest_matches_pytorch_legacy_nearest(in_size, out_size):
    x = np.random.default_rng(2).normal(size=(2, *in_size, 3)).astype("float32")
    actual = np.asarray(resize_nearest(x, out_size))
    np.testing.assert_array_equal(actual, reference_nearest(x, *out_size))


def test_factor_output_size_is_floor_and_dynamic_shapes_work():
    x = np.random.default_rng(3).normal(size=(1, 12, 20, 4)).astype("float32")
    resize = tf.function(
        lambda t: resize_by_factor(t, 0.25),
        input_signature=[tf.TensorSpec([None, None, None, 4])],
    )
    y = resize(x)
    assert y.shape == (1, 3, 5, 4)
    np.testing.assert_allclose(y, reference_bilinear(x, 3, 5), atol=1e-5)
    assert resize_by_factor(np.zeros((1, 5, 5, 1), "float32"), 0.5).shape == (
        1,
        2,
        2,
        1,
    )


def test_gradient_flows_through_bilinear():
    x = tf.Variable(np.ones((1, 4, 4, 2), "float32"))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(resize_bilinear(x, (8, 8)))
    grad = tape.gradient(y, x)
    # Every output row/column splits weight 1 among its sources.
    np.testing.assert_allclose(tf.reduce_sum(grad), 8 * 8 * 2, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_interpolate_contract(tmp_path, mode):
    x = np.random.default_rng(4).normal(size=(2, 6, 6, 3)).astype("float32")
    check_layer(Interpolate(2.0, mode), [x], (2, 12, 12, 3), tmp_path)


def test_interpolate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        Interpolate(0.0)
    with pytest.raises(ValueError, match="mode"):
        Interpolate(2.0, "bicubic")
