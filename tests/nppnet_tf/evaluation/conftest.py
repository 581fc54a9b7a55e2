"""A tiny LIP release folder for the evaluation tests: four real validation
ids with their real pose rows (copied from the metrics fixture), synthetic
photos and block-shaped label maps that contain every class."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nppnet_tf.data.lip_files import LIPLayout

POSE_ROWS = (
    Path(__file__).parents[1] / "metrics" / "fixtures" / "lip_val_pose_rows.csv"
)
# Three images with a head size and one without (102588_1250988).
IDS = ("100034_483681", "100142_449784", "10024_490664", "102588_1250988")


def _labels(height, width, rng):
    """Horizontal bands of every class, a few ignored pixels."""
    rows = np.arange(height) * 20 // height
    labels = np.repeat(rows[:, None], width, axis=1)
    labels = (labels + rng.integers(0, 20)) % 20
    labels[0, :3] = 255
    return labels.astype(np.uint8)


@pytest.fixture
def lip_root(tmp_path):
    root = tmp_path / "LIP"
    layout = LIPLayout(root)
    rng = np.random.default_rng(0)
    for directory in (layout.image_dir("val"), layout.label_dir("val")):
        directory.mkdir(parents=True)
    layout.pose_csv("val").parent.mkdir(parents=True)
    rows = {
        line.split(",")[0][:-4]: line
        for line in POSE_ROWS.read_text().splitlines()
    }
    layout.pose_csv("val").write_text("\n".join(rows[i] for i in IDS))
    layout.id_file("val").write_text("\n".join(IDS) + "\n")
    for index, image_id in enumerate(IDS):
        height, width = 480 + 8 * index, 240 - 8 * index
        photo = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(photo).save(layout.image_path("val", image_id))
        Image.fromarray(_labels(height, width, rng)).save(
            layout.label_path("val", image_id)
        )
    return root


@pytest.fixture
def lip_ids():
    return IDS


@pytest.fixture
def ground_truth_labels(lip_root):
    layout = LIPLayout(lip_root)
    return {
        image_id: np.asarray(
            Image.open(layout.label_path("val", image_id)), np.int32
        )
        for image_id in IDS
    }
