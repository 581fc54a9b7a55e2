"""The Beam preprocessing job: every bad input kind lands in the dead-letter
output, every input record in exactly one output, and the written records
decode in tf.data to the same data and targets."""

import json

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from lip_fixture import LIPFixture, good_fixture, jpeg_bytes, png_bytes

from beam_jobs import lip_examples, lip_index
from beam_jobs.lip_to_tfrecord import (
    FAILED,
    EncodeExamples,
    ReadLIPIndex,
    preprocess,
    search_half,
)
from nppnet_tf.config import DataConfig
from nppnet_tf.data import geometry, records, targets
from nppnet_tf.lip import LIP_TO_MODEL

CONFIG = DataConfig(image_size=32, shards=2, sigma=3.0, aux_sigma=6.0)


def _bad_fixture(root):
    """Two good images per split and one image per kind of bad input."""
    fixture = LIPFixture(root, seed=1)
    for name in ("good_a", "good_b"):
        fixture.add("train", name)
    for name in ("good_c", "good_d"):
        fixture.add("val", name)
    good = fixture.person(40, 32)[0]
    full = jpeg_bytes(good)
    fixture.add("train", "truncated_jpeg", image=full[: len(full) // 2])
    fixture.add("train", "text_as_jpeg", image=b"this is not an image")
    fixture.add("train", "png_as_jpeg", image=png_bytes(good))
    fixture.add("train", "no_label", write_label=False)
    fixture.add("val", "garbage_label", label=b"\x89PNG garbage")
    fixture.add("train", "rgb_label", label=np.zeros((40, 32, 3), np.uint8))
    fixture.add("train", "small_label", label=np.zeros((20, 32), np.uint8))
    bad_values = np.zeros((40, 32), np.uint8)
    bad_values[3, 4] = 25
    fixture.add("val", "label_25", label=bad_values)
    fixture.add("train", "short_row", csv_line="short_row.jpg,1,2,0,3,4")
    fixture.add(
        "train", "text_row", csv_line="text_row.jpg," + ",".join(["a"] * 48)
    )
    far = fixture.person(40, 32)[2]
    far[4, :2] = (32 * 10, 5)
    fixture.add("train", "far_keypoint", joints=far)
    fixture.add("train", "twice_in_csv")
    fixture.add_raw_row("train", fixture.csv_lines["train"][-1])
    fixture.add("train", "in_both_splits")
    fixture.add("val", "in_both_splits")
    fixture.add("train", "no_annotation", write_row=False)
    fixture.add("val", "no_image", write_image=False)
    fixture.add("train", "not_listed", list_id=False)
    fixture.add_unkeyed_row("train", "," + ",".join(["1"] * 48))
    fixture.write()
    return fixture


EXPECTED_DEAD = {
    ("truncated_jpeg", "decode_image", "unreadable_image"),
    ("text_as_jpeg", "decode_image", "not_jpeg"),
    ("png_as_jpeg", "decode_image", "not_jpeg"),
    ("no_label", "read_index", "missing_label"),
    ("garbage_label", "decode_label", "unreadable_label"),
    ("rgb_label", "decode_label", "label_mode"),
    ("small_label", "check_label", "label_size_mismatch"),
    ("label_25", "check_label", "label_out_of_range"),
    ("short_row", "parse_pose", "field_count"),
    ("text_row", "parse_pose", "non_numeric"),
    ("far_keypoint", "check_keypoints", "keypoint_outside_image"),
    ("twice_in_csv", "read_index", "duplicate_id"),
    ("in_both_splits", "read_index", "duplicate_id"),
    ("no_annotation", "read_index", "missing_annotation"),
    ("no_image", "read_index", "missing_image"),
    ("not_listed", "read_index", "not_in_id_list"),
    (None, "parse_pose", "empty_name"),
}


def _run_index_and_encode(
    root, expected_examples, expected_dead, input_records
):
    with TestPipeline(runner=FnApiRunner()) as pipeline:
        index = pipeline | ReadLIPIndex(str(root), ["train", "val"])
        encoded = index["rows"] | EncodeExamples(CONFIG)
        dead = (index[FAILED], encoded[FAILED]) | "AllDead" >> beam.Flatten()
        assert_that(
            encoded.examples | "Ids" >> beam.Map(lambda e: (e[0], e[1])),
            equal_to(expected_examples),
            label="examples",
        )
        assert_that(
            dead
            | "Keys"
            >> beam.Map(lambda d: (d["image_id"], d["stage"], d["reason"])),
            equal_to(expected_dead),
            label="dead letters",
        )
        assert_that(
            dead | "Complete" >> beam.Map(lambda d: sorted(d)),
            equal_to(
                [sorted(lip_index.dead_letter(None, None, "", "", "", []))]
                * len(expected_dead)
            ),
            label="dead letter fields",
        )
        outputs = (encoded.examples, dead) | "Outputs" >> beam.Flatten()
        assert_that(
            outputs | beam.combiners.Count.Globally(),
            equal_to([input_records]),
            label="one output per input record",
        )


def test_every_bad_input_kind_goes_to_dead_letters(tmp_path):
    fixture = _bad_fixture(tmp_path / "lip")
    assert fixture.input_records == 4 + len(EXPECTED_DEAD)
    expected_examples = [
        ("train", "good_a"),
        ("train", "good_b"),
        ("val", "good_c"),
        ("val", "good_d"),
    ]
    _run_index_and_encode(
        fixture.root,
        expected_examples,
        list(EXPECTED_DEAD),
        fixture.input_records,
    )


def test_empty_release_gives_no_output(tmp_path):
    fixture = LIPFixture(tmp_path / "lip")
    fixture.write()
    _run_index_and_encode(fixture.root, [], [], 0)


def _read_split(out_dir, split):
    files = sorted(
        tf.io.gfile.glob(str(out_dir / split / f"{split}-*-of-*.tfrecord.gz"))
    )
    assert files, split
    return list(
        tf.data.TFRecordDataset(
            files, compression_type="GZIP"
        ).as_numpy_iterator()
    )


def test_preprocess_writes_decodable_records_and_skips_reruns(tmp_path):
    fixture = good_fixture(tmp_path / "lip", train=6, val=2)
    fixture.add_test_split(2)
    fixture.write()
    out = tmp_path / "records"
    config = DataConfig(**{**CONFIG.__dict__, "include_test": True})
    manifest = preprocess(str(fixture.root), str(out), config, progress=False)
    assert not manifest["skipped"]
    assert manifest["counts"]["train"] == 6
    assert manifest["counts"]["val"] == 2
    assert manifest["counts"]["test"] == 2
    assert manifest["num_dead_letters"] == 0
    assert manifest["dead_letter_counts"] == {}
    assert manifest["input_records"] == 10
    assert manifest["bytes_per_example"] > 0
    assert (
        json.loads((out / "manifest.json").read_text())["input_fingerprint"]
        == manifest["input_fingerprint"]
    )
    assert len(list((out / "train").glob("train-*-of-00002.tfrecord.gz"))) == 2
    assert (
        out / "dead_letter" / "dead_letter-00000-of-00001.jsonl"
    ).read_text() == ""

    train = _read_split(out, "train")
    weights = _read_split(out, "search_weights")
    arch = _read_split(out, "search_arch")
    assert sorted(weights + arch) == sorted(train)  # byte-equal halves of train
    assert manifest["counts"]["search_weights"] == len(weights)

    # Decoding inside tf.data, as the training input pipeline does.
    decoded = tf.data.Dataset.from_tensor_slices(
        train + _read_split(out, "val")
    )
    decoded = decoded.map(lambda s: records.decode_example(s, image_size=32))
    assert decoded.element_spec["crop_heatmaps"].shape == (8, 8, 16)
    for example in decoded:
        image_id = example["image_id"].numpy().decode()
        split = example["split"].numpy().decode()
        original = tf.io.decode_jpeg(
            fixture.layout.image_path(split, image_id).read_bytes()
        )
        np.testing.assert_array_equal(
            example["image"].numpy(), original.numpy()
        )
        joints = fixture.joints[image_id][list(LIP_TO_MODEL)]
        present = np.isfinite(joints[:, 0])
        np.testing.assert_array_equal(
            example["keypoints_present"].numpy(), present
        )
        np.testing.assert_allclose(
            example["keypoints"].numpy()[present], joints[present, :2]
        )
        matrix = example["crop_matrix"]
        crop_label = geometry.warp_label(example["label"], matrix, 32)
        np.testing.assert_array_equal(
            example["crop_label"].numpy(), crop_label.numpy()
        )
        np.testing.assert_array_equal(
            example["crop_edge"].numpy(),
            targets.edge_map(crop_label, 3).numpy(),
        )
        moved = geometry.transform_points(
            np.where(present[:, None], joints[:, :2], 0), matrix
        )
        np.testing.assert_allclose(
            example["crop_keypoints"].numpy()[present],
            moved.numpy()[present],
            atol=1e-4,
        )
        for key, sigma in (("crop_heatmaps", 3.0), ("crop_heatmaps_aux", 6.0)):
            expected = targets.heatmaps(
                example["crop_keypoints"], present, 32, 4, sigma
            )
            error = np.abs(example[key].numpy() - expected.numpy()).max()
            assert error <= records.HEATMAP_QUANTISATION_ERROR + 1e-6
        if split == "train":
            assert search_half(image_id) in ("search_weights", "search_arch")

    test = [records.decode_example(s) for s in _read_split(out, "test")]
    assert {t["has_annotation"].numpy() for t in test} == {False}
    assert all((t["crop_label"].numpy() == 255).all() for t in test)

    again = preprocess(str(fixture.root), str(out), config, progress=False)
    assert again["skipped"] and again["created"] == manifest["created"]
    # A forced rebuild with two in-process workers (threads) writes the
    # same records.
    forced = preprocess(
        str(fixture.root),
        str(out),
        config,
        direct_num_workers=2,
        force=True,
        progress=False,
    )
    assert not forced["skipped"] and forced["counts"] == manifest["counts"]
    assert forced["direct_num_workers"] == 2
    assert sorted(_read_split(out, "train")) == sorted(train)
    label_path = fixture.layout.label_path("val", "2000_val")
    label = np.zeros((44, 30), np.uint8)
    label[5:9, 5:9] = 3
    label_path.write_bytes(png_bytes(label))
    changed = preprocess(str(fixture.root), str(out), config, progress=False)
    assert (
        not changed["skipped"]
        and changed["input_fingerprint"] != manifest["input_fingerprint"]
    )


def test_json_annotation_gives_centre_and_joints(tmp_path):
    fixture = good_fixture(tmp_path / "lip", train=2, val=1)
    joints = np.full((16, 3), 8.0)
    joints[0] = 0  # the authors' "missing": x + y == 0
    json_path = tmp_path / "train.json"
    json_path.write_text(
        json.dumps(
            {
                "root": [
                    {
                        "im_name": "1000_train.jpg",
                        "joint_self": joints.tolist(),
                        "objpos": [12, 20],
                    },
                    {"im_name": "1001_train.jpg", "joint_self": [[1, 2, 3]]},
                ]
            }
        )
    )
    pieces = list(
        lip_index.split_sources(str(fixture.root), "train", str(json_path))
    )
    grouped = {}
    for image_id, source in pieces:
        grouped.setdefault(image_id, []).append(source)
    row = lip_index.join_sources("1000_train", grouped["1000_train"])
    bad = lip_index.join_sources("1001_train", grouped["1001_train"])
    assert (bad["stage"], bad["reason"]) == ("parse_pose", "field_count")
    image = fixture.layout.image_path("train", "1000_train").read_bytes()
    label = fixture.layout.label_path("train", "1000_train").read_bytes()
    sample = lip_examples.build_sample(row, image, label, CONFIG)
    np.testing.assert_allclose(sample["person_center"], [12, 20])
    # LIP joint 0 (right ankle) is model channel 10.
    assert (
        not sample["keypoints_present"][10]
        and sample["keypoints_present"].sum() == 15
    )


def test_person_centre_without_objpos():
    label = np.zeros((10, 8), np.uint8)
    label[2:5, 1:3] = 4  # box x 1..2, y 2..4
    keypoints = np.full((16, 2), np.nan, np.float32)
    present = np.zeros(16, bool)
    keypoints[0], present[0] = (6.0, 8.0), True  # extends the box to x 6, y 8
    keypoints[1], present[1] = (50.0, 1.0), True  # outside the image: ignored
    center, scale = lip_examples.person_center_and_scale(
        label, keypoints, present, 10, 8
    )
    np.testing.assert_allclose(center, [3.5, 5.0])
    assert scale == pytest.approx(7 / 200)
    center, scale = lip_examples.person_center_and_scale(
        None, keypoints, np.zeros(16, bool), 10, 8
    )
    np.testing.assert_allclose(center, [3.5, 4.5])
    assert scale == pytest.approx(10 / 200)
