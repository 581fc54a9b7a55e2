"""Scores LIP challenge-format prediction files against a LIP release folder.

Predictions (the LIP challenge format, reference 7.3 and 8.3):

* parsing: one single-channel PNG per image, `<image_id>.png`, class ids
  0..19 at the original image resolution;
* pose: one CSV, a row per image: the image name (an extension is allowed)
  then 16 `x,y` pairs in LIP joint order, original pixels, `nan` allowed.

Ground truth: the split's label PNGs and pose CSV (`LIPLayout`); the images
scored are those of the split's id list. Rules:

* an image with no prediction PNG counts every ground-truth pixel as a miss;
  an image with no CSV row counts every annotated joint as wrong; both are
  reported (count and ids);
* a prediction PNG whose size differs from the label is resized with nearest
  neighbour (class ids must not be interpolated; the official script's
  antialiasing would blend ids) and reported;
* ground-truth label values outside 0..19 (255) are ignored, as by the
  official script;
* malformed inputs (a non-image or multi-channel PNG, prediction values
  outside 0..19, a CSV row with the wrong field count or a non-numeric value,
  a duplicate row) raise `ValueError` naming the file (and line).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from nppnet_tf.data.lip_files import (
    AnnotationError,
    LIPLayout,
    image_id_of,
    parse_prediction_row,
    read_id_list,
    read_pose_csv,
)
from nppnet_tf.lip import NUM_CLASSES
from nppnet_tf.metrics.confusion import ConfusionMatrix
from nppnet_tf.metrics.mean_iou import parsing_scores
from nppnet_tf.metrics.pckh import compute_pckh

log = logging.getLogger(__name__)

# PIL modes that hold one integer per pixel.
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_label_png(path: str | Path) -> np.ndarray:
    """Reads a single-channel label PNG into an int32 `(height, width)` array.

    Palette PNGs give their indices (not colours).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image or has several channels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label PNG {path} does not exist")
    try:
        with Image.open(path) as image:
            if image.mode not in _LABEL_MODES:
                raise ValueError(
                    f"{path}: expected a single-channel label PNG (modes "
                    f"{', '.join(_LABEL_MODES)}), got mode {image.mode!r}"
                )
            return np.asarray(image, dtype=np.int32)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None


def read_prediction_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a LIP prediction CSV into `{image_id: (16, 2) x, y}`.

    Blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed or duplicate row, naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose prediction CSV {path} does not exist")
    predictions: dict[str, np.ndarray] = {}
    lines_of: dict[str, int] = {}
    with open(path, newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                image_id, xy = parse_prediction_row(line)
            except AnnotationError as err:
                raise ValueError(f"{path}:{number}: {err}") from None
            if image_id in predictions:
                raise ValueError(
                    f"{path}:{number}: duplicate prediction for {image_id!r} "
                    f"(first on line {lines_of[image_id]})"
                )
            predictions[image_id] = xy
            lines_of[image_id] = number
    return predictions


def _resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(labels.astype(np.int32))
    resized = image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.int32)


def score_parsing(
    layout: LIPLayout,
    split: str,
    image_ids: list[str],
    parsing_dir: Path,
    show_progress: bool = False,
) -> dict:
    """Parsing scores of a folder of prediction PNGs (percent).

    Returns:
        `parsing_scores(...)` with every score in percent, plus the counts:
        `images`, `images_scored`, `images_missing_predictions`,
        `missing_prediction_ids`, `resized_predictions`,
        `resized_prediction_ids`, `unmatched_prediction_files`,
        `ignored_pixels`.

    Raises:
        FileNotFoundError: the folder or a ground-truth PNG is missing.
        ValueError: a prediction PNG is malformed or holds values outside
            0..19.
    """
    parsing_dir = Path(parsing_dir)
    if not parsing_dir.is_dir():
        raise FileNotFoundError(
            f"parsing prediction folder {parsing_dir} does not exist"
        )
    confusion = ConfusionMatrix(NUM_CLASSES)
    missing: list[str] = []
    resized: list[str] = []
    for image_id in tqdm(
        image_ids, desc="parsing", unit="image", disable=not show_progress
    ):
        labels = read_label_png(layout.label_path(split, image_id))
        path = parsing_dir / f"{image_id}.png"
        if not path.exists():
            confusion.update_unpredicted(labels)
            missing.append(image_id)
            continue
        prediction = read_label_png(path)
        if prediction.shape != labels.shape:
            prediction = _resize_nearest(prediction, labels.shape)
            resized.append(image_id)
        bad = (prediction < 0) | (prediction >= NUM_CLASSES)
        if bad.any():
            values = np.unique(prediction[bad])[:5].tolist()
            raise ValueError(
                f"{path}: prediction values must be classes 0..{NUM_CLASSES - 1}, "
                f"got {values}"
            )
        confusion.update(labels, prediction)
    known = set(image_ids)
    unmatched = sorted(
        p.stem for p in parsing_dir.glob("*.png") if p.stem not in known
    )
    if missing:
        log.warning(
            "%d of %d images have no parsing prediction",
            len(missing),
            len(image_ids),
        )
    if resized:
        log.warning(
            "%d parsing predictions resized (nearest) to the label size",
            len(resized),
        )
    scores = parsing_scores(confusion.matrix, confusion.unpredicted)
    return {
        **_as_percent(scores),
        "images": len(image_ids),
        "images_scored": len(image_ids) - len(missing),
        "images_missing_predictions": len(missing),
        "missing_prediction_ids": missing,
        "resized_predictions": len(resized),
        "resized_prediction_ids": resized,
        "resize_rule": "nearest neighbour to the label size",
        "unmatched_prediction_files": unmatched,
        "ignored_pixels": confusion.ignored,
        "confusion_matrix": confusion.matrix.tolist(),
    }


