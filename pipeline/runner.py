"""Stage runner of `nppnet run`: manifests, skip-if-up-to-date, lock.

Every stage writes `<work_dir>/stages/<name>.json`: its config keys' hash,
the fingerprints of its inputs (the outputs of the stages before it), the
code version (package version and git revision), its outputs and timings.
A stage is skipped when that manifest says it succeeded with the same
config, inputs and package version and its outputs still exist; otherwise
it runs, and so does every stage after it (their inputs changed). A new
package version re-runs everything; a new commit alone does not (a
scheduled run would otherwise repeat days of search and training after
every documentation change): `nppnet run --from STAGE` re-runs on purpose.
A failed or killed stage's manifest says `failed` or `running`, so the next
run restarts from it, resuming its work when its config and inputs are
unchanged (`StageContext.resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nppnet_tf import __version__
from nppnet_tf.config import RunConfig, section_hash

log = logging.getLogger(__name__)

# Exit codes of `nppnet run` (and of the stage commands that share them).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DATA_GATE = 3
EXIT_PROMOTION_REFUSED = 4
EXIT_LOCKED = 5


class StageFailed(RuntimeError):
    """A stage ended without its outputs; `exit_code` says how."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code
        self.records: list[StageRecord] = []  # set by `run_stages`


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a pipeline run.

    Attributes:
        name: stage name (also the manifest file name).
        sections: the config values that key this stage: whole sections
            (`"train"`) or single keys (`"train.final_flip"`).
        run: `run(context) -> outputs`; outputs is a JSON-able dict that must
            hold a `fingerprint` string identifying what the stage produced,
            and may hold `skipped: True` when the stage found its own work
            already done.
        outputs_exist: `outputs_exist(outputs) -> bool`, checked before a
            skip (a deleted output makes the stage run again).
        always_run: the stage is always called and decides itself whether
            its work is done (it fingerprints inputs the runner cannot see,
            such as an external data folder); it then returns the same
            fingerprint and `skipped: True`.
    """

    name: str
    sections: tuple[str, ...]  # "section" or "section.key"
    run: Callable[[StageContext], dict[str, Any]]
    outputs_exist: Callable[[Mapping[str, Any]], bool] = lambda outputs: True
    always_run: bool = False


@dataclasses.dataclass
class StageContext:
    """What a running stage can see."""

    config: RunConfig
    work_dir: Path
    results: dict[str, dict[str, Any]]  # outputs of the stages before
    force: bool = False
    # The previous attempt of this stage, with the same config and inputs,
    # failed or was killed: continue its work (search and training resume
    # from their checkpoints) instead of starting over.
    resume: bool = False
    tracking: Any = None  # the stage's MLflow logger (NullLogger when off)


@dataclasses.dataclass(frozen=True)
class StageRecord:
    name: str
    status: str  # "ran", "skipped", "failed"
    seconds: float
    outputs: dict[str, Any]


def code_version() -> str:
    """Package version plus the git revision when run from a checkout."""
    version = __version__
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        version += f"+g{ref[:10]}"
    except OSError:
        pass
    return version


def git_revision() -> str | None:
    version = code_version()
    return version.split("+g", 1)[1] if "+g" in version else None


def config_value(config: RunConfig, key: str) -> Any:
    """`config.<section>` or `config.<section>.<key>` for a stage key."""
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _config_hash(config: RunConfig, sections: Sequence[str]) -> str:
    return section_hash({name: config_value(config, name) for name in sections})


def _input_fingerprint(results: Mapping[str, Mapping[str, Any]]) -> str:
    text = json.dumps(
        {k: v.get("fingerprint") for k, v in results.items()}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    )
    tmp.replace(path)


class RunLock:
    """An exclusive lock on a work directory (`<work_dir>/.lock`).

    The lock file holds who took it (host, pid, time); a second run on the
    same directory fails with that information. A lock left by a process that
    no longer exists on this host is taken over.
    """

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / ".lock"
        self._handle = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            handle.close()
            raise StageFailed(
                f"another run holds {self.path} ({holder}); "
                "wait for it to finish or use another run.work_dir",
                EXIT_LOCKED,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"host={socket.gethostname()} pid={os.getpid()} "
            f"started={dt.datetime.now().isoformat(timespec='seconds')}\n"
        )
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _no_tracking(stage: Stage, status: str):
    return contextlib.nullcontext(None)


def run_stages(
    stages: Sequence[Stage],
    config: RunConfig,
    force: bool = False,
    from_stage: str | None = None,
    track: Callable[
        [Stage, str], contextlib.AbstractContextManager[Any]
    ] = _no_tracking,
    on_stage_end: Callable[[Stage, StageRecord, Any], None] | None = None,
) -> list[StageRecord]:
    """Runs `stages` in order, skipping those whose manifest is up to date.

    Args:
        stages: the stages of this run, in order.
        config: the run config; `config.run.work_dir` holds the manifests.
        force: run every stage from scratch (and let stages rebuild their
            outputs).
        from_stage: run this stage and everything after it even if up to
            date.
        track: `track(stage, "ran" | "skipped")` returns a context manager
            around the stage that yields its logger (an MLflow child run),
            given to the stage as `context.tracking`; it sees the stage's
            exception if the stage fails.
        on_stage_end: `on_stage_end(stage, record, logger)`, inside the
            `track` context of a stage that ran or was skipped.

    Returns:
        One record per stage, in order.

    Raises:
        StageFailed: a stage failed (its `records` attribute holds the
            records so far, the failed one last); earlier stages' manifests
            are kept. A KeyboardInterrupt or SystemExit (a signal) passes
            through with the stage's manifest marked failed.
        ValueError: `from_stage` names no stage.
    """
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise ValueError(
            f"--from {from_stage!r}: not a stage of this run ({', '.join(names)})"
        )
    work_dir = Path(config.run.work_dir)
    context = StageContext(
        config=config, work_dir=work_dir, results={}, force=force
    )
    records: list[StageRecord] = []
    rerun = force
    version = code_version()
    for stage in stages:
        if stage.name == from_stage:
            rerun = True
        manifest_path = work_dir / "stages" / f"{stage.name}.json"
        config_hash = _config_hash(config, stage.sections)
        inputs = _input_fingerprint(context.results)
        previous = _read_manifest(manifest_path)
        up_to_date = (
            not rerun
            and not stage.always_run
            and previous is not None
            and previous.get("status") == "succeeded"
            and previous.get("config_hash") == config_hash
            and previous.get("inputs") == inputs
            and previous.get("package_version") == __version__
            and stage.outputs_exist(previous.get("outputs", {}))
        )
        if up_to_date:
            log.info("stage %s: up to date, skipped", stage.name)
            record = StageRecord(
                stage.name, "skipped", 0.0, previous["outputs"]
            )
            context.results[stage.name] = previous["outputs"]
            records.append(record)
            with track(stage, "skipped") as logger:
                if on_stage_end:
                    on_stage_end(stage, record, logger)
            continue
        # Everything after a stage that runs sees new inputs (a stage that
        # always runs changes them only if its fingerprint changes).
        if not stage.always_run:
            rerun = True
        context.resume = (
            not force
            and previous is not None
            and previous.get("status") in ("failed", "running")
            and previous.get("config_hash") == config_hash
            and previous.get("inputs") == inputs
        )
        log.info(
            "stage %s: %s",
            stage.name,
            "resuming the failed or killed attempt"
            if context.resume
            else "running",
        )
        started = time.time()
        manifest = {
            "stage": stage.name,
            "config_hash": config_hash,
            "inputs": inputs,
            "input_stages": {
                k: v.get("fingerprint") for k, v in context.results.items()
            },
            "code_version": version,
            "package_version": __version__,
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "resumed": context.resume,
        }
        # Marked running until it ends: a killed run leaves this behind,
        # and the next run resumes the stage.
        _write_json(
            manifest_path, {**manifest, "status": "running", "pid": os.getpid()}
        )
        try:
            with track(stage, "ran") as logger:
                context.tracking = logger
                outputs = stage.run(context)
                if "fingerprint" not in outputs:
                    raise AssertionError(
                        f"stage {stage.name} returned no fingerprint"
                    )
                seconds = time.time() - started
                status = "skipped" if outputs.get("skipped") else "ran"
                record = StageRecord(stage.name, status, seconds, outputs)
                if on_stage_end:
                    on_stage_end(stage, record, logger)
        except BaseException as err:
            seconds = time.time() - started
            interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
            _write_json(
                manifest_path,
                {
                    **manifest,
                    "status": "failed",
                    "seconds": seconds,
                    "error": repr(err),
                },
            )
            records.append(
                StageRecord(
                    stage.name,
                    "interrupted" if interrupted else "failed",
                    seconds,
                    {"error": str(err) or type(err).__name__},
                )
            )
            if interrupted:
                raise
            failure = (
                err
                if isinstance(err, StageFailed)
                else StageFailed(f"stage {stage.name} failed: {err}")
            )
            failure.records = records
            if failure is err:
                raise
            raise failure from err
        finally:
            context.tracking = None
        _write_json(
            manifest_path,
            {
                **manifest,
                "status": "succeeded",
                "seconds": seconds,
                "outputs": outputs,
            },
        )
        context.results[stage.name] = outputs
        records.append(record)
        log.info("stage %s: %s in %.1f s", stage.name, status, seconds)
    return records


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fingerprint_of(*parts: Any) -> str:
    """Short sha256 of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
