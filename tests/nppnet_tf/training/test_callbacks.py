"""Tests of the loop loggers."""

import json
import math

from nppnet_tf.training.callbacks import (
    FanOutLogger,
    JSONLinesLogger,
    Logger,
    NullLogger,
    TensorBoardLogger,
    finite_metrics,
)


class _Recorder(NullLogger):
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", dict(metrics), step))

    def log_artifact(self, path, artifact_path=None):
        self.calls.append(("artifact", str(path), artifact_path))


def test_finite_metrics_drops_nan_inf_and_non_numbers():
    assert finite_metrics(
        {"a": 1, "b": math.nan, "c": -math.inf, "d": "x"}
    ) == {"a": 1.0}


def test_jsonl_logger_writes_and_truncates_on_resume(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    logger = JSONLinesLogger(path)
    for step in (1, 2, 3):
        logger.log_metrics({"loss": step / 10, "bad": math.nan}, step)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": s, "loss": s / 10} for s in (1, 2, 3)]
    with path.open("a") as handle:
        handle.write('{"step": 4, "loss"')  # cut short by a kill
    JSONLinesLogger(path, resume_step=2).log_metrics({"loss": 0.5}, 3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[-1]["loss"] == 0.5
    JSONLinesLogger(path)  # a new run starts an empty file
    assert path.read_text() == ""


def test_tensorboard_logger_writes_scalars(tmp_path):
    import tensorflow as tf

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log_metrics({"weight/total": 2.5, "nan": math.nan}, step=3)
    logger.close()
    tags = {}
    for event_file in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags[value.tag] = (event.step, tf.make_ndarray(value.tensor))
    assert tags.keys() == {"weight/total"}
    assert (
        tags["weight/total"][0] == 3 and float(tags["weight/total"][1]) == 2.5
    )


def test_fan_out_forwards_every_call():
    first, second = _Recorder(), _Recorder()
    logger = FanOutLogger(first, None, second)
    logger.log_metrics({"a": 1.0}, 5)
    logger.log_artifact("x.json", "epochs/000")
    assert (
        first.calls
        == second.calls
        == [
            ("metrics", {"a": 1.0}, 5),
            ("artifact", "x.json", "epochs/000"),
        ]
    )
    assert isinstance(logger, Logger) and isinstance(NullLogger(), Logger)
