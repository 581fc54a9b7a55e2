"""Deterministic sample photos for warmup requests, checks and benchmarks.

A figure (head, torso, arms, legs as filled ellipses and bars) over a
colour gradient with some noise: structured enough to exercise every op of
the serving graph, and encoded as JPEG or PNG at any size. The same
arguments always give the same bytes (TensorFlow's encoders, fixed seed).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# (height, width, format) of the default samples: odd sizes, one portrait
# JPEG and one landscape PNG, so a batch holds two different shapes.
DEFAULT_SAMPLES = ((237, 181, "jpeg"), (173, 251, "png"))
FORMATS = ("jpeg", "png")


def sample_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A `(height, width, 3)` uint8 RGB picture of a standing figure.

    Raises:
        ValueError: a side smaller than 8 pixels.
    """
    if height < 8 or width < 8:
        raise ValueError(
            f"sample photos need sides >= 8 px, got {height} x {width}"
        )
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = rows / height, columns / width
    photo = np.stack(
        [90 + 120 * x, 110 + 90 * y, 160 - 60 * x * y], axis=-1
    ) + rng.normal(0.0, 6.0, (height, width, 3))

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    parts = (
        (ellipse(0.5, 0.14, 0.08, 0.08), (230, 190, 160)),  # head
        (ellipse(0.5, 0.40, 0.16, 0.20), (200, 40, 40)),  # torso
        (ellipse(0.30, 0.42, 0.05, 0.17), (220, 170, 140)),  # arms
        (ellipse(0.70, 0.42, 0.05, 0.17), (220, 170, 140)),
        (ellipse(0.42, 0.75, 0.06, 0.20), (40, 40, 120)),  # legs
        (ellipse(0.58, 0.75, 0.06, 0.20), (40, 40, 120)),
    )
    for mask, colour in parts:
        photo[mask] = colour
    return np.clip(np.round(photo), 0, 255).astype(np.uint8)


def encode_photo(photo: np.ndarray, image_format: str) -> bytes:
    """JPEG (quality 90) or PNG bytes of a uint8 RGB photo.

    Raises:
        ValueError: an unknown format.
    """
    if image_format == "jpeg":
        return tf.io.encode_jpeg(photo, quality=90).numpy()
    if image_format == "png":
        return tf.io.encode_png(photo).numpy()
    raise ValueError(
        f"image_format must be one of {FORMATS}, got {image_format!r}"
    )


def sample_images(
    sizes: tuple[tuple[int, int, str], ...] = DEFAULT_SAMPLES, seed: int = 0
) -> list[bytes]:
    """Encoded sample photos, one per `(height, width, format)`."""
    return [
        encode_photo(sample_photo(height, width, seed + index), image_format)
        for index, (height, width, image_format) in enumerate(sizes)
    ]
