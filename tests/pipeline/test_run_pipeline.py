"""End-to-end tests of `nppnet run`: every stage from a LIP folder to a
promoted model, a second run that skips everything, a touched stage config
that re-runs only that stage and those after it, a refused promotion
(exit 4), a data gate failure (exit 3) and a run killed during training
that the next run resumes.

The searched and trained models are the toy ones (`search.supernet`,
`train.network`; tests/nppnet_tf/search/toy_supernet.py and
tests/nppnet_tf/training/toy_network.py): the real ones need minutes of
graph tracing per process. Everything else is real: Beam, TFDV, the
export, serve-check, the MLflow registry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf
import yaml

from nppnet_tf.config import (
    DistributeConfig,
    ExportConfig,
    LossConfig,
    RegistryConfig,
    RunConfig,
    RunSection,
    SearchConfig,
    SynthConfig,
    TrainConfig,
    to_dict,
)
from pipeline import cli
from tests.nppnet_tf.search.search_fixtures import DATA_CONFIG
from tests.nppnet_tf.training.train_fixtures import AUTHORS_GENOTYPE

ROOT = Path(__file__).resolve().parents[2]
TOY_SUPERNET = "tests.nppnet_tf.search.toy_supernet:search_toy"
TOY_NETWORK = "tests.nppnet_tf.training.toy_network:toy_network"
ALL = [
    "synth",
    "preprocess",
    "validate",
    "search-encoder-decoder",
    "search-interaction",
    "train",
    "evaluate",
    "export",
    "serve-check",
    "register",
    "promote",
]


def _config(directory: Path, **train) -> RunConfig:
    """The whole pipeline on a synthetic LIP of 16 + 4 images, toy models."""
    train_values = dict(
        genotype=str(AUTHORS_GENOTYPE),
        init_channels=8,
        layers=4,
        epochs=2,
        batch_size=4,
        learning_rate=3e-3,
        lr_milestones=(1,),
        val_examples=4,
        val_batch_size=2,
        overlays=2,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        log_every_steps=1,
        seed=7,
        deterministic=False,
        final_baseline=True,
        network=TOY_NETWORK,
    )
    train_values.update(train)
    return dataclasses.replace(
        RunConfig(),
        run=RunSection(work_dir=str(directory / "work")),
        synth=SynthConfig(train=16, val=4, seed=1, min_size=96, max_size=128),
        data=DATA_CONFIG,
        loss=LossConfig(ohem_min_kept=1024),
        search=SearchConfig(
            init_channels=8,
            layers=4,
            epochs=2,
            encoder_decoder_epochs=2,
            warmup_epochs=1,
            entropy_start_epoch=0,
            batch_size=2,
            partial_channels=2,
            val_examples=4,
            val_batch_size=2,
            checkpoint_every_steps=0,
            log_every_steps=2,
            supernet=TOY_SUPERNET,
        ),
        train=TrainConfig(**train_values),
        export=ExportConfig(flip=True),
        registry=RegistryConfig(model_name="nppnet-pipeline-test"),
        distribute=DistributeConfig(devices=1, graph_optimizations=False),
    )


def _write(config: RunConfig, directory: Path, name="run.yaml") -> Path:
    tree = to_dict(config)
    tree["tracking"]["uri"] = f"sqlite:///{directory / 'mlflow.db'}"
    tree["validate"]["schema"] = str(ROOT / "configs/schema/lip_records.pbtxt")
    path = directory / name
    path.write_text(yaml.safe_dump(tree))
    return path


def _main(argv) -> int:
    # A fresh strategy per in-process command: no collective-key reuse.
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    from pipeline import stages

    stages._STRATEGIES.clear()
    return cli.main(argv)


def _statuses(directory: Path) -> dict[str, str]:
    """Stage -> status of the newest pipeline run (its `stages.json`)."""
    client, parent, _ = _newest_pipeline(directory)
    path = client.download_artifacts(parent.info.run_id, "stages.json")
    stages = json.loads(Path(path).read_text())["stages"]
    return {s["stage"]: s["status"] for s in stages}


def _newest_pipeline(directory: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nppnet")
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attribute.start_time DESC"]
    )
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    children = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    ]
    return client, parents[0], children


def _manifest(directory: Path, stage: str) -> dict:
    path = directory / "work" / "stages" / f"{stage}.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One whole pipeline run (module-scoped: the later tests build on it)."""
    directory = tmp_path_factory.mktemp("pipeline")
    config = _write(_config(directory), directory)
    code = _main(["run", "--config", str(config)])
    return directory, config, code


