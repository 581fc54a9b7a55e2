"""`nppnet export`: a trained model as a new version for TF Serving.

Reads a `.keras` model (or a directory holding `model.keras`, the training
loop's output) and writes `EXPORT_BASE/<model_name>/<version>/` (SavedModel,
tag `serve`, signatures `serving_default` on encoded images and
`dense_maps` on float batches, warmup requests, the source model and
`export_metadata.json`) plus `EXPORT_BASE/models.config` and
`models.docker.config` for the model server. See docs/serving.md.

    nppnet export --checkpoint runs/lip/model.keras --out runs/lip/export
    nppnet export --checkpoint runs/demo/train --config configs/demo.yaml

The input size S comes from --image-size, else --config's data.image_size,
else the input shape the model was built with; flip test, model name and
(without --out) the export base from --config's export section.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a .keras model as a TF Serving SavedModel version",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a .keras model, or a directory holding model.keras",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="export base directory (default: --config's export.base_dir, "
        "else <run.work_dir>/export)",
    )
    parser.add_argument(
        "--version",
        type=int,
        help="version to write (default: the next integer); never overwrites",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="network input side S, a multiple of 32 (default: see above)",
    )
    parser.add_argument(
        "--no-flip",
        action="store_true",
        help="no flip test in serving_default (default: export.flip)",
    )
    parser.add_argument(
        "--model-name", help="served model name (default: export.model_name)"
    )
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. export.flip=false",
    )
    parser.set_defaults(handler=run)


def _settings(args: argparse.Namespace) -> dict:
    """Export base, image size (or None), flip and model name."""
    from nppnet_tf.config import RunConfig, load_config

    if args.set and not args.config:
        raise ValueError("--set needs --config")
    config = load_config(args.config, args.set) if args.config else RunConfig()
    out = args.out
    if out is None:
        if not args.config:
            raise ValueError("give --out (the export base) or --config")
        out = Path(
            config.export.base_dir or Path(config.run.work_dir) / "export"
        )
    image_size = args.image_size
    if image_size is None and args.config:
        image_size = config.data.image_size
    return {
        "export_base": out,
        "image_size": image_size,
        "image_size_from_config": args.image_size is None and args.config,
        "flip": config.export.flip and not args.no_flip,
        "model_name": args.model_name or config.export.model_name,
    }


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from nppnet_tf.export import (
        export_model,
        load_keras_model,
        model_input_size,
        resolve_checkpoint,
    )

    source = resolve_checkpoint(args.checkpoint)
    model = load_keras_model(source)
    built = model_input_size(model)
    image_size = settings["image_size"]
    if image_size is None:
        if built is None:
            raise ValueError(
                f"{source} does not record a square input size; give "
                "--image-size or --config"
            )
        image_size = built
    elif built is not None and built != image_size:
        log.warning(
            "exporting at S=%d (%s) but %s was built at %d",
            image_size,
            "--config data.image_size"
            if settings["image_size_from_config"]
            else "--image-size",
            source,
            built,
        )
    result = export_model(
        model,
        settings["export_base"],
        image_size,
        flip=settings["flip"],
        model_name=settings["model_name"],
        version=args.version,
        source=source,
    )
    print(
        f"exported {source} as {settings['model_name']!r} version "
        f"{result.version} (S={image_size}, flip "
        f"{'on' if settings['flip'] else 'off'}) -> {result.version_dir}\n"
        f"model server config: {result.models_config}\n"
        f"check it: nppnet serve-check {result.export_base}"
    )
    return 0
