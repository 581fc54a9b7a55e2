"""The serving graph: encoded images in, keypoints and parsing out.

`ServingModule` wraps a Keras NPPNet in a `tf.Module` with two
`tf.function`s that become the SavedModel's signatures (`export.py`):

* `serving_default(image_bytes)`: a batch of JPEG or PNG strings (any size,
  sizes may differ within a batch; GIF and BMP decode too). Each image is
  decoded (`tf.io.decode_image`, 3 channels, first frame), letterboxed
  whole into the `S x S` input exactly as the official evaluation protocol
  does (`official.official_crop`: centre = image centre, scale
  `S / max(H, W)`; `geometry.warp_image`, padding 128) and normalised
  (`augment.normalize_image`). The batch goes through the model once, with
  the flip test if enabled (`inference.predict_multi_scale` at scale 1:
  logits and heatmaps upsampled to `S x S`). Keypoints are the evaluation
  code's smoothed argmax mapped back to original pixels
  (`keypoints.decode_keypoints`); the parsing logits are inverse-warped
  bilinearly to the original resolution, then the argmax is taken
  (`official.parsing_to_original`), and PNG-encoded.
* `dense_maps(images)`: `(batch, S, S, 3)` normalised float images -> the
  model's stage-2 `pose` heatmaps and `parsing` logits at `S / 4`, as they
  are (no flip test).

Outputs of `serving_default`, per image (model joint order, see
`lip.MODEL_JOINT_NAMES`; `lip.MODEL_TO_LIP` gives the LIP order):

* `keypoints`: `(batch, 16, 3)` float32 `[x, y, score]`, x and y in original
  pixel coordinates (pixel centres at integers), score = the smoothed
  heatmap maximum;
* `parsing_png_bytes`: `(batch,)` string, a single-channel 8-bit PNG of the
  class ids (0..19) at the original resolution. The `_bytes` suffix makes
  TF Serving's REST API return it base64-encoded (`{"b64": ...}`); without
  it the binary PNG would be written into the JSON as a raw string;
* `image_size`: `(batch, 2)` int32 `[height, width]` of the decoded image.

Malformed requests fail with `InvalidArgumentError` and a readable
message: an empty batch, an empty string, bytes that are not an image.

Everything here is core TensorFlow (no custom ops), so the stock
`tensorflow/serving` model server runs the export.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from nppnet_tf.data.augment import normalize_image
from nppnet_tf.data.geometry import warp_image
from nppnet_tf.evaluation.inference import predict_multi_scale, scaled_size
from nppnet_tf.evaluation.keypoints import decode_keypoints
from nppnet_tf.evaluation.official import official_crop, parsing_to_original
from nppnet_tf.lip import NUM_CLASSES, NUM_JOINTS

DEFAULT_SIGNATURE = "serving_default"
DENSE_SIGNATURE = "dense_maps"
IMAGE_BYTES = "image_bytes"
DENSE_INPUT = "images"
KEYPOINTS = "keypoints"
PARSING_PNG = "parsing_png_bytes"
IMAGE_SIZE = "image_size"
DENSE_OUTPUTS = ("pose", "parsing")
SIGNATURE_INPUTS = {
    DEFAULT_SIGNATURE: IMAGE_BYTES,
    DENSE_SIGNATURE: DENSE_INPUT,
}
SIGNATURE_OUTPUTS = {
    DEFAULT_SIGNATURE: (KEYPOINTS, PARSING_PNG, IMAGE_SIZE),
    DENSE_SIGNATURE: DENSE_OUTPUTS,
}

# Original-resolution logits are resampled in bands of about this many
# pixels (20 float32 channels: 80 MB), so that a large photo does not need
# its whole `(H, W, 20)` logit map at once. LIP-size images (and anything
# up to about 1000 x 1000) are one band: the same op on the same matrix as
# the evaluation code.
PIXELS_PER_BAND = 1 << 20


def error_message(error: tf.errors.OpError) -> str:
    """The readable part of an error raised by the serving graph: the
    assertion or decoder message, without TensorFlow's node and stack
    lines."""
    lines = []
    for line in (error.message or "").splitlines():
        stripped = line.strip()
        if (
            not stripped
            or stripped == "Graph execution error:"
            or stripped.startswith("Detected at node")
            or stripped == "<stack traces unavailable>"
            or stripped.startswith("[[")
        ):
            continue
        lines.append(stripped)
    return " ".join(lines) or type(error).__name__


def _check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise TypeError(
            f"image_size must be an int, got {type(image_size).__name__} "
            f"{image_size!r}"
        )
    if image_size < 32 or scaled_size(image_size, 1.0) != image_size:
        raise ValueError(
            f"image_size must be a positive multiple of 32 (the network "
            f"downsamples 5 times), got {image_size}"
        )
    return image_size


def decode_and_letterbox(
    image_bytes, index, image_size: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Decodes one encoded image and letterboxes it into the network input.

    Args:
        image_bytes: scalar string, a JPEG, PNG, GIF or BMP file.
        index: scalar int32, its position in the request (for messages).
        image_size: side S of the network input.

    Returns:
        `(image, matrix, size)`: the `(S, S, 3)` float32 normalised crop,
        the `(3, 3)` float32 original -> crop matrix and the `(2,)` int32
        `[height, width]` of the decoded image.

    Raises:
        tf.errors.InvalidArgumentError: (when run) an empty string or bytes
            that are not an image.
    """
    is_empty = tf.equal(tf.strings.length(image_bytes), 0)
    checks = [
        tf.debugging.Assert(
            tf.logical_not(is_empty),
            ["image_bytes element", index, "is an empty string"],
        ),
        tf.debugging.Assert(
            tf.logical_or(is_empty, _looks_like_image(image_bytes)),
            [
                "image_bytes element",
                index,
                "is not a JPEG, PNG, GIF or BMP file; its first bytes are",
                tf.strings.substr(image_bytes, 0, 8),
            ],
        ),
    ]
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(
            image_bytes, channels=3, expand_animations=False
        )
    size = tf.shape(image)[:2]
    crop = official_crop(size[0], size[1], image_size)
    crop_image = warp_image(image, crop["matrix"], image_size)
    normalised = tf.ensure_shape(
        normalize_image(crop_image), [image_size, image_size, 3]
    )
    return normalised, crop["matrix"], size


