"""MLflow model registry: a trained NPPNet becomes a registered version.

`register_model` logs, into one MLflow run, the Keras model
(`mlflow.keras`, logged model `model`), the TF SavedModel (inside that
logged model, under `saved_model/`), the genotype, the validation metrics
and the evaluation report, then registers a version of
`registry.model_name` tagged with the genotype sha256, the data manifest
fingerprint and the SavedModel fingerprint, and points the
`registry.candidate_alias` alias at it. A SavedModel whose fingerprint is
already registered creates no version.

Promotion from candidate to champion lives in `pipeline/promotion.py`; the
rules and the layout are in docs/registry.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nppnet_tf.config import RunConfig
from nppnet_tf.search.genotype import Genotype
from pipeline.tracking import MLflowLogger, NullLogger, tracking_uri

log = logging.getLogger(__name__)

# Artifact names inside the logged model (what a version's source holds).
MODEL_ARTIFACT = "model"
SAVED_MODEL_ARTIFACT = "saved_model"
GENOTYPE_ARTIFACT = "genotype.json"

# Model version tags.
TAG_GENOTYPE = "genotype_sha256"
TAG_DATA = "data_fingerprint"
TAG_SAVED_MODEL = "saved_model_fingerprint"
# Export metadata that changes what the signatures compute.
SERVING_OPTIONS = ("image_size", "flip")
TAG_SAVED_MODEL_CHECKSUM = "saved_model_checksum"
TAG_MIOU = "val_miou"
TAG_PCKH = "val_pckh"
TAG_RUN = "run_id"

# The two metrics promotion compares, in percent (version tags and run
# metrics share these names).
SELECTION_METRICS = (TAG_MIOU, TAG_PCKH)

# Optional scalars of an evaluation report, logged next to the selection
# metrics: report key -> run metric name.
_EXTRA_PARSING = {
    "mean_iou_present_classes": "val_miou_present_classes",
    "pixel_accuracy": "val_pixel_accuracy",
    "mean_accuracy": "val_mean_accuracy",
}
_EXTRA_POSE = {"upper_body": "val_pckh_upper_body"}
_EXTRA_FLAT = {
    "miou_present_classes": "val_miou_present_classes",
    "pixel_accuracy": "val_pixel_accuracy",
    "mean_accuracy": "val_mean_accuracy",
    "pckh_upper_body": "val_pckh_upper_body",
}

DESCRIPTION = (
    "NPPNet joint human parsing and pose estimation (Keras 3 model and TF "
    "SavedModel under saved_model/). Version tags: genotype_sha256, "
    "data_fingerprint, saved_model_fingerprint, val_miou, val_pckh (percent), "
    "run_id; aliases: candidate (newest registration), champion (serving). "
    "See docs/registry.md."
)


@dataclasses.dataclass(frozen=True)
class SavedModelFingerprint:
    """TensorFlow's fingerprint of a SavedModel (`fingerprint.pb`).

    Attributes:
        singleprint: graph, signatures, object graph and checkpoint hashes
            joined by `/`, then (for an export of `nppnet export`) `+serving:`
            and a hash of the serving options of its metadata (`image_size`,
            `flip`). TensorFlow's part is the same for two exports of the
            same model and weights, and also when only the code inside the
            signature functions differs (the flip test on or off), hence
            the options. The registry's identity of a SavedModel.
        checksum: `saved_model_checksum`, the hash of `saved_model.pb`;
            differs between two exports of the same model (function names
            are not deterministic), kept for tracing one directory.
    """

    singleprint: str
    checksum: str


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    """What `register_model` did.

    Attributes:
        name: registered model name.
        version: the version holding this SavedModel (new or existing).
        created: False when the SavedModel was already registered.
        reason: one sentence saying what happened and why.
        model_uri: `models:/<name>/<version>`.
        run_id: the MLflow run the registration logged into.
    """

    name: str
    version: str
    created: bool
    reason: str
    model_uri: str
    run_id: str


# ---------------------------------------------------------------------------
# Inputs


def read_saved_model_fingerprint(
    saved_model_dir: str | Path,
) -> SavedModelFingerprint:
    """The fingerprint TensorFlow wrote into a SavedModel directory.

    Args:
        saved_model_dir: a TF SavedModel directory (`saved_model.pb`,
            `variables/`, `fingerprint.pb`).

    Returns:
        Its `SavedModelFingerprint`.

    Raises:
        FileNotFoundError: the directory or its `saved_model.pb` is missing.
        ValueError: it has no `fingerprint.pb` (written by TF 2.12 and
            later; re-export the model).
    """
    path = Path(saved_model_dir)
    if not (path / "saved_model.pb").is_file():
        raise FileNotFoundError(
            f"--saved-model {path}: not a SavedModel directory "
            "(no saved_model.pb)"
        )
    if not (path / "fingerprint.pb").is_file():
        raise ValueError(
            f"--saved-model {path}: no fingerprint.pb (written by TensorFlow "
            ">= 2.12); re-export the model with `nppnet export`"
        )
    import tensorflow as tf

    fingerprint = tf.saved_model.experimental.read_fingerprint(str(path))
    singleprint = fingerprint.singleprint()
    try:
        from nppnet_tf.serving.layout import read_metadata

        metadata = read_metadata(path)
    except FileNotFoundError:
        metadata = None
    if metadata is not None:
        options = json.dumps(
            {k: metadata.get(k) for k in SERVING_OPTIONS}, sort_keys=True
        )
        digest = hashlib.sha256(options.encode()).hexdigest()[:12]
        singleprint = f"{singleprint}+serving:{digest}"
    return SavedModelFingerprint(
        singleprint=singleprint,
        checksum=str(fingerprint.saved_model_checksum),
    )


def read_data_fingerprint(records_dir: str | Path) -> str:
    """`input_fingerprint` of the records' `manifest.json` (written by
    `beam_jobs/lip_to_tfrecord.py`).

    Raises:
        FileNotFoundError: the directory has no readable manifest.
        ValueError: the manifest has no `input_fingerprint`.
    """
    from beam_jobs.manifest import read_manifest

    manifest = read_manifest(str(records_dir))
    if manifest is None:
        raise FileNotFoundError(
            f"--records {records_dir}: no readable manifest.json "
            "(run `nppnet data preprocess` first)"
        )
    fingerprint = manifest.get("input_fingerprint")
    if not fingerprint:
        raise ValueError(
            f"--records {records_dir}: manifest.json has no input_fingerprint"
        )
    return str(fingerprint)


def selection_metrics(
    report: Mapping[str, Any], source: str = "<report>"
) -> dict[str, float]:
    """The validation metrics a registration records, from an evaluation
    report.

    Accepts the report of `nppnet evaluate` (`parsing.mean_iou`,
    `pose.average`, `split`), the flat dict of
    `nppnet_tf.evaluation.evaluate` (`miou`, `pckh`) or a dict that already
    has `val_miou` and `val_pckh`. Scores are in percent.

    Args:
        report: the parsed JSON report.
        source: where it came from, for error messages.

    Returns:
        `val_miou`, `val_pckh` and whichever of `val_miou_present_classes`,
        `val_pixel_accuracy`, `val_mean_accuracy`, `val_pckh_upper_body` the
        report holds (finite values only).

    Raises:
        ValueError: the report is of another split, not in percent, or has
            no mIoU or PCKh.
    """
    split = report.get("split")
    if split is not None and split != "val":
        raise ValueError(
            f"{source}: report of split {split!r}; promotion compares "
            "val metrics (evaluate with --split val)"
        )
    units = report.get("units")
    if units is not None and units != "percent":
        raise ValueError(f"{source}: units {units!r}, expected 'percent'")
    metrics: dict[str, Any] = {}
    if TAG_MIOU in report or TAG_PCKH in report:
        metrics = {k: v for k, v in report.items() if k.startswith("val_")}
    elif isinstance(report.get("parsing"), Mapping) or isinstance(
        report.get("pose"), Mapping
    ):
        parsing = report.get("parsing") or {}
        pose = report.get("pose") or {}
        metrics[TAG_MIOU] = parsing.get("mean_iou")
        metrics[TAG_PCKH] = pose.get("average")
        metrics.update({n: parsing.get(k) for k, n in _EXTRA_PARSING.items()})
        metrics.update({n: pose.get(k) for k, n in _EXTRA_POSE.items()})
    else:
        metrics[TAG_MIOU] = report.get("miou")
        metrics[TAG_PCKH] = report.get("pckh")
        metrics.update({n: report.get(k) for k, n in _EXTRA_FLAT.items()})
    for key in SELECTION_METRICS:
        if metrics.get(key) is None:
            raise ValueError(
                f"{source}: no {key} (expected an `nppnet evaluate` report "
                "with parsing.mean_iou and pose.average, or keys "
                f"miou/pckh or val_miou/val_pckh; found keys "
                f"{', '.join(sorted(report)) or 'none'})"
            )
    # Undefined extras (None, NaN) are left out; the selection metrics are
    # checked, and rejected, by check_metrics.
    return check_metrics(
        {
            k: v
            for k, v in metrics.items()
            if k in SELECTION_METRICS or (_is_number(v) and math.isfinite(v))
        },
        source,
    )


def check_metrics(
    metrics: Mapping[str, Any], source: str = "metrics"
) -> dict[str, float]:
    """`metrics` as floats, after checking the selection metrics.

    Raises:
        ValueError: `val_miou` or `val_pckh` is missing, not a finite
            number, or outside [0, 100] (scores are in percent).
    """
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if not _is_number(value):
            raise ValueError(f"{source}: {key} = {value!r} is not a number")
        checked[key] = float(value)
    for key in SELECTION_METRICS:
        value = checked.get(key)
        if value is None:
            raise ValueError(f"{source}: {key} is missing")
        if not math.isfinite(value) or not 0 <= value <= 100:
            raise ValueError(
                f"{source}: {key} = {value!r} must be a finite score in "
                "[0, 100] percent"
            )
    return checked


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Registration


def registry_client(config: RunConfig):
    """An `MlflowClient` on the tracking URI of `config` (the registry lives
    in the same store unless `$MLFLOW_REGISTRY_URI` says otherwise)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(config))


