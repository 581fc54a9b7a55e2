"""The TFDV gate: statistics and outputs, schema inference on the first run,
domain anomalies and train/val skew against the schema."""

import json
from pathlib import Path

import pytest
from lip_fixture import good_fixture

from beam_jobs.lip_to_tfrecord import preprocess
from beam_jobs.validate_records import validate
from nppnet_tf.config import DataConfig

REPO_SCHEMA = (
    Path(__file__).resolve().parents[2] / "configs/schema/lip_records.pbtxt"
)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    fixture = good_fixture(root / "lip", train=8, val=4)
    config = DataConfig(image_size=32, shards=1, sigma=3.0, aux_sigma=6.0)
    preprocess(str(fixture.root), str(root / "records"), config, progress=False)
    return root / "records"


def test_first_run_infers_and_writes_schema(records, tmp_path):
    schema_path = tmp_path / "schema" / "inferred.pbtxt"
    report = validate(
        str(records), str(schema_path), 0.3, skew_min_examples=100
    )
    assert report["schema_inferred"] and schema_path.exists()
    assert "feature" in schema_path.read_text()
    assert report["num_examples"] == {
        "train": 8,
        "val": 4,
        "search_weights": report["num_examples"]["search_weights"],
        "search_arch": 8 - report["num_examples"]["search_weights"],
    }
    assert "skipped" in report["skew"]
    out = records / "validation"
    for name in (
        "stats_train.pb",
        "stats_val.pbtxt",
        "anomalies_train.pbtxt",
        "summary.html",
        "facets.html",
        "report.json",
        "report.txt",
    ):
        assert (out / name).exists(), name
    assert (
        json.loads((out / "report.json").read_text())["anomalies"]
        == report["anomalies"]
    )
    assert "<table>" in (out / "summary.html").read_text()


def test_anomalies_against_a_tightened_schema_and_skew(records, tmp_path):
    # (The clean run with the curated schema is in tests/pipeline.)
    # Tighten one domain: the fixture has 13 to 16 present joints per image.
    text = REPO_SCHEMA.read_text()
    marker = 'name: "stats/num_present_keypoints"\n  type: INT\n  int_domain {\n    min: 0\n    max: 16'
    assert marker in text
    tight = tmp_path / "tight.pbtxt"
    tight.write_text(text.replace(marker, marker.replace("max: 16", "max: 5")))
    report = validate(str(records), str(tight), 0.01, skew_min_examples=0)
    found = {(a["split"], a["feature"]) for a in report["anomalies"]}
    assert ("train", "stats/num_present_keypoints") in found
    assert ("val", "stats/num_present_keypoints") in found
    # Skew: the counts of present joints of 8 train and 4 val images differ
    # by more than 0.01; schema anomalies are not repeated under train/val.
    skewed = [a for a in report["anomalies"] if a["split"] == "train/val"]
    assert skewed and all("Linfty" in a["description"] for a in skewed)
    assert not report["schema_inferred"] and "skipped" not in report["skew"]
    assert tight.read_text() == text.replace(
        marker, marker.replace("max: 16", "max: 5")
    )
