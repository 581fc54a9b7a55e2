"""`nppnet bench input`: can the tf.data pipeline feed the train step?

Writes a synthetic LIP at realistic LIP image sizes (150 to 400 px) and
preprocesses it at the crop size (384 by default) with the Beam job, both
kept under `--work-dir` and reused while inputs and config are unchanged.
Then it measures:

* the training input pipeline (`nppnet_tf.data.dataset.make_dataset`,
  training branch: read, decode, augment, regenerate targets, normalise,
  batch), in examples per second and CPU seconds per example, at the train
  step's batch size and at the paper's per-GPU batch of 16; the evaluation
  branch at the train step's batch size;
* the CPU cost per example of the map's stages (decode, augment, canonical
  crop), one thread;
* the train step of the derived NPPNet (the authors' genotype, C = 64, 16
  cells) on a constant batch, in images per second, or takes its time per
  step from `--train-step-seconds` when the model cannot be built here;
* with the model: the same train step fed by the training pipeline, so
  that any slowdown from the input (which shares the CPU cores) shows.

Results go to `--out` as JSON; the Markdown table printed at the end is the
one in docs/input_pipeline.md, "Benchmark".

    nppnet bench input
    nppnet bench input --train-step-seconds 40 --out runs/bench/input.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENOTYPE = "configs/genotypes/nppnet_lip.json"
PAPER_BATCH = 16  # per GPU, reference 6.1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "input",
        help="tf.data input pipeline examples/s against the train step's images/s",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/bench/input.json", help="JSON results"
    )
    parser.add_argument(
        "--work-dir",
        default="runs/bench/input_data",
        help="synthetic LIP and records (reused when up to date)",
    )
    parser.add_argument(
        "--images", type=int, default=64, help="synthetic training images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=150)
    parser.add_argument("--max-size", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="batch of the train step (and of the matching pipeline run)",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=256,
        help="examples timed per pipeline run (after a warm-up)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="pipeline runs (median kept)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=3,
        help="train steps timed after the first (traced) one",
    )
    parser.add_argument(
        "--train-step-seconds",
        type=float,
        help="seconds per train step at --batch-size; skips building the "
        "model (for machines where it cannot be built or is too slow)",
    )
    parser.set_defaults(handler=bench_input)


# ---------------------------------------------------------------------------
# Records


def prepare_records(args, data_config) -> str:
    """Synthetic LIP + Beam preprocessing under `--work-dir`; returns the
    records directory."""
    from beam_jobs.lip_to_tfrecord import preprocess
    from nppnet_tf.data.synthetic import MARKER_FILE, write_synthetic_lip

    work_dir = Path(args.work_dir)
    lip_root = work_dir / "lip"
    wanted = {
        "seed": args.seed,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "train": args.images,
    }
    marker = lip_root / MARKER_FILE
    existing = json.loads(marker.read_text()) if marker.is_file() else {}
    same = (
        existing.get("seed") == args.seed
        and existing.get("min_size") == args.min_size
        and existing.get("max_size") == args.max_size
        and existing.get("counts", {}).get("train") == args.images
    )
    if not same:
        log.info("writing synthetic LIP %s under %s", wanted, lip_root)
        write_synthetic_lip(
            lip_root,
            args.images,
            4,
            args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            progress=sys.stderr.isatty(),
        )
    records_dir = work_dir / f"records_{data_config.image_size}"
    preprocess(
        str(lip_root),
        str(records_dir),
        data_config,
        direct_num_workers=2,
        progress=False,
    )
    return str(records_dir)


# ---------------------------------------------------------------------------
# Pipeline


def time_pipeline(dataset, examples: int, repeats: int) -> dict[str, float]:
    """Median examples/s and CPU seconds/example (this process, all
    threads) over `repeats` runs of `examples` examples, each after 8
    untimed batches (tf.data's autotuner and buffers fill first)."""
    iterator = iter(dataset)
    batch = None
    rates, cpu = [], []
    for _ in range(repeats):
        for _ in range(8):
            batch = next(iterator)
        seen = 0
        wall, process = time.perf_counter(), time.process_time()
        while seen < examples:
            batch = next(iterator)
            seen += int(batch[0].shape[0])
        wall = time.perf_counter() - wall
        process = time.process_time() - process
        rates.append(seen / wall)
        cpu.append(process / seen)
    return {
        "examples_per_second": round(statistics.median(rates), 2),
        "cpu_seconds_per_example": round(statistics.median(cpu), 4),
        "runs_examples_per_second": [round(r, 2) for r in rates],
    }


def pipeline_results(args, records_dir, data_config, augment_config):
    from nppnet_tf.data.dataset import make_dataset

    runs = [
        ("training", args.batch_size, True),
        ("training", PAPER_BATCH, True),
        ("evaluation", args.batch_size, False),
    ]
    results = []
    for branch, batch_size, training in runs:
        dataset = make_dataset(
            records_dir,
            "train",
            data_config,
            batch_size,
            training,
            augment_config=augment_config,
            seed=args.seed,
            repeat=True,
        )
        timing = time_pipeline(dataset, args.examples, args.repeats)
        result = {"branch": branch, "batch_size": batch_size, **timing}
        log.info("pipeline %s", result)
        results.append(result)
    return results


def stage_costs(records_dir, data_config, augment_config, examples: int):
    """CPU milliseconds per example of the map stages, one thread, over
    records cached in memory. Each variant sums its outputs, so that
    TensorFlow's graph optimiser cannot prune the work it measures."""
    import tensorflow as tf

    from nppnet_tf.data import augment, records
    from nppnet_tf.data.dataset import split_files

    size = data_config.image_size
    stride = data_config.heatmap_stride
    serialized = tf.data.TFRecordDataset(
        split_files(records_dir, "train"), compression_type="GZIP"
    ).cache()
    for _ in serialized:  # fill the cache
        pass

    def total(tensors):
        return tf.add_n(
            [
                tf.reduce_sum(tf.cast(value, tf.float32))
                for value in tf.nest.flatten(tensors)
                if value.dtype != tf.string
            ]
        )

    def original_only(record):
        parsed = tf.io.parse_single_example(record, records.parse_spec())
        image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3)
        label = tf.io.decode_png(parsed["label/encoded"], channels=1)
        return total([image, label])

    def decode(record):
        return total(records.decode_example(record, size, stride))

    def training(record):
        decoded = records.decode_example(record, size, stride)
        seed = augment.example_seed(
            0, 0, augment.example_key(decoded["image_id"])
        )
        params = augment.random_crop_parameters(seed, augment_config)
        return total(augment.augment_example(decoded, params, data_config))

    def evaluation(record):
        decoded = records.decode_example(record, size, stride)
        return total(augment.canonical_example(decoded, data_config))

    variants = [
        ("parse + JPEG + label PNG", original_only),
        ("records.decode_example (all features)", decode),
        ("decode + augment_example", training),
        ("decode + canonical_example", evaluation),
    ]
    costs = {}
    for name, function in variants:
        mapped = serialized.repeat().map(function, num_parallel_calls=1)
        iterator = iter(mapped)
        for _ in range(4):
            next(iterator)
        started = time.process_time()
        for _ in range(examples):
            next(iterator)
        costs[name] = round(
            1000 * (time.process_time() - started) / examples, 2
        )
        log.info("stage %s: %.2f CPU ms/example", name, costs[name])
    return costs


