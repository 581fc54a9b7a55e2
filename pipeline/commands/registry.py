"""`nppnet register` and `nppnet promote`: the MLflow model registry.

`register` logs a trained model (the `.keras` file, its SavedModel, the
genotype, the val metrics and the report) into a new MLflow run named
`register` and registers it as a version of `registry.model_name` with the
`candidate` alias; a SavedModel already registered creates no version.

    nppnet register --config configs/lip.yaml --model runs/lip/model.keras \\
        --saved-model runs/lip/export/nppnet/1 \\
        --genotype runs/lip/genotype.json --metrics runs/lip/report.json \\
        --records runs/lip/records

`promote` moves the `champion` alias to the candidate when its val mIoU and
val PCKh beat the champion's by more than `registry.miou_margin` and
`registry.pckh_margin` (or there is no champion). It exits 0 when the
candidate is (or already was) the champion and 4 when it was refused; the
reason is printed, tagged on the version and appended to
`<run.work_dir>/registry/promotions.jsonl`.

    nppnet promote --config configs/lip.yaml [--version 3]

The registry is the MLflow store of `tracking.uri` (else
`$MLFLOW_TRACKING_URI`, else `sqlite:///<run.work_dir>/mlflow.db`). See
docs/registry.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.commands.run import add_config_arguments

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    register_parser = subparsers.add_parser(
        "register",
        help="register a trained model as a version in the MLflow registry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(register_parser)
    register_parser.add_argument(
        "--model", required=True, type=Path, help="trained .keras model"
    )
    register_parser.add_argument(
        "--saved-model",
        required=True,
        type=Path,
        help="its TF SavedModel directory (`nppnet export`)",
    )
    register_parser.add_argument(
        "--genotype",
        required=True,
        type=Path,
        help="genotype JSON the model was built from",
    )
    register_parser.add_argument(
        "--metrics",
        required=True,
        type=Path,
        help="val evaluation report JSON (`nppnet evaluate --split val`)",
    )
    register_parser.add_argument(
        "--records",
        help="training records directory; its manifest.json gives the "
        "data fingerprint tag",
    )
    register_parser.set_defaults(handler=handle_register)

    promote_parser = subparsers.add_parser(
        "promote",
        help="move the champion alias to the candidate if it beats the champion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(promote_parser)
    promote_parser.add_argument(
        "--version",
        type=int,
        help="version to consider (default: the candidate alias's)",
    )
    promote_parser.set_defaults(handler=handle_promote)


def handle_register(args: argparse.Namespace) -> int:
    from nppnet_tf.config import load_config
    from pipeline.registry import (
        read_data_fingerprint,
        register_model,
        selection_metrics,
    )
    from pipeline.tracking import Tracker

    config = load_config(args.config, args.overrides)
    if not config.tracking.enabled:
        raise ValueError(
            f"{args.config}: tracking.enabled is false; the registry needs "
            "MLflow tracking"
        )
    try:
        report = json.loads(args.metrics.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--metrics {args.metrics}: not JSON ({err})"
        ) from None
    if not isinstance(report, dict):
        raise ValueError(f"--metrics {args.metrics}: expected a JSON object")
    metrics = selection_metrics(report, f"--metrics {args.metrics}")
    data_fingerprint = (
        read_data_fingerprint(args.records) if args.records else None
    )
    tracker = Tracker(config)
    with tracker.run(
        "register", tags={"registry.model_name": config.registry.model_name}
    ) as logger:
        logger.log_params(
            {
                "model": str(args.model),
                "saved_model": str(args.saved_model),
                "genotype": str(args.genotype),
                "metrics": str(args.metrics),
                "records": str(args.records or ""),
            }
        )
        result = register_model(
            logger,
            args.model,
            args.saved_model,
            args.genotype,
            metrics,
            report_path=args.metrics,
            data_fingerprint=data_fingerprint,
            config=config,
        )
    print(
        f"{result.model_uri} ({'new' if result.created else 'existing'}): "
        f"{result.reason}\n  run: {tracker.run_url(result.run_id)}"
    )
    return 0


def handle_promote(args: argparse.Namespace) -> int:
    from nppnet_tf.config import load_config
    from pipeline.promotion import decision_log_path, promote
    from pipeline.registry import registry_client
    from pipeline.runner import EXIT_PROMOTION_REFUSED

    config = load_config(args.config, args.overrides)
    decision = promote(registry_client(config), config, args.version)
    print(
        f"{decision.outcome}: {decision.reason}\n"
        f"  champion: {decision.champion_version_before or 'none'} -> "
        f"{decision.champion_version_after or 'none'} ({decision.name})\n"
        f"  decision log: {decision_log_path(config)}"
    )
    return EXIT_PROMOTION_REFUSED if decision.outcome == "refused" else 0
