"""MLflow tracking for pipeline runs (the only package that imports mlflow).

The tracking URI comes from `tracking.uri`, else `$MLFLOW_TRACKING_URI`,
else the embedded store `sqlite:///<run.work_dir>/mlflow.db` whose artifacts
live in `<run.work_dir>/mlartifacts`. `Tracker` opens runs (a parent run per
pipeline run, a child run per stage) and `MLflowLogger` is what the library's
search and training loops log through (they only know the small
`log_metrics` / `log_params` / `log_artifact` protocol, never mlflow).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nppnet_tf.config import RunConfig, to_dict

log = logging.getLogger(__name__)

# MLflow limits a param value to 6000 characters and a key to 250.
_MAX_PARAM = 500


def tracking_uri(config: RunConfig) -> str:
    """The MLflow tracking URI this run uses (see the module docstring)."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(config.run.work_dir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def is_local_store(uri: str) -> bool:
    return (
        uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri
    )


def ui_command(uri: str) -> str:
    """The command that shows this store in the MLflow UI."""
    if is_local_store(uri):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"data": {"image_size": 64}}` -> `{"data.image_size": 64}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """Opens MLflow runs for one pipeline run.

    Args:
        config: the run config (tracking section and work dir).
    """

    def __init__(self, config: RunConfig):
        import mlflow

        self.config = config
        self.enabled = config.tracking.enabled
        self.uri = tracking_uri(config)
        if not self.enabled:
            return
        mlflow.set_tracking_uri(self.uri)
        self.experiment_id = self._experiment()

    def _experiment(self) -> str:
        import mlflow

        name = self.config.tracking.experiment
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if is_local_store(self.uri):
            artifacts = Path(self.config.run.work_dir).resolve() / "mlartifacts"
            location = artifacts.as_uri()
        log.info("creating MLflow experiment %r at %s", name, self.uri)
        return mlflow.create_experiment(name, artifact_location=location)

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        nested: bool = False,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> Iterator[MLflowLogger | NullLogger]:
        """A run that ends FAILED (or KILLED on Ctrl-C) if the block raises.

        Yields:
            A logger bound to the run (a no-op one when tracking is off).
        """
        if not self.enabled:
            yield NullLogger()
            return
        import mlflow

        active = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else name,
            experiment_id=self.experiment_id,
            nested=nested,
            tags=dict(tags or {}),
        )
        try:
            yield MLflowLogger(active.info.run_id)
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        else:
            mlflow.end_run(status="FINISHED")

    def run_url(self, run_id: str) -> str:
        if is_local_store(self.uri):
            return f"{ui_command(self.uri)}  (run {run_id})"
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"


class NullLogger:
    """The logger protocol with tracking switched off."""

    run_id: str | None = None

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_config(self, config: Any) -> None:
        pass

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None
    ) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass


class MLflowLogger(NullLogger):
    """Logs to one MLflow run by id (safe to use from any thread)."""

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(
                key=_metric_key(k),
                value=float(v),
                timestamp=now,
                step=step or 0,
            )
            for k, v in metrics.items()
            if v is not None and _finite(v)
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [
            Param(key, str(value)[:_MAX_PARAM])
            for key, value in flatten(params).items()
        ]
        for start in range(0, len(items), 100):
            self.client.log_batch(
                self.run_id, params=items[start : start + 100]
            )

    def log_config(self, config: Any) -> None:
        """The whole config as params and as `config.json`."""
        tree = to_dict(config)
        self.log_params(tree)
        self.log_dict(tree, "config.json")

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None
    ) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        import json

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(
                json.dumps(data, indent=2, sort_keys=True, default=str)
            )
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(
                self.run_id, str(path), None if parent == "." else parent
            )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


def _finite(value: Any) -> bool:
    import math

    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and spaces.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
