"""Augmentation: one transform moves image, labels and joints together,
flips swap left and right, targets follow the joints, the evaluation branch
reproduces the stored targets; eagerly and inside Dataset.map."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.config import AugmentConfig, DataConfig
from nppnet_tf.data import augment, geometry, records
from nppnet_tf.lip import MODEL_FLIP_PERM, NUM_JOINTS, PARSING_FLIP_PERM

SIZE = 64
STRIDE = 4
DATA = DataConfig(
    image_size=SIZE, heatmap_stride=STRIDE, sigma=4.0, aux_sigma=8.0
)
# Wider than the paper's ranges, so that joints also leave the crop.
WILD = AugmentConfig(
    scale_min=0.4, scale_max=2.0, max_rotation=180.0, max_offset=20
)
FLIP_TABLE = np.array(
    list(PARSING_FLIP_PERM) + list(range(len(PARSING_FLIP_PERM), 256))
)


def decoded_records(lip_records, split="train"):
    pattern = os.path.join(lip_records.records_dir, split, "*.tfrecord.gz")
    data = tf.data.TFRecordDataset(
        sorted(glob.glob(pattern)), compression_type="GZIP"
    )
    return [records.decode_example(s, SIZE, STRIDE) for s in data]


def identity_params(flip=False):
    return {
        "scale_multiplier": tf.constant(1.0),
        "angle_degrees": tf.constant(0.0),
        "offset": tf.constant([0.0, 0.0]),
        "flip": tf.constant(flip),
    }


def square_example(image, label, keypoints=None, present=None):
    """A decoded-like example whose training matrix at scale 1 is the
    identity: an S x S original, person centre at (S/2, S/2)."""
    if keypoints is None:
        keypoints = np.zeros((NUM_JOINTS, 2), np.float32)
        present = np.zeros(NUM_JOINTS, bool)
    side = label.shape[0]
    return {
        "image": tf.constant(image, tf.uint8),
        "label": tf.constant(label, tf.uint8),
        "keypoints": tf.constant(keypoints, tf.float32),
        "keypoints_present": tf.constant(present, tf.bool),
        "height": tf.constant(side, tf.int32),
        "width": tf.constant(side, tf.int32),
        "person_center": tf.constant([side / 2, side / 2], tf.float32),
    }


def marked_example():
    """A 96 x 96 original with each joint j at a grid point, marked by a
    7 x 7 square of label value j + 1 and image value 10 (j + 1) in the red
    channel."""
    side, half = 96, 3
    label = np.zeros((side, side), np.uint8)
    image = np.full((side, side, 3), 200, np.uint8)
    keypoints = np.zeros((NUM_JOINTS, 2), np.float32)
    for joint in range(NUM_JOINTS):
        x, y = 24 + 16 * (joint % 4), 24 + 16 * (joint // 4)
        keypoints[joint] = (x, y)
        label[y - half : y + half + 1, x - half : x + half + 1] = joint + 1
        image[y - half : y + half + 1, x - half : x + half + 1, 0] = 10 * (
            joint + 1
        )
    example = square_example(image, label, keypoints, np.ones(NUM_JOINTS, bool))
    example["person_center"] = tf.constant([50.0, 45.0])
    return example


def draws(config, count, seed=0):
    for index in range(count):
        yield augment.random_crop_parameters(
            augment.example_seed(seed, 0, index), config
        )


def heatmap_peaks(heatmaps):
    """`(16, 2)` input-pixel (x, y) of each channel's maximum cell."""
    heatmaps = np.asarray(heatmaps)
    grid = heatmaps.shape[0]
    flat = heatmaps.reshape(grid * grid, NUM_JOINTS).argmax(axis=0)
    cells = np.stack([flat % grid, flat // grid], axis=1)
    return STRIDE * cells + STRIDE / 2 - 0.5


def inside(points, margin=0.0):
    return np.all((points >= margin) & (points <= SIZE - 1 - margin), axis=1)


# ---------------------------------------------------------------- normalise


def test_normalize_image_values_and_inverse():
    image = tf.constant([[[0, 128, 255]]], tf.uint8)
    normal = augment.normalize_image(image).numpy()
    expected = (np.array([0, 128, 255]) / 255.0 - augment.IMAGENET_MEAN) / (
        augment.IMAGENET_STD
    )
    np.testing.assert_allclose(normal[0, 0], expected, rtol=1e-6)
    assert normal.dtype == np.float32
    every_value = tf.reshape(
        tf.range(256 * 3, dtype=tf.int32) % 256, [16, 16, 3]
    )
    every_value = tf.cast(every_value, tf.uint8)
    back = augment.denormalize_image(augment.normalize_image(every_value))
    np.testing.assert_array_equal(back.numpy(), every_value.numpy())


# ---------------------------------------------------------------- parameters


def test_parameters_stay_in_range():
    config = AugmentConfig(max_offset=7)
    values = {key: [] for key in ("scale", "angle", "offset", "flip")}
    for params in draws(config, 300):
        values["scale"].append(params["scale_multiplier"].numpy())
        values["angle"].append(params["angle_degrees"].numpy())
        values["offset"].append(params["offset"].numpy())
        values["flip"].append(params["flip"].numpy())
    scale, angle = np.array(values["scale"]), np.array(values["angle"])
    offset, flip = np.array(values["offset"]), np.array(values["flip"])
    assert 0.5 <= scale.min() < 0.6 and 1.4 < scale.max() <= 1.5
    assert -40 <= angle.min() < -35 and 35 < angle.max() <= 40
    assert offset.shape == (300, 2)
    np.testing.assert_array_equal(offset, np.round(offset))
    assert offset.min() >= -7 and offset.max() <= 7
    assert len(np.unique(offset)) >= 12  # -6..6 all drawn
    assert 0.4 < flip.mean() < 0.6


@pytest.mark.parametrize("probability, expected", [(0.0, False), (1.0, True)])
def test_flip_probability_bounds(probability, expected):
    config = AugmentConfig(flip_probability=probability)
    assert all(p["flip"].numpy() == expected for p in draws(config, 30))


def test_parameters_are_a_function_of_the_seed():
    config = AugmentConfig()
    first = augment.random_crop_parameters(
        augment.example_seed(7, 2, 123), config
    )
    again = augment.random_crop_parameters(
        augment.example_seed(7, 2, 123), config
    )
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())
    others = [(8, 2, 123), (7, 3, 123), (7, 2, 124)]
    for seed, epoch, key in others:
        other = augment.random_crop_parameters(
            augment.example_seed(seed, epoch, key), config
        )
        assert other["angle_degrees"].numpy() != first["angle_degrees"].numpy()


def test_parameters_from_a_generator():
    generator = tf.random.Generator.from_seed(3)
    params = augment.random_crop_parameters(generator, AugmentConfig())
    assert 0.5 <= params["scale_multiplier"].numpy() <= 1.5
    with pytest.raises(TypeError, match="AugmentConfig"):
        augment.random_crop_parameters(generator, DATA)


def test_example_key_is_stable():
    key = augment.example_key(tf.constant("100034_483681"))
    assert key.dtype == tf.int64
    assert key.numpy() == augment.example_key("100034_483681").numpy()
    assert key.numpy() != augment.example_key("100034_483682").numpy()


# ---------------------------------------------------------------- flips


def test_flip_mirrors_pixels_and_swaps_parsing_classes():
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[20:31, 5:11] = 14  # left arm, on the image's left
    label[40:44, 50:60] = 17  # right leg
    label[2:6, 30:40] = 3  # hair: no partner
    label[60:, :] = 255
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3))
    example = square_example(image.astype(np.uint8), label)

    plain = augment.augment_example(example, identity_params(False), DATA)
    np.testing.assert_array_equal(plain["label"].numpy(), label)
    np.testing.assert_array_equal(plain["image"].numpy(), image)

    flipped = augment.augment_example(example, identity_params(True), DATA)
    out = flipped["label"].numpy()
    np.testing.assert_array_equal(flipped["image"].numpy(), image[:, ::-1])
    assert (out[20:31, SIZE - 11 : SIZE - 5] == 15).all()  # became right arm
    assert (out[40:44, SIZE - 60 : SIZE - 50] == 16).all()  # became left leg
    assert (out[2:6, SIZE - 40 : SIZE - 30] == 3).all()
    assert (out[60:] == 255).all()
    assert not np.isin(out, [14, 17]).any()
    assert (flipped["edge"].numpy()[60:] == 255).all()