# Magic numbers of the formats `tf.io.decode_image` reads.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def _looks_like_image(image_bytes) -> tf.Tensor:
    found = [
        tf.equal(tf.strings.substr(image_bytes, 0, len(magic)), magic)
        for magic in _SIGNATURES
    ]
    return tf.reduce_any(tf.stack(found))


def labels_at_original(crop_logits, matrix, size) -> tf.Tensor:
    """Class ids of one image at its original resolution.

    `official.parsing_to_original` (bilinear logits at each original pixel
    centre, then argmax) in bands of rows: band `k` starting at row `r`
    uses the matrix `M @ translation(0, r)`, so each pixel reads the same
    crop position as in one full-size warp.

    Args:
        crop_logits: `(S, S, 20)` logits in the crop frame.
        matrix: `(3, 3)` original -> crop matrix.
        size: `(2,)` int32 `[height, width]`.

    Returns:
        `(height, width)` uint8 class ids.
    """
    height, width = size[0], size[1]
    band_rows = tf.maximum(1, PIXELS_PER_BAND // tf.maximum(width, 1))
    band_rows = tf.minimum(band_rows, height)
    bands = (height + band_rows - 1) // band_rows
    matrix = tf.cast(matrix, tf.float32)

    def band(start):
        shift = tf.stack(
            [
                tf.constant([1.0, 0.0, 0.0]),
                tf.stack([0.0, 1.0, tf.cast(start, tf.float32)]),
                tf.constant([0.0, 0.0, 1.0]),
            ]
        )
        labels = parsing_to_original(
            crop_logits[tf.newaxis],
            tf.linalg.matmul(matrix, shift)[tf.newaxis],
            tf.stack([band_rows, width]),
        )
        return tf.cast(labels[0], tf.uint8)

    def one_band():
        return parsing_to_original(
            crop_logits[tf.newaxis], matrix[tf.newaxis], size
        )[0]

    def many_bands():
        starts = tf.range(bands) * band_rows
        stacked = tf.map_fn(
            band,
            starts,
            fn_output_signature=tf.TensorSpec([None, None], tf.uint8),
        )
        return tf.reshape(stacked, [bands * band_rows, width])[:height]

    return tf.cond(
        tf.equal(bands, 1),
        lambda: tf.cast(one_band(), tf.uint8),
        many_bands,
    )


def serve_image_bytes(
    model, image_size: int, flip: bool, image_bytes
) -> dict[str, tf.Tensor]:
    """The `serving_default` computation (see the module doc).

    Args:
        model: returns a dict with stage-2 `pose` and `parsing`.
        image_size: side S of the network input.
        flip: use the flip test.
        image_bytes: `(batch,)` string tensor of encoded images.

    Returns:
        A dict: `keypoints` `(batch, 16, 3)` float32, `parsing_png_bytes`
        `(batch,)` string, `image_size` `(batch, 2)` int32.

    Raises:
        tf.errors.InvalidArgumentError: (when run) an empty batch, an empty
            string or bytes that are not an image.
    """
    count = tf.size(image_bytes)
    check = tf.debugging.assert_positive(
        count,
        message=(
            f"{IMAGE_BYTES} is an empty batch: send at least one encoded image"
        ),
    )
    with tf.control_dependencies([check]):
        image_bytes = tf.identity(image_bytes)
    images, matrices, sizes = tf.map_fn(
        lambda element: decode_and_letterbox(
            element[0], element[1], image_size
        ),
        (image_bytes, tf.range(count)),
        fn_output_signature=(
            tf.TensorSpec([image_size, image_size, 3], tf.float32),
            tf.TensorSpec([3, 3], tf.float32),
            tf.TensorSpec([2], tf.int32),
        ),
    )
    parsing, heatmaps = predict_multi_scale(model, images, (1.0,), flip)
    decoded = decode_keypoints(heatmaps, matrices)
    keypoints = tf.concat(
        [decoded["keypoints"], decoded["confidence"][..., tf.newaxis]], axis=-1
    )

    def encode(element):
        logits, matrix, size = element
        labels = labels_at_original(logits, matrix, size)
        return tf.io.encode_png(labels[..., tf.newaxis])

    pngs = tf.map_fn(
        encode,
        (parsing, matrices, sizes),
        fn_output_signature=tf.TensorSpec([], tf.string),
    )
    return {
        KEYPOINTS: tf.ensure_shape(keypoints, [None, NUM_JOINTS, 3]),
        PARSING_PNG: pngs,
        IMAGE_SIZE: sizes,
    }


def serve_dense_images(model, image_size: int, images) -> dict[str, tf.Tensor]:
    """The `dense_maps` computation: the model's stage-2 maps, no flip.

    Args:
        model: returns a dict with stage-2 `pose` and `parsing`.
        image_size: side S of the network input.
        images: `(batch, S, S, 3)` normalised float32 images.

    Returns:
        A dict: `pose` `(batch, S/4, S/4, 16)` heatmaps (model joint order)
        and `parsing` `(batch, S/4, S/4, 20)` logits, float32.
    """
    outputs = model(images, training=False)
    quarter = image_size // 4
    return {
        "pose": tf.ensure_shape(
            tf.cast(outputs["pose"], tf.float32),
            [None, quarter, quarter, NUM_JOINTS],
        ),
        "parsing": tf.ensure_shape(
            tf.cast(outputs["parsing"], tf.float32),
            [None, quarter, quarter, NUM_CLASSES],
        ),
    }


class ServingModule(tf.Module):
    """What `export.py` saves: the model's variables and the two serving
    functions (see the module doc).

    Only the variables are tracked, as `keras.export.ExportArchive` does:
    tracking the Keras model itself would also serialise every layer (about
    10,000 objects for a small NPPNet, minutes to save and to load).

    Args:
        model: a Keras model whose call `(images, training=False)` returns
            a dict with stage-2 `pose` `(batch, S/4, S/4, 16)` heatmaps
            (model joint order) and `parsing` `(batch, S/4, S/4, 20)`
            logits.
        image_size: side S of the network input, a multiple of 32.
        flip: average with the mirrored image's prediction (flip test with
            a proper left/right swap, `inference.predict_with_flip`).

    Raises:
        TypeError: model is not a Keras model, image_size not an int.
        ValueError: image_size is not a positive multiple of 32.
    """

    def __init__(self, model: keras.Model, image_size: int, flip: bool = True):
        super().__init__(name="nppnet_serving")
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"model must be a keras.Model, got {type(model).__name__}"
            )
        _check_image_size(image_size)
        if not model.built:
            model(tf.zeros([1, image_size, image_size, 3]), training=False)
        self.image_size = image_size
        self.flip = bool(flip)
        self.model_variables = list(model.variables)
        self.serve_images = tf.function(
            functools.partial(serve_image_bytes, model, image_size, self.flip),
            input_signature=[tf.TensorSpec([None], tf.string, IMAGE_BYTES)],
            autograph=False,
        )
        self.serve_dense = tf.function(
            functools.partial(serve_dense_images, model, image_size),
            input_signature=[
                tf.TensorSpec(
                    [None, image_size, image_size, 3], tf.float32, DENSE_INPUT
                )
            ],
            autograph=False,
        )

    def signatures(
        self,
    ) -> dict[str, tf.types.experimental.PolymorphicFunction]:
        """The functions to save as signatures, by signature name.

        Pass these (not concrete functions) to `tf.saved_model.save`: it
        traces them once in its save context; functions traced before would
        be traced again there.
        """
        return {
            DEFAULT_SIGNATURE: self.serve_images,
            DENSE_SIGNATURE: self.serve_dense,
        }