def test_the_whole_pipeline_runs_every_stage(first_run, capsys):
    directory, _, code = first_run
    assert code == 0
    assert _statuses(directory) == {name: "ran" for name in ALL}, (
        "every stage ran"
    )
    work = directory / "work"
    # Outputs of every stage where the summary says.
    assert (work / "records" / "manifest.json").is_file()
    assert (work / "search" / "interaction" / "genotype.json").is_file()
    trained = _manifest(directory, "train")["outputs"]
    assert Path(trained["model"]).name == "best.keras"
    assert trained["genotype_source"].endswith(
        "search/interaction/genotype.json"
    )
    report = json.loads((work / "evaluate" / "report.json").read_text())
    assert report["split"] == "val" and "baseline" in report
    assert report["baseline"]["miou_gain"] == pytest.approx(
        report["parsing"]["mean_iou"] - report["baseline"]["miou"]
    )
    assert (
        "Trained vs untrained" in (work / "evaluate" / "report.md").read_text()
    )
    assert len(list((work / "evaluate" / "overlays").glob("*.png"))) == 2
    assert (work / "export" / "nppnet" / "1" / "saved_model.pb").is_file()
    assert json.loads((work / "serve_check.json").read_text())["passed"]
    promoted = _manifest(directory, "promote")["outputs"]
    assert promoted["outcome"] == "promoted"
    assert promoted["champion_after"] == "1"
    # MLflow: one parent run, one child per stage, tagged.
    client, parent, children = _newest_pipeline(directory)
    assert parent.info.status == "FINISHED"
    assert len(parent.data.tags["nppnet.git_revision"]) >= 7
    data_fingerprint = parent.data.tags["nppnet.data_fingerprint"]
    assert sorted(c.info.run_name for c in children) == sorted(ALL)
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        assert child.data.tags["nppnet.stage_status"] == "ran"
        assert child.data.tags["nppnet.git_revision"]
        if child.info.run_name not in ("synth", "preprocess"):
            tags = child.data.tags
            assert tags["nppnet.data_fingerprint"] == data_fingerprint
    evaluate_run = next(c for c in children if c.info.run_name == "evaluate")
    assert "final/miou" in evaluate_run.data.metrics
    aliases = client.get_registered_model("nppnet-pipeline-test").aliases
    assert aliases == {"candidate": 1, "champion": 1}


def test_a_second_run_skips_every_stage(first_run, capsys):
    directory, config, _ = first_run
    capsys.readouterr()
    assert _main(["run", "--config", str(config)]) == 0
    assert _statuses(directory) == {name: "skipped" for name in ALL}
    out = capsys.readouterr().out
    assert "success (exit 0)" in out
    for where in ("SavedModel", "report", "overlays", "MLflow UI"):
        assert where in out, out
    assert not (directory / "work" / "export" / "nppnet" / "2").exists()


def test_a_touched_stage_config_reruns_that_stage_and_later(first_run, capsys):
    """export.flip changes: export onwards re-run; the new version ties the
    champion, so the promotion is refused (exit 4)."""
    directory, config, _ = first_run
    code = _main(["run", "--config", str(config), "--set", "export.flip=false"])
    assert code == 4
    statuses = _statuses(directory)
    assert all(statuses[name] == "skipped" for name in ALL[:7]), statuses
    assert all(statuses[name] == "ran" for name in ALL[7:]), statuses
    assert (directory / "work" / "export" / "nppnet" / "2").is_dir()
    assert _manifest(directory, "promote")["outputs"]["outcome"] == "refused"
    assert "promotion refused" in capsys.readouterr().out
    # Nothing changed since: all skipped, and no new refusal (exit 0).
    code = _main(["run", "--config", str(config), "--set", "export.flip=false"])
    assert code == 0


