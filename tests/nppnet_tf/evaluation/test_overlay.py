"""Tests of the overlay drawings."""

import numpy as np
import pytest
from PIL import Image

from nppnet_tf.evaluation.overlay import (
    CENTRE_COLOUR,
    LEFT_COLOUR,
    RIGHT_COLOUR,
    blend_parsing,
    draw_skeleton,
    panel_ids,
    render_overlay,
    side_by_side,
    write_overlays,
)
from nppnet_tf.lip import PALETTE


def test_blend_parsing_table():
    photo = np.full((1, 3, 3), 100, np.uint8)
    labels = np.array([[0, 2, 255]])
    out = blend_parsing(photo, labels, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background kept
    np.testing.assert_array_equal(out[0, 2], [100, 100, 100])  # ignore kept
    np.testing.assert_array_equal(
        out[0, 1], np.round((100 + PALETTE[2].astype(int)) / 2)
    )
    with pytest.raises(ValueError, match="share height and width"):
        blend_parsing(photo, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="alpha"):
        blend_parsing(photo, labels, alpha=2)


def _joints():
    joints = np.full((16, 2), np.nan)
    joints[9] = [50, 10]  # head top
    joints[8] = [50, 30]  # upper neck
    joints[12] = [30, 40]  # right shoulder
    joints[13] = [70, 40]  # left shoulder
    return joints


def test_skeleton_colours_limbs_by_side_and_skips_missing_joints():
    image = Image.new("RGB", (100, 100))
    out = np.asarray(draw_skeleton(image, _joints()))
    assert tuple(out[20, 50]) == CENTRE_COLOUR  # head top - neck
    assert tuple(out[35, 40]) == RIGHT_COLOUR  # neck - right shoulder
    assert tuple(out[35, 60]) == LEFT_COLOUR  # neck - left shoulder
    assert out[70:, :].max() == 0  # nothing drawn for missing hips and legs
    empty = np.asarray(draw_skeleton(image, np.full((16, 2), np.nan)))
    assert empty.max() == 0
    with pytest.raises(ValueError, match="shape"):
        draw_skeleton(image, np.zeros((15, 2)))


def test_render_overlay_resizes_labels_and_writes_title():
    photo = np.zeros((40, 20, 3), np.uint8)
    labels = np.full((20, 10), 13, np.uint8)  # face everywhere, half size
    image = render_overlay(photo, labels, title="gt")
    assert image.size == (20, 40)
    pixels = np.asarray(image)
    np.testing.assert_array_equal(
        pixels[-1, -1], np.round(PALETTE[13].astype(int) / 2)
    )
    assert pixels[:12, :12].max() > 200  # white title text on black


def test_side_by_side_and_panel_ids():
    combined = side_by_side(
        [Image.new("RGB", (10, 20)), Image.new("RGB", (5, 30))], gap=2
    )
    assert combined.size == (17, 30)
    assert panel_ids(["c", "a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError):
        side_by_side([])


def test_write_overlays_side_by_side(
    lip_root, lip_ids, ground_truth_labels, tmp_path
):
    directory = tmp_path / "parsing"
    directory.mkdir()
    labels = ground_truth_labels[lip_ids[0]]
    Image.fromarray(np.where(labels == 255, 0, labels).astype(np.uint8)).save(
        directory / f"{lip_ids[0]}.png"
    )
    poses = {lip_ids[1]: np.full((16, 2), 5.0)}
    paths = write_overlays(
        lip_root, "val", lip_ids[:2], tmp_path / "overlays", directory, poses
    )
    assert [p.name for p in paths] == [f"{i}.png" for i in lip_ids[:2]]
    with Image.open(paths[0]) as image:
        height, width = labels.shape
        assert image.size == (2 * width + 4, height)
    only_truth = write_overlays(
        lip_root, "val", lip_ids[:1], tmp_path / "gt_only"
    )
    with Image.open(only_truth[0]) as image:
        assert image.size == (labels.shape[1], labels.shape[0])
