"""Benchmarks behind `nppnet bench ...`; each module exposes `register(subparsers)`
and writes its results as JSON (summarised by hand in docs/benchmarks.md).

Shared here: the memory-allocator dimension of the subprocess benchmarks
(`search`, `train`, `model`): each variant's child process is started with
the allocator's environment (`pipeline.allocator`), and its result records
which one it ran with; and the running of one child (`run_child`), whose
failures (timeout, abort, exit status) become result fields, not exceptions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

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


def run_child(command: list[str], choice: str, timeout: float) -> dict:
    """Runs one benchmark child (`command`, allocator `choice`) and returns
    the last JSON object it printed on stdout, or, when it gave none, a
    result with `status` ("unavailable", "timeout" or "failed"), `error`
    (the reason, with the end of the child's stderr) and `seconds`."""
    env = child_environment(choice)
    if env is None:
        return missing_allocator(choice)
    started = time.time()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {
            "status": "timeout",
            "error": f"no result within {timeout:.0f} s",
            "seconds": round(time.time() - started, 1),
        }
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode < 0:  # an abort or an outside kill
        error = signal_error(done.returncode, done.stderr)
    elif done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        error = f"exit {done.returncode}: {' | '.join(tail)}"
    else:
        return json.loads(lines[-1])
    return {
        "status": "failed",
        "error": error,
        "seconds": round(time.time() - started, 1),
    }
