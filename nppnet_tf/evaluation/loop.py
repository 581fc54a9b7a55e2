"""The evaluation loop shared by both protocols (see `evaluate.py`).

One traced step per batch, run on every replica of a `tf.distribute`
strategy: predict (flip, scales), per-batch confusion counts and joint
locations in original pixels; the host adds the replicas' confusion
counts and collects their joints by image id. The counts are returned
rather than accumulated in a variable, so the step has no state and is
cached per model and strategy (the search and training loops evaluate
every epoch without retracing).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from nppnet_tf.data import dataset as input_pipeline
from nppnet_tf.evaluation.inference import predict_multi_scale
from nppnet_tf.evaluation.keypoints import (
    decode_keypoints,
    truncate_coordinates,
)
from nppnet_tf.evaluation.official import parsing_to_original
from nppnet_tf.lip import MODEL_TO_LIP, NUM_CLASSES


def confusion_counts(
    labels, predicted, counted=None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Confusion matrix of one batch and its number of ignored pixels.

    Args:
        labels: int ground truth; values outside `0..19` are not counted.
        predicted: int classes of the same shape, in `0..19`.
        counted: optional bool mask of the same shape; pixels outside it
            (batch padding) are neither counted nor ignored.

    Returns:
        `(confusion, ignored)`: `(20, 20)` int64 counts (rows ground truth)
        and the int64 number of pixels inside `counted` with an ignored
        label.
    """
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    predicted = tf.reshape(tf.cast(predicted, tf.int64), [-1])
    inside = tf.ones_like(labels, tf.bool)
    if counted is not None:
        inside = tf.reshape(tf.cast(counted, tf.bool), [-1])
    valid = inside & (labels >= 0) & (labels < NUM_CLASSES)
    pairs = tf.boolean_mask(labels * NUM_CLASSES + predicted, valid)
    size = NUM_CLASSES * NUM_CLASSES
    counts = tf.math.bincount(
        pairs, minlength=size, maxlength=size, dtype=tf.int64
    )
    ignored = tf.reduce_sum(tf.cast(inside & ~valid, tf.int64))
    return tf.reshape(counts, [NUM_CLASSES, NUM_CLASSES]), ignored


def _inside_mask(height, width, shape) -> tf.Tensor:
    rows = tf.range(shape[0])[tf.newaxis, :, tf.newaxis]
    columns = tf.range(shape[1])[tf.newaxis, tf.newaxis, :]
    return (rows < tf.cast(height, tf.int32)[:, tf.newaxis, tf.newaxis]) & (
        columns < tf.cast(width, tf.int32)[:, tf.newaxis, tf.newaxis]
    )


def _replica_function(model_ref, mode, scales, flip, keep_parsing):
    def step(batch):
        parsing, heatmaps = predict_multi_scale(
            model_ref(), batch["images"], scales, flip
        )
        labels = tf.cast(batch["labels"], tf.int32)
        shape = tf.shape(labels)[1:3]
        counted = tf.broadcast_to(
            batch["valid"][:, tf.newaxis, tf.newaxis], tf.shape(labels)
        )
        if mode == "crop":
            predicted = tf.argmax(parsing, axis=-1, output_type=tf.int32)
        else:
            predicted = parsing_to_original(
                parsing, batch["crop_matrix"], shape
            )
            counted &= _inside_mask(batch["height"], batch["width"], shape)
        confusion, ignored = confusion_counts(labels, predicted, counted)
        decoded = decode_keypoints(heatmaps, batch["crop_matrix"])
        outputs = {
            "confusion": confusion,
            "ignored": ignored,
            "keypoints": decoded["keypoints"],
            "image_id": batch["image_id"],
            "ground_truth": batch["keypoints"],
            "present": batch["keypoints_present"],
            "height": batch["height"],
            "width": batch["width"],
            "valid": batch["valid"],
        }
        if keep_parsing:
            outputs["parsing"] = tf.cast(predicted, tf.uint8)
        return outputs

    return step


