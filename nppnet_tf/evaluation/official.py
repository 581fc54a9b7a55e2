"""The official protocol's geometry: whole images in, original pixels out.

The LIP protocol (reference 7.3) scores parsing at the original resolution
of every image. The network sees each image letterboxed whole into its
`S x S` input (`official_crop`: centre = the image centre, scale
`S / max(H, W)`, as the authors' `utils/eval_util.py` crops the resized
image around its centre); `parsing_to_original` brings the crop-frame
logits back to the original pixels through the same matrix, and
`official_dataset` batches the crops with the original-resolution truth.

Why logits and bilinear, then argmax (rather than argmax, then nearest):
each original pixel reads the logits at its exact sub-pixel position in the
crop, so boundaries land where the network put them whether the crop
enlarged the image (LIP's images are mostly smaller than 384) or shrank
it; nearest upsampling of class ids would give staircase boundaries of
`1 / s` original pixels. Interpolating before the argmax is also what the
crop protocol does when it upsamples the logits from S/4 to S.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from nppnet_tf.data import dataset as input_pipeline
from nppnet_tf.data import records
from nppnet_tf.data.augment import normalize_image
from nppnet_tf.data.geometry import canonical_crop, warp_image
from nppnet_tf.lip import IGNORE_LABEL


def official_crop(height, width, image_size: int) -> dict[str, tf.Tensor]:
    """The whole-image letterbox of the official protocol.

    `geometry.canonical_crop` around the image centre `(W / 2, H / 2)`:
    scale `s = S / max(H, W)`, so the long side fills the crop and every
    pixel is visible (as the authors' `eval_util.py` crops the resized
    image around its centre).

    Returns:
        `canonical_crop`'s dict: `matrix` (original -> crop), `scale`,
        `params`.
    """
    center = tf.stack([tf.cast(width, tf.float64), tf.cast(height, tf.float64)])
    return canonical_crop(height, width, center / 2.0, image_size)


def parsing_to_original(crop_logits, crop_matrices, output_shape) -> tf.Tensor:
    """Class ids at original resolution from crop-frame logits.

    Each original pixel centre `p` reads the logits at `M p` in the crop
    (bilinear interpolation of the logits, edge values beyond the border),
    then the argmax is taken.

    Args:
        crop_logits: `(batch, S, S, classes)` logits in the crop frame.
        crop_matrices: `(batch, 3, 3)` affine matrices, original -> crop.
        output_shape: `(height, width)` of the output (the padded original
            size of the batch).

    Returns:
        `(batch, height, width)` int32 class ids.
    """
    matrices = tf.cast(crop_matrices, tf.float32)
    transforms = tf.reshape(matrices, [-1, 9])[:, :8]
    original = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(crop_logits, tf.float32),
        transforms=transforms,
        output_shape=tf.cast(output_shape, tf.int32),
        fill_value=tf.constant(0.0, tf.float32),
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )
    return tf.argmax(original, axis=-1, output_type=tf.int32)


def official_dataset(
    records_dir: str,
    split: str,
    image_size: int,
    batch_size: int,
    max_examples: int | None = None,
    image_ids: Sequence[str] | None = None,
    include_photo: bool = False,
) -> tf.data.Dataset:
    """Batches of whole-image letterbox crops with original-resolution truth.

    Records are read in file order (sorted shards, no shuffling).

    Args:
        records_dir: the Beam job's output directory.
        split: the split to read.
        image_size: side S of the network input.
        batch_size: images per batch.
        max_examples: read only the first this many records.
        image_ids: keep only these images (e.g. an overlay panel).
        include_photo: add the original `photo` (uint8, padded with 0).

    Returns:
        A dataset of dicts: `images` `(batch, S, S, 3)` normalised,
        `labels` `(batch, H_max, W_max)` uint8 original label maps padded
        with 255, `height`, `width`, `crop_matrix` `(batch, 3, 3)`
        (`official_crop`), `keypoints` `(batch, 16, 2)` original pixels
        (model order), `keypoints_present`, `image_id`.

    Raises:
        FileNotFoundError: no shards of `split` under `records_dir`.
    """
    files = input_pipeline.split_files(records_dir, split)
    serialized = tf.data.TFRecordDataset(files, compression_type="GZIP")
    if max_examples is not None:
        serialized = serialized.take(max_examples)
    if image_ids is not None:
        wanted = tf.constant(sorted(set(image_ids)), tf.string)

        def keep(record):
            parsed = tf.io.parse_single_example(
                record, {"image_id": tf.io.FixedLenFeature([], tf.string)}
            )
            return tf.reduce_any(tf.equal(parsed["image_id"], wanted))

        serialized = serialized.filter(keep)

    def prepare(record):
        decoded = records.decode_example(record)
        crop = official_crop(decoded["height"], decoded["width"], image_size)
        image = warp_image(decoded["image"], crop["matrix"], image_size)
        element = {
            "images": tf.ensure_shape(
                normalize_image(image), [image_size, image_size, 3]
            ),
            "labels": decoded["label"],
            "height": decoded["height"],
            "width": decoded["width"],
            "crop_matrix": crop["matrix"],
            "keypoints": decoded["keypoints"],
            "keypoints_present": decoded["keypoints_present"],
            "image_id": decoded["image_id"],
        }
        if include_photo:
            element["photo"] = decoded["image"]
        return element

    elements = serialized.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    padding = {
        key: tf.constant(value, dtype)
        for key, (value, dtype) in {
            "images": (0.0, tf.float32),
            "labels": (IGNORE_LABEL, tf.uint8),
            "height": (0, tf.int32),
            "width": (0, tf.int32),
            "crop_matrix": (0.0, tf.float32),
            "keypoints": (0.0, tf.float32),
            "keypoints_present": (False, tf.bool),
            "image_id": ("", tf.string),
            "photo": (0, tf.uint8),
        }.items()
        if key in elements.element_spec
    }
    return elements.padded_batch(batch_size, padding_values=padding).prefetch(
        tf.data.AUTOTUNE
    )
