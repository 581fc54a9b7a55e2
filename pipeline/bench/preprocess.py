"""`nppnet bench preprocess`: throughput and record size of the Beam job.

Writes a synthetic LIP, then runs `beam_jobs.lip_to_tfrecord.preprocess`
(forced, in-process FnApiRunner) once per crop size and worker count (2+
workers: as threads and as subprocesses), and
reports examples per second (pipeline wall time, start-up included) and
bytes per example (GZIP shards on disk, and serialized records before
compression), after one untimed warm-up run. Results go to `--out` as JSON; the Markdown table printed at
the end is the one in docs/data.md, "Benchmark".
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="Beam preprocessing: examples/s with 1 and 2 workers, bytes/example",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/bench/preprocess.json", help="JSON results"
    )
    parser.add_argument(
        "--train", type=int, default=256, help="synthetic training images"
    )
    parser.add_argument(
        "--val", type=int, default=64, help="synthetic validation images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-sizes",
        type=int,
        nargs="+",
        default=[64, 384],
        help="crop sizes to run",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="direct_num_workers values",
    )
    parser.add_argument(
        "--lip-root", help="use this LIP folder instead of a synthetic one"
    )
    parser.set_defaults(handler=bench_preprocess)


def _serialized_bytes(records_dir: Path, splits: list[str]) -> tuple[int, int]:
    """(total serialized bytes, records) of the given splits' shards."""
    import tensorflow as tf

    files = [
        str(p)
        for s in splits
        for p in sorted((records_dir / s).glob("*.tfrecord.gz"))
    ]
    total = count = 0
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        total += len(record.numpy())
        count += 1
    return total, count


def run_benchmark(
    lip_root: str,
    work_dir: Path,
    image_sizes: list[int],
    workers: list[int],
) -> list[dict]:
    """One forced preprocessing run per (image size, workers) pair."""
    from beam_jobs.lip_to_tfrecord import preprocess
    from nppnet_tf.config import DataConfig

    results = []
    # Untimed warm-up: the first run in a process also pays TensorFlow's and
    # Beam's one-time start-up, which would bias whichever setting runs first.
    preprocess(
        lip_root,
        str(work_dir / "warmup"),
        DataConfig(image_size=image_sizes[0], shards=1),
        force=True,
        progress=False,
    )
    for size in image_sizes:
        # The paper's sigmas are for 384 crops; scale them with the crop.
        config = DataConfig(
            image_size=size,
            sigma=7.0 * size / 384,
            aux_sigma=14.0 * size / 384,
            shards=2,
        )
        for count in workers:
            modes = (
                ["in_memory"]
                if count == 1
                else ["multi_threading", "multi_processing"]
            )
            for mode in modes:
                out = work_dir / f"records_{size}_{count}_{mode}"
                started = time.time()
                manifest = preprocess(
                    lip_root,
                    str(out),
                    config,
                    pipeline_args=[f"--direct_running_mode={mode}"],
                    direct_num_workers=count,
                    force=True,
                    progress=False,
                )
                total = time.time() - started
                serialized, records = _serialized_bytes(out, manifest["splits"])
                examples = manifest["num_examples"]
                result = {
                    "image_size": size,
                    "direct_num_workers": count,
                    "direct_running_mode": mode,
                    "examples": examples,
                    "dead_letters": manifest["num_dead_letters"],
                    "pipeline_seconds": manifest["seconds"],
                    "total_seconds": round(total, 2),
                    "examples_per_second": round(
                        examples / manifest["seconds"], 2
                    ),
                    "gzip_bytes_per_example": manifest["bytes_per_example"],
                    "serialized_bytes_per_example": round(
                        serialized / max(records, 1), 1
                    ),
                }
                log.info("%s", result)
                results.append(result)
    return results


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| crop | workers | running mode | examples | pipeline s | examples/s | bytes/example (GZIP) | bytes/example (serialized) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['image_size']} | {r['direct_num_workers']} | {r['direct_running_mode']} | {r['examples']} | "
            f"{r['pipeline_seconds']:.1f} | {r['examples_per_second']:.1f} | "
            f"{r['gzip_bytes_per_example']:.0f} | {r['serialized_bytes_per_example']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def bench_preprocess(args) -> int:
    if any(w < 1 for w in args.workers):
        raise ValueError(f"--workers must all be >= 1, got {args.workers}")
    if args.lip_root is None and (args.train < 1 or args.val < 1):
        raise ValueError(
            f"--train and --val must be >= 1, got {args.train}, {args.val}"
        )
    with tempfile.TemporaryDirectory(prefix="nppnet_bench_") as scratch:
        work_dir = Path(scratch)
        lip_root = args.lip_root
        if lip_root is None:
            from nppnet_tf.data.synthetic import write_synthetic_lip

            lip_root = str(work_dir / "lip")
            write_synthetic_lip(
                lip_root,
                args.train,
                args.val,
                args.seed,
                progress=sys.stderr.isatty(),
            )
        results = run_benchmark(
            lip_root, work_dir, args.image_sizes, args.workers
        )
    report = {
        "benchmark": "preprocess",
        "created": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # Other processes on the machine slow every setting down.
            "load_average_1_5_15_min_at_end": [
                round(v, 2) for v in os.getloadavg()
            ],
        },
        "input": args.lip_root
        or {
            "synthetic": {
                "train": args.train,
                "val": args.val,
                "seed": args.seed,
            }
        },
        "runner": "FnApiRunner (in-process)",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    sys.stdout.write(markdown_table(results))
    return 0
