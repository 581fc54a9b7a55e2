"""The epoch loop of the bilevel search (reference 5; docs/search.md).

`run_search(config, stage, records_dir, out_dir, ...)` searches one stage:

* `encoder-decoder`: `EncoderDecoderSupernet`, the task-specific normal,
  reduction and decoder cells; it writes a cells-only genotype;
* `interaction`: `InteractionSupernet` on the cells of a base genotype
  (the first stage's, or the authors'), the four interactions and the two
  fusion cells; it writes a complete genotype.

Each epoch draws its data seed from the checkpointed generator and builds
that epoch's augmented `search_weights` (and, after the warm-up,
`search_arch`) pipelines, so a resumed run rebuilds the same epoch and
skips the steps already done. Warm-up epochs train the weights only on the
whole `search_weights` split; later epochs iterate over both splits zipped
(the shorter one ends the epoch), a weight step then an architecture step
per iteration (`bilevel.BilevelSearch`). The weight learning rates follow
the per-epoch MultiStep schedule; the entropy regulariser is on in epochs
after `search.entropy_start_epoch`.

After every epoch: validation with the flip test on the first
`search.val_examples` val images (`evaluate_crops`), the architecture
arrays (`architecture.npz`), the derived genotype, its diagrams, a heatmap
of the op weights, collapse monitors (mean normalised entropy per space,
share of parameter-free ops chosen) and the best genotype by the authors'
rule (`is_better`), all under `out_dir/epochs/<epoch>/` and reported
through the logger. Checkpoints every `search.checkpoint_every_steps` steps
and at the end of every epoch; SIGTERM/SIGINT finish the step, save and
return; a non-finite loss raises `NonFiniteLossError` without saving.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from nppnet_tf import distribute
from nppnet_tf.config import RunConfig
from nppnet_tf.data import dataset as input_pipeline
from nppnet_tf.search import derive, outputs
from nppnet_tf.search.bilevel import BilevelSearch
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.search.selection import BestGenotype
from nppnet_tf.training import checkpointing, schedules
from nppnet_tf.training.callbacks import (
    FanOutLogger,
    JSONLinesLogger,
    Logger,
    NullLogger,
    TensorBoardLogger,
)
from nppnet_tf.training.losses import NPPNetLoss

log = logging.getLogger(__name__)

STAGES = ("encoder-decoder", "interaction")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the search stopped without saving.

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
            f"non-finite loss at step {global_step} (epoch {epoch}): {terms}; "
            f"the search stopped without saving this state; {kept}"
        )


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `run_search` produced.

    Attributes:
        stage: the search stage.
        status: `completed` (every epoch), `max_steps` (stopped at
            `max_steps`) or `interrupted` (SIGTERM/SIGINT; checkpoint saved).
        out_dir: the output directory.
        genotype: `genotype.json` of the last epoch (or of the current
            parameters at `max_steps`), None if not written.
        best_genotype: `best_genotype.json`, None before the first epoch.
        architecture: `architecture.npz` next to `genotype`.
        metrics: the last epoch's metrics (validation and monitors).
        epochs_completed: epochs finished.
        global_step: steps done in all.
        checkpoint: the newest checkpoint.
        signal_number: the signal that stopped the run, if any.
    """

    stage: str
    status: str
    out_dir: str
    genotype: str | None
    best_genotype: str | None
    architecture: str | None
    metrics: dict[str, Any]
    epochs_completed: int
    global_step: int
    checkpoint: str | None
    signal_number: int | None = None


def build_supernet(
    stage: str,
    config: RunConfig,
    base_genotype: Genotype | None = None,
) -> keras.Model:
    """The built supernet of a stage (call inside the strategy scope).

    Raises:
        ValueError: an unknown stage, or the interaction stage without a
            base genotype.
    """
    from nppnet_tf.models.encoder_decoder_supernet import (
        EncoderDecoderSupernet,
    )
    from nppnet_tf.models.interaction_supernet import InteractionSupernet

    search = config.search
    sync = distribute.synchronise_batchnorm(config.distribute.sync_batchnorm)
    if stage == "encoder-decoder":
        model = EncoderDecoderSupernet(
            init_channels=search.init_channels,
            num_cells=search.layers,
            partial_channels=search.partial_channels,
            sync_batchnorm=sync,
        )
    elif stage == "interaction":
        if base_genotype is None:
            raise ValueError(
                "the interaction search needs a base genotype for its fixed "
                "encoder and decoder cells (the encoder-decoder search's "
                "genotype.json or configs/genotypes/nppnet_lip.json)"
            )
        model = InteractionSupernet(
            base_genotype,
            init_channels=search.init_channels,
            num_cells=search.layers,
            sync_batchnorm=sync,
        )
    else:
        raise ValueError(f"unknown search stage {stage!r} (one of {STAGES})")
    size = config.data.image_size
    model.build((None, size, size, 3))
    return model


