"""The tf.data pipeline: shapes and dtypes, evaluation crops, determinism,
epochs, errors, counting, the paired search stream and MirroredStrategy."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.config import AugmentConfig, DataConfig
from nppnet_tf.data import augment, dataset, geometry, records

AUGMENT = AugmentConfig(max_offset=7)


def make(lip_records, split="train", training=True, **kwargs):
    kwargs.setdefault("augment_config", AUGMENT)
    return dataset.make_dataset(
        lip_records.records_dir,
        split,
        lip_records.data_config,
        kwargs.pop("batch_size", 4),
        training,
        **kwargs,
    )


def as_numpy(data):
    return [tf.nest.map_structure(lambda t: t.numpy(), e) for e in data]


def assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        tf.nest.map_structure(np.testing.assert_array_equal, a, b)


def image_ids(elements):
    return [i.decode() for e in elements for i in e[2]["image_id"]]


@pytest.mark.parametrize("training", [True, False])
def test_shapes_and_dtypes_of_every_key(lip_records, training):
    data = make(lip_records, training=training, include_metadata=True, seed=0)
    images, targets, metadata = next(iter(data))
    assert images.shape == (4, 64, 64, 3) and images.dtype == tf.float32
    assert set(targets) == set(dataset.TARGET_KEYS)
    expected = {
        "heatmaps": ((4, 16, 16, 16), tf.float32),
        "heatmaps_aux": ((4, 16, 16, 16), tf.float32),
        "parsing": ((4, 64, 64), tf.int32),
        "edge": ((4, 64, 64), tf.int32),
    }
    for key, (shape, dtype) in expected.items():
        assert targets[key].shape == shape and targets[key].dtype == dtype, key
    assert set(metadata) == set(dataset.METADATA_KEYS)
    meta_expected = {
        "image_id": ((4,), tf.string),
        "height": ((4,), tf.int32),
        "width": ((4,), tf.int32),
        "crop_matrix": ((4, 3, 3), tf.float32),
        "crop_params": ((4, 8), tf.int32),
        "crop_scale": ((4,), tf.float32),
        "keypoints": ((4, 16, 2), tf.float32),
        "keypoints_present": ((4, 16), tf.bool),
    }
    for key, (shape, dtype) in meta_expected.items():
        assert metadata[key].shape == shape, key
        assert metadata[key].dtype == dtype, key
    parsing = targets["parsing"].numpy()
    assert set(np.unique(parsing)) <= set(range(20)) | {255}
    assert set(np.unique(targets["edge"].numpy())) <= {0, 1, 255}
    # Static shapes, for a traced train step (batch size too when the
    # remainder is dropped, the training default).
    batch = 4 if training else None
    spec = data.element_spec
    assert spec[0].shape.as_list() == [batch, 64, 64, 3]
    assert spec[1]["heatmaps"].shape.as_list() == [batch, 16, 16, 16]
    assert spec[1]["parsing"].shape.as_list() == [batch, 64, 64]


def test_evaluation_batches_are_the_stored_canonical_crops(lip_records):
    data = make(
        lip_records, "val", training=False, include_metadata=True, seed=0
    )
    serialized = tf.data.TFRecordDataset(
        dataset.split_files(lip_records.records_dir, "val"),
        compression_type="GZIP",
    )
    stored = {
        d["image_id"].numpy(): d
        for d in (records.decode_example(s, 64) for s in serialized)
    }
    seen = 0
    for images, targets, metadata in data:
        for row, image_id in enumerate(metadata["image_id"].numpy()):
            decoded = stored[image_id]
            crop = geometry.warp_image(
                decoded["image"], decoded["crop_matrix"], 64
            )
            np.testing.assert_allclose(
                images[row].numpy(),
                augment.normalize_image(crop).numpy(),
                atol=1e-6,
            )
            np.testing.assert_array_equal(
                targets["parsing"][row].numpy(), decoded["crop_label"].numpy()
            )
            np.testing.assert_array_equal(
                targets["heatmaps"][row].numpy(),
                decoded["crop_heatmaps"].numpy(),
            )
            np.testing.assert_array_equal(
                metadata["crop_matrix"][row].numpy(),
                decoded["crop_matrix"].numpy(),
            )
            np.testing.assert_array_equal(
                metadata["keypoints"][row].numpy(),
                decoded["keypoints"].numpy(),
            )
            seen += 1
    assert seen == len(stored) == 4


def test_training_metadata_matrix_maps_original_joints(lip_records):
    data = make(lip_records, include_metadata=True, seed=3)
    for _, targets, metadata in data:
        matrices = metadata["crop_matrix"].numpy()
        assert not np.allclose(matrices[0], matrices[1])
        for row in range(4):
            present = metadata["keypoints_present"][row].numpy()
            # Without a flip, channel k of the heatmaps belongs to joint k.
            if np.linalg.det(matrices[row][:2, :2]) < 0:
                continue
            points = geometry.transform_points(
                metadata["keypoints"][row], matrices[row]
            ).numpy()
            heatmaps = targets["heatmaps"][row].numpy()
            for joint in np.nonzero(present)[0]:
                x, y = points[joint]
                if 2 <= x <= 61 and 2 <= y <= 61:
                    cell = heatmaps[int(y) // 4, int(x) // 4, joint]
                    assert cell > 0.3, (joint, x, y)


def test_same_seed_same_batches_other_seed_differs(lip_records):
    first = as_numpy(make(lip_records, seed=11, deterministic=True))
    again = as_numpy(make(lip_records, seed=11, deterministic=True))
    other = as_numpy(make(lip_records, seed=12, deterministic=True))
    assert len(first) == 2
    assert_same(first, again)
    assert not np.allclose(first[0][0], other[0][0])


def test_every_epoch_is_reshuffled_and_reaugmented(lip_records):
    """Repeating, and re-iterating a one-epoch dataset (as Keras does every
    epoch), give new augmentations; each epoch holds every example once."""
    repeated = as_numpy(
        make(
            lip_records,
            seed=5,
            deterministic=True,
            repeat=True,
            include_metadata=True,
        ).take(6)
    )
    ids = image_ids(repeated)
    for epoch in range(3):
        assert sorted(ids[8 * epoch : 8 * epoch + 8]) == sorted(set(ids))
    assert len(set(ids)) == 8
    assert ids[:8] != ids[8:16]
    crops = [{}, {}, {}]  # per epoch: image id -> crop
    for step, (images, _, metadata) in enumerate(repeated):
        for row, image_id in enumerate(metadata["image_id"]):
            crops[step // 2][image_id] = images[row]
    for image_id in crops[0]:
        assert not np.allclose(crops[0][image_id], crops[1][image_id])
        assert not np.allclose(crops[1][image_id], crops[2][image_id])

    one_epoch = make(lip_records, seed=5, deterministic=True)
    first_pass, second_pass = as_numpy(one_epoch), as_numpy(one_epoch)
    assert not np.allclose(first_pass[0][0], second_pass[0][0])
    # ... and a second pipeline with the same seed repeats both passes.
    twin = make(lip_records, seed=5, deterministic=True)
    assert_same(first_pass, as_numpy(twin))
    assert_same(second_pass, as_numpy(twin))


def test_records_are_shuffled_across_shards(lip_records):
    """Shuffling only the 2 shard names would allow 2 orders; the record
    shuffle gives many."""
    orders = {
        tuple(
            image_ids(
                as_numpy(
                    make(
                        lip_records,
                        seed=seed,
                        deterministic=True,
                        include_metadata=True,
                    )
                )
            )
        )
        for seed in range(6)
    }
    assert len(orders) > 3


def test_augmentation_does_not_depend_on_order(lip_records):
    """An example's augmentation is keyed by its image id, not its position:
    without deterministic ordering the same seed gives the same crops."""

    def by_id(data):
        out = {}
        for images, _, metadata in data:
            for row, image_id in enumerate(metadata["image_id"].numpy()):
                out[image_id] = images[row].numpy()
        return out

    ordered = by_id(make(lip_records, seed=2, include_metadata=True))
    reordered = by_id(
        make(
            lip_records,
            seed=2,
            include_metadata=True,
            shuffle_buffer=1,
            batch_size=1,
        )
    )
    assert ordered.keys() == reordered.keys()
    for image_id in ordered:
        np.testing.assert_array_equal(ordered[image_id], reordered[image_id])


def test_evaluation_without_remainder_drop_and_with_repeat(lip_records):
    data = make(lip_records, "val", training=False, batch_size=3)
    assert [len(images) for images, _ in data] == [3, 1]
    assert data.cardinality() == 2  # from the manifest's count
    assert make(lip_records, batch_size=3, seed=0).cardinality() == 2
    repeated = make(
        lip_records, "val", training=False, batch_size=3, repeat=True
    )
    assert sum(len(images) for images, _ in repeated.take(4)) == 12


def test_errors_name_what_is_wrong(lip_records, tmp_path):
    with pytest.raises(
        FileNotFoundError, match="split 'nope' in records directory"
    ):
        make(lip_records, "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        dataset.make_dataset(
            str(tmp_path), "train", lip_records.data_config, 4, True
        )
    with pytest.raises(ValueError, match="sigma = 7.0.*sigma = 4.0"):
        dataset.make_dataset(
            lip_records.records_dir,
            "train",
            DataConfig(image_size=64, sigma=7.0, aux_sigma=8.0),
            4,
            True,
        )
    with pytest.raises(ValueError, match="needs a seed"):
        make(lip_records, deterministic=True)
    with pytest.raises(ValueError, match="batch_size"):
        make(lip_records, batch_size=0)
    with pytest.raises(TypeError, match="AugmentConfig"):
        make(lip_records, augment_config=lip_records.data_config)


def test_count_examples_from_manifest_and_by_counting(lip_records, tmp_path):
    assert dataset.count_examples(lip_records.records_dir, "train") == 8
    assert dataset.count_examples(lip_records.records_dir, "val") == 4
    copy = tmp_path / "records"
    shutil.copytree(lip_records.records_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["counts"]["val"] = 999  # proves which source is read
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert dataset.count_examples(str(copy), "val") == 999
    # The pipeline trusts the count for its length, and fails loudly when
    # the shards disagree.
    wrong = dataset.make_dataset(
        str(copy), "val", lip_records.data_config, 1, False
    )
    assert wrong.cardinality() == 999
    with pytest.raises(tf.errors.FailedPreconditionError, match="999"):
        for _ in wrong:
            pass
    (copy / "manifest.json").unlink()
    assert dataset.count_examples(str(copy), "val") == 4
    assert (
        dataset.count_examples(str(copy), "search_weights")
        == (lip_records.counts["search_weights"])
    )
    with pytest.raises(FileNotFoundError, match="'test'"):
        dataset.count_examples(str(copy), "test")


def test_paired_search_dataset(lip_records):
    counts = lip_records.counts
    weights_ids = set(
        image_ids(
            as_numpy(
                make(
                    lip_records,
                    "search_weights",
                    include_metadata=True,
                    seed=0,
                    drop_remainder=False,
                )
            )
        )
    )
    assert len(weights_ids) == counts["search_weights"]
    batch = 2
    paired = dataset.paired_search_dataset(
        lip_records.records_dir,
        lip_records.data_config,
        batch,
        augment_config=AUGMENT,
        seed=1,
        deterministic=True,
    )
    steps = list(paired)
    shorter = min(counts["search_weights"], counts["search_arch"])
    assert len(steps) == -(-shorter // batch)  # ceil: partial batches kept
    assert paired.cardinality() == len(steps)
    (x_w, y_w), (x_a, y_a) = steps[0]
    assert x_w.shape == x_a.shape == (batch, 64, 64, 3)
    assert set(y_w) == set(y_a) == set(dataset.TARGET_KEYS)
    assert not np.allclose(x_w.numpy(), x_a.numpy())
    again = dataset.paired_search_dataset(
        lip_records.records_dir,
        lip_records.data_config,
        batch,
        augment_config=AUGMENT,
        seed=1,
        deterministic=True,
    )
    assert_same(as_numpy(steps), as_numpy(again))


def test_distribute_splits_global_batches_over_two_replicas(
    lip_records, make_mirrored_strategy
):
    strategy = make_mirrored_strategy(["/cpu:0", "/cpu:1"])
    data = make(
        lip_records,
        include_metadata=True,
        seed=0,
        drop_remainder=False,
        batch_size=4,
    )
    distributed = dataset.distribute(data, strategy)
    seen = []
    for images, targets, metadata in distributed:
        local_images = strategy.experimental_local_results(images)
        local_parsing = strategy.experimental_local_results(targets["parsing"])
        local_ids = strategy.experimental_local_results(metadata["image_id"])
        assert len(local_images) == 2
        assert [x.shape[0] for x in local_images] == [2, 2]
        assert [x.shape for x in local_parsing] == [(2, 64, 64)] * 2
        assert local_images[1].device.endswith("CPU:1")
        seen += [i.decode() for ids in local_ids for i in ids.numpy()]
    assert len(seen) == 8 and len(set(seen)) == 8

    with pytest.raises(ValueError, match="3 is not a multiple of the 2"):
        dataset.distribute(make(lip_records, batch_size=3, seed=0), strategy)
