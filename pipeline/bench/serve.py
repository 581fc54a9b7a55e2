"""`nppnet bench serve`: latency of the exported `serving_default` signature.

Loads an export (`--export`, an export base or version directory) the way
the model server does, or first exports a freshly initialised NPPNet
(authors' genotype, random weights: the latency does not depend on the
weights) of the given size into a temporary directory. Then, for each
batch size, sends requests of JPEG photos of LIP-like sizes (sides drawn
in [--min-side, --max-side], a different set per request), `--warmup`
untimed requests first, then `--repeats` timed ones; a request's latency
is the wall time of the signature call with its outputs in host memory.
Reports p50 and p95 per request and per image (request / batch size),
mean images per second, and the load average before and after (other
work on the machine inflates the numbers).

Writes `--out` (JSON) and prints the Markdown table of docs/serving.md,
"Benchmark".

    nppnet bench serve                                   # tiny model, S=64
    nppnet bench serve --init-channels 64 --layers 16 --image-size 384
    nppnet bench serve --export runs/lip/export --repeats 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

GENOTYPE = "configs/genotypes/nppnet_lip.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serving_default latency per image and request, batch 1 and 8",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--export",
        type=Path,
        help="an export base or version directory (default: export a fresh "
        "model of the size below into a temporary directory)",
    )
    parser.add_argument("--genotype", default=GENOTYPE)
    parser.add_argument("--init-channels", type=int, default=8)
    parser.add_argument(
        "--layers", type=int, default=4, help="cells per encoder"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--no-flip",
        action="store_true",
        help="export without the flip test (fresh model only)",
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N"
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed requests per batch size"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed requests first"
    )
    parser.add_argument("--min-side", type=int, default=200)
    parser.add_argument("--max-side", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench/serve.json")
    )
    parser.set_defaults(handler=bench_serve)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("repeats", "warmup", "min_side"):
        value = getattr(args, name)
        if value < (0 if name == "warmup" else 1):
            raise ValueError(
                f"--{name.replace('_', '-')} is too small: {value}"
            )
    if args.max_side < args.min_side:
        raise ValueError(
            f"--max-side {args.max_side} < --min-side {args.min_side}"
        )
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    if args.export is not None and not args.export.exists():
        raise FileNotFoundError(f"--export {args.export} does not exist")


def _fresh_export(args: argparse.Namespace, directory: Path) -> Path:
    import keras
    import tensorflow as tf

    from nppnet_tf.export import export_model
    from nppnet_tf.models.nppnet import NPPNet
    from nppnet_tf.search.genotype import Genotype

    keras.utils.set_random_seed(args.seed)
    model = NPPNet(
        Genotype.load(args.genotype),
        init_channels=args.init_channels,
        num_cells=args.layers,
    )
    size = args.image_size
    model(tf.zeros([1, size, size, 3]), training=False)
    log.info(
        "exporting a fresh NPPNet (C=%d, %d cells, S=%d) to %s",
        args.init_channels,
        args.layers,
        size,
        directory,
    )
    return export_model(
        model, directory, size, flip=not args.no_flip
    ).version_dir


def _request_batches(args, batch: int, count: int) -> list[list[bytes]]:
    import numpy as np

    from nppnet_tf.serving.samples import encode_photo, sample_photo

    rng = np.random.default_rng(args.seed + batch)
    batches = []
    for request in range(count):
        images = []
        for index in range(batch):
            height, width = rng.integers(
                args.min_side, args.max_side + 1, size=2
            )
            photo = sample_photo(
                int(height), int(width), seed=request * batch + index
            )
            images.append(encode_photo(photo, "jpeg"))
        batches.append(images)
    return batches


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def measure(serve, batches: list[list[bytes]], warmup: int) -> list[float]:
    """Wall seconds of each timed request (after `warmup` untimed ones).

    Args:
        serve: the `serving_default` concrete function.
        batches: the requests' images; the first `warmup` are not timed.
        warmup: untimed requests.

    Returns:
        One latency per timed request, seconds.
    """
    import tensorflow as tf

    from nppnet_tf.serving.module import IMAGE_BYTES

    seconds = []
    for index, images in enumerate(batches):
        inputs = tf.constant(images)
        start = time.perf_counter()
        outputs = serve(**{IMAGE_BYTES: inputs})
        for value in outputs.values():
            value.numpy()  # wait for the results in host memory
        elapsed = time.perf_counter() - start
        if index >= warmup:
            seconds.append(elapsed)
    return seconds


def bench_serve(args: argparse.Namespace) -> int:
    _check_args(args)
    import tensorflow as tf

    from nppnet_tf.serving.layout import find_version_dir, read_metadata
    from nppnet_tf.serving.module import DEFAULT_SIGNATURE

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="nppnet-bench-serve-") as tmp:
        version_dir = (
            find_version_dir(args.export)
            if args.export is not None
            else _fresh_export(args, Path(tmp))
        )
        metadata = read_metadata(version_dir)
        started = time.perf_counter()
        loaded = tf.saved_model.load(str(version_dir), tags=["serve"])
        load_seconds = time.perf_counter() - started
        serve = loaded.signatures[DEFAULT_SIGNATURE]
        results = []
        for batch in args.batch_sizes:
            batches = _request_batches(args, batch, args.warmup + args.repeats)
            log.info(
                "batch %d: %d warm-up + %d timed requests",
                batch,
                args.warmup,
                args.repeats,
            )
            seconds = measure(serve, batches, args.warmup)
            per_image = [s / batch for s in seconds]
            results.append(
                {
                    "batch": batch,
                    "requests": len(seconds),
                    "p50_ms_per_request": 1e3 * _percentile(seconds, 50),
                    "p95_ms_per_request": 1e3 * _percentile(seconds, 95),
                    "p50_ms_per_image": 1e3 * _percentile(per_image, 50),
                    "p95_ms_per_image": 1e3 * _percentile(per_image, 95),
                    "images_per_second": batch * len(seconds) / sum(seconds),
                }
            )
    report = {
        "benchmark": "serve",
        "created": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "export": None if args.export is None else str(args.export),
        "model": {
            key: metadata.get(key)
            for key in (
                "model_class",
                "init_channels",
                "num_cells",
                "image_size",
                "flip",
                "genotype_fingerprint",
            )
        },
        "weights": "trained export" if args.export else "random (fresh)",
        "image_sides": [args.min_side, args.max_side],
        "image_format": "jpeg",
        "warmup_requests": args.warmup,
        "load_seconds": round(load_seconds, 2),
        "results": results,
        "environment": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    """The results as a Markdown table (docs/serving.md, "Benchmark")."""
    model = report["model"]
    environment = report["environment"]
    lines = [
        f"{model['model_class']} C={model['init_channels']}, "
        f"{model['num_cells']} cells, S={model['image_size']}, flip "
        f"{'on' if model['flip'] else 'off'}; JPEG sides "
        f"{report['image_sides'][0]}-{report['image_sides'][1]} px; "
        f"{environment['cpu_count']} CPUs, load average "
        f"{environment['load_average_before'][0]} -> "
        f"{environment['load_average_after'][0]}",
        "",
        "| batch | requests | p50 ms/request | p95 ms/request | p50 ms/image "
        "| p95 ms/image | images/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['batch']} | {row['requests']} "
            f"| {row['p50_ms_per_request']:.1f} "
            f"| {row['p95_ms_per_request']:.1f} "
            f"| {row['p50_ms_per_image']:.1f} "
            f"| {row['p95_ms_per_image']:.1f} "
            f"| {row['images_per_second']:.2f} |"
        )
    return "\n".join(lines)
