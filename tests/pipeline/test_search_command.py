"""Tests of `nppnet search`: both stages end to end with MLflow, failure
and signal exits, and a SIGKILLed search resumed to the same result.

The searched model is the toy supernet (`--set search.supernet=...`, see
tests/nppnet_tf/search/toy_supernet.py): the real supernets need minutes
of graph tracing per process. tests/nppnet_tf/search/test_search_loop.py
has a slow test of the real tiny supernets.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from nppnet_tf.config import to_dict
from nppnet_tf.search import architecture_file
from nppnet_tf.search.genotype import Genotype
from pipeline import cli
from pipeline.runner import RunLock
from tests.nppnet_tf.search.search_fixtures import search_records, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TOY = "search.supernet=tests.nppnet_tf.search.toy_supernet:search_toy"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return search_records(tmp_path_factory)[0]


def _config_file(directory: Path, **search) -> Path:
    config = tiny_config(**search)
    tree = to_dict(config)
    tree["run"]["work_dir"] = str(directory / "work")
    tree["tracking"]["uri"] = f"sqlite:///{directory / 'mlflow.db'}"
    path = directory / "search.yaml"
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


def test_both_stages_end_to_end_with_mlflow(records, tmp_path):
    config = _config_file(tmp_path)
    common = ["--config", str(config), "--set", TOY, "--records", records]
    common += ["--set", "search.deterministic=false"]  # no process-wide switch
    assert _main(["search", "--stage", "encoder-decoder", *common]) == 0
    assert _main(["search", "--stage", "interaction", *common]) == 0

    work = tmp_path / "work" / "search"
    cells = Genotype.load(work / "encoder-decoder" / "genotype.json")
    assert not cells.is_complete
    full = Genotype.load(work / "interaction" / "genotype.json")
    assert full.is_complete and full.cells_only() == cells  # the default base
    for stage in ("encoder-decoder", "interaction"):
        out = work / stage
        assert Genotype.load(out / "best_genotype.json")
        for epoch in ("000", "001"):
            epoch_dir = out / "epochs" / epoch
            architecture_file.load_architecture(epoch_dir / "architecture.npz")
            assert list((epoch_dir / "diagrams").glob("*.svg"))
            assert list((epoch_dir / "diagrams").glob("*.png"))
            assert (epoch_dir / "architecture_weights.png").exists()
        assert list((out / "tensorboard").glob("events.*"))

    client, runs = _runs(tmp_path)
    assert set(runs) == {"search-encoder-decoder", "search-interaction"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["search.order"] == "first"
        assert run.data.tags["nppnet.search.status"] == "completed"
        history = client.get_metric_history(run.info.run_id, "weight/total")
        assert [m.step for m in history] == list(range(1, 9))
        assert len(client.get_metric_history(run.info.run_id, "val/miou")) == 2
        assert client.get_metric_history(run.info.run_id, "entropy/mean")
        artifacts = _artifacts(client, run.info.run_id)
        for expected in (
            "config.json",
            "genotype.json",
            "best_genotype.json",
            "architecture.npz",
            "epochs/000/genotype.json",
            "epochs/001/architecture.npz",
            "epochs/001/architecture_weights.png",
        ):
            assert expected in artifacts, (name, expected)
        assert any(a.startswith("epochs/001/diagrams/") for a in artifacts)


def test_a_non_finite_loss_fails_the_run_and_exits_1(records, tmp_path, caplog):
    config = _config_file(tmp_path)
    code = _main(
        [
            "search",
            "--config",
            str(config),
            "--set",
            TOY,
            "--set",
            "search.deterministic=false",
            "--set",
            "search.weight_lr=1.0e+30",  # weights explode after one step
            "--records",
            records,
            "--stage",
            "encoder-decoder",
        ]
    )
    assert code == 1
    assert "non-finite loss at step" in caplog.text
    _, runs = _runs(tmp_path)
    assert runs["search-encoder-decoder"].info.status == "FAILED"


def test_a_locked_output_directory_exits_5(records, tmp_path):
    config = _config_file(tmp_path)
    out = tmp_path / "work" / "search" / "encoder-decoder"
    with RunLock(out):
        code = _main(
            ["search", "--config", str(config), "--set", TOY]
            + ["--records", records, "--stage", "encoder-decoder"]
        )
    assert code == 5


def test_bad_input_exits_2(tmp_path):
    config = _config_file(tmp_path)
    base = ["search", "--config", str(config), "--set", TOY]
    assert (
        _main([*base, "--stage", "interaction", "--records", str(tmp_path)])
        == 2
    )
    assert (
        _main(
            [*base, "--stage", "interaction", "--base-genotype", "missing.json"]
        )
        == 2
    )


def _start(config: Path, records: str, out: Path, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "pipeline.cli", "search"]
    command += ["--config", str(config), "--set", TOY, "--records", records]
    command += ["--stage", "interaction", "--out", str(out), *extra]
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


def _wait_for(path_glob: Path, process, timeout=600.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(path_glob.parent.glob(path_glob.name)):
            return
        if process.poll() is not None:
            raise AssertionError(process.stderr.read()[-3000:])
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"{path_glob} did not appear in {timeout} s")


@pytest.mark.slow
def test_a_search_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    records, tmp_path
):
    # Batch 1: 9 warm-up and 9 search steps, a checkpoint every 3.
    config = _config_file(tmp_path, batch_size=1, checkpoint_every_steps=3)
    killed = _start(config, records, tmp_path / "killed")
    # Killed right after the second mid-epoch checkpoint of the search epoch.
    _wait_for(tmp_path / "killed" / "checkpoints" / "ckpt-12.index", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    straight = _start(config, records, tmp_path / "straight")
    assert straight.wait(timeout=900) == 0, straight.stderr.read()[-3000:]
    assert not (tmp_path / "killed" / "summary.json").exists()
    latest = tf.train.latest_checkpoint(
        str(tmp_path / "killed" / "checkpoints")
    )
    assert int(latest.rsplit("-", 1)[1]) in (12, 15)
    resumed = _start(config, records, tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]

    first = architecture_file.load_architecture(
        tmp_path / "straight" / "architecture.npz"
    )
    second = architecture_file.load_architecture(
        tmp_path / "killed" / "architecture.npz"
    )
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    for name in ("genotype.json", "best_genotype.json"):
        assert (tmp_path / "straight" / name).read_text() == (
            tmp_path / "killed" / name
        ).read_text()
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 18


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(records, tmp_path):
    config = _config_file(tmp_path, batch_size=1, checkpoint_every_steps=3)
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
    assert summary["global_step"] >= 3
    from mlflow import MlflowClient

    client = MlflowClient(
        tracking_uri=f"sqlite:///{tmp_path / 'out'}.mlflow.db"
    )
    experiment = client.get_experiment_by_name("nppnet")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"
