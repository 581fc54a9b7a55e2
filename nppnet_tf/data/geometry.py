"""Crop geometry: one affine transform per example (reference 6.3).

Coordinates are pixel indices: the centre of pixel column i is at x = i (and
the same for rows); keypoints use the same coordinates. A crop maps an
original point (x, y) to crop coordinates by one 3x3 affine matrix `M`,
`[x_c, y_c, 1] = M @ [x, y, 1]`.

* `canonical_crop` is the validation branch of reference 6.3: scale
  `s = S / max(H, W)`, no rotation, and the authors' integer translation
  `start = int(c * s - S / 2)` (truncation toward zero) around the person
  centre c, so `x_c = s * x - start_x`.
* `training_crop_matrix` composes the training augmentation's transform
  `M = Flip * T(S/2 - offset) * Rot(angle) * Scale(s) * T(-c)`; drawing the
  random parameters is the tf.data pipeline's job.
* `warp_image` / `warp_label` resample with `ImageProjectiveTransformV3`
  (bilinear, fill 128 for images; nearest, fill 255 for labels), and
  `transform_points` moves keypoints by the same matrix.

All functions are TensorFlow ops: they run eagerly (the Beam job) and inside
`tf.data.Dataset.map`.
"""

from __future__ import annotations

import math

import tensorflow as tf

IMAGE_FILL = 128
LABEL_FILL = 255


def _as_float64(value) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(value), tf.float64)


def _affine(
    a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, d: tf.Tensor, tx, ty
) -> tf.Tensor:
    """3x3 matrix [[a, b, tx], [c, d, ty], [0, 0, 1]] from float64 scalars."""
    zero = tf.zeros([], tf.float64)
    one = tf.ones([], tf.float64)
    return tf.stack(
        [
            tf.stack([a, b, _as_float64(tx)]),
            tf.stack([c, d, _as_float64(ty)]),
            tf.stack([zero, zero, one]),
        ]
    )


def translation(tx, ty) -> tf.Tensor:
    """3x3 float64 matrix of `(x, y) -> (x + tx, y + ty)`."""
    one = tf.ones([], tf.float64)
    zero = tf.zeros([], tf.float64)
    return _affine(one, zero, zero, one, tx, ty)


def scaling(scale) -> tf.Tensor:
    """3x3 float64 matrix of `(x, y) -> (scale * x, scale * y)`."""
    scale = _as_float64(scale)
    zero = tf.zeros([], tf.float64)
    return _affine(scale, zero, zero, scale, 0.0, 0.0)


def rotation(angle_degrees) -> tf.Tensor:
    """3x3 float64 rotation about the origin, counter-clockwise on screen
    for a positive angle (OpenCV's `getRotationMatrix2D` convention, y
    pointing down)."""
    theta = _as_float64(angle_degrees) * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    return _affine(cos, sin, -sin, cos, 0.0, 0.0)


def horizontal_flip(image_size: int) -> tf.Tensor:
    """3x3 float64 matrix of `x -> image_size - 1 - x` (reference 6.3 step 4)."""
    one = tf.ones([], tf.float64)
    zero = tf.zeros([], tf.float64)
    return _affine(-one, zero, zero, one, float(image_size - 1), 0.0)


def base_scale(height, width, image_size: int) -> tf.Tensor:
    """`image_size / max(height, width)` as a float64 scalar."""
    longest = tf.maximum(_as_float64(height), _as_float64(width))
    return float(image_size) / longest


def canonical_crop(
    height, width, center, image_size: int
) -> dict[str, tf.Tensor]:
    """The validation-branch crop of reference 6.3 around `center`.

    Args:
        height: original image height in pixels (scalar).
        width: original image width in pixels (scalar).
        center: `(2,)` person centre (x, y) in original pixel coordinates.
        image_size: side S of the square crop.

    Returns:
        A dict with
        `matrix`: `(3, 3)` float32 affine matrix, original -> crop;
        `scale`: float32 scalar `s = S / max(H, W)`;
        `params`: `(8,)` int32, the authors' `crop_param` order
        `(src_x0, src_y0, dst_x0, dst_y0, src_x1, src_y1, dst_x1, dst_y1)`:
        the rectangle `[src_x0, src_x1) x [src_y0, src_y1)` of the image
        resized by `s` (size `round(W s) x round(H s)`) lands on
        `[dst_x0, dst_x1) x [dst_y0, dst_y1)` of the crop. Unlike the
        authors' code, the last row and column of the resized image are
        included (reference 10.3 item 3).
    """
    height = _as_float64(height)
    width = _as_float64(width)
    center = _as_float64(center)
    scale = base_scale(height, width, image_size)
    half = float(image_size) / 2.0
    # Python's int() truncates toward zero, and so does a float -> int cast.
    start = tf.cast(center * scale - half, tf.int32)
    start_x, start_y = start[0], start[1]
    matrix = tf.linalg.matmul(
        translation(
            -tf.cast(start_x, tf.float64), -tf.cast(start_y, tf.float64)
        ),
        scaling(scale),
    )
    scaled_width = tf.cast(tf.round(width * scale), tf.int32)
    scaled_height = tf.cast(tf.round(height * scale), tf.int32)
    src_x0 = tf.maximum(start_x, 0)
    src_y0 = tf.maximum(start_y, 0)
    src_x1 = tf.minimum(start_x + image_size, scaled_width)
    src_y1 = tf.minimum(start_y + image_size, scaled_height)
    dst_x0 = src_x0 - start_x
    dst_y0 = src_y0 - start_y
    dst_x1 = src_x1 - start_x
    dst_y1 = src_y1 - start_y
    params = tf.stack(
        [src_x0, src_y0, dst_x0, dst_y0, src_x1, src_y1, dst_x1, dst_y1]
    )
    return {
        "matrix": tf.cast(matrix, tf.float32),
        "scale": tf.cast(scale, tf.float32),
        "params": params,
    }


