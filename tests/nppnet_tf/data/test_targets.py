"""Targets against hand-computed values of reference 6.4."""

import math

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.data import targets


def _keypoints(*xy):
    points = np.zeros((16, 2), np.float32)
    present = np.zeros(16, bool)
    for index, (x, y) in enumerate(xy):
        points[index] = (x, y)
        present[index] = True
    return points, present


def test_heatmap_cell_centres_and_values():
    # image 8, stride 4: cells sample input x, y in {1.5, 5.5}.
    points, present = _keypoints((1.5, 1.5))
    maps = targets.heatmaps(points, present, 8, 4, 2.0).numpy()
    assert maps.shape == (2, 2, 16)
    assert maps.dtype == np.float32
    # d^2 = 0, 16 (one cell right or down), 32 (diagonal: exponent 4 <= 4.6052).
    expected = np.array(
        [[1.0, math.exp(-2.0)], [math.exp(-2.0), math.exp(-4.0)]]
    )
    np.testing.assert_allclose(maps[:, :, 0], expected, rtol=1e-6)
    assert not maps[:, :, 1:].any()  # absent joints: all zero


def test_heatmap_cutoff_and_axes():
    # Joint at (0, 0), sigma 2: cell (gx=0, gy=0) d^2 = 4.5 -> exp(-0.5625);
    # (gx=1, gy=0) d^2 = 32.5 -> exp(-4.0625); (1, 1) d^2 = 60.5 -> 7.5625 > cutoff.
    points, present = _keypoints((0.0, 0.0), (5.5, 1.5))
    maps = targets.heatmaps(points, present, 8, 4, 2.0).numpy()
    first = maps[:, :, 0]
    assert first[0, 0] == pytest.approx(math.exp(-0.5625), rel=1e-6)
    assert first[0, 1] == pytest.approx(math.exp(-4.0625), rel=1e-6)
    assert first[1, 0] == pytest.approx(math.exp(-4.0625), rel=1e-6)
    assert first[1, 1] == 0.0
    # Second joint at the centre of cell (gx=1, gy=0): index [gy, gx].
    assert maps[0, 1, 1] == pytest.approx(1.0)
    # Rows are gy: cell (gx=1, gy=1) is 4 px below the joint -> exp(-2).
    assert maps[1, 1, 1] == pytest.approx(math.exp(-2.0), rel=1e-6)


def test_heatmap_exact_diagonal_and_absent_nan():
    points, present = _keypoints((5.5, 1.5))
    points[3] = np.nan  # absent joints may carry NaN
    maps = targets.heatmaps(points, present, 8, 4, 2.0).numpy()
    assert maps[1, 0, 0] == pytest.approx(math.exp(-4.0), rel=1e-6)
    assert np.isfinite(maps).all()
    assert not maps[:, :, 3].any()


def test_heatmap_paper_size_peak_and_cap():
    points, present = _keypoints((193.5, 97.5))  # centre of cell (48, 24)
    maps = targets.heatmaps(points, present, 384, 4, 7.0).numpy()
    assert maps.shape == (96, 96, 16)
    assert maps.max() == pytest.approx(1.0)
    assert np.unravel_index(maps[:, :, 0].argmax(), (96, 96)) == (24, 48)
    # Radius of the support: exponent <= 4.6052 -> d <= sqrt(2 * 4.6052) * 7 = 21.2 px.
    support = np.argwhere(maps[:, :, 0] > 0)
    distances = np.hypot(
        support[:, 1] * 4 + 1.5 - 193.5, support[:, 0] * 4 + 1.5 - 97.5
    )
    assert distances.max() <= math.sqrt(2 * 4.6052) * 7.0
    assert maps[:, :, 0][maps[:, :, 0] > 0].min() >= 0.01 - 1e-6


def test_heatmap_errors():
    points, present = _keypoints((1.0, 1.0))
    with pytest.raises(ValueError, match="stride 3"):
        targets.heatmaps(points, present, 8, 3, 2.0)
    with pytest.raises(ValueError, match="sigma"):
        targets.heatmaps(points, present, 8, 4, 0.0)


