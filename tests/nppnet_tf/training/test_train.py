"""Tests of the final-training loop (`run_training`) on tiny records.

The network is the toy of `toy_network.py` (the real NPPNet traces for
more than a minute per process; tests/pipeline/test_train_command.py has a
slow end-to-end run of the real tiny one). Op determinism is process-wide
and irreversible in TensorFlow, so the in-process tests replace
`enable_op_determinism` by a recorder, as the search loop tests do (CPU
kernels are deterministic for a fixed thread pool in practice).
"""

import json
import math
import os
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.search.genotype import Genotype
from nppnet_tf.training import loop, outputs
from nppnet_tf.training.callbacks import NullLogger
from nppnet_tf.training.loop import BestModel
from nppnet_tf.training.train import NonFiniteLossError, run_training
from tests.nppnet_tf.training.toy_network import ToyNetwork
from tests.nppnet_tf.training.train_fixtures import (
    AUTHORS_GENOTYPE,
    STEPS_PER_EPOCH,
    search_records,
    tiny_config,
)

ONE_DEVICE = ["/cpu:0"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return search_records(tmp_path_factory)[0]


@pytest.fixture(autouse=True)
def no_global_determinism(monkeypatch):
    calls = []
    monkeypatch.setattr(
        tf.config.experimental,
        "enable_op_determinism",
        lambda: calls.append(True),
    )
    return calls


class RecordingLogger(NullLogger):
    def __init__(self, on_metrics=None):
        self.metrics, self.params, self.artifacts, self.dicts = [], {}, [], []
        self.on_metrics = on_metrics

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))
        if self.on_metrics:
            self.on_metrics(step, metrics)

    def log_params(self, params):
        self.params.update(params)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path).name, artifact_path))

    def log_dict(self, data, artifact_file):
        self.dicts.append(artifact_file)


def _train(
    records, out_dir, strategy, logger=None, train_config=None, **kwargs
):
    return run_training(
        tiny_config(**(train_config or {})),
        records,
        out_dir,
        strategy=strategy,
        logger=logger,
        **kwargs,
    )


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _weights(path):
    model = keras.saving.load_model(path, compile=False)
    return [np.array(v.numpy()) for v in model.variables]


