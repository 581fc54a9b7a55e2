"""`nppnet bench model`: train-step and inference time and peak memory.

Variants (each in a fresh subprocess, so its peak RSS is its own):

* the derived NPPNet (authors' genotype, C = 64, 16 cells): train step at
  batch 2 for 256x256 and 384x384, inference at batch 2 (256, 384) and
  batch 1 (384);
* both supernets at C = 32, 16 cells: train step and inference at batch 2,
  256x256;

each with XLA (`jit_compile=True`) off and on. A train step is: forward
(training mode), a simple loss on all eight outputs (mean squared error to
random targets), backward, Adam update, inside one `tf.function`. Inference
is the forward in inference mode. The first two calls (tracing, XLA
compilation) are timed separately and excluded; the reported time is the
median of `--repeats` further calls. Peak memory is the child's peak RSS
(`VmHWM`), also given minus the RSS after building the model.

Reads a genotype JSON; writes `--out` (JSON) and prints a Markdown table.

    nppnet bench model                       # everything (about 30 min)
    nppnet bench model --quick --xla off --only nppnet-train-b2-256
"""

from __future__ import annotations

import argparse
import dataclasses
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
    status_gib,
)

log = logging.getLogger(__name__)

GENOTYPE = "configs/genotypes/nppnet_lip.json"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked configuration."""

    model: str  # "nppnet", "interaction" or "encoder-decoder"
    mode: str  # "train" or "inference"
    batch: int
    image_size: int
    xla: bool
    init_channels: int = 64
    num_cells: int = 16
    allocator: str = "tensorflow"

    @property
    def name(self) -> str:
        """`model-mode-bB-S`, `-xla` when XLA is on (the allocator is a
        separate field)."""
        xla = "-xla" if self.xla else ""
        return f"{self.model}-{self.mode}-b{self.batch}-{self.image_size}{xla}"


def default_variants() -> list[Variant]:
    variants = []
    for xla in (False, True):
        for mode, batch, size in (
            ("train", 2, 256),
            ("train", 2, 384),
            ("inference", 2, 256),
            ("inference", 2, 384),
            ("inference", 1, 384),
        ):
            variants.append(Variant("nppnet", mode, batch, size, xla))
        for supernet in ("interaction", "encoder-decoder"):
            for mode in ("train", "inference"):
                variants.append(Variant(supernet, mode, 2, 256, xla, 32))
    return variants


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "model",
        help="NPPNet and supernets: train-step/inference time, peak memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/bench/model.json")
    parser.add_argument("--genotype", default=GENOTYPE)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per variant"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 timed calls per variant (overrides --repeats)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these variants, named without the XLA suffix "
        "(nppnet-train-b2-256, interaction-train-b2-256, ...; see --list)",
    )
    parser.add_argument(
        "--xla",
        choices=("off", "on", "both"),
        default="both",
        help="XLA variants to run (default: both)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds per variant before it is stopped and reported as a "
        "timeout (XLA compiles the train step for over 15 minutes on 2 cores)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the variant names and exit"
    )
    add_allocator_argument(parser)
    parser.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    variants = default_variants()
    if args.xla != "both":
        variants = [v for v in variants if v.xla == (args.xla == "on")]
    if args.only:
        known = {v.name.removesuffix("-xla") for v in variants}
        unknown = sorted(set(args.only) - known)
        if unknown:
            raise ValueError(
                f"--only {unknown[0]!r} is not a variant (see --list)."
            )
        variants = [
            v for v in variants if v.name.removesuffix("-xla") in args.only
        ]
    if args.list:
        print("\n".join(v.name for v in variants))
        return 0
    variants = [
        dataclasses.replace(v, allocator=choice)
        for v in variants
        for choice in allocators(args)
    ]
    repeats = 2 if args.quick else args.repeats
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}.")
    results = []
    for variant in variants:
        log.info(
            "running %s, allocator %s (%d timed calls)",
            variant.name,
            variant.allocator,
            repeats,
        )
        result = _run_child(variant, repeats, args.genotype, args.timeout)
        log.info("%s: %s", variant.name, _describe(result))
        results.append(result)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "machine": _machine(),
        "repeats": repeats,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    print(format_table(results))
    return 0


def _run_child(
    variant: Variant, repeats: int, genotype: str, timeout: float
) -> dict:
    spec = json.dumps(
        {
            **dataclasses.asdict(variant),
            "repeats": repeats,
            "genotype": genotype,
        }
    )
    result = {"variant": variant.name, **dataclasses.asdict(variant)}
    outcome = run_child(
        [sys.executable, "-m", "pipeline.bench.model", spec],
        variant.allocator,
        timeout,
    )
    if "error" in outcome:
        log.error("%s: %s", variant.name, outcome["error"])
        return {**result, **outcome}
    return {**result, "status": "ok", **outcome}


def _machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": load,
    }


def _describe(result: dict) -> str:
    if "error" in result:
        seen = result.get("peak_rss_gib_seen")
        return f"failed, peak {seen:.2f} GiB seen" if seen else "failed"
    return (
        f"median {result['median_seconds']:.2f} s, peak "
        f"{result['peak_rss_gib']:.2f} GiB"
    )


def format_table(results: list[dict]) -> str:
    """Markdown table of the results."""
    lines = [
        "| variant | XLA | allocator | median s | min s | first calls s "
        "| peak RSS GiB | peak - model GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        name = r["variant"].removesuffix("-xla")
        xla = "on" if r["xla"] else "off"
        head = f"| {name} | {xla} | {r.get('allocator', 'tensorflow')} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | {peak_at_failure(r)} | |")
            continue
        lines.append(
            f"{head} {r['median_seconds']:.2f} | "
            f"{r['min_seconds']:.2f} | {r['warmup_seconds']:.1f} | "
            f"{r['peak_rss_gib']:.2f} | {r['activation_rss_gib']:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the child


def _build(spec: dict):
    from nppnet_tf.models.encoder_decoder_supernet import (
        EncoderDecoderSupernet,
    )
    from nppnet_tf.models.interaction_supernet import InteractionSupernet
    from nppnet_tf.models.nppnet import NPPNet
    from nppnet_tf.search.genotype import Genotype

    sizes = dict(
        init_channels=spec["init_channels"], num_cells=spec["num_cells"]
    )
    if spec["model"] == "encoder-decoder":
        return EncoderDecoderSupernet(**sizes)
    genotype = Genotype.load(spec["genotype"])
    if spec["model"] == "interaction":
        return InteractionSupernet(genotype, **sizes)
    return NPPNet(genotype, **sizes)


def run_variant(spec: dict) -> dict:
    """Builds, warms up and times one variant in this process."""
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    batch, size = spec["batch"], spec["image_size"]
    start = time.perf_counter()
    model = _build(spec)
    model.build((None, size, size, 3))
    build_seconds = time.perf_counter() - start
    model_rss = status_gib("VmRSS")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch, size, size, 3)), tf.float32)
    out_shapes = {"pose": 16, "pose_aux": 16, "parsing": 20, "edge": 2}
    targets = {
        key: tf.constant(
            rng.normal(size=(batch, size // 4, size // 4, out_shapes[base])),
            tf.float32,
        )
        for key in model.compute_output_spec(
            keras.KerasTensor((batch, size, size, 3))
        )
        for base in [key.removesuffix("_stage1")]
    }
    if spec["mode"] == "train":
        optimizer = keras.optimizers.Adam(1e-3, epsilon=1e-8)
        optimizer.build(model.trainable_variables)

        @tf.function(jit_compile=spec["xla"])
        def step(images, targets):
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                loss = tf.add_n(
                    [
                        tf.reduce_mean(tf.square(outputs[k] - targets[k]))
                        for k in sorted(targets)
                    ]
                )
            variables = model.trainable_variables
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

    else:

        @tf.function(jit_compile=spec["xla"])
        def step(images, targets):
            outputs = model(images, training=False)
            return tf.add_n([tf.reduce_sum(v) for v in outputs.values()])

    start = time.perf_counter()
    for _ in range(2):  # tracing (and XLA compilation) happen here
        step(images, targets).numpy()
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step(images, targets).numpy()
        times.append(time.perf_counter() - start)
    peak = status_gib("VmHWM")
    return {
        "median_seconds": statistics.median(times),
        "min_seconds": min(times),
        "seconds": times,
        "build_seconds": build_seconds,
        "warmup_seconds": warmup_seconds,
        "peak_rss_gib": peak,
        "model_rss_gib": model_rss,
        "activation_rss_gib": peak - model_rss,
        "load_average": os.getloadavg()[0],
        # XLA compiler options in force (e.g. its LLVM optimisation level).
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "allocator": allocator.active(),
    }


if __name__ == "__main__":
    print(json.dumps(run_variant(json.loads(sys.argv[1]))), flush=True)
