"""`nppnet serve-check`: an export served the way TF Serving would.

Loads the SavedModel as the model server does (tag `serve`, signatures),
checks the layout and that every op is a core TensorFlow op, replays the
warmup requests through each signature, sends a gRPC `PredictRequest` and
REST JSON bodies (row and columnar, images as `{"b64": ...}`) with a JPEG
and a PNG of different sizes through the server's decoding, and compares
the answers with the Keras model's predictions by the evaluation code
(keypoints within 1 px, parsing pixels agreeing >= 99.9%); bad requests
(not an image, an empty string, an empty batch) must fail with a readable
error while serving goes on. Prints one line per check; exits 0 when all
pass, 1 otherwise. See docs/serving.md.

    nppnet serve-check runs/lip/export
    nppnet serve-check runs/lip/export --version 3 --image photo.jpg \\
        --keras-model runs/lip/model.keras --json check.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve-check",
        help="check an export as TF Serving would serve it (exit 1 on mismatch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "export",
        type=Path,
        help="export base (EXPORT_BASE), model base path or version directory",
    )
    parser.add_argument(
        "--model-name", default="nppnet", help="served model name"
    )
    parser.add_argument(
        "--version", type=int, help="version to check (default: the latest)"
    )
    parser.add_argument(
        "--keras-model",
        type=Path,
        help="compare with this .keras model (default: the copy in the export)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="send this image (repeatable; default: a JPEG and a PNG sample)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    images = None
    if args.image:
        images = []
        for path in args.image:
            if not path.is_file():
                raise FileNotFoundError(f"--image {path} does not exist")
            images.append((path.name, path.read_bytes()))
    from nppnet_tf.serving.check import check_export

    report = check_export(
        args.export,
        keras_model=args.keras_model,
        images=images,
        model_name=args.model_name,
        version=args.version,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        log.info("wrote %s", args.json)
    print(report.format())
    return 0 if report.passed else 1
