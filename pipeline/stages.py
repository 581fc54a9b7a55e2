"""The stages of a scheduled `nppnet run`, one function per stage.

Each stage reads its inputs from the config and the outputs of the stages
before it, writes under `run.work_dir`, and returns a JSON-able dict of its
outputs with a `fingerprint` (see `pipeline.runner`). The stages and the
config keys that key each of them are listed in `build_stages` and in
docs/pipeline.md.

    <work_dir>/lip/                       synthetic LIP (when run.lip_root is null)
    <work_dir>/records/                   TFRecords, dead letters, TFDV statistics
    <work_dir>/search/encoder-decoder/    genotype.json, diagrams, checkpoints
    <work_dir>/search/interaction/        genotype.json, diagrams, checkpoints
    <work_dir>/train/                     best.keras, final.keras, checkpoints
    <work_dir>/evaluate/                  report.json/.md/.html, overlays/
    <work_dir>/export/                    models.config, <model>/<version>/
    <work_dir>/serve_check.json           the serve-check report
    <work_dir>/registry/promotions.jsonl  promotion decisions
    <work_dir>/stages/<stage>.json        manifests
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import allocator
from pipeline.runner import (
    EXIT_DATA_GATE,
    Stage,
    StageContext,
    StageFailed,
    fingerprint_of,
)

log = logging.getLogger(__name__)


def lip_root_of(context: StageContext) -> Path:
    """The LIP folder of this run: the configured one or the synthetic one."""
    if context.config.run.lip_root:
        return Path(context.config.run.lip_root)
    return context.work_dir / "lip"


def synthesise(context: StageContext) -> dict[str, Any]:
    """Writes the synthetic LIP (when `run.lip_root` is null)."""
    from nppnet_tf.data.synthetic import write_synthetic_lip

    synth = context.config.synth
    out = lip_root_of(context)
    summary = write_synthetic_lip(
        out,
        num_train=synth.train,
        num_val=synth.val,
        seed=synth.seed,
        min_size=synth.min_size,
        max_size=synth.max_size,
    )
    return {
        "lip_root": str(out),
        "summary": summary,
        "fingerprint": fingerprint_of("synth", context.config.synth),
    }


def preprocess(context: StageContext) -> dict[str, Any]:
    """Beam: LIP release folder -> sharded TFRecords, dead letters, manifest."""
    from beam_jobs.lip_to_tfrecord import preprocess as run_preprocess

    config = context.config
    records = context.work_dir / "records"
    manifest = run_preprocess(
        lip_root=lip_root_of(context),
        out_dir=records,
        data_config=config.data,
        pipeline_args=list(config.beam.pipeline_args),
        direct_num_workers=config.beam.direct_num_workers,
        force=context.force,
    )
    return {
        "records": str(records),
        "counts": manifest.get("counts", {}),
        "dead_letters": manifest.get("dead_letter_counts", {}),
        "input_fingerprint": manifest.get("input_fingerprint"),
        "skipped": bool(manifest.get("skipped", False)),
        "fingerprint": fingerprint_of(
            manifest.get("input_fingerprint"),
            manifest.get("config"),
            manifest.get("counts"),
        ),
    }


def validate(context: StageContext) -> dict[str, Any]:
    """TFDV gate: statistics, schema, anomalies; anomalies stop the run."""
    from beam_jobs.validate_records import validate as run_validate

    config = context.config
    records = Path(context.results["preprocess"]["records"])
    report = run_validate(
        records_dir=records,
        schema_path=config.validate.schema,
        skew_threshold=config.validate.skew_threshold,
        skew_min_examples=config.validate.skew_min_examples,
        pipeline_args=list(config.beam.pipeline_args),
    )
    anomalies = report.get("anomalies", [])
    if anomalies:
        lines = "\n  ".join(str(a) for a in anomalies[:20])
        raise StageFailed(
            f"data gate failed: {len(anomalies)} anomalies in {records}:\n  {lines}",
            EXIT_DATA_GATE,
        )
    return {
        "records": str(records),
        "statistics": report.get("statistics_dir"),
        "fingerprint": context.results["preprocess"]["fingerprint"],
    }


class StageInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped a search or training after a checkpoint; the
    next run resumes it."""

    def __init__(self, stage: str, signal_number: int | None):
        self.signal_number = signal_number or signal.SIGTERM
        super().__init__(
            f"{stage} stopped by {signal.Signals(self.signal_number).name} "
            "after a checkpoint; run again to resume it"
        )


