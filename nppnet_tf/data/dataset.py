"""tf.data input pipeline: LIP records -> normalised crops and targets.

Reads the GZIP TFRecord shards the Beam job wrote
(`<records_dir>/<split>/<split>-*-of-*.tfrecord.gz`, format in
`records.py`) and yields `(images, targets)` batches, `targets` keyed as the
losses want them (`TARGET_KEYS`). Training batches are augmented
(`augment.py`, reference 6.3) with regenerated targets; evaluation batches
are the canonical crops with the stored targets.

    shard names -> (shuffle) -> parallel interleave of GZIP TFRecordDatasets
    -> (shuffle serialized records) -> map: decode, augment or canonical
    crop, normalise -> batch -> prefetch

A training pass draws one epoch key per epoch from
`tf.data.Dataset.random(seed, rerandomize_each_iteration=True)`: it seeds
the shard and record shuffles of that epoch and, with the example's image
id, its augmentation (`augment.example_seed`). A dataset that Keras iterates
once per epoch therefore augments differently every epoch, and two
pipelines built with the same seed give the same batches in the same order
when `deterministic=True`. docs/input_pipeline.md has the details and the
benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any

import tensorflow as tf

from nppnet_tf.config import AugmentConfig, DataConfig
from nppnet_tf.data import augment, records

log = logging.getLogger(__name__)

TARGET_KEYS = ("heatmaps", "heatmaps_aux", "parsing", "edge")
METADATA_KEYS = (
    "image_id",
    "height",
    "width",
    "crop_matrix",
    "crop_params",
    "crop_scale",
    "keypoints",
    "keypoints_present",
)
SEARCH_SPLITS = ("search_weights", "search_arch")
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord.gz"
# DataConfig fields the records were written with that the pipeline must
# agree with (crop shapes, and the targets it regenerates after augmenting).
_RECORD_FIELDS = (
    "image_size",
    "heatmap_stride",
    "sigma",
    "aux_sigma",
    "edge_width",
)
DEFAULT_SHUFFLE_BUFFER = 256
DEFAULT_CYCLE_LENGTH = 4


def shard_pattern(records_dir: str, split: str) -> str:
    """Glob pattern of one split's shards."""
    return os.path.join(records_dir, split, f"{split}-*-of-*{SHARD_SUFFIX}")


def split_files(records_dir: str, split: str) -> list[str]:
    """Sorted shard files of `split` under `records_dir`.

    Raises:
        FileNotFoundError: no shard matches (names the directory and split).
    """
    pattern = shard_pattern(records_dir, split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"no TFRecord shards of split {split!r} in records directory "
            f"{records_dir!r} (nothing matches {pattern})"
        )
    return files


