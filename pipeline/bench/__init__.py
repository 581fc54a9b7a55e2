"""Benchmarks behind `nppnet bench ...`; each module exposes `register(subparsers)`
and writes its results as JSON (summarised by hand in docs/benchmarks.md)."""
