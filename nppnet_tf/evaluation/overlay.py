"""Overlay images: parsing masks and skeletons drawn over LIP photos.

PIL and numpy only (no display, no matplotlib). A panel image shows the
ground truth and, if predictions are given, the prediction side by side.
Panels are drawn for a fixed, deterministic choice of images: the first
`count` ids in sorted order (`panel_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nppnet_tf.data.lip_files import LIPLayout, read_pose_csv
from nppnet_tf.evaluation.prediction_files import read_label_png
from nppnet_tf.lip import (
    IGNORE_LABEL,
    MODEL_JOINT_NAMES,
    NUM_JOINTS,
    SKELETON,
    colorize,
    lip_to_model,
)

log = logging.getLogger(__name__)

LEFT_COLOUR = (40, 120, 255)
RIGHT_COLOUR = (255, 60, 60)
CENTRE_COLOUR = (40, 220, 40)


def _side_colour(*joints: int) -> tuple[int, int, int]:
    names = [MODEL_JOINT_NAMES[j] for j in joints]
    if any(name.startswith("left") for name in names):
        return LEFT_COLOUR
    if any(name.startswith("right") for name in names):
        return RIGHT_COLOUR
    return CENTRE_COLOUR


def blend_parsing(
    photo: np.ndarray, labels: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blends the `lip.colorize` colours of a label map over a photo.

    Background (0) and ignored (255) pixels keep the photo.

    Args:
        photo: `(height, width, 3)` uint8 RGB.
        labels: `(height, width)` int class ids.
        alpha: opacity of the colours, in [0, 1].

    Returns:
        `(height, width, 3)` uint8 RGB.

    Raises:
        ValueError: sizes differ or alpha is out of range.
    """
    photo = np.asarray(photo)
    labels = np.asarray(labels)
    if photo.shape[:2] != labels.shape or photo.ndim != 3:
        raise ValueError(
            f"photo {photo.shape} and labels {labels.shape} must share height and width"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colorize(np.clip(labels, 0, 255)).astype(np.float32)
    blended = (1.0 - alpha) * photo.astype(np.float32) + alpha * colours
    keep = (labels == 0) | (labels == IGNORE_LABEL)
    out = np.where(keep[..., None], photo.astype(np.float32), blended)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_skeleton(image: Image.Image, joints_lip: np.ndarray) -> Image.Image:
    """Draws limbs (`lip.SKELETON`) and joint dots on a copy of an image.

    Joints with a NaN coordinate and limbs touching them are skipped; left
    limbs are blue, right limbs red, the spine green.

    Args:
        image: an RGB PIL image.
        joints_lip: `(16, 2 or 3)` joints in LIP order, image pixels.

    Returns:
        A new RGB PIL image.
    """
    joints_lip = np.asarray(joints_lip, dtype=np.float64)
    if (
        joints_lip.ndim != 2
        or joints_lip.shape[0] != NUM_JOINTS
        or joints_lip.shape[1] < 2
    ):
        raise ValueError(
            f"joints must have shape (16, 2 or 3), got {joints_lip.shape}"
        )
    joints = lip_to_model(joints_lip[:, :2])
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 120))
    present = np.all(np.isfinite(joints), axis=1)
    for a, b in SKELETON:
        if present[a] and present[b]:
            draw.line(
                [tuple(joints[a]), tuple(joints[b])],
                fill=_side_colour(a, b),
                width=width,
            )
    radius = width + 1
    for index, (x, y) in enumerate(joints):
        if present[index]:
            draw.ellipse(
                [x - radius, y - radius, x + radius, y + radius],
                fill=_side_colour(index),
                outline=(0, 0, 0),
            )
    return out


def render_overlay(
    photo: np.ndarray,
    labels: np.ndarray | None = None,
    joints_lip: np.ndarray | None = None,
    title: str | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """A photo with an optional parsing mask, skeleton and title.

    Args:
        photo: `(height, width, 3)` uint8 RGB.
        labels: optional label map; resized (nearest) to the photo if needed.
        joints_lip: optional `(16, 2+)` LIP-order joints in photo pixels.
        title: optional text written in the top-left corner.
        alpha: opacity of the parsing colours.

    Returns:
        An RGB PIL image of the photo's size.
    """
    photo = np.asarray(photo, dtype=np.uint8)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != photo.shape[:2]:
            resized = Image.fromarray(labels.astype(np.int32)).resize(
                (photo.shape[1], photo.shape[0]), Image.Resampling.NEAREST
            )
            labels = np.asarray(resized)
        photo = blend_parsing(photo, labels, alpha)
    image = Image.fromarray(photo, "RGB")
    if joints_lip is not None:
        image = draw_skeleton(image, joints_lip)
    if title:
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((3, 2), title)
        draw.rectangle([0, 0, right + 3, bottom + 2], fill=(0, 0, 0))
        draw.text((3, 2), title, fill=(255, 255, 255))
    return image


def side_by_side(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Concatenates images left to right on a white canvas."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return canvas


def panel_ids(image_ids: Sequence[str], count: int = 8) -> list[str]:
    """The images an overlay panel shows: the first `count` ids, sorted."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return sorted(image_ids)[:count]


def write_overlays(
    lip_root: str | Path,
    split: str,
    image_ids: Sequence[str],
    out_dir: str | Path,
    parsing_dir: str | Path | None = None,
    pose_predictions: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """Writes one `<image_id>.png` overlay per image: the ground truth (label
    and joints, where they exist) and, if predictions are given, the
    prediction beside it (an image without a prediction shows the bare
    photo there).

    Args:
        lip_root: a LIP release folder.
        split: `"train"` or `"val"`.
        image_ids: the images to draw (see `panel_ids`).
        out_dir: created if needed.
        parsing_dir: folder of predicted `<image_id>.png` labels, or None.
        pose_predictions: `{image_id: (16, 2) LIP-order x, y}`, or None.

    Returns:
        The written paths, in `image_ids` order.

    Raises:
        FileNotFoundError: a photo or ground-truth label is missing.
    """
    layout = LIPLayout(Path(lip_root))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gt_csv = layout.pose_csv(split)
    ground_truth = read_pose_csv(gt_csv) if gt_csv.is_file() else {}
    with_predictions = parsing_dir is not None or pose_predictions is not None
    written = []
    for image_id in image_ids:
        photo_path = layout.image_path(split, image_id)
        if not photo_path.is_file():
            raise FileNotFoundError(f"photo {photo_path} does not exist")
        with Image.open(photo_path) as image:
            photo = np.asarray(image.convert("RGB"))
        labels = read_label_png(layout.label_path(split, image_id))
        gt_joints = (
            ground_truth[image_id].joints if image_id in ground_truth else None
        )
        panels = [render_overlay(photo, labels, gt_joints, "ground truth")]
        if with_predictions:
            predicted_labels = None
            if parsing_dir is not None:
                path = Path(parsing_dir) / f"{image_id}.png"
                predicted_labels = (
                    read_label_png(path) if path.exists() else None
                )
            predicted_joints = (pose_predictions or {}).get(image_id)
            panels.append(
                render_overlay(
                    photo, predicted_labels, predicted_joints, "prediction"
                )
            )
        path = out_dir / f"{image_id}.png"
        side_by_side(panels).save(path)
        written.append(path)
    log.info("wrote %d overlays to %s", len(written), out_dir)
    return written
