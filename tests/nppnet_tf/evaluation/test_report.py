"""Tests of the Markdown and HTML report renderings."""

import numpy as np
from PIL import Image

from nppnet_tf.evaluation.prediction_files import (
    evaluate_prediction_files,
    json_ready,
)
from nppnet_tf.evaluation.report import (
    format_score,
    render_html,
    render_markdown,
    report_tables,
    write_report_files,
)
from nppnet_tf.lip import CLASS_NAMES, LIP_JOINT_NAMES


def _report(lip_root, ground_truth_labels, tmp_path):
    directory = tmp_path / "parsing"
    directory.mkdir()
    for image_id, labels in list(ground_truth_labels.items())[:3]:
        prediction = np.where(labels == 255, 0, labels).astype(np.uint8)
        prediction[:, :10] = 1
        Image.fromarray(prediction).save(directory / f"{image_id}.png")
    csv = tmp_path / "pose.csv"
    csv.write_text("<b>odd&id</b>," + ",".join(["1"] * 32) + "\n")
    return json_ready(
        evaluate_prediction_files(lip_root, "val", directory, csv)
    )


def test_format_score():
    assert format_score(58.5612) == "58.56"
    assert format_score(None) == "n/a"
    assert format_score(float("nan")) == "n/a"


def test_tables_hold_every_class_joint_and_group(
    lip_root, ground_truth_labels, tmp_path
):
    report = _report(lip_root, ground_truth_labels, tmp_path)
    tables = {
        title: (header, rows) for title, header, rows in report_tables(report)
    }
    header, rows = tables["Parsing per class (percent)"]
    assert [row[0] for row in rows] == list(CLASS_NAMES)
    assert rows[0][1] == format_score(
        report["parsing"]["per_class_iou"]["background"]
    )
    header, rows = tables["PCKh@0.5 (percent)"]
    assert header == [
        "Head",
        "Shoulder",
        "Elbow",
        "Wrist",
        "Hip",
        "Knee",
        "Ankle",
        "U.Body",
        "Avg",
    ]
    assert rows[0][-1] == format_score(report["pose"]["average"])
    header, rows = tables["PCKh@0.5 per joint (LIP order)"]
    assert [row[1] for row in rows] == list(LIP_JOINT_NAMES)
    counts = dict(tables["Counts"][1])
    assert (
        counts["parsing: images missing predictions (all pixels missed)"] == "1"
    )
    assert counts["pose: images missing predictions (all joints wrong)"] == "4"
    assert counts["pose: images excluded (no head size)"] == "1"


def test_markdown_and_html_render_and_escape(
    lip_root, ground_truth_labels, tmp_path
):
    report = _report(lip_root, ground_truth_labels, tmp_path)
    markdown = render_markdown(report, ["overlays/a.png"])
    assert markdown.startswith("# LIP val evaluation")
    assert "| left_shoe |" in markdown
    assert "![a](overlays/a.png)" in markdown
    page = render_html(report, ["overlays/a.png"])
    assert page.startswith("<!DOCTYPE html>")
    assert "<b>odd" not in page and "&lt;b&gt;odd&amp;id&lt;/b&gt;" in page
    assert '<img src="overlays/a.png" alt="a">' in page
    assert page.count("<table>") == page.count("</table>") == 5


def test_pose_only_report_renders(lip_root, tmp_path):
    csv = tmp_path / "pose.csv"
    csv.write_text("")
    report = json_ready(
        evaluate_prediction_files(lip_root, "val", pose_csv=csv)
    )
    markdown = render_markdown(report)
    assert "Parsing per class" not in markdown and "PCKh@0.5 Avg" in markdown


def test_write_report_files_links_overlays_relatively(tmp_path):
    report = {"split": "val", "images": 0, "lip_root": "x"}
    overlay = tmp_path / "out" / "overlays" / "z.png"
    overlay.parent.mkdir(parents=True)
    overlay.write_bytes(b"")
    markdown, page = write_report_files(report, tmp_path / "out", [overlay])
    assert "](overlays/z.png)" in markdown.read_text()
    assert 'src="overlays/z.png"' in page.read_text()
