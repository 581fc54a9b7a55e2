"""Where search and training loops report: the small logger protocol.

The library never imports MLflow or the CLI. A loop takes any object with
four methods (`Logger`): `log_metrics(metrics, step)`, `log_params(params)`,
`log_artifact(path, artifact_path)` and `log_dict(data, artifact_file)`.
`pipeline.tracking.MLflowLogger` implements it for MLflow; this module has
the loggers a loop always writes itself:

* `TensorBoardLogger`: scalars under a log directory (`tf.summary`);
* `JSONLinesLogger`: one JSON object per `log_metrics` call in a file that
  plain tools can read (`{"step": 12, "weight/total": 3.1, ...}`);
* `FanOutLogger`: forwards every call to several loggers;
* `NullLogger`: does nothing (the default).

Loggers only see finite numbers: non-finite values are dropped by
`finite_metrics` before they reach TensorBoard or the JSON lines (the loop
reports a non-finite loss itself, with its step).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Logger(Protocol):
    """What a loop reports to (MLflow, TensorBoard, JSON lines, ...)."""

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None
    ) -> None: ...

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...


class NullLogger:
    """The logger protocol doing nothing."""

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None
    ) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        pass


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of `metrics` that are finite numbers, as floats."""
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


class TensorBoardLogger(NullLogger):
    """Scalars for TensorBoard (`tensorboard --logdir <log_dir>`).

    Args:
        log_dir: str or Path. Event files go here (created).
    """

    def __init__(self, log_dir: str | Path):
        import tensorflow as tf

        self.log_dir = str(log_dir)
        self._tf = tf
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        values = finite_metrics(metrics)
        if not values:
            return
        with self._writer.as_default(step=int(step or 0)):
            for key, value in values.items():
                self._tf.summary.scalar(key, value)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class JSONLinesLogger(NullLogger):
    """Appends one JSON object per `log_metrics` call to a file.

    Each line is `{"step": step, <metric>: value, ...}`. A resumed run passes
    `resume_step`: lines of later steps (written after the checkpoint it
    resumes from) are dropped, so the file reads as one uninterrupted run.

    Args:
        path: str or Path. The `.jsonl` file (parents created).
        resume_step: None starts an empty file; an int keeps the existing
            lines whose `step` is <= it (a resumed run).
        step_key: the name of the step field.
    """

    def __init__(
        self,
        path: str | Path,
        resume_step: int | None = None,
        step_key: str = "step",
    ):
        self.path = Path(path)
        self.step_key = step_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if int(record.get(step_key, 0)) <= resume_step:
                    kept.append(line)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.path)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        record = {self.step_key: int(step or 0), **finite_metrics(metrics)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


class FanOutLogger(NullLogger):
    """Forwards every call to each of `loggers`, in order.

    Args:
        *loggers: objects of the `Logger` protocol (None entries skipped).
    """

    def __init__(self, *loggers: Logger | None):
        self.loggers = [logger for logger in loggers if logger is not None]

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_params(params)

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None
    ) -> None:
        for logger in self.loggers:
            logger.log_artifact(path, artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        for logger in self.loggers:
            logger.log_dict(data, artifact_file)

    def close(self) -> None:
        for logger in self.loggers:
            close = getattr(logger, "close", None)
            if close is not None:
                close()
