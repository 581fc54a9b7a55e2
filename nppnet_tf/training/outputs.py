"""Outputs of a training run: model files, final evaluation, result.

* `best.keras`: the best validated epoch's network. An improved epoch
  writes `best.pending.keras` and `best.pending.json` before the
  end-of-epoch checkpoint and renames them to `best.keras` and `best.json`
  after it, so the files always agree with the newest checkpoint
  (`restore_best_files` settles what a kill left behind).
* `final.keras`: the network at the end of the training (or at
  `max_steps`).
* The final evaluation (`finish`): the best model (else the final one) on
  the val split with `train.final_protocol`, scales and flip test:
  `report.json`, `report.md`, `report.html` and `overlays/`.

Saved models are float32: a network trained under a mixed-precision
policy is copied into a float32 twin first (`float32_model`), which also
serves the per-epoch validation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nppnet_tf import distribute
from nppnet_tf.training.train_step import dtype_policy

log = logging.getLogger(__name__)

BEST = "best.keras"
BEST_JSON = "best.json"
PENDING = "best.pending.keras"
PENDING_JSON = "best.pending.json"
FINAL = "final.keras"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `run_training` produced.

    Attributes:
        status: `completed` (every epoch), `max_steps` (stopped at
            `max_steps`) or `interrupted` (SIGTERM/SIGINT; checkpoint saved).
        out_dir: the output directory.
        best_model: `best.keras` (the best validated epoch), None before the
            first validation.
        final_model: `final.keras` (the weights at the end), None when
            interrupted.
        report: `report.json` of the final evaluation, None when
            interrupted.
        metrics: the final evaluation's `final/miou` and `final/pckh`
            (percent), the last validation's `val/...` and `best/...`
            metrics, and `best` (epoch, miou, pckh).
        epochs_completed: epochs finished.
        global_step: steps done in all.
        checkpoint: the newest checkpoint.
        init_weights: `init_weights_report.json`, if initial weights were
            loaded.
        signal_number: the signal that stopped the run, if any.
    """

    status: str
    out_dir: str
    best_model: str | None
    final_model: str | None
    report: str | None
    metrics: dict[str, Any]
    epochs_completed: int
    global_step: int
    checkpoint: str | None
    init_weights: str | None = None
    signal_number: int | None = None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes `data` as indented JSON through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps(data, indent=2, sort_keys=True, default=_plain) + "\n"
    )
    tmp.replace(path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def save_model(model: keras.Model, path: Path) -> Path:
    """`model.save(path)` through a temporary file (atomic on one disk)."""
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return path


def float32_model(context) -> keras.Model:
    """The trained network with float32 compute: the model itself under
    the float32 policy, else a float32 twin (built once) holding a copy of
    its current variables."""
    model = context.model
    if context.config.train.mixed_precision == "float32":
        return model
    if context.float32_model is None:
        with context.strategy.scope(), dtype_policy("float32"):
            context.float32_model = context.builder(
                context.config, context.genotype
            )
    twin = context.float32_model
    for target, source in zip(twin.variables, model.variables, strict=True):
        if tuple(target.shape) != tuple(source.shape):
            raise RuntimeError(
                f"float32 copy: {target.path} {tuple(target.shape)} != "
                f"{source.path} {tuple(source.shape)}"
            )
        target.assign(source.numpy())
    return twin


def save_pending_best(
    out_dir: Path, model: keras.Model, summary: dict[str, Any]
) -> None:
    """Writes the new best model beside the current one (see the module
    docstring); `promote_best` makes it `best.keras`."""
    save_model(model, out_dir / PENDING)
    write_json(out_dir / PENDING_JSON, summary)


def promote_best(out_dir: Path) -> None:
    """Renames a pending best model to `best.keras` (after the checkpoint
    that records it as the best was saved)."""
    if (out_dir / PENDING).exists():
        os.replace(out_dir / PENDING, out_dir / BEST)
        os.replace(out_dir / PENDING_JSON, out_dir / BEST_JSON)


def restore_best_files(out_dir: Path, best: dict[str, Any]) -> None:
    """Makes the best-model files agree with a restored checkpoint whose
    best epoch is `best["epoch"]` (-1: none yet)."""
    pending = out_dir / PENDING_JSON
    if pending.exists():
        if json.loads(pending.read_text()).get("epoch") == best["epoch"]:
            promote_best(out_dir)  # killed between checkpoint and rename
        else:
            for name in (PENDING, PENDING_JSON):
                (out_dir / name).unlink(missing_ok=True)
    written = out_dir / BEST_JSON
    if written.exists():
        epoch = json.loads(written.read_text()).get("epoch")
        if epoch != best["epoch"]:
            log.warning(
                "%s is from epoch %s but the restored checkpoint's best is "
                "epoch %d (an older checkpoint was restored): removing it; "
                "the next better epoch writes a new one",
                out_dir / BEST,
                epoch,
                best["epoch"],
            )
            for name in (BEST, BEST_JSON):
                (out_dir / name).unlink(missing_ok=True)


def result(
    context,
    status: str,
    metrics: dict[str, Any],
    checkpoint: str | None = None,
    signal_number: int | None = None,
    report: str | None = None,
):
    """The `TrainResult` of the run so far; also `summary.json`."""
    out = context.out_dir
    epoch, _, global_step = context.state.position()

    def existing(name: str) -> str | None:
        path = out / name
        return str(path) if path.exists() else None

    value = TrainResult(
        status=status,
        out_dir=str(out),
        best_model=existing(BEST),
        final_model=existing(FINAL) if status != "interrupted" else None,
        report=report,
        metrics={**metrics, "best": context.best.summary()},
        epochs_completed=epoch,
        global_step=global_step,
        checkpoint=checkpoint or context.checkpointer.latest,
        init_weights=context.init_report,
        signal_number=signal_number,
    )
    if context.chief:
        write_json(out / "summary.json", dataclasses.asdict(value))
    return value


def finish(context, status: str, metrics: dict[str, Any], checkpoint):
    """`final.keras`, the final evaluation (unless the run was started
    without one), the artifacts and the result of a run that completed or
    stopped at `max_steps`."""
    out = context.out_dir
    model = float32_model(context)
    if context.chief:
        save_model(model, out / FINAL)
        log.info("saved %s", out / FINAL)
    report_path, scores = None, {}
    if context.final_evaluation:
        report_path, scores = _final_evaluation(context)
    metrics = {**metrics, **{f"final/{k}": v for k, v in scores.items()}}
    value = result(context, status, metrics, checkpoint, report=report_path)
    if context.chief:
        logger = context.logger
        if scores:
            logger.log_metrics(
                {f"final/{k}": v for k, v in scores.items()},
                step=value.global_step,
            )
        for name in (BEST, BEST_JSON, FINAL, "report.json", "report.md"):
            if (out / name).exists():
                logger.log_artifact(out / name)
        if (out / "report.html").exists():
            logger.log_artifact(out / "report.html")
        if (out / "overlays").is_dir():
            logger.log_artifact(out / "overlays", "overlays")
        logger.log_dict(dataclasses.asdict(value), "train_result.json")
    return value


def model_to_evaluate(out_dir: str | Path) -> Path:
    """`best.keras` of a training output directory, else `final.keras`.

    Raises:
        FileNotFoundError: neither exists.
    """
    out_dir = Path(out_dir)
    for name in (BEST, FINAL):
        if (out_dir / name).exists():
            if name == FINAL:
                log.warning("no validated epoch: evaluating %s", FINAL)
            return out_dir / name
    raise FileNotFoundError(f"{out_dir} holds neither {BEST} nor {FINAL}")


def _final_evaluation(context) -> tuple[str | None, dict[str, float]]:
    """The final evaluation of a finished training, in its directory."""
    strategy = context.strategy
    if distribute.is_multi_worker(strategy):
        # The chief alone, undistributed: the other workers may not see
        # the chief's best.keras yet, and their part of a collective
        # evaluation would wait for them.
        if not context.chief:
            return None, {}
        strategy = tf.distribute.get_strategy()
    path = model_to_evaluate(context.out_dir)
    best = context.best.summary()
    return evaluate_trained_model(
        context.config,
        context.records_dir,
        path,
        context.out_dir,
        context.genotype,
        strategy=strategy,
        chief=context.chief,
        best_epoch=best["epoch"] if path.name == BEST else None,
        builder=context.builder,
    )


def evaluate_trained_model(
    config,
    records_dir: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    genotype,
    strategy: tf.distribute.Strategy | None = None,
    chief: bool = True,
    best_epoch: int | None = None,
    builder=None,
) -> tuple[str | None, dict[str, float]]:
    """Evaluates a trained `.keras` model on the val split by the final
    protocol (`train.final_protocol`, `final_scales`, `final_flip`) and, with
    `train.final_baseline`, the untrained network of the same genotype too.

    Writes (on the chief) `report.json`, `report.md`, `report.html` and
    `overlays/` under `out_dir`. The report's `baseline` holds the untrained
    network's mIoU and PCKh and the trained model's gain over it.

    Args:
        config: the run config (`train`, `data`).
        records_dir: the preprocessing output (its `val` split).
        model_path: the `.keras` model.
        out_dir: where the report files go.
        genotype: the `Genotype` the model was built from.
        strategy: evaluation strategy; None: the default one.
        chief: write the files (only the chief does).
        best_epoch: the epoch `model_path` was saved at, for the report.
        builder: `(config, genotype) -> model` of the untrained baseline;
            None: `train.network` or NPPNet.

    Returns:
        `(report path or None, {"miou", "pckh"[, "baseline_miou",
        "baseline_pckh"]})`, scores in percent.
    """
    from nppnet_tf.evaluation.evaluate import run_evaluation
    from nppnet_tf.evaluation.model_overlays import write_model_overlays
    from nppnet_tf.evaluation.overlay import panel_ids
    from nppnet_tf.evaluation.prediction_files import json_ready
    from nppnet_tf.evaluation.report import write_report_files

    train = config.train
    out_dir, model_path = Path(out_dir), Path(model_path)
    strategy = strategy or tf.distribute.get_strategy()

    def evaluate(model):
        return run_evaluation(
            model,
            str(records_dir),
            "val",
            config.data,
            protocol=train.final_protocol,
            scales=train.final_scales,
            flip=train.final_flip,
            batch_size=train.val_batch_size,
            strategy=strategy,
            progress=chief,
        )

    with strategy.scope():
        model = keras.saving.load_model(model_path, compile=False)
    evaluation = evaluate(model)
    report = json_ready(
        {
            "model": str(model_path),
            "best_epoch": best_epoch,
            "genotype_fingerprint": genotype.fingerprint(),
            **evaluation.report,
        }
    )
    scores = {
        "miou": report["parsing"]["mean_iou"],
        "pckh": report["pose"]["average"],
    }
    if train.final_baseline:
        scores.update(
            _baseline_scores(config, genotype, strategy, evaluate, builder)
        )
        report["baseline"] = {
            "what": "the untrained network (same genotype, size and seed, "
            "initial weights), same protocol",
            "miou": scores["baseline_miou"],
            "pckh": scores["baseline_pckh"],
            "miou_gain": _gain(scores["miou"], scores["baseline_miou"]),
            "pckh_gain": _gain(scores["pckh"], scores["baseline_pckh"]),
        }
    if not chief:
        return None, scores
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    overlays = write_model_overlays(
        model,
        str(records_dir),
        "val",
        panel_ids(evaluation.image_ids, train.overlays),
        out_dir / "overlays",
        config.data.image_size,
        scales=train.final_scales,
        flip=train.final_flip,
    )
    write_report_files(report, out_dir, overlays)
    log.info(
        "final evaluation of %s (%s protocol): mIoU %s, PCKh %s -> %s",
        model_path.name,
        train.final_protocol,
        scores["miou"],
        scores["pckh"],
        report_path,
    )
    if train.final_baseline:
        log.info(
            "untrained baseline: mIoU %s, PCKh %s",
            scores["baseline_miou"],
            scores["baseline_pckh"],
        )
    return str(report_path), {k: v for k, v in scores.items() if v is not None}


def _gain(trained: float | None, untrained: float | None) -> float | None:
    if trained is None or untrained is None:
        return None
    return trained - untrained


def _baseline_scores(config, genotype, strategy, evaluate, builder):
    """mIoU and PCKh of the untrained network (seeded as the training)."""
    if builder is None:
        from nppnet_tf.training.train import _builder

        builder = _builder(config.train.network)
    keras.utils.set_random_seed(config.train.seed)
    with strategy.scope():
        untrained = builder(config, genotype)
    log.info("evaluating the untrained network (baseline)")
    result = evaluate(untrained)
    return {
        "baseline_miou": result.report["parsing"]["mean_iou"],
        "baseline_pckh": result.report["pose"]["average"],
    }