# Single pixel of class 3 at (row 2, col 2), ignore at (0, 0). Marks by
# relation (row, col): vertical (lower pixel) (2,2), (3,2); horizontal (left)
# (2,1), (2,2); main diagonal (top-left) (1,1), (2,2); anti-diagonal
# (top-right) (1,3), (2,2). The pairs touching (0, 0) are ignored.
LABEL = np.array(
    [
        [255, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 3, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ],
    np.uint8,
)
MARKS = np.array(
    [
        [255, 0, 0, 0, 0],
        [0, 1, 0, 1, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ],
    np.uint8,
)
DILATED = np.array(
    [
        [255, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
        [0, 1, 1, 1, 0],
    ],
    np.uint8,
)


def test_edge_marks_per_relation_and_ignore():
    np.testing.assert_array_equal(
        targets.edge_map(LABEL, width=1).numpy(), MARKS
    )


def test_edge_dilation_width_3():
    edges = targets.edge_map(LABEL, width=3)
    assert edges.dtype == tf.uint8
    np.testing.assert_array_equal(edges.numpy(), DILATED)


def test_edge_vertical_boundary_marks_lower_row():
    label = np.zeros((4, 3), np.uint8)
    label[2:] = 7
    expected = np.zeros((4, 3), np.uint8)
    expected[2] = 1  # only the vertical relation fires, on the lower pixel
    # Diagonals: (1, x) vs (2, x +- 1) also differ -> top pixels of row 1.
    expected[1, 0:2] = 1  # main diagonal marks top-left (1, 0), (1, 1)
    expected[1, 1:3] = 1  # anti-diagonal marks top-right (1, 1), (1, 2)
    np.testing.assert_array_equal(
        targets.edge_map(label, width=1).numpy(), expected
    )


def _reference_edges(label, width):
    """Slicing version of the authors' generate_edge, for random labels."""
    height, cols = label.shape
    edge = np.zeros_like(label, dtype=np.uint8)
    ok = label != 255
    edge[1:][(label[1:] != label[:-1]) & ok[1:] & ok[:-1]] = 1
    edge[:, :-1][(label[:, :-1] != label[:, 1:]) & ok[:, :-1] & ok[:, 1:]] = 1
    sub = edge[:-1, :-1]
    sub[(label[:-1, :-1] != label[1:, 1:]) & ok[:-1, :-1] & ok[1:, 1:]] = 1
    sub = edge[:-1, 1:]
    sub[(label[:-1, 1:] != label[1:, :-1]) & ok[:-1, 1:] & ok[1:, :-1]] = 1
    radius = width // 2
    padded = np.pad(edge, radius)
    out = np.zeros_like(edge)
    for dy in range(width):
        for dx in range(width):
            out = np.maximum(out, padded[dy : dy + height, dx : dx + cols])
    out[~ok] = 255
    return out


@pytest.mark.parametrize("width", [1, 3, 5])
def test_edge_matches_reference_on_random_labels(width):
    rng = np.random.default_rng(width)
    label = rng.choice(
        np.array([0, 1, 2, 255], np.uint8),
        size=(23, 17),
        p=[0.5, 0.2, 0.2, 0.1],
    )
    np.testing.assert_array_equal(
        targets.edge_map(label, width).numpy(), _reference_edges(label, width)
    )


def test_edge_width_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        targets.edge_map(LABEL, width=2)


def test_targets_inside_dataset_map():
    points, present = _keypoints((1.5, 1.5))
    data = tf.data.Dataset.from_tensors((points, present, LABEL))
    data = data.map(
        lambda p, m, label: (
            targets.heatmaps(p, m, 8, 4, 2.0),
            targets.edge_map(label, 3),
        )
    )
    maps, edges = next(iter(data))
    assert maps.shape == (2, 2, 16)
    np.testing.assert_array_equal(edges.numpy(), DILATED)
