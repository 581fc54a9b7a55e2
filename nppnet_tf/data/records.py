"""The LIP record format, defined once: `FEATURES`, `encode_example`,
`decode_example` (docs/data.md renders the same table).

One `tf.train.Example` per image holds the original data (JPEG bytes as
released, label map, keypoints in original pixels, model joint order) and
the targets of the canonical crop (reference 6.3 validation branch, 6.4).
The crop image itself is not stored: tf.data recomputes it from the
original with `crop_matrix` (`geometry.warp_image`), the same way it warps
an augmented crop.

Heatmaps are stored as 8-bit PNG mosaics: the 16 channels of
`(h, w, 16)` become a 4 x 4 grid of `h x w` tiles (channel k at tile row
k // 4, column k % 4), each value quantised as `round(255 v)`. Decoding
divides by 255, so the error is at most 0.5 / 255 (about 0.002).

`encode_example` takes plain numpy (the Beam job); `decode_example` parses
and decodes inside the TensorFlow graph (tf.data).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from nppnet_tf.lip import NUM_CLASSES, NUM_JOINTS

# Bump on any change of FEATURES or of their meaning; stored in manifests.
FORMAT_VERSION = 1

HEATMAP_QUANTISATION_ERROR = 0.5 / 255.0
_MOSAIC_SIDE = 4  # 4 x 4 tiles = 16 joints


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of the record.

    Attributes:
        dtype: the tf.train.Example list type: "bytes", "int64" or "float".
        length: number of values in the list (always fixed).
        decoded: key in `decode_example`'s output.
        shape: shape of the decoded tensor (symbolic names for sizes).
        encoding: how the values are stored.
        doc: what the feature means.
    """

    dtype: str
    length: int
    decoded: str
    shape: str
    encoding: str
    doc: str


_J2 = 2 * NUM_JOINTS

FEATURES: dict[str, Feature] = {
    "image_id": Feature("bytes", 1, "image_id", "()", "UTF-8", "LIP image id (file name without extension)"),
    "split": Feature("bytes", 1, "split", "()", "UTF-8", "release split: train, val or test (search halves keep 'train')"),
    "image/encoded": Feature("bytes", 1, "image", "(H, W, 3) uint8", "JPEG, the released bytes unchanged", "original RGB image"),
    "image/height": Feature("int64", 1, "height", "() int32", "plain", "original height H"),
    "image/width": Feature("int64", 1, "width", "() int32", "plain", "original width W"),
    "label/encoded": Feature("bytes", 1, "label", "(H, W) uint8", "PNG, 8-bit gray", "original parsing label map, 0..19 (all 255 for test images)"),
    "has_annotation": Feature("int64", 1, "has_annotation", "() bool", "0/1", "1 for train/val, 0 for test (image only)"),
    "keypoints": Feature("float", _J2, "keypoints", "(16, 2) float32", "x0, y0, x1, ...", "joints in original pixels, model order; 0 when absent"),
    "keypoints/present": Feature("int64", NUM_JOINTS, "keypoints_present", "(16,) bool", "0/1", "joint annotated (CSV: x, y not NaN; JSON: x + y != 0)"),
    "keypoints/visibility": Feature("int64", NUM_JOINTS, "keypoints_visibility", "(16,) int32", "0/1", "LIP's visibility flag (0 when absent)"),
    "person/center": Feature("float", 2, "person_center", "(2,) float32", "x, y", "person centre in original pixels (objpos, else box centre)"),
    "person/scale": Feature("float", 1, "person_scale", "() float32", "plain", "person box height / 200 (MPII convention)"),
    "crop/size": Feature("int64", 1, "crop_size", "() int32", "plain", "crop side S (data.image_size)"),
    "crop/heatmap_stride": Feature("int64", 1, "heatmap_stride", "() int32", "plain", "input pixels per heatmap cell"),
    "crop/matrix": Feature("float", 6, "crop_matrix", "(3, 3) float32", "row-major top two rows", "affine original -> crop, x_c = s x + t"),
    "crop/params": Feature("int64", 8, "crop_params", "(8,) int32", "plain", "authors' crop_param (src_x0, src_y0, dst_x0, dst_y0, src_x1, src_y1, dst_x1, dst_y1)"),
    "crop/scale": Feature("float", 1, "crop_scale", "() float32", "plain", "s = S / max(H, W)"),
    "crop/keypoints": Feature("float", _J2, "crop_keypoints", "(16, 2) float32", "x0, y0, x1, ...", "joints in crop pixels (0 when absent)"),
    "crop/label/encoded": Feature("bytes", 1, "crop_label", "(S, S) uint8", "PNG, 8-bit gray", "parsing target, 255 = ignore"),
    "crop/edge/encoded": Feature("bytes", 1, "crop_edge", "(S, S) uint8", "PNG, 8-bit gray", "edge target 0/1, 255 = ignore"),
    "crop/heatmaps/encoded": Feature("bytes", 1, "crop_heatmaps", "(S/4, S/4, 16) float32", "PNG mosaic 4x4, round(255 v)", "main heatmaps (sigma data.sigma)"),
    "crop/heatmaps_aux/encoded": Feature("bytes", 1, "crop_heatmaps_aux", "(S/4, S/4, 16) float32", "PNG mosaic 4x4, round(255 v)", "auxiliary heatmaps (sigma data.aux_sigma)"),
    "stats/num_present_keypoints": Feature("int64", 1, "num_present_keypoints", "() int32", "plain", "number of annotated joints (for TFDV)"),
    "stats/num_keypoints_in_crop": Feature("int64", 1, "num_keypoints_in_crop", "() int32", "plain", "annotated joints inside the crop (for TFDV)"),
    "stats/foreground_fraction": Feature("float", 1, "foreground_fraction", "() float32", "plain", "fraction of label pixels in classes 1..19 (for TFDV)"),
    "stats/num_classes_present": Feature("int64", 1, "num_classes_present", "() int32", "plain", "distinct classes 1..19 in the label (for TFDV)"),
    "stats/aspect_ratio": Feature("float", 1, "aspect_ratio", "() float32", "plain", "W / H of the original image (for TFDV)"),
}  # fmt: skip


