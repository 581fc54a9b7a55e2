"""Training targets on a crop (reference 6.4): pose heatmaps and edge map.

One implementation, used eagerly by the Beam preprocessing job (targets of
the canonical crop, stored in the records) and inside `tf.data.Dataset.map`
after augmentation. Both functions are TensorFlow ops.
"""

from __future__ import annotations

import tensorflow as tf

from nppnet_tf.lip import IGNORE_LABEL

# The authors zero Gaussian values whose exponent exceeds this (value < 0.01).
HEATMAP_EXPONENT_CUTOFF = 4.6052


def heatmaps(
    keypoints_xy, present, image_size: int, stride: int, sigma: float
) -> tf.Tensor:
    """CPM-style Gaussian heatmaps, one channel per joint (reference 6.4).

    Cell (gx, gy) samples the input location
    `(stride / 2 - 0.5 + stride * gx, stride / 2 - 0.5 + stride * gy)`; its
    value is `exp(-d^2 / (2 sigma^2))` with d the distance in input pixels
    to the joint, 0 where the exponent exceeds 4.6052, capped at 1. Absent
    joints give an all-zero channel; there is no background channel.

    Args:
        keypoints_xy: `(num_joints, 2)` joint (x, y) in crop pixel
            coordinates (any value for absent joints, NaN included).
        present: `(num_joints,)` bool or 0/1, joint annotated.
        image_size: side S of the crop; the grid is `S // stride` square.
        stride: input pixels per heatmap cell.
        sigma: Gaussian sigma in input pixels (paper: 7 main, 14 aux).

    Returns:
        `(S // stride, S // stride, num_joints)` float32 in [0, 1].

    Raises:
        ValueError: `stride` does not divide `image_size`, or `sigma` <= 0.
    """
    if image_size % stride:
        raise ValueError(
            f"stride {stride} does not divide image_size {image_size}"
        )
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    grid = image_size // stride
    keypoints_xy = tf.cast(keypoints_xy, tf.float32)
    present = tf.cast(present, tf.bool)
    # Absent joints may carry NaN; park them at 0 so no NaN reaches the math.
    keypoints_xy = tf.where(present[:, tf.newaxis], keypoints_xy, 0.0)
    positions = stride / 2.0 - 0.5 + stride * tf.range(grid, dtype=tf.float32)
    dx = positions[:, tf.newaxis] - keypoints_xy[tf.newaxis, :, 0]  # (gx, j)
    dy = positions[:, tf.newaxis] - keypoints_xy[tf.newaxis, :, 1]  # (gy, j)
    squared = dy[:, tf.newaxis, :] ** 2 + dx[tf.newaxis, :, :] ** 2
    exponent = squared / (2.0 * sigma * sigma)
    values = tf.where(
        exponent > HEATMAP_EXPONENT_CUTOFF, 0.0, tf.exp(-exponent)
    )
    values = tf.minimum(values, 1.0)
    return values * tf.cast(present, tf.float32)[tf.newaxis, tf.newaxis, :]


def edge_map(label, width: int = 3) -> tf.Tensor:
    """Parsing edge target (the authors' `generate_edge`, reference 6.4).

    A pixel is marked where its label differs from a neighbour's, neither
    being 255, for four relations: vertical (the lower pixel of the pair is
    marked), horizontal (the left pixel), main diagonal (the top-left pixel
    of a top-left/bottom-right pair) and anti-diagonal (the top-right pixel
    of a top-right/bottom-left pair). The marks are dilated with a
    `width x width` square, then set to 255 wherever the label is 255.

    Args:
        label: `(height, width)` integer label map, 255 = ignore.
        width: side of the square dilation kernel (odd).

    Returns:
        `(height, width)` uint8 map: 0 non-edge, 1 edge, 255 ignore.

    Raises:
        ValueError: `width` is not a positive odd number.
    """
    if width < 1 or width % 2 == 0:
        raise ValueError(
            f"edge width must be a positive odd number, got {width}"
        )
    label = tf.cast(label, tf.int32)
    valid = tf.not_equal(label, IGNORE_LABEL)

    def differs(first, second, first_valid, second_valid):
        return tf.not_equal(first, second) & first_valid & second_valid

    # Vertical pairs (y, y + 1): mark the lower pixel (rows 1..H-1).
    vertical = differs(label[1:, :], label[:-1, :], valid[1:, :], valid[:-1, :])
    vertical = tf.pad(vertical, [[1, 0], [0, 0]])
    # Horizontal pairs (x, x + 1): mark the left pixel (columns 0..W-2).
    horizontal = differs(
        label[:, :-1], label[:, 1:], valid[:, :-1], valid[:, 1:]
    )
    horizontal = tf.pad(horizontal, [[0, 0], [0, 1]])
    # Main diagonal (y, x) - (y + 1, x + 1): mark the top-left pixel.
    diagonal = differs(
        label[:-1, :-1], label[1:, 1:], valid[:-1, :-1], valid[1:, 1:]
    )
    diagonal = tf.pad(diagonal, [[0, 1], [0, 1]])
    # Anti-diagonal (y, x + 1) - (y + 1, x): mark the top-right pixel.
    anti_diagonal = differs(
        label[:-1, 1:], label[1:, :-1], valid[:-1, 1:], valid[1:, :-1]
    )
    anti_diagonal = tf.pad(anti_diagonal, [[0, 1], [1, 0]])
    marks = vertical | horizontal | diagonal | anti_diagonal
    marks = tf.cast(marks, tf.float32)[tf.newaxis, :, :, tf.newaxis]
    # OpenCV's dilate with a centred odd kernel ignores the border: SAME
    # max pooling (padding never wins against 0/1 values) is identical.
    dilated = tf.nn.max_pool2d(marks, ksize=width, strides=1, padding="SAME")
    edges = tf.cast(dilated[0, :, :, 0], tf.uint8)
    return tf.where(valid, edges, tf.constant(IGNORE_LABEL, tf.uint8))
