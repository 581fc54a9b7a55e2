"""The epochs of the final training (`train.run_training` sets them up).

Each epoch draws its data seed from the checkpointed generator and builds
that epoch's augmented pipeline (full batches only), so a resumed run
rebuilds the same epoch and skips the steps already done. The learning
rates of the three groups follow the per-epoch MultiStep schedule. After
every `train.eval_every_epochs` epochs (and after the last): validation
with the flip test on the first `train.val_examples` val images
(`evaluate_crops`) and the best model by the authors' rule
(`search.selection.is_better`). Checkpoints every
`train.checkpoint_every_steps` steps and at the end of every epoch;
SIGTERM/SIGINT finish the step, save and return; a non-finite loss raises
`NonFiniteLossError` without saving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from nppnet_tf.config import RunConfig
from nppnet_tf.data import dataset as input_pipeline
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.search.selection import is_better
from nppnet_tf.training import checkpointing, outputs, schedules
from nppnet_tf.training.callbacks import Logger
from nppnet_tf.training.train_step import TrainStep

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the training stopped without saving.

    Attributes:
        epoch: the 0-based epoch.
        global_step: the step (1-based count) whose loss was not finite.
        values: the non-finite loss terms by name.
        checkpoint: the last good checkpoint kept, or None.
    """

    def __init__(
        self,
        epoch: int,
        global_step: int,
        values: dict[str, float],
        checkpoint: str | None,
    ):
        self.epoch = epoch
        self.global_step = global_step
        self.values = values
        self.checkpoint = checkpoint
        terms = ", ".join(f"{k} = {v}" for k, v in sorted(values.items()))
        kept = (
            f"the last good checkpoint {checkpoint} is kept (--resume "
            "continues from it)"
            if checkpoint
            else "no checkpoint had been written yet"
        )
        super().__init__(
            f"non-finite loss at step {global_step} (epoch {epoch}): "
            f"{terms}; the training stopped without saving this state; "
            f"{kept}"
        )


class BestModel(tf.Module):
    """The best validated epoch so far, checkpointed with the loop."""

    def __init__(self):
        super().__init__(name="best_model")
        with tf.device("/cpu:0"):
            # -inf, not the authors' 0: the first validated epoch is
            # always a best (docs/training.md, Deviations).
            self.miou = tf.Variable(-np.inf, dtype=tf.float64, name="miou")
            self.pckh = tf.Variable(-np.inf, dtype=tf.float64, name="pckh")
            self.epoch = tf.Variable(-1, dtype=tf.int64, name="epoch")

    def offer(self, epoch: int, miou: float, pckh: float) -> bool:
        """Takes the epoch if it beats the best (the authors' rule,
        `search.selection.is_better`)."""
        if not is_better(
            miou, pckh, float(self.miou.numpy()), float(self.pckh.numpy())
        ):
            return False
        self.miou.assign(miou)
        self.pckh.assign(pckh)
        self.epoch.assign(epoch)
        return True

    def summary(self) -> dict[str, Any]:
        return {
            "epoch": int(self.epoch.numpy()),
            "miou": float(self.miou.numpy()),
            "pckh": float(self.pckh.numpy()),
        }


@dataclasses.dataclass
class Context:
    """Everything the epoch functions share (built by `run_training`)."""

    config: RunConfig
    records_dir: str
    out_dir: Path
    genotype: Genotype
    strategy: tf.distribute.Strategy
    chief: bool
    model: keras.Model
    builder: Any
    step: TrainStep
    state: checkpointing.TrainingState
    best: BestModel
    checkpointer: checkpointing.Checkpointer
    logger: Logger
    validation: tf.data.Dataset
    steps_per_epoch: int
    stop: checkpointing.GracefulStop
    init_report: str | None = None
    agree: Any = None
    float32_model: keras.Model | None = None
    final_evaluation: bool = True