# ---------------------------------------------------------------------------
# Train step


def build_train_step(data_config):
    """The derived NPPNet's train step (forward, NPPNet loss, Adam), traced
    once; returns `(step, model parameter count)`."""
    import keras
    import tensorflow as tf

    from nppnet_tf.config import LossConfig
    from nppnet_tf.models.nppnet import NPPNet
    from nppnet_tf.search.genotype import Genotype
    from nppnet_tf.training.losses import NPPNetLoss

    model = NPPNet(Genotype.load(GENOTYPE), init_channels=64, num_cells=16)
    loss_fn = NPPNetLoss(LossConfig())
    optimizer = keras.optimizers.Adam(1.5e-3)
    size = data_config.image_size
    model(tf.zeros([1, size, size, 3]), training=False)

    @tf.function
    def step(images, targets):
        with tf.GradientTape() as tape:
            total, _ = loss_fn(targets, model(images, training=True))
        variables = (
            model.trainable_variables + loss_fn.uncertainty.trainable_variables
        )
        gradients = tape.gradient(total, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return total

    return step, model.count_params()


def time_steps(step, batches, count: int) -> list[float]:
    """Seconds of `count` steps on `batches()` after one traced step."""
    images, targets = batches()
    step(images, targets).numpy()
    seconds = []
    for _ in range(count):
        images, targets = batches()
        started = time.perf_counter()
        step(images, targets).numpy()
        seconds.append(time.perf_counter() - started)
    return seconds


def train_step_results(args, records_dir, data_config, augment_config):
    if args.train_step_seconds is not None:
        seconds = args.train_step_seconds
        return {
            "source": "--train-step-seconds option",
            "batch_size": args.batch_size,
            "seconds_per_step": seconds,
            "images_per_second": round(args.batch_size / seconds, 4),
        }
    from nppnet_tf.data.dataset import make_dataset

    log.info("building the derived NPPNet (C = 64, 16 cells)")
    started = time.perf_counter()
    try:
        step, parameters = build_train_step(data_config)
    except ImportError as err:
        raise RuntimeError(
            f"cannot build the NPPNet train step ({err}); pass "
            "--train-step-seconds with a measured step time instead"
        ) from err
    log.info("built in %.0f s", time.perf_counter() - started)
    dataset = make_dataset(
        records_dir,
        "train",
        data_config,
        args.batch_size,
        True,
        augment_config=augment_config,
        seed=args.seed,
        repeat=True,
    )
    iterator = iter(dataset)
    constant = next(iterator)
    log.info("timing %d train steps on a constant batch", args.train_steps)
    fixed = time_steps(step, lambda: constant, args.train_steps)
    log.info("timing %d train steps fed by the pipeline", args.train_steps)
    fed = time_steps(step, lambda: next(iterator), args.train_steps)
    seconds = statistics.median(fixed)
    return {
        "source": f"measured: NPPNet ({GENOTYPE}, C = 64, 16 cells), "
        "NPPNetLoss, Adam, tf.function",
        "parameters": parameters,
        "batch_size": args.batch_size,
        "seconds_per_step": round(seconds, 3),
        "runs_seconds_per_step": [round(s, 3) for s in fixed],
        "images_per_second": round(args.batch_size / seconds, 4),
        "fed_by_pipeline_seconds_per_step": round(statistics.median(fed), 3),
        "fed_by_pipeline_runs": [round(s, 3) for s in fed],
    }


# ---------------------------------------------------------------------------
# Report


def markdown_table(report: dict[str, Any]) -> str:
    step = report["train_step"]
    lines = [
        "| measurement | batch | examples/s | CPU s/example |",
        "| --- | --- | --- | --- |",
    ]
    for run in report["pipeline"]:
        lines.append(
            f"| input pipeline, {run['branch']} | {run['batch_size']} | "
            f"{run['examples_per_second']:.1f} | "
            f"{run['cpu_seconds_per_example']:.3f} |"
        )
    lines.append(
        f"| train step ({step['source'].split(':')[0]}) | "
        f"{step['batch_size']} | {step['images_per_second']:.3f} | |"
    )
    lines.append("")
    lines.append("| map stage, one thread | CPU ms/example |")
    lines.append("| --- | --- |")
    for name, cost in report["stage_cpu_ms_per_example"].items():
        lines.append(f"| {name} | {cost:.1f} |")
    lines.append("")
    lines.append(
        f"Pipeline / train step: {report['ratio']:.0f}x; the pipeline "
        f"would use {100 * report['cpu_share_at_train_rate']:.2f}% of the "
        f"{report['machine']['cpus']} cores at the train step's rate."
    )
    return "\n".join(lines) + "\n"


def bench_input(args) -> int:
    from nppnet_tf.config import AugmentConfig, DataConfig

    for name in ("images", "examples", "repeats", "batch_size", "train_steps"):
        if getattr(args, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    if args.train_step_seconds is not None and args.train_step_seconds <= 0:
        raise ValueError(
            f"--train-step-seconds must be > 0, got {args.train_step_seconds}"
        )
    size = args.image_size
    # The paper's sigmas and offset are for 384 crops; scale them with the crop.
    data_config = DataConfig(
        image_size=size,
        sigma=7.0 * size / 384,
        aux_sigma=14.0 * size / 384,
        shards=4,
    )
    augment_config = AugmentConfig(max_offset=round(40 * size / 384))
    records_dir = prepare_records(args, data_config)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    pipeline = pipeline_results(args, records_dir, data_config, augment_config)
    stages = stage_costs(records_dir, data_config, augment_config, 64)
    train_step = train_step_results(
        args, records_dir, data_config, augment_config
    )
    matching = pipeline[0]
    cpus = os.cpu_count() or 1
    report = {
        "benchmark": "input",
        "created": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "machine": {
            "cpus": cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
            # Other processes on the machine slow both measurements alike.
            "load_average_at_start": load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "input": {
            "synthetic": {
                "train": args.images,
                "seed": args.seed,
                "min_size": args.min_size,
                "max_size": args.max_size,
            },
            "records_dir": records_dir,
            "data_config": {
                "image_size": size,
                "sigma": data_config.sigma,
                "aux_sigma": data_config.aux_sigma,
                "heatmap_stride": data_config.heatmap_stride,
            },
            "augment_config": {
                "scale_min": augment_config.scale_min,
                "scale_max": augment_config.scale_max,
                "max_rotation": augment_config.max_rotation,
                "max_offset": augment_config.max_offset,
                "flip_probability": augment_config.flip_probability,
            },
        },
        "pipeline": pipeline,
        "stage_cpu_ms_per_example": stages,
        "train_step": train_step,
        # > 1: the pipeline outruns the train step at the same batch size.
        "ratio": round(
            matching["examples_per_second"] / train_step["images_per_second"],
            1,
        ),
        # Share of all cores the pipeline would take at the train step's rate.
        "cpu_share_at_train_rate": round(
            train_step["images_per_second"]
            * matching["cpu_seconds_per_example"]
            / cpus,
            4,
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    sys.stdout.write(markdown_table(report))
    return 0
