"""`nppnet data synth | preprocess | validate`: the data layer's commands.

* `synth` writes a synthetic LIP in the release layout.
* `preprocess` runs the Beam job (beam_jobs/lip_to_tfrecord.py): LIP folder
  -> sharded GZIP TFRecords, dead letters, manifest; a no-op when the
  inputs and config are unchanged (`--force` rebuilds).
* `validate` runs the TFDV gate (beam_jobs/validate_records.py); exit code
  3 when the data has anomalies.

Beam pipeline options go after `--`, e.g.
`nppnet data preprocess --lip-root L --out R -- --runner=FlinkRunner
--flink_master=host:8081 --environment_type=LOOPBACK`; without them the
job runs in-process (FnApiRunner). `--config` takes the data, beam and
validate sections from a run config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_DATA_GATE = 3


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="synthetic LIP, Beam preprocessing to TFRecords, TFDV gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="data_command", metavar="DATA_COMMAND"
    )
    commands.required = True

    synth = commands.add_parser(
        "synth",
        help="write a synthetic LIP in the release layout",
        description="Writes a synthetic LIP (images, parsing labels, pose CSV, "
        "id lists) in the exact release layout. Values not given come from "
        "--config's synth section, else the built-in defaults.",
    )
    synth.add_argument(
        "--out",
        help="output folder (default: <run.work_dir>/lip with --config)",
    )
    synth.add_argument("--train", type=int, help="training images")
    synth.add_argument("--val", type=int, help="validation images")
    synth.add_argument(
        "--test", type=int, default=0, help="test images (no labels)"
    )
    synth.add_argument("--seed", type=int, help="random seed")
    synth.add_argument("--min-size", type=int, help="shortest image side, px")
    synth.add_argument("--max-size", type=int, help="longest image side, px")
    _add_config_flags(synth)
    synth.set_defaults(handler=synth_command)

    preprocess = commands.add_parser(
        "preprocess",
        help="Beam: LIP folder -> TFRecords, dead letters, manifest",
        description=(__doc__ or "").split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preprocess.add_argument(
        "--lip-root", help="LIP release folder (default: run.lip_root)"
    )
    preprocess.add_argument(
        "--out", help="output folder (default: <run.work_dir>/records)"
    )
    preprocess.add_argument(
        "--annotation-json",
        action="append",
        default=[],
        metavar="SPLIT=PATH",
        help="authors' annotation JSON replacing SPLIT's pose CSV (repeatable)",
    )
    preprocess.add_argument(
        "--direct-num-workers",
        type=int,
        help="workers of the in-process runner (default: beam.direct_num_workers)",
    )
    preprocess.add_argument(
        "--force", action="store_true", help="rebuild even if up to date"
    )
    _add_config_flags(preprocess)
    _add_beam_args(preprocess)
    preprocess.set_defaults(handler=preprocess_command)

    validate = commands.add_parser(
        "validate",
        help="TFDV statistics, schema, anomalies (exit 3 on anomalies)",
        description="TFDV statistics per split, anomalies against the curated "
        "schema (inferred and written on the first run), train/val skew. "
        "Exit code 3 when the data gate fails.",
    )
    validate.add_argument(
        "--records",
        help="preprocessing output (default: <run.work_dir>/records)",
    )
    validate.add_argument(
        "--schema", help="schema path (default: validate.schema)"
    )
    validate.add_argument(
        "--skew-threshold", type=float, help="default: validate.skew_threshold"
    )
    validate.add_argument(
        "--skew-min-examples",
        type=int,
        help="default: validate.skew_min_examples",
    )
    _add_config_flags(validate)
    _add_beam_args(validate)
    validate.set_defaults(handler=validate_command)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="run config YAML (e.g. configs/demo.yaml)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. data.shards=4 (needs --config)",
    )


def _add_beam_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "beam_args",
        nargs="*",
        metavar="-- BEAM_FLAG",
        help="standard Beam pipeline options after `--` (e.g. --runner=FlinkRunner)",
    )


def _load(args):
    """The run config from --config/--set, or the defaults."""
    from nppnet_tf.config import RunConfig, load_config

    if args.config:
        return load_config(args.config, args.set)
    if args.set:
        raise ValueError("--set needs --config")
    return RunConfig()


def _default_path(
    value: str | None, args, config, relative: str, flag: str
) -> str:
    if value:
        return value
    if args.config:
        return str(Path(config.run.work_dir) / relative)
    raise ValueError(
        f"{flag} is required (or give --config to use run.work_dir/{relative})"
    )


def _print(summary: dict) -> None:
    sys.stdout.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def synth_command(args) -> int:
    from nppnet_tf.config import SynthConfig
    from nppnet_tf.data.synthetic import write_synthetic_lip

    config = _load(args)
    defaults = config.synth
    values = {
        "train": args.train if args.train is not None else defaults.train,
        "val": args.val if args.val is not None else defaults.val,
        "seed": args.seed if args.seed is not None else defaults.seed,
        "min_size": args.min_size
        if args.min_size is not None
        else defaults.min_size,
        "max_size": args.max_size
        if args.max_size is not None
        else defaults.max_size,
    }
    SynthConfig(**values)  # range checks, naming the bad flag's key
    if args.test < 0:
        raise ValueError(f"--test must be >= 0, got {args.test}")
    out = _default_path(args.out, args, config, "lip", "--out")
    log.info(
        "writing a synthetic LIP to %s (%s, test %d)", out, values, args.test
    )
    summary = write_synthetic_lip(
        out,
        num_train=values["train"],
        num_val=values["val"],
        seed=values["seed"],
        min_size=values["min_size"],
        max_size=values["max_size"],
        num_test=args.test,
        progress=sys.stderr.isatty(),
    )
    _print(summary)
    return 0


def preprocess_command(args) -> int:
    from beam_jobs.lip_to_tfrecord import (
        parse_annotation_json_flags,
        preprocess,
    )

    config = _load(args)
    lip_root = args.lip_root or config.run.lip_root
    if not lip_root:
        if not args.config:
            raise ValueError("--lip-root is required")
        lip_root = str(Path(config.run.work_dir) / "lip")
    out = _default_path(args.out, args, config, "records", "--out")
    workers = args.direct_num_workers or config.beam.direct_num_workers
    if workers < 1:
        raise ValueError(f"--direct-num-workers must be >= 1, got {workers}")
    manifest = preprocess(
        lip_root,
        out,
        config.data,
        pipeline_args=[*config.beam.pipeline_args, *args.beam_args],
        direct_num_workers=workers,
        force=args.force,
        annotation_json=parse_annotation_json_flags(args.annotation_json),
        progress=sys.stderr.isatty(),
    )
    if manifest["skipped"]:
        log.info(
            "nothing to do: %s is up to date (use --force to rebuild)", out
        )
    _print(
        {
            "skipped": manifest["skipped"],
            "out": out,
            "counts": manifest["counts"],
            "num_dead_letters": manifest["num_dead_letters"],
            "dead_letter_counts": manifest["dead_letter_counts"],
            "bytes_per_example": manifest["bytes_per_example"],
            "manifest": str(Path(out) / "manifest.json"),
        }
    )
    return 0


def validate_command(args) -> int:
    from beam_jobs.validate_records import report_text, validate

    config = _load(args)
    records = _default_path(args.records, args, config, "records", "--records")
    report = validate(
        records,
        args.schema or config.validate.schema,
        args.skew_threshold
        if args.skew_threshold is not None
        else config.validate.skew_threshold,
        pipeline_args=[*config.beam.pipeline_args, *args.beam_args],
        skew_min_examples=args.skew_min_examples
        if args.skew_min_examples is not None
        else config.validate.skew_min_examples,
    )
    sys.stdout.write(report_text(report))
    if report["anomalies"]:
        log.error(
            "data gate failed: %d anomalies (see %s)",
            len(report["anomalies"]),
            report["outputs"].get("summary_html"),
        )
        return EXIT_DATA_GATE
    return 0
