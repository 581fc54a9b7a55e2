"""Tests of the search epoch loop on tiny records.

The fast tests search the toy supernet (`toy_supernet.py`); the slow one
runs the real tiny supernets of both stages. Op determinism is process-wide
and irreversible in TensorFlow, so the in-process tests replace
`enable_op_determinism` by a recorder (CPU kernels are deterministic for a
fixed thread pool in practice; the subprocess test in
tests/pipeline/test_search_command.py runs with the real switch).
"""

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.search import architecture_file, loop
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.search.loop import NonFiniteLossError, run_search
from nppnet_tf.search.selection import is_better
from nppnet_tf.training.callbacks import NullLogger
from tests.nppnet_tf.search.search_fixtures import search_records, tiny_config
from tests.nppnet_tf.search.toy_supernet import search_toy

AUTHORS = (
    Path(__file__).resolve().parents[3] / "configs/genotypes/nppnet_lip.json"
)
ONE_DEVICE = ["/cpu:0"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return search_records(tmp_path_factory)


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
        self.artifacts.append((str(path), artifact_path))

    def log_dict(self, data, artifact_file):
        self.dicts.append(artifact_file)


def _search(
    records, out_dir, strategy, stage="interaction", logger=None, **kwargs
):
    config = tiny_config(**kwargs.pop("search", {}))
    base = Genotype.load(AUTHORS) if stage == "interaction" else None
    return run_search(
        config,
        stage,
        records[0],
        out_dir,
        base_genotype=base,
        strategy=strategy,
        model_builder=search_toy,
        logger=logger,
        **kwargs,
    )


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_is_better_is_the_authors_rule():
    assert is_better(50.0, 80.0, -math.inf, -math.inf)  # the first epoch
    assert is_better(50.1, 79.1, 50.0, 80.0)  # mIoU up, PCKh -0.9
    assert not is_better(50.1, 78.9, 50.0, 80.0)  # mIoU up, PCKh -1.1
    assert is_better(49.0, 81.1, 50.0, 80.0)  # PCKh +1.1 whatever mIoU
    assert not is_better(49.0, 80.9, 50.0, 80.0)
    assert not is_better(50.0, 80.5, 50.0, 80.0)  # equal mIoU, PCKh < +1
    assert not is_better(math.nan, 90.0, 50.0, 80.0)


def test_search_writes_every_epoch_output(
    records, tmp_path, make_mirrored_strategy, no_global_determinism
):
    logger = RecordingLogger()
    result = _search(
        records,
        tmp_path / "out",
        make_mirrored_strategy(ONE_DEVICE),
        logger=logger,
        search=dict(lr_milestones=(1,)),
    )
    out = tmp_path / "out"
    assert result.status == "completed" and result.epochs_completed == 2
    assert result.global_step == 8  # 4 warm-up + 4 search steps (batch 2)
    assert no_global_determinism == [True]
    for epoch in ("000", "001"):
        epoch_dir = out / "epochs" / epoch
        arrays = architecture_file.load_architecture(
            epoch_dir / "architecture.npz"
        )
        assert (
            Genotype.from_json(str(arrays["base_genotype"]))
            == Genotype.load(AUTHORS).cells_only()
        )
        genotype = Genotype.load(epoch_dir / "genotype.json")
        assert genotype.is_complete
        assert (
            genotype.pose_encoder_normal
            == Genotype.load(AUTHORS).pose_encoder_normal
        )
        for field in (
            "encoder_parsing_to_pose",
            "pose_fusion",
            "parsing_decoder",
        ):
            for suffix in ("svg", "png"):
                assert (
                    (epoch_dir / "diagrams" / f"{field}.{suffix}")
                    .stat()
                    .st_size
                )
        assert (epoch_dir / "architecture_weights.png").stat().st_size
        metrics = json.loads((epoch_dir / "metrics.json").read_text())
        assert {"val/miou", "val/pckh", "entropy/pose_fusion"} <= set(metrics)
        assert 0 <= metrics["parameter_free/mean"] <= 1
    # The warm-up epoch does not touch the architecture; the next one does.
    warm = architecture_file.load_architecture(
        out / "epochs/000/architecture.npz"
    )
    searched = architecture_file.load_architecture(out / "architecture.npz")
    np.testing.assert_array_equal(warm["pose_fusion/alphas"], 1e-3)
    assert np.abs(searched["pose_fusion/alphas"] - 1e-3).max() > 1e-4
    assert (out / "genotype.json").read_text() == (
        out / "epochs/001/genotype.json"
    ).read_text()
    best = json.loads((out / "best.json").read_text())
    assert (
        Path(result.best_genotype).read_text()
        == (
            out / "epochs" / f"{best['epoch']:03d}" / "genotype.json"
        ).read_text()
    )
    # Per-step metrics: losses, lambdas, learning rates (MultiStep at 1).
    steps = [r for r in _jsonl(out / "metrics.jsonl") if "weight/total" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all("architecture/objective" not in r for r in steps[:4])
    assert all("architecture/entropy" in r for r in steps[4:])
    assert [r["lr/weight_adam"] for r in steps] == pytest.approx(
        [1e-3] * 4 + [2e-4] * 4
    )
    assert [r["lr/lambda_adam"] for r in steps] == pytest.approx(
        [1e-4] * 4 + [2e-5] * 4
    )
    assert {"lambda/pose_lambdas_1", "lambda/parsing_lambdas_2"} <= set(
        steps[0]
    )
    assert {r["entropy_weight"] for r in steps[4:]} == {2.0}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # The logger saw the same, plus the per-epoch artifacts and results.
    epoch_metrics = [m for _, m in logger.metrics if "val/miou" in m]
    assert [m["epoch"] for m in epoch_metrics] == [0, 1]
    assert ("%s" % (out / "epochs/001"), "epochs/001") in logger.artifacts
    assert str(out / "genotype.json") in [path for path, _ in logger.artifacts]
    assert logger.params["search.steps_per_epoch"] == 4
    assert "search_result.json" in logger.dicts


def test_resume_after_a_stop_matches_an_uninterrupted_run(
    records, tmp_path, make_mirrored_strategy
):
    straight = _search(
        records, tmp_path / "straight", make_mirrored_strategy(ONE_DEVICE)
    )
    # Stop mid-way through the search epoch (step 6 of 8), then resume.
    stopped = _search(
        records,
        tmp_path / "resumed",
        make_mirrored_strategy(ONE_DEVICE),
        max_steps=6,
    )
    assert stopped.status == "max_steps" and stopped.global_step == 6
    assert stopped.checkpoint.endswith("ckpt-6")
    with pytest.raises(FileExistsError, match="--resume"):
        _search(
            records, tmp_path / "resumed", make_mirrored_strategy(ONE_DEVICE)
        )
    resumed = _search(
        records,
        tmp_path / "resumed",
        make_mirrored_strategy(ONE_DEVICE),
        resume=True,
    )
    assert resumed.status == "completed" and resumed.global_step == 8
    first = architecture_file.load_architecture(straight.architecture)
    second = architecture_file.load_architecture(resumed.architecture)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert (
        Path(straight.genotype).read_text()
        == Path(resumed.genotype).read_text()
    )
    assert straight.metrics == resumed.metrics
    # The metrics file reads as one run: every step once, same values.
    lines = {
        r["step"]: r
        for r in _jsonl(tmp_path / "resumed/metrics.jsonl")
        if "weight/total" in r
    }
    reference = {
        r["step"]: r
        for r in _jsonl(tmp_path / "straight/metrics.jsonl")
        if "weight/total" in r
    }
    assert sorted(lines) == list(range(1, 9))
    assert (
        lines[8]["architecture/objective"]
        == reference[8]["architecture/objective"]
    )


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    records, tmp_path, make_mirrored_strategy, monkeypatch
):
    real = loop._epoch_dataset

    def poisoned(context, seed, warmup):
        def corrupt(index, batch):
            images, targets = batch
            images = tf.where(index == 2, images * np.nan, images)
            return images, targets

        return real(context, seed, warmup).enumerate().map(corrupt)

    monkeypatch.setattr(loop, "_epoch_dataset", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError) as raised:
        _search(records, out, make_mirrored_strategy(ONE_DEVICE))
    error = raised.value
    assert error.global_step == 3 and error.epoch == 0
    assert "weight/total" in error.values
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
        if step == 3 and "weight/total" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result = _search(
        records,
        tmp_path / "out",
        make_mirrored_strategy(ONE_DEVICE),
        logger=RecordingLogger(on_metrics=send),
    )
    assert signal.getsignal(signal.SIGTERM) is previous
    assert result.status == "interrupted"
    assert result.signal_number == signal.SIGTERM
    assert result.global_step == 3 and result.checkpoint.endswith("ckpt-3")
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["status"] == "interrupted"


def test_max_steps_at_the_end_of_an_epoch_finishes_it(
    records, tmp_path, make_mirrored_strategy
):
    result = _search(
        records,
        tmp_path / "out",
        make_mirrored_strategy(ONE_DEVICE),
        max_steps=4,
        search=dict(checkpoint_every_steps=0),
    )
    assert result.status == "max_steps" and result.epochs_completed == 1
    assert (tmp_path / "out/epochs/000/genotype.json").exists()
    assert result.checkpoint.endswith("ckpt-4")


def test_bad_arguments_fail_early(records, tmp_path, make_mirrored_strategy):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    with pytest.raises(ValueError, match="unknown search stage"):
        _search(records, tmp_path / "a", strategy, stage="fusion")
    with pytest.raises(ValueError, match="base genotype"):
        run_search(
            tiny_config(),
            "interaction",
            records[0],
            tmp_path / "b",
            strategy=strategy,
        )
    with pytest.raises(ValueError, match="larger than a search split"):
        _search(records, tmp_path / "c", strategy, search=dict(batch_size=16))
    with pytest.raises(ValueError, match="max_steps"):
        _search(records, tmp_path / "d", strategy, max_steps=0)
    two = make_mirrored_strategy(["/cpu:0", "/cpu:1"])
    with pytest.raises(ValueError, match="not a multiple of the 2 replicas"):
        _search(records, tmp_path / "e", two, search=dict(batch_size=3))
    with pytest.raises(FileNotFoundError, match="search_weights"):
        _search((str(tmp_path), {}), tmp_path / "f", strategy)


@pytest.mark.slow
def test_the_real_tiny_supernets_search_both_stages(records, tmp_path):
    """Both stages on the real supernets (C = 8, 4 cells): the encoder-decoder
    genotype becomes the interaction stage's base."""
    import dataclasses

    from nppnet_tf import distribute

    tf.distribute.MirroredStrategy._collective_key_base += 100000
    strategy = distribute.create_strategy(tiny_config().distribute)
    config = tiny_config(epochs=1, encoder_decoder_epochs=1, warmup_epochs=0)
    config = dataclasses.replace(config)
    first = run_search(
        config,
        "encoder-decoder",
        records[0],
        tmp_path / "ed",
        strategy=strategy,
    )
    cells = Genotype.load(first.genotype)
    assert not cells.is_complete
    second = run_search(
        config,
        "interaction",
        records[0],
        tmp_path / "inter",
        base_genotype=cells,
        strategy=strategy,
    )
    full = Genotype.load(second.genotype)
    assert full.is_complete
    assert full.pose_decoder == cells.pose_decoder
    assert full.cells_only() == cells
    for result in (first, second):
        assert result.status == "completed" and result.best_genotype