def register_model(
    logger_or_run_id: MLflowLogger | NullLogger | str,
    keras_model_path: str | Path,
    saved_model_dir: str | Path,
    genotype_path: str | Path,
    metrics: Mapping[str, float],
    report_path: str | Path | None = None,
    data_fingerprint: str | None = None,
    *,
    config: RunConfig,
) -> RegistrationResult:
    """Logs a trained model into a run and registers it as a version.

    The run must be the active MLflow run of this process (as inside
    `Tracker.run`). Logs the Keras model with `mlflow.keras` (logged model
    `model`, with the SavedModel under `saved_model/` and the genotype as
    `genotype.json` in it), the metrics as run metrics, the genotype and
    the report as run artifacts; registers `models:/<model id>` as a new
    version of `config.registry.model_name` tagged `genotype_sha256`,
    `data_fingerprint`, `saved_model_fingerprint`, `saved_model_checksum`,
    `val_miou`, `val_pckh` and `run_id`; sets the candidate alias on it. If a version with
    the same SavedModel fingerprint exists, nothing is logged and no
    version is created: that version is returned (and gets the candidate
    alias if another version had it).

    Args:
        logger_or_run_id: the `MLflowLogger` of the run (or its run id).
        keras_model_path: the trained model, a `.keras` file.
        saved_model_dir: its TF SavedModel export.
        genotype_path: the genotype JSON the model was built from.
        metrics: `val_miou` and `val_pckh` in percent (see
            `selection_metrics`), plus any other scalars to log.
        report_path: the evaluation report, logged under `evaluation/`.
        data_fingerprint: `input_fingerprint` of the training data's
            manifest (see `read_data_fingerprint`); None leaves the tag out.
        config: the run config (its `registry` section).

    Returns:
        A `RegistrationResult`.

    Raises:
        ValueError: tracking is off, the run is not the active one, bad
            metrics, genotype or SavedModel fingerprint, or a model built
            from another genotype than `genotype_path`.
        FileNotFoundError: a missing model, SavedModel, genotype or report.
    """
    import mlflow
    from mlflow import MlflowClient

    registry = config.registry
    name = registry.model_name
    run_id = _active_run_id(logger_or_run_id)
    keras_model_path = Path(keras_model_path)
    if keras_model_path.suffix != ".keras" or not keras_model_path.is_file():
        raise FileNotFoundError(
            f"--model {keras_model_path}: expected an existing .keras file"
        )
    if report_path is not None and not Path(report_path).is_file():
        raise FileNotFoundError(f"report {report_path} does not exist")
    genotype = Genotype.load(genotype_path)
    metrics = check_metrics(metrics)
    fingerprint = read_saved_model_fingerprint(saved_model_dir)
    client = MlflowClient(mlflow.get_tracking_uri())

    existing = find_version(client, name, fingerprint.singleprint)
    if existing is not None:
        reason = (
            f"SavedModel {saved_model_dir} (fingerprint "
            f"{fingerprint.singleprint}) is already version "
            f"{existing.version} of {name} (run {existing.run_id}): no new "
            "version"
        )
        holder = registered_aliases(client, name).get(registry.candidate_alias)
        if holder != str(existing.version):
            client.set_registered_model_alias(
                name, registry.candidate_alias, existing.version
            )
            moved = f"from version {holder}" if holder else "(it was unset)"
            reason += f"; alias {registry.candidate_alias} moved {moved}"
        log.info("%s", reason)
        _set_run_tags(client, run_id, name, existing.version, created=False)
        return RegistrationResult(
            name,
            str(existing.version),
            False,
            reason,
            f"models:/{name}/{existing.version}",
            run_id,
        )

    log.info(
        "registering %s as a version of %s at %s",
        keras_model_path,
        name,
        mlflow.get_tracking_uri(),
    )
    keras_model = _load_keras_model(keras_model_path, genotype)
    run_logger = MLflowLogger(run_id)
    run_logger.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        genotype_file = Path(tmp) / GENOTYPE_ARTIFACT
        shutil.copyfile(genotype_path, genotype_file)
        run_logger.log_artifact(genotype_file)
        if report_path is not None:
            run_logger.log_artifact(report_path, "evaluation")
        model_info = mlflow.keras.log_model(
            keras_model,
            name=MODEL_ARTIFACT,
            pip_requirements=_pip_requirements(),
            metadata={
                TAG_GENOTYPE: genotype.fingerprint(),
                TAG_SAVED_MODEL: fingerprint.singleprint,
                "loading": "import nppnet_tf.models.nppnet before "
                "mlflow.keras.load_model (registers the NPPNet layers)",
            },
        )
        client.log_model_artifacts(
            model_info.model_id, str(saved_model_dir), SAVED_MODEL_ARTIFACT
        )
        client.log_model_artifact(model_info.model_id, str(genotype_file))

    _ensure_registered_model(client, name)
    tags = {
        TAG_GENOTYPE: genotype.fingerprint(),
        TAG_SAVED_MODEL: fingerprint.singleprint,
        TAG_SAVED_MODEL_CHECKSUM: fingerprint.checksum,
        TAG_MIOU: repr(metrics[TAG_MIOU]),
        TAG_PCKH: repr(metrics[TAG_PCKH]),
        TAG_RUN: run_id,
    }
    if data_fingerprint:
        tags[TAG_DATA] = data_fingerprint
    else:
        log.warning(
            "no data fingerprint given (--records): the version will not "
            "say which data it was trained on"
        )
    version = client.create_model_version(
        name,
        source=model_info.model_uri,
        run_id=run_id,
        tags=tags,
        description=(
            f"val mIoU {metrics[TAG_MIOU]:.2f}, val PCKh@0.5 "
            f"{metrics[TAG_PCKH]:.2f}; genotype "
            f"{genotype.fingerprint()[:12]}; data "
            f"{data_fingerprint or 'unknown'}"
        ),
        model_id=model_info.model_id,
    )
    client.set_registered_model_alias(
        name, registry.candidate_alias, version.version
    )
    _set_run_tags(client, run_id, name, version.version, created=True)
    reason = (
        f"registered version {version.version} of {name} (SavedModel "
        f"fingerprint {fingerprint.singleprint} was new); alias "
        f"{registry.candidate_alias} set"
    )
    log.info("%s", reason)
    return RegistrationResult(
        name,
        str(version.version),
        True,
        reason,
        f"models:/{name}/{version.version}",
        run_id,
    )


