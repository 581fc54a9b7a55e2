"""`nppnet run`: one scheduled pipeline run from the LIP folder onwards."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the pipeline stages of a config (skipping up-to-date ones)",
        description=(
            "Runs the stages of a pipeline config (run.stages) in order, each "
            "skipped when its manifest under run.work_dir/stages is up to "
            "date; a failed or killed stage is resumed by the next run. One "
            "MLflow parent run per call, a child run per stage. Stages: "
            "synth (when run.lip_root is null), preprocess, validate, "
            "search-encoder-decoder, search-interaction, train, evaluate, "
            "export, serve-check, register, promote. Exit codes: "
            "0 success, 1 error, 2 bad config or input, 3 data gate failed, "
            "4 promotion refused, 5 another run holds the work directory, "
            "130/143 stopped by SIGINT/SIGTERM (after a checkpoint)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--lip-root", help="LIP release folder (overrides run.lip_root)"
    )
    parser.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        help="re-run from this stage on",
    )
    parser.add_argument(
        "--force", action="store_true", help="re-run every stage"
    )
    parser.set_defaults(handler=handle)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and repeatable `--set section.key=value`."""
    parser.add_argument(
        "--config",
        required=True,
        help="run config YAML (e.g. configs/demo.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set data.image_size=256 (repeatable)",
    )


def handle(args: argparse.Namespace) -> int:
    try:
        return _handle(args)
    finally:
        # The traced supernet and network steps leave millions of Python
        # objects; the interpreter's final garbage collection over them
        # takes minutes. Frozen objects are skipped (the OS reclaims them).
        gc.freeze()


def _handle(args: argparse.Namespace) -> int:
    from nppnet_tf.config import load_config
    from pipeline.runner import EXIT_USAGE, RunLock, StageFailed
    from pipeline.stages import StageInterrupted, build_stages

    overrides = list(args.overrides)
    if args.lip_root:
        overrides.append(f"run.lip_root={args.lip_root}")
    config = load_config(args.config, overrides)
    try:
        stages = build_stages(config)
    except ValueError as err:
        log.error("%s: %s", args.config, err)
        return EXIT_USAGE
    log.info(
        "run %s: %d stages (%s), work dir %s",
        args.config,
        len(stages),
        ", ".join(s.name for s in stages),
        config.run.work_dir,
    )
    pipeline = PipelineRun(args, config)
    try:
        with RunLock(config.run.work_dir):
            code = pipeline.run(stages)
    except StageFailed as err:  # the lock
        log.error("%s", err)
        return err.exit_code
    except StageInterrupted as err:
        log.warning("%s", err)
        return 128 + int(err.signal_number)
    return code


class PipelineRun:
    """One `nppnet run`: the stages inside an MLflow parent run, a child
    run per stage, the exit code and the summary."""

    def __init__(self, args: argparse.Namespace, config):
        self.args = args
        self.config = config
        self.tracker = None
        self.parent = None
        self.data_fingerprint: str | None = None

    def run(self, stages) -> int:
        from pipeline.runner import (
            EXIT_OK,
            EXIT_PROMOTION_REFUSED,
            StageFailed,
            git_revision,
            run_stages,
        )
        from pipeline.tracking import Tracker

        self.tracker = Tracker(self.config)
        tags = {
            "nppnet.pipeline": "run",
            "nppnet.config_file": str(self.args.config),
            "nppnet.work_dir": str(Path(self.config.run.work_dir).resolve()),
            "nppnet.stages": ",".join(s.name for s in stages),
            "mlflow.source.git.commit": git_revision() or "",
            "nppnet.git_revision": git_revision() or "unknown",
        }
        records = []
        code = EXIT_OK
        try:
            with self.tracker.run("pipeline", tags=tags) as parent:
                self.parent = parent
                parent.log_config(self.config)
                parent.log_params(
                    {
                        "run.from": self.args.from_stage or "",
                        "run.force": self.args.force,
                    }
                )
                try:
                    records = run_stages(
                        stages,
                        self.config,
                        force=self.args.force,
                        from_stage=self.args.from_stage,
                        track=self._track,
                        on_stage_end=self._stage_end,
                    )
                except StageFailed as err:
                    records = err.records
                    log.error("%s", err)
                    code = err.exit_code
                    parent.set_tags({"nppnet.failed_stage": records[-1].name})
                    parent.log_dict(_records_json(records), "stages.json")
                    print(self.summary(records, code))
                    # The parent ends FAILED (the data gate too).
                    raise _EndFailed() from err
                results = {r.name: r for r in records}
                promoted = results.get("promote")
                if (
                    promoted is not None
                    and promoted.status == "ran"
                    and promoted.outputs.get("outcome") == "refused"
                ):
                    code = EXIT_PROMOTION_REFUSED
                parent.log_dict(_records_json(records), "stages.json")
                parent.set_tags(
                    {
                        "nppnet.ran": ",".join(
                            r.name for r in records if r.status == "ran"
                        ),
                        "nppnet.skipped": ",".join(
                            r.name for r in records if r.status == "skipped"
                        ),
                    }
                )
        except _EndFailed:
            return code
        print(self.summary(records, code))
        return code

    @contextlib.contextmanager
    def _track(self, stage, status: str):
        """The MLflow child run of one stage."""
        from pipeline.runner import config_value, git_revision

        tags = {
            "nppnet.stage": stage.name,
            "nppnet.stage_status": status,
            "nppnet.git_revision": git_revision() or "unknown",
            "mlflow.source.git.commit": git_revision() or "",
        }
        if self.data_fingerprint:
            tags["nppnet.data_fingerprint"] = self.data_fingerprint
        with self.tracker.run(stage.name, nested=True, tags=tags) as logger:
            if status == "ran":
                logger.log_dict(
                    {
                        key: _plain(config_value(self.config, key))
                        for key in stage.sections
                    },
                    "stage_config.json",
                )
            yield logger

    def _stage_end(self, stage, record, logger) -> None:
        from pipeline.registry import read_data_fingerprint

        if stage.name == "preprocess":
            try:
                self.data_fingerprint = read_data_fingerprint(
                    record.outputs["records"]
                )
            except (OSError, ValueError) as err:
                log.warning("no data fingerprint: %s", err)
            if self.data_fingerprint:
                tag = {"nppnet.data_fingerprint": self.data_fingerprint}
                self.parent.set_tags(tag)
                logger.set_tags(tag)
        logger.set_tags({"nppnet.stage_status": record.status})
        if record.status == "ran":
            logger.log_metrics({"stage_seconds": record.seconds})
        logger.log_dict(_plain(record.outputs), "stage_outputs.json")
        self.parent.log_metrics({f"stage_seconds/{stage.name}": record.seconds})

    def summary(self, records, code: int) -> str:
        return summary(self.config, records, code, self.tracker, self.parent)