# One traced step per (model, strategy, protocol, scales, flip): the search
# and training loops evaluate every epoch and should not retrace. Keyed
# weakly by the model; the step holds the model only through a weak
# reference, so the entry goes when the model does.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_function(model, strategy, mode, scales, flip, keep_parsing):
    """The traced distributed step of one evaluation setting (cached).

    Args:
        model: returns a dict with `parsing` and `pose`.
        strategy: the `tf.distribute` strategy to run on.
        mode: `"crop"` (score at the crop resolution) or `"official"`
            (map the parsing back to the original resolution).
        scales: test scales (a tuple).
        flip: use the flip test.
        keep_parsing: also return the predicted class ids (uint8).

    Returns:
        A `tf.function` taking one (distributed) batch dict and returning
        per-replica dicts: `confusion` `(20, 20)` int64, `ignored`,
        `keypoints` `(batch, 16, 2)` original pixels (model order),
        `image_id`, `ground_truth`, `present`, `height`, `width`, `valid`
        (false for the padding copies of `_pad_to_replicas`, which are not
        counted) and, with `keep_parsing`, `parsing`.
    """
    try:
        cache = _STEPS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    key = (id(strategy), mode, scales, flip, keep_parsing)
    entry = cache.get(key)
    if entry is not None and entry[0] is strategy:
        return entry[1]
    replica_step = _replica_function(
        weakref.ref(model), mode, scales, flip, keep_parsing
    )

    @tf.function(reduce_retracing=True)
    def step(batch):
        return strategy.run(replica_step, args=(batch,))

    cache[key] = (strategy, step)
    return step


def _pad_to_replicas(batch: dict, replicas: int) -> dict:
    """Repeats a batch's last image until the batch size is a multiple of
    the replicas, with a `valid` mask: a replica given an empty batch (the
    last batch of a split) fails in TensorFlow's CPU convolutions."""
    size = tf.shape(batch["images"])[0]
    padded = (size + replicas - 1) // replicas * replicas

    def pad(values):
        extra = tf.repeat(values[-1:], padded - size, axis=0)
        return tf.concat([values, extra], axis=0)

    out = {key: pad(values) for key, values in batch.items()}
    out["valid"] = tf.range(padded) < size
    return out


def _build_eagerly(model, image_spec: tf.TensorSpec, strategy) -> None:
    """Builds an unbuilt Keras model with one eager call on zeros: Keras
    creating every variable inside the traced step is several times slower
    than tracing a built model (minutes for a small NPPNet)."""
    if not isinstance(model, keras.Model) or model.built:
        return
    shape = [1, *image_spec.shape[1:]]
    if None in shape:
        return
    with strategy.scope():
        model(tf.zeros(shape, image_spec.dtype), training=False)


