"""`nppnet bench ...`: speed and memory benchmarks, results written as JSON.

Each benchmark is a module under `pipeline/bench/` exposing
`register(subparsers)`; this command group collects them.
"""

from __future__ import annotations

import importlib
import pkgutil


def register(subparsers) -> None:
    import pipeline.bench

    parser = subparsers.add_parser(
        "bench",
        help="speed and memory benchmarks (JSON results, see docs/benchmarks.md)",
        description=__doc__,
    )
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    benches.required = True
    for info in sorted(
        pkgutil.iter_modules(pipeline.bench.__path__), key=lambda m: m.name
    ):
        module = importlib.import_module(f"pipeline.bench.{info.name}")
        module.register(benches)
