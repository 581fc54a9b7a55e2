"""Tests of `nppnet train`: an end-to-end run with MLflow, failure, lock and
input-error exits, a SIGKILLed run resumed to the uninterrupted result,
SIGTERM, and (slow) the real tiny NPPNet of configs/demo.yaml.

The fast tests train the toy network (`--set train.network=...`, see
tests/nppnet_tf/training/toy_network.py): the real network needs more
than a minute of graph tracing per process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from nppnet_tf.config import to_dict
from pipeline import cli
from pipeline.runner import RunLock
from tests.nppnet_tf.training.toy_network import ToyNetwork
from tests.nppnet_tf.training.train_fixtures import search_records, tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return search_records(tmp_path_factory)[0]


def _config_file(directory: Path, **train) -> Path:
    tree = to_dict(tiny_config(**train))
    tree["run"]["work_dir"] = str(directory / "work")
    tree["tracking"]["uri"] = f"sqlite:///{directory / 'mlflow.db'}"
    path = directory / "train.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _main(argv):
    # A fresh strategy per in-process command: no collective-key reuse.
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return cli.main(argv)


def _runs(directory: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nppnet")
    runs = client.search_runs([experiment.experiment_id])
    return client, {run.info.run_name: run for run in runs}


def _artifacts(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found += _artifacts(client, run_id, item.path)
        else:
            found.append(item.path)
    return found


def test_train_end_to_end_with_mlflow(records, tmp_path, capsys):
    """One epoch of two (--max-steps at its end finishes it): best model,
    final evaluation, overlays, initial weights, and the MLflow run."""
    source = ToyNetwork(channels=8)
    source.build((None, 64, 64, 3))
    source.save(tmp_path / "init.keras")
    config = _config_file(tmp_path, deterministic=False)
    code = _main(
        ["train", "--config", str(config), "--records", records]
        + ["--max-steps", "6", "--init-weights", str(tmp_path / "init.keras")]
    )
    assert code == 0
    out = tmp_path / "work" / "train"
    assert capsys.readouterr().out.strip() == str(out / "best.keras")
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "official" and report["images"] == 4
    assert report["parsing"]["mean_iou"] is not None
    assert report["pose"]["average"] is not None
    assert len(list((out / "overlays").glob("*.png"))) == 2
    for name in ("final.keras", "report.md", "report.html"):
        assert (out / name).exists()
    init = json.loads((out / "init_weights_report.json").read_text())
    assert init["counts"]["loaded"] == 14
    model = keras.saving.load_model(out / "best.keras", compile=False)
    assert model(np.zeros((1, 64, 64, 3), "float32"))["pose"].shape[-1] == 16

    client, runs = _runs(tmp_path)
    run = runs["train"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["nppnet.train.status"] == "max_steps"
    assert run.data.tags["nppnet.genotype_fingerprint"]
    assert run.data.params["train.batch_size"] == "4"
    assert run.data.params["train.init_weights_loaded"] == "14"
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == list(range(1, 7))
    assert len(client.get_metric_history(run.info.run_id, "val/miou")) == 1
    assert client.get_metric_history(run.info.run_id, "lr/encoder_adam")
    final = client.get_metric_history(run.info.run_id, "final/miou")
    assert final[0].value == pytest.approx(report["parsing"]["mean_iou"])
    artifacts = _artifacts(client, run.info.run_id)
    for expected in (
        "config.json",
        "genotype.json",
        "best.keras",
        "final.keras",
        "report.json",
        "report.md",
        "init_weights_report.json",
        "train_result.json",
    ):
        assert expected in artifacts, expected
    assert any(a.startswith("overlays/") for a in artifacts)


def test_a_non_finite_loss_fails_the_run_and_exits_1(records, tmp_path, caplog):
    config = _config_file(tmp_path, deterministic=False)
    code = _main(
        ["train", "--config", str(config), "--records", records]
        + ["--set", "train.learning_rate=1e30"]  # weights explode at once
    )
    assert code == 1
    assert "non-finite loss at step" in caplog.text
    _, runs = _runs(tmp_path)
    assert runs["train"].info.status == "FAILED"


def test_a_locked_output_directory_exits_5(records, tmp_path):
    config = _config_file(tmp_path)
    with RunLock(tmp_path / "work" / "train"):
        code = _main(["train", "--config", str(config), "--records", records])
    assert code == 5


def test_bad_input_exits_2(records, tmp_path):
    config = _config_file(tmp_path, deterministic=False)
    base = ["train", "--config", str(config)]
    assert _main([*base, "--records", str(tmp_path / "none")]) == 2
    assert _main([*base, "--genotype", "missing.json"]) == 2
    assert _main([*base, "--max-steps", "0"]) == 2
    assert (
        _main([*base, "--records", records, "--init-weights", "nowhere"]) == 2
    )
    checkpoints = tmp_path / "work" / "train" / "checkpoints"
    tf.train.CheckpointManager(
        tf.train.Checkpoint(x=tf.Variable(1.0)), str(checkpoints), 1
    ).save()
    assert _main([*base, "--records", records]) == 2  # no --resume


def _start(config: Path, records: str, out: Path, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "pipeline.cli", "train"]
    command += ["--config", str(config), "--records", records]
    command += ["--out", str(out), *extra]
    # One MLflow store per output: two processes creating one sqlite store
    # at the same time race on its schema.
    command += ["--set", f"tracking.uri=sqlite:///{out}.mlflow.db"]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process, timeout=600.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        if process.poll() is not None:
            raise AssertionError(process.stderr.read()[-3000:])
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"{path} did not appear in {timeout} s")


def _weights(path):
    model = keras.saving.load_model(path, compile=False)
    return [np.array(v.numpy()) for v in model.variables]


@pytest.mark.slow
def test_a_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    records, tmp_path
):
    """With op determinism (the real switch, in subprocesses): SIGKILL in
    the second epoch, --resume, the same models and scores bit for bit."""
    # Batch 2: 12 steps per epoch, a checkpoint every 3.
    config = _config_file(tmp_path, batch_size=2, checkpoint_every_steps=3)
    killed = _start(config, records, tmp_path / "killed")
    _wait_for(tmp_path / "killed" / "checkpoints" / "ckpt-18.index", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    straight = _start(config, records, tmp_path / "straight")
    assert straight.wait(timeout=900) == 0, straight.stderr.read()[-3000:]
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = _start(config, records, tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]
    for name in ("best.keras", "final.keras"):
        for a, b in zip(
            _weights(tmp_path / "straight" / name),
            _weights(tmp_path / "killed" / name),
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)
    first = json.loads((tmp_path / "straight" / "report.json").read_text())
    second = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert first["parsing"] == second["parsing"]
    assert first["pose"] == second["pose"]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 24


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(records, tmp_path):
    config = _config_file(tmp_path, batch_size=2, checkpoint_every_steps=3)
    process = _start(config, records, tmp_path / "out")
    _wait_for(tmp_path / "out" / "checkpoints" / "ckpt-3.index", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    stderr = process.stderr.read()
    assert "SIGTERM received" in stderr and "--resume" in stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    latest = tf.train.latest_checkpoint(str(tmp_path / "out" / "checkpoints"))
    assert latest.endswith(f"ckpt-{summary['global_step']}")
    from mlflow import MlflowClient

    client = MlflowClient(
        tracking_uri=f"sqlite:///{tmp_path / 'out'}.mlflow.db"
    )
    experiment = client.get_experiment_by_name("nppnet")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_demo_config_trains_the_real_tiny_nppnet(records, tmp_path):
    """configs/demo.yaml's network (C = 8, 4 cells) for one epoch on the
    test records: best.keras, the report with mIoU and PCKh, overlays and
    the MLflow run."""
    code = _main(
        [
            "train",
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--records",
            records,
            "--set",
            f"run.work_dir={tmp_path / 'work'}",
            "--set",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set",
            "train.epochs=2",
            "--set",
            "train.eval_every_epochs=1",
            "--set",
            "train.val_examples=4",
            "--set",
            "train.overlays=3",
            "--max-steps",
            "3",  # one epoch: 24 images, batch 8
        ]
    )
    assert code == 0
    out = tmp_path / "work" / "train"
    report = json.loads((out / "report.json").read_text())
    assert report["model"].endswith("best.keras")
    assert 0 <= report["parsing"]["mean_iou"] <= 100
    assert 0 <= report["pose"]["average"] <= 100
    assert len(list((out / "overlays").glob("*.png"))) == 3
    model = keras.saving.load_model(out / "best.keras", compile=False)
    assert type(model).__name__ == "NPPNet"
    _, runs = _runs(tmp_path)
    assert runs["train"].info.status == "FINISHED"
    assert runs["train"].data.tags["nppnet.train.status"] == "max_steps"
