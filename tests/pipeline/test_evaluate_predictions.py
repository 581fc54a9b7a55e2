"""`nppnet evaluate-predictions` end to end on a tiny LIP release folder
(real validation ids and pose rows, synthetic photos and labels)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nppnet_tf.data.lip_files import (
    LIPLayout,
    format_prediction_row,
    read_pose_csv,
)
from pipeline.cli import main

POSE_ROWS = (
    Path(__file__).parents[1]
    / "nppnet_tf"
    / "metrics"
    / "fixtures"
    / "lip_val_pose_rows.csv"
)
IDS = ("10014_1211482", "10024_490664", "100034_483681")  # not in sorted order


@pytest.fixture
def lip_root(tmp_path):
    layout = LIPLayout(tmp_path / "LIP")
    for directory in (layout.image_dir("val"), layout.label_dir("val")):
        directory.mkdir(parents=True)
    layout.pose_csv("val").parent.mkdir(parents=True)
    rows = {
        line.split(",")[0][:-4]: line
        for line in POSE_ROWS.read_text().splitlines()
    }
    layout.pose_csv("val").write_text("\n".join(rows[i] for i in IDS))
    layout.id_file("val").write_text("\n".join(IDS) + "\n")
    rng = np.random.default_rng(0)
    for image_id in IDS:
        photo = rng.integers(0, 255, size=(480, 240, 3), dtype=np.uint8)
        Image.fromarray(photo).save(layout.image_path("val", image_id))
        labels = (np.arange(480)[:, None] * 20 // 480).repeat(240, axis=1)
        Image.fromarray(labels.astype(np.uint8)).save(
            layout.label_path("val", image_id)
        )
    return layout.root


def _predictions(lip_root, tmp_path):
    layout = LIPLayout(lip_root)
    parsing = tmp_path / "predictions"
    parsing.mkdir()
    for image_id in IDS[:2]:  # the third image has no parsing prediction
        labels = np.asarray(Image.open(layout.label_path("val", image_id)))
        Image.fromarray(labels).save(parsing / f"{image_id}.png")
    truth = read_pose_csv(layout.pose_csv("val"))
    rows = [
        format_prediction_row(i, truth[i].joints) for i in reversed(IDS[1:])
    ]
    csv = tmp_path / "pose.csv"
    csv.write_text("\n".join(rows))  # no row for the first image
    return parsing, csv


def test_cli_writes_report_json_markdown_html_and_overlays(
    lip_root, tmp_path, capsys
):
    parsing, csv = _predictions(lip_root, tmp_path)
    out = tmp_path / "out" / "report.json"
    report_dir = tmp_path / "report"
    code = main(
        [
            "evaluate-predictions",
            "--lip-root", str(lip_root),
            "--split", "val",
            "--parsing-dir", str(parsing),
            "--pose-csv", str(csv),
            "--out", str(out),
            "--report-dir", str(report_dir),
            "--overlays", "2",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    parsing_report, pose = report["parsing"], report["pose"]
    # Two of three images predicted perfectly: every class has IoU 2/3.
    assert parsing_report["mean_iou"] == pytest.approx(100 * 2 / 3)
    assert parsing_report["missing_prediction_ids"] == ["100034_483681"]
    assert parsing_report["per_class_iou"]["right_shoe"] == pytest.approx(
        100 * 2 / 3
    )
    assert pose["missing_prediction_ids"] == ["10014_1211482"]
    assert pose["per_joint"]["head_top"] == pytest.approx(100 * 2 / 3)
    assert pose["images_excluded_head_size"] == 0
    for key in (
        "average",
        "upper_body",
        "groups",
        "joints_counted",
        "images_scored",
    ):
        assert key in pose
    for key in ("pixel_accuracy", "mean_accuracy", "frequency_weighted_iou"):
        assert key in parsing_report
    assert (
        (report_dir / "report.md")
        .read_text()
        .startswith("# LIP val evaluation")
    )
    assert "<table>" in (report_dir / "report.html").read_text()
    overlays = sorted(p.name for p in (report_dir / "overlays").iterdir())
    assert overlays == [
        "100034_483681.png",
        "10014_1211482.png",
    ]  # first two sorted
    # Avg: 10014_1211482 (right wrist and elbow missing) has 12 joints,
    # all wrong; the others 13 + 14, all right: 27 / 39.
    assert pose["average"] == pytest.approx(100 * 27 / 39)
    summary = capsys.readouterr().out
    assert "mIoU 66.67" in summary and "PCKh@0.5 69.23" in summary


def test_cli_names_the_bad_csv_line(lip_root, tmp_path, caplog):
    csv = tmp_path / "pose.csv"
    csv.write_text(
        "10024_490664," + ",".join(["3"] * 32) + "\n10014_1211482,1,2\n"
    )
    with caplog.at_level(logging.ERROR):
        code = main(
            [
                "evaluate-predictions",
                "--lip-root", str(lip_root),
                "--pose-csv", str(csv),
                "--out", str(tmp_path / "r.json"),
                "--no-progress",
            ]
        )  # fmt: skip
    assert code == 2
    assert f"{csv}:2: prediction row has 3 fields" in caplog.text
    assert not (tmp_path / "r.json").exists()


def test_cli_needs_some_predictions(lip_root, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(
            [
                "evaluate-predictions",
                "--lip-root",
                str(lip_root),
                "--out",
                "x.json",
            ]
        )
    assert code == 2
    assert "--parsing-dir, --pose-csv or both" in caplog.text
