"""`nppnet export`, `serve-check`, `predict` and `bench serve` end to end on
a tiny NPPNet (C = 8, 4 cells, S = 64, random weights)."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from nppnet_tf.models.nppnet import NPPNet
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.serving.samples import encode_photo, sample_photo
from pipeline.cli import main
from pipeline.commands.predict import _downloaded_model

GENOTYPE = (
    Path(__file__).resolve().parents[2] / "configs/genotypes/nppnet_lip.json"
)
SIZE = 64


def _save_tiny_model(path: Path, seed: int) -> Path:
    keras.utils.set_random_seed(seed)
    model = NPPNet(Genotype.load(GENOTYPE), init_channels=8, num_cells=4)
    model(tf.zeros([1, SIZE, SIZE, 3]), training=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A training run's output directory: `model.keras` (seed 0)."""
    root = tmp_path_factory.mktemp("train_run")
    _save_tiny_model(root / "model.keras", seed=0)
    return root


@pytest.fixture(scope="session")
def export_base(run_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_export") / "export"
    assert (
        main(["export", "--checkpoint", str(run_dir), "--out", str(base)]) == 0
    )
    return base


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Two good photos of odd sizes (JPEG, PNG) and one broken file."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "person_a.jpg").write_bytes(
        encode_photo(sample_photo(211, 157, seed=5), "jpeg")
    )
    (folder / "person_b.png").write_bytes(
        encode_photo(sample_photo(149, 233, seed=6), "png")
    )
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


def test_export_command_writes_a_version_and_never_overwrites(
    export_base, run_dir, caplog
):
    version_dir = export_base / "nppnet" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (export_base / "models.config").is_file()
    metadata = json.loads(
        (version_dir / "assets.extra/export_metadata.json").read_text()
    )
    assert metadata["image_size"] == SIZE  # from the model's build shape
    assert metadata["source"] == str((run_dir / "model.keras").resolve())
    code = main(
        [
            "export",
            "--checkpoint",
            str(run_dir / "model.keras"),
            "--out",
            str(export_base),
            "--version",
            "1",
        ]
    )
    assert code == 2
    assert "already exists" in caplog.text
    assert sorted(p.name for p in (export_base / "nppnet").iterdir()) == ["1"]