def test_flip_swaps_joint_channels_and_presence():
    keypoints = np.zeros((NUM_JOINTS, 2), np.float32)
    keypoints[2] = (10.0, 20.0)  # right shoulder
    present = np.zeros(NUM_JOINTS, bool)
    present[[2, 14]] = True  # right shoulder and thorax (no partner)
    keypoints[14] = (30.0, 12.0)
    example = square_example(
        np.zeros((SIZE, SIZE, 3), np.uint8),
        np.zeros((SIZE, SIZE), np.uint8),
        keypoints,
        present,
    )
    out = augment.augment_example(example, identity_params(True), DATA)
    present_out = out["keypoints_present"].numpy()
    assert present_out.tolist() == [k in (5, 14) for k in range(NUM_JOINTS)]
    # The right shoulder, mirrored, is now the left shoulder (channel 5).
    np.testing.assert_allclose(out["keypoints"].numpy()[5], [SIZE - 1 - 10, 20])
    np.testing.assert_allclose(
        out["keypoints"].numpy()[14], [SIZE - 1 - 30, 12]
    )
    assert out["heatmaps"].numpy()[..., 2].max() == 0
    assert out["heatmaps"].numpy()[..., 5].max() > 0.9


def test_flipping_twice_is_the_identity(lip_records):
    params = {
        "scale_multiplier": tf.constant(1.2),
        "angle_degrees": tf.constant(13.0),
        "offset": tf.constant([3.0, -2.0]),
    }
    for decoded in decoded_records(lip_records)[:4]:
        once = augment.augment_example(
            decoded, {**params, "flip": tf.constant(True)}, DATA
        )
        twice = augment.augment_example(
            square_example(
                once["image"],
                once["label"],
                once["keypoints"],
                once["keypoints_present"],
            ),
            identity_params(True),
            DATA,
        )
        never = augment.augment_example(
            decoded, {**params, "flip": tf.constant(False)}, DATA
        )
        # Bilinear samples at the same points up to float rounding.
        difference = np.abs(
            twice["image"].numpy().astype(int) - never["image"].numpy()
        )
        assert difference.max() <= 1
        np.testing.assert_array_equal(
            twice["label"].numpy(), never["label"].numpy()
        )
        np.testing.assert_array_equal(
            twice["keypoints_present"].numpy(),
            never["keypoints_present"].numpy(),
        )
        np.testing.assert_allclose(
            twice["keypoints"].numpy(), never["keypoints"].numpy(), atol=1e-3
        )
        np.testing.assert_allclose(
            twice["heatmaps"].numpy(), never["heatmaps"].numpy(), atol=1e-4
        )


