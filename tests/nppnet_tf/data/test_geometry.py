"""Crop geometry: the canonical crop's numbers, the training transform,
warping, and use inside Dataset.map."""

import math

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.data import geometry


def test_canonical_crop_numbers():
    # H 100, W 50, S 64: s = 0.64; start_x = int(25 * 0.64 - 32) = -16,
    # start_y = int(50 * 0.64 - 32) = 0; resized image 32 x 64.
    crop = geometry.canonical_crop(100, 50, [25.0, 50.0], 64)
    np.testing.assert_allclose(
        crop["matrix"].numpy(),
        [[0.64, 0, 16], [0, 0.64, 0], [0, 0, 1]],
        atol=1e-6,
    )
    assert crop["scale"].numpy() == pytest.approx(0.64)
    # (src_x0, src_y0, dst_x0, dst_y0, src_x1, src_y1, dst_x1, dst_y1)
    assert crop["params"].numpy().tolist() == [0, 0, 16, 0, 32, 64, 48, 64]


def test_start_truncates_toward_zero():
    # W = H = 64, S = 32: s = 0.5, start = int(c * 0.5 - 16).
    for center, expected in [(51.0, 9), (31.0, 0), (30.0, -1), (21.4, -5)]:
        # 51 -> 9.5 -> 9; 31 -> -0.5 -> 0 (not -1); 30 -> -1; 21.4 -> -5.3 -> -5
        crop = geometry.canonical_crop(64, 64, [center, center], 32)
        assert crop["matrix"].numpy()[0, 2] == pytest.approx(-expected), center
        assert crop["matrix"].numpy()[1, 2] == pytest.approx(-expected), center


def test_training_matrix_without_augmentation_centres_person():
    matrix = geometry.training_crop_matrix(100, 50, [25.0, 40.0], 64)
    points = geometry.transform_points(
        [[25.0, 40.0], [35.0, 40.0]], matrix
    ).numpy()
    np.testing.assert_allclose(points, [[32.0, 32.0], [38.4, 32.0]], atol=1e-5)


def test_training_matrix_rotation_offset_flip():
    center = [25.0, 40.0]
    # 90 degrees counter-clockwise on screen: a point right of the centre
    # moves above it (y points down).
    matrix = geometry.training_crop_matrix(
        100, 50, center, 64, angle_degrees=90.0
    )
    point = geometry.transform_points([[35.0, 40.0]], matrix).numpy()[0]
    np.testing.assert_allclose(point, [32.0, 32.0 - 6.4], atol=1e-4)
    # Offset: the window moves by +offset, so the centre lands at S/2 - offset;
    # s = 2 * 64 / 100 = 1.28.
    matrix = geometry.training_crop_matrix(
        100, 50, center, 64, scale_multiplier=2.0, offset=[5.0, -3.0]
    )
    points = geometry.transform_points([center, [26.0, 40.0]], matrix).numpy()
    np.testing.assert_allclose(
        points, [[27.0, 35.0], [27.0 + 1.28, 35.0]], atol=1e-4
    )
    # Flip: x -> S - 1 - x after everything else.
    flipped = geometry.training_crop_matrix(
        100, 50, center, 64, scale_multiplier=2.0, offset=[5.0, -3.0], flip=True
    )
    points = geometry.transform_points([center], flipped).numpy()
    np.testing.assert_allclose(points, [[63.0 - 27.0, 35.0]], atol=1e-4)


def test_warp_image_follows_points_and_fills_128():
    image = np.zeros((20, 10, 3), np.uint8)
    image[4, 6] = 250  # pixel (x=6, y=4)
    # Scale 1, integer translation: no interpolation blur.
    matrix = tf.constant([[1.0, 0, 3], [0, 1.0, 5], [0, 0, 1]])
    out = geometry.warp_image(image, matrix, 24).numpy()
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    x, y = geometry.transform_points([[6.0, 4.0]], matrix).numpy()[0]
    assert (x, y) == (9.0, 9.0)
    assert out[9, 9].tolist() == [250, 250, 250]
    assert out[0, 0].tolist() == [128, 128, 128]  # outside the source
    assert out[5, 3].tolist() == [0, 0, 0]  # source pixel (0, 0)
    assert out[23, 3 + 9].tolist() == [0, 0, 0]  # source (9, 18)
    assert out[23, 3 + 10].tolist() == [128, 128, 128]  # source x = 10: outside


def test_warp_label_nearest_and_fill_255():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    crop = geometry.canonical_crop(3, 4, [1.5, 1.0], 8)  # s = 2
    out = geometry.warp_label(label, crop["matrix"], 8).numpy()
    assert out.shape == (8, 8)
    values = set(np.unique(out).tolist())
    assert values <= set(range(12)) | {255}  # nearest: no blended values
    assert 255 in values and values - {255} == set(range(12))
    # The last source row/column is copied (the authors' crop drops it).
    matrix = crop["matrix"].numpy()
    x, y = matrix[:2, :2] @ [3, 2] + matrix[:2, 2]
    assert out[int(y), int(x)] == 11


def test_canonical_crop_and_warp_in_dataset_map():
    image = tf.zeros((30, 20, 3), tf.uint8)

    def crop_fn(image):
        shape = tf.shape(image)
        crop = geometry.canonical_crop(shape[0], shape[1], [10.0, 15.0], 32)
        return geometry.warp_image(image, crop["matrix"], 32), crop["params"]

    data = tf.data.Dataset.from_tensors(image).map(crop_fn)
    out, params = next(iter(data))
    assert out.shape == (32, 32, 3)
    assert params.shape == (8,)


def test_rotation_matrix_is_opencv_convention():
    matrix = geometry.rotation(30.0).numpy()
    cos, sin = math.cos(math.radians(30)), math.sin(math.radians(30))
    np.testing.assert_allclose(
        matrix[:2, :2], [[cos, sin], [-sin, cos]], atol=1e-12
    )
