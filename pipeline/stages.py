"""The stages of a scheduled `nppnet run`, one function per stage.

Each stage reads its inputs from the config and the outputs of the stages
before it, writes under `run.work_dir`, and returns a JSON-able dict of its
outputs with a `fingerprint` (see `pipeline.runner`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def _path_exists(key: str):
    def check(outputs: Mapping[str, Any]) -> bool:
        return bool(outputs.get(key)) and Path(outputs[key]).exists()

    return check


def build_stages(config) -> list[Stage]:
    """The stages `nppnet run` runs for this config, in order."""
    stages = []
    if not config.run.lip_root:
        stages.append(
            Stage("synth", ("synth",), synthesise, _path_exists("lip_root"))
        )
    stages += [
        Stage(
            "preprocess",
            ("data",),
            preprocess,
            _path_exists("records"),
            always_run=True,
        ),
        Stage("validate", ("validate",), validate, _path_exists("records")),
    ]
    return stages
