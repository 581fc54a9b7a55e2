"""Final training of the derived network (reference 6; docs/training.md).

`run_training(config, records_dir, out_dir, genotype)` trains the derived
network of a genotype (`NPPNet`) on the `train` split with the authors'
recipe (`train_step.TrainStep`: three Adam groups, per-epoch MultiStep),
optionally from initial stem and encoder weights (`init_weights`). It
builds the strategy, the network (under the configured dtype policy), the
loss, the optimisers and the checkpoint, restores it on `resume`, then
runs the epochs (`loop.py`: validation, best model, checkpoints, stops)
and, at the end or at `max_steps`, writes `final.keras` and the final
evaluation of the best model with `train.final_protocol` (`outputs.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import tensorflow as tf

from nppnet_tf import distribute
from nppnet_tf.config import RunConfig
from nppnet_tf.data import dataset as input_pipeline
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.training import checkpointing, loop, outputs
from nppnet_tf.training.callbacks import (
    FanOutLogger,
    JSONLinesLogger,
    Logger,
    NullLogger,
    TensorBoardLogger,
)
from nppnet_tf.training.init_weights import ModelVariables, load_init_weights
from nppnet_tf.training.loop import BestModel, NonFiniteLossError
from nppnet_tf.training.losses import NPPNetLoss
from nppnet_tf.training.outputs import TrainResult
from nppnet_tf.training.train_step import TrainStep, dtype_policy

log = logging.getLogger(__name__)


def build_network(config: RunConfig, genotype: Genotype) -> keras.Model:
    """The built `NPPNet` of `genotype` at `train.init_channels`,
    `train.layers` (call inside the strategy scope)."""
    from nppnet_tf.models.nppnet import NPPNet

    model = NPPNet(
        genotype,
        init_channels=config.train.init_channels,
        num_cells=config.train.layers,
        sync_batchnorm=distribute.synchronise_batchnorm(
            config.distribute.sync_batchnorm
        ),
    )
    size = config.data.image_size
    model.build((None, size, size, 3))
    return model


def _builder(path: str | None):
    """`build_network`, or the `train.network` builder `module:function`."""
    if path is None:
        return build_network
    import importlib

    module_name, function_name = path.split(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"train.network = {path!r} cannot be imported: {err}"
        ) from None


def run_training(
    config: RunConfig,
    records_dir: str,
    out_dir: str | Path,
    genotype: Genotype | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    logger: Logger | None = None,
    strategy: tf.distribute.Strategy | None = None,
    final_evaluation: bool = True,
) -> TrainResult:
    """Runs (or resumes) the final training; see the module docstring.

    Args:
        config: the run config (`train`, `data`, `augment`, `loss`,
            `distribute`).
        records_dir: the preprocessing output (`train` and `val` splits).
        out_dir: where everything goes (docs/training.md, Outputs).
        genotype: the trained architecture; None loads `train.genotype`.
        max_steps: stop after this many steps in all (a checkpoint, the
            final model and the final evaluation are written; a stop at the
            end of an epoch finishes that epoch).
        resume: continue from the newest checkpoint in `out_dir`.
        logger: where metrics and artifacts are reported (e.g. MLflow);
            TensorBoard and `metrics.jsonl` are always written.
        strategy: a `tf.distribute` strategy; None creates one from
            `config.distribute`.
        final_evaluation: end with the final evaluation (the pipeline's
            evaluate stage does it instead: `outputs.evaluate_trained_model`).

    Returns:
        A `TrainResult`.

    Raises:
        ValueError: batch sizes that do not fit the data or the replicas,
            records written with another data config, a bad genotype or
            initial weights.
        FileNotFoundError: missing splits, genotype or initial weights.
        FileExistsError: `out_dir` holds checkpoints and `resume` is False.
        NonFiniteLossError: a loss became NaN or infinite.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    train = config.train
    out_dir = Path(out_dir)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(train.seed)
    # TensorFlow's global seed 0 breaks tf.data shuffles seeded with a
    # tensor (see search.loop): seed + 1.
    tf.random.set_seed(train.seed + 1)
    strategy = strategy or distribute.create_strategy(config.distribute)
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    for name in ("batch_size", "val_batch_size"):
        value = getattr(train, name)
        if value % replicas:
            raise ValueError(
                f"train.{name} = {value} is not a multiple of the "
                f"{replicas} replicas in sync"
            )
    input_pipeline.check_records_config(records_dir, config.data)
    examples = input_pipeline.count_examples(records_dir, "train")
    steps_per_epoch = examples // train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"train.batch_size = {train.batch_size} is larger than the train "
            f"split ({examples} images) in {records_dir}: no full batch"
        )
    checkpoint_dir = out_dir / "checkpoints"
    if not resume and tf.train.latest_checkpoint(str(checkpoint_dir)):
        raise FileExistsError(
            f"{checkpoint_dir} already holds a training checkpoint; pass "
            "--resume to continue it, or choose another output directory"
        )
    if genotype is None:
        genotype = Genotype.load(train.genotype)
    genotype.require_complete("the trained network")

    builder = _builder(train.network)
    with strategy.scope():
        with dtype_policy(train.mixed_precision):
            model = builder(config, genotype)
        loss = NPPNetLoss(config.loss)
        step = TrainStep(model, loss, train, strategy)
    state = checkpointing.TrainingState(train.seed)
    best = BestModel()
    extra = {"loss_scale": step.loss_scale} if step.loss_scale else {}
    checkpointer = checkpointing.Checkpointer(
        checkpoint_dir,
        train.keep_checkpoints,
        is_chief=chief,
        model=ModelVariables(model),
        loss_weights=loss.uncertainty,
        **step.optimizers,
        **extra,
        **state.trackables(),
        best=best,
    )
    restored = checkpointer.restore() if resume else None
    epoch, step_in_epoch, global_step = state.position()
    if resume and restored is None:
        log.info("no checkpoint in %s: starting a new training", checkpoint_dir)
    elif restored:
        log.info(
            "resuming the training at epoch %d, step %d of the epoch (%d in "
            "all)",
            epoch,
            step_in_epoch,
            global_step,
        )

    loggers: list[Logger] = [logger or NullLogger()] if chief else []
    if chief:
        out_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(TensorBoardLogger(out_dir / "tensorboard"))
        loggers.append(
            JSONLinesLogger(
                out_dir / "metrics.jsonl",
                resume_step=global_step if restored else None,
            )
        )
    fan_out = FanOutLogger(*loggers)
    init_report = _initial_weights(
        config, model, out_dir, fan_out, chief, restored
    )
    fan_out.log_params(
        {
            "train.replicas": replicas,
            "train.strategy": type(strategy).__name__,
            "train.steps_per_epoch": steps_per_epoch,
            "train.train_examples": examples,
            "train.records_dir": str(records_dir),
            "train.genotype_fingerprint": genotype.fingerprint(),
            "train.parameters": int(model.count_params()),
            "train.resumed_from": restored or "",
        }
    )
    context = loop.Context(
        config=config,
        records_dir=str(records_dir),
        out_dir=out_dir,
        genotype=genotype,
        strategy=strategy,
        chief=chief,
        model=model,
        builder=builder,
        step=step,
        state=state,
        best=best,
        checkpointer=checkpointer,
        logger=fan_out,
        validation=loop.validation_dataset(records_dir, config),
        steps_per_epoch=steps_per_epoch,
        stop=checkpointing.GracefulStop(),
        init_report=init_report,
        final_evaluation=final_evaluation,
    )
    if distribute.is_multi_worker(strategy):
        context.agree = loop.stop_agreement(strategy)
    # One traced signature for every batch (all batches are full).
    sample = input_pipeline.distribute(loop.epoch_dataset(context, 0), strategy)
    step.set_batch_spec(sample.element_spec)
    if restored and chief:
        outputs.restore_best_files(out_dir, best.summary())
    try:
        with context.stop:
            return loop.run_epochs(context, max_steps)
    finally:
        fan_out.close()


def _initial_weights(config, model, out_dir, logger, chief, restored):
    """Loads `train.init_weights` into a new run; returns the report path."""
    path = config.train.init_weights
    report_path = out_dir / "init_weights_report.json"
    if not path:
        return None
    if restored:
        log.info("resumed: the initial weights came with the first run")
        return str(report_path) if report_path.exists() else None
    report = load_init_weights(model, path)
    if chief:
        outputs.write_json(report_path, report.to_dict())
        logger.log_artifact(report_path)
        logger.log_params(
            {
                "train.init_weights_loaded": len(report.loaded),
                "train.init_weights_skipped_shape": len(report.skipped_shape),
                "train.init_weights_missing": len(report.missing),
            }
        )
    return str(report_path)


__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "build_network",
    "dtype_policy",
    "run_training",
]
