"""`nppnet data synth | preprocess | validate` end to end on a tiny
synthetic LIP: exit codes, outputs, the no-op re-run, config errors."""

import json
from pathlib import Path

import pytest

from pipeline.cli import main

REPO_SCHEMA = (
    Path(__file__).resolve().parents[2] / "configs/schema/lip_records.pbtxt"
)

CONFIG = """\
run: {work_dir: WORK}
data: {image_size: 32, heatmap_stride: 4, sigma: 3.0, aux_sigma: 6.0, shards: 1}
validate: {schema: SCHEMA, skew_threshold: 0.3, skew_min_examples: 100}
"""


def _json_out(capsys) -> dict:
    text = capsys.readouterr().out
    return json.loads(text[text.index("{") :])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_commands")
    config = root / "tiny.yaml"
    config.write_text(
        CONFIG.replace("WORK", str(root / "work")).replace(
            "SCHEMA", str(REPO_SCHEMA)
        )
    )
    return root, config


def test_synth_preprocess_validate(workspace, capsys):
    root, config = workspace
    lip = root / "lip"
    code = main(
        ["data", "synth", "--out", str(lip), "--train", "6", "--val", "3"]
        + ["--seed", "0", "--min-size", "64", "--max-size", "96"]
    )
    assert code == 0
    assert (lip / "TrainVal_images" / "train_id.txt").exists()
    capsys.readouterr()

    records = root / "records"
    args = ["data", "preprocess", "--lip-root", str(lip), "--out", str(records)]
    assert main([*args, "--config", str(config)]) == 0
    summary = _json_out(capsys)
    assert not summary["skipped"]
    assert summary["counts"]["train"] == 6 and summary["counts"]["val"] == 3
    assert summary["num_dead_letters"] == 0
    assert summary["counts"]["train"] == (
        summary["counts"]["search_weights"] + summary["counts"]["search_arch"]
    )
    manifest = json.loads((records / "manifest.json").read_text())
    assert manifest["config"]["image_size"] == 32
    assert list((records / "dead_letter").glob("*.jsonl"))

    assert main([*args, "--config", str(config)]) == 0  # unchanged: no-op
    assert _json_out(capsys)["skipped"]

    assert (
        main(
            [
                "data",
                "validate",
                "--records",
                str(records),
                "--config",
                str(config),
            ]
        )
        == 0
    )
    report = capsys.readouterr().out
    assert "anomalies: none" in report
    assert (records / "validation" / "stats_train.pb").exists()

    # A schema the data cannot satisfy: the gate fails with exit code 3.
    tight = root / "tight.pbtxt"
    tight.write_text(
        REPO_SCHEMA.read_text().replace(
            'name: "crop/size"\n  type: INT\n  int_domain {\n    min: 32',
            'name: "crop/size"\n  type: INT\n  int_domain {\n    min: 64',
        )
    )
    code = main(
        ["data", "validate", "--records", str(records), "--schema", str(tight)]
    )
    assert code == 3
    assert "crop/size" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "preprocess", "--out", "x"], "--lip-root is required"),
        (
            ["data", "preprocess", "--lip-root", "NOWHERE", "--out", "x"],
            "NOWHERE",
        ),
        (["data", "validate", "--records", "NOWHERE"], "no <split>"),
        (["data", "synth", "--out", "x", "--min-size", "8"], "synth.min_size"),
    ],
)
def test_input_errors_exit_2(argv, message, caplog):
    assert main(argv) == 2
    assert message in caplog.text


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=33", "data.image_size = 33"),
        ("validate.skew_min_examples=-1", "validate.skew_min_examples = -1"),
        ("data.shards=two", "data.shards = 'two'"),
    ],
)
def test_config_errors_exit_2(workspace, override, message, caplog):
    _, config = workspace
    argv = [
        "data",
        "validate",
        "--records",
        "x",
        "--config",
        str(config),
        "--set",
        override,
    ]
    assert main(argv) == 2
    assert message in caplog.text
