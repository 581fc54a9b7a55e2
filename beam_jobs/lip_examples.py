"""One LIP example, from its files to a record (plain functions, no Beam).

`build_sample` decodes and checks an image, its label map and its joints,
finds the person centre and scale, takes the canonical crop (reference 6.3,
validation branch) and computes the targets on it (reference 6.4) with
`nppnet_tf.data.geometry` and `nppnet_tf.data.targets`. Every check that
fails raises `ExampleError(stage, reason, message)`, which the Beam job
routes to the dead-letter output.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from nppnet_tf.config import DataConfig
from nppnet_tf.data import geometry, targets
from nppnet_tf.lip import IGNORE_LABEL, LIP_TO_MODEL, NUM_CLASSES, NUM_JOINTS

JPEG_MAGIC = b"\xff\xd8\xff"
# MPII's person scale: box height in pixels / 200.
SCALE_UNIT = 200.0


class ExampleError(ValueError):
    """An input record cannot become an example.

    Args:
        stage: pipeline stage that found the problem, e.g. `"decode_image"`.
        reason: short stable code, e.g. `"not_jpeg"`.
        message: human-readable detail naming the bad value.
    """

    def __init__(self, stage: str, reason: str, message: str):
        super().__init__(f"{stage}/{reason}: {message}")
        self.stage = stage
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class LIPRow:
    """Everything known about one image before its files are read.

    Attributes:
        image_id: LIP image id.
        split: "train", "val" or "test".
        image_path: the JPEG file.
        label_path: the parsing PNG, None for test images.
        joints: `(16, 3)` x, y, flag in LIP order (NaN = absent), None for
            test images.
        center: the annotation's person centre (JSON `objpos`) or None.
        scale: the annotation's person scale (JSON `scale_provided`) or None.
        sources: where each piece came from (paths, `path:line`).
    """

    image_id: str
    split: str
    image_path: str
    label_path: str | None = None
    joints: np.ndarray | None = None
    center: tuple[float, float] | None = None
    scale: float | None = None
    sources: tuple[str, ...] = ()


def decode_image(data: bytes) -> np.ndarray:
    """JPEG bytes -> `(H, W, 3)` uint8 with TensorFlow's decoder (the one
    tf.data uses).

    Raises:
        ExampleError: `decode_image/not_jpeg` for other formats,
            `decode_image/unreadable_image` for corrupt or truncated data.
    """
    if not data.startswith(JPEG_MAGIC):
        raise ExampleError(
            "decode_image",
            "not_jpeg",
            f"file starts with {data[:4]!r}, not a JPEG",
        )
    try:
        image = tf.io.decode_jpeg(data, channels=3).numpy()
    except tf.errors.OpError as err:  # corrupt, truncated, too large
        raise ExampleError(
            "decode_image", "unreadable_image", err.message.splitlines()[0]
        ) from None
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ExampleError(
            "decode_image", "unreadable_image", f"empty image {image.shape}"
        )
    return image


def decode_label(data: bytes) -> np.ndarray:
    """Label PNG bytes -> `(H, W)` uint8 class ids.

    Palette images keep their indices (as LIP's own label files); 16-bit
    or 32-bit gray is accepted when its values fit in 8 bits.

    Raises:
        ExampleError: `decode_label/unreadable_label` for data PIL cannot
            read, `decode_label/label_mode` for colour label images.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
    ) as err:
        raise ExampleError(
            "decode_label", "unreadable_label", str(err)
        ) from None
    if image.mode not in ("L", "P", "I", "I;16"):
        raise ExampleError(
            "decode_label",
            "label_mode",
            f"label image has mode {image.mode}, expected single-channel (L or P)",
        )
    label = np.asarray(image)
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise ExampleError(
                "check_label",
                "label_out_of_range",
                f"label values {int(label.min())}..{int(label.max())} exceed 8 bits",
            )
        label = label.astype(np.uint8)
    return label