class _EndFailed(Exception):
    """Ends the parent MLflow run as FAILED after a failed stage."""


def _plain(value):
    from nppnet_tf.config import to_dict

    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _records_json(records) -> dict:
    return {
        "stages": [
            {
                "stage": r.name,
                "status": r.status,
                "seconds": round(r.seconds, 1),
                "outputs": _plain(r.outputs),
            }
            for r in records
        ]
    }


EXIT_MEANINGS = {
    0: "success",
    1: "error",
    2: "bad config or input",
    3: "data gate failed (TFDV anomalies)",
    4: "promotion refused (the new model did not beat the champion)",
    5: "another run holds the work directory",
}


def summary(config, records, code: int = 0, tracker=None, parent=None) -> str:
    """The end-of-run summary: what ran, what was skipped, where results
    are, the MLflow UI."""
    work_dir = Path(config.run.work_dir)
    lines = [
        f"nppnet run: {EXIT_MEANINGS.get(code, 'error')} (exit {code}), "
        f"work dir {work_dir}",
        "",
        f"  {'stage':<24} {'status':<12} {'seconds':>8}",
    ]
    for record in records:
        lines.append(
            f"  {record.name:<24} {record.status:<12} {record.seconds:8.1f}"
        )
    results = {r.name: r.outputs for r in records if r.status != "failed"}
    failed = [r for r in records if r.status in ("failed", "interrupted")]
    if failed:
        lines.append(f"\n  {failed[-1].name}: {failed[-1].outputs['error']}")
        lines.append(
            "  the next `nppnet run` restarts from this stage (searches and "
            "training from their checkpoints)"
        )
    where = []
    if "preprocess" in results:
        pre = results["preprocess"]
        counts = ", ".join(f"{k} {v}" for k, v in pre.get("counts", {}).items())
        where.append(("records", f"{pre['records']} ({counts})"))
        dead = pre.get("dead_letters") or {}
        if any(dead.values()):
            where.append(
                ("dead letters", f"{pre['records']}/dead_letters {dead}")
            )
    if results.get("validate", {}).get("statistics"):
        where.append(("TFDV statistics", results["validate"]["statistics"]))
    for stage in ("search-encoder-decoder", "search-interaction"):
        if stage in results:
            where.append((stage[7:] + " genotype", results[stage]["genotype"]))
    if "train" in results:
        where.append(("trained model", results["train"]["model"]))
    if "evaluate" in results:
        evaluated = results["evaluate"]
        scores = evaluated.get("scores", {})
        line = (
            f"mIoU {_score(scores.get('miou'))}, PCKh "
            f"{_score(scores.get('pckh'))}"
        )
        if "baseline_miou" in scores:
            line += (
                f" (untrained: mIoU {_score(scores.get('baseline_miou'))}, "
                f"PCKh {_score(scores.get('baseline_pckh'))})"
            )
        where.append(("val scores", line))
        where.append(("report", evaluated["report_html"]))
        where.append(("overlays", evaluated["overlays"]))
    if "export" in results:
        exported = results["export"]
        where.append(("SavedModel", exported["version_dir"]))
        where.append(("TF Serving config", exported["models_config"]))
    if "serve-check" in results:
        where.append(("serve-check", results["serve-check"]["report"]))
    if "register" in results:
        registered = results["register"]
        where.append(
            (
                "registered",
                f"models:/{registered['model_name']}/{registered['version']}",
            )
        )
    if "promote" in results:
        promoted = results["promote"]
        where.append(
            ("promotion", f"{promoted['outcome']}: {promoted['reason']}")
        )
    if tracker is not None and tracker.enabled:
        from pipeline.tracking import ui_command

        if parent is not None and parent.run_id:
            where.append(("MLflow run", tracker.run_url(parent.run_id)))
        where.append(("MLflow UI", ui_command(tracker.uri)))
    if where:
        lines.append("")
        width = max(len(k) for k, _ in where)
        lines += [f"  {k:<{width}}  {v}" for k, v in where]
    return "\n".join(lines)


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"
