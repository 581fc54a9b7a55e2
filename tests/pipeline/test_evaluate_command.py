"""`nppnet evaluate` end to end: synthetic LIP -> records (Beam job) -> a
saved tiny Keras model -> report.json, report.md, report.html, overlays and
LIP prediction files that `nppnet evaluate-predictions` scores the same."""

import json
import logging
from pathlib import Path

import keras
import pytest
from PIL import Image

from nppnet_tf.config import DataConfig
from pipeline.cli import main

NUM_VAL = 4


@pytest.fixture(scope="module")
def lip(tmp_path_factory):
    from beam_jobs.lip_to_tfrecord import preprocess
    from nppnet_tf.data.synthetic import write_synthetic_lip

    root = tmp_path_factory.mktemp("evaluate_command")
    write_synthetic_lip(
        root / "lip", 2, NUM_VAL, seed=11, min_size=96, max_size=144,
        progress=False,
    )  # fmt: skip
    config = DataConfig(
        image_size=64, heatmap_stride=4, sigma=4.0, aux_sigma=8.0, shards=1
    )
    preprocess(str(root / "lip"), str(root / "records"), config, progress=False)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(
        8, 3, strides=4, padding="same", activation="relu"
    )(inputs)
    model = keras.Model(
        inputs,
        {
            "parsing": keras.layers.Conv2D(20, 1)(features),
            "pose": keras.layers.Conv2D(16, 1)(features),
        },
    )
    model.save(root / "model.keras")
    return root


def _ids(lip_root: Path) -> list[str]:
    text = (lip_root / "TrainVal_images" / "val_id.txt").read_text()
    return sorted(text.split())


def test_official_report_overlays_and_prediction_files(lip, tmp_path, capsys):
    report_dir = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--model", str(lip / "model.keras"),
            "--records", str(lip / "records"),
            "--split", "val",
            "--scales", "1.0", "0.5",
            "--report-dir", str(report_dir),
            "--overlays", "3",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["model"] == str(lip / "model.keras")
    assert report["protocol"] == "official"
    assert report["resolution"] == "original"
    assert report["scales"] == [1.0, 0.5] and report["scale_sizes"] == [64, 32]
    assert report["flip"] is True and report["images"] == NUM_VAL
    assert report["lip_root"] == str(lip / "lip")
    assert 0.0 <= report["parsing"]["mean_iou"] <= 100.0
    assert len(report["parsing"]["per_class_iou"]) == 20
    assert set(report["pose"]["groups"]) >= {"head", "ankle"}
    assert "mIoU" in capsys.readouterr().out

    markdown = (report_dir / "report.md").read_text()
    assert "mIoU (all 20 classes; selection value)" in markdown
    assert (
        (report_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    )
    overlays = sorted((report_dir / "overlays").glob("*.png"))
    assert [path.stem for path in overlays] == _ids(lip / "lip")[:3]
    assert all(f"overlays/{path.name}" in markdown for path in overlays)
    photo_path = lip / "lip" / "TrainVal_images" / "val_images"
    with Image.open(photo_path / f"{overlays[0].stem}.jpg") as photo:
        photo_size = photo.size
    with Image.open(overlays[0]) as image:  # ground truth | prediction
        assert image.size == (2 * photo_size[0] + 4, photo_size[1])

    predictions = report_dir / "predictions"
    assert len(list((predictions / "parsing").glob("*.png"))) == NUM_VAL
    rescored = tmp_path / "rescored.json"
    code = main(
        [
            "evaluate-predictions",
            "--lip-root", str(lip / "lip"),
            "--split", "val",
            "--parsing-dir", str(predictions / "parsing"),
            "--pose-csv", str(predictions / "pose.csv"),
            "--out", str(rescored),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    files = json.loads(rescored.read_text())
    assert files["parsing"]["mean_iou"] == report["parsing"]["mean_iou"]
    assert files["pose"]["average"] == report["pose"]["average"]


def test_crop_protocol_with_config(lip, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {image_size: 64, heatmap_stride: 4, sigma: 4.0, "
        "aux_sigma: 8.0, shards: 4}\n"
    )
    out = tmp_path / "crop.json"
    code = main(
        [
            "evaluate",
            "--model", str(lip / "model.keras"),
            "--records", str(lip / "records"),
            "--protocol", "crop",
            "--no-flip",
            "--max-examples", "3",
            "--batch-size", "2",
            "--out", str(out),
            "--config", str(config),
            "--set", "data.shards=1",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "crop" and report["resolution"] == "crop 64x64"
    assert report["images"] == 3 and report["max_examples"] == 3
    assert report["flip"] is False
    assert "prediction_dir" not in report


def test_errors_name_the_path(lip, tmp_path, caplog):
    base = ["evaluate", "--records", str(lip / "records"), "--no-progress"]
    missing = tmp_path / "nowhere.keras"
    with caplog.at_level(logging.ERROR):
        code = main(base + ["--model", str(missing), "--out", "r.json"])
    assert code == 2 and str(missing) in caplog.text

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(
            base
            + ["--model", str(lip / "model.keras"), "--split", "test"]
            + ["--out", str(tmp_path / "r.json")]
        )
    assert code == 2
    assert "'test'" in caplog.text and str(lip / "records") in caplog.text

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(base + ["--model", str(lip / "model.keras")])
    assert code == 2 and "--out" in caplog.text
