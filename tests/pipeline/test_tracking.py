"""MLflow tracking: embedded store under the work dir, run status, logging."""

import json

import pytest

from nppnet_tf.config import RunConfig, RunSection, TrackingConfig
from pipeline.tracking import Tracker, flatten, tracking_uri


def config_in(tmp_path, **tracking):
    return RunConfig(
        run=RunSection(work_dir=str(tmp_path / "work")),
        tracking=TrackingConfig(**tracking),
    )


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = config_in(tmp_path)
    assert (
        tracking_uri(config)
        == f"sqlite:///{(tmp_path / 'work').resolve()}/mlflow.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(config) == "http://127.0.0.1:1"
    assert (
        tracking_uri(config_in(tmp_path, uri="sqlite:///x.db"))
        == "sqlite:///x.db"
    )


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {
        "a.b": 1,
        "a.c.d": 2,
        "e": 3,
    }


def test_runs_metrics_artifacts_and_failed_status(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = config_in(tmp_path)
    tracker = Tracker(config)
    artifact = tmp_path / "genotype.json"
    artifact.write_text("{}")
    with tracker.run("parent") as parent:
        parent.log_config(config)
        with tracker.run("child", nested=True) as child:
            child.log_metrics({"loss": 1.5, "bad": float("nan")}, step=3)
            child.log_artifact(artifact, "genotypes")
            child_id = child.run_id
    with pytest.raises(RuntimeError):
        with tracker.run("broken"):
            raise RuntimeError("stage failed")
    client = mlflow.MlflowClient()
    run = client.get_run(child_id)
    assert run.data.metrics == {"loss": 1.5}
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert [f.path for f in client.list_artifacts(child_id, "genotypes")] == [
        "genotypes/genotype.json"
    ]
    parent_run = client.get_run(parent.run_id)
    assert parent_run.data.params["data.image_size"] == "384"
    config_file = client.download_artifacts(
        parent.run_id, "config.json", str(tmp_path)
    )
    assert json.loads(open(config_file).read())["data"]["image_size"] == 384
    failed = client.search_runs(
        [tracker.experiment_id], "attributes.status = 'FAILED'"
    )
    assert [r.info.run_name for r in failed] == ["broken"]
    assert (tmp_path / "work" / "mlartifacts").is_dir()


def test_disabled_tracking_logs_nothing(tmp_path):
    tracker = Tracker(config_in(tmp_path, enabled=False))
    with tracker.run("x") as logger:
        logger.log_metrics({"a": 1.0})
    assert not (tmp_path / "work").exists()