def crop_batches(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`(images, targets, metadata)` batches -> the step's flat dicts."""
    spec = dataset.element_spec
    if not (
        isinstance(spec, tuple)
        and len(spec) == 3
        and isinstance(spec[1], dict)
        and isinstance(spec[2], dict)
        and "parsing" in spec[1]
        and {"image_id", "crop_matrix", "keypoints", "keypoints_present"}
        <= set(spec[2])
    ):
        raise ValueError(
            "the crop protocol needs batches of (images, targets, metadata) "
            "as make_dataset(..., training=False, include_metadata=True) "
            f"yields, got element_spec {spec}"
        )

    def flatten(images, targets, metadata):
        return {
            "images": images,
            "labels": targets["parsing"],
            "height": metadata["height"],
            "width": metadata["width"],
            "crop_matrix": metadata["crop_matrix"],
            "keypoints": metadata["keypoints"],
            "keypoints_present": metadata["keypoints_present"],
            "image_id": metadata["image_id"],
        }

    return dataset.map(flatten)


@dataclasses.dataclass
class PassResult:
    """What one pass over a split found.

    Attributes:
        confusion: `(20, 20)` int64 counts summed over images and replicas.
        ignored: pixels not counted (label 255 or outside the classes).
        ground_truth: `{image_id: (16, 2) LIP-order x, y}`, NaN = missing.
        predictions: `{image_id: (16, 2) LIP-order x, y}` original pixels,
            truncated toward zero as a prediction CSV holds them.
        image_ids: the images in the order they were evaluated.
    """

    confusion: np.ndarray
    ignored: int
    ground_truth: dict[str, np.ndarray]
    predictions: dict[str, np.ndarray]
    image_ids: list[str]


def run_pass(
    model,
    batches: tf.data.Dataset,
    strategy,
    mode: str,
    scales: tuple[float, ...],
    flip: bool,
    total: int | None,
    progress: bool,
    on_parsing: Callable[[str, np.ndarray], None] | None = None,
    max_batches: int | None = None,
) -> PassResult:
    """Runs `step_function` over every batch and gathers the results.

    Args:
        model: returns a dict with `parsing` and `pose`.
        batches: dicts as `official.official_dataset` or `crop_batches`
            yield (global batches; split across replicas here).
        strategy: the `tf.distribute` strategy.
        mode: `"crop"` or `"official"`.
        scales: test scales.
        flip: use the flip test.
        total: images expected (progress bar), or None.
        progress: show a tqdm bar over the images.
        on_parsing: called with `(image_id, (height, width) uint8 class
            ids)` for every image, at the scored resolution.
        max_batches: stop after this many batches.

    Returns:
        A `PassResult`.

    Raises:
        ValueError: an image id occurring twice.
    """
    if max_batches is not None:
        batches = batches.take(max_batches)
    _build_eagerly(model, batches.element_spec["images"], strategy)
    replicas = strategy.num_replicas_in_sync
    batches = batches.map(lambda batch: _pad_to_replicas(batch, replicas))
    if replicas > 1:
        batches = input_pipeline.distribute(batches, strategy)
    step = step_function(
        model, strategy, mode, scales, flip, on_parsing is not None
    )
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    ignored = 0
    ground_truth: dict[str, np.ndarray] = {}
    predictions: dict[str, np.ndarray] = {}
    image_ids: list[str] = []
    lip_order = list(MODEL_TO_LIP)
    with tqdm(
        total=total,
        desc=f"evaluate ({mode})",
        unit="image",
        disable=not progress,
    ) as bar:
        for batch in batches:
            outputs = step(batch)
            local = {
                key: strategy.experimental_local_results(value)
                for key, value in outputs.items()
            }
            for replica in range(len(local["image_id"])):
                part = {key: value[replica] for key, value in local.items()}
                confusion += part["confusion"].numpy()
                ignored += int(part["ignored"].numpy())
                valid = part["valid"].numpy()
                ids = [i.decode() for i in part["image_id"].numpy()[valid]]
                keypoints = truncate_coordinates(
                    part["keypoints"].numpy()[valid]
                )
                truth = part["ground_truth"].numpy()[valid].astype(np.float64)
                present = part["present"].numpy()[valid].astype(bool)
                truth[~present] = np.nan
                for index, image_id in enumerate(ids):
                    if image_id in ground_truth:
                        raise ValueError(
                            f"image {image_id!r} occurs twice in the "
                            "evaluated records"
                        )
                    ground_truth[image_id] = truth[index][lip_order]
                    predictions[image_id] = keypoints[index][lip_order]
                    image_ids.append(image_id)
                if on_parsing is not None:
                    parsing = part["parsing"].numpy()[valid]
                    heights = part["height"].numpy()[valid]
                    widths = part["width"].numpy()[valid]
                    for index, image_id in enumerate(ids):
                        on_parsing(
                            image_id,
                            parsing[index, : heights[index], : widths[index]],
                        )
                bar.update(len(ids))
    return PassResult(confusion, ignored, ground_truth, predictions, image_ids)
