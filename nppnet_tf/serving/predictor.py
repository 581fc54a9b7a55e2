"""Predictions on image files, from an export or a Keras model.

A predictor maps the bytes of one encoded image to its keypoints and
original-resolution parsing, always through the serving graph of
`module.py`: `SavedModelPredictor` calls an export's `serving_default`,
`KerasPredictor` wraps a `.keras` model in the same graph. So `nppnet
predict` gives the same results whichever form of a model it is given.

`write_prediction_files` writes, per image, `<stem>_parsing.png` (class ids
at the original resolution, 8-bit grey), `<stem>_keypoints.json` (model
order and LIP order: name, x, y, score) and `<stem>_overlay.png` (the
coloured mask and skeleton over the photo, `overlay.render_overlay`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from nppnet_tf.evaluation.overlay import render_overlay
from nppnet_tf.export import model_input_size
from nppnet_tf.lip import (
    LIP_JOINT_NAMES,
    LIP_TO_MODEL,
    MODEL_JOINT_NAMES,
    MODEL_TO_LIP,
)
from nppnet_tf.serving.layout import MODEL_NAME, find_version_dir, read_metadata
from nppnet_tf.serving.module import (
    DEFAULT_SIGNATURE,
    IMAGE_BYTES,
    IMAGE_SIZE,
    KEYPOINTS,
    PARSING_PNG,
    ServingModule,
)

log = logging.getLogger(__name__)

PARSING_SUFFIX = "_parsing.png"
KEYPOINTS_SUFFIX = "_keypoints.json"
OVERLAY_SUFFIX = "_overlay.png"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's prediction.

    Attributes:
        keypoints: `(16, 3)` float32 `[x, y, score]`, original pixels,
            model joint order.
        labels: `(height, width)` uint8 class ids.
        image_size: `(height, width)`.
    """

    keypoints: np.ndarray
    labels: np.ndarray
    image_size: tuple[int, int]


def _prediction(outputs: dict[str, Any]) -> Prediction:
    labels = tf.io.decode_png(outputs[PARSING_PNG][0]).numpy()[..., 0]
    height, width = (int(v) for v in np.asarray(outputs[IMAGE_SIZE][0]))
    return Prediction(
        np.asarray(outputs[KEYPOINTS][0], np.float32), labels, (height, width)
    )


class SavedModelPredictor:
    """Predicts with an export's `serving_default` signature.

    Args:
        path: an export base, model base path or version directory.
        model_name: the model's subdirectory of an export base.

    Raises:
        FileNotFoundError: no SavedModel there.
    """

    def __init__(self, path: str | Path, model_name: str = MODEL_NAME):
        self.version_dir = find_version_dir(path, model_name)
        try:
            metadata = read_metadata(self.version_dir)
        except FileNotFoundError:
            metadata = {}
        self.image_size = metadata.get("image_size")
        self.flip = metadata.get("flip")
        log.info("loading SavedModel %s", self.version_dir)
        loaded = tf.saved_model.load(str(self.version_dir), tags=["serve"])
        if DEFAULT_SIGNATURE not in loaded.signatures:
            raise ValueError(
                f"{self.version_dir} has no {DEFAULT_SIGNATURE!r} signature "
                f"(it has {sorted(loaded.signatures)})"
            )
        self._loaded = loaded  # keeps the signature's variables alive
        self._serve = loaded.signatures[DEFAULT_SIGNATURE]
        self.source = str(self.version_dir)

    def __call__(self, image_bytes: bytes) -> Prediction:
        """Predicts one encoded image.

        Raises:
            tf.errors.InvalidArgumentError: the bytes are not an image.
        """
        outputs = self._serve(**{IMAGE_BYTES: tf.constant([image_bytes])})
        return _prediction(outputs)


class KerasPredictor:
    """Predicts with a Keras model inside the serving graph.

    Args:
        model: an NPPNet (or any model returning stage-2 `pose` and
            `parsing`).
        image_size: side S of the network input; None uses the square
            input shape the model was built with.
        flip: use the flip test.
        source: where the model came from (for the output files).

    Raises:
        ValueError: no image_size given and none stored in the model.
    """

    def __init__(
        self,
        model: keras.Model,
        image_size: int | None = None,
        flip: bool = True,
        source: str | None = None,
    ):
        if image_size is None:
            image_size = model_input_size(model)
            if image_size is None:
                raise ValueError(
                    "the model does not record a square input size (build "
                    f"config {model.get_build_config()}); give image_size"
                )
        self.image_size = image_size
        self.flip = bool(flip)
        self._module = ServingModule(model, image_size, flip)
        self.source = source

    def __call__(self, image_bytes: bytes) -> Prediction:
        """Predicts one encoded image.

        Raises:
            tf.errors.InvalidArgumentError: the bytes are not an image.
        """
        return _prediction(
            self._module.serve_images(tf.constant([image_bytes]))
        )


def keypoints_document(
    prediction: Prediction, image_path: str, source: str | None
) -> dict[str, Any]:
    """The `<stem>_keypoints.json` contents of one prediction."""
    keypoints = prediction.keypoints

    def joint(model_index: int) -> dict[str, Any]:
        x, y, score = (float(v) for v in keypoints[model_index])
        return {
            "name": MODEL_JOINT_NAMES[model_index],
            "model_index": model_index,
            "lip_index": LIP_TO_MODEL[model_index],
            "x": x,
            "y": y,
            "score": score,
        }

    return {
        "image": image_path,
        "image_size": list(prediction.image_size),
        "model": source,
        "coordinates": "original image pixels, pixel centres at integers",
        "keypoints": [joint(k) for k in range(len(MODEL_JOINT_NAMES))],
        "keypoints_lip": [
            joint(MODEL_TO_LIP[k]) for k in range(len(LIP_JOINT_NAMES))
        ],
    }


def output_paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    """The three files written for an image of this stem."""
    out_dir = Path(out_dir)
    return {
        "parsing": out_dir / f"{stem}{PARSING_SUFFIX}",
        "keypoints": out_dir / f"{stem}{KEYPOINTS_SUFFIX}",
        "overlay": out_dir / f"{stem}{OVERLAY_SUFFIX}",
    }


def write_prediction_files(
    prediction: Prediction,
    image_bytes: bytes,
    image_path: str,
    out_dir: str | Path,
    stem: str,
    source: str | None = None,
) -> dict[str, Path]:
    """Writes the parsing PNG, keypoints JSON and overlay of one image.

    Args:
        prediction: the image's prediction.
        image_bytes: the encoded image (decoded again for the overlay, the
            way the serving graph decodes it).
        image_path: recorded in the JSON.
        out_dir: the output directory (created if needed).
        stem: file name prefix.
        source: the model, recorded in the JSON.

    Returns:
        The written paths by kind (`parsing`, `keypoints`, `overlay`).
    """
    paths = output_paths(out_dir, stem)
    paths["parsing"].parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(prediction.labels, "L").save(paths["parsing"])
    document = keypoints_document(prediction, image_path, source)
    paths["keypoints"].write_text(json.dumps(document, indent=2) + "\n")
    photo = tf.io.decode_image(
        image_bytes, channels=3, expand_animations=False
    ).numpy()
    joints_lip = prediction.keypoints[list(MODEL_TO_LIP), :2]
    render_overlay(photo, prediction.labels, joints_lip).save(paths["overlay"])
    return paths