# ---------------------------------------------------------------------------
# Encoding (numpy in, bytes out)


def encode_png(array: np.ndarray) -> bytes:
    """8-bit grayscale PNG bytes of a `(height, width)` uint8 array."""
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(
            f"PNG input must be a 2-D uint8 array, got {array.dtype} {array.shape}"
        )
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def quantise_heatmaps(heatmaps: np.ndarray) -> np.ndarray:
    """`(h, w, 16)` floats in [0, 1] -> `(4 h, 4 w)` uint8 mosaic."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    if heatmaps.ndim != 3 or heatmaps.shape[2] != NUM_JOINTS:
        raise ValueError(
            f"heatmaps must be (h, w, {NUM_JOINTS}), got {heatmaps.shape}"
        )
    height, width, _ = heatmaps.shape
    levels = np.round(np.clip(heatmaps, 0.0, 1.0) * 255.0).astype(np.uint8)
    tiles = levels.reshape(height, width, _MOSAIC_SIDE, _MOSAIC_SIDE)
    return tiles.transpose(2, 0, 3, 1).reshape(
        _MOSAIC_SIDE * height, _MOSAIC_SIDE * width
    )


def _bytes(values) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _int64(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _float(values) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _array(sample: Mapping[str, Any], key: str, shape, dtype) -> np.ndarray:
    if key not in sample:
        raise ValueError(f"sample is missing {key!r}")
    value = np.asarray(sample[key], dtype=dtype)
    if value.shape != tuple(shape):
        raise ValueError(
            f"sample[{key!r}] has shape {value.shape}, expected {tuple(shape)}"
        )
    return value


def encode_example(sample: Mapping[str, Any]) -> bytes:
    """Serialises one example (plain numpy and Python values in).

    Args:
        sample: a mapping with `image_id`, `split` (str); `image_jpeg`
            (the JPEG bytes); `label` (`(H, W)` uint8); `has_annotation`
            (bool); `keypoints` (`(16, 2)`, model order, original pixels;
            absent joints may be NaN); `keypoints_present`,
            `keypoints_visibility` (`(16,)`); `person_center` (`(2,)`);
            `person_scale`, `crop_scale` (float); `crop_matrix` (`(3, 3)`
            or `(2, 3)`); `crop_params` (`(8,)` int); `crop_keypoints`
            (`(16, 2)`); `crop_label`, `crop_edge` (`(S, S)` uint8);
            `crop_heatmaps`, `crop_heatmaps_aux` (`(S/stride, S/stride, 16)`
            floats in [0, 1]); `heatmap_stride` (int).

    Returns:
        The serialised `tf.train.Example`.

    Raises:
        ValueError: a missing key or a value of the wrong shape or type.
    """
    label = np.asarray(sample["label"])
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(
            f"sample['label'] must be (H, W) uint8, got {label.dtype} {label.shape}"
        )
    height, width = label.shape
    crop_label = np.asarray(sample["crop_label"])
    if crop_label.ndim != 2 or crop_label.shape[0] != crop_label.shape[1]:
        raise ValueError(
            f"sample['crop_label'] must be (S, S), got {crop_label.shape}"
        )
    size = crop_label.shape[0]
    stride = int(sample["heatmap_stride"])
    grid = size // stride
    present = _array(sample, "keypoints_present", (NUM_JOINTS,), bool)
    keypoints = _array(sample, "keypoints", (NUM_JOINTS, 2), np.float32)
    crop_keypoints = _array(
        sample, "crop_keypoints", (NUM_JOINTS, 2), np.float32
    )
    keypoints = np.where(present[:, None], keypoints, 0.0).astype(np.float32)
    crop_keypoints = np.where(present[:, None], crop_keypoints, 0.0).astype(
        np.float32
    )
    visibility = _array(
        sample, "keypoints_visibility", (NUM_JOINTS,), np.float64
    )
    visibility = np.where(
        present & np.isfinite(visibility), visibility, 0
    ).astype(np.int64)
    matrix = np.asarray(sample["crop_matrix"], dtype=np.float32)
    if matrix.shape not in ((3, 3), (2, 3)):
        raise ValueError(
            f"sample['crop_matrix'] must be (3, 3) or (2, 3), got {matrix.shape}"
        )
    image_jpeg = sample["image_jpeg"]
    if not isinstance(image_jpeg, bytes):
        raise ValueError(
            f"sample['image_jpeg'] must be bytes, got {type(image_jpeg).__name__}"
        )
    heatmaps = _array(
        sample, "crop_heatmaps", (grid, grid, NUM_JOINTS), np.float32
    )
    heatmaps_aux = _array(
        sample, "crop_heatmaps_aux", (grid, grid, NUM_JOINTS), np.float32
    )
    crop_edge = _array(sample, "crop_edge", (size, size), np.uint8)

    foreground = (label >= 1) & (label < NUM_CLASSES)
    classes = np.unique(label[foreground]) if foreground.any() else np.array([])
    inside = (
        present
        & (crop_keypoints[:, 0] >= -0.5)
        & (crop_keypoints[:, 0] < size - 0.5)
        & (crop_keypoints[:, 1] >= -0.5)
        & (crop_keypoints[:, 1] < size - 0.5)
    )
    features = {
        "image_id": _bytes([str(sample["image_id"]).encode()]),
        "split": _bytes([str(sample["split"]).encode()]),
        "image/encoded": _bytes([image_jpeg]),
        "image/height": _int64([height]),
        "image/width": _int64([width]),
        "label/encoded": _bytes([encode_png(label)]),
        "has_annotation": _int64([int(bool(sample["has_annotation"]))]),
        "keypoints": _float(keypoints.reshape(-1)),
        "keypoints/present": _int64(present.astype(np.int64)),
        "keypoints/visibility": _int64(visibility),
        "person/center": _float(
            _array(sample, "person_center", (2,), np.float32)
        ),
        "person/scale": _float([float(sample["person_scale"])]),
        "crop/size": _int64([size]),
        "crop/heatmap_stride": _int64([stride]),
        "crop/matrix": _float(matrix[:2].reshape(-1)),
        "crop/params": _int64(_array(sample, "crop_params", (8,), np.int64)),
        "crop/scale": _float([float(sample["crop_scale"])]),
        "crop/keypoints": _float(crop_keypoints.reshape(-1)),
        "crop/label/encoded": _bytes([encode_png(crop_label.astype(np.uint8))]),
        "crop/edge/encoded": _bytes([encode_png(crop_edge)]),
        "crop/heatmaps/encoded": _bytes(
            [encode_png(quantise_heatmaps(heatmaps))]
        ),
        "crop/heatmaps_aux/encoded": _bytes(
            [encode_png(quantise_heatmaps(heatmaps_aux))]
        ),
        "stats/num_present_keypoints": _int64([int(present.sum())]),
        "stats/num_keypoints_in_crop": _int64([int(inside.sum())]),
        "stats/foreground_fraction": _float([float(foreground.mean())]),
        "stats/num_classes_present": _int64([len(classes)]),
        "stats/aspect_ratio": _float([width / height]),
    }
    missing = set(FEATURES) - set(features)
    assert not missing, f"encode_example does not write {sorted(missing)}"
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString()


# ---------------------------------------------------------------------------
# Decoding (inside the graph)


def parse_spec() -> dict[str, tf.io.FixedLenFeature]:
    """`tf.io.parse_*example` spec of every feature (all required)."""
    dtypes = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}
    return {
        name: tf.io.FixedLenFeature(
            [] if feature.length == 1 else [feature.length],
            dtypes[feature.dtype],
        )
        for name, feature in FEATURES.items()
    }


def _decode_gray_png(data) -> tf.Tensor:
    return tf.io.decode_png(data, channels=1, dtype=tf.uint8)[:, :, 0]


def decode_heatmaps(data, grid: int | None = None) -> tf.Tensor:
    """PNG mosaic bytes -> `(h, w, 16)` float32 in [0, 1]."""
    mosaic = _decode_gray_png(data)
    shape = tf.shape(mosaic)
    height = shape[0] // _MOSAIC_SIDE
    width = shape[1] // _MOSAIC_SIDE
    tiles = tf.reshape(mosaic, [_MOSAIC_SIDE, height, _MOSAIC_SIDE, width])
    values = tf.reshape(
        tf.transpose(tiles, [1, 3, 0, 2]), [height, width, NUM_JOINTS]
    )
    values = tf.cast(values, tf.float32) / 255.0
    if grid is not None:
        values = tf.ensure_shape(values, [grid, grid, NUM_JOINTS])
    return values


def decode_example(
    serialized, image_size: int | None = None, heatmap_stride: int = 4
) -> dict[str, tf.Tensor]:
    """Parses and decodes one serialised record (graph-friendly).

    Args:
        serialized: scalar string tensor, one `tf.train.Example`.
        image_size: if given, the crop side the records were written with;
            crop tensors then get static shapes (the decoder checks it).
        heatmap_stride: with `image_size`, gives the heatmaps' static shape.

    Returns:
        A dict keyed by `Feature.decoded` (see `FEATURES`): `image`
        `(H, W, 3)` uint8, `label` `(H, W)` uint8, `keypoints` `(16, 2)`,
        `keypoints_present` `(16,)` bool, `crop_matrix` `(3, 3)`,
        `crop_label`, `crop_edge` `(S, S)` uint8, `crop_heatmaps`,
        `crop_heatmaps_aux` `(S/stride, S/stride, 16)` float32, and the
        scalars.
    """
    parsed = tf.io.parse_single_example(serialized, parse_spec())
    out: dict[str, tf.Tensor] = {}
    for name, feature in FEATURES.items():
        value = parsed[name]
        if feature.dtype == "int64":
            value = tf.cast(value, tf.int32)
        out[feature.decoded] = value
    out["image"] = tf.io.decode_jpeg(parsed["image/encoded"], channels=3)
    out["label"] = _decode_gray_png(parsed["label/encoded"])
    out["has_annotation"] = tf.cast(out["has_annotation"], tf.bool)
    out["keypoints"] = tf.reshape(out["keypoints"], [NUM_JOINTS, 2])
    out["crop_keypoints"] = tf.reshape(out["crop_keypoints"], [NUM_JOINTS, 2])
    out["keypoints_present"] = tf.cast(out["keypoints_present"], tf.bool)
    top = tf.reshape(parsed["crop/matrix"], [2, 3])
    out["crop_matrix"] = tf.concat(
        [top, tf.constant([[0.0, 0.0, 1.0]])], axis=0
    )
    out["crop_label"] = _decode_gray_png(parsed["crop/label/encoded"])
    out["crop_edge"] = _decode_gray_png(parsed["crop/edge/encoded"])
    grid = None if image_size is None else image_size // heatmap_stride
    out["crop_heatmaps"] = decode_heatmaps(
        parsed["crop/heatmaps/encoded"], grid
    )
    out["crop_heatmaps_aux"] = decode_heatmaps(
        parsed["crop/heatmaps_aux/encoded"], grid
    )
    if image_size is not None:
        for key in ("crop_label", "crop_edge"):
            out[key] = tf.ensure_shape(out[key], [image_size, image_size])
    return out
