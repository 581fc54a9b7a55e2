"""Checkpoints, loop state and clean stops for search and training loops.

`TrainingState` holds what a loop needs besides the model and optimisers
to continue exactly where it stopped: the epoch in progress, the steps done
in it, the global step and the random state (a `tf.random.Generator` from
which each epoch's data seed is drawn, and that seed). `Checkpointer` saves
everything a loop registers (model, optimisers, loss lambdas, state) with a
`tf.train.CheckpointManager`:

* Atomicity. TensorFlow writes a checkpoint's data and index files first,
  then replaces the `checkpoint` state file that names the latest
  checkpoint with an atomic rename. A process killed during a save leaves
  the state file naming the previous, complete checkpoint (stray files of
  the unfinished one are ignored and overwritten). We add: the new files
  and the directory are fsynced after each save (local disks), and
  `restore` falls back to the previous kept checkpoint when the latest one
  cannot be read (e.g. a power cut between the rename and the data
  reaching the disk).
* Several workers (`MultiWorkerMirroredStrategy`): every worker saves, as
  TensorFlow requires; the chief into the checkpoint directory, the others
  into a temporary directory that is deleted right away. Every worker
  restores from the chief's directory, so it must be on storage they share.

`GracefulStop` turns SIGTERM and SIGINT into a flag that the loop checks
after each step: it finishes the step, saves and returns. A second signal
of the same kind raises `KeyboardInterrupt` at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tensorflow as tf

log = logging.getLogger(__name__)


class TrainingState:
    """Position and random state of a loop, saved with every checkpoint.

    Create it outside any distribution strategy scope: these are host-side
    values that every worker keeps identical by updating them the same way.

    Args:
        seed: int. Seeds the generator of the per-epoch data seeds.

    Attributes:
        epoch: int64 variable, the epoch in progress (0-based).
        step_in_epoch: int64 variable, steps completed in that epoch.
        global_step: int64 variable, steps completed in all.
        epoch_seed: int64 variable, the data seed of the epoch in progress.
        generator: `tf.random.Generator` the epoch seeds are drawn from.
    """

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        with tf.device("/cpu:0"):
            self.epoch = tf.Variable(0, dtype=tf.int64, name="epoch")
            self.step_in_epoch = tf.Variable(
                0, dtype=tf.int64, name="step_in_epoch"
            )
            self.global_step = tf.Variable(
                0, dtype=tf.int64, name="global_step"
            )
            self.epoch_seed = tf.Variable(0, dtype=tf.int64, name="epoch_seed")
            self.generator = tf.random.Generator.from_seed(seed)

    def trackables(self) -> dict[str, Any]:
        """The objects to put in a `tf.train.Checkpoint`."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_seed": self.epoch_seed,
            "generator": self.generator,
        }

    def start_epoch(self) -> int:
        """Draws the data seed of the epoch in progress (call at its start).

        Returns:
            The seed, a non-negative int below 2**31.
        """
        value = self.generator.uniform_full_int([], tf.int64)
        seed = int(value.numpy()) & 0x7FFFFFFF
        self.epoch_seed.assign(seed)
        return seed

    def finish_step(self) -> int:
        """Counts one completed step; returns the new global step."""
        self.step_in_epoch.assign_add(1)
        return int(self.global_step.assign_add(1).numpy())

    def finish_epoch(self) -> None:
        """Moves to the next epoch."""
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)

    def position(self) -> tuple[int, int, int]:
        """`(epoch, step_in_epoch, global_step)` as ints."""
        return (
            int(self.epoch.numpy()),
            int(self.step_in_epoch.numpy()),
            int(self.global_step.numpy()),
        )


class Checkpointer:
    """Saves and restores one `tf.train.Checkpoint` of a loop.

    Args:
        directory: str or Path. The checkpoint directory (the chief's).
        max_to_keep: int. Checkpoints kept on disk.
        is_chief: bool. False on non-chief workers (they save into a
            temporary directory that is deleted after each save).
        **objects: trackables to save (model, optimisers, variables, ...).

    Raises:
        ValueError: no objects, or `max_to_keep` < 1.
    """

    def __init__(
        self,
        directory: str | Path,
        max_to_keep: int = 3,
        is_chief: bool = True,
        **objects: Any,
    ):
        if not objects:
            raise ValueError("Checkpointer needs at least one object to save.")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = str(directory)
        self.is_chief = is_chief
        self.checkpoint = tf.train.Checkpoint(**objects)
        # The chief's manager also lists what exists, for every worker.
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.directory, max_to_keep=max_to_keep
        )

    @property
    def latest(self) -> str | None:
        """Prefix of the newest checkpoint the state file names, or None."""
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str | None:
        """Writes a checkpoint numbered `step`.

        Args:
            step: int. The global step (the checkpoint's number).

        Returns:
            The checkpoint prefix on the chief, None on other workers.
        """
        if not self.is_chief:
            scratch = tempfile.mkdtemp(prefix="nppnet_ckpt_worker_")
            try:
                self.checkpoint.write(os.path.join(scratch, "ckpt"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return None
        path = self.manager.save(checkpoint_number=int(step))
        _fsync_checkpoint(path, self.directory)
        log.debug("saved checkpoint %s", path)
        return path

    def restore(self) -> str | None:
        """Restores the newest readable checkpoint.

        Tries the kept checkpoints from newest to oldest; one that cannot
        be read (missing or damaged files) is skipped with a warning.

        Returns:
            The prefix restored, or None when there is no checkpoint.

        Raises:
            RuntimeError: checkpoints exist but none can be restored, or a
                checkpoint does not match the objects (another model).
        """
        candidates = list(reversed(self.manager.checkpoints))
        if not candidates:
            return None
        errors = []
        for prefix in candidates:
            try:
                status = self.checkpoint.restore(prefix)
                status.assert_existing_objects_matched()
            except tf.errors.OpError as err:  # missing or damaged files
                log.warning("checkpoint %s cannot be restored: %s", prefix, err)
                errors.append(f"{prefix}: {err}")
                continue
            except (AssertionError, ValueError) as err:  # other shapes/objects
                raise RuntimeError(
                    f"checkpoint {prefix} does not match this loop's "
                    f"objects (another model or config?): {err}"
                ) from None
            log.info("restored checkpoint %s", prefix)
            return prefix
        raise RuntimeError(
            "no checkpoint in "
            f"{self.directory} could be restored:\n  " + "\n  ".join(errors)
        )


def _fsync_checkpoint(prefix: str, directory: str) -> None:
    """fsyncs a checkpoint's files and its directory (local paths only)."""
    if "://" in prefix:
        return
    paths: Iterable[Path] = Path(prefix).parent.glob(Path(prefix).name + ".*")
    for path in [*paths, Path(directory) / "checkpoint"]:
        try:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        except OSError:
            pass
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GracefulStop:
    """SIGTERM/SIGINT -> a flag the loop checks between steps.

    Use as a context manager around the loop; previous handlers come back
    on exit. Outside the main thread no handler is installed (Python only
    allows them there) and `requested` stays False.

    Attributes:
        signal_number: the first signal received, or None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, number, frame) -> None:
        if self.signal_number == number:
            raise KeyboardInterrupt(
                f"second {signal.Signals(number).name}: stopping at once"
            )
        if self.signal_number is None:
            self.signal_number = number
            log.warning(
                "%s received: finishing the current step, then saving a "
                "checkpoint and stopping (send it again to stop at once)",
                signal.Signals(number).name,
            )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