def _builder(path: str | None):
    """`build_supernet`, or the `search.supernet` builder `module:function`."""
    if path is None:
        return build_supernet
    import importlib

    module_name, function_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"search.supernet = {path!r} cannot be imported: {err}"
        ) from None


@dataclasses.dataclass
class _Context:
    """Everything the epoch functions share (internal)."""

    config: RunConfig
    stage: str
    records_dir: str
    out_dir: Path
    base_genotype: Genotype | None
    strategy: tf.distribute.Strategy
    chief: bool
    model: keras.Model
    search: BilevelSearch
    state: checkpointing.TrainingState
    best: BestGenotype
    checkpointer: checkpointing.Checkpointer
    logger: Logger
    validation: tf.data.Dataset
    steps: dict[str, int]
    stop: checkpointing.GracefulStop
    agree: Any = None


def run_search(
    config: RunConfig,
    stage: str,
    records_dir: str,
    out_dir: str | Path,
    base_genotype: Genotype | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    logger: Logger | None = None,
    strategy: tf.distribute.Strategy | None = None,
    model_builder=None,
) -> SearchResult:
    """Runs (or resumes) one search stage; see the module docstring.

    Args:
        config: the run config (`search`, `data`, `augment`, `loss`,
            `distribute`).
        stage: `encoder-decoder` or `interaction`.
        records_dir: the preprocessing output (`search_weights`,
            `search_arch`, `val` splits).
        out_dir: where everything goes (see docs/search.md, Outputs).
        base_genotype: the fixed cells of the interaction stage (stored in
            its `architecture.npz` and completing its genotypes).
        max_steps: stop after this many steps in all (a checkpoint is
            saved; a stop at the end of an epoch finishes that epoch).
        resume: continue from the newest checkpoint in `out_dir`.
        logger: where metrics and artifacts are reported (e.g. MLflow);
            TensorBoard and `metrics.jsonl` are always written.
        strategy: a `tf.distribute` strategy; None creates one from
            `config.distribute`.
        model_builder: `(stage, config, base_genotype) -> built model`;
            None: `search.supernet` if set, else `build_supernet`.

    Returns:
        A `SearchResult`.

    Raises:
        ValueError: a bad stage, missing base genotype, batch sizes that do
            not fit the data or the replicas, or records written with
            another data config.
        FileNotFoundError: missing splits in `records_dir`.
        FileExistsError: `out_dir` holds checkpoints and `resume` is False.
        NonFiniteLossError: a loss became NaN or infinite.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown search stage {stage!r} (one of {STAGES})")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    search_config = config.search
    out_dir = Path(out_dir)
    if search_config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(search_config.seed)
    # TensorFlow's global seed 0 breaks tf.data shuffles seeded with a
    # tensor (`random_seed.get_seed` compares (0, op seed) to (0, 0) in
    # Python), which the per-epoch input pipelines are: use seed + 1.
    tf.random.set_seed(search_config.seed + 1)
    strategy = strategy or distribute.create_strategy(config.distribute)
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    for name in ("batch_size", "val_batch_size"):
        value = getattr(search_config, name)
        if value % replicas:
            raise ValueError(
                f"search.{name} = {value} is not a multiple of the "
                f"{replicas} replicas in sync"
            )
    steps = _steps_per_epoch(records_dir, config)
    checkpoint_dir = out_dir / "checkpoints"
    if not resume and tf.train.latest_checkpoint(str(checkpoint_dir)):
        raise FileExistsError(
            f"{checkpoint_dir} already holds a search checkpoint; pass "
            "--resume to continue it, or choose another output directory"
        )
    if stage == "interaction" and base_genotype is None:
        raise ValueError(
            "the interaction search needs a base genotype for its fixed "
            "encoder and decoder cells (the encoder-decoder search's "
            "genotype.json or configs/genotypes/nppnet_lip.json)"
        )
    if stage == "encoder-decoder" and base_genotype is not None:
        log.info("the encoder-decoder search ignores the base genotype")
        base_genotype = None
    if base_genotype is not None:
        base_genotype = base_genotype.cells_only()

    builder = model_builder or _builder(search_config.supernet)
    with strategy.scope():
        model = builder(stage, config, base_genotype)
        loss = NPPNetLoss(config.loss)
        search = BilevelSearch(model, loss, search_config, strategy)
    state = checkpointing.TrainingState(search_config.seed)
    best = BestGenotype()
    checkpointer = checkpointing.Checkpointer(
        checkpoint_dir,
        search_config.keep_checkpoints,
        is_chief=chief,
        model=model,
        loss_weights=loss.uncertainty,
        **search.optimizers,
        **state.trackables(),
        best=best,
    )
    restored = checkpointer.restore() if resume else None
    epoch, step_in_epoch, global_step = state.position()
    if resume and restored is None:
        log.info("no checkpoint in %s: starting a new search", checkpoint_dir)
    elif restored:
        log.info(
            "resuming %s search at epoch %d, step %d of the epoch (%d in all)",
            stage,
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
    fan_out.log_params(
        {
            "search.stage": stage,
            "search.replicas": replicas,
            "search.strategy": type(strategy).__name__,
            "search.steps_per_epoch": steps["search"],
            "search.warmup_steps_per_epoch": steps["warmup"],
            "search.records_dir": str(records_dir),
            "search.resumed_from": restored or "",
        }
    )
    context = _Context(
        config=config,
        stage=stage,
        records_dir=str(records_dir),
        out_dir=out_dir,
        base_genotype=base_genotype,
        strategy=strategy,
        chief=chief,
        model=model,
        search=search,
        state=state,
        best=best,
        checkpointer=checkpointer,
        logger=fan_out,
        validation=_validation_dataset(records_dir, config),
        steps=steps,
        stop=checkpointing.GracefulStop(),
    )
    if distribute.is_multi_worker(strategy):
        context.agree = _stop_agreement(strategy)
    # One traced signature for every batch (all batches are full).
    sample = input_pipeline.distribute(
        _epoch_dataset(context, 0, warmup=True), strategy
    )
    search.set_batch_spec(sample.element_spec)
    if restored and chief:
        outputs.restore_best(out_dir, best.genotype(), best.summary())
    try:
        with context.stop:
            return _run_epochs(context, max_steps)
    finally:
        fan_out.close()


def _steps_per_epoch(records_dir: str, config: RunConfig) -> dict[str, int]:
    """Steps of a warm-up epoch and of a search epoch (full batches)."""
    batch = config.search.batch_size
    counts = {
        split: input_pipeline.count_examples(records_dir, split)
        for split in input_pipeline.SEARCH_SPLITS
    }
    warmup = counts["search_weights"] // batch
    search = min(counts.values()) // batch
    if search < 1:
        raise ValueError(
            f"search.batch_size = {batch} is larger than a search split "
            f"({counts}) in {records_dir}: no full batch per epoch"
        )
    return {"warmup": warmup, "search": search, **counts}


def _validation_dataset(records_dir: str, config: RunConfig) -> tf.data.Dataset:
    search = config.search
    dataset = input_pipeline.make_dataset(
        records_dir,
        "val",
        config.data,
        search.val_batch_size,
        training=False,
        include_metadata=True,
    )
    if search.val_examples:
        # The authors validate on the first 5000 val images.
        dataset = (
            dataset.unbatch()
            .take(search.val_examples)
            .batch(search.val_batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    return dataset


def _epoch_dataset(
    context: _Context, seed: int, warmup: bool
) -> tf.data.Dataset:
    """The global batches of one epoch (full batches only, see
    docs/search.md, Deviations)."""
    config = context.config
    common = dict(
        augment_config=config.augment,
        seed=seed,
        deterministic=config.search.deterministic,
        drop_remainder=True,
    )
    if warmup:
        return input_pipeline.make_dataset(
            context.records_dir,
            "search_weights",
            config.data,
            config.search.batch_size,
            training=True,
            **common,
        )
    return input_pipeline.paired_search_dataset(
        context.records_dir, config.data, config.search.batch_size, **common
    )


def _stop_agreement(strategy):
    """A function `flag -> bool`: whether any worker wants to stop."""

    @tf.function
    def agree(flag):
        per_replica = strategy.run(lambda: tf.identity(flag))
        # ReduceOp has no MAX: any worker's flag makes the sum positive.
        return strategy.reduce(
            tf.distribute.ReduceOp.SUM, per_replica, axis=None
        )

    return lambda wanted: bool(agree(tf.constant(float(wanted))).numpy() > 0)


def _stop_requested(context: _Context) -> bool:
    if context.agree is not None:
        return context.agree(context.stop.requested)
    return context.stop.requested


def _run_epochs(context: _Context, max_steps: int | None) -> SearchResult:
    config = context.config.search
    epochs = config.epochs_of(context.stage)
    state = context.state
    last_metrics: dict[str, Any] = {}
    first_epoch, _, global_step = state.position()
    if first_epoch >= epochs:
        log.info(
            "the %s search already finished %d epochs", context.stage, epochs
        )
        return _result(context, "completed", last_metrics)
    for epoch in range(first_epoch, epochs):
        outcome = _train_epoch(context, epoch, max_steps)
        if outcome == "interrupted":
            path = context.checkpointer.save(state.position()[2])
            return _result(
                context,
                "interrupted",
                last_metrics,
                checkpoint=path,
                signal_number=context.stop.signal_number,
            )
        if outcome == "max_steps":
            path = context.checkpointer.save(state.position()[2])
            if context.chief:
                arrays = context.model.architecture_arrays()
                outputs.write_current(
                    context.out_dir,
                    arrays,
                    _derive(context, arrays),
                    context.base_genotype,
                )
            return _result(context, "max_steps", last_metrics, checkpoint=path)
        last_metrics = _finish_epoch(context, epoch)
        # Tracing left millions of long-lived graph objects; frozen, they
        # no longer make every full garbage collection take seconds.
        gc.freeze()
        state.finish_epoch()
        path = context.checkpointer.save(state.position()[2])
        global_step = state.position()[2]
        if (
            max_steps is not None
            and global_step >= max_steps
            and epoch + 1 < epochs
        ):
            return _result(context, "max_steps", last_metrics, checkpoint=path)
        if _stop_requested(context):
            return _result(
                context,
                "interrupted",
                last_metrics,
                checkpoint=path,
                signal_number=context.stop.signal_number,
            )
    result = _result(context, "completed", last_metrics)
    if context.chief:
        for path in (
            result.genotype,
            result.best_genotype,
            result.architecture,
        ):
            if path:
                context.logger.log_artifact(path)
        context.logger.log_dict(
            dataclasses.asdict(result), "search_result.json"
        )
    return result


def _train_epoch(context: _Context, epoch: int, max_steps: int | None) -> str:
    """Runs the rest of one epoch; returns `done`, `max_steps` or
    `interrupted`."""
    config = context.config.search
    state, search = context.state, context.search
    _, done, global_step = state.position()
    if done == 0:
        state.start_epoch()
    seed = int(state.epoch_seed.numpy())
    warmup = epoch < config.warmup_epochs
    total = context.steps["warmup" if warmup else "search"]
    rates = schedules.apply_learning_rates(
        search.base_learning_rates(),
        epoch,
        config.lr_milestones,
        config.lr_gamma,
    )
    entropy_weight = (
        config.entropy_weight if epoch > config.entropy_start_epoch else 0.0
    )
    dataset = _epoch_dataset(context, seed, warmup).take(total).skip(done)
    distributed = input_pipeline.distribute(dataset, context.strategy)
    running: dict[str, list[float]] = {}
    description = (
        f"{context.stage} epoch {epoch + 1}/{config.epochs_of(context.stage)}"
        + (" (warm-up)" if warmup else "")
    )
    outcome = "done"
    with tqdm(
        total=total,
        initial=done,
        desc=description,
        unit="step",
        disable=not context.chief,
        dynamic_ncols=True,
    ) as bar:
        for element in distributed:
            if warmup:
                metrics = search.weight_step(element)
            else:
                metrics = search.iteration(*element, entropy_weight)
            values = {key: float(value) for key, value in metrics.items()}
            _check_finite(context, epoch, global_step + 1, values)
            global_step = state.finish_step()
            done += 1
            for key in ("weight/total", "architecture/objective"):
                if key in values:
                    running.setdefault(key, []).append(values[key])
            bar.set_postfix(
                {
                    key.split("/")[0]: f"{np.mean(series):.4f}"
                    for key, series in running.items()
                },
                refresh=False,
            )
            bar.update(1)
            if global_step % config.log_every_steps == 0 or done == total:
                context.logger.log_metrics(
                    {
                        **values,
                        **_lambda_values(search),
                        **{
                            f"lr/{name}": value for name, value in rates.items()
                        },
                        "lr/architecture_adam": config.arch_lr,
                        "entropy_weight": entropy_weight,
                        "epoch": epoch,
                    },
                    step=global_step,
                )
            if _stop_requested(context):
                return "interrupted"
            if (
                config.checkpoint_every_steps
                and global_step % config.checkpoint_every_steps == 0
                and done < total
            ):
                context.checkpointer.save(global_step)
            if (
                max_steps is not None
                and global_step >= max_steps
                and done < total
            ):
                outcome = "max_steps"
                break
            if done == total:
                # The epoch's length is known: asking the distributed
                # iterator for the end of its data costs minutes for a
                # large graph.
                break
    if outcome == "done" and done < total:
        raise RuntimeError(
            f"epoch {epoch} ended after {done} of {total} steps: the input "
            "pipeline yielded fewer batches than the split counts promise"
        )
    return outcome


def _check_finite(
    context: _Context, epoch: int, global_step: int, values: dict[str, float]
) -> None:
    bad = {
        key: value for key, value in values.items() if not math.isfinite(value)
    }
    if bad:
        raise NonFiniteLossError(
            epoch, global_step, bad, context.checkpointer.latest
        )


def _lambda_values(search: BilevelSearch) -> dict[str, float]:
    out = {}
    for variable in search.lambda_variables:
        name = variable.name.split("/")[-1].split(":")[0]
        for index, value in enumerate(np.ravel(variable.numpy())):
            out[f"lambda/{name}_{index + 1}"] = float(value)
    return out


def _finish_epoch(context: _Context, epoch: int) -> dict[str, Any]:
    """Validation, genotype and monitors of one epoch; files and logs."""
    from nppnet_tf.evaluation.evaluate import evaluate_crops

    config = context.config.search
    started = time.time()
    # Across workers, `evaluate_crops` would score each worker's share of
    # the batches only; every worker scores the whole subset instead (on
    # its own device, default strategy), so all agree on the best epoch.
    strategy = context.strategy
    if distribute.is_multi_worker(strategy):
        strategy = tf.distribute.get_strategy()
    scores = evaluate_crops(
        context.model,
        context.validation,
        flip=True,
        strategy=strategy,
        progress=context.chief,
    )
    arrays = context.model.architecture_arrays()
    genotype = _derive(context, arrays)
    entropy = derive.mean_normalised_entropy(arrays)
    free = derive.parameter_free_share(
        arrays, config.threshold, config.max_edges
    )
    improved = context.best.offer(
        epoch, scores["miou"], scores["pckh"], genotype
    )
    metrics = {
        "val/miou": scores["miou"],
        "val/pckh": scores["pckh"],
        "val/pixel_accuracy": scores["pixel_accuracy"],
        "val/images": scores["num_images"],
        **{f"entropy/{space}": value for space, value in entropy.items()},
        "entropy/mean": float(np.mean(list(entropy.values()))),
        **{f"parameter_free/{space}": value for space, value in free.items()},
        "parameter_free/mean": float(np.mean(list(free.values()))),
        "best/epoch": int(context.best.epoch.numpy()),
        "best/miou": float(context.best.miou.numpy()),
        "best/pckh": float(context.best.pckh.numpy()),
    }
    if context.chief:
        directory = outputs.write_epoch(
            context.out_dir,
            epoch,
            arrays,
            genotype,
            context.base_genotype,
            {
                **metrics,
                "per_class_iou": scores.get("per_class_iou"),
                "per_joint_pckh": scores.get("per_joint_pckh"),
            },
        )
        outputs.publish(
            context.out_dir,
            directory,
            context.best.summary() if improved else None,
        )
        context.logger.log_metrics(
            {**metrics, "epoch": epoch},
            step=int(context.state.global_step.numpy()),
        )
        context.logger.log_artifact(directory, f"epochs/{epoch:03d}")
    log.info(
        "%s epoch %d: mIoU %.2f, PCKh %.2f, entropy %.3f, parameter-free "
        "%.2f%s (%.0f s)",
        context.stage,
        epoch,
        scores["miou"],
        scores["pckh"],
        metrics["entropy/mean"],
        metrics["parameter_free/mean"],
        ", new best" if improved else "",
        time.time() - started,
    )
    return metrics


def _result(
    context: _Context,
    status: str,
    metrics: dict[str, Any],
    checkpoint: str | None = None,
    signal_number: int | None = None,
) -> SearchResult:
    out = context.out_dir
    epoch, _, global_step = context.state.position()

    def existing(name: str) -> str | None:
        path = out / name
        return str(path) if path.exists() else None

    result = SearchResult(
        stage=context.stage,
        status=status,
        out_dir=str(out),
        genotype=existing("genotype.json"),
        best_genotype=existing("best_genotype.json"),
        architecture=existing("architecture.npz"),
        metrics=metrics,
        epochs_completed=epoch,
        global_step=global_step,
        checkpoint=checkpoint or context.checkpointer.latest,
        signal_number=signal_number,
    )
    if context.chief:
        outputs.write_json(out / "summary.json", dataclasses.asdict(result))
    return result


def _derive(context: _Context, arrays) -> Genotype:
    config = context.config.search
    return derive.derive_genotype(
        arrays, config.threshold, config.max_edges, base=context.base_genotype
    )