def find_version(client, name: str, saved_model_fingerprint: str):
    """The version of `name` tagged with this SavedModel fingerprint, or
    None (also when the registered model does not exist yet)."""
    versions = client.search_model_versions(
        f"name = '{name}' and "
        f"tags.{TAG_SAVED_MODEL} = '{saved_model_fingerprint}'"
    )
    if not versions:
        return None
    return min(versions, key=lambda v: int(v.version))


def download_model(
    model_uri: str, dst_dir: str | Path, config: RunConfig
) -> Path:
    """Downloads a registered version's artifacts.

    Args:
        model_uri: e.g. `models:/nppnet-lip@champion` or
            `models:/nppnet-lip/3`.
        dst_dir: local directory to download into.
        config: the run config (its tracking URI).

    Returns:
        The local root: `MLmodel` and `data/model.keras` (the
        `mlflow.keras` model), `saved_model/` and `genotype.json`.
    """
    import mlflow.artifacts

    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri,
            dst_path=str(dst_dir),
            tracking_uri=tracking_uri(config),
        )
    )


def _active_run_id(logger_or_run_id: MLflowLogger | NullLogger | str) -> str:
    import mlflow

    run_id = (
        logger_or_run_id
        if isinstance(logger_or_run_id, str)
        else logger_or_run_id.run_id
    )
    if not run_id:
        raise ValueError(
            "registering a model needs MLflow tracking, but tracking.enabled "
            "is false"
        )
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise ValueError(
            f"run {run_id} is not the active MLflow run "
            f"({active.info.run_id if active else 'none is active'}); call "
            "register_model inside `with Tracker(config).run(...)`"
        )
    return run_id


