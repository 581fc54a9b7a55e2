"""Record format: encode (numpy, as Beam does) -> decode (tf.data)."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from nppnet_tf.data import records


def _sample(size=32, stride=4, seed=0):
    rng = np.random.default_rng(seed)
    height, width = 30, 20
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    label = rng.integers(0, 20, (height, width), dtype=np.uint8)
    label[:5] = 0
    present = np.ones(16, bool)
    present[[3, 9]] = False
    keypoints = rng.uniform(0, 19, (16, 2)).astype(np.float32)
    keypoints[~present] = np.nan
    grid = size // stride
    return {
        "image_id": "123_456",
        "split": "train",
        "image_jpeg": buffer.getvalue(),
        "label": label,
        "has_annotation": True,
        "keypoints": keypoints,
        "keypoints_present": present,
        "keypoints_visibility": rng.integers(0, 2, 16),
        "person_center": np.array([10.0, 15.0]),
        "person_scale": 0.15,
        "heatmap_stride": stride,
        "crop_matrix": np.array([[1.0, 0, 6], [0, 1.0, 1], [0, 0, 1]]),
        "crop_params": np.array([0, 0, 6, 1, 20, 30, 26, 31]),
        "crop_scale": 1.0,
        "crop_keypoints": keypoints + np.float32([6, 1]),
        "crop_label": rng.choice(np.uint8([0, 3, 255]), (size, size)),
        "crop_edge": rng.choice(np.uint8([0, 1, 255]), (size, size)),
        "crop_heatmaps": rng.uniform(0, 1, (grid, grid, 16)).astype(np.float32),
        "crop_heatmaps_aux": rng.uniform(0, 1, (grid, grid, 16)).astype(
            np.float32
        ),
    }


def test_round_trip_through_tf_data():
    sample = _sample()
    serialized = records.encode_example(sample)
    data = tf.data.Dataset.from_tensors(serialized).map(
        lambda s: records.decode_example(s, image_size=32)
    )
    out = next(iter(data))
    assert out["image_id"].numpy() == b"123_456"
    assert out["split"].numpy() == b"train"
    np.testing.assert_array_equal(
        out["image"].numpy(), tf.io.decode_jpeg(sample["image_jpeg"]).numpy()
    )
    np.testing.assert_array_equal(out["label"].numpy(), sample["label"])
    assert out["height"].numpy() == 30 and out["width"].numpy() == 20
    present = sample["keypoints_present"]
    np.testing.assert_array_equal(out["keypoints_present"].numpy(), present)
    np.testing.assert_allclose(
        out["keypoints"].numpy()[present], sample["keypoints"][present]
    )
    assert not out["keypoints"].numpy()[~present].any()  # absent -> 0, no NaN
    np.testing.assert_allclose(
        out["crop_matrix"].numpy(), sample["crop_matrix"]
    )
    assert out["crop_params"].numpy().tolist() == [0, 0, 6, 1, 20, 30, 26, 31]
    np.testing.assert_array_equal(
        out["crop_label"].numpy(), sample["crop_label"]
    )
    np.testing.assert_array_equal(out["crop_edge"].numpy(), sample["crop_edge"])
    for key in ("crop_heatmaps", "crop_heatmaps_aux"):
        assert out[key].shape == (8, 8, 16) and out[key].dtype == tf.float32
        error = np.abs(out[key].numpy() - sample[key]).max()
        assert error <= records.HEATMAP_QUANTISATION_ERROR + 1e-7
    assert out["has_annotation"].numpy()
    assert out["num_present_keypoints"].numpy() == 14
    assert out["foreground_fraction"].numpy() == pytest.approx(
        np.mean((sample["label"] >= 1) & (sample["label"] <= 19))
    )
    assert out["num_classes_present"].numpy() == len(
        set(np.unique(sample["label"]).tolist()) - {0}
    )


def test_heatmap_mosaic_channel_layout():
    heatmaps = np.zeros((3, 5, 16), np.float32)
    for channel in range(16):
        heatmaps[channel % 3, channel % 5, channel] = (channel + 1) / 16
    mosaic = records.quantise_heatmaps(heatmaps)
    assert mosaic.shape == (12, 20)
    # Channel 6 sits in tile row 1, column 2.
    assert mosaic[3 + 0, 10 + 1] == round(7 / 16 * 255)
    decoded = records.decode_heatmaps(records.encode_png(mosaic)).numpy()
    np.testing.assert_allclose(
        decoded, heatmaps, atol=records.HEATMAP_QUANTISATION_ERROR
    )


def test_every_feature_is_written_and_parsed():
    serialized = records.encode_example(_sample())
    example = tf.train.Example.FromString(serialized)
    assert set(example.features.feature) == set(records.FEATURES)
    for name, feature in records.FEATURES.items():
        values = getattr(
            example.features.feature[name], f"{feature.dtype}_list"
        ).value
        assert len(values) == feature.length, name
    decoded = records.decode_example(serialized)
    assert {f.decoded for f in records.FEATURES.values()} <= set(decoded)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("crop_heatmaps", np.zeros((4, 4, 16)), "crop_heatmaps"),
        ("keypoints", np.zeros((15, 2)), "keypoints"),
        ("image_jpeg", "not bytes", "image_jpeg"),
        ("label", np.zeros((3, 3), np.float32), "label"),
    ],
)
def test_encode_rejects_bad_values(key, value, message):
    sample = _sample()
    sample[key] = value
    with pytest.raises(ValueError, match=message):
        records.encode_example(sample)
