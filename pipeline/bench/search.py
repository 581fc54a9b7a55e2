"""`nppnet bench search`: seconds per search iteration and peak memory.

One search iteration is what the search loop runs per step after the
warm-up: a weight step and an architecture step (`BilevelSearch.iteration`,
first order, entropy term on), on the interaction supernet at the authors'
search width (C = 32, 16 cells, the authors' fixed cells; `--supernet
encoder-decoder`: our encoder-decoder supernet, same width), global batch
2 at 256 x 256, random data, on the CPU. Each variant (XLA off/on x 1 and 2
replicas; two replicas are two logical devices of the one CPU) runs in a
fresh subprocess, so device set-up and peak memory (`ru_maxrss`) are its
own. Reported: the median of the timed iterations after `--warmup`
untimed ones, the first iteration (tracing and graph optimisation) and the
model build time, and the load average (other processes skew timings).

`--grappler off|both` also runs the variants with TensorFlow's graph
optimiser off (`distribute.graph_optimizations: false`, set in the child
before anything is built); with both, each (XLA, replicas) pair's ratios
off / on of the first iteration and of the median iteration are reported
(`grappler_ratios` in the JSON).

The authors' PyTorch supernet takes about 26 s per iteration at this size
on this kind of machine, with a 6.8 GiB peak. Results go to `--out` as
JSON; the Markdown table printed at the end is the one in docs/search.md,
"Benchmark".
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

log = logging.getLogger(__name__)

AUTHORS_SECONDS_PER_ITERATION = 26.0
AUTHORS_PEAK_GIB = 6.8
# partial_channels: the encoder-decoder supernet's K (configs/lip.yaml,
# configs/demo.yaml: C = 8 needs 2).
FULL = dict(
    init_channels=32,
    layers=16,
    image_size=256,
    batch_size=2,
    partial_channels=4,
)
QUICK = dict(
    init_channels=8, layers=4, image_size=64, batch_size=2, partial_channels=2
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search iteration seconds and peak memory, XLA on/off, 1-2 replicas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/bench/search.json", help="JSON results"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny supernet (C=8, 4 cells, 64x64) and 2 timed iterations",
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="timed iterations (5)"
    )
    parser.add_argument(
        "--supernet",
        choices=["interaction", "encoder-decoder"],
        default="interaction",
        help="the search stage's supernet (the authors timed interaction)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed iterations after the first",
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
    add_on_off_argument(
        parser,
        "--shared-gradients",
        "search.shared_gradients variants (one traced function for both "
        "steps); run on one replica only, 2-replica variants run without; "
        "off is configs/lip.yaml's setting, on the demo's",
        default="off",
    )
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
    parser.set_defaults(handler=bench_search)


def add_on_off_argument(
    parser: argparse.ArgumentParser, flag: str, help: str, default: str = "on"
) -> None:
    """A `FLAG on|off|both` option; `on_off` reads it."""
    parser.add_argument(
        flag,
        choices=["on", "off", "both"],
        default=default,
        help=f"{help} (default {default})",
    )


def add_grappler_argument(parser: argparse.ArgumentParser) -> None:
    """`--grappler on|off|both` (shared with `nppnet bench train`)."""
    add_on_off_argument(
        parser,
        "--grappler",
        "graph optimiser (Grappler) variants to run; both also reports "
        "the ratios off / on",
    )


def on_off(choice: str) -> list[bool]:
    """`--xla` / `--grappler` / `--shared-gradients` choice -> the values
    to run."""
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def grappler_ratios(
    results: list[dict], keys: tuple[str, ...], first: str, median: str
) -> list[dict]:
    """Grappler off / on ratios of variants that differ only in Grappler.

    Args:
        results: variant results, each with `grappler`, `status` and `keys`.
        keys: the other fields that identify a variant (`xla`, ...).
        first: the field of the first (traced) call's seconds.
        median: the field of the median timed call's seconds.

    Returns:
        One dict per pair whose two variants both succeeded: the `keys`,
        `first_off_over_on` and `median_off_over_on` (below 1: faster
        without Grappler).
    """
    ok = [r for r in results if r.get("status") == "ok" and "grappler" in r]
    ratios = []
    for on in (r for r in ok if r["grappler"]):
        for off in (r for r in ok if not r["grappler"]):
            if on[first] > 0 and all(on[key] == off[key] for key in keys):
                ratios.append(
                    {
                        **{key: on[key] for key in keys},
                        "first_off_over_on": round(off[first] / on[first], 3),
                        "median_off_over_on": round(
                            off[median] / on[median], 3
                        ),
                    }
                )
    return ratios


def _sizes(quick: bool) -> dict:
    return dict(QUICK if quick else FULL)


def variants(args: argparse.Namespace) -> list[dict]:
    """The (XLA, replicas, shared gradients, Grappler, allocator) variants
    the options ask for, the last two innermost so that the pairs compared
    run back to back. Shared gradients need one replica: several replicas
    run without."""
    shared_choices = on_off(getattr(args, "shared_gradients", "off"))
    found = []
    for xla in on_off(args.xla):
        for replicas in args.replicas:
            shared_values = shared_choices if replicas == 1 else [False]
            for shared in dict.fromkeys(shared_values):
                for grappler in on_off(args.grappler):
                    for choice in allocators(args):
                        found.append(
                            {
                                "xla": xla,
                                "replicas": replicas,
                                "shared_gradients": shared,
                                "grappler": grappler,
                                "allocator": choice,
                                "supernet": getattr(
                                    args, "supernet", "interaction"
                                ),
                            }
                        )
    return found


def run_variant(
    xla: bool,
    replicas: int,
    sizes: dict,
    iterations: int,
    warmup: int,
    grappler: bool = True,
    shared_gradients: bool = False,
    supernet: str = "interaction",
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
    import numpy as np
    import tensorflow as tf

    from nppnet_tf.config import LossConfig, SearchConfig
    from nppnet_tf.models.encoder_decoder_supernet import (
        EncoderDecoderSupernet,
    )
    from nppnet_tf.models.interaction_supernet import InteractionSupernet
    from nppnet_tf.search.bilevel import BilevelSearch
    from nppnet_tf.search.genotype import Genotype
    from nppnet_tf.training.losses import NPPNetLoss
    from pipeline.commands.search import authors_genotype_path

    size, batch = sizes["image_size"], sizes["batch_size"]
    strategy = tf.distribute.MirroredStrategy(devices)
    started = time.perf_counter()
    with strategy.scope():
        # As the search loop builds them.
        common = dict(
            init_channels=sizes["init_channels"],
            num_cells=sizes["layers"],
            sync_batchnorm=synchronise_batchnorm(True),
        )
        if supernet == "encoder-decoder":
            model = EncoderDecoderSupernet(
                partial_channels=sizes["partial_channels"], **common
            )
        else:
            model = InteractionSupernet(
                Genotype.load(authors_genotype_path()), **common
            )
        model.build((None, size, size, 3))
        loss = NPPNetLoss(LossConfig())
        search = BilevelSearch(
            model,
            loss,
            SearchConfig(
                init_channels=sizes["init_channels"],
                layers=sizes["layers"],
                batch_size=batch,
                jit_compile=xla,
                shared_gradients=shared_gradients,
            ),
            strategy,
        )
    build_seconds = time.perf_counter() - started
    rng = np.random.default_rng(0)
    grid = size // 4

    def random_batch():
        return (
            rng.normal(size=(batch, size, size, 3)).astype("float32"),
            {
                "heatmaps": rng.uniform(size=(batch, grid, grid, 16)).astype(
                    "float32"
                ),
                "heatmaps_aux": rng.uniform(
                    size=(batch, grid, grid, 16)
                ).astype("float32"),
                "parsing": rng.integers(0, 20, (batch, size, size)).astype(
                    "int32"
                ),
                "edge": rng.integers(0, 2, (batch, size, size)).astype("int32"),
            },
        )

    pair = tf.data.Dataset.from_tensors((random_batch(), random_batch()))
    distributed = strategy.experimental_distribute_dataset(pair.repeat())
    search.set_batch_spec(distributed.element_spec[0])
    batches = iter(distributed)
    times = []
    for _ in range(1 + warmup + iterations):
        weight_batch, architecture_batch = next(batches)
        started = time.perf_counter()
        metrics = search.iteration(weight_batch, architecture_batch, 2.0)
        float(metrics["architecture/objective"])  # waits for the step
        times.append(time.perf_counter() - started)
    timed = times[1 + warmup :]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "supernet": supernet,
        "xla": xla,
        "replicas": replicas,
        "shared_gradients": shared_gradients,
        "grappler": grappler,
        "status": "ok",
        "seconds_per_iteration": round(statistics.median(timed), 3),
        "iteration_seconds": [round(t, 3) for t in timed],
        "first_iteration_seconds": round(times[0], 1),
        "build_seconds": round(build_seconds, 1),
        "peak_rss_gib": round(peak, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
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
        "search",
        "--variant",
        json.dumps({**variant, "sizes": sizes}),
        "--warmup",
        str(args.warmup),
        "--iterations",
        str(args.iterations),
    ]
    log.info(
        "variant XLA %s, %d replica(s), shared gradients %s, Grappler %s, "
        "allocator %s: %s",
        "on" if variant["xla"] else "off",
        variant["replicas"],
        "on" if variant.get("shared_gradients") else "off",
        "on" if variant["grappler"] else "off",
        variant["allocator"],
        " ".join(command),
    )
    outcome = run_child(command, variant["allocator"], args.timeout)
    if "error" in outcome:
        return {**variant, **outcome}
    # The child reports the allocator it actually ran with.
    return {"allocator": variant["allocator"], **outcome}


def markdown_table(results: list[dict], ratios: list[dict] = ()) -> str:
    lines = [
        "| XLA | replicas | shared gradients | Grappler | allocator | s / iteration (median) | first iteration s | build s | peak RSS GiB | load average |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        xla = "on" if r["xla"] else "off"
        grappler = "on" if r.get("grappler", True) else "off"
        shared = "on" if r.get("shared_gradients") else "off"
        used = r.get("allocator", "tensorflow")
        head = f"| {xla} | {r['replicas']} | {shared} | {grappler} | {used} |"
        if r.get("status") != "ok":
            reason = (r.get("error") or "").strip().splitlines() or [""]
            lines.append(
                f"{head} {r['status']}: {reason[-1][:80]} | | | "
                f"{peak_at_failure(r)} | |"
            )
            continue
        lines.append(
            f"{head} {r['seconds_per_iteration']:.2f} | "
            f"{r['first_iteration_seconds']:.1f} | {r['build_seconds']:.0f} | "
            f"{r['peak_rss_gib']:.2f} | "
            f"{' '.join(f'{x:.1f}' for x in r['load_average'])} |"
        )
    lines.append(
        f"| (authors, PyTorch) | 1 | | | | {AUTHORS_SECONDS_PER_ITERATION:.0f} | "
        f"| | {AUTHORS_PEAK_GIB} | |"
    )
    if ratios:
        lines += [
            "",
            "| XLA | replicas | first iteration, Grappler off / on | "
            "median iteration, off / on |",
            "| --- | --- | --- | --- |",
        ]
        for r in ratios:
            lines.append(
                f"| {'on' if r['xla'] else 'off'} | {r['replicas']} | "
                f"{r['first_off_over_on']:.2f} | "
                f"{r['median_off_over_on']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def bench_search(args) -> int:
    if args.iterations is None:
        args.iterations = 2 if args.quick else 5
    if args.iterations < 1 or args.warmup < 0:
        raise ValueError(
            f"--iterations must be >= 1 and --warmup >= 0, got "
            f"{args.iterations} and {args.warmup}"
        )
    if args.variant:
        variant = json.loads(args.variant)
        try:
            result = run_variant(
                variant["xla"],
                variant["replicas"],
                variant["sizes"],
                args.iterations,
                args.warmup,
                variant.get("grappler", True),
                variant.get("shared_gradients", False),
                variant.get("supernet", "interaction"),
            )
        except Exception as err:  # reported as this variant's result
            log.exception("variant failed")
            result = {
                "supernet": variant.get("supernet", "interaction"),
                "xla": variant["xla"],
                "replicas": variant["replicas"],
                "shared_gradients": variant.get("shared_gradients", False),
                "grappler": variant.get("grappler", True),
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
            }
        sys.stdout.write(json.dumps(result) + "\n")
        return 0 if result["status"] == "ok" else 1
    if any(r < 1 for r in args.replicas):
        raise ValueError(f"--replicas must all be >= 1, got {args.replicas}")
    sizes = _sizes(args.quick)
    results = []
    for variant in variants(args):
        result = _run_subprocess(variant, args, sizes)
        log.info("%s", result)
        results.append(result)
    ratios = grappler_ratios(
        results,
        ("xla", "replicas", "shared_gradients", "allocator"),
        "first_iteration_seconds",
        "seconds_per_iteration",
    )
    import tensorflow as tf

    report = {
        "benchmark": "search",
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
            "supernet": "InteractionSupernet (authors' cells)"
            if args.supernet == "interaction"
            else "EncoderDecoderSupernet",
            **sizes,
            "iteration": "weight step + architecture step, first order, "
            "entropy on; BatchNorm synchronised when replicas > 1",
        },
        "timed_iterations": args.iterations,
        "warmup_iterations": args.warmup,
        "authors": {
            "seconds_per_iteration": AUTHORS_SECONDS_PER_ITERATION,
            "peak_gib": AUTHORS_PEAK_GIB,
        },
        "results": results,
        "grappler_ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    sys.stdout.write(markdown_table(results, ratios))
    return 0 if all(r.get("status") == "ok" for r in results) else 1
