"""`nppnet run`: one scheduled pipeline run from the LIP folder onwards."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the pipeline stages of a config (skipping up-to-date ones)",
        description=(
            "Runs the stages of a pipeline config in order, each skipped when "
            "its manifest under run.work_dir/stages is up to date. Exit codes: "
            "0 success, 1 error, 2 bad config or input, 3 data gate failed, "
            "4 promotion refused, 5 another run holds the work directory."
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
    from nppnet_tf.config import load_config
    from pipeline.runner import RunLock, StageFailed, run_stages
    from pipeline.stages import build_stages

    overrides = list(args.overrides)
    if args.lip_root:
        overrides.append(f"run.lip_root={args.lip_root}")
    config = load_config(args.config, overrides)
    stages = build_stages(config)
    log.info(
        "run %s: %d stages (%s), work dir %s",
        args.config,
        len(stages),
        ", ".join(s.name for s in stages),
        config.run.work_dir,
    )
    try:
        with RunLock(config.run.work_dir):
            records = run_stages(
                stages, config, force=args.force, from_stage=args.from_stage
            )
    except StageFailed as err:
        log.error("%s", err)
        return err.exit_code
    print(summary(config, records))
    return 0


def summary(config, records) -> str:
    """The end-of-run summary: what ran, what was skipped, where results are."""
    lines = [f"nppnet run finished: work dir {config.run.work_dir}"]
    for record in records:
        lines.append(
            f"  {record.name:<12} {record.status:<8} {record.seconds:7.1f} s"
        )
    results = {r.name: r.outputs for r in records}
    if "preprocess" in results:
        pre = results["preprocess"]
        lines.append(
            f"  records:      {pre['records']} {pre.get('counts', {})}"
        )
        if pre.get("dead_letters"):
            lines.append(f"  dead letters: {pre['dead_letters']}")
    if "validate" in results and results["validate"].get("statistics"):
        lines.append(f"  statistics:   {results['validate']['statistics']}")
    return "\n".join(lines)