def _as_percent(scores: dict) -> dict:
    out = dict(scores)
    for key in (
        "mean_iou",
        "mean_iou_present_classes",
        "pixel_accuracy",
        "mean_accuracy",
        "frequency_weighted_iou",
    ):
        out[key] = 100.0 * scores[key]
    for key in ("per_class_iou", "per_class_accuracy"):
        out[key] = {name: 100.0 * v for name, v in scores[key].items()}
    return out


def score_pose(
    layout: LIPLayout,
    split: str,
    image_ids: list[str],
    pose_csv: Path,
) -> dict:
    """PCKh@0.5 of a prediction CSV (`PCKhResult.as_dict()`, percent).

    Raises:
        FileNotFoundError: the CSV or the split's ground-truth CSV is missing.
        ValueError: a malformed CSV row, or an image of the split without a
            ground-truth row.
    """
    gt_path = layout.pose_csv(split)
    if not gt_path.is_file():
        raise FileNotFoundError(
            f"ground-truth pose CSV {gt_path} does not exist"
        )
    annotations = read_pose_csv(gt_path)
    lacking = [
        image_id for image_id in image_ids if image_id not in annotations
    ]
    if lacking:
        raise ValueError(
            f"{gt_path}: no ground-truth row for {len(lacking)} images of the "
            f"{split} id list, e.g. {lacking[:5]}"
        )
    ground_truth = {
        image_id: annotations[image_id].joints for image_id in image_ids
    }
    predictions = read_prediction_csv(pose_csv)
    result = compute_pckh(ground_truth, predictions)
    if result.missing_predictions:
        log.warning(
            "%d of %d images have no pose prediction",
            len(result.missing_predictions),
            len(image_ids),
        )
    if result.unmatched_predictions:
        log.warning(
            "%d pose predictions are not images of the %s split (ignored)",
            len(result.unmatched_predictions),
            split,
        )
    return result.as_dict()


def evaluate_prediction_files(
    lip_root: str | Path,
    split: str,
    parsing_dir: str | Path | None = None,
    pose_csv: str | Path | None = None,
    show_progress: bool = False,
) -> dict:
    """Scores parsing and/or pose predictions of one LIP split.

    Args:
        lip_root: a LIP release folder (`LIPLayout`).
        split: `"train"` or `"val"`.
        parsing_dir: folder of `<image_id>.png` predictions, or None.
        pose_csv: prediction CSV, or None.
        show_progress: show a tqdm bar over the images.

    Returns:
        The report dict: `split`, `lip_root`, `images`, `units` ("percent"),
        `parsing` (see `score_parsing`) and `pose` (see `score_pose`), each
        present only if its predictions were given.

    Raises:
        ValueError: neither prediction is given, or an input is malformed.
        FileNotFoundError: a required file or folder is missing.
    """
    if parsing_dir is None and pose_csv is None:
        raise ValueError(
            "give parsing predictions (a PNG folder), a pose CSV, or both"
        )
    layout = LIPLayout(Path(lip_root))
    id_file = layout.id_file(split)
    if not id_file.is_file():
        raise FileNotFoundError(f"LIP root {layout.root}: missing {id_file}")
    image_ids = [image_id_of(name) for name in read_id_list(id_file)]
    if not image_ids:
        raise ValueError(f"{id_file} lists no images")
    duplicates = sorted(
        i for i, n in collections.Counter(image_ids).items() if n > 1
    )
    if duplicates:
        raise ValueError(f"{id_file}: duplicate ids {duplicates[:5]}")
    log.info("scoring %d %s images of %s", len(image_ids), split, layout.root)
    report: dict = {
        "split": split,
        "lip_root": str(layout.root),
        "images": len(image_ids),
        "units": "percent",
    }
    if parsing_dir is not None:
        report["parsing_dir"] = str(parsing_dir)
        report["parsing"] = score_parsing(
            layout, split, image_ids, Path(parsing_dir), show_progress
        )
    if pose_csv is not None:
        report["pose_csv"] = str(pose_csv)
        report["pose"] = score_pose(layout, split, image_ids, Path(pose_csv))
    return report


def json_ready(value):
    """Replaces NaN floats (undefined scores) by None, recursively, so that
    `json.dumps(..., allow_nan=False)` writes standard JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        return json_ready(value.item())
    return value
