"""`nppnet evaluate`: scores a saved model on a split of LIP records.

Loads a `.keras` model (NPPNet or any Keras model returning `parsing` and
`pose`), evaluates it with the official LIP protocol (original resolution,
every image) or the authors' training-time crop protocol, and writes a JSON
report (mIoU, per-class IoU, accuracies, PCKh with groups and per-joint
values, counts). With --report-dir also report.md, report.html, overlays/
(ground truth | prediction over the original photo, first ids in sorted
order) and, for the official protocol, predictions/ in the LIP challenge
format (parsing/<image_id>.png, pose.csv) that `nppnet evaluate-predictions`
scores the same. See docs/evaluation.md, "Model evaluation".

    nppnet evaluate --model runs/lip/model.keras --records runs/lip/records \\
        --split val --scales 0.75 1.0 1.25 --out report.json \\
        --report-dir report/

The crop size S comes from --config's data section, else from the records'
manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a .keras model on LIP records (mIoU, PCKh) into a "
        "JSON report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, type=Path, help="saved .keras model"
    )
    parser.add_argument(
        "--records",
        required=True,
        help="preprocessing output (the Beam job's directory)",
    )
    parser.add_argument(
        "--split", default="val", help="split to evaluate (default: val)"
    )
    parser.add_argument(
        "--protocol",
        default="official",
        choices=["official", "crop"],
        help="official: LIP protocol at original resolution; crop: the "
        "authors' training-time validation on the S crops (default: official)",
    )
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="SCALE",
        help="test scales, e.g. 0.75 1.0 1.25 (default: 1.0)",
    )
    parser.add_argument(
        "--no-flip", action="store_true", help="no horizontal flip test"
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        help="evaluate only the first N records (the authors use 5000)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="images per batch (default: 8)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="report JSON to write (default: <report-dir>/report.json)",
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        help="also write report.md, report.html, overlays/ and "
        "predictions/ here",
    )
    parser.add_argument(
        "--overlays",
        type=int,
        default=8,
        help="number of overlay images (first ids in sorted order; default: 8)",
    )
    parser.add_argument(
        "--config",
        help="run config YAML (its data section gives the crop size)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. data.image_size=64 "
        "(needs --config)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    parser.set_defaults(handler=run)


def _data_config(args):
    """The `data` section: --config's, else the records manifest's."""
    from nppnet_tf.config import DataConfig, config_from_dict, load_config
    from nppnet_tf.data.dataset import MANIFEST_NAME, read_manifest

    if args.config:
        return load_config(args.config, args.set).data
    if args.set:
        raise ValueError("--set needs --config")
    manifest = read_manifest(args.records) or {}
    written = manifest.get("config") or manifest.get("data_config")
    if isinstance(written, dict) and isinstance(written.get("data"), dict):
        written = written["data"]  # a whole run config
    if isinstance(written, dict):
        source = f"{Path(args.records) / MANIFEST_NAME} (config)"
        return config_from_dict(written, source, DataConfig)
    log.warning(
        "%s has no %s with a data config; using the default data config "
        "(image_size %d)",
        args.records,
        MANIFEST_NAME,
        DataConfig().image_size,
    )
    return DataConfig()


def _check_args(args) -> Path:
    if not args.model.is_file():
        raise FileNotFoundError(f"model file {args.model} does not exist")
    if args.model.suffix != ".keras":
        raise ValueError(
            "--model must be a .keras file (keras.saving format), got "
            f"{args.model}"
        )
    if not Path(args.records).is_dir():
        raise FileNotFoundError(
            f"records directory {args.records} does not exist"
        )
    if args.overlays < 0:
        raise ValueError(f"--overlays must be >= 0, got {args.overlays}")
    if args.out is None and args.report_dir is None:
        raise ValueError("give --out, --report-dir or both")
    return args.out or args.report_dir / "report.json"


def load_model(path: Path):
    """The `.keras` model (`nppnet_tf.export.load_keras_model`: NPPNet's
    classes registered first).

    Raises:
        ValueError: Keras cannot rebuild the model (names the file).
    """
    from nppnet_tf.export import load_keras_model

    try:
        return load_keras_model(path)
    except (ValueError, TypeError, OSError) as err:
        # Keras reports unknown classes and unrestorable weights this way.
        raise ValueError(f"could not load model {path}: {err}") from err


def run(args: argparse.Namespace) -> int:
    out = _check_args(args)
    data_config = _data_config(args)
    from nppnet_tf.evaluation.evaluate import run_evaluation
    from nppnet_tf.evaluation.model_overlays import write_model_overlays
    from nppnet_tf.evaluation.overlay import panel_ids
    from nppnet_tf.evaluation.prediction_files import json_ready
    from nppnet_tf.evaluation.report import write_report_files

    model = load_model(args.model)
    prediction_dir = None
    if args.report_dir is not None and args.protocol == "official":
        prediction_dir = args.report_dir / "predictions"
    evaluation = run_evaluation(
        model,
        args.records,
        args.split,
        data_config,
        protocol=args.protocol,
        scales=args.scales,
        flip=not args.no_flip,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        prediction_dir=prediction_dir,
        progress=not args.no_progress,
    )
    report = json_ready({"model": str(args.model), **evaluation.report})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    log.info("wrote %s", out)
    if args.report_dir is not None:
        overlays = write_model_overlays(
            model,
            args.records,
            args.split,
            panel_ids(evaluation.image_ids, args.overlays),
            args.report_dir / "overlays",
            data_config.image_size,
            scales=args.scales,
            flip=not args.no_flip,
        )
        markdown, html = write_report_files(report, args.report_dir, overlays)
        log.info("wrote %s, %s and %d overlays", markdown, html, len(overlays))
    print(_summary(report, out))
    return 0


def _summary(report: dict, out: Path) -> str:
    scales = ", ".join(f"{scale:g}" for scale in report["scales"])
    flip = "on" if report["flip"] else "off"
    miou = _number(report["parsing"]["mean_iou"])
    pckh = _number(report["pose"]["average"])
    return (
        f"LIP {report['split']} ({report['protocol']} protocol, scales "
        f"{scales}, flip {flip}): {report['images']} images | mIoU {miou} "
        f"| PCKh@0.5 {pckh} -> {out}"
    )


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