def test_an_evaluation_key_reruns_evaluate_but_not_train(first_run):
    directory, config, _ = first_run
    stages = "run.stages=[" + ",".join(ALL[1:7]) + "]"
    code = _main(
        ["run", "--config", str(config), "--set", "train.overlays=1"]
        + ["--set", stages]
    )
    assert code == 0
    statuses = _statuses(directory)
    assert statuses["train"] == "skipped" and statuses["evaluate"] == "ran"
    assert "export" not in statuses
    overlays = directory / "work" / "evaluate" / "overlays"
    assert len(list(overlays.glob("*.png"))) == 1


def test_bad_stage_lists_and_a_lock_are_refused(first_run, caplog):
    directory, config, _ = first_run
    code = _main(
        [
            "run",
            "--config",
            str(config),
            "--set",
            "run.stages=[preprocess,export]",
        ]
    )
    assert code == 2
    assert "'export' needs the outputs of 'train'" in caplog.text
    code = _main(
        ["run", "--config", str(config), "--set", "tracking.enabled=false"]
    )
    assert code == 2
    assert "need the MLflow registry" in caplog.text
    from pipeline.runner import RunLock

    with RunLock(directory / "work"):
        assert _main(["run", "--config", str(config)]) == 5
    assert "another run holds" in caplog.text


def test_a_data_gate_failure_exits_3_and_the_next_run_restarts_there(
    tmp_path, capsys
):
    """A schema that no record satisfies: validate fails (exit 3), the
    parent run ends FAILED, later stages do not run."""
    schema = tmp_path / "schema.pbtxt"
    text = (ROOT / "configs/schema/lip_records.pbtxt").read_text()
    schema.write_text(
        text + '\nfeature { name: "no_such_feature" type: INT '
        "presence { min_fraction: 1.0 min_count: 1 } }\n"
    )
    config = _config(tmp_path)
    path = _write(config, tmp_path)
    tree = yaml.safe_load(path.read_text())
    tree["validate"]["schema"] = str(schema)
    path.write_text(yaml.safe_dump(tree))
    assert _main(["run", "--config", str(path)]) == 3
    out = capsys.readouterr().out
    assert "data gate failed" in out and "validate" in out
    assert _manifest(tmp_path, "validate")["status"] == "failed"
    assert not (tmp_path / "work" / "stages" / "train.json").exists()
    _, parent, _ = _newest_pipeline(tmp_path)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["nppnet.failed_stage"] == "validate"


def _start(config: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NPPNET_LOG_LEVEL="INFO")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)]
        + list(extra),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_a_run_killed_during_training_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL in the second training epoch; the next run skips every stage
    before training and resumes the training from its checkpoint."""
    config = _write(
        _config(tmp_path, epochs=3, batch_size=2, checkpoint_every_steps=3),
        tmp_path,
    )
    process = _start(config)
    checkpoint = tmp_path / "work" / "train" / "checkpoints" / "ckpt-12.index"
    deadline = time.time() + 900
    while not checkpoint.exists():
        if process.poll() is not None:
            raise AssertionError(process.stdout.read()[-4000:])
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"{checkpoint} did not appear")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert _manifest(tmp_path, "train")["status"] == "running"
    resumed = _start(config)
    output = resumed.communicate(timeout=1200)[0]
    assert resumed.returncode == 0, output[-4000:]
    assert "stage train: resuming the failed or killed attempt" in output
    assert "resuming the training at epoch" in output
    statuses = _statuses(tmp_path)
    assert all(statuses[name] == "skipped" for name in ALL[:5]), statuses
    assert all(statuses[name] == "ran" for name in ALL[5:]), statuses
    summary = json.loads(
        (tmp_path / "work" / "train" / "summary.json").read_text()
    )
    assert summary["status"] == "completed" and summary["global_step"] == 24
