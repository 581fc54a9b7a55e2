"""Model-level evaluation: flip test, multi-scale, keypoint decoding, both
protocols with perfect oracles, distribution, prediction files.

Two record sets, built once per module with the Beam job:

* `synthetic`: the synthetic LIP (6 val images of 96..160 px, S = 64);
* `coded`: four hand-made val images whose long side is 32 px (so the
  official letterbox scales by exactly 2 at S = 64 and every original
  pixel centre lands on a crop pixel centre). Each photo codes itself:
  red = an identity code per image, green = 20 + 6 y, blue = 20 + 6 x.
  `GeometricOracle` finds the image in the crop, works out where every
  crop pixel comes from in the original, and predicts the truth there:
  exactly right only if the evaluation maps its predictions back to the
  original pixels correctly.
"""

import dataclasses
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import ndimage

from nppnet_tf.config import DataConfig
from nppnet_tf.data import targets
from nppnet_tf.data.augment import IMAGENET_MEAN, IMAGENET_STD
from nppnet_tf.data.dataset import make_dataset
from nppnet_tf.data.lip_files import LIPLayout, write_pose_csv
from nppnet_tf.evaluation import loop
from nppnet_tf.evaluation.evaluate import (
    evaluate,
    evaluate_crops,
    run_evaluation,
)
from nppnet_tf.evaluation.inference import (
    predict_multi_scale,
    predict_with_flip,
    resize_bilinear,
    scaled_size,
    unflip_heatmaps,
    unflip_parsing,
)
from nppnet_tf.evaluation.keypoints import (
    decode_keypoints,
    gaussian_kernel,
    heatmap_argmax,
    smooth_heatmaps,
)
from nppnet_tf.evaluation.official import official_crop
from nppnet_tf.evaluation.prediction_files import evaluate_prediction_files
from nppnet_tf.evaluation.report import render_markdown
from nppnet_tf.lip import (
    MODEL_FLIP_PAIRS,
    MODEL_FLIP_PERM,
    NUM_CLASSES,
    NUM_JOINTS,
    PARSING_FLIP_PAIRS,
    PARSING_FLIP_PERM,
    lip_to_model,
)

SIZE = 64
DATA_CONFIG = DataConfig(
    image_size=SIZE, heatmap_stride=4, sigma=4.0, aux_sigma=8.0, shards=2
)


@dataclasses.dataclass(frozen=True)
class Records:
    lip_root: Path
    records_dir: str


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Records:
    from beam_jobs.lip_to_tfrecord import preprocess
    from nppnet_tf.data.synthetic import write_synthetic_lip

    root = tmp_path_factory.mktemp("synthetic_evaluation")
    write_synthetic_lip(
        root / "lip", 2, 6, seed=3, min_size=96, max_size=160, progress=False
    )
    manifest = preprocess(
        str(root / "lip"), str(root / "records"), DATA_CONFIG, progress=False
    )
    assert manifest["counts"]["val"] == 6 and manifest["num_dead_letters"] == 0
    return Records(root / "lip", str(root / "records"))


# ---------------------------------------------------------------------------
# The coded LIP and its oracle

# (height, width): long side 32, so the official scale is exactly 2.
CODED_SIZES = ((32, 20), (22, 32), (32, 27), (25, 32))
# Red identity codes, far from the padding grey 128 and from its half
# blends with any code (the crop border).
IDENTITY_CODES = (20.0, 60.0, 200.0, 240.0)
RAMP_OFFSET, RAMP_SLOPE = 20.0, 6.0
CODE_TOLERANCE = 6.0


@dataclasses.dataclass(frozen=True)
class CodedRecords(Records):
    ids: tuple[str, ...]
    labels: np.ndarray  # (images, 32, 32) int32, 0-padded
    joints: np.ndarray  # (images, 16, 2) model order, NaN = missing


