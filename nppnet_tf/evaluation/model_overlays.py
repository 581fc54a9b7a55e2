"""Overlay panels of a model's predictions, drawn from the records.

`nppnet evaluate` reads records, not a LIP folder, so the photos, labels
and joints of the panel come from the records themselves. Whatever the
protocol of the evaluation, a panel shows original-resolution predictions
(the official protocol's whole-image letterbox, `official.py`, with the
run's scales and flip test) over the original photo, beside the ground
truth, drawn with `overlay.render_overlay`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from nppnet_tf.evaluation.inference import check_scales, predict_multi_scale
from nppnet_tf.evaluation.keypoints import decode_keypoints
from nppnet_tf.evaluation.official import official_dataset, parsing_to_original
from nppnet_tf.evaluation.overlay import render_overlay, side_by_side
from nppnet_tf.lip import MODEL_TO_LIP

log = logging.getLogger(__name__)


def predict_originals(
    model,
    records_dir: str,
    split: str,
    image_ids: Sequence[str],
    image_size: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    batch_size: int = 4,
) -> dict[str, dict[str, np.ndarray]]:
    """Original-resolution predictions and truth for a few images.

    Args:
        model: returns a dict with `parsing` and `pose` (stage 2).
        records_dir: the Beam job's output directory.
        split: the split holding the images.
        image_ids: the images (a small panel: they run eagerly).
        image_size: side S of the network input.
        scales: test scales.
        flip: use the flip test.
        batch_size: images per model call.

    Returns:
        `{image_id: {"photo": (H, W, 3) uint8, "labels": (H, W) uint8
        truth, "joints": (16, 2) LIP-order truth (NaN = missing),
        "parsing": (H, W) uint8 predicted classes, "keypoints": (16, 2)
        LIP-order prediction}}`.

    Raises:
        ValueError: an image id is not in the split's records.
        FileNotFoundError: the split has no records.
    """
    scales = check_scales(scales)
    lip_order = list(MODEL_TO_LIP)
    found: dict[str, dict[str, np.ndarray]] = {}
    batches = official_dataset(
        records_dir,
        split,
        image_size,
        batch_size,
        image_ids=image_ids,
        include_photo=True,
    )
    for batch in batches:
        parsing, heatmaps = predict_multi_scale(
            model, batch["images"], scales, flip
        )
        predicted = parsing_to_original(
            parsing, batch["crop_matrix"], tf.shape(batch["labels"])[1:3]
        ).numpy()
        keypoints = decode_keypoints(heatmaps, batch["crop_matrix"])
        keypoints = keypoints["keypoints"].numpy()
        truth = batch["keypoints"].numpy().astype(np.float64)
        truth[~batch["keypoints_present"].numpy()] = np.nan
        for index, image_id in enumerate(batch["image_id"].numpy()):
            height = int(batch["height"][index])
            width = int(batch["width"][index])
            found[image_id.decode()] = {
                "photo": batch["photo"][index, :height, :width].numpy(),
                "labels": batch["labels"][index, :height, :width].numpy(),
                "joints": truth[index][lip_order],
                "parsing": predicted[index, :height, :width].astype(np.uint8),
                "keypoints": keypoints[index][lip_order],
            }
    missing = sorted(set(image_ids) - set(found))
    if missing:
        raise ValueError(
            f"{len(missing)} images are not in the {split!r} records of "
            f"{records_dir}, e.g. {missing[:5]}"
        )
    return found


def write_model_overlays(
    model,
    records_dir: str,
    split: str,
    image_ids: Sequence[str],
    out_dir: str | Path,
    image_size: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
) -> list[Path]:
    """Writes `<out_dir>/<image_id>.png`: ground truth | prediction.

    Args:
        model: returns a dict with `parsing` and `pose` (stage 2).
        records_dir: the Beam job's output directory.
        split: the split holding the images.
        image_ids: the panel (e.g. `overlay.panel_ids(ids, 8)`).
        out_dir: created if needed.
        image_size: side S of the network input.
        scales: test scales.
        flip: use the flip test.

    Returns:
        The written paths, in `image_ids` order.

    Raises:
        ValueError: an image id is not in the split's records.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not image_ids:
        return []
    predictions = predict_originals(
        model, records_dir, split, image_ids, image_size, scales, flip
    )
    written = []
    for image_id in image_ids:
        item = predictions[image_id]
        panels = [
            render_overlay(
                item["photo"], item["labels"], item["joints"], "ground truth"
            ),
            render_overlay(
                item["photo"], item["parsing"], item["keypoints"], "prediction"
            ),
        ]
        path = out_dir / f"{image_id}.png"
        side_by_side(panels).save(path)
        written.append(path)
    log.info("wrote %d overlays to %s", len(written), out_dir)
    return written
