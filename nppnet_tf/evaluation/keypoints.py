"""Keypoints from heatmaps: the authors' smoothed argmax (reference 7.1 pose).

For heatmaps already in the `S x S` crop frame (`inference.
predict_multi_scale` resizes the stage-2 heatmaps there with half-pixel
bilinear resizing, as the authors' OpenCV resize does):

1. Gaussian smoothing of every joint channel, sigma = 3 px at S = 384 and
   `3 * S / 384` px for other crop sizes (the same smoothing relative to
   the person), kernel truncated at 4 sigma and mirror ("reflect") border,
   as `scipy.ndimage.gaussian_filter`'s defaults; a separable depthwise
   convolution over the whole batch.
2. Integer argmax per channel (no sub-pixel refinement); the confidence is
   the smoothed value there.
3. Back to original image pixels with the inverse of the crop matrix:
   `[x, y, 1] = M^-1 [x_crop, y_crop, 1]`, which for the evaluation crops
   (no rotation) is `x = (x_crop - t_x) / s`, the same as the authors'
   `(x_crop - dst_x0 + src_x0) / scale`.

Coordinates are pixel indices (pixel centre at integers), the convention of
`nppnet_tf.data.geometry`. All functions are TensorFlow ops.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nppnet_tf.lip import MODEL_TO_LIP

# The authors' smoothing sigma at their 384 crop (reference 7.1 pose step 3).
SMOOTHING_SIGMA_AT_384 = 3.0
REFERENCE_SIZE = 384
TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


def smoothing_sigma(image_size: int) -> float:
    """`3 * image_size / 384`: the authors' sigma scaled to the crop size."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return SMOOTHING_SIGMA_AT_384 * image_size / REFERENCE_SIZE