# ---------------------------------------------------------------- joints


@pytest.mark.parametrize("config", [AugmentConfig(max_offset=7), WILD])
def test_joints_image_labels_and_heatmaps_move_together(config):
    """Joint j sits in a square of label j + 1 and red 10 (j + 1): after any
    augmentation, channel k's keypoint is at the centre of its joint's
    square, its heatmap peaks within one cell of it, and its presence is
    kept even outside the crop."""
    example = marked_example()
    checked = outside = 0
    for params in draws(config, 40, seed=1):
        out = augment.augment_example(example, params, DATA)
        flip = bool(params["flip"].numpy())
        source = np.array(MODEL_FLIP_PERM) if flip else np.arange(NUM_JOINTS)
        keypoints = out["keypoints"].numpy()
        label, image = out["label"].numpy(), out["image"].numpy()
        assert out["keypoints_present"].numpy().all()
        peaks = heatmap_peaks(out["heatmaps"].numpy())
        aux_peaks = heatmap_peaks(out["heatmaps_aux"].numpy())
        # Squares are 7 px wide at scale 96 -> 64 times the multiplier.
        margin = 4 * 64 / 96 * float(params["scale_multiplier"]) + 1
        for channel in range(NUM_JOINTS):
            point = keypoints[channel]
            if not inside(point[None], margin)[0]:
                outside += 1
                continue
            value = FLIP_TABLE[source[channel] + 1] if flip else channel + 1
            rows, cols = np.nonzero(label == value)
            assert len(rows), (channel, params)
            np.testing.assert_allclose(
                [cols.mean(), rows.mean()], point, atol=1.0
            )
            x, y = np.round(point).astype(int)
            assert image[y, x, 0] == 10 * (source[channel] + 1)
            assert np.abs(peaks[channel] - point).max() <= STRIDE
            assert np.abs(aux_peaks[channel] - point).max() <= STRIDE
            checked += 1
    assert checked > 200
    if config is WILD:
        assert outside > 50


