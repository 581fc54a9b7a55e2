"""The `nppnet` command line.

Each command group lives in its own module under `pipeline/commands/` and
exposes `register(subparsers)`; heavy imports (TensorFlow, Beam, MLflow)
happen inside the command handlers so that `nppnet --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from pipeline import allocator

log = logging.getLogger("nppnet")


def command_modules() -> list[str]:
    """Names of the modules under pipeline/commands, each one command group."""
    import pkgutil

    import pipeline.commands

    return sorted(
        m.name for m in pkgutil.iter_modules(pipeline.commands.__path__)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nppnet",
        description=(
            "NPPNet-TF: joint human parsing and pose estimation with neural "
            "architecture search (Keras 3 / TensorFlow, Beam, TFDV, MLflow)."
        ),
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("NPPNET_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO, or $NPPNET_LOG_LEVEL)",
    )
    parser.add_argument(
        "--allocator",
        choices=allocator.CHOICES,
        default=os.environ.get(allocator.ENV_CHOICE, allocator.DEFAULT),
        help=(
            "memory allocator of the process: tcmalloc or jemalloc (preloaded, "
            "TensorFlow's oneDNN pool off: less memory) or tensorflow (its "
            f"default arrangement); default {allocator.DEFAULT}, or "
            f"${allocator.ENV_CHOICE}. Applied by the nppnet executable at "
            "start-up (it re-executes itself)"
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in command_modules():
        module = importlib.import_module(f"pipeline.commands.{name}")
        module.register(subparsers)
    return parser


# Notices TFDV logs at import about its optional notebook viewer, which this
# project does not use (it renders its own HTML summary).
_HARMLESS = ("Unable to import IPython", "TFDV visualization APIs")


def _quiet_root_info(record: logging.LogRecord) -> bool:
    # Beam and TFDV log per-bundle chatter through the root logger at INFO;
    # our own modules always log through named loggers.
    if record.name != "root":
        return True
    if str(record.msg).lstrip().startswith(_HARMLESS):
        return False
    return record.levelno >= logging.WARNING


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_root_info)
    # TensorFlow's C++ start-up chatter and Google client libraries' Python
    # support notices drown the useful lines.
    # Level 3 also hides the CUDA plugin registration errors TF 2.16 prints
    # on every CPU-only start; Python-level errors are unaffected.
    os.environ.setdefault(
        "TF_CPP_MIN_LOG_LEVEL", "2" if level == "DEBUG" else "3"
    )
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"google\..*"
    )
    for noisy in ("absl", "apache_beam", "tensorflow", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(
            max(logging.WARNING, logging.getLogger().level)
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if log.isEnabledFor(logging.DEBUG):  # describe() looks for libraries
        log.debug("memory allocator: %s", allocator.describe())
    try:
        code = args.handler(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Configuration and input errors: one readable line, no traceback.
        log.error("%s", err)
        log.debug("traceback", exc_info=True)
        return 2
    return int(code or 0)


def entry() -> None:
    """The `nppnet` executable: puts the requested memory allocator in
    place (re-executing the process if needed, before TensorFlow loads),
    then runs `main`. `main` itself, as tests call it, never re-executes."""
    try:
        allocator.use(allocator.requested())
    except ValueError as err:
        print(f"nppnet: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())


if __name__ == "__main__":
    entry()
