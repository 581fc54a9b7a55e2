"""Training augmentation and the evaluation crop (reference 6.2, 6.3, 6.4).

One affine transform per example (`geometry.training_crop_matrix`: random
scale, rotation about the person centre, integer crop offset, optional
horizontal flip) moves the image (bilinear, padding 128), the parsing label
map (nearest, padding 255) and the 16 joints together; a flip also swaps the
left/right joint channels and parsing classes. The pose heatmaps and the
edge map are then regenerated on the crop with `targets.py`, the code the
Beam job used for the stored targets, so training and evaluation targets
are made the same way.

Random parameters come from stateless random ops keyed by a per-example
seed (`example_seed`), so an augmentation is a pure function of
`(seed, epoch key, example key)`: the same for a seed whatever the tf.data
parallelism or shard order.

Everything here is a TensorFlow op: it runs eagerly and inside
`tf.data.Dataset.map`. docs/input_pipeline.md describes the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from nppnet_tf.config import AugmentConfig, DataConfig
from nppnet_tf.data import geometry, targets
from nppnet_tf.lip import MODEL_FLIP_PERM, PARSING_FLIP_PERM

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, reference 6.2
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stateless random ops pinned to one algorithm: "auto_select" may pick
# different algorithms on different devices, and with them different numbers.
RANDOM_ALGORITHM = "philox"

# 256-entry table: label value -> label value after a horizontal flip.
# Classes 14<->15, 16<->17, 18<->19 swap; everything else, 255 included,
# maps to itself.
_PARSING_FLIP_TABLE = tuple(PARSING_FLIP_PERM) + tuple(
    range(len(PARSING_FLIP_PERM), 256)
)

# The keys of `augment_example` and `canonical_example` results.
CROP_KEYS = (
    "image",
    "label",
    "edge",
    "heatmaps",
    "heatmaps_aux",
    "keypoints",
    "keypoints_present",
    "matrix",
)


def normalize_image(image) -> tf.Tensor:
    """ImageNet normalisation (reference 6.2).

    Args:
        image: `(..., 3)` RGB image, uint8 or float with values in [0, 255].

    Returns:
        float32 tensor of the same shape, `(image / 255 - mean) / std`.
    """
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def denormalize_image(image) -> tf.Tensor:
    """Inverse of `normalize_image`, for looking at network inputs.

    Args:
        image: `(..., 3)` float normalised RGB image.

    Returns:
        uint8 tensor of the same shape (rounded, clipped to [0, 255]).
    """
    image = tf.cast(image, tf.float32)
    image = image * tf.constant(IMAGENET_STD) + tf.constant(IMAGENET_MEAN)
    return tf.cast(tf.clip_by_value(tf.round(image * 255.0), 0, 255), tf.uint8)


def example_key(image_id) -> tf.Tensor:
    """Stable int64 key of an example: a 63-bit FarmHash of its image id.

    Unlike a position in the stream, it does not depend on shard order,
    interleaving or shuffling.
    """
    return tf.strings.to_hash_bucket_fast(image_id, 2**63 - 1)


def example_seed(seed, epoch, key) -> tf.Tensor:
    """`(2,)` int64 seed of one example's stateless random ops.

    Args:
        seed: int64 scalar, the run's seed.
        epoch: int64 scalar, the epoch (or any per-epoch key).
        key: int64 scalar identifying the example (`example_key`).

    Returns:
        `fold_in(fold_in((seed, 0), epoch), key)`: distinct seeds for
        distinct `(epoch, key)` pairs of one run.
    """
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)], axis=0)
    per_epoch = tf.random.experimental.stateless_fold_in(
        base, tf.cast(epoch, tf.int64), alg=RANDOM_ALGORITHM
    )
    return tf.random.experimental.stateless_fold_in(
        per_epoch, tf.cast(key, tf.int64), alg=RANDOM_ALGORITHM
    )


def random_crop_parameters(
    seed_or_generator: tf.Tensor | tf.random.Generator,
    config: AugmentConfig,
) -> dict[str, tf.Tensor]:
    """Draws one example's augmentation (reference 6.3).

    Args:
        seed_or_generator: a `(2,)` integer seed for stateless random ops
            (deterministic; see `example_seed`), or a `tf.random.Generator`.
        config: the ranges.

    Returns:
        A dict with `scale_multiplier` (float32, `U[scale_min, scale_max]`),
        `angle_degrees` (float32, `U[-max_rotation, max_rotation]`),
        `offset` (`(2,)` float32 integers, the authors'
        `int((u - 0.5) * 2 * max_offset)` per axis, u ~ U[0, 1)) and `flip`
        (bool, true with probability `flip_probability`).

    Raises:
        TypeError: `config` is not an `AugmentConfig`.
    """
    if not isinstance(config, AugmentConfig):
        raise TypeError(
            f"config must be an AugmentConfig, got {type(config).__name__}"
        )
    if isinstance(seed_or_generator, tf.random.Generator):
        uniform = seed_or_generator.uniform([5], dtype=tf.float32)
    else:
        uniform = tf.random.stateless_uniform(
            [5],
            seed=tf.cast(seed_or_generator, tf.int64),
            dtype=tf.float32,
            alg=RANDOM_ALGORITHM,
        )
    scale = config.scale_min + uniform[0] * (
        config.scale_max - config.scale_min
    )
    angle = (2.0 * uniform[1] - 1.0) * config.max_rotation
    # A float -> int cast truncates toward zero, as Python's int() does.
    offset = tf.cast(
        tf.cast((uniform[2:4] - 0.5) * (2.0 * config.max_offset), tf.int32),
        tf.float32,
    )
    return {
        "scale_multiplier": scale,
        "angle_degrees": angle,
        "offset": offset,
        "flip": uniform[4] < config.flip_probability,
    }


def crop_example(
    decoded: Mapping[str, tf.Tensor],
    matrix,
    flip,
    data_config: DataConfig,
) -> dict[str, tf.Tensor]:
    """Warps an example's original data with `matrix`, regenerates targets.

    Args:
        decoded: `records.decode_example` output (`image`, `label`,
            `keypoints`, `keypoints_present` are read).
        matrix: `(3, 3)` affine matrix, original -> crop.
        flip: scalar bool, true when `matrix` mirrors the image: joint
            channels (`lip.MODEL_FLIP_PERM`) and parsing classes
            (`lip.PARSING_FLIP_PERM`) are then swapped left <-> right.
        data_config: crop size, heatmap stride and sigmas, edge width.

    Returns:
        A dict (keys `CROP_KEYS`): `image` `(S, S, 3)` uint8 (bilinear, 128
        outside), `label` and `edge` `(S, S)` uint8 (255 = ignore),
        `heatmaps`, `heatmaps_aux` `(S/stride, S/stride, 16)` float32,
        `keypoints` `(16, 2)` float32 crop pixels (0 when absent),
        `keypoints_present` `(16,)` bool and the `matrix` used.
    """
    size = data_config.image_size
    flip = tf.cast(flip, tf.bool)
    matrix = tf.cast(matrix, tf.float32)
    image = geometry.warp_image(decoded["image"], matrix, size)
    label = geometry.warp_label(decoded["label"], matrix, size)
    keypoints = geometry.transform_points(decoded["keypoints"], matrix)
    present = tf.cast(decoded["keypoints_present"], tf.bool)

    table = tf.constant(_PARSING_FLIP_TABLE, tf.uint8)
    label = tf.cond(
        flip,
        lambda: tf.gather(table, tf.cast(label, tf.int32)),
        lambda: tf.cast(label, tf.uint8),
    )
    joint_order = tf.where(
        flip,
        tf.constant(MODEL_FLIP_PERM, tf.int32),
        tf.range(len(MODEL_FLIP_PERM), dtype=tf.int32),
    )
    keypoints = tf.gather(keypoints, joint_order)
    present = tf.gather(present, joint_order)
    keypoints = tf.where(present[:, tf.newaxis], keypoints, 0.0)

    stride = data_config.heatmap_stride
    return {
        "image": image,
        "label": label,
        "edge": targets.edge_map(label, data_config.edge_width),
        "heatmaps": targets.heatmaps(
            keypoints, present, size, stride, data_config.sigma
        ),
        "heatmaps_aux": targets.heatmaps(
            keypoints, present, size, stride, data_config.aux_sigma
        ),
        "keypoints": keypoints,
        "keypoints_present": present,
        "matrix": matrix,
    }


def augment_example(
    decoded: Mapping[str, tf.Tensor],
    params: Mapping[str, tf.Tensor],
    data_config: DataConfig,
) -> dict[str, tf.Tensor]:
    """The training branch: one random affine crop and its targets.

    Joints that land outside the crop stay present; their heatmaps hold
    whatever part of the Gaussian lies inside (the authors' behaviour,
    reference 6.4).

    Args:
        decoded: `records.decode_example` output (`image`, `label`,
            `keypoints`, `keypoints_present`, `height`, `width`,
            `person_center` are read).
        params: `random_crop_parameters` output.
        data_config: crop size, heatmap stride and sigmas, edge width.

    Returns:
        The dict of `crop_example` (keys `CROP_KEYS`).
    """
    matrix = geometry.training_crop_matrix(
        decoded["height"],
        decoded["width"],
        decoded["person_center"],
        data_config.image_size,
        scale_multiplier=params["scale_multiplier"],
        angle_degrees=params["angle_degrees"],
        offset=params["offset"],
        flip=params["flip"],
    )
    return crop_example(decoded, matrix, params["flip"], data_config)


def canonical_example(
    decoded: Mapping[str, tf.Tensor], data_config: DataConfig
) -> dict[str, tf.Tensor]:
    """The evaluation branch: the stored canonical crop and its targets.

    The image is recomputed from the original with the stored `crop_matrix`
    (the records hold no crop image); label, edge and heatmaps are the
    targets the Beam job stored (reference 6.3 validation branch).

    Args:
        decoded: `records.decode_example` output.
        data_config: the crop size the records were written with.

    Returns:
        A dict with the keys `CROP_KEYS`, shaped as `crop_example`'s.
    """
    size = data_config.image_size
    image = geometry.warp_image(decoded["image"], decoded["crop_matrix"], size)
    present = tf.cast(decoded["keypoints_present"], tf.bool)
    return {
        "image": tf.ensure_shape(image, [size, size, 3]),
        "label": decoded["crop_label"],
        "edge": decoded["crop_edge"],
        "heatmaps": decoded["crop_heatmaps"],
        "heatmaps_aux": decoded["crop_heatmaps_aux"],
        "keypoints": tf.where(
            present[:, tf.newaxis], decoded["crop_keypoints"], 0.0
        ),
        "keypoints_present": present,
        "matrix": tf.cast(decoded["crop_matrix"], tf.float32),
    }
