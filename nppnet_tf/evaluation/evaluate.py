"""Model-level evaluation on a split of LIP records (reference 7.1, 7.3).

Two protocols, both scoring stage-2 outputs with the flip test and
optional test scales (`inference.py`), both decoding joints with the
authors' smoothed argmax mapped back to original pixels (`keypoints.py`),
both scoring PCKh@0.5 against the original joints matched by image id:

* `"crop"`: the authors' in-training validation (7.1). The canonical crops
  the records hold (person-centred letterbox at S), parsing logits
  upsampled to S and scored at the crop resolution against the stored crop
  labels (255 padding ignored). Fast; the search and training loops call
  `evaluate_crops` on an already-built dataset every epoch.
* `"official"`: the LIP protocol at the original resolution (7.3). Each
  image is letterboxed whole into the S crop (centre = the image centre,
  scale S / max(H, W)); the crop-frame logits (averaged over flip and
  scales) are inverse-warped to the original pixels with the crop matrix,
  bilinearly, then the argmax is taken; every pixel of the original label
  map is scored (255 ignored). `prediction_dir` also writes LIP
  challenge-format files that `nppnet evaluate-predictions` scores the
  same.

The report dict has the layout of
`prediction_files.evaluate_prediction_files` (scores in percent), plus the
protocol, scales, flip and resolution. docs/evaluation.md, "Model
evaluation", has the details.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from nppnet_tf.config import DataConfig
from nppnet_tf.data import dataset as input_pipeline
from nppnet_tf.data.lip_files import format_prediction_row
from nppnet_tf.evaluation.inference import check_scales, scaled_size
from nppnet_tf.evaluation.loop import PassResult, crop_batches, run_pass
from nppnet_tf.evaluation.official import official_dataset
from nppnet_tf.lip import LIP_JOINT_NAMES
from nppnet_tf.metrics.mean_iou import parsing_scores
from nppnet_tf.metrics.pckh import compute_pckh

log = logging.getLogger(__name__)

PROTOCOLS = ("official", "crop")
DEFAULT_BATCH_SIZE = 8
PARSING_SUBDIR = "parsing"
POSE_CSV_NAME = "pose.csv"
_RESIZE_RULES = {
    "official": "crop-frame logits inverse-warped (bilinear) to the "
    "original resolution, then argmax",
    "crop": "none: scored at the crop resolution against the crop labels",
}


@dataclasses.dataclass
class Evaluation:
    """What `run_evaluation` found.

    Attributes:
        report: the report dict (see `evaluate`).
        pose_predictions: `{image_id: (16, 2) LIP-order x, y}` original
            pixels, as scored (truncated toward zero like the CSV).
        image_ids: the evaluated images, in evaluation order.
    """

    report: dict
    pose_predictions: dict[str, np.ndarray]
    image_ids: list[str]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


# ---------------------------------------------------------------------------
# Reports


def _percent_parsing(confusion: np.ndarray) -> dict:
    scores = parsing_scores(confusion)
    for key in (
        "mean_iou",
        "mean_iou_present_classes",
        "pixel_accuracy",
        "mean_accuracy",
        "frequency_weighted_iou",
    ):
        scores[key] = 100.0 * scores[key]
    for key in ("per_class_iou", "per_class_accuracy"):
        scores[key] = {name: 100.0 * v for name, v in scores[key].items()}
    return scores


def _parsing_section(result: PassResult, protocol: str) -> dict:
    images = len(result.image_ids)
    return {
        **_percent_parsing(result.confusion),
        "images": images,
        "images_scored": images,
        "images_missing_predictions": 0,
        "missing_prediction_ids": [],
        "resized_predictions": 0,
        "resized_prediction_ids": [],
        "resize_rule": _RESIZE_RULES[protocol],
        "unmatched_prediction_files": [],
        "ignored_pixels": result.ignored,
        "confusion_matrix": result.confusion.tolist(),
    }


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError(
            f"model must be a callable Keras model, got {type(model).__name__}"
        )


def evaluate_crops(
    model,
    dataset: tf.data.Dataset,
    flip: bool = True,
    strategy: tf.distribute.Strategy | None = None,
    max_batches: int | None = None,
    scales: Sequence[float] = (1.0,),
    progress: bool = False,
) -> dict:
    """The authors' in-training validation (7.1) on a built dataset.

    For the search and training loops: call it after every epoch with
    `make_dataset(records_dir, "val", data_config, batch_size,
    training=False, include_metadata=True)`; the traced step is cached per
    model and strategy, so later calls do not retrace.

    Args:
        model: returns a dict with `parsing` and `pose` (stage 2).
        dataset: batches of `(images, targets, metadata)` (see above); the
            global batch under a strategy.
        flip: use the flip test.
        strategy: a `tf.distribute` strategy (e.g. the loop's
            MirroredStrategy); None uses the current one (the default
            strategy outside any scope).
        max_batches: evaluate only the first this many batches.
        scales: test scales (see `inference.predict_multi_scale`).
        progress: show a tqdm progress bar.

    Returns:
        A dict, scores in percent: `miou` (mean over all 20 classes, the
        selection value), `miou_present_classes`, `pixel_accuracy`,
        `mean_accuracy`, `pckh` (PCKh@0.5 Avg, the selection value),
        `pckh_upper_body`, `per_class_iou` `{class name: IoU}`,
        `per_joint_pckh` `{LIP joint name: PCKh}`, `num_images`; NaN where
        undefined.

    Raises:
        ValueError: the dataset's elements are not `(images, targets,
            metadata)`, bad scales or model outputs, or an image id
            occurring twice.
    """
    _check_model(model)
    strategy = strategy or tf.distribute.get_strategy()
    scales = check_scales(scales)
    result = run_pass(
        model,
        crop_batches(dataset),
        strategy,
        "crop",
        scales,
        bool(flip),
        None,
        progress,
        max_batches=max_batches,
    )
    parsing = _percent_parsing(result.confusion)
    pose = compute_pckh(result.ground_truth, result.predictions)
    return {
        "miou": parsing["mean_iou"],
        "miou_present_classes": parsing["mean_iou_present_classes"],
        "pixel_accuracy": parsing["pixel_accuracy"],
        "mean_accuracy": parsing["mean_accuracy"],
        "pckh": float(pose.average),
        "pckh_upper_body": float(pose.upper_body),
        "per_class_iou": parsing["per_class_iou"],
        "per_joint_pckh": {
            name: float(value)
            for name, value in zip(LIP_JOINT_NAMES, pose.per_joint)
        },
        "num_images": len(result.image_ids),
    }


def _take_examples(
    dataset: tf.data.Dataset, max_examples: int, batch_size: int
) -> tf.data.Dataset:
    return dataset.unbatch().take(max_examples).batch(batch_size)


def _check_max_examples(max_examples) -> None:
    if max_examples is not None and (
        not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(
            f"max_examples must be an int >= 1 or None, got {max_examples!r}"
        )


class _PredictionWriter:
    """Writes LIP challenge-format parsing PNGs as they are predicted."""

    def __init__(self, prediction_dir: Path):
        self.parsing_dir = prediction_dir / PARSING_SUBDIR
        self.parsing_dir.mkdir(parents=True, exist_ok=True)
        self.pose_csv = prediction_dir / POSE_CSV_NAME

    def __call__(self, image_id: str, labels: np.ndarray) -> None:
        Image.fromarray(np.asarray(labels, np.uint8), "L").save(
            self.parsing_dir / f"{image_id}.png"
        )

    def write_pose(self, predictions: dict[str, np.ndarray]) -> None:
        rows = [
            format_prediction_row(image_id, predictions[image_id])
            for image_id in sorted(predictions)
        ]
        self.pose_csv.write_text("".join(f"{row}\n" for row in rows))


def run_evaluation(
    model,
    records_dir: str | None,
    split: str,
    data_config: DataConfig,
    protocol: str = "official",
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_examples: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    prediction_dir: str | Path | None = None,
    progress: bool = True,
    dataset: tf.data.Dataset | None = None,
) -> Evaluation:
    """`evaluate`, also returning the pose predictions and evaluated ids
    (for overlays). Arguments and errors as `evaluate`."""
    _check_model(model)
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"protocol must be one of {PROTOCOLS}, got {protocol!r}"
        )
    if not isinstance(data_config, DataConfig):
        raise TypeError(
            "data_config must be a DataConfig, got "
            f"{type(data_config).__name__}"
        )
    _check_max_examples(max_examples)
    scales = check_scales(scales)
    strategy = strategy or tf.distribute.get_strategy()
    _check_batch_size(batch_size)
    size = data_config.image_size
    if protocol == "official" and dataset is not None:
        raise ValueError(
            "the official protocol reads the records itself (original "
            "images and labels); pass records_dir, not a dataset"
        )
    if protocol == "crop" and prediction_dir is not None:
        raise ValueError(
            "prediction files hold original-resolution parsing: use "
            f"protocol='official' to write them (got prediction_dir="
            f"{str(prediction_dir)!r} with protocol='crop')"
        )
    if dataset is None and records_dir is None:
        raise ValueError(
            "give records_dir (or, for protocol='crop', a dataset)"
        )
    total = None
    if records_dir is not None and dataset is None:
        total = input_pipeline.count_examples(records_dir, split)
    if max_examples is not None:
        total = max_examples if total is None else min(total, max_examples)
    writer = (
        _PredictionWriter(Path(prediction_dir))
        if prediction_dir is not None
        else None
    )
    log.info(
        "evaluating %s (%s protocol, S=%d, scales %s, flip %s) on %s",
        split,
        protocol,
        size,
        list(scales),
        flip,
        records_dir or "a given dataset",
    )
    started = time.time()
    if protocol == "crop":
        if dataset is None:
            dataset = input_pipeline.make_dataset(
                records_dir,
                split,
                data_config,
                batch_size,
                training=False,
                include_metadata=True,
                deterministic=True,
            )
        if max_examples is not None:
            dataset = _take_examples(dataset, max_examples, batch_size)
        batches = crop_batches(dataset)
    else:
        batches = official_dataset(
            records_dir, split, size, batch_size, max_examples
        )
    result = run_pass(
        model,
        batches,
        strategy,
        protocol,
        scales,
        bool(flip),
        total,
        progress,
        on_parsing=writer,
    )
    if not result.image_ids:
        raise ValueError(
            f"no images evaluated: split {split!r} of {records_dir} is empty"
        )
    pose = compute_pckh(result.ground_truth, result.predictions)
    report = {
        "split": split,
        "records_dir": None if records_dir is None else str(records_dir),
        "images": len(result.image_ids),
        "units": "percent",
        "protocol": protocol,
        "resolution": "original"
        if protocol == "official"
        else f"crop {size}x{size}",
        "image_size": size,
        "scales": list(scales),
        "scale_sizes": [scaled_size(size, scale) for scale in scales],
        "flip": bool(flip),
        "max_examples": max_examples,
        "parsing": _parsing_section(result, protocol),
        "pose": pose.as_dict(),
    }
    manifest = (
        input_pipeline.read_manifest(records_dir) if records_dir else None
    )
    if manifest and manifest.get("lip_root"):
        report["lip_root"] = manifest["lip_root"]
    if writer is not None:
        writer.write_pose(result.predictions)
        report["prediction_dir"] = str(prediction_dir)
        report["parsing_dir"] = str(writer.parsing_dir)
        report["pose_csv"] = str(writer.pose_csv)
        log.info(
            "wrote %d parsing PNGs to %s and %s",
            len(result.image_ids),
            writer.parsing_dir,
            writer.pose_csv,
        )
    report["seconds"] = round(time.time() - started, 3)
    log.info(
        "%s %s: %d images, mIoU %.2f, PCKh@0.5 %.2f (%.1f s)",
        split,
        protocol,
        len(result.image_ids),
        report["parsing"]["mean_iou"],
        report["pose"]["average"],
        report["seconds"],
    )
    return Evaluation(report, result.predictions, result.image_ids)


def evaluate(
    model,
    records_dir: str | None,
    split: str,
    data_config: DataConfig,
    protocol: str = "official",
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_examples: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    prediction_dir: str | Path | None = None,
    progress: bool = True,
    dataset: tf.data.Dataset | None = None,
) -> dict:
    """Evaluates a model on a split of records (see the module doc).

    Args:
        model: a Keras model (or callable) returning a dict with stage-2
            `parsing` logits and `pose` heatmaps (model joint order).
        records_dir: the Beam job's output directory; may be None with a
            `dataset` (crop protocol).
        split: the split to evaluate (`val`, `train`, ...).
        data_config: its `image_size` is the crop side S (must match the
            records for the crop protocol).
        protocol: `"official"` (original resolution, 7.3) or `"crop"` (the
            authors' training-time validation, 7.1).
        scales: test scales, e.g. `(0.75, 1.0, 1.25)`.
        flip: use the flip test.
        batch_size: global batch size; a batch the replicas do not divide
            is padded with copies of its last image, which are not scored.
        max_examples: evaluate only the first this many records (the
            authors' validation uses 5000).
        strategy: a `tf.distribute` strategy; None uses the current one.
        prediction_dir: official protocol only: also write
            `<prediction_dir>/parsing/<image_id>.png` (class ids, original
            resolution) and `<prediction_dir>/pose.csv` (LIP order, integer
            original pixels, sorted by id).
        progress: show a tqdm progress bar over the images.
        dataset: crop protocol only: an already-built
            `make_dataset(..., training=False, include_metadata=True)`.

    Returns:
        The report dict of `prediction_files.evaluate_prediction_files`
        (`split`, `images`, `units` = "percent", `parsing` with `mean_iou`,
        `mean_iou_present_classes`, `pixel_accuracy`, `mean_accuracy`,
        `frequency_weighted_iou`, `per_class_iou` and `per_class_accuracy`
        by class name, counts and `confusion_matrix`; `pose` =
        `PCKhResult.as_dict()`: `average`, `upper_body`, `groups`,
        `per_joint`, counts), plus `protocol`, `resolution`, `image_size`,
        `scales`, `scale_sizes`, `flip`, `max_examples`, `records_dir`,
        `lip_root` (from the records manifest), `seconds` and, with
        `prediction_dir`, `prediction_dir`, `parsing_dir`, `pose_csv`.

    Raises:
        ValueError: an unknown protocol, bad scales, batch size or
            max_examples, a prediction_dir with the crop protocol, a
            dataset with the official one, bad model outputs, an empty
            split or an image id occurring twice.
        FileNotFoundError: the split has no records under `records_dir`.
        TypeError: `data_config` is not a `DataConfig`.
    """
    return run_evaluation(
        model,
        records_dir,
        split,
        data_config,
        protocol=protocol,
        scales=scales,
        flip=flip,
        batch_size=batch_size,
        max_examples=max_examples,
        strategy=strategy,
        prediction_dir=prediction_dir,
        progress=progress,
        dataset=dataset,
    ).report