def check_label(label: np.ndarray, height: int, width: int) -> None:
    """Raises ExampleError unless `label` is `(height, width)` with values
    0..19 (`check_label/label_size_mismatch`, `check_label/label_out_of_range`)."""
    if label.shape != (height, width):
        raise ExampleError(
            "check_label",
            "label_size_mismatch",
            f"label is {label.shape[1]}x{label.shape[0]}, image is {width}x{height}",
        )
    bad = np.unique(label[label >= NUM_CLASSES])
    if bad.size:
        raise ExampleError(
            "check_label",
            "label_out_of_range",
            f"label values {bad[:8].tolist()} outside 0..{NUM_CLASSES - 1}",
        )


def model_order_keypoints(
    joints_lip: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(16, 3)` LIP-order joints -> model-order `(keypoints (16, 2),
    present (16,) bool, visibility (16,) int)`; absent joints are NaN."""
    joints = np.asarray(joints_lip, dtype=np.float64)[list(LIP_TO_MODEL)]
    present = np.isfinite(joints[:, 0]) & np.isfinite(joints[:, 1])
    visibility = np.where(present & np.isfinite(joints[:, 2]), joints[:, 2], 0)
    return (
        joints[:, :2].astype(np.float32),
        present,
        visibility.astype(np.int64),
    )


def check_keypoints(
    keypoints: np.ndarray,
    present: np.ndarray,
    height: int,
    width: int,
    margin: float,
) -> None:
    """Raises `check_keypoints/keypoint_outside_image` when a present joint
    lies further than `margin * max(height, width)` outside the image."""
    slack = margin * max(height, width)
    x, y = keypoints[:, 0], keypoints[:, 1]
    outside = present & (
        (x < -slack)
        | (x > width - 1 + slack)
        | (y < -slack)
        | (y > height - 1 + slack)
    )
    if outside.any():
        joint = int(np.flatnonzero(outside)[0])
        raise ExampleError(
            "check_keypoints",
            "keypoint_outside_image",
            f"joint {joint} (model order) at ({x[joint]:.1f}, {y[joint]:.1f}) is more "
            f"than {slack:.0f} px outside the {width}x{height} image",
        )


def person_box(
    label: np.ndarray | None,
    keypoints: np.ndarray,
    present: np.ndarray,
    height: int,
    width: int,
) -> tuple[float, float, float, float] | None:
    """Bounding box `(x0, y0, x1, y1)` (pixel indices, inclusive) of the
    label's non-background pixels and the present in-image joints, or None
    when there are neither."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    if label is not None:
        rows, cols = np.nonzero((label >= 1) & (label < NUM_CLASSES))
        xs.append(cols.astype(np.float64))
        ys.append(rows.astype(np.float64))
    inside = (
        present
        & (keypoints[:, 0] >= 0)
        & (keypoints[:, 0] <= width - 1)
        & (keypoints[:, 1] >= 0)
        & (keypoints[:, 1] <= height - 1)
    )
    xs.append(keypoints[inside, 0].astype(np.float64))
    ys.append(keypoints[inside, 1].astype(np.float64))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if x.size == 0:
        return None
    return float(x.min()), float(y.min()), float(x.max()), float(y.max())


def person_center_and_scale(
    label: np.ndarray | None,
    keypoints: np.ndarray,
    present: np.ndarray,
    height: int,
    width: int,
    center: tuple[float, float] | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, float]:
    """Person centre (x, y) and scale.

    Centre: the annotation's `center` if given, else the centre of
    `person_box`, else the image centre. Scale: the annotation's `scale` if
    given, else the box height (inclusive pixels) / 200, else H / 200.
    """
    box = person_box(label, keypoints, present, height, width)
    if box is None:
        box_center = ((width - 1) / 2.0, (height - 1) / 2.0)
        box_height = float(height)
    else:
        x0, y0, x1, y1 = box
        box_center = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
        box_height = y1 - y0 + 1.0
    if center is None:
        center = box_center
    if scale is None or scale <= 0:
        scale = box_height / SCALE_UNIT
    return np.asarray(center, dtype=np.float32), float(scale)


@functools.lru_cache(maxsize=8)
def _crop_and_targets_fn(
    image_size: int,
    stride: int,
    sigma: float,
    aux_sigma: float,
    edge_width: int,
):
    """One traced graph for the crop and its targets: a single TensorFlow
    call per example instead of a few hundred eager ops."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.uint8),
            tf.TensorSpec([NUM_JOINTS, 2], tf.float32),
            tf.TensorSpec([NUM_JOINTS], tf.bool),
            tf.TensorSpec([2], tf.float32),
        ]
    )
    def crop_and_targets(label, keypoints, present, center):
        shape = tf.shape(label)
        crop = geometry.canonical_crop(shape[0], shape[1], center, image_size)
        crop_keypoints = geometry.transform_points(keypoints, crop["matrix"])
        crop_label = geometry.warp_label(label, crop["matrix"], image_size)
        return {
            "crop_matrix": crop["matrix"],
            "crop_params": crop["params"],
            "crop_scale": crop["scale"],
            "crop_keypoints": crop_keypoints,
            "crop_label": crop_label,
            "crop_edge": targets.edge_map(crop_label, edge_width),
            "crop_heatmaps": targets.heatmaps(
                crop_keypoints, present, image_size, stride, sigma
            ),
            "crop_heatmaps_aux": targets.heatmaps(
                crop_keypoints, present, image_size, stride, aux_sigma
            ),
        }

    return crop_and_targets


def build_sample(
    row: LIPRow,
    image_jpeg: bytes,
    label_png: bytes | None,
    config: DataConfig,
) -> dict:
    """Checks one example's data and computes its crop and targets.

    Args:
        row: the joined index entry.
        image_jpeg: the image file's bytes.
        label_png: the label file's bytes (None for test images).
        config: crop size, stride, sigmas, edge width, keypoint margin.

    Returns:
        The sample dict `nppnet_tf.data.records.encode_example` takes.

    Raises:
        ExampleError: any check failed (the stage and reason say which).
    """
    image = decode_image(image_jpeg)
    height, width = image.shape[:2]
    if row.split == "test":
        label = np.full((height, width), IGNORE_LABEL, np.uint8)
        keypoints = np.full((NUM_JOINTS, 2), np.nan, np.float32)
        present = np.zeros(NUM_JOINTS, bool)
        visibility = np.zeros(NUM_JOINTS, np.int64)
        has_annotation = False
    else:
        if label_png is None or row.joints is None:
            raise ValueError(
                f"{row.image_id}: a {row.split} row needs a label and joints"
            )
        label = decode_label(label_png)
        check_label(label, height, width)
        keypoints, present, visibility = model_order_keypoints(row.joints)
        check_keypoints(
            keypoints, present, height, width, config.keypoint_margin
        )
        has_annotation = True
    center, scale = person_center_and_scale(
        label if has_annotation else None,
        keypoints,
        present,
        height,
        width,
        row.center,
        row.scale,
    )
    crop_and_targets = _crop_and_targets_fn(
        config.image_size,
        config.heatmap_stride,
        config.sigma,
        config.aux_sigma,
        config.edge_width,
    )
    safe_keypoints = np.where(present[:, None], keypoints, 0.0).astype(
        np.float32
    )
    crop = {
        key: value.numpy()
        for key, value in crop_and_targets(
            label, safe_keypoints, present, center
        ).items()
    }
    sample = {
        "image_id": row.image_id,
        "split": row.split,
        "image_jpeg": image_jpeg,
        "label": label,
        "has_annotation": has_annotation,
        "keypoints": keypoints,
        "keypoints_present": present,
        "keypoints_visibility": visibility,
        "person_center": center,
        "person_scale": scale,
        "heatmap_stride": config.heatmap_stride,
        "crop_scale": float(crop.pop("crop_scale")),
        **crop,
    }
    return sample