_STRATEGIES: dict[str, Any] = {}


def strategy_of(config):
    """One `tf.distribute` strategy per process and `distribute` config
    (logical CPU devices can be configured only once)."""
    from nppnet_tf import distribute
    from nppnet_tf.config import section_hash

    key = section_hash(config.distribute)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = distribute.create_strategy(config.distribute)
    return _STRATEGIES[key]


def _resident_gib() -> float:
    """This process's resident memory now, GiB (Linux)."""
    import os

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def release_memory(stage: str) -> None:
    """Frees what a search or the training left behind (models, traced
    graphs: gigabytes) before the next stage of the same process builds
    its own: the traced graphs hold reference cycles that only a full
    garbage collection breaks."""
    import gc
    import time

    import keras

    before, started = _resident_gib(), time.time()
    keras.backend.clear_session()
    collected = gc.collect()
    allocator.release_free_memory()
    log.info(
        "after %s: %d objects collected in %.1f s; resident memory %.1f -> "
        "%.1f GiB",
        stage,
        collected,
        time.time() - started,
        before,
        _resident_gib(),
    )


def _fresh_dir(path: Path, context: StageContext) -> Path:
    """`path`, emptied unless the stage resumes its previous attempt (an
    outdated attempt's checkpoints must not be resumed by the new one)."""
    if path.exists() and not context.resume:
        log.info("removing the outdated outputs in %s", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _records(context: StageContext) -> str:
    return context.results["preprocess"]["records"]


def authors_genotype(context: StageContext) -> Path:
    from pipeline.commands.train import genotype_path

    return genotype_path(context.config.train.genotype)


def _search(context: StageContext, stage: str) -> dict[str, Any]:
    from nppnet_tf.search.genotype import Genotype
    from nppnet_tf.search.loop import run_search

    base = None
    if stage == "interaction":
        previous = context.results.get("search-encoder-decoder")
        path = Path(previous["genotype"]) if previous else None
        if path is None:
            path = authors_genotype(context)
            log.info("searching interactions on the cells of %s", path)
        base = Genotype.load(path).cells_only()
    out_dir = _fresh_dir(context.work_dir / "search" / stage, context)
    try:
        result = run_search(
            context.config,
            stage,
            _records(context),
            out_dir,
            base_genotype=base,
            resume=context.resume,
            logger=context.tracking,
            strategy=strategy_of(context.config),
        )
    finally:
        release_memory(f"search-{stage}")
    if result.status == "interrupted":
        raise StageInterrupted(f"search-{stage}", result.signal_number)
    genotype = Genotype.load(result.genotype)
    return {
        "out_dir": str(out_dir),
        "genotype": result.genotype,
        "best_genotype": result.best_genotype,
        "epochs": result.epochs_completed,
        "steps": result.global_step,
        "genotype_fingerprint": genotype.fingerprint(),
        "fingerprint": genotype.fingerprint(),
    }


def search_encoder_decoder(context: StageContext) -> dict[str, Any]:
    """Searches the task-specific encoder and decoder cells."""
    return _search(context, "encoder-decoder")


def search_interaction(context: StageContext) -> dict[str, Any]:
    """Searches interactions and fusion cells on the found (or the
    authors') cells."""
    return _search(context, "interaction")


def train(context: StageContext) -> dict[str, Any]:
    """Final training of the searched genotype (or `train.genotype`)."""
    from nppnet_tf.export import file_sha256
    from nppnet_tf.search.genotype import Genotype
    from nppnet_tf.training.outputs import model_to_evaluate
    from nppnet_tf.training.train import run_training

    searched = context.results.get("search-interaction")
    source = (
        Path(searched["genotype"]) if searched else authors_genotype(context)
    )
    genotype = Genotype.load(source)
    out_dir = _fresh_dir(context.work_dir / "train", context)
    genotype_file = genotype.save(out_dir / "genotype.json")
    log.info("training the network of %s (%s)", source, genotype.fingerprint())
    try:
        result = run_training(
            context.config,
            _records(context),
            out_dir,
            genotype=genotype,
            resume=context.resume,
            logger=context.tracking,
            strategy=strategy_of(context.config),
            final_evaluation=False,
        )
    finally:
        release_memory("train")
    if result.status == "interrupted":
        raise StageInterrupted("train", result.signal_number)
    model = model_to_evaluate(out_dir)
    best = result.metrics.get("best") or {}
    return {
        "out_dir": str(out_dir),
        "model": str(model),
        "genotype": str(genotype_file),
        "genotype_source": str(source),
        "genotype_fingerprint": genotype.fingerprint(),
        "best_epoch": best.get("epoch") if model.name == "best.keras" else None,
        "epochs": result.epochs_completed,
        "steps": result.global_step,
        "fingerprint": file_sha256(model)[:16],
    }


def evaluate(context: StageContext) -> dict[str, Any]:
    """The trained model on the val split by the final protocol, with the
    untrained baseline when `train.final_baseline`."""
    from nppnet_tf.search.genotype import Genotype
    from nppnet_tf.training.outputs import evaluate_trained_model

    trained = context.results["train"]
    out_dir = _fresh_dir(context.work_dir / "evaluate", context)
    report, scores = evaluate_trained_model(
        context.config,
        _records(context),
        trained["model"],
        out_dir,
        Genotype.load(trained["genotype"]),
        strategy=strategy_of(context.config),
        best_epoch=trained.get("best_epoch"),
    )
    logger = context.tracking
    if logger is not None:
        logger.log_metrics({f"final/{k}": v for k, v in scores.items()})
        for name in ("report.json", "report.md", "report.html"):
            if (out_dir / name).exists():
                logger.log_artifact(out_dir / name)
        if (out_dir / "overlays").is_dir():
            logger.log_artifact(out_dir / "overlays", "overlays")
    return {
        "out_dir": str(out_dir),
        "report": report,
        "report_html": str(out_dir / "report.html"),
        "overlays": str(out_dir / "overlays"),
        "scores": scores,
        "fingerprint": fingerprint_of(trained["fingerprint"], scores),
    }


def export(context: StageContext) -> dict[str, Any]:
    """A new TF Serving version of the trained model."""
    from nppnet_tf.export import export_model, load_keras_model
    from pipeline.registry import read_saved_model_fingerprint

    config = context.config
    model_path = context.results["train"]["model"]
    base = Path(config.export.base_dir or context.work_dir / "export")
    result = export_model(
        load_keras_model(model_path),
        base,
        config.data.image_size,
        flip=config.export.flip,
        model_name=config.export.model_name,
        source=model_path,
    )
    fingerprint = read_saved_model_fingerprint(result.version_dir)
    if context.tracking is not None:
        context.tracking.log_dict(result.metadata, "export_metadata.json")
    return {
        "export_base": str(result.export_base),
        "version": result.version,
        "version_dir": str(result.version_dir),
        "models_config": str(result.models_config),
        "saved_model_fingerprint": fingerprint.singleprint,
        "fingerprint": fingerprint.singleprint,
    }


def serve_check(context: StageContext) -> dict[str, Any]:
    """The export answers as TF Serving would, and as the Keras model."""
    from nppnet_tf.serving.check import check_export

    exported = context.results["export"]
    report = check_export(
        exported["version_dir"], keras_model=context.results["train"]["model"]
    )
    path = context.work_dir / "serve_check.json"
    path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if context.tracking is not None:
        context.tracking.log_artifact(path)
    log.info("%s", report.format())
    if not report.passed:
        raise StageFailed(
            f"serve-check failed for {exported['version_dir']} (report "
            f"{path}):\n{report.format()}"
        )
    return {
        "report": str(path),
        "checks": len(report.checks),
        "fingerprint": exported["fingerprint"],
    }


def register(context: StageContext) -> dict[str, Any]:
    """The trained model and its export as a new registry version (or the
    existing version of the same SavedModel), with the candidate alias."""
    from pipeline.registry import (
        read_data_fingerprint,
        register_model,
        selection_metrics,
    )

    evaluated = context.results["evaluate"]
    report_path = Path(evaluated["report"])
    metrics = selection_metrics(
        json.loads(report_path.read_text()), str(report_path)
    )
    trained = context.results["train"]
    result = register_model(
        context.tracking,
        trained["model"],
        context.results["export"]["version_dir"],
        trained["genotype"],
        metrics,
        report_path=report_path,
        data_fingerprint=read_data_fingerprint(_records(context)),
        config=context.config,
    )
    return {
        "model_name": context.config.registry.model_name,
        "version": str(result.version),
        "model_uri": result.model_uri,
        "created": result.created,
        "reason": result.reason,
        "fingerprint": fingerprint_of(result.model_uri),
    }


def promote(context: StageContext) -> dict[str, Any]:
    """Moves the champion alias to the new version if it beats the
    champion (a refusal is recorded; `nppnet run` then exits 4)."""
    from pipeline.promotion import decision_log_path
    from pipeline.promotion import promote as decide
    from pipeline.registry import registry_client

    config = context.config
    decision = decide(
        registry_client(config), config, context.results["register"]["version"]
    )
    if context.tracking is not None:
        context.tracking.log_dict(decision.to_dict(), "promotion.json")
        context.tracking.set_tags({"nppnet.promotion": decision.outcome})
    return {
        "outcome": decision.outcome,
        "reason": decision.reason,
        "champion_before": decision.champion_version_before,
        "champion_after": decision.champion_version_after,
        "decision_log": str(decision_log_path(config)),
        "fingerprint": fingerprint_of(
            decision.outcome, decision.candidate_version
        ),
    }


def _path_exists(*keys: str):
    def check(outputs: Mapping[str, Any]) -> bool:
        return all(
            bool(outputs.get(key)) and Path(outputs[key]).exists()
            for key in keys
        )

    return check


def _keys(section: str, cls, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`section.key` for every field of a config section but `exclude`."""
    return tuple(
        f"{section}.{f.name}"
        for f in dataclasses.fields(cls)
        if f.name not in exclude
    )


def stage_keys() -> dict[str, tuple[str, ...]]:
    """The config values keying each stage (a change re-runs the stage and
    every stage after it; values only later stages read are not here)."""
    from nppnet_tf.config import DistributeConfig, SearchConfig, TrainConfig

    distribute = _keys(
        "distribute", DistributeConfig, ("graph_optimizations",)
    )  # speed only
    final = (
        "final_protocol",
        "final_scales",
        "final_flip",
        "overlays",
        "final_baseline",
    )
    return {
        "synth": ("synth",),
        "preprocess": ("data",),
        "validate": ("validate",),
        "search-encoder-decoder": _keys(
            "search", SearchConfig, ("epochs", "shared_gradients")
        )
        + ("augment", "loss")
        + distribute,
        "search-interaction": _keys(
            "search",
            SearchConfig,
            ("encoder_decoder_epochs", "partial_channels", "shared_gradients"),
        )
        + ("augment", "loss")
        + distribute,
        "train": _keys("train", TrainConfig, final)
        + ("augment", "loss")
        + distribute,
        "evaluate": tuple(f"train.{k}" for k in final)
        + ("train.val_batch_size",),
        "export": ("export",),
        "serve-check": (),
        "register": (
            "tracking",
            "registry.model_name",
            "registry.candidate_alias",
        ),
        "promote": (
            "registry.champion_alias",
            "registry.miou_margin",
            "registry.pckh_margin",
        ),
    }


def build_stages(config) -> list[Stage]:
    """The stages `nppnet run` runs for this config, in order: synth (when
    `run.lip_root` is null), then `run.stages`.

    Raises:
        ValueError: the registry stages without MLflow tracking.
    """
    uses_registry = sorted({"register", "promote"} & set(config.run.stages))
    if uses_registry and not config.tracking.enabled:
        raise ValueError(
            f"run.stages has {', '.join(uses_registry)}, which need the "
            "MLflow registry, but tracking.enabled is false: enable tracking "
            "or drop those stages"
        )
    keys = stage_keys()
    functions = {
        "preprocess": (preprocess, _path_exists("records")),
        "validate": (validate, _path_exists("records")),
        "search-encoder-decoder": (
            search_encoder_decoder,
            _path_exists("genotype"),
        ),
        "search-interaction": (search_interaction, _path_exists("genotype")),
        "train": (train, _path_exists("model", "genotype")),
        "evaluate": (evaluate, _path_exists("report")),
        "export": (export, _path_exists("version_dir")),
        "serve-check": (serve_check, _path_exists("report")),
        "register": (register, lambda outputs: True),
        "promote": (promote, lambda outputs: True),
    }
    stages = []
    if not config.run.lip_root:
        stages.append(
            Stage("synth", keys["synth"], synthesise, _path_exists("lip_root"))
        )
    for name in config.run.stages:
        run, exists = functions[name]
        stages.append(
            Stage(
                name, keys[name], run, exists, always_run=name == "preprocess"
            )
        )
    return stages
