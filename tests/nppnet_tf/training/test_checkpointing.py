"""Tests of checkpoints, loop state and clean stops."""

import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.training.checkpointing import (
    Checkpointer,
    GracefulStop,
    TrainingState,
)
from nppnet_tf.training.optimizers import TorchAdam


def _model(seed: int = 0, width: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(width),
            keras.layers.BatchNormalization(),
        ]
    )
    return model


def _train_step(model, optimizer, seed):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(8, 4)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x, training=True) ** 2)
    optimizer.apply(
        tape.gradient(loss, model.trainable_variables),
        model.trainable_variables,
    )


def _everything(model, optimizer, state):
    return (
        [v.numpy().copy() for v in model.variables]
        + [v.numpy().copy() for v in optimizer.variables]
        + [
            v.numpy()
            for v in state.trackables().values()
            if isinstance(v, tf.Variable)
        ]
        + [state.generator.state.numpy().copy()]
    )


def _setup(directory, seed=0, max_to_keep=3):
    model = _model(seed)
    optimizer = TorchAdam(1e-2)
    optimizer.build(model.trainable_variables)
    state = TrainingState(seed=5)
    checkpointer = Checkpointer(
        directory,
        max_to_keep,
        model=model,
        optimizer=optimizer,
        **state.trackables(),
    )
    return model, optimizer, state, checkpointer


def test_training_state_counts_and_draws_reproducible_epoch_seeds():
    first, second = TrainingState(seed=3), TrainingState(seed=3)
    seeds = [first.start_epoch() for _ in range(3)]
    assert seeds == [second.start_epoch() for _ in range(3)]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**31 for s in seeds)
    assert TrainingState(seed=4).start_epoch() != seeds[0]
    assert first.finish_step() == 1 and first.finish_step() == 2
    first.finish_epoch()
    assert first.position() == (1, 0, 2)
    with pytest.raises(ValueError, match="seed"):
        TrainingState(seed=-1)


def test_save_and_restore_everything_including_the_random_state(tmp_path):
    model, optimizer, state, checkpointer = _setup(tmp_path / "ckpt")
    state.start_epoch()
    _train_step(model, optimizer, 1)
    state.finish_step()
    path = checkpointer.save(1)
    assert path.endswith("ckpt-1") and checkpointer.latest == path
    saved = _everything(model, optimizer, state)
    next_seed = TrainingState(seed=5)
    next_seed.start_epoch()
    expected_next = next_seed.start_epoch()

    # A fresh process: other initial values, then restore.
    model2, optimizer2, state2, checkpointer2 = _setup(
        tmp_path / "ckpt", seed=9
    )
    assert checkpointer2.restore() == path
    for a, b in zip(saved, _everything(model2, optimizer2, state2)):
        np.testing.assert_array_equal(a, b)
    # The generator continues where it was: the next epoch seed matches.
    assert state2.start_epoch() == expected_next
    # And training continues identically.
    _train_step(model, optimizer, 2)
    _train_step(model2, optimizer2, 2)
    for a, b in zip(model.variables, model2.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_restore_without_checkpoints_returns_none(tmp_path):
    *_, checkpointer = _setup(tmp_path / "empty")
    assert checkpointer.restore() is None
    assert checkpointer.latest is None


def test_an_unfinished_save_is_ignored(tmp_path):
    """Files of a save killed before the state file was replaced are not
    restored: the state file still names the previous checkpoint."""
    directory = tmp_path / "ckpt"
    model, optimizer, state, checkpointer = _setup(directory)
    path = checkpointer.save(1)
    saved = _everything(model, optimizer, state)
    (directory / "ckpt-2.index").write_bytes(b"partial")
    (directory / "ckpt-2.data-00000-of-00001").write_bytes(b"\x00" * 10)
    model2, optimizer2, state2, checkpointer2 = _setup(directory, seed=4)
    assert checkpointer2.restore() == path
    for a, b in zip(saved, _everything(model2, optimizer2, state2)):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, caplog
):
    directory = tmp_path / "ckpt"
    model, optimizer, state, checkpointer = _setup(directory)
    first = checkpointer.save(1)
    saved = _everything(model, optimizer, state)
    _train_step(model, optimizer, 3)
    second = checkpointer.save(2)
    data = next(directory.glob("ckpt-2.data-*"))
    data.write_bytes(b"\x00" * data.stat().st_size)  # zeroed by a power cut
    (directory / "ckpt-2.index").write_bytes(b"garbage")
    model2, optimizer2, state2, checkpointer2 = _setup(directory, seed=4)
    with caplog.at_level("WARNING"):
        assert checkpointer2.restore() == first
    assert second in caplog.text
    for a, b in zip(saved, _everything(model2, optimizer2, state2)):
        np.testing.assert_array_equal(a, b)


def test_restore_of_another_model_fails_clearly(tmp_path):
    *_, checkpointer = _setup(tmp_path / "ckpt")
    checkpointer.save(1)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(7)])
    mismatched = Checkpointer(tmp_path / "ckpt", model=other)
    with pytest.raises(RuntimeError, match="does not match"):
        mismatched.restore()


def test_keeps_only_the_newest_checkpoints(tmp_path):
    *_, checkpointer = _setup(tmp_path / "ckpt", max_to_keep=2)
    for step in (2, 4, 6):
        checkpointer.save(step)
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.index"))
    assert names == ["ckpt-4.index", "ckpt-6.index"]


def test_a_non_chief_worker_writes_nothing_in_the_directory(tmp_path):
    model = _model()
    checkpointer = Checkpointer(tmp_path / "ckpt", is_chief=False, model=model)
    assert checkpointer.save(1) is None
    assert not (tmp_path / "ckpt").exists() or not any(
        (tmp_path / "ckpt").iterdir()
    )


def test_checkpointer_needs_objects_and_a_positive_keep(tmp_path):
    with pytest.raises(ValueError, match="at least one object"):
        Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, 0, model=_model())


def test_graceful_stop_turns_signals_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_number == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # another kind: still a flag
        assert stop.signal_number == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous
