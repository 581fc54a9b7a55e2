"""`nppnet bench train`: images per second of the final training's step.

The step is `TrainStep`, what `nppnet train` runs per batch: the derived
NPPNet (the authors' genotype) in training mode, `NPPNetLoss` with its
lambdas, the backward pass and the three Adam groups, under a
`MirroredStrategy` (BatchNorm synchronised on several replicas, fused on
one, as `nppnet train` builds it). Default size: C = 32, 16
cells, 256 x 256, global batch 2 (`--quick`: C = 8, 4 cells, 64 x 64),
random data, on the CPU. Variants: float32, mixed_bfloat16 and
mixed_float16 (dynamic loss scaling) x XLA off/on x 1 and 2 replicas (two
logical devices of the one CPU). Each variant runs in a fresh subprocess,
so device set-up and peak memory (`ru_maxrss`) are its own. Reported: the
median step time after `--warmup` untimed steps and images per second
from it, the first step (tracing, graph optimisation, XLA compilation),
the model build time, the peak RSS, and the load average before and after
the variant (other processes on a shared machine skew timings). A variant
the step refuses (XLA on several CPU replicas) is reported with its
reason. `--grappler off|both` also runs the variants with TensorFlow's
graph optimiser off (`distribute.graph_optimizations: false`); with both,
the ratios off / on of the first step and of the median step are
reported (`grappler_ratios` in the JSON).

Results go to `--out` as JSON; the Markdown table printed at the end is
the one in docs/training.md, "Benchmark".

    nppnet bench train                  # every variant (about an hour)
    nppnet bench train --quick --precision float32 --xla off
    nppnet bench train --quick --precision float32 --xla off --grappler both
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

from pipeline import allocator
from pipeline.bench import (
    add_allocator_argument,
    allocators,
    peak_at_failure,
    run_child,
)
from pipeline.bench.search import add_grappler_argument, grappler_ratios, on_off

log = logging.getLogger(__name__)

FULL = dict(init_channels=32, layers=16, image_size=256, batch_size=2)
QUICK = dict(init_channels=8, layers=4, image_size=64, batch_size=2)
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train-step images/s: float32 vs mixed precision, XLA, 1-2 "
        "replicas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/bench/train.json", help="JSON results"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny network (C=8, 4 cells, 64x64) and 3 timed steps",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed steps after the first"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        nargs="+",
        default=list(PRECISIONS),
        help="dtype policies to run",
    )
    parser.add_argument(
        "--xla",
        choices=["off", "on", "both"],
        default="both",
        help="XLA variants to run",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1, 2],
        help="replica counts to run",
    )
    add_grappler_argument(parser)
    add_allocator_argument(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds allowed per variant",
    )
    parser.add_argument(
        "--variant", help=argparse.SUPPRESS
    )  # internal: run one variant in this process, print JSON
    parser.set_defaults(handler=bench_train)


def variants(args: argparse.Namespace) -> list[dict]:
    """The variants the options ask for, Grappler and the allocator
    innermost so that the pairs compared run back to back."""
    return [
        dict(
            precision=precision,
            xla=xla,
            replicas=replicas,
            grappler=grappler,
            allocator=choice,
        )
        for precision in args.precision
        for xla in on_off(args.xla)
        for replicas in args.replicas
        for grappler in on_off(args.grappler)
        for choice in allocators(args)
    ]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_variant(
    precision: str,
    xla: bool,
    replicas: int,
    sizes: dict,
    steps: int,
    warmup: int,
    grappler: bool = True,
) -> dict:
    """Times one variant in this process (call before any TensorFlow op).

    Returns:
        A JSON-able result dict.
    """
    import resource

    from nppnet_tf.distribute import (
        set_graph_optimizations,
        split_cpu,
        synchronise_batchnorm,
    )

    set_graph_optimizations(grappler)  # as create_strategy: before devices
    devices = split_cpu(replicas)
    import keras
    import numpy as np
    import tensorflow as tf

    from nppnet_tf.config import LossConfig, TrainConfig
    from nppnet_tf.models.nppnet import NPPNet
    from nppnet_tf.search.genotype import Genotype
    from nppnet_tf.training.losses import NPPNetLoss
    from nppnet_tf.training.train_step import TrainStep, dtype_policy
    from pipeline.commands.train import genotype_path

    load_before = _load()
    size, batch = sizes["image_size"], sizes["batch_size"]
    config = TrainConfig(
        init_channels=sizes["init_channels"],
        layers=sizes["layers"],
        batch_size=batch,
        mixed_precision=precision,
        jit_compile=xla,
    )
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(devices)
    started = time.perf_counter()
    with strategy.scope():
        with dtype_policy(precision):
            model = NPPNet(
                Genotype.load(genotype_path(config.genotype)),
                init_channels=config.init_channels,
                num_cells=config.layers,
                # As `nppnet train` builds it.
                sync_batchnorm=synchronise_batchnorm(True),
            )
            model.build((None, size, size, 3))
        loss = NPPNetLoss(LossConfig())
        step = TrainStep(model, loss, config, strategy)
    build_seconds = time.perf_counter() - started
    rng = np.random.default_rng(0)
    grid = size // 4
    images = rng.normal(size=(batch, size, size, 3)).astype("float32")
    targets = {
        "heatmaps": rng.uniform(size=(batch, grid, grid, 16)).astype("float32"),
        "heatmaps_aux": rng.uniform(size=(batch, grid, grid, 16)).astype(
            "float32"
        ),
        "parsing": rng.integers(0, 20, (batch, size, size)).astype("int32"),
        "edge": rng.integers(0, 2, (batch, size, size)).astype("int32"),
    }
    dataset = tf.data.Dataset.from_tensors((images, targets)).repeat()
    distributed = strategy.experimental_distribute_dataset(dataset)
    step.set_batch_spec(distributed.element_spec)
    batches = iter(distributed)
    times, skipped = [], 0
    for _ in range(1 + warmup + steps):
        element = next(batches)
        started = time.perf_counter()
        metrics = step(element)
        float(metrics["loss/total"])  # waits for the step
        times.append(time.perf_counter() - started)
        if "finite" in metrics and float(metrics["finite"]) < 1:
            skipped += 1
    timed = times[1 + warmup :]
    median = statistics.median(timed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "precision": precision,
        "xla": xla,
        "replicas": replicas,
        "grappler": grappler,
        "status": "ok",
        "images_per_second": round(batch / median, 3),
        "seconds_per_step": round(median, 3),
        "step_seconds": [round(t, 3) for t in timed],
        "first_step_seconds": round(times[0], 1),
        "build_seconds": round(build_seconds, 1),
        "peak_rss_gib": round(peak, 2),
        "loss_scale_skipped_steps": skipped,
        "final_loss": float(metrics["loss/total"]),
        "load_average_before": load_before,
        "load_average_after": _load(),
        # XLA compiler options in force (e.g. its LLVM optimisation level).
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "allocator": allocator.active(),
    }


def _run_subprocess(variant: dict, args, sizes: dict) -> dict:
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "--log-level",
        "WARNING",
        "bench",
        "train",
        "--variant",
        json.dumps({**variant, "sizes": sizes}),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    log.info(
        "variant %s, XLA %s, %d replica(s), Grappler %s, allocator %s",
        variant["precision"],
        "on" if variant["xla"] else "off",
        variant["replicas"],
        "on" if variant["grappler"] else "off",
        variant["allocator"],
    )
    outcome = run_child(command, variant["allocator"], args.timeout)
    if outcome.get("status") == "timeout":
        outcome["load_average_after"] = _load()
    if "error" in outcome:
        return {**variant, **outcome}
    # The child reports the allocator it actually ran with.
    return {"allocator": variant["allocator"], **outcome}


def markdown_table(results: list[dict], ratios: list[dict] = ()) -> str:
    lines = [
        "| precision | XLA | replicas | Grappler | allocator | images/s "
        "| s / step (median) | first step s | build s | peak RSS GiB "
        "| load before / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        xla = "on" if r["xla"] else "off"
        grappler = "on" if r.get("grappler", True) else "off"
        used = r.get("allocator", "tensorflow")
        head = (
            f"| {r['precision']} | {xla} | {r['replicas']} | {grappler} "
            f"| {used} |"
        )
        if r.get("status") != "ok":
            reason = (r.get("error") or "").strip().splitlines() or [""]
            lines.append(
                f"{head} {r['status']}: {reason[0][:90]} | | | | "
                f"{peak_at_failure(r)} | |"
            )
            continue
        loads = " / ".join(
            f"{r[key][0]:.1f}"
            for key in ("load_average_before", "load_average_after")
        )
        lines.append(
            f"{head} {r['images_per_second']:.2f} | "
            f"{r['seconds_per_step']:.2f} | {r['first_step_seconds']:.1f} | "
            f"{r['build_seconds']:.0f} | {r['peak_rss_gib']:.2f} | {loads} |"
        )
    if ratios:
        lines += [
            "",
            "| precision | XLA | replicas | first step, Grappler off / on "
            "| median step, off / on |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in ratios:
            lines.append(
                f"| {r['precision']} | {'on' if r['xla'] else 'off'} | "
                f"{r['replicas']} | {r['first_off_over_on']:.2f} | "
                f"{r['median_off_over_on']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _one_variant(args) -> int:
    variant = json.loads(args.variant)
    try:
        result = run_variant(
            variant["precision"],
            variant["xla"],
            variant["replicas"],
            variant["sizes"],
            args.steps,
            args.warmup,
            variant.get("grappler", True),
        )
    except ValueError as err:  # a combination the step refuses
        result = {**variant, "status": "unsupported", "error": str(err)}
    except Exception as err:  # reported as this variant's result
        log.exception("variant failed")
        result = {
            **variant,
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
        }
    result.pop("sizes", None)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["status"] in ("ok", "unsupported") else 1


def bench_train(args) -> int:
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(
            f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and "
            f"{args.warmup}"
        )
    if args.variant:
        return _one_variant(args)
    if any(r < 1 for r in args.replicas):
        raise ValueError(f"--replicas must all be >= 1, got {args.replicas}")
    sizes = dict(QUICK if args.quick else FULL)
    load_start = _load()
    started = time.time()
    results = []
    for variant in variants(args):
        result = _run_subprocess(variant, args, sizes)
        log.info("%s", result)
        results.append(result)
    ratios = grappler_ratios(
        results,
        ("precision", "xla", "replicas", "allocator"),
        "first_step_seconds",
        "seconds_per_step",
    )
    import tensorflow as tf

    report = {
        "benchmark": "train",
        "created": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
        },
        "model": {
            "network": "NPPNet (authors' genotype), BatchNorm synchronised when replicas > 1",
            **sizes,
            "step": "TrainStep: forward (training mode), NPPNetLoss, "
            "backward, three TorchAdam groups; random data",
        },
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "load_average_start": load_start,
        "load_average_end": _load(),
        "seconds": round(time.time() - started, 1),
        "results": results,
        "grappler_ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    sys.stdout.write(markdown_table(results, ratios))
    return (
        0
        if all(r.get("status") in ("ok", "unsupported") for r in results)
        else 1
    )
