"""`nppnet train`: final training of the derived network of a genotype.

    nppnet train --config configs/lip.yaml
    nppnet train --config configs/lip.yaml --genotype genotype.json \\
        --init-weights runs/encoder/best.keras
    nppnet train ... --resume           # continue after a stop or a crash

Trains `NPPNet` of `--genotype` (default `train.genotype`, the authors'
genotype) with the authors' recipe (docs/training.md) on the records of
`nppnet data preprocess` (default `<run.work_dir>/records`), writes under
`--out` (default `<run.work_dir>/train`): checkpoints/, tensorboard/,
metrics.jsonl, best.keras, final.keras, the final evaluation's report.json,
report.md, report.html and overlays/, init_weights_report.json; and logs
an MLflow run `train` (config, genotype, per-step and per-epoch metrics,
the final scores, the models and reports as artifacts).

Exit codes: 0 finished (or stopped at --max-steps: final model and report
written), 1 error (a non-finite loss included: the last good checkpoint is
kept), 2 bad config or input (missing records, genotype or initial
weights, checkpoints present without --resume, ...), 5 another training
holds the output directory, 128 + signal number after SIGINT (130) or
SIGTERM (143): the step in progress was finished and a checkpoint saved,
--resume continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
from pathlib import Path

from pipeline.commands.run import add_config_arguments

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="final training of a genotype's network (docs/training.md)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--genotype",
        help="genotype JSON of the trained network (default train.genotype)",
    )
    parser.add_argument(
        "--records", help="records directory (default <run.work_dir>/records)"
    )
    parser.add_argument(
        "--out", help="output directory (default <run.work_dir>/train)"
    )
    parser.add_argument(
        "--init-weights",
        help="a .keras model or training checkpoint initialising the stems "
        "and encoders (overrides train.init_weights)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps in all (a checkpoint, the final "
        "model and the final evaluation are written)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the output directory",
    )
    parser.set_defaults(handler=handle)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped the training after a checkpoint (the MLflow
    run ends KILLED)."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def genotype_path(given: str) -> Path:
    """`given` from the working directory, else (a relative path such as
    the default configs/genotypes/nppnet_lip.json) from the repository this
    package lives in.

    Raises:
        FileNotFoundError: neither exists.
    """
    path = Path(given)
    if path.is_file():
        return path
    if not path.is_absolute():
        beside = Path(__file__).resolve().parents[2] / path
        if beside.is_file():
            return beside
    raise FileNotFoundError(f"genotype file {given} does not exist")


def handle(args: argparse.Namespace) -> int:
    from nppnet_tf.config import load_config
    from nppnet_tf.search.genotype import Genotype

    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    config = load_config(args.config, args.overrides)
    if args.init_weights:
        config = dataclasses.replace(
            config,
            train=dataclasses.replace(
                config.train, init_weights=args.init_weights
            ),
        )
    work_dir = Path(config.run.work_dir)
    records = Path(args.records) if args.records else work_dir / "records"
    out_dir = Path(args.out) if args.out else work_dir / "train"
    path = genotype_path(args.genotype or config.train.genotype)
    genotype = Genotype.load(path)
    log.info("genotype %s (%s)", path, genotype.fingerprint())

    # The strategy first: a multi-worker strategy must exist before any
    # other TensorFlow work, and only the chief tracks and locks.
    from nppnet_tf import distribute

    strategy = distribute.create_strategy(config.distribute)
    from nppnet_tf.training.train import NonFiniteLossError
    from pipeline.runner import EXIT_ERROR, StageFailed

    job = (args, config, records, out_dir, genotype, path, strategy)
    try:
        if not distribute.is_chief(strategy):
            return _train(*job, logger=None)
        return _tracked_train(*job)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return EXIT_ERROR
    except StageFailed as err:  # another training holds the directory
        log.error("%s", err)
        return err.exit_code


def _tracked_train(args, config, records, out_dir, genotype, path, strategy):
    """The chief's training: output directory locked, MLflow run open."""
    from pipeline.runner import RunLock
    from pipeline.tracking import Tracker

    with RunLock(out_dir):
        tracker = Tracker(config)
        try:
            with tracker.run("train", tags={"nppnet.stage": "train"}) as logger:
                logger.log_config(config)
                logger.log_dict(genotype.to_dict(), "genotype.json")
                logger.set_tags(
                    {
                        "nppnet.train.resume": str(args.resume),
                        "nppnet.train.out_dir": str(out_dir.resolve()),
                        "nppnet.train.genotype": str(path),
                        "nppnet.genotype_fingerprint": genotype.fingerprint(),
                    }
                )
                code = _train(
                    args,
                    config,
                    records,
                    out_dir,
                    genotype,
                    path,
                    strategy,
                    logger=logger,
                )
                if tracker.enabled:
                    log.info("MLflow: %s", tracker.run_url(logger.run_id))
                return code
        except TrainingInterrupted as stopped:
            return 128 + stopped.signal_number


def _train(args, config, records, out_dir, genotype, path, strategy, logger):
    from nppnet_tf.training.train import run_training

    result = run_training(
        config,
        str(records),
        out_dir,
        genotype=genotype,
        max_steps=args.max_steps,
        resume=args.resume,
        logger=logger,
        strategy=strategy,
    )
    if logger is not None:
        logger.set_tags(
            {
                "nppnet.train.status": result.status,
                "nppnet.train.global_step": str(result.global_step),
            }
        )
    if result.status == "interrupted":
        log.warning(
            "training stopped by %s at step %d; checkpoint %s (--resume "
            "continues)",
            signal.Signals(result.signal_number).name
            if result.signal_number
            else "a signal",
            result.global_step,
            result.checkpoint,
        )
        if logger is None:
            return 128 + (result.signal_number or signal.SIGTERM)
        raise TrainingInterrupted(result.signal_number or signal.SIGTERM)
    final = result.metrics
    log.info(
        "training %s after %d epochs (%d steps): best epoch %d; final "
        "evaluation mIoU %s, PCKh %s (%s)",
        result.status,
        result.epochs_completed,
        result.global_step,
        final["best"]["epoch"],
        _number(final.get("final/miou")),
        _number(final.get("final/pckh")),
        result.report,
    )
    print(result.best_model or result.final_model or "")
    return 0


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