def read_manifest(records_dir: str) -> dict[str, Any] | None:
    """The Beam job's `<records_dir>/manifest.json`, or None if absent."""
    path = os.path.join(records_dir, MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as handle:
        return json.loads(handle.read())


def count_examples(records_dir: str, split: str) -> int:
    """Number of examples of `split`: the manifest's `counts` entry when the
    manifest has one, else by reading every record of the split.

    Raises:
        FileNotFoundError: no manifest entry and no shard of the split.
    """
    manifest = read_manifest(records_dir)
    counts = (manifest or {}).get("counts", {})
    if split in counts:
        return int(counts[split])
    files = split_files(records_dir, split)
    log.info(
        "counting %s records in %d shards of %s", split, len(files), records_dir
    )
    records_read = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return int(
        records_read.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
    )


def check_records_config(records_dir: str, data_config: DataConfig) -> None:
    """Fails early when the records were written with another crop size,
    heatmap stride, sigma or edge width than `data_config` says (read from
    the manifest; nothing is checked without one).

    Raises:
        ValueError: names the field, both values and the manifest.
    """
    manifest = read_manifest(records_dir) or {}
    # The Beam job stores the `data` section as `config` (`data_config` in
    # manifests written before that rename).
    written = manifest.get("config") or manifest.get("data_config")
    if isinstance(written, dict) and isinstance(written.get("data"), dict):
        written = written["data"]  # a whole run config
    if not isinstance(written, dict):
        return
    for field in _RECORD_FIELDS:
        if field in written and written[field] != getattr(data_config, field):
            raise ValueError(
                f"data.{field} = {getattr(data_config, field)!r}, but the "
                f"records in {records_dir} were written with {field} = "
                f"{written[field]!r} ({os.path.join(records_dir, MANIFEST_NAME)}); "
                f"re-run the preprocessing or fix the config"
            )


def _read_records(
    files: list[str],
    epoch_key,
    shuffle: bool,
    shuffle_buffer: int,
    deterministic: bool,
) -> tf.data.Dataset:
    """One pass over the shards as `(epoch_key, serialized)` pairs."""
    shards = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        shards = shards.shuffle(len(files), seed=epoch_key)
    serialized = shards.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=min(len(files), DEFAULT_CYCLE_LENGTH),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    if shuffle:
        # Serialized records are small (JPEG + PNGs); shuffle before decoding.
        serialized = serialized.shuffle(shuffle_buffer, seed=epoch_key)
    epoch_key = tf.cast(epoch_key, tf.int64)
    return serialized.map(lambda record: (epoch_key, record))


def _prepare_fn(
    data_config: DataConfig,
    augment_config: AugmentConfig | None,
    seed: int,
    include_metadata: bool,
):
    size = data_config.image_size
    grid = data_config.heatmap_size

    def prepare(epoch_key, serialized):
        decoded = records.decode_example(
            serialized, size, data_config.heatmap_stride
        )
        if augment_config is not None:
            example_seed = augment.example_seed(
                seed, epoch_key, augment.example_key(decoded["image_id"])
            )
            params = augment.random_crop_parameters(
                example_seed, augment_config
            )
            crop = augment.augment_example(decoded, params, data_config)
        else:
            crop = augment.canonical_example(decoded, data_config)
        images = tf.ensure_shape(
            augment.normalize_image(crop["image"]), [size, size, 3]
        )
        targets = {
            "heatmaps": tf.ensure_shape(crop["heatmaps"], [grid, grid, 16]),
            "heatmaps_aux": tf.ensure_shape(
                crop["heatmaps_aux"], [grid, grid, 16]
            ),
            "parsing": tf.ensure_shape(
                tf.cast(crop["label"], tf.int32), [size, size]
            ),
            "edge": tf.ensure_shape(
                tf.cast(crop["edge"], tf.int32), [size, size]
            ),
        }
        if not include_metadata:
            return images, targets
        metadata = {key: decoded[key] for key in METADATA_KEYS}
        # The matrix that made this crop (augmented or canonical), so that
        # predictions map back to original pixels.
        metadata["crop_matrix"] = crop["matrix"]
        return images, targets, metadata

    return prepare


def make_dataset(
    records_dir: str,
    split: str,
    data_config: DataConfig,
    batch_size: int,
    training: bool,
    augment_config: AugmentConfig | None = None,
    seed: int | None = None,
    deterministic: bool = False,
    repeat: bool = False,
    drop_remainder: bool | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    include_metadata: bool = False,
) -> tf.data.Dataset:
    """Batches of one split, augmented for training.

    Args:
        records_dir: the Beam job's output directory (local or remote).
        split: `train`, `val`, `search_weights`, `search_arch` or `test`.
        data_config: crop size, heatmap stride and sigmas, edge width; must
            match the records (checked against the manifest).
        batch_size: examples per batch (the global batch under a
            distribution strategy, see `distribute`).
        training: shuffle and augment (reference 6.3) with regenerated
            targets; else the canonical crops with the stored targets, in
            file order.
        augment_config: augmentation ranges; `AugmentConfig()` (the paper's)
            when None. Ignored unless `training`.
        seed: seed of the shuffles and augmentations; None draws one
            (logged).
        deterministic: fixed element order (slower: tf.data may not
            reorder parallel work). With a seed, two pipelines then yield
            identical batches.
        repeat: repeat forever, each epoch reshuffled and re-augmented.
        drop_remainder: drop the last incomplete batch; defaults to
            `training` (the authors drop it in final training).
        shuffle_buffer: records in the shuffle buffer (training).
        include_metadata: add a third element, a dict keyed by
            `METADATA_KEYS`: `image_id`, original `height`, `width`, the
            `crop_matrix` (original -> crop) that made the crop, the stored
            canonical `crop_params` and `crop_scale`, and the original
            `keypoints` (model order) and `keypoints_present`.

    Returns:
        A dataset of `(images, targets)` (or `(images, targets, metadata)`):
        `images` `(batch, S, S, 3)` float32, ImageNet-normalised;
        `targets` `heatmaps`, `heatmaps_aux` `(batch, S/stride, S/stride,
        16)` float32, `parsing` `(batch, S, S)` int32 (0..19, 255 ignore),
        `edge` `(batch, S, S)` int32 (0/1, 255 ignore).

    Raises:
        FileNotFoundError: no shards of `split` in `records_dir`.
        ValueError: a bad batch size or shuffle buffer, `deterministic`
            training without a seed, or records written with another
            `data` config.
        TypeError: configs of the wrong type.
    """
    if not isinstance(data_config, DataConfig):
        raise TypeError(
            f"data_config must be a DataConfig, got {type(data_config).__name__}"
        )
    if augment_config is None:
        augment_config = AugmentConfig()
    if not isinstance(augment_config, AugmentConfig):
        raise TypeError(
            f"augment_config must be an AugmentConfig, got "
            f"{type(augment_config).__name__}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    if training and deterministic and seed is None:
        raise ValueError(
            "deterministic=True for a training split needs a seed, got None"
        )
    files = split_files(records_dir, split)
    check_records_config(records_dir, data_config)
    if drop_remainder is None:
        drop_remainder = training
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        if training:
            log.info(
                "%s input pipeline: no seed given, drew seed %d", split, seed
            )

    if training:
        epoch_keys = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        )
        if not repeat:
            epoch_keys = epoch_keys.take(1)
        serialized = epoch_keys.flat_map(
            lambda key: _read_records(
                files, key, True, shuffle_buffer, deterministic
            )
        )
    else:
        serialized = _read_records(
            files, 0, False, shuffle_buffer, deterministic
        )
        if repeat:
            serialized = serialized.repeat()

    prepare = _prepare_fn(
        data_config,
        augment_config if training else None,
        seed,
        include_metadata,
    )
    dataset = serialized.map(
        prepare,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    manifest_counts = (read_manifest(records_dir) or {}).get("counts", {})
    if not repeat and split in manifest_counts:
        # Known epoch length (Keras progress, steps): and a manifest that
        # disagrees with the shards fails loudly at the end of the epoch.
        examples = int(manifest_counts[split])
        batches = (
            examples // batch_size
            if drop_remainder
            else -(-examples // batch_size)
        )
        dataset = dataset.apply(
            tf.data.experimental.assert_cardinality(batches)
        )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    log.info(
        "%s input pipeline: %d shards under %s, batch %d, %s%s",
        split,
        len(files),
        records_dir,
        batch_size,
        "augmented" if training else "canonical crops",
        ", deterministic" if deterministic else "",
    )
    return dataset.with_options(options)


def paired_search_dataset(
    records_dir: str,
    data_config: DataConfig,
    batch_size: int,
    augment_config: AugmentConfig | None = None,
    seed: int | None = None,
    deterministic: bool = False,
    repeat: bool = False,
    drop_remainder: bool = False,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> tf.data.Dataset:
    """Bilevel-search batches: `((x_w, y_w), (x_a, y_a))` per step.

    `search_weights` and `search_arch` are read as two augmented training
    pipelines (reference 5.2: both use the full augmentation) and zipped;
    an epoch ends with the shorter one, like the authors'
    `zip(w_loader, a_loader)`. The search loaders keep the last partial
    batch, so `drop_remainder` defaults to False.

    Args:
        records_dir: the Beam job's output directory.
        data_config: see `make_dataset`.
        batch_size: examples per batch of each half.
        augment_config: see `make_dataset`.
        seed: the weights half uses `seed`, the architecture half
            `seed + 1`; None draws one.
        deterministic: see `make_dataset`.
        repeat: repeat forever.
        drop_remainder: drop each half's last incomplete batch.
        shuffle_buffer: see `make_dataset`.

    Returns:
        A dataset of `((images_w, targets_w), (images_a, targets_a))`.

    Raises:
        FileNotFoundError: a search split has no shards.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        log.info("search input pipeline: no seed given, drew seed %d", seed)
    halves = [
        make_dataset(
            records_dir,
            split,
            data_config,
            batch_size,
            training=True,
            augment_config=augment_config,
            seed=seed + offset,
            deterministic=deterministic,
            repeat=repeat,
            drop_remainder=drop_remainder,
            shuffle_buffer=shuffle_buffer,
        )
        for offset, split in enumerate(SEARCH_SPLITS)
    ]
    return tf.data.Dataset.zip(tuple(halves))


def distribute(
    dataset: tf.data.Dataset, strategy: tf.distribute.Strategy
) -> tf.distribute.DistributedDataset:
    """Splits each global batch of `dataset` across `strategy`'s replicas.

    With several workers every worker reads the whole stream and keeps its
    share of the batches (`AutoShardPolicy.DATA`): the training pipeline
    starts from a random epoch-key stream, not from a file list that could
    be sharded by file.

    Args:
        dataset: batched dataset (e.g. `make_dataset`'s), batch = global
            batch size.
        strategy: e.g. `tf.distribute.MirroredStrategy`.

    Returns:
        The distributed dataset; each replica gets `batch /
        num_replicas_in_sync` examples of every global batch.

    Raises:
        ValueError: a static global batch size that the number of replicas
            does not divide.
    """
    replicas = strategy.num_replicas_in_sync
    first = tf.nest.flatten(dataset.element_spec)[0]
    batch = first.shape[0] if first.shape.rank else None
    if batch is not None and batch % replicas:
        raise ValueError(
            f"global batch size {batch} is not a multiple of the "
            f"{replicas} replicas of {type(strategy).__name__}"
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return strategy.experimental_distribute_dataset(
        dataset.with_options(options)
    )
