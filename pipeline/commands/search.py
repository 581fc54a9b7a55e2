"""`nppnet search`: one stage of the bilevel architecture search.

    nppnet search --config configs/lip.yaml --stage encoder-decoder
    nppnet search --config configs/lip.yaml --stage interaction
    nppnet search ... --resume          # continue after a stop or a crash

Reads the records of `nppnet data preprocess` (default
`<run.work_dir>/records`), writes under `--out` (default
`<run.work_dir>/search/<stage>`; layout in docs/search.md) and logs an MLflow
run `search-<stage>` (config, per-step and per-epoch metrics, per-epoch
genotypes and diagrams, the final and best genotypes). The interaction
stage searches on the cells of `--base-genotype`, by default the
encoder-decoder stage's `genotype.json` when it exists, else the authors'
cells (configs/genotypes/nppnet_lip.json).

Exit codes: 0 finished (or stopped at --max-steps), 1 error (a non-finite
loss included: the last good checkpoint is kept), 2 bad config or input,
5 another search holds the output directory, 128 + signal number after
SIGINT (130) or SIGTERM (143): the step in progress was finished and a
checkpoint saved, `--resume` continues.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
from pathlib import Path

from pipeline.commands.run import add_config_arguments

log = logging.getLogger(__name__)

STAGES = ("encoder-decoder", "interaction")
AUTHORS_GENOTYPE = Path("configs/genotypes/nppnet_lip.json")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="bilevel architecture search of one stage (docs/search.md)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--stage", required=True, choices=STAGES, help="search stage"
    )
    parser.add_argument(
        "--records", help="records directory (default <run.work_dir>/records)"
    )
    parser.add_argument(
        "--out", help="output directory (default <run.work_dir>/search/<stage>)"
    )
    parser.add_argument(
        "--base-genotype",
        help="genotype JSON whose cells the interaction stage searches on",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps in all (a checkpoint is saved)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the output directory",
    )
    parser.set_defaults(handler=handle)


class SearchInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped the search after a checkpoint (the MLflow run
    ends KILLED)."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def authors_genotype_path() -> Path:
    """configs/genotypes/nppnet_lip.json, from the working directory or the
    repository this package lives in."""
    if AUTHORS_GENOTYPE.is_file():
        return AUTHORS_GENOTYPE
    return Path(__file__).resolve().parents[2] / AUTHORS_GENOTYPE


def base_genotype_for(stage: str, work_dir: Path, given: str | None):
    """The base genotype of a stage (None for the encoder-decoder stage).

    Raises:
        FileNotFoundError: a given file does not exist.
        GenotypeError: it is not a genotype.
    """
    from nppnet_tf.search.genotype import Genotype

    if stage != "interaction":
        if given:
            log.warning("--base-genotype is ignored by the %s stage", stage)
        return None
    if given:
        path = Path(given)
    else:
        path = work_dir / "search" / "encoder-decoder" / "genotype.json"
        if not path.is_file():
            path = authors_genotype_path()
            log.info(
                "no encoder-decoder genotype under %s: searching on the "
                "authors' cells (%s)",
                work_dir,
                path,
            )
    log.info("base genotype (cells): %s", path)
    return Genotype.load(path).cells_only()


def handle(args: argparse.Namespace) -> int:
    try:
        return _handle(args)
    finally:
        # The traced supernet steps leave millions of Python objects; the
        # interpreter's final garbage collection over them takes minutes.
        # Frozen objects are skipped by it (the OS reclaims the memory).
        gc.freeze()


def _handle(args: argparse.Namespace) -> int:
    from nppnet_tf.config import load_config

    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    config = load_config(args.config, args.overrides)
    work_dir = Path(config.run.work_dir)
    records = Path(args.records) if args.records else work_dir / "records"
    out_dir = Path(args.out) if args.out else work_dir / "search" / args.stage
    base = base_genotype_for(args.stage, work_dir, args.base_genotype)

    # The strategy first: a multi-worker strategy must exist before any
    # other TensorFlow work, and only the chief tracks and locks.
    from nppnet_tf import distribute

    strategy = distribute.create_strategy(config.distribute)
    from nppnet_tf.search.loop import NonFiniteLossError
    from pipeline.runner import EXIT_ERROR, StageFailed

    try:
        if not distribute.is_chief(strategy):
            return _search(args, config, records, out_dir, base, strategy, None)
        return _tracked_search(args, config, records, out_dir, base, strategy)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return EXIT_ERROR
    except StageFailed as err:  # another search holds the output directory
        log.error("%s", err)
        return err.exit_code


def _tracked_search(args, config, records, out_dir, base, strategy) -> int:
    """The chief's search: output directory locked, MLflow run open."""
    from pipeline.runner import RunLock
    from pipeline.tracking import Tracker

    with RunLock(out_dir):
        tracker = Tracker(config)
        try:
            with tracker.run(
                f"search-{args.stage}",
                tags={"nppnet.stage": f"search-{args.stage}"},
            ) as logger:
                logger.log_config(config)
                logger.set_tags(
                    {
                        "nppnet.search.resume": str(args.resume),
                        "nppnet.search.out_dir": str(out_dir.resolve()),
                    }
                )
                code = _search(
                    args, config, records, out_dir, base, strategy, logger
                )
                if tracker.enabled:
                    log.info("MLflow: %s", tracker.run_url(logger.run_id))
                return code
        except SearchInterrupted as stopped:
            return 128 + stopped.signal_number


def _search(args, config, records, out_dir, base, strategy, logger) -> int:
    from nppnet_tf.search.loop import run_search

    result = run_search(
        config,
        args.stage,
        str(records),
        out_dir,
        base_genotype=base,
        max_steps=args.max_steps,
        resume=args.resume,
        logger=logger,
        strategy=strategy,
    )
    if logger is not None:
        logger.set_tags(
            {
                "nppnet.search.status": result.status,
                "nppnet.search.global_step": str(result.global_step),
            }
        )
    if result.status == "interrupted":
        log.warning(
            "search stopped by %s at step %d; checkpoint %s (--resume continues)",
            signal.Signals(result.signal_number).name
            if result.signal_number
            else "a signal",
            result.global_step,
            result.checkpoint,
        )
        if logger is None:
            return 128 + (result.signal_number or signal.SIGTERM)
        raise SearchInterrupted(result.signal_number or signal.SIGTERM)
    log.info(
        "search %s %s after %d epochs (%d steps): genotype %s, best %s",
        args.stage,
        result.status,
        result.epochs_completed,
        result.global_step,
        result.genotype,
        result.best_genotype,
    )
    print(result.best_genotype or result.genotype or "")
    return 0
