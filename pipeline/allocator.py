"""The memory allocator of an `nppnet` process.

With oneDNN on (TensorFlow's default on x86 Linux), TensorFlow serves every
large CPU tensor from its own pool (`MklCPUAllocator`, a best-fit pool that
never returns memory), and the rest from glibc malloc, which keeps freed
memory in per-thread arenas. Both hold on to a step's transient tensors:
at the paper sizes the final network's train step peaks 1.0 GiB higher,
and the search iteration 0.75 GiB higher, than with tcmalloc, which
returns freed memory (docs/benchmarks.md, "Memory allocator").

`use(choice)` makes the process run with one of:

* `tcmalloc` (the default when the library is installed):
  `libtcmalloc_minimal` preloaded and TensorFlow's oneDNN pool off
  (`TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`), so every tensor comes from
  tcmalloc;
* `jemalloc`: the same with `libjemalloc`;
* `tensorflow`: TensorFlow's own arrangement, unchanged.

A preload only works from the start of a process, so `use` re-executes the
same command (same PID, same arguments) with the new environment before
anything heavy is imported; `NPPNET_ALLOCATOR_ACTIVE` records the
allocator in place, so the re-executed process does not loop. A library
that is not installed falls back to `tensorflow` with a warning: the
allocator changes memory, never results.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

CHOICES = ("tcmalloc", "jemalloc", "tensorflow")
DEFAULT = "tcmalloc"
ENV_CHOICE = "NPPNET_ALLOCATOR"
ENV_ACTIVE = "NPPNET_ALLOCATOR_ACTIVE"
# What `use` adds to the environment besides LD_PRELOAD (removed again
# when another choice replaces it).
_SYSTEM_ALLOCATOR = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"
_LIBRARIES = {
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "jemalloc": ("jemalloc",),
}
# The other global options of `nppnet` that take a value (pipeline/cli.py).
_GLOBAL_OPTIONS_WITH_VALUE = ("--log-level",)
# tcmalloc reports every allocation above 1 GiB on stderr; the supernets'
# weights and pools make such reports noise.
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}


def requested(argv: list[str] | None = None) -> str:
    """The allocator asked for: `--allocator X` / `--allocator=X` among
    the global options of `argv`, else `$NPPNET_ALLOCATOR`, else
    `DEFAULT`.

    Raises:
        ValueError: an unknown allocator name (naming where it came from).
    """
    argv = sys.argv[1:] if argv is None else argv
    choice, source = os.environ.get(ENV_CHOICE), f"${ENV_CHOICE}"
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        # Global options only: the first other word is the command.
        arg = argv[i]
        if arg == "--allocator" and i + 1 < len(argv):
            choice, source = argv[i + 1], "--allocator"
            i += 1
        elif arg.startswith("--allocator="):
            choice, source = arg.split("=", 1)[1], "--allocator"
        elif arg in _GLOBAL_OPTIONS_WITH_VALUE:
            i += 1  # its value
        i += 1
    if choice is None:
        return DEFAULT
    if choice not in CHOICES:
        raise ValueError(
            f"{source}: unknown allocator {choice!r}; choose one of "
            f"{', '.join(CHOICES)}"
        )
    return choice


def active() -> str:
    """The allocator this process runs with (`tensorflow` unless `use`
    arranged another one)."""
    return os.environ.get(ENV_ACTIVE, "tensorflow")


def library(choice: str) -> str | None:
    """The shared library of `choice` as the dynamic loader names it
    (e.g. `libtcmalloc_minimal.so.4`), None if not installed or for
    `tensorflow`."""
    for name in _LIBRARIES.get(choice, ()):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def environment(choice: str, env: dict[str, str]) -> dict[str, str] | None:
    """`env` changed to run with `choice`, or None when the library of
    `choice` is not installed. Undoes what a previous choice added."""
    env = dict(env)
    previous = env.get(ENV_ACTIVE, "tensorflow")
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    if previous != "tensorflow":
        old = library(previous)
        preload = [p for p in preload if p != old]
        env.pop(_SYSTEM_ALLOCATOR, None)
    if choice != "tensorflow":
        lib = library(choice)
        if lib is None:
            return None
        preload = [lib, *preload]
        env[_SYSTEM_ALLOCATOR] = "1"
        if choice == "tcmalloc":
            for key, value in _TCMALLOC_QUIET.items():
                env.setdefault(key, value)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env[ENV_ACTIVE] = choice
    # A child `nppnet` started with this environment asks for the same
    # allocator instead of the default (and so does not re-execute).
    env[ENV_CHOICE] = choice
    return env


def use(choice: str) -> None:
    """Re-executes this process with `choice` in place, unless it already
    is (or its library is missing: then a warning and nothing else).

    Call before importing TensorFlow: nothing after this call runs in the
    current process image when it re-executes.
    """
    if choice == active():
        return
    env = environment(choice, dict(os.environ))
    if env is None:
        names = " or ".join(f"lib{n}" for n in _LIBRARIES[choice])
        log.warning(
            "allocator %s requested but %s is not installed; using "
            "TensorFlow's default allocator (more memory, same results)",
            choice,
            names,
        )
        os.environ[ENV_ACTIVE] = "tensorflow"
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
    """One line for logs: the allocator in use and how."""
    choice = active()
    if choice == "tensorflow":
        return "TensorFlow's default (oneDNN pool and glibc malloc)"
    return (
        f"{choice} ({library(choice)} preloaded, TensorFlow's oneDNN pool off)"
    )


def release_free_memory() -> None:
    """Hands memory the allocators hold free back to the OS: glibc's
    arenas (`malloc_trim`), and tcmalloc's page heap or jemalloc's arenas
    when one of them is preloaded. Without it the process looks as big as
    its largest stage."""
    process = ctypes.CDLL(None)  # symbols of the process, preloads first
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:  # tcmalloc
        release()
    mallctl = getattr(process, "mallctl", None)
    if mallctl is not None:  # jemalloc: purge every arena
        # 4096 is MALLCTL_ARENAS_ALL.
        mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
