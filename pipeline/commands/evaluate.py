"""`nppnet evaluate-predictions`: scores LIP challenge-format predictions.

Reads a LIP release folder (ground-truth label PNGs and the split's pose
CSV), a folder of predicted label PNGs and/or a pose prediction CSV; writes a
JSON report (mIoU, per-class IoU, accuracies, PCKh with groups and per-joint
values, and the counts used) and optionally report.md, report.html and
overlays/ into --report-dir. See docs/evaluation.md.

    nppnet evaluate-predictions --lip-root /data/LIP --split val \\
        --parsing-dir preds/parsing --pose-csv preds/pose.csv \\
        --out report.json --report-dir report/
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate-predictions",
        help="score LIP challenge-format predictions (mIoU, PCKh) into a JSON report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--lip-root", required=True, type=Path, help="LIP release folder"
    )
    parser.add_argument(
        "--split",
        default="val",
        choices=["train", "val"],
        help="split to score (default: val)",
    )
    parser.add_argument(
        "--parsing-dir",
        type=Path,
        help="folder of predicted <image_id>.png label maps (single channel, ids 0..19)",
    )
    parser.add_argument(
        "--pose-csv",
        type=Path,
        help="pose predictions: image name then 16 x,y pairs in LIP order per row",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="report JSON to write"
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        help="also write report.md, report.html and overlays/ here",
    )
    parser.add_argument(
        "--overlays",
        type=int,
        default=8,
        help="number of overlay images (first ids in sorted order; default: 8)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from nppnet_tf.evaluation.prediction_files import (
        evaluate_prediction_files,
        json_ready,
        read_prediction_csv,
    )

    if args.parsing_dir is None and args.pose_csv is None:
        raise ValueError(
            "evaluate-predictions needs --parsing-dir, --pose-csv or both"
        )
    if args.overlays < 0:
        raise ValueError(f"--overlays must be >= 0, got {args.overlays}")
    report = json_ready(
        evaluate_prediction_files(
            args.lip_root,
            args.split,
            parsing_dir=args.parsing_dir,
            pose_csv=args.pose_csv,
            show_progress=not args.no_progress,
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    log.info("wrote %s", args.out)
    if args.report_dir is not None:
        from nppnet_tf.data.lip_files import (
            LIPLayout,
            image_id_of,
            read_id_list,
        )
        from nppnet_tf.evaluation.overlay import panel_ids, write_overlays
        from nppnet_tf.evaluation.report import write_report_files

        layout = LIPLayout(args.lip_root)
        split_ids = read_id_list(layout.id_file(args.split))
        ids = panel_ids(
            [image_id_of(name) for name in split_ids], args.overlays
        )
        poses = read_prediction_csv(args.pose_csv) if args.pose_csv else None
        overlays = write_overlays(
            args.lip_root,
            args.split,
            ids,
            args.report_dir / "overlays",
            parsing_dir=args.parsing_dir,
            pose_predictions=poses,
        )
        markdown, html = write_report_files(report, args.report_dir, overlays)
        log.info("wrote %s, %s and %d overlays", markdown, html, len(overlays))
    print(_summary(report, args.out))
    return 0


def _summary(report: dict, out: Path) -> str:
    parts = [f"LIP {report['split']}: {report['images']} images"]
    parsing = report.get("parsing")
    if parsing:
        parts.append(
            f"mIoU {_number(parsing['mean_iou'])} "
            f"(missing {parsing['images_missing_predictions']})"
        )
    pose = report.get("pose")
    if pose:
        parts.append(
            f"PCKh@0.5 {_number(pose['average'])} "
            f"(missing {pose['images_missing_predictions']}, "
            f"no head size {pose['images_excluded_head_size']})"
        )
    return " | ".join(parts) + f" -> {out}"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
