"""Resizing with PyTorch semantics: bilinear align_corners and legacy nearest.

The authors resize with `F.interpolate(..., align_corners=True)` almost
everywhere (reference NPPNET.md 0.5) and with PyTorch's default nearest mode
on the bypass half of a partial-channel mixed op (reference 2.11). Keras'
`ops.image.resize` uses half-pixel centres, so both are written here; they also
work with dynamic shapes:

* bilinear align_corners: output row `o` samples input row
  `o * (in - 1) / (out - 1)` (TF's legacy `align_corners=True` kernel);
* nearest: output row `o` copies input row `floor(o * in / out)`.

The output size of a resize by a factor is `floor(in * factor)`, as PyTorch.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops


def scaled_size(size, factor: float):
    """`floor(size * factor)` for a Python int or a scalar tensor."""
    if isinstance(size, int):
        return int(np.floor(size * factor + 1e-9))
    return ops.cast(ops.floor(ops.cast(size, "float32") * factor), "int32")


def _spatial_shape(x):
    shape = ops.shape(x)
    return shape[0], shape[1], shape[2], shape[3]


def _all_int(values) -> bool:
    return all(isinstance(v, int) for v in values)


def _same_static_size(height, width, size) -> bool:
    return _all_int((height, width, *size)) and (height, width) == tuple(size)


def resize_bilinear(x, size):
    """Bilinear resize with align_corners=True (PyTorch semantics).

    Args:
        x: `(batch, height, width, channels)` tensor.
        size: `(out_height, out_width)`, ints or scalar int tensors.

    Returns:
        `(batch, out_height, out_width, channels)` tensor.
    """
    _, height, width, _ = _spatial_shape(x)
    if _same_static_size(height, width, size):
        return x  # align_corners at equal size is exactly the identity
    # tf, not keras.ops: `ops.image.resize` has no align_corners option. The
    # native kernel (forward and gradient) measured 1.2-5x faster on CPU
    # than the same map written as two matmuls with hat-function matrices
    # W[o, i] = max(0, 1 - |o (in - 1) / (out - 1) - i|), and XLA supports it.
    if not _all_int(size):
        size = ops.stack([ops.cast(v, "int32") for v in size])
    resized = tf.raw_ops.ResizeBilinear(
        images=x, size=size, align_corners=True, half_pixel_centers=False
    )
    return ops.cast(resized, x.dtype)  # the kernel always returns float32


def nearest_indices(in_size, out_size):
    """Source index `floor(o * in / out)` of every output position `o`."""
    if isinstance(in_size, int) and isinstance(out_size, int):
        return ops.convert_to_tensor(
            (np.arange(out_size) * in_size) // out_size, dtype="int32"
        )
    return (ops.arange(out_size, dtype="int32") * in_size) // out_size


def resize_nearest(x, size):
    """Nearest resize with PyTorch's default (legacy `nearest`) indexing.

    Args:
        x: `(batch, height, width, channels)` tensor.
        size: `(out_height, out_width)`, ints or scalar int tensors.

    Returns:
        `(batch, out_height, out_width, channels)` tensor.
    """
    _, height, width, _ = _spatial_shape(x)
    if _same_static_size(height, width, size):
        return x
    y = ops.take(x, nearest_indices(height, size[0]), axis=1)
    return ops.take(y, nearest_indices(width, size[1]), axis=2)


def resize_by_factor(x, factor: float, mode: str = "bilinear"):
    """Resize by `factor` to `floor(in * factor)` (PyTorch `scale_factor`)."""
    _, height, width, _ = _spatial_shape(x)
    size = (scaled_size(height, factor), scaled_size(width, factor))
    if mode == "bilinear":
        return resize_bilinear(x, size)
    if mode == "nearest":
        return resize_nearest(x, size)
    raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")


@keras.saving.register_keras_serializable(package="nppnet")
class Interpolate(keras.layers.Layer):
    """Resize by a scale factor, as the authors' `Interpolate` (reference 1.3).

    Args:
        scale: float. Output size is `floor(input size * scale)`; 1 is an
            identity, values below 1 downsample (bilinear, no antialiasing).
        mode: str. `"bilinear"` (align_corners=True) or `"nearest"`.

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.

    Returns:
        `(batch, floor(height * scale), floor(width * scale), channels)`.
    """

    def __init__(self, scale: float, mode: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}.")
        if mode not in ("bilinear", "nearest"):
            raise ValueError(
                f"mode must be 'bilinear' or 'nearest', got {mode!r}."
            )
        self.scale = float(scale)
        self.mode = mode

    def call(self, inputs):
        return resize_by_factor(inputs, self.scale, self.mode)

    def compute_output_shape(self, input_shape):
        def scaled(size):
            return None if size is None else scaled_size(size, self.scale)

        batch, height, width, channels = input_shape
        return (batch, scaled(height), scaled(width), channels)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "mode": self.mode}