def training_crop_matrix(
    height,
    width,
    center,
    image_size: int,
    scale_multiplier=1.0,
    angle_degrees=0.0,
    offset=(0.0, 0.0),
    flip=False,
) -> tf.Tensor:
    """The training augmentation's transform (reference 6.3 steps 1-4).

    `M = Flip * T(S/2 - offset) * Rot(angle) * Scale(s) * T(-center)` with
    `s = scale_multiplier * S / max(H, W)`: the person centre lands at
    `S/2 - offset` (before the flip), rotated about itself. The authors
    rotate about the image centre and then crop around the rotated person
    centre, which is the same transform up to their integer truncation of
    the crop start.

    Args:
        height: original image height (scalar).
        width: original image width (scalar).
        center: `(2,)` person centre (x, y) in original pixels.
        image_size: side S of the square crop.
        scale_multiplier: the random scale factor m (authors: U[0.5, 1.5]).
        angle_degrees: rotation, counter-clockwise positive (authors:
            U[-40, 40]).
        offset: `(2,)` pixel offset of the crop centre (authors: integers
            in [-40, 40]); the crop window moves by `+offset`.
        flip: scalar bool; mirror the crop, `x -> S - 1 - x`.

    Returns:
        `(3, 3)` float32 affine matrix, original -> crop.
    """
    center = _as_float64(center)
    offset = _as_float64(offset)
    scale = base_scale(height, width, image_size) * _as_float64(
        scale_multiplier
    )
    half = float(image_size) / 2.0
    matrix = translation(-center[0], -center[1])
    matrix = tf.linalg.matmul(scaling(scale), matrix)
    matrix = tf.linalg.matmul(rotation(angle_degrees), matrix)
    matrix = tf.linalg.matmul(
        translation(half - offset[0], half - offset[1]), matrix
    )
    flipped = tf.linalg.matmul(horizontal_flip(image_size), matrix)
    matrix = tf.where(tf.cast(flip, tf.bool), flipped, matrix)
    return tf.cast(matrix, tf.float32)


def transform_points(points, matrix) -> tf.Tensor:
    """Applies a 3x3 affine `matrix` to `(..., 2)` points (x, y).

    Returns:
        float32 tensor of the same shape as `points`.
    """
    points = tf.cast(points, tf.float32)
    matrix = tf.cast(matrix, tf.float32)
    linear = matrix[:2, :2]
    shift = matrix[:2, 2]
    return tf.linalg.matvec(linear, points) + shift


def _inverse_transform(matrix) -> tf.Tensor:
    """The 8 numbers ImageProjectiveTransformV3 wants: crop -> original."""
    inverse = tf.linalg.inv(tf.cast(matrix, tf.float64))
    inverse = inverse / inverse[2, 2]
    flat = tf.reshape(inverse, [9])[:8]
    return tf.cast(flat[tf.newaxis, :], tf.float32)


def _warp(images, matrix, image_size: int, interpolation: str, fill: float):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=_inverse_transform(matrix),
        output_shape=tf.constant([image_size, image_size], tf.int32),
        fill_value=tf.constant(fill, tf.float32),
        interpolation=interpolation,
        fill_mode="CONSTANT",
    )


def warp_image(image, matrix, image_size: int) -> tf.Tensor:
    """Resamples an image into the `image_size` square crop.

    Args:
        image: `(height, width, channels)` image (uint8 or float).
        matrix: `(3, 3)` affine matrix, original -> crop.
        image_size: side of the output.

    Returns:
        `(image_size, image_size, channels)` tensor of the input's dtype;
        bilinear interpolation, 128 outside the original image.
    """
    image = tf.convert_to_tensor(image)
    out = _warp(image[tf.newaxis], matrix, image_size, "BILINEAR", IMAGE_FILL)
    return out[0]


def warp_label(label, matrix, image_size: int) -> tf.Tensor:
    """Resamples a `(height, width)` label map into the crop.

    Returns:
        `(image_size, image_size)` tensor of the input's dtype; nearest
        neighbour, 255 (ignore) outside the original label map.
    """
    label = tf.convert_to_tensor(label)
    out = _warp(
        label[tf.newaxis, :, :, tf.newaxis],
        matrix,
        image_size,
        "NEAREST",
        LABEL_FILL,
    )
    return out[0, :, :, 0]
