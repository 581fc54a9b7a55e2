"""Test-time inference: flip test, multi-scale averaging (reference 7.1, 7.3).

Everything here is a TensorFlow op on batches and runs inside `tf.function`
and `strategy.run`. A model is any callable `model(images, training=False)`
returning a dict with at least

* `parsing`: `(batch, h, w, 20)` stage-2 parsing logits,
* `pose`: `(batch, h, w, 16)` stage-2 heatmaps in model joint order,

usually at a quarter of the input size (other keys are ignored).

**Flip test.** The horizontally mirrored batch goes through the model
together with the batch itself (one call on `2 * batch` images; BatchNorm in
inference mode is per image, so this equals two calls). The mirrored
prediction is brought back to the image's frame: its channels are permuted
with `lip.PARSING_FLIP_PERM` (classes 14/15, 16/17, 18/19 swapped) or
`lip.MODEL_FLIP_PERM` (left/right joints swapped), then mirrored back; the
two predictions are averaged 0.5/0.5. The permutation is a gather, a proper
swap: the authors' validation assigns the pairs in place through an alias,
so both channels of a pair end up holding the mirrored image's right-side
channel (reference 7.1 step 2, 10.3 item 1). We do not reproduce that.
Mirroring at the output resolution equals mirroring after upsampling,
because half-pixel resizing commutes with a mirror.

**Multi-scale.** For each scale `r`, the `S x S` input crop is resized to
`S_r x S_r` with `S_r = scaled_size(S, r)` (`S * r` rounded half up to a
multiple of 32, at least 32) with half-pixel bilinear resizing
(antialiased when shrinking), predicted (with the flip test), and both
outputs are resized back to the `S x S` crop frame with half-pixel
bilinear resizing. Resizing a square to a square with half-pixel centres
maps frames exactly, so every scale's prediction lands on the same pixels;
the scales' logits and heatmaps are then averaged with equal weights.
`predict_multi_scale` returns these `S x S` maps for a single scale too:
the authors' validation also upsamples the logits to the crop size
(bilinear, `align_corners=False`) and the heatmaps (OpenCV bilinear, the
same half-pixel convention) before decoding.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import tensorflow as tf

from nppnet_tf.lip import (
    MODEL_FLIP_PERM,
    NUM_CLASSES,
    NUM_JOINTS,
    PARSING_FLIP_PERM,
)

# Network inputs must be multiples of this (five stride-2 reductions).
SIZE_MULTIPLE = 32


def scaled_size(image_size: int, scale: float) -> int:
    """Input side for a test scale: `image_size * scale` rounded half up to
    a multiple of 32, at least 32.

    Args:
        image_size: side S of the scale-1 crop.
        scale: the test scale, > 0.

    Returns:
        The side `S_r` the crop is resized to for this scale.

    Raises:
        ValueError: a non-positive or non-finite scale or image size.
    """
    if not isinstance(scale, numbers.Real) or not (
        math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"test scales must be finite and > 0, got {scale!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    multiples = math.floor(image_size * scale / SIZE_MULTIPLE + 0.5)
    return max(1, multiples) * SIZE_MULTIPLE


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """The scales as a tuple of floats.

    Raises:
        ValueError: no scale, or a scale that is not a finite number > 0.
    """
    scales = tuple(scales)
    if not scales:
        raise ValueError("give at least one test scale, got none")
    for scale in scales:
        scaled_size(SIZE_MULTIPLE, scale)  # validates
    return tuple(float(scale) for scale in scales)


def _outputs(model, images) -> tuple[tf.Tensor, tf.Tensor]:
    outputs = model(images, training=False)
    if not hasattr(outputs, "keys") or not {"parsing", "pose"} <= set(
        outputs.keys()
    ):
        found = sorted(outputs.keys()) if hasattr(outputs, "keys") else outputs
        raise ValueError(
            f"the model must return a dict with 'parsing' and 'pose' "
            f"(stage-2 outputs), got {found!r}"
        )
    parsing = tf.cast(outputs["parsing"], tf.float32)
    heatmaps = tf.cast(outputs["pose"], tf.float32)
    if parsing.shape[-1] not in (None, NUM_CLASSES):
        raise ValueError(
            f"model output 'parsing' must have {NUM_CLASSES} channels, got "
            f"shape {parsing.shape}"
        )
    if heatmaps.shape[-1] not in (None, NUM_JOINTS):
        raise ValueError(
            f"model output 'pose' must have {NUM_JOINTS} channels, got "
            f"shape {heatmaps.shape}"
        )
    return parsing, heatmaps


def mirror(maps) -> tf.Tensor:
    """Mirrors `(batch, height, width, channels)` maps left <-> right."""
    return tf.reverse(maps, axis=[2])


def unflip_parsing(flipped_logits) -> tf.Tensor:
    """Brings parsing logits predicted on a mirrored image back to the
    image's frame: left/right class channels swapped (a proper swap), then
    mirrored.

    Args:
        flipped_logits: `(batch, height, width, 20)` logits of the mirrored
            image.

    Returns:
        `(batch, height, width, 20)` logits in the unmirrored frame.
    """
    swapped = tf.gather(flipped_logits, list(PARSING_FLIP_PERM), axis=-1)
    return mirror(swapped)


def unflip_heatmaps(flipped_heatmaps) -> tf.Tensor:
    """Heatmaps of a mirrored image back in the image's frame: left/right
    joint channels swapped (`lip.MODEL_FLIP_PERM`), then mirrored.

    Args:
        flipped_heatmaps: `(batch, height, width, 16)`, model joint order.

    Returns:
        `(batch, height, width, 16)` heatmaps in the unmirrored frame.
    """
    swapped = tf.gather(flipped_heatmaps, list(MODEL_FLIP_PERM), axis=-1)
    return mirror(swapped)


def predict_with_flip(
    model, images, flip: bool = True
) -> tuple[tf.Tensor, tf.Tensor]:
    """Stage-2 parsing logits and heatmaps, averaged with the flip test.

    Args:
        model: returns a dict with `parsing` and `pose` (see module doc).
        images: `(batch, height, width, channels)` normalised images.
        flip: average with the mirrored batch's prediction (see module
            doc); False returns the model's outputs as they are.

    Returns:
        `(parsing_logits, heatmaps)`, float32, at the model's output
        resolution: `(batch, h, w, 20)` and `(batch, h, w, 16)`.

    Raises:
        ValueError: the model's outputs lack `parsing` or `pose` or have
            the wrong number of channels.
    """
    images = tf.convert_to_tensor(images)
    if not flip:
        return _outputs(model, images)
    batch = tf.shape(images)[0]
    parsing, heatmaps = _outputs(
        model, tf.concat([images, mirror(images)], axis=0)
    )
    parsing = 0.5 * (parsing[:batch] + unflip_parsing(parsing[batch:]))
    heatmaps = 0.5 * (heatmaps[:batch] + unflip_heatmaps(heatmaps[batch:]))
    return parsing, heatmaps


def resize_bilinear(maps, size) -> tf.Tensor:
    """Half-pixel bilinear resize of `(batch, h, w, c)` maps to `size`
    (PyTorch `align_corners=False`, OpenCV `INTER_LINEAR`); antialiased
    when shrinking; a no-op when the size already matches."""
    maps = tf.convert_to_tensor(maps)
    height, width = size
    if maps.shape[1] == height and maps.shape[2] == width:
        return maps
    shrinking = (maps.shape[1] is not None and maps.shape[1] > height) or (
        maps.shape[2] is not None and maps.shape[2] > width
    )
    return tf.image.resize(
        maps, (height, width), method="bilinear", antialias=shrinking
    )


def predict_multi_scale(
    model,
    images,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Parsing logits and heatmaps in the `S x S` crop frame, averaged over
    test scales (and the flip test).

    Args:
        model: returns a dict with `parsing` and `pose` (see module doc).
        images: `(batch, S, S, channels)` normalised crops (static S).
        scales: test scales; 1.0 is the crop itself (see module doc).
        flip: use the flip test at every scale.

    Returns:
        `(parsing_logits, heatmaps)`, float32, `(batch, S, S, 20)` and
        `(batch, S, S, 16)`: each scale's outputs resized (half-pixel
        bilinear) to `S x S`, then averaged over the scales.

    Raises:
        ValueError: images without a static square size, bad scales, or
            bad model outputs.
    """
    images = tf.convert_to_tensor(images)
    size = images.shape[1]
    if size is None or images.shape[2] != size:
        raise ValueError(
            f"images must be square crops with a static size, got shape "
            f"{images.shape}"
        )
    scales = check_scales(scales)
    parsing_sum = None
    heatmap_sum = None
    for scale in scales:
        side = scaled_size(size, scale)
        scaled = resize_bilinear(images, (side, side))
        parsing, heatmaps = predict_with_flip(model, scaled, flip)
        parsing = resize_bilinear(parsing, (size, size))
        heatmaps = resize_bilinear(heatmaps, (size, size))
        if parsing_sum is None:
            parsing_sum, heatmap_sum = parsing, heatmaps
        else:
            parsing_sum += parsing
            heatmap_sum += heatmaps
    weight = 1.0 / len(scales)
    return parsing_sum * weight, heatmap_sum * weight