def validation_dataset(records_dir: str, config: RunConfig) -> tf.data.Dataset:
    train = config.train
    dataset = input_pipeline.make_dataset(
        records_dir,
        "val",
        config.data,
        train.val_batch_size,
        training=False,
        include_metadata=True,
    )
    if train.val_examples:
        # The authors validate on the first 5000 val images.
        dataset = (
            dataset.unbatch()
            .take(train.val_examples)
            .batch(train.val_batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    return dataset


def epoch_dataset(context: Context, seed: int) -> tf.data.Dataset:
    """The global batches of one epoch (the last incomplete one dropped,
    as the authors' loader)."""
    config = context.config
    return input_pipeline.make_dataset(
        context.records_dir,
        "train",
        config.data,
        config.train.batch_size,
        training=True,
        augment_config=config.augment,
        seed=seed,
        deterministic=config.train.deterministic,
        drop_remainder=True,
    )


def stop_agreement(strategy):
    """A function `flag -> bool`: whether any worker wants to stop."""

    @tf.function
    def agree(flag):
        per_replica = strategy.run(lambda: tf.identity(flag))
        return strategy.reduce(
            tf.distribute.ReduceOp.MAX, per_replica, axis=None
        )

    return lambda wanted: bool(agree(tf.constant(float(wanted))).numpy() > 0)


def _stop_requested(context: Context) -> bool:
    if context.agree is not None:
        return context.agree(context.stop.requested)
    return context.stop.requested


def run_epochs(context: Context, max_steps: int | None):
    epochs = context.config.train.epochs
    state = context.state
    last_metrics: dict[str, Any] = {}
    first_epoch = state.position()[0]
    if first_epoch >= epochs:
        log.info("the training already finished %d epochs", epochs)
    for epoch in range(first_epoch, epochs):
        outcome = _train_epoch(context, epoch, max_steps)
        if outcome in ("interrupted", "max_steps"):
            path = context.checkpointer.save(state.position()[2])
            if outcome == "interrupted":
                return _interrupted(context, last_metrics, path)
            return outputs.finish(context, "max_steps", last_metrics, path)
        last_metrics = _end_of_epoch(context, epoch) or last_metrics
        state.finish_epoch()
        path = context.checkpointer.save(state.position()[2])
        if context.chief:
            outputs.promote_best(context.out_dir)
        global_step = state.position()[2]
        if max_steps is not None and global_step >= max_steps:
            if epoch + 1 < epochs:
                return outputs.finish(context, "max_steps", last_metrics, path)
        if _stop_requested(context):
            return _interrupted(context, last_metrics, path)
    return outputs.finish(context, "completed", last_metrics, None)


def _interrupted(context, metrics, checkpoint):
    return outputs.result(
        context,
        "interrupted",
        metrics,
        checkpoint=checkpoint,
        signal_number=context.stop.signal_number,
    )


def _train_epoch(context: Context, epoch: int, max_steps: int | None) -> str:
    """Runs the rest of one epoch; returns `done`, `max_steps` or
    `interrupted`."""
    train = context.config.train
    state, step = context.state, context.step
    _, done, global_step = state.position()
    if done == 0:
        state.start_epoch()
    seed = int(state.epoch_seed.numpy())
    total = context.steps_per_epoch
    rates = schedules.apply_learning_rates(
        step.base_learning_rates(), epoch, train.lr_milestones, train.lr_gamma
    )
    dataset = epoch_dataset(context, seed).take(total).skip(done)
    distributed = input_pipeline.distribute(dataset, context.strategy)
    running: dict[str, list[float]] = {}
    outcome = "done"
    started, first_done = time.time(), done
    with tqdm(
        total=total,
        initial=done,
        desc=f"train epoch {epoch + 1}/{train.epochs}",
        unit="step",
        disable=not context.chief,
        dynamic_ncols=True,
    ) as bar:
        for element in distributed:
            metrics = step(element)
            values = {key: float(value) for key, value in metrics.items()}
            _check_finite(context, epoch, global_step + 1, values)
            global_step = state.finish_step()
            done += 1
            for key in ("loss/total", "loss/pose", "loss/parsing"):
                running.setdefault(key, []).append(values[key])
            bar.set_postfix(
                {
                    key.split("/")[1]: f"{np.mean(series):.4f}"
                    for key, series in running.items()
                },
                refresh=False,
            )
            bar.update(1)
            if global_step % train.log_every_steps == 0 or done == total:
                seconds = time.time() - started
                context.logger.log_metrics(
                    {
                        **values,
                        **_lambda_values(step),
                        **{f"lr/{name}": rate for name, rate in rates.items()},
                        "train/images_per_second": (done - first_done)
                        * train.batch_size
                        / max(seconds, 1e-9),
                        "epoch": epoch,
                    },
                    step=global_step,
                )
            if _stop_requested(context):
                return "interrupted"
            if (
                train.checkpoint_every_steps
                and global_step % train.checkpoint_every_steps == 0
                and done < total
            ):
                context.checkpointer.save(global_step)
            if max_steps is not None and global_step >= max_steps:
                if done < total:
                    outcome = "max_steps"
                    break
    if outcome == "done" and done < total:
        raise RuntimeError(
            f"epoch {epoch} ended after {done} of {total} steps: the input "
            "pipeline yielded fewer batches than the split count promises"
        )
    return outcome


def _check_finite(
    context: Context, epoch: int, global_step: int, values: dict[str, float]
) -> None:
    bad = {
        key: value
        for key, value in values.items()
        if key.startswith("loss/") and not math.isfinite(value)
    }
    if bad:
        raise NonFiniteLossError(
            epoch, global_step, bad, context.checkpointer.latest
        )


def _lambda_values(step: TrainStep) -> dict[str, float]:
    out = {}
    for variable in step.lambda_variables:
        name = variable.name.split("/")[-1].split(":")[0]
        for index, value in enumerate(np.ravel(variable.numpy())):
            out[f"lambda/{name}_{index + 1}"] = float(value)
    return out


def _end_of_epoch(context: Context, epoch: int) -> dict[str, Any] | None:
    """Validation and best model after `epoch`, if it is a validated one."""
    from nppnet_tf.evaluation.evaluate import evaluate_crops

    train = context.config.train
    last = epoch + 1 == train.epochs
    if (epoch + 1) % train.eval_every_epochs and not last:
        return None
    started = time.time()
    model = outputs.float32_model(context)
    scores = evaluate_crops(
        model,
        context.validation,
        flip=True,
        strategy=context.strategy,
        progress=context.chief,
    )
    improved = context.best.offer(epoch, scores["miou"], scores["pckh"])
    if improved and context.chief:
        outputs.save_pending_best(
            context.out_dir, model, context.best.summary()
        )
    metrics = {
        "val/miou": scores["miou"],
        "val/pckh": scores["pckh"],
        "val/pckh_upper_body": scores["pckh_upper_body"],
        "val/pixel_accuracy": scores["pixel_accuracy"],
        "val/images": scores["num_images"],
        "best/epoch": int(context.best.epoch.numpy()),
        "best/miou": float(context.best.miou.numpy()),
        "best/pckh": float(context.best.pckh.numpy()),
    }
    context.logger.log_metrics(
        {**metrics, "epoch": epoch},
        step=int(context.state.global_step.numpy()),
    )
    log.info(
        "epoch %d: val mIoU %.2f, PCKh %.2f%s (%.0f s)",
        epoch,
        scores["miou"],
        scores["pckh"],
        ", new best" if improved else "",
        time.time() - started,
    )
    return metrics