def test_serve_check_passes_on_a_good_export(export_base, tmp_path, capsys):
    report_path = tmp_path / "check.json"
    code = main(["serve-check", str(export_base), "--json", str(report_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    names = [check["name"] for check in report["checks"]]
    for name in (
        "core ops only",
        "warmup replay",
        "gRPC PredictRequest vs Keras",
        "REST row (instances, b64) vs Keras",
        "REST columnar (inputs, b64)",
        "dense_maps vs model(images)",
        "bad requests rejected",
    ):
        assert name in names
    assert "10/10 checks passed" in out


def test_serve_check_fails_when_the_stored_model_differs(
    export_base, tmp_path, capsys
):
    """An export whose stored Keras model has other weights than the
    SavedModel: the fingerprint and every comparison fail, exit 1."""
    copy = tmp_path / "export"
    shutil.copytree(export_base, copy)
    _save_tiny_model(copy / "nppnet/1/assets.extra/model.keras", seed=1)
    report_path = tmp_path / "check.json"
    code = main(["serve-check", str(copy), "--json", str(report_path)])
    out = capsys.readouterr().out
    assert code == 1
    checks = {
        check["name"]: check
        for check in json.loads(report_path.read_text())["checks"]
    }
    for name in (
        "stored model sha256",
        "gRPC PredictRequest vs Keras",
        "REST row (instances, b64) vs Keras",
        "dense_maps vs model(images)",
    ):
        assert checks[name]["passed"] is False, name
    assert "MISMATCH" in checks["gRPC PredictRequest vs Keras"]["detail"]
    for name in (
        "layout",
        "core ops only",
        "warmup replay",
        "bad requests rejected",
    ):
        assert checks[name]["passed"] is True, name
    assert "FAILED" in out


def _outputs(folder: Path, stem: str):
    labels = np.asarray(Image.open(folder / f"{stem}_parsing.png"))
    keypoints = json.loads((folder / f"{stem}_keypoints.json").read_text())
    overlay = Image.open(folder / f"{stem}_overlay.png")
    return labels, keypoints, overlay


def test_predict_from_keras_model_and_export_agree(
    run_dir, export_base, images, tmp_path, capsys
):
    outputs = {}
    for kind, model in (
        ("keras", run_dir / "model.keras"),
        ("saved_model", export_base),
    ):
        out = tmp_path / kind
        code = main(
            [
                "predict",
                str(images),
                "--model",
                str(model),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        printed = capsys.readouterr().out
        assert code == 1  # the broken file
        assert "predicted 2/3 images" in printed
        assert "FAILED" in printed and "broken.jpg" in printed
        assert sorted(p.name for p in out.iterdir()) == sorted(
            f"{stem}{suffix}"
            for stem in ("person_a", "person_b")
            for suffix in ("_parsing.png", "_keypoints.json", "_overlay.png")
        )
        outputs[kind] = out
    for stem, size in (("person_a", (211, 157)), ("person_b", (149, 233))):
        labels, keypoints, overlay = _outputs(outputs["keras"], stem)
        labels_sm, keypoints_sm, _ = _outputs(outputs["saved_model"], stem)
        assert labels.shape == size and overlay.size == (size[1], size[0])
        assert labels.dtype == np.uint8 and labels.max() < 20
        np.testing.assert_array_equal(labels, labels_sm)
        assert keypoints["image_size"] == list(size)
        model_order = [j["name"] for j in keypoints["keypoints"]]
        lip_order = [j["name"] for j in keypoints["keypoints_lip"]]
        assert model_order[:2] == ["head_top", "upper_neck"]
        assert lip_order[:2] == ["right_ankle", "right_knee"]
        by_name = {j["name"]: j for j in keypoints["keypoints"]}
        for joint in keypoints["keypoints_lip"]:
            assert joint == by_name[joint["name"]]
        for joint, joint_sm in zip(
            keypoints["keypoints"], keypoints_sm["keypoints"]
        ):
            assert abs(joint["x"] - joint_sm["x"]) <= 1e-3
            assert abs(joint["y"] - joint_sm["y"]) <= 1e-3
            assert abs(joint["score"] - joint_sm["score"]) <= 1e-5


def test_predict_input_errors_fail_early(export_base, images, tmp_path, caplog):
    out = str(tmp_path / "out")
    missing = [
        "predict",
        str(tmp_path / "nope.jpg"),
        "--model",
        str(export_base),
    ]
    assert main([*missing, "--out", out]) == 2
    assert "does not exist" in caplog.text
    twins = tmp_path / "twins"
    twins.mkdir()
    shutil.copyfile(images / "person_a.jpg", twins / "person_a.jpeg")
    args = [str(images / "person_a.jpg"), str(twins / "person_a.jpeg")]
    assert (
        main(["predict", *args, "--model", str(export_base), "--out", out]) == 2
    )
    assert "share the stem" in caplog.text
    built_in = [
        "predict",
        str(images / "person_a.jpg"),
        "--model",
        str(export_base),
        "--out",
        out,
        "--image-size",
        "128",
    ]
    assert main(built_in) == 2
    assert "built in" in caplog.text
    assert not Path(out).exists()


def test_downloaded_mlflow_layouts(tmp_path):
    """A registered version holds `saved_model/` and an mlflow.keras model:
    the SavedModel is preferred; a Keras-only artifact falls back."""
    both = tmp_path / "both"
    (both / "saved_model").mkdir(parents=True)
    (both / "saved_model/saved_model.pb").write_bytes(b"")
    (both / "data").mkdir()
    (both / "data/model.keras").write_bytes(b"")
    assert _downloaded_model(both, "models:/x@champion") == both / "saved_model"
    keras_only = tmp_path / "keras_only"
    (keras_only / "data").mkdir(parents=True)
    (keras_only / "data/model.keras").write_bytes(b"")
    assert _downloaded_model(keras_only, "runs:/1/model") == (
        keras_only / "data/model.keras"
    )
    (tmp_path / "empty/MLmodel").parent.mkdir()
    (tmp_path / "empty/MLmodel").write_text("")
    with pytest.raises(FileNotFoundError, match="neither saved_model"):
        _downloaded_model(tmp_path / "empty", "models:/x/1")


@pytest.mark.slow
def test_bench_serve_on_an_export(export_base, tmp_path, capsys):
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--export", str(export_base), "--out", str(out)]
    args += ["--repeats", "2", "--warmup", "1", "--batch-sizes", "1", "2"]
    args += ["--min-side", "90", "--max-side", "120"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["requests"] == 2
        assert 0 < row["p50_ms_per_request"] <= row["p95_ms_per_request"]
        assert row["p50_ms_per_image"] == pytest.approx(
            row["p50_ms_per_request"] / row["batch"]
        )
    assert report["model"]["image_size"] == SIZE
    assert len(report["environment"]["load_average_before"]) == 3
    assert "| batch |" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_from_an_mlflow_registered_model(
    run_dir, export_base, images, tmp_path, capsys
):
    """`models:/<name>@candidate` of a version registered by
    `pipeline.registry` (mlflow.keras model with the export under
    `saved_model/`), through a local sqlite store."""
    from nppnet_tf.config import (
        RegistryConfig,
        RunConfig,
        RunSection,
        TrackingConfig,
    )
    from pipeline.registry import register_model
    from pipeline.tracking import Tracker

    store = f"sqlite:///{tmp_path}/mlflow.db"
    config = RunConfig(
        run=RunSection(work_dir=str(tmp_path / "work")),
        tracking=TrackingConfig(uri=store),
        registry=RegistryConfig(model_name="nppnet-test"),
    )
    with Tracker(config).run("register") as logger:
        register_model(
            logger,
            run_dir / "model.keras",
            export_base / "nppnet" / "1",
            GENOTYPE,
            {"val_miou": 1.0, "val_pckh": 1.0},
            config=config,
        )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"run: {{work_dir: {tmp_path / 'work'}}}\ntracking: {{uri: '{store}'}}\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(images / "person_a.jpg"),
            "--model",
            "models:/nppnet-test@candidate",
            "--config",
            str(config_file),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().out
    direct = tmp_path / "direct"
    assert (
        main(
            [
                "predict",
                str(images / "person_a.jpg"),
                "--model",
                str(export_base),
                "--out",
                str(direct),
                "--no-progress",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "person_a_parsing.png")),
        np.asarray(Image.open(direct / "person_a_parsing.png")),
    )
