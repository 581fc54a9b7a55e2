"""The Keras-side reference for the serving graph: the official protocol.

`predict_official` runs a Keras model on encoded images the way the
evaluation code's official protocol does (`official.official_dataset` and
the evaluation step in `loop.py`): decode, whole-image letterbox into the
`S x S` input, normalise, pad the batch to its largest image, predict with
the flip test, map the parsing logits back to the (padded) original
resolution and crop, decode the keypoints. It is written from the
evaluation modules directly, not from `module.py`, so that comparing the
two (`serve-check`, the tests) checks that the exported graph reproduces
the evaluation code.

Runs eagerly; meant for a few images (checks, tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from nppnet_tf.data.augment import normalize_image
from nppnet_tf.data.geometry import warp_image
from nppnet_tf.evaluation.inference import predict_multi_scale
from nppnet_tf.evaluation.keypoints import decode_keypoints
from nppnet_tf.evaluation.official import official_crop, parsing_to_original


def predict_official(
    model, encoded_images: Sequence[bytes], image_size: int, flip: bool = True
) -> list[dict[str, np.ndarray]]:
    """Per-image keypoints and parsing of the official evaluation protocol.

    Args:
        model: returns a dict with stage-2 `pose` and `parsing`.
        encoded_images: JPEG/PNG files as bytes.
        image_size: side S of the network input.
        flip: use the flip test.

    Returns:
        One dict per image: `keypoints` `(16, 3)` float32 `[x, y, score]`
        in original pixels (model order), `labels` `(H, W)` uint8 class ids
        and `image_size` `(2,)` int32 `[H, W]`.

    Raises:
        ValueError: no images.
        tf.errors.InvalidArgumentError: an image does not decode.
    """
    if not encoded_images:
        raise ValueError("predict_official needs at least one image")
    crops, matrices, sizes = [], [], []
    for data in encoded_images:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        height, width = int(image.shape[0]), int(image.shape[1])
        crop = official_crop(height, width, image_size)
        crops.append(
            normalize_image(warp_image(image, crop["matrix"], image_size))
        )
        matrices.append(crop["matrix"])
        sizes.append((height, width))
    images = tf.stack(crops)
    crop_matrices = tf.stack(matrices)
    parsing, heatmaps = predict_multi_scale(model, images, (1.0,), flip)
    padded = (max(h for h, _ in sizes), max(w for _, w in sizes))
    labels = parsing_to_original(parsing, crop_matrices, padded).numpy()
    decoded = decode_keypoints(heatmaps, crop_matrices)
    keypoints = np.concatenate(
        [
            decoded["keypoints"].numpy(),
            decoded["confidence"].numpy()[..., np.newaxis],
        ],
        axis=-1,
    )
    return [
        {
            "keypoints": keypoints[index].astype(np.float32),
            "labels": labels[index, :height, :width].astype(np.uint8),
            "image_size": np.array([height, width], np.int32),
        }
        for index, (height, width) in enumerate(sizes)
    ]
