"""Benchmarks behind `nppnet bench ...`; each module exposes `register(subparsers)`
and writes its results as JSON (summarised by hand in docs/benchmarks.md).

Shared here: the memory-allocator dimension of the subprocess benchmarks
(`search`, `train`, `model`): each variant's child process is started with
the allocator's environment (`pipeline.allocator`), and its result records
which one it ran with.
"""

from __future__ import annotations

import argparse
import os

from pipeline import allocator


def add_allocator_argument(parser: argparse.ArgumentParser) -> None:
    """`--allocators NAME...`: memory allocators to run every variant with."""
    parser.add_argument(
        "--allocators",
        nargs="+",
        choices=allocator.CHOICES,
        default=None,
        help="memory allocators to run every variant with, back to back "
        "(default: the one this process runs with, see nppnet --allocator)",
    )


def allocators(args: argparse.Namespace) -> list[str]:
    """The allocators `--allocators` asks for (default: the active one)."""
    return list(dict.fromkeys(args.allocators or [allocator.active()]))


def child_environment(choice: str) -> dict[str, str] | None:
    """The environment of a benchmark child running with `choice` (quiet
    TensorFlow start-up), None if its library is not installed."""
    env = allocator.environment(choice, dict(os.environ))
    if env is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def missing_allocator(choice: str) -> dict:
    """The result fields of a variant whose allocator is not installed."""
    return {
        "allocator": choice,
        "status": "unavailable",
        "error": f"allocator {choice}: library not installed",
    }


def signal_error(returncode: int, stderr: str | None) -> str:
    """The error of a child killed by a signal: the signal and the last
    lines of its stderr (an abort's reason, e.g. an allocation failure)."""
    tail = [line for line in (stderr or "").strip().splitlines() if line][-3:]
    reason = f"killed by signal {-returncode}"
    return f"{reason}: {' | '.join(tail)}" if tail else reason