def _coded_image(height, width, code):
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack(
        [
            np.full((height, width), code),
            RAMP_OFFSET + RAMP_SLOPE * rows,
            RAMP_OFFSET + RAMP_SLOPE * columns,
        ],
        axis=-1,
    ).astype(np.uint8)


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> CodedRecords:
    from beam_jobs.lip_to_tfrecord import preprocess

    root = tmp_path_factory.mktemp("coded_evaluation")
    layout = LIPLayout(root / "lip")
    rng = np.random.default_rng(7)
    labels = np.zeros((len(CODED_SIZES), 32, 32), np.int32)
    joints = np.full((len(CODED_SIZES), NUM_JOINTS, 2), np.nan)
    ids = []
    for split, count in (("train", 1), ("val", len(CODED_SIZES))):
        layout.image_dir(split).mkdir(parents=True)
        layout.label_dir(split).mkdir(parents=True)
        layout.pose_csv(split).parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(count):
            height, width = CODED_SIZES[index]
            image_id = (
                f"{900000 + index}_{1000000 if split == 'val' else 2000000}"
            )
            # 4 x 4 blocks of classes; every left/right class occurs.
            blocks = rng.permutation(np.arange(64) % NUM_CLASSES)
            label = blocks.reshape(8, 8).repeat(4, 0).repeat(4, 1)
            label = label[:height, :width].astype(np.uint8)
            # Distinct joints, 2 px apart, off the last row and column.
            cells = rng.choice(
                ((height - 2) // 2) * ((width - 2) // 2), NUM_JOINTS, False
            )
            lip = np.zeros((NUM_JOINTS, 3))
            lip[:, 0] = 1 + 2 * (cells % ((width - 2) // 2))
            lip[:, 1] = 1 + 2 * (cells // ((width - 2) // 2))
            if index == 1:
                lip[[0, 5]] = np.nan  # two missing ankles
            code = IDENTITY_CODES[index] if split == "val" else 128.0
            Image.fromarray(_coded_image(height, width, code)).save(
                layout.image_path(split, image_id), quality=100, subsampling=0
            )
            Image.fromarray(label).save(layout.label_path(split, image_id))
            rows.append((image_id, lip))
            if split == "val":
                ids.append(image_id)
                labels[index, :height, :width] = label
                joints[index] = lip_to_model(lip[:, :2])
        rows.sort()
        layout.id_file(split).write_text("".join(f"{i}\n" for i, _ in rows))
        write_pose_csv(layout.pose_csv(split), rows)
    config = dataclasses.replace(DATA_CONFIG, shards=1)
    manifest = preprocess(
        str(layout.root), str(root / "records"), config, progress=False
    )
    assert manifest["num_dead_letters"] == 0
    return CodedRecords(
        layout.root, str(root / "records"), tuple(ids), labels, joints
    )


class GeometricOracle(keras.Model):
    """Reads the coded photo's identity, finds where the image lies in the
    crop (and from the ramps whether it is mirrored), so where every crop
    pixel comes from in the original, and predicts the true class there
    and a sharp Gaussian at each true joint. A mirrored input (falling blue ramp) gets what a perfect
    model sees in a mirrored photo: left/right classes and joints swapped.
    `strict`: a crop pixel that does not show an original pixel centre
    (more than 0.25 px off) gets a wrong class, so only reading back
    exactly the crop pixel of each original pixel scores 100."""

    def __init__(
        self, coded: CodedRecords, flip_aware=True, strict=True, **kwargs
    ):
        super().__init__(**kwargs)
        self.labels = tf.constant(coded.labels)
        self.joints = tf.constant(np.nan_to_num(coded.joints), tf.float32)
        self.present = tf.constant(np.isfinite(coded.joints[..., 0]))
        self.sizes = tf.constant(CODED_SIZES, tf.float32)
        self.flip_aware = flip_aware
        self.strict = strict

    def call(self, images, training=False):
        rgb = (images * IMAGENET_STD + IMAGENET_MEAN) * 255.0
        size = images.shape[1]
        match = tf.abs(rgb[..., :1] - IDENTITY_CODES) <= CODE_TOLERANCE
        identity = tf.argmax(
            tf.reduce_sum(tf.cast(match, tf.float32), [1, 2]), axis=-1
        )
        inside = tf.reduce_any(
            match & tf.cast(tf.one_hot(identity, 4), tf.bool)[:, None, None],
            axis=-1,
        )
        weight = tf.cast(inside, tf.float32)
        grid = tf.range(size, dtype=tf.float32)
        columns = tf.broadcast_to(grid[None, None, :], tf.shape(weight))
        rows = tf.broadcast_to(grid[None, :, None], tf.shape(weight))
        height_width = tf.gather(self.sizes, identity)

        def fit(inside_lines, position, ramp, length):
            """Maps crop lines to original pixels: the first and last crop
            lines showing the image are its first and last pixels (exact
            where the letterbox puts pixel centres on crop pixels; JPEG
            biases the ramps' absolute values by a few tenths of a pixel,
            so they only tell the direction, i.e. whether it is mirrored)."""
            first = tf.cast(
                tf.argmax(tf.cast(inside_lines, tf.int32), 1), tf.float32
            )
            last = (
                size
                - 1
                - tf.cast(
                    tf.argmax(tf.cast(inside_lines[:, ::-1], tf.int32), 1),
                    tf.float32,
                )
            )
            count = tf.maximum(tf.reduce_sum(weight, [1, 2]), 1.0)
            centred = (
                position
                - (tf.reduce_sum(weight * position, [1, 2]) / count)[
                    :, None, None
                ]
            )
            rising = tf.reduce_sum(weight * centred * ramp, [1, 2]) >= 0
            slope = (length - 1) / tf.maximum(last - first, 1.0)
            slope = tf.where(rising, slope, -slope)
            start = tf.where(rising, 0.0, length - 1)
            return slope, start - slope * first

        slope_x, offset_x = fit(
            tf.reduce_any(inside, 1), columns, rgb[..., 2], height_width[:, 1]
        )
        slope_y, offset_y = fit(
            tf.reduce_any(inside, 2), rows, rgb[..., 1], height_width[:, 0]
        )
        x_fit = slope_x[:, None, None] * columns + offset_x[:, None, None]
        y_fit = slope_y[:, None, None] * rows + offset_y[:, None, None]
        x, y = tf.round(x_fit), tf.round(y_fit)
        valid = (
            (x >= 0)
            & (y >= 0)
            & (x < height_width[:, 1, None, None])
            & (y < height_width[:, 0, None, None])
        )
        index = tf.cast(
            tf.stack(
                [tf.clip_by_value(y, 0, 31), tf.clip_by_value(x, 0, 31)], -1
            ),
            tf.int32,
        )
        classes = tf.gather_nd(
            tf.gather(self.labels, identity), index, batch_dims=1
        )
        classes = tf.where(valid, classes, 0)
        if self.strict:
            off_centre = tf.maximum(tf.abs(x_fit - x), tf.abs(y_fit - y)) > 0.25
            classes = tf.where(off_centre, (classes + 1) % NUM_CLASSES, classes)
        logits = 10.0 * tf.one_hot(classes, NUM_CLASSES)
        joints = tf.gather(self.joints, identity)  # (batch, 16, 2)
        crop_x = (joints[..., 0] - offset_x[:, None]) / slope_x[:, None]
        crop_y = (joints[..., 1] - offset_y[:, None]) / slope_y[:, None]
        distance = (grid[None, None, :, None] - crop_x[:, None, None, :]) ** 2
        distance += (grid[None, :, None, None] - crop_y[:, None, None, :]) ** 2
        present = tf.cast(tf.gather(self.present, identity), tf.float32)
        heatmaps = tf.exp(-distance / 2.0) * present[:, None, None, :]
        if self.flip_aware:
            flipped = (slope_x < 0)[:, None, None, None]
            logits = tf.where(
                flipped, tf.gather(logits, PARSING_FLIP_PERM, axis=-1), logits
            )
            heatmaps = tf.where(
                flipped,
                tf.gather(heatmaps, MODEL_FLIP_PERM, axis=-1),
                heatmaps,
            )
        return {"parsing": logits, "pose": heatmaps}


def _truth_by_id(coded: CodedRecords) -> dict:
    from nppnet_tf.lip import model_to_lip

    return {i: model_to_lip(coded.joints[n]) for n, i in enumerate(coded.ids)}


@pytest.mark.parametrize("flip", [False, True])
def test_official_protocol_perfect_oracle_scores_100(coded, flip):
    oracle = GeometricOracle(coded)
    result = run_evaluation(
        oracle,
        coded.records_dir,
        "val",
        DATA_CONFIG,
        protocol="official",
        flip=flip,
        batch_size=2,
        progress=False,
    )
    parsing = result.report["parsing"]
    assert result.report["images"] == len(CODED_SIZES)
    assert parsing["pixels"] == sum(h * w for h, w in CODED_SIZES)
    assert parsing["pixel_accuracy"] == 100.0
    assert parsing["mean_iou_present_classes"] == 100.0
    assert parsing["mean_iou"] == 100.0  # every class occurs
    assert result.report["pose"]["average"] == 100.0
    for image_id, truth in _truth_by_id(coded).items():
        present = np.isfinite(truth[:, 0])
        np.testing.assert_array_equal(
            result.pose_predictions[image_id][present], truth[present]
        )


def test_official_protocol_wrong_mapping_fails(coded, monkeypatch):
    """The oracle test is sensitive: mapping back through a matrix one crop
    pixel off (half an original pixel) loses pixels and joints."""

    def shifted(matrices):
        return tf.linalg.matmul(
            tf.constant([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
            tf.cast(matrices, tf.float32),
        )

    to_original = loop.parsing_to_original
    decode = loop.decode_keypoints
    monkeypatch.setattr(
        loop,
        "parsing_to_original",
        lambda logits, matrices, shape: to_original(
            logits, shifted(matrices), shape
        ),
    )
    monkeypatch.setattr(
        loop, "decode_keypoints", lambda h, m: decode(h, shifted(m))
    )
    result = run_evaluation(
        GeometricOracle(coded),  # a new model: a newly traced step
        coded.records_dir,
        "val",
        DATA_CONFIG,
        flip=False,
        batch_size=2,
        progress=False,
    )
    assert result.report["parsing"]["pixel_accuracy"] < 60.0
    truth = _truth_by_id(coded)
    assert any(
        not np.array_equal(
            result.pose_predictions[i][np.isfinite(t[:, 0])],
            t[np.isfinite(t[:, 0])],
        )
        for i, t in truth.items()
    )


def test_official_flip_without_swap_is_not_perfect(coded):
    """A model that does not swap left/right on a mirrored image is what a
    flip test with no channel swap looks like: the pairs tie and lose."""
    report = evaluate(
        GeometricOracle(coded, flip_aware=False),
        coded.records_dir,
        "val",
        DATA_CONFIG,
        flip=True,
        batch_size=2,
        progress=False,
    )
    assert report["parsing"]["per_class_iou"]["right_arm"] < 100.0
    assert report["parsing"]["per_class_iou"]["face"] == 100.0


def test_official_multi_scale_keeps_joints(coded):
    """Scales 0.5, 1, 1.5 (crops of 32, 64, 96): every scale's heatmaps
    land on the same crop pixels, so the joints stay within a pixel."""
    result = run_evaluation(
        GeometricOracle(coded, strict=False),
        coded.records_dir,
        "val",
        DATA_CONFIG,
        scales=(0.5, 1.0, 1.5),
        batch_size=2,
        progress=False,
    )
    assert result.report["scale_sizes"] == [32, 64, 96]
    assert result.report["pose"]["average"] == 100.0
    for image_id, truth in _truth_by_id(coded).items():
        present = np.isfinite(truth[:, 0])
        error = np.abs(result.pose_predictions[image_id] - truth)[present]
        assert error.max() <= 1.0
    assert result.report["parsing"]["pixel_accuracy"] > 90.0


# ---------------------------------------------------------------------------
# Crop protocol: the targets through a side channel


class TargetEcho(keras.Model):
    """Returns the crop targets carried in the input's channels: 0 the
    label, 1..16 the heatmaps (each cell repeated 4 x 4), 17 a column
    ramp that reveals a mirrored input."""

    def __init__(self, flip_aware=True, **kwargs):
        super().__init__(**kwargs)
        self.flip_aware = flip_aware

    def call(self, images, training=False):
        labels = tf.cast(tf.round(images[..., 0]), tf.int32)
        logits = 10.0 * tf.one_hot(labels, NUM_CLASSES)
        heatmaps = images[:, 1::4, 1::4, 1:17]
        if self.flip_aware:
            ramp = images[:, 0, :, 17]
            flipped = (ramp[:, 0] > ramp[:, -1])[:, None, None, None]
            logits = tf.where(
                flipped, tf.gather(logits, PARSING_FLIP_PERM, axis=-1), logits
            )
            heatmaps = tf.where(
                flipped, tf.gather(heatmaps, MODEL_FLIP_PERM, axis=-1), heatmaps
            )
        return {"parsing": logits, "pose": heatmaps}


def _side_channel(images, crop_targets, metadata):
    shape = tf.shape(crop_targets["parsing"])
    labels = tf.cast(crop_targets["parsing"], tf.float32)[..., None]
    heatmaps = tf.repeat(tf.repeat(crop_targets["heatmaps"], 4, 1), 4, 2)
    ramp = tf.range(SIZE, dtype=tf.float32)[None, None, :, None]
    ramp = tf.broadcast_to(ramp, [shape[0], SIZE, SIZE, 1])
    coded = tf.concat([labels, heatmaps, ramp], axis=-1)
    return coded, crop_targets, metadata


def _val_crops(records: Records, batch_size=4):
    return make_dataset(
        records.records_dir,
        "val",
        DATA_CONFIG,
        batch_size,
        training=False,
        include_metadata=True,
        deterministic=True,
    )


@pytest.mark.parametrize("flip", [False, True])
def test_crop_protocol_perfect_targets_score_100(synthetic, flip):
    dataset = _val_crops(synthetic).map(_side_channel)
    report = evaluate(
        TargetEcho(),
        None,
        "val",
        DATA_CONFIG,
        protocol="crop",
        flip=flip,
        progress=False,
        dataset=dataset,
    )
    parsing = report["parsing"]
    assert report["images"] == 6 and report["resolution"] == "crop 64x64"
    assert parsing["pixel_accuracy"] == 100.0
    assert parsing["mean_iou_present_classes"] == 100.0
    present = set(parsing["per_class_iou"]) - set(parsing["absent_classes"])
    assert all(parsing["per_class_iou"][name] == 100.0 for name in present)
    assert report["pose"]["average"] == 100.0
    assert parsing["ignored_pixels"] > 0  # the letterbox padding


def test_crop_flip_without_swap_is_not_perfect(synthetic):
    light = evaluate_crops(
        TargetEcho(flip_aware=False),
        _val_crops(synthetic).map(_side_channel),
        flip=True,
    )
    assert light["pixel_accuracy"] < 100.0


# ---------------------------------------------------------------------------
# Flip test


class MirrorEquivariant(keras.Model):
    """Exactly equivariant to a mirror with left/right swaps: a symmetric
    feature (4 x 4 average pool, 1x1 conv) plus, on each left/right pair,
    +/- an antisymmetric one (a horizontal difference)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.symmetric = keras.layers.Conv2D(NUM_CLASSES + NUM_JOINTS, 1)
        self.antisymmetric = keras.layers.Conv2D(9, 1, use_bias=False)

    def call(self, images, training=False):
        pooled = tf.nn.avg_pool2d(images, 4, 4, "VALID")
        padded = tf.pad(pooled, [[0, 0], [0, 0], [1, 1], [0, 0]])
        odd = self.antisymmetric(padded[:, :, 2:] - padded[:, :, :-2])
        even = self.symmetric(pooled)

        def pair_up(base, odd, pairs):
            channels = [base[..., c] for c in range(base.shape[-1])]
            for index, (left, right) in enumerate(pairs):
                channels[left] = base[..., left] + odd[..., index]
                channels[right] = base[..., left] - odd[..., index]
            return tf.stack(channels, axis=-1)

        return {
            "parsing": pair_up(
                even[..., :NUM_CLASSES], odd[..., :3], PARSING_FLIP_PAIRS
            ),
            "pose": pair_up(
                even[..., NUM_CLASSES:], odd[..., 3:], MODEL_FLIP_PAIRS
            ),
        }


def _authors_unflip_parsing(flipped):
    """The authors' validation: pairs assigned in place through an alias
    (reference 7.1 step 2), then mirrored."""
    out = np.array(flipped)
    view = out  # the same storage
    for left, right in PARSING_FLIP_PAIRS:
        view[..., left] = out[..., right]
        view[..., right] = out[..., left]  # already overwritten
    return out[:, :, ::-1]


def test_flip_test_of_an_equivariant_model_changes_nothing():
    keras.utils.set_random_seed(0)
    model = MirrorEquivariant()
    images = tf.random.normal([2, SIZE, SIZE, 3], seed=1)
    plain = predict_with_flip(model, images, flip=False)
    flipped = predict_with_flip(model, images, flip=True)
    for a, b in zip(plain, flipped):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    # The authors' aliasing would have changed it: channels 14 and 15 differ.
    mirrored = model(images[:, :, ::-1])["parsing"].numpy()
    aliased = 0.5 * (plain[0].numpy() + _authors_unflip_parsing(mirrored))
    assert np.abs(aliased - plain[0].numpy()).max() > 1e-2


def test_unflip_swaps_pairs_properly():
    # Channel c at column x holds 100 x + c; two columns.
    values = np.arange(NUM_CLASSES)[None, :] + 100.0 * np.arange(2)[:, None]
    flipped = tf.constant(values[None, None], tf.float32)  # (1, 1, 2, 20)
    out = unflip_parsing(flipped).numpy()[0, 0]
    expected = values[::-1][:, list(PARSING_FLIP_PERM)]
    np.testing.assert_array_equal(out, expected)
    assert out[0, 14] == 115 and out[0, 15] == 114  # not 115 and 115
    assert not np.array_equal(
        out, _authors_unflip_parsing(values[None, None])[0, 0]
    )
    joints = np.arange(NUM_JOINTS)[None, :] + 100.0 * np.arange(2)[:, None]
    heat = unflip_heatmaps(tf.constant(joints[None, None], tf.float32))
    np.testing.assert_array_equal(
        heat.numpy()[0, 0], joints[::-1][:, list(MODEL_FLIP_PERM)]
    )
    assert heat.numpy()[0, 0, 0, 2] == 105  # right shoulder <- left


# ---------------------------------------------------------------------------
# Multi-scale


class RampPool(keras.Model):
    """4 x 4 average pooling of the input's two ramp channels."""

    def call(self, images, training=False):
        pooled = tf.nn.avg_pool2d(images[..., :2], 4, 4, "VALID")
        return {
            "parsing": tf.repeat(pooled, NUM_CLASSES // 2, axis=-1),
            "pose": tf.repeat(pooled, NUM_JOINTS // 2, axis=-1),
        }


def test_scaled_size():
    assert [scaled_size(384, s) for s in (0.5, 0.75, 1, 1.25, 1.5)] == [
        192, 288, 384, 480, 576,
    ]  # fmt: skip
    assert [scaled_size(64, s) for s in (0.1, 0.5, 0.75, 1.5)] == [
        32,
        32,
        64,
        96,
    ]
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="scales"):
            scaled_size(64, bad)


def test_multi_scale_frames_align():
    grid = (np.arange(SIZE) + 0.5) / SIZE
    ramps = np.stack(np.meshgrid(grid, grid[::-1]), axis=-1)  # x, flipped y
    images = tf.constant(ramps[None], tf.float32)
    model = RampPool()
    single = predict_multi_scale(model, images, (1.0,), flip=False)
    direct = predict_with_flip(model, images, flip=False)
    for a, b in zip(single, direct):
        np.testing.assert_array_equal(
            a.numpy(), resize_bilinear(b, (SIZE, SIZE)).numpy()
        )
    double = predict_multi_scale(model, images, (1.0, 1.0), flip=False)
    for a, b in zip(single, double):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    inner = slice(12, -12)
    # Scale 1: the pooled ramp upsampled back is the ramp (frames align).
    np.testing.assert_allclose(
        single[0].numpy()[0, inner, inner, 0], ramps[inner, inner, 0], atol=1e-5
    )
    multi = predict_multi_scale(model, images, (0.5, 1.0, 1.5), flip=False)
    for a, b in zip(single, multi):
        np.testing.assert_allclose(
            a.numpy()[:, inner, inner], b.numpy()[:, inner, inner], atol=1e-4
        )


# ---------------------------------------------------------------------------
# Keypoint decoding


def test_smoothing_matches_scipy_gaussian_filter():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 36, 3)).astype(np.float32)
    for sigma in (0.5, 1.3, 3.0):
        smoothed = smooth_heatmaps(maps, sigma).numpy()
        for b in range(2):
            for j in range(3):
                expected = ndimage.gaussian_filter(
                    maps[b, :, :, j].astype(np.float64), sigma, mode="reflect"
                )
                np.testing.assert_allclose(
                    smoothed[b, :, :, j], expected, atol=1e-5
                )
    assert len(gaussian_kernel(3.0)) == 2 * 12 + 1  # truncate 4


def test_argmax_is_first_maximum_in_row_major_order():
    maps = np.zeros((1, 3, 4, 2), np.float32)
    maps[0, 1, 3, 0] = maps[0, 2, 0, 0] = 5.0
    maps[0, 0, 2, 1] = 1.0
    xy, value = heatmap_argmax(maps)
    np.testing.assert_array_equal(xy.numpy()[0], [[3, 1], [2, 0]])
    np.testing.assert_array_equal(value.numpy()[0], [5.0, 1.0])


@pytest.mark.parametrize(
    "height, width, size", [(300, 200, 384), (120, 97, 256), (500, 330, 384)]
)
def test_keypoints_map_back_within_one_original_pixel(height, width, size):
    """Gaussians rendered at known original points in the official crop
    (as training targets are), upsampled like a prediction and decoded."""
    crop = official_crop(height, width, size)
    matrix = crop["matrix"].numpy()
    rng = np.random.default_rng(height)
    # Two crop pixels from the border: beyond the last heatmap cell centre
    # the upsampled map is flat, so no decoder can place a joint there.
    margin = 2.0 / crop["scale"].numpy()
    points = rng.uniform(
        [margin, margin], [width - 1 - margin, height - 1 - margin], (16, 2)
    )
    in_crop = points @ matrix[:2, :2].T + matrix[:2, 2]
    heatmaps = targets.heatmaps(in_crop, np.ones(NUM_JOINTS), size, 4, 7.0)
    upsampled = resize_bilinear(heatmaps[None], (size, size))
    decoded = decode_keypoints(upsampled, matrix[None])
    error = np.abs(decoded["keypoints"].numpy()[0] - points)
    assert error.max() <= 1.0
    assert np.abs(decoded["crop_keypoints"].numpy()[0] - in_crop).max() <= 1.0


def test_official_crop_shows_the_whole_image():
    """The long side fills the crop: its pixel centres map to 0 .. S - s
    (the records' pixel-index crop convention), the short side is centred
    (to the authors' integer truncation)."""
    for height, width in ((150, 100), (100, 150), (97, 131), (500, 300)):
        crop = official_crop(height, width, SIZE)
        scale = crop["scale"].numpy()
        matrix = crop["matrix"].numpy()
        corners = np.array([[0, 0], [width - 1, height - 1]], np.float32)
        mapped = corners @ matrix[:2, :2].T + matrix[:2, 2]
        long_axis = int(height > width)
        assert mapped[0, long_axis] == pytest.approx(0.0, abs=1e-3)
        assert mapped[1, long_axis] == pytest.approx(SIZE - scale, abs=1e-3)
        short = 1 - long_axis
        margins = (mapped[0, short], SIZE - 1 - mapped[1, short])
        assert min(margins) >= 0 and abs(margins[0] - margins[1]) <= 1.0
        assert scale == pytest.approx(SIZE / max(height, width))


# ---------------------------------------------------------------------------
# Distribution, prediction files, errors


def _conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(
        8, 3, strides=4, padding="same", activation="relu"
    )(inputs)
    outputs = {
        "parsing": keras.layers.Conv2D(NUM_CLASSES, 1)(features),
        "pose": keras.layers.Conv2D(NUM_JOINTS, 1)(features),
    }
    return keras.Model(inputs, outputs)


def _assert_same_scores(a: dict, b: dict):
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_scores(a[key], b[key])
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12)


def test_distributed_evaluation_equals_single_device(
    synthetic, make_mirrored_strategy
):
    model = _conv_model()
    strategy = make_mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        replicated = keras.models.clone_model(model)
        replicated.set_weights(model.get_weights())
    single = evaluate_crops(model, _val_crops(synthetic))
    distributed = evaluate_crops(
        replicated, _val_crops(synthetic), strategy=strategy
    )
    assert single["num_images"] == distributed["num_images"] == 6
    _assert_same_scores(single, distributed)
    # The official protocol, with a last batch of one image (one replica
    # gets nothing).
    common = dict(batch_size=4, max_examples=5, progress=False)
    alone = evaluate(model, synthetic.records_dir, "val", DATA_CONFIG, **common)
    shared = evaluate(
        replicated,
        synthetic.records_dir,
        "val",
        DATA_CONFIG,
        strategy=strategy,
        **common,
    )
    assert alone["images"] == shared["images"] == 5
    assert (
        alone["parsing"]["confusion_matrix"]
        == shared["parsing"]["confusion_matrix"]
    )
    assert alone["pose"]["per_joint"] == shared["pose"]["per_joint"]


def test_prediction_files_score_the_same(synthetic, tmp_path):
    report = evaluate(
        _conv_model(seed=3),
        synthetic.records_dir,
        "val",
        DATA_CONFIG,
        scales=(0.75, 1.0, 1.25),
        batch_size=4,
        prediction_dir=tmp_path / "predictions",
        progress=False,
    )
    assert report["parsing_dir"] == str(tmp_path / "predictions" / "parsing")
    assert len(list((tmp_path / "predictions" / "parsing").glob("*.png"))) == 6
    files = evaluate_prediction_files(
        synthetic.lip_root,
        "val",
        parsing_dir=report["parsing_dir"],
        pose_csv=report["pose_csv"],
    )
    assert files["images"] == report["images"] == 6
    assert (
        files["parsing"]["confusion_matrix"]
        == report["parsing"]["confusion_matrix"]
    )
    for key in ("mean_iou", "pixel_accuracy", "frequency_weighted_iou"):
        assert files["parsing"][key] == report["parsing"][key]
    assert (
        files["parsing"]["per_class_iou"] == report["parsing"]["per_class_iou"]
    )
    assert (
        files["parsing"]["ignored_pixels"]
        == report["parsing"]["ignored_pixels"]
    )
    np.testing.assert_equal(files["pose"]["average"], report["pose"]["average"])
    np.testing.assert_equal(
        files["pose"]["per_joint"], report["pose"]["per_joint"]
    )
    assert (
        0 < report["pose"]["joints_counted"] == files["pose"]["joints_counted"]
    )
    assert "LIP val evaluation" in render_markdown(report)


def test_evaluation_errors_name_the_bad_value(synthetic, tmp_path):
    model = _conv_model()
    args = (model, synthetic.records_dir, "val", DATA_CONFIG)
    with pytest.raises(ValueError, match="'bogus'"):
        evaluate(*args, protocol="bogus", progress=False)
    with pytest.raises(ValueError, match="protocol='official'"):
        evaluate(
            *args, protocol="crop", prediction_dir=tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="scales"):
        evaluate(*args, scales=(0.0,), progress=False)
    with pytest.raises(ValueError, match="max_examples"):
        evaluate(*args, max_examples=0, progress=False)
    with pytest.raises(FileNotFoundError, match="'test'"):
        evaluate(model, synthetic.records_dir, "test", DATA_CONFIG)
    with pytest.raises(ValueError, match="element_spec"):
        evaluate_crops(model, tf.data.Dataset.range(3).batch(2))
    inputs = keras.Input((None, None, 3))
    wrong = keras.Model(
        inputs, {"heatmaps": keras.layers.Conv2D(16, 4, strides=4)(inputs)}
    )
    with pytest.raises(ValueError, match="'parsing' and 'pose'"):
        evaluate(wrong, *args[1:], progress=False)


@pytest.mark.slow
def test_tiny_nppnet_smoke(synthetic, tmp_path):
    import json

    from nppnet_tf.models.nppnet import NPPNet

    genotype = json.loads(
        (
            Path(__file__).parents[3] / "configs/genotypes/nppnet_lip.json"
        ).read_text()
    )
    keras.utils.set_random_seed(0)
    model = NPPNet(genotype, init_channels=8, num_cells=4)
    light = evaluate_crops(model, _val_crops(synthetic, 2), max_batches=1)
    assert light["num_images"] == 2
    assert 0.0 <= light["miou"] <= 100.0
    report = evaluate(
        model,
        synthetic.records_dir,
        "val",
        DATA_CONFIG,
        batch_size=2,
        max_examples=2,
        prediction_dir=tmp_path,
        progress=False,
    )
    assert report["images"] == 2
    assert 0.0 <= report["parsing"]["mean_iou"] <= 100.0
    assert len(list((tmp_path / "parsing").glob("*.png"))) == 2