def gaussian_kernel(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian of radius `int(truncate * sigma + 0.5)`, the
    kernel `scipy.ndimage.gaussian_filter1d` uses.

    Raises:
        ValueError: sigma or truncate not positive.
    """
    if not sigma > 0 or not truncate > 0:
        raise ValueError(
            f"sigma and truncate must be > 0, got {sigma} and {truncate}"
        )
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def smooth_heatmaps(heatmaps, sigma: float) -> tf.Tensor:
    """Gaussian smoothing of every channel of `(batch, h, w, joints)` maps.

    A separable depthwise convolution with `gaussian_kernel(sigma)` (the
    vertical kernel on the maps, then on their transpose) after symmetric
    padding (scipy's "reflect": `d c b a | a b c d | d c b a`).

    Args:
        heatmaps: `(batch, height, width, joints)` float maps.
        sigma: in pixels of these maps.

    Returns:
        float32 tensor of the same shape.

    Raises:
        ValueError: the kernel radius exceeds a static map side.
    """
    heatmaps = tf.cast(tf.convert_to_tensor(heatmaps), tf.float32)
    kernel = gaussian_kernel(sigma)
    radius = (len(kernel) - 1) // 2
    if radius == 0:
        return heatmaps
    for side in heatmaps.shape[1:3]:
        if side is not None and radius > side:
            raise ValueError(
                f"smoothing radius {radius} px (sigma {sigma}) exceeds the "
                f"heatmap side {side}"
            )
    channels = heatmaps.shape[-1]
    if channels is None:
        raise ValueError("heatmaps need a static number of channels")
    padded = tf.pad(
        heatmaps,
        [[0, 0], [radius, radius], [radius, radius], [0, 0]],
        mode="SYMMETRIC",
    )
    # Both passes are vertical (k x 1) convolutions, the second on the
    # transposed maps: oneDNN's depthwise convolution with a wide (1 x k)
    # kernel crashes the process for k >= 17 (TensorFlow 2.16, CPU).
    column = np.tile(kernel[:, None, None, None], (1, 1, channels, 1))
    strides = [1, 1, 1, 1]
    smoothed = tf.nn.depthwise_conv2d(padded, column, strides, "VALID")
    smoothed = tf.transpose(smoothed, [0, 2, 1, 3])
    smoothed = tf.nn.depthwise_conv2d(smoothed, column, strides, "VALID")
    return tf.transpose(smoothed, [0, 2, 1, 3])


def heatmap_argmax(heatmaps) -> tuple[tf.Tensor, tf.Tensor]:
    """Integer location and value of each channel's maximum.

    Args:
        heatmaps: `(batch, height, width, joints)`.

    Returns:
        `(xy, value)`: `(batch, joints, 2)` float32 pixel indices (x, y) of
        the first maximum in row-major order, and `(batch, joints)` float32
        maxima.
    """
    heatmaps = tf.convert_to_tensor(heatmaps)
    shape = tf.shape(heatmaps)
    width = shape[2]
    flat = tf.reshape(heatmaps, [shape[0], shape[1] * width, shape[3]])
    index = tf.argmax(flat, axis=1, output_type=tf.int32)  # (batch, joints)
    value = tf.reduce_max(flat, axis=1)
    xy = tf.stack([index % width, index // width], axis=-1)
    return tf.cast(xy, tf.float32), value


def crop_to_original(points, crop_matrices) -> tf.Tensor:
    """Maps crop pixel coordinates back to original image pixels.

    Args:
        points: `(batch, joints, 2)` crop (x, y).
        crop_matrices: `(batch, 3, 3)` affine matrices, original -> crop.

    Returns:
        `(batch, joints, 2)` float32 original (x, y): `M^-1 [x, y, 1]`.
    """
    matrices = tf.cast(crop_matrices, tf.float64)
    inverse = tf.linalg.inv(matrices)
    points = tf.cast(points, tf.float64)
    linear = inverse[:, tf.newaxis, :2, :2]
    shift = inverse[:, tf.newaxis, :2, 2]
    original = tf.linalg.matvec(linear, points) + shift
    return tf.cast(original, tf.float32)


def decode_keypoints(
    heatmaps, crop_matrices, sigma: float | None = None
) -> dict[str, tf.Tensor]:
    """Joint locations in original pixels from crop-frame heatmaps.

    Args:
        heatmaps: `(batch, S, S, 16)` heatmaps in the crop frame (model
            joint order), e.g. from `inference.predict_multi_scale`.
        crop_matrices: `(batch, 3, 3)` original -> crop matrices.
        sigma: smoothing sigma in crop pixels; None uses
            `smoothing_sigma(S)`.

    Returns:
        A dict of float32 tensors: `keypoints` `(batch, 16, 2)` original
        (x, y) in model order, `keypoints_lip` the same in LIP order,
        `confidence` `(batch, 16)` smoothed maxima (model order) and
        `crop_keypoints` `(batch, 16, 2)` the integer argmax in the crop.

    Raises:
        ValueError: heatmaps without a static size when sigma is None.
    """
    heatmaps = tf.convert_to_tensor(heatmaps)
    if sigma is None:
        size = heatmaps.shape[2]
        if size is None:
            raise ValueError(
                "heatmaps need a static width to choose the smoothing sigma; "
                "pass sigma"
            )
        sigma = smoothing_sigma(size)
    crop_xy, confidence = heatmap_argmax(smooth_heatmaps(heatmaps, sigma))
    keypoints = crop_to_original(crop_xy, crop_matrices)
    return {
        "keypoints": keypoints,
        "keypoints_lip": tf.gather(keypoints, list(MODEL_TO_LIP), axis=1),
        "confidence": confidence,
        "crop_keypoints": crop_xy,
    }


def truncate_coordinates(keypoints: np.ndarray) -> np.ndarray:
    """Coordinates truncated toward zero, as the authors' CSV writer does
    (`int(x)`, reference 7.1 pose step 6) and `format_prediction_row` does:
    the values that a prediction CSV holds and that PCKh then scores."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    return np.where(np.isfinite(keypoints), np.trunc(keypoints), keypoints)
