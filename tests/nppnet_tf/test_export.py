"""Export for TF Serving on a tiny NPPNet (C = 8, 4 cells, S = 64, random
weights): layout and versions, core ops only, saved_model_cli, warmup
records, `serving_default` against the evaluation code's official path,
`dense_maps` against the model, bad requests, the wire formats."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.config import model_server_config_pb2

from nppnet_tf import export
from nppnet_tf.data.augment import normalize_image
from nppnet_tf.data.geometry import warp_image
from nppnet_tf.evaluation.loop import step_function
from nppnet_tf.evaluation.official import official_crop, parsing_to_original
from nppnet_tf.models.nppnet import NPPNet
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.serving import layout, protocol, rest
from nppnet_tf.serving import module as serving_module
from nppnet_tf.serving.ops import non_core_ops, saved_model_ops
from nppnet_tf.serving.reference import predict_official
from nppnet_tf.serving.samples import encode_photo, sample_photo

GENOTYPE = (
    Path(__file__).resolve().parents[2] / "configs/genotypes/nppnet_lip.json"
)
SIZE = 64


@pytest.fixture(scope="session")
def tiny_model():
    """The authors' genotype at C = 8, 4 cells, built at 64 x 64, random
    weights."""
    keras.utils.set_random_seed(0)
    model = NPPNet(Genotype.load(GENOTYPE), init_channels=8, num_cells=4)
    model(tf.zeros([1, SIZE, SIZE, 3]), training=False)
    return model


@pytest.fixture(scope="session")
def tiny_model_file(tiny_model, tmp_path_factory):
    """`tiny_model` as a .keras file."""
    path = tmp_path_factory.mktemp("tiny_model") / "model.keras"
    tiny_model.save(path)
    return path


@pytest.fixture(scope="session")
def exported(tiny_model, tiny_model_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("export_base")
    return export.export_model(
        tiny_model, base, SIZE, flip=True, source=tiny_model_file
    )


@pytest.fixture(scope="session")
def loaded(exported):
    return tf.saved_model.load(str(exported.version_dir), tags=["serve"])


@pytest.fixture(scope="session")
def odd_images():
    """A JPEG and a PNG of odd, different sizes (portrait and landscape)."""
    return [
        encode_photo(sample_photo(203, 149, seed=3), "jpeg"),
        encode_photo(sample_photo(131, 221, seed=4), "png"),
    ]


def _labels(png: bytes) -> np.ndarray:
    return tf.io.decode_png(png).numpy()[..., 0]


def test_export_layout_metadata_and_models_config(exported, tiny_model_file):
    base, version_dir = exported.export_base, exported.version_dir
    assert version_dir == base / "nppnet" / "1" and exported.version == 1
    for name in (
        "saved_model.pb",
        "variables/variables.index",
        "assets.extra/tf_serving_warmup_requests",
        "assets.extra/model.keras",
        "assets.extra/export_metadata.json",
    ):
        assert (version_dir / name).is_file(), name
    # Only the version directory: the staging directory was renamed.
    assert [p.name for p in (base / "nppnet").iterdir()] == ["1"]
    metadata = json.loads(
        (version_dir / "assets.extra/export_metadata.json").read_text()
    )
    assert metadata == exported.metadata
    assert metadata["image_size"] == SIZE and metadata["flip"] is True
    assert metadata["source"] == str(tiny_model_file.resolve())
    assert metadata["keras_model_sha256"] == export.file_sha256(tiny_model_file)
    assert metadata["genotype_fingerprint"] == (
        Genotype.load(GENOTYPE).fingerprint()
    )
    assert (metadata["init_channels"], metadata["num_cells"]) == (8, 4)
    assert metadata["signatures"]["serving_default"] == {
        "input": "image_bytes",
        "outputs": ["keypoints", "parsing_png_bytes", "image_size"],
    }
    for name, base_path in (
        ("models.config", str(base / "nppnet")),
        ("models.docker.config", "/models/nppnet"),
    ):
        config = text_format.Parse(
            (base / name).read_text(),
            model_server_config_pb2.ModelServerConfig(),
        )
        (model,) = config.model_config_list.config
        assert (model.name, model.base_path, model.model_platform) == (
            "nppnet",
            base_path,
            "tensorflow",
        )


def test_versions_never_overwrite_and_failures_leave_nothing(
    tiny_model, exported, tmp_path, monkeypatch
):
    model_dir = exported.export_base / "nppnet"
    assert layout.model_versions(model_dir) == [1]
    assert layout.next_version(model_dir) == 2
    with pytest.raises(FileExistsError, match="version 1 .* already exists"):
        export.export_model(tiny_model, exported.export_base, SIZE, version=1)
    for name in ("3", "10", "not-a-version", ".export-7-abc"):
        (tmp_path / "nppnet" / name).mkdir(parents=True)
    assert layout.model_versions(tmp_path / "nppnet") == [3, 10]
    assert layout.next_version(tmp_path / "nppnet") == 11
    assert layout.next_version(tmp_path / "missing") == 1

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export.export_model(tiny_model, tmp_path, SIZE)
    assert sorted(p.name for p in (tmp_path / "nppnet").iterdir()) == [
        ".export-7-abc",
        "10",
        "3",
        "not-a-version",
    ]
    with pytest.raises(ValueError, match="multiple of 32"):
        export.export_model(tiny_model, tmp_path, 100)
    with pytest.raises(ValueError, match="model name"):
        export.export_model(tiny_model, tmp_path, SIZE, model_name="a/b")


def test_find_version_dir_and_checkpoint_resolution(exported, tmp_path):
    base, version_dir = exported.export_base, exported.version_dir
    assert layout.find_version_dir(base) == version_dir
    assert layout.find_version_dir(base / "nppnet") == version_dir
    assert layout.find_version_dir(version_dir) == version_dir
    with pytest.raises(FileNotFoundError, match="version 5 not found"):
        layout.find_version_dir(base, version=5)
    with pytest.raises(FileNotFoundError, match="no SavedModel"):
        layout.find_version_dir(tmp_path)
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.keras"):
        export.resolve_checkpoint(tmp_path / "run")
    shutil.copyfile(
        version_dir / "assets.extra/model.keras", tmp_path / "run/model.keras"
    )
    assert export.resolve_checkpoint(tmp_path / "run") == (
        tmp_path / "run/model.keras"
    )
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"must be a \.keras"):
        export.resolve_checkpoint(tmp_path / "weights.h5")


def test_graph_uses_only_core_tensorflow_ops(exported, tmp_path):
    ops = saved_model_ops(exported.version_dir)
    assert {
        "DecodeImage",
        "ImageProjectiveTransformV3",
        "EncodePng",
        "Conv2D",
        "Assert",
    } <= ops
    assert non_core_ops(exported.version_dir) == []
    # The check sees ops inside library functions: a custom op there is
    # reported.
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString(
        (exported.version_dir / "saved_model.pb").read_bytes()
    )
    function = saved_model.meta_graphs[0].graph_def.library.function[0]
    function.node_def.add(name="custom", op="Addons>ImageConnectedComponents")
    (tmp_path / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    assert non_core_ops(tmp_path) == ["Addons>ImageConnectedComponents"]


def test_saved_model_cli_show_all(exported):
    cli = Path(sys.executable).parent / "saved_model_cli"
    result = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(exported.version_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for text in (
        "signature_def['serving_default']",
        "inputs['image_bytes']",
        "outputs['parsing_png_bytes']",
        "signature_def['dense_maps']",
        "shape: (-1, 64, 64, 3)",
    ):
        assert text in result.stdout


def test_warmup_records_parse_and_replay(exported, loaded):
    logs = protocol.read_warmup(
        exported.version_dir / "assets.extra/tf_serving_warmup_requests"
    )
    requests = [log.predict_log.request for log in logs]
    assert [
        (r.model_spec.name, r.model_spec.signature_name) for r in requests
    ] == [
        ("nppnet", "serving_default"),
        ("nppnet", "serving_default"),
        ("nppnet", "dense_maps"),
    ]
    for request in requests:
        inputs = protocol.request_inputs(request)
        outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
        batch = next(iter(inputs.values())).shape[0]
        assert {v.shape[0] for v in outputs.values()} == {batch}
    sizes = loaded.signatures["serving_default"](
        **protocol.request_inputs(requests[1])
    )["image_size"]
    assert sizes.numpy().tolist() == [[237, 181], [173, 251]]


def test_serving_default_equals_the_official_evaluation_path(
    loaded, tiny_model, odd_images
):
    served = loaded.signatures["serving_default"](
        image_bytes=tf.constant(odd_images)
    )
    reference = predict_official(tiny_model, odd_images, SIZE, flip=True)
    # The evaluation loop's own traced step on the same letterboxed batch.
    crops, matrices, sizes = [], [], []
    for data in odd_images:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        crop = official_crop(image.shape[0], image.shape[1], SIZE)
        crops.append(normalize_image(warp_image(image, crop["matrix"], SIZE)))
        matrices.append(crop["matrix"])
        sizes.append(image.shape[:2])
    padded = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    step = step_function(
        tiny_model, tf.distribute.get_strategy(), "official", (1.0,), True, True
    )
    evaluated = step(
        {
            "images": tf.stack(crops),
            "labels": tf.zeros([2, *padded], tf.uint8),
            "height": tf.constant([s[0] for s in sizes]),
            "width": tf.constant([s[1] for s in sizes]),
            "crop_matrix": tf.stack(matrices),
            "keypoints": tf.zeros([2, 16, 2]),
            "keypoints_present": tf.zeros([2, 16], tf.bool),
            "image_id": tf.constant(["a", "b"]),
            "valid": tf.constant([True, True]),
        }
    )
    for index, (height, width) in enumerate(sizes):
        keypoints = served["keypoints"][index].numpy()
        labels = _labels(served["parsing_png_bytes"][index].numpy())
        assert served["image_size"][index].numpy().tolist() == [height, width]
        assert labels.shape == (height, width)
        np.testing.assert_allclose(
            keypoints[:, :2], reference[index]["keypoints"][:, :2], atol=1e-3
        )
        np.testing.assert_allclose(
            keypoints[:, 2], reference[index]["keypoints"][:, 2], atol=1e-5
        )
        np.testing.assert_array_equal(labels, reference[index]["labels"])
        np.testing.assert_allclose(
            keypoints[:, :2], evaluated["keypoints"][index].numpy(), atol=1e-3
        )
        step_labels = evaluated["parsing"][index, :height, :width].numpy()
        assert np.mean(labels == step_labels) >= 0.999
        assert len(np.unique(labels)) > 1  # a real map, not a constant


@pytest.mark.slow
def test_flip_changes_the_prediction(tiny_model, odd_images):
    """Without the flip test the graph gives the model's plain prediction,
    so the exported flag matters."""
    plain = serving_module.ServingModule(tiny_model, SIZE, flip=False)
    served = plain.serve_images(tf.constant(odd_images[:1]))
    reference = predict_official(tiny_model, odd_images[:1], SIZE, flip=False)
    flipped = predict_official(tiny_model, odd_images[:1], SIZE, flip=True)
    np.testing.assert_allclose(
        served["keypoints"][0].numpy(), reference[0]["keypoints"], atol=1e-3
    )
    assert not np.allclose(
        reference[0]["keypoints"][:, 2], flipped[0]["keypoints"][:, 2]
    )


def test_dense_maps_equal_the_model(loaded, tiny_model):
    images = tf.random.stateless_normal([2, SIZE, SIZE, 3], seed=(1, 2))
    served = loaded.signatures["dense_maps"](images=images)
    expected = tiny_model(images, training=False)
    assert set(served) == {"pose", "parsing"}
    for key in ("pose", "parsing"):
        assert served[key].shape == expected[key].shape
        np.testing.assert_allclose(
            served[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([b"not an image at all"], "element] [0] [is not a JPEG, PNG"),
        (["jpeg", b""], "element] [1] [is an empty string"),
        ([], "is an empty batch"),
        ([b"\x89PNG\r\n\x1a\n truncated"], "PNG"),
    ],
)
def test_bad_requests_raise_invalid_argument(
    loaded, odd_images, batch, message
):
    serve = loaded.signatures["serving_default"]
    images = [odd_images[0] if item == "jpeg" else item for item in batch]
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        serve(image_bytes=tf.constant(images, tf.string))
    assert message in serving_module.error_message(caught.value)
    # Still serving afterwards.
    assert serve(image_bytes=tf.constant(odd_images[:1]))[
        "keypoints"
    ].shape == (
        1,
        16,
        3,
    )


def test_large_images_are_resampled_in_bands(monkeypatch):
    """Banded resampling of the logits gives the labels of one full warp."""
    logits = tf.random.stateless_normal([SIZE, SIZE, 20], seed=(3, 4))
    crop = official_crop(301, 203, SIZE)
    size = tf.constant([301, 203])
    whole = parsing_to_original(
        logits[tf.newaxis], crop["matrix"][tf.newaxis], size
    )[0].numpy()
    single = serving_module.labels_at_original(logits, crop["matrix"], size)
    np.testing.assert_array_equal(single.numpy(), whole)
    monkeypatch.setattr(serving_module, "PIXELS_PER_BAND", 203 * 7)
    banded = serving_module.labels_at_original(logits, crop["matrix"], size)
    assert banded.shape == (301, 203)
    assert np.mean(banded.numpy() == whole) >= 0.999


def test_rest_request_round_trip_and_server_rules(odd_images):
    dtypes = {
        "serving_default": {"image_bytes": tf.string},
        "dense_maps": {"images": tf.float32},
    }
    for request_format in (rest.ROW, rest.COLUMNAR):
        body = rest.rest_request(
            {"image_bytes": odd_images}, "serving_default", request_format
        )
        name, inputs, found = rest.parse_rest_request(body, dtypes)
        assert (name, found) == ("serving_default", request_format)
        assert inputs["image_bytes"].numpy().tolist() == odd_images
    body = json.loads(rest.rest_request({"image_bytes": odd_images[:1]}))
    assert set(body["instances"][0]["image_bytes"]) == {"b64"}
    plain_rows = json.dumps(
        {"instances": [body["instances"][0]["image_bytes"]]}
    )
    assert rest.parse_rest_request(plain_rows, dtypes)[1][
        "image_bytes"
    ].shape == (1,)
    for bad, match in (
        ("not json", "JSON parse error"),
        ('{"instances": []}', "no values"),
        ('{"inputs": [], "instances": []}', "exactly one"),
        ('{"instances": [{"b64": "@@@"}]}', "base64"),
        ('{"signature_name": "other", "instances": [1]}', "not found"),
        ('{"instances": [{"image": {"b64": ""}}]}', "must be the inputs"),
    ):
        with pytest.raises(rest.RestRequestError, match=match):
            rest.parse_rest_request(bad, dtypes)
    # Empty columnar inputs reach the model (which rejects them itself).
    assert rest.parse_rest_request('{"inputs": []}', dtypes)[1][
        "image_bytes"
    ].shape == (0,)
    outputs = {
        "keypoints": np.zeros((1, 16, 3), np.float32),
        "parsing_png_bytes": np.array([b"\x89PNG\xff"], object),
    }
    reply = rest.parse_rest_response(rest.rest_response(outputs))
    assert reply["parsing_png_bytes"] == [b"\x89PNG\xff"]
    # Binary strings under a name without `_bytes` break the server's JSON.
    with pytest.raises(ValueError, match="_bytes"):
        rest.rest_response({"parsing_png": np.array([b"\x89PNG\xff"], object)})
