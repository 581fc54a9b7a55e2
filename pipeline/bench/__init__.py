"""Benchmarks behind `nppnet bench ...`; each module exposes `register(subparsers)`
and writes its results as JSON (summarised by hand in docs/benchmarks.md).

Shared here: the memory-allocator dimension of the subprocess benchmarks
(`search`, `train`, `model`): each variant's child process is started with
the allocator's environment (`pipeline.allocator`), and its result records
which one it ran with; and the running of one child (`run_child`), whose
failures (timeout, abort, exit status) become result fields, not exceptions,
with the peak resident memory the child reached before it failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
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
    lines of its stderr (an abort's reason, e.g. an allocation failure).
    A SIGKILL leaves the child no last words (its stderr ends with whatever
    it logged before), so the error says who sends one instead."""
    reason = f"killed by signal {-returncode}"
    if -returncode == signal.SIGKILL:
        return (
            reason + " (SIGKILL: the kernel's out-of-memory killer, or by hand)"
        )
    tail = [line for line in (stderr or "").strip().splitlines() if line][-3:]
    return f"{reason}: {' | '.join(tail)}" if tail else reason


def status_gib(key: str, pid: int | str = "self") -> float:
    """A memory line of /proc/PID/status (Linux) in GiB: `VmRSS` (resident
    now) or `VmHWM` (the peak resident so far)."""
    path = f"/proc/{pid}/status"
    with open(path) as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    raise OSError(f"{key} not in {path}")


class _PeakMemory(threading.Thread):
    """Follows a running child's peak resident memory (`VmHWM`) until it
    exits, so that a child that dies (killed for memory, aborted, timed
    out) still leaves its peak: the child's own report is lost with it."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid = pid
        self.period = period
        self.peak_gib: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:  # VmHWM only grows: the last reading is the peak
                self.peak_gib = status_gib("VmHWM", self.pid)
            except (OSError, ValueError):  # gone, or not Linux
                return
            self.done.wait(self.period)

    def gib(self) -> float | None:
        return round(self.peak_gib, 3) if self.peak_gib else None


def peak_at_failure(result: dict) -> str:
    """A failed variant's peak-memory table cell: the peak its child
    reached before it failed, where it was seen."""
    seen = result.get("peak_rss_gib_seen")
    return f"{seen:.2f} (at failure)" if seen else ""


def run_child(command: list[str], choice: str, timeout: float) -> dict:
    """Runs one benchmark child (`command`, allocator `choice`) and returns
    the last JSON object it printed on stdout, or, when it gave none, a
    result with `status` ("unavailable", "timeout" or "failed"), `error`
    (the reason, with the end of the child's stderr), `seconds` and
    `peak_rss_gib_seen` (the child's peak resident memory as last sampled,
    None where /proc cannot tell)."""
    env = child_environment(choice)
    if env is None:
        return missing_allocator(choice)
    started = time.time()
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        memory = _PeakMemory(child.pid)
        memory.start()
        try:
            stdout, stderr = child.communicate(timeout=timeout)
            error = None
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            error = f"no result within {timeout:.0f} s"
        finally:
            memory.done.set()
            memory.join()
    failure = {
        "status": "timeout" if error else "failed",
        "seconds": round(time.time() - started, 1),
        "peak_rss_gib_seen": memory.gib(),
    }
    if error:
        return {**failure, "error": error}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if child.returncode < 0:  # an abort or an outside kill
        error = signal_error(child.returncode, stderr)
    elif child.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        error = f"exit {child.returncode}: {' | '.join(tail)}"
    else:
        return json.loads(lines[-1])
    return {**failure, "error": error}