def _load_keras_model(path: Path, genotype: Genotype):
    """The `.keras` model, checked against the genotype when it carries one
    (an NPPNet stores its genotype in its config)."""
    import keras

    import nppnet_tf.models.nppnet  # noqa: F401  registers the NPPNet layers

    log.info("loading %s", path)
    model = keras.saving.load_model(path)
    own = getattr(model, "genotype", None)
    if (
        isinstance(own, Genotype)
        and own.fingerprint() != genotype.fingerprint()
    ):
        raise ValueError(
            f"--model {path} was built from genotype {own.fingerprint()[:12]}, "
            f"not from --genotype (sha256 {genotype.fingerprint()[:12]})"
        )
    return model


def _pip_requirements() -> list[str]:
    # Explicit requirements spare MLflow its inference, which reloads the
    # model in a subprocess (slow, and blind to the NPPNet layers).
    return [
        f"{package}=={importlib.metadata.version(package)}"
        for package in ("keras", "tensorflow")
    ]


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        RESOURCE_ALREADY_EXISTS,
        ErrorCode,
    )

    try:
        client.create_registered_model(name, description=DESCRIPTION)
        log.info("created registered model %s", name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=DESCRIPTION)


def registered_aliases(client, name: str) -> dict[str, str]:
    """`{alias: version}` of a registered model.

    Raises:
        ValueError: no registered model of that name.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        RESOURCE_DOES_NOT_EXIST,
        ErrorCode,
    )

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ValueError(
            f"registry.model_name {name!r}: no such registered model at "
            f"{client.tracking_uri} (run `nppnet register` first)"
        ) from None
    return {alias: str(version) for alias, version in model.aliases.items()}


def _set_run_tags(
    client, run_id: str, name: str, version: Any, created: bool
) -> None:
    client.set_tag(run_id, "registry.model_version", f"{name}/{version}")
    client.set_tag(run_id, "registry.created", str(created).lower())
