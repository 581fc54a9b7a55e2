"""Export for TF Serving: a versioned SavedModel with its pre/postprocessing.

Reads a Keras NPPNet (`.keras`); writes, under an export base directory
(layout in `serving/layout.py`), `<model_name>/<version>/`: the SavedModel
(tag `serve`; signatures `serving_default` on encoded images and
`dense_maps` on float batches, `serving/module.py`), and in its
`assets.extra/` the warmup requests the model server replays, a copy of
the source Keras model and `export_metadata.json`; then (re)writes
`models.config` and `models.docker.config` for the model server.
docs/serving.md describes the signatures and how to serve them.

A new export takes the next integer version (or `version=`), is written
to a hidden temporary directory beside the versions (the model server
ignores names that are not integers) and renamed into place in one step,
so the server never sees a half-written version; an existing version is
never overwritten.

    from nppnet_tf.export import export_checkpoint
    export_checkpoint("runs/lip/model.keras", "runs/lip/export")
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import logging
import os
import pkgutil
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from nppnet_tf.lip import CLASS_NAMES, MODEL_JOINT_NAMES, MODEL_TO_LIP
from nppnet_tf.serving import protocol
from nppnet_tf.serving.layout import (
    ASSETS_EXTRA,
    KERAS_MODEL_FILE,
    METADATA_FILE,
    MODEL_NAME,
    WARMUP_FILE,
    check_model_name,
    next_version,
    write_models_config,
)
from nppnet_tf.serving.module import (
    SIGNATURE_INPUTS,
    SIGNATURE_OUTPUTS,
    ServingModule,
)
from nppnet_tf.serving.samples import sample_images

log = logging.getLogger(__name__)

_TEMPORARY_PREFIX = ".export-"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote.

    Attributes:
        export_base: the export base directory.
        version: the integer version.
        version_dir: `export_base/<model_name>/<version>`, the SavedModel.
        models_config: `export_base/models.config`.
        metadata: the contents of `export_metadata.json`.
    """

    export_base: Path
    version: int
    version_dir: Path
    models_config: Path
    metadata: dict[str, Any]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """The `.keras` file a checkpoint argument names.

    Args:
        path: a `.keras` file, or a directory holding `model.keras` (the
            training loop's output).

    Returns:
        The `.keras` file.

    Raises:
        FileNotFoundError: nothing there, or a directory without
            `model.keras`.
        ValueError: a file that is not `.keras`.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / KERAS_MODEL_FILE
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.keras"))
            raise FileNotFoundError(
                f"checkpoint directory {path} has no {KERAS_MODEL_FILE}"
                + (f" (it has {found})" if found else "")
            )
        return candidate
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".keras":
        raise ValueError(
            f"checkpoint must be a .keras model file (keras.saving format) "
            f"or a directory holding {KERAS_MODEL_FILE}, got {path}"
        )
    return path


def load_keras_model(path: str | Path) -> keras.Model:
    """`keras.saving.load_model` after importing `nppnet_tf.models.*`, whose
    classes register themselves as serialisable.

    Raises:
        FileNotFoundError, ValueError: see `resolve_checkpoint`.
    """
    path = resolve_checkpoint(path)
    import nppnet_tf.models

    for module in pkgutil.iter_modules(nppnet_tf.models.__path__):
        importlib.import_module(f"nppnet_tf.models.{module.name}")
    log.info("loading Keras model %s", path)
    return keras.saving.load_model(path)


def model_input_size(model: keras.Model) -> int | None:
    """The square input side the model was built with, if it was built on
    a static square shape (Keras stores it in the `.keras` file)."""
    build_config = model.get_build_config() or {}
    shape = build_config.get("input_shape")
    if isinstance(shape, list | tuple) and len(shape) == 4:
        height, width = shape[1], shape[2]
        if isinstance(height, int) and height == width:
            return height
    return None


def _genotype_fingerprint(model: keras.Model) -> str | None:
    genotype = getattr(model, "genotype", None)
    fingerprint = getattr(genotype, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def _metadata(
    model: keras.Model,
    model_name: str,
    version: int,
    image_size: int,
    flip: bool,
    source: Path | None,
    keras_sha256: str,
) -> dict[str, Any]:
    config = model.get_config()
    return {
        "model_name": model_name,
        "version": version,
        "created": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "source": None if source is None else str(source.resolve()),
        "keras_model": f"{ASSETS_EXTRA}/{KERAS_MODEL_FILE}",
        "keras_model_sha256": keras_sha256,
        "model_class": type(model).__name__,
        "init_channels": config.get("init_channels"),
        "num_cells": config.get("num_cells"),
        "genotype_fingerprint": _genotype_fingerprint(model),
        "image_size": image_size,
        "flip": flip,
        "signatures": {
            name: {"input": SIGNATURE_INPUTS[name], "outputs": list(outputs)}
            for name, outputs in SIGNATURE_OUTPUTS.items()
        },
        "keypoint_order": "model",
        "model_joint_names": list(MODEL_JOINT_NAMES),
        "model_to_lip": list(MODEL_TO_LIP),
        "class_names": list(CLASS_NAMES),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }


def export_model(
    model: keras.Model,
    export_base: str | Path,
    image_size: int,
    flip: bool = True,
    model_name: str = MODEL_NAME,
    version: int | None = None,
    source: str | Path | None = None,
) -> ExportResult:
    """Exports a Keras NPPNet as a new version for TF Serving.

    Args:
        model: returns a dict with stage-2 `pose` and `parsing` (NPPNet).
        export_base: the export base directory (created if needed).
        image_size: side S of the network input, a multiple of 32.
        flip: flip test inside `serving_default`.
        model_name: the served model's name and subdirectory.
        version: the version to write; None takes the next one.
        source: the `.keras` file the model was loaded from, copied into
            the export; None saves `model` there instead.

    Returns:
        An `ExportResult`.

    Raises:
        FileExistsError: the version already exists.
        ValueError: a bad model name, version or image size.
        TypeError: model is not a Keras model.
    """
    check_model_name(model_name)
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version < 1
    ):
        raise ValueError(f"version must be an int >= 1, got {version!r}")
    module = ServingModule(model, image_size, flip)
    export_base = Path(export_base).resolve()
    model_dir = export_base / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else version
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise FileExistsError(
            f"version {version} of {model_name!r} already exists at "
            f"{version_dir}; exports never overwrite a version"
        )
    log.info(
        "exporting %s (S=%d, flip %s) to %s",
        type(model).__name__,
        image_size,
        "on" if flip else "off",
        version_dir,
    )
    staging = Path(
        tempfile.mkdtemp(prefix=f"{_TEMPORARY_PREFIX}{version}-", dir=model_dir)
    )
    try:
        tf.saved_model.save(
            module,
            str(staging),
            signatures=module.signatures(),
            options=tf.saved_model.SaveOptions(
                experimental_custom_gradients=False
            ),
        )
        extra = staging / ASSETS_EXTRA
        extra.mkdir()
        protocol.write_warmup(
            extra / WARMUP_FILE,
            protocol.warmup_logs(model_name, sample_images(), image_size),
        )
        keras_path = extra / KERAS_MODEL_FILE
        if source is not None:
            shutil.copyfile(resolve_checkpoint(source), keras_path)
        else:
            model.save(keras_path)
        metadata = _metadata(
            model,
            model_name,
            version,
            image_size,
            module.flip,
            None if source is None else Path(source),
            file_sha256(keras_path),
        )
        (extra / METADATA_FILE).write_text(
            json.dumps(metadata, indent=2, sort_keys=True) + "\n"
        )
        staging.chmod(0o755)  # mkdtemp makes it private to this user
        try:
            # rename() would replace an empty directory of the same name.
            if version_dir.exists():
                raise FileExistsError(version_dir)
            os.rename(staging, version_dir)
        except OSError as err:
            raise FileExistsError(
                f"version {version} of {model_name!r} appeared at "
                f"{version_dir} while exporting; nothing was overwritten"
            ) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    models_config, _ = write_models_config(export_base, model_name)
    log.info("exported version %d to %s", version, version_dir)
    return ExportResult(
        export_base, version, version_dir, models_config, metadata
    )


def export_checkpoint(
    checkpoint: str | Path,
    export_base: str | Path,
    image_size: int | None = None,
    flip: bool = True,
    model_name: str = MODEL_NAME,
    version: int | None = None,
) -> ExportResult:
    """`export_model` on a saved `.keras` model (copied into the export).

    Args:
        checkpoint: a `.keras` file or a directory holding `model.keras`.
        export_base: the export base directory.
        image_size: side S; None uses the square input shape the model was
            built with.
        flip, model_name, version: as `export_model`.

    Returns:
        An `ExportResult`.

    Raises:
        ValueError: no image_size given and none stored in the model.
        FileNotFoundError, FileExistsError: see `resolve_checkpoint`,
            `export_model`.
    """
    source = resolve_checkpoint(checkpoint)
    model = load_keras_model(source)
    if image_size is None:
        image_size = model_input_size(model)
        if image_size is None:
            raise ValueError(
                f"{source} does not record a square input size "
                f"(build config {model.get_build_config()}); give image_size"
            )
    return export_model(
        model, export_base, image_size, flip, model_name, version, source
    )