def test_heatmaps_follow_joints_of_real_records(lip_records):
    config = AugmentConfig(max_offset=7)
    checked = 0
    for index, decoded in enumerate(decoded_records(lip_records)):
        for params in draws(config, 6, seed=index):
            out = augment.augment_example(decoded, params, DATA)
            keypoints = out["keypoints"].numpy()
            present = out["keypoints_present"].numpy()
            np.testing.assert_array_equal(
                np.sort(present), np.sort(decoded["keypoints_present"].numpy())
            )
            peaks = heatmap_peaks(out["heatmaps"].numpy())
            for channel in np.nonzero(present & inside(keypoints))[0]:
                distance = np.abs(peaks[channel] - keypoints[channel]).max()
                assert distance <= STRIDE, (index, channel, params)
                checked += 1
            absent = ~present
            assert out["heatmaps"].numpy()[..., absent].max(initial=0) == 0
    assert checked > 300


def test_labels_and_edges_stay_valid(lip_records):
    classes = set(range(20)) | {255}
    for index, decoded in enumerate(decoded_records(lip_records)):
        for params in draws(WILD, 5, seed=100 + index):
            out = augment.augment_example(decoded, params, DATA)
            label, edge = out["label"].numpy(), out["edge"].numpy()
            assert set(np.unique(label)) <= classes
            assert set(np.unique(edge)) <= {0, 1, 255}
            np.testing.assert_array_equal(edge == 255, label == 255)
            heatmaps = out["heatmaps"].numpy()
            assert heatmaps.min() >= 0 and heatmaps.max() <= 1


# ---------------------------------------------------------------- evaluation


def test_canonical_example_is_the_stored_crop(lip_records):
    for decoded in decoded_records(lip_records, "val"):
        out = augment.canonical_example(decoded, DATA)
        assert set(out) == set(augment.CROP_KEYS)
        np.testing.assert_array_equal(
            out["image"].numpy(),
            geometry.warp_image(
                decoded["image"], decoded["crop_matrix"], SIZE
            ).numpy(),
        )
        stored = {
            "label": "crop_label",
            "edge": "crop_edge",
            "heatmaps": "crop_heatmaps",
            "heatmaps_aux": "crop_heatmaps_aux",
        }
        for key, record_key in stored.items():
            np.testing.assert_array_equal(
                out[key].numpy(), decoded[record_key].numpy()
            )
        np.testing.assert_array_equal(
            out["matrix"].numpy(), decoded["crop_matrix"].numpy()
        )


def test_regenerated_targets_match_the_beam_job(lip_records):
    """Warping with the stored canonical matrix and regenerating targets
    gives what the Beam job stored: the same target code, sigmas and edge
    width on both sides."""
    for decoded in decoded_records(lip_records):
        out = augment.crop_example(decoded, decoded["crop_matrix"], False, DATA)
        np.testing.assert_array_equal(
            out["label"].numpy(), decoded["crop_label"].numpy()
        )
        np.testing.assert_array_equal(
            out["edge"].numpy(), decoded["crop_edge"].numpy()
        )
        for key in ("heatmaps", "heatmaps_aux"):
            np.testing.assert_allclose(
                out[key].numpy(),
                decoded[f"crop_{key}"].numpy(),
                atol=records.HEATMAP_QUANTISATION_ERROR + 1e-6,
            )


# ---------------------------------------------------------------- graph mode


def test_same_results_eagerly_and_inside_dataset_map(lip_records):
    decoded = decoded_records(lip_records)[0]
    config = AugmentConfig(max_offset=7)
    seed = augment.example_seed(4, 1, augment.example_key(decoded["image_id"]))
    eager = augment.augment_example(
        decoded, augment.random_crop_parameters(seed, config), DATA
    )
    mapped = tf.data.Dataset.from_tensors(decoded).map(
        lambda d: augment.augment_example(
            d,
            augment.random_crop_parameters(
                augment.example_seed(4, 1, augment.example_key(d["image_id"])),
                config,
            ),
            DATA,
        )
    )
    graph = next(iter(mapped))
    for key in augment.CROP_KEYS:
        np.testing.assert_allclose(
            graph[key].numpy(), eager[key].numpy(), atol=1e-5, err_msg=key
        )
    canonical = next(
        iter(
            tf.data.Dataset.from_tensors(decoded).map(
                lambda d: augment.canonical_example(d, DATA)
            )
        )
    )
    eager_canonical = augment.canonical_example(decoded, DATA)
    for key in augment.CROP_KEYS:
        np.testing.assert_array_equal(
            canonical[key].numpy(), eager_canonical[key].numpy()
        )