def test_training_writes_every_output(
    records, tmp_path, make_mirrored_strategy, no_global_determinism
):
    """Three epochs validated every second epoch (and after the last), from
    initial stem and encoder weights; every output of docs/training.md."""
    keras.utils.set_random_seed(11)
    source = ToyNetwork(channels=8)
    source.build((None, 64, 64, 3))
    source.save(tmp_path / "init.keras")
    logger = RecordingLogger()
    out = tmp_path / "out"
    result = _train(
        records,
        out,
        make_mirrored_strategy(ONE_DEVICE),
        logger=logger,
        train_config=dict(
            epochs=3,
            eval_every_epochs=2,
            init_weights=str(tmp_path / "init.keras"),
        ),
    )
    assert no_global_determinism == [True]
    assert result.status == "completed" and result.epochs_completed == 3
    assert result.global_step == 3 * STEPS_PER_EPOCH
    for name in (
        "best.keras",
        "best.json",
        "final.keras",
        "report.json",
        "report.md",
        "report.html",
        "init_weights_report.json",
        "summary.json",
        "metrics.jsonl",
    ):
        assert (out / name).stat().st_size, name
    assert not (out / outputs.PENDING).exists()
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "official" and report["flip"] is True
    assert report["images"] == 4 and report["model"].endswith("best.keras")
    assert 0 <= report["parsing"]["mean_iou"] <= 100
    assert 0 <= report["pose"]["average"] <= 100
    assert result.metrics["final/miou"] == report["parsing"]["mean_iou"]
    assert "overlays/" in (out / "report.md").read_text()
    # Initial weights: the toy's stems and encoders, by name and shape.
    init = json.loads((out / "init_weights_report.json").read_text())
    assert init["kind"] == "keras" and init["counts"]["loaded"] == 14
    assert init["counts"]["missing"] == init["counts"]["skipped_shape"] == 0
    assert "pose_encoder_1/moving_mean" in init["loaded"]
    # Validation after epochs 1 and 2 (0-based) only; best by the rule.
    validations = [r for r in _jsonl(out / "metrics.jsonl") if "val/miou" in r]
    assert [r["epoch"] for r in validations] == [1, 2]
    best = json.loads((out / "best.json").read_text())
    assert best["epoch"] in (1, 2)
    assert report["best_epoch"] == best["epoch"]
    # best.keras is the best epoch's network, final.keras the last one.
    best_model = keras.saving.load_model(out / "best.keras", compile=False)
    predicted = best_model(np.zeros((1, 64, 64, 3), "float32"))
    assert predicted["parsing"].shape == (1, 16, 16, 20)
    if best["epoch"] == 2:
        for a, b in zip(
            _weights(out / "best.keras"), _weights(out / "final.keras")
        ):
            np.testing.assert_array_equal(a, b)
    # Per-step metrics: losses, lambdas, the three learning rates (the
    # MultiStep milestone at epoch 1 multiplies all by 0.2).
    steps = [r for r in _jsonl(out / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in steps] == list(range(1, 19))
    first, later = steps[0], steps[-1]
    assert first["lr/network_adam"] == pytest.approx(3e-3)
    assert first["lr/encoder_adam"] == pytest.approx(6e-4)
    assert first["lr/lambda_adam"] == pytest.approx(1e-4)
    assert later["lr/network_adam"] == pytest.approx(6e-4)
    assert later["lr/lambda_adam"] == pytest.approx(2e-5)
    assert {"lambda/pose_lambdas_1", "loss/parsing_ohem_stage2"} <= set(first)
    assert later["loss/total"] < first["loss/total"]
    # The logger saw the same, the final scores and the artifacts.
    assert logger.params["train.steps_per_epoch"] == STEPS_PER_EPOCH
    assert logger.params["train.init_weights_loaded"] == 14
    assert any("final/miou" in m for _, m in logger.metrics)
    logged = {name for name, _ in logger.artifacts}
    assert {"best.keras", "final.keras", "report.json", "overlays"} <= logged
    assert "init_weights_report.json" in logged
    assert "train_result.json" in logger.dicts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best_model"] == str(out / "best.keras")


def test_resume_after_a_stop_matches_an_uninterrupted_run(
    records, tmp_path, make_mirrored_strategy
):
    straight = _train(
        records, tmp_path / "straight", make_mirrored_strategy(ONE_DEVICE)
    )
    # Stop in the middle of the second epoch (step 8 of 12), then resume.
    stopped = _train(
        records,
        tmp_path / "resumed",
        make_mirrored_strategy(ONE_DEVICE),
        max_steps=8,
    )
    assert stopped.status == "max_steps" and stopped.global_step == 8
    assert stopped.checkpoint.endswith("ckpt-8")
    assert stopped.final_model and stopped.report  # a finished shorter run
    with pytest.raises(FileExistsError, match="--resume"):
        _train(
            records, tmp_path / "resumed", make_mirrored_strategy(ONE_DEVICE)
        )
    resumed = _train(
        records,
        tmp_path / "resumed",
        make_mirrored_strategy(ONE_DEVICE),
        resume=True,
    )
    assert resumed.status == "completed" and resumed.global_step == 12
    for name in ("final.keras", "best.keras"):
        for a, b in zip(
            _weights(tmp_path / "straight" / name),
            _weights(tmp_path / "resumed" / name),
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert straight.metrics == resumed.metrics
    first = tf.train.load_checkpoint(straight.checkpoint)
    second = tf.train.load_checkpoint(resumed.checkpoint)
    for key in first.get_variable_to_shape_map():
        if key.endswith("VARIABLE_VALUE") and "save_counter" not in key:
            np.testing.assert_array_equal(
                first.get_tensor(key), second.get_tensor(key), err_msg=key
            )
    lines = {
        r["step"]: r
        for r in _jsonl(tmp_path / "resumed/metrics.jsonl")
        if "loss/total" in r
    }
    reference = {
        r["step"]: r
        for r in _jsonl(tmp_path / "straight/metrics.jsonl")
        if "loss/total" in r
    }
    assert sorted(lines) == list(range(1, 13))
    for step in (8, 9, 12):
        assert lines[step]["loss/total"] == reference[step]["loss/total"]


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    records, tmp_path, make_mirrored_strategy, monkeypatch
):
    real = loop.epoch_dataset

    def poisoned(context, seed):
        def corrupt(index, batch):
            # NaN target heatmaps: a NaN loss whatever the network does
            # (the toy's ReLU maps NaN images to 0).
            images, targets = batch
            heatmaps = targets["heatmaps"]
            bad = tf.where(index == 2, heatmaps * np.nan, heatmaps)
            return images, {**targets, "heatmaps": bad}

        return real(context, seed).enumerate().map(corrupt)

    monkeypatch.setattr(loop, "epoch_dataset", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError) as raised:
        _train(records, out, make_mirrored_strategy(ONE_DEVICE))
    error = raised.value
    assert error.global_step == 3 and error.epoch == 0
    assert "loss/total" in error.values
    assert str(error).startswith("non-finite loss at step 3 (epoch 0)")
    assert error.checkpoint.endswith("ckpt-2") and "ckpt-2" in str(error)
    assert tf.train.latest_checkpoint(str(out / "checkpoints")).endswith(
        "ckpt-2"
    )
    assert not list((out / "checkpoints").glob("ckpt-3*"))
    reader = tf.train.load_checkpoint(str(out / "checkpoints" / "ckpt-2"))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name


def test_a_signal_finishes_the_step_saves_and_returns(
    records, tmp_path, make_mirrored_strategy
):
    def send(step, metrics):
        if step == 3 and "loss/total" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result = _train(
        records,
        tmp_path / "out",
        make_mirrored_strategy(ONE_DEVICE),
        logger=RecordingLogger(on_metrics=send),
    )
    assert signal.getsignal(signal.SIGTERM) is previous
    assert result.status == "interrupted"
    assert result.signal_number == signal.SIGTERM
    assert result.global_step == 3 and result.checkpoint.endswith("ckpt-3")
    assert result.final_model is None and result.report is None
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["status"] == "interrupted"


@pytest.mark.parametrize(
    "offers, best_epoch",
    [
        ([(50.0, 80.0)], 0),  # the first validated epoch always wins
        ([(50.0, 80.0), (50.1, 79.1)], 1),  # mIoU up, PCKh -0.9
        ([(50.0, 80.0), (50.1, 78.9)], 0),  # mIoU up, PCKh -1.1
        ([(50.0, 80.0), (49.0, 81.1)], 1),  # PCKh +1.1 whatever the mIoU
        ([(50.0, 80.0), (49.0, 80.9)], 0),
        ([(50.0, 80.0), (50.0, 80.5)], 0),  # equal mIoU, PCKh < +1
        ([(50.0, 80.0), (math.nan, 90.0)], 0),  # NaN never wins
        ([(10.0, 10.0), (20.0, 9.5), (25.0, 8.0), (24.0, 9.6)], 3),
    ],
)
def test_best_model_follows_the_authors_rule(offers, best_epoch):
    best = BestModel()
    for epoch, (miou, pckh) in enumerate(offers):
        best.offer(epoch, miou, pckh)
    assert best.summary()["epoch"] == best_epoch
    assert best.summary()["miou"] == offers[best_epoch][0]


def test_best_files_agree_with_the_restored_checkpoint(tmp_path):
    model = ToyNetwork(channels=2)
    model.build((None, 64, 64, 3))
    # Killed between the checkpoint recording epoch 3 and the rename.
    outputs.save_pending_best(tmp_path, model, {"epoch": 3})
    outputs.restore_best_files(tmp_path, {"epoch": 3})
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 3
    assert (tmp_path / "best.keras").exists()
    assert not (tmp_path / outputs.PENDING).exists()
    # Killed before that checkpoint: the pending model is dropped.
    outputs.save_pending_best(tmp_path, model, {"epoch": 5})
    outputs.restore_best_files(tmp_path, {"epoch": 3})
    assert not (tmp_path / outputs.PENDING).exists()
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 3
    # An older checkpoint than the best file (a damaged newest one).
    outputs.restore_best_files(tmp_path, {"epoch": 1})
    assert not (tmp_path / "best.keras").exists()


def test_bad_arguments_fail_early(records, tmp_path, make_mirrored_strategy):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    with pytest.raises(ValueError, match="larger than the train split"):
        _train(
            records, tmp_path / "a", strategy, train_config=dict(batch_size=32)
        )
    with pytest.raises(ValueError, match="max_steps"):
        _train(records, tmp_path / "b", strategy, max_steps=0)
    two = make_mirrored_strategy(["/cpu:0", "/cpu:1"])
    with pytest.raises(ValueError, match="not a multiple of the 2 replicas"):
        _train(records, tmp_path / "c", two, train_config=dict(batch_size=3))
    with pytest.raises(ValueError, match="merge_call"):
        _train(
            records, tmp_path / "d", two, train_config=dict(jit_compile=True)
        )
    with pytest.raises(FileNotFoundError):
        _train(str(tmp_path), tmp_path / "e", strategy)
    with pytest.raises(ValueError, match="needs"):
        _train(
            records,
            tmp_path / "f",
            strategy,
            genotype=Genotype.load(AUTHORS_GENOTYPE).cells_only(),
        )
    with pytest.raises(ValueError, match="cannot be imported"):
        _train(
            records,
            tmp_path / "g",
            strategy,
            train_config=dict(network="no.such:thing"),
        )
