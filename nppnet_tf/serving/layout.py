"""The export base's layout: versions, model server configs, metadata.

```
EXPORT_BASE/
  models.config                 ModelServerConfig, base_path = absolute path
  models.docker.config          the same with base_path /models/<name>
  <model_name>/                 the model's base path (the server's view)
    <version>/                  integer versions; the server serves the latest
      saved_model.pb, variables/
      assets.extra/
        tf_serving_warmup_requests
        model.keras
        export_metadata.json
```

`export.py` writes it; `check.py`, `predictor.py` and the commands find a
version (`find_version_dir`) and read its metadata (`read_metadata`) here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

MODEL_NAME = "nppnet"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
KERAS_MODEL_FILE = "model.keras"
METADATA_FILE = "export_metadata.json"
MODELS_CONFIG_FILE = "models.config"
DOCKER_MODELS_CONFIG_FILE = "models.docker.config"
DOCKER_MODELS_ROOT = "/models"  # where docs/serving.md mounts EXPORT_BASE
_MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_name(model_name: str) -> str:
    """Returns the name if it is a valid served-model name.

    Raises:
        ValueError: empty, or characters other than letters, digits, `_`,
            `.`, `-` (it becomes a directory and a URL path segment).
    """
    if not isinstance(model_name, str) or not _MODEL_NAME_PATTERN.match(
        model_name
    ):
        raise ValueError(
            f"model name must be letters, digits, '_', '.' or '-' (starting "
            f"with a letter or digit), got {model_name!r}"
        )
    return model_name


def model_versions(model_dir: str | Path) -> list[int]:
    """Sorted integer versions (numeric subdirectories) of a model base
    path; [] if it does not exist."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if child.is_dir() and child.name.isdigit()
    )


def next_version(model_dir: str | Path) -> int:
    """One more than the largest existing version, 1 for the first."""
    versions = model_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def models_config_text(model_name: str, base_path: str) -> str:
    """A text-format `ModelServerConfig` serving one model.

    The model server serves the latest version under `base_path` (its
    default version policy) and loads new versions as they appear.
    """
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = check_model_name(model_name)
    model.base_path = base_path
    model.model_platform = "tensorflow"
    return text_format.MessageToString(config)


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as stream:
        stream.write(text)
    os.chmod(stream.name, 0o644)  # the model server may run as another user
    os.replace(stream.name, path)


def write_models_config(
    export_base: str | Path, model_name: str = MODEL_NAME
) -> tuple[Path, Path]:
    """Writes `models.config` (absolute base path, for a model server on
    this machine) and `models.docker.config` (base path
    `/models/<model_name>`, for the docker image with `EXPORT_BASE` mounted
    at `/models`).

    Returns:
        The two paths.
    """
    export_base = Path(export_base).resolve()
    local = export_base / MODELS_CONFIG_FILE
    docker = export_base / DOCKER_MODELS_CONFIG_FILE
    _write_atomically(
        local, models_config_text(model_name, str(export_base / model_name))
    )
    _write_atomically(
        docker,
        models_config_text(model_name, f"{DOCKER_MODELS_ROOT}/{model_name}"),
    )
    return local, docker


def find_version_dir(
    path: str | Path, model_name: str = MODEL_NAME, version: int | None = None
) -> Path:
    """The SavedModel directory a path names.

    Args:
        path: an export base (`EXPORT_BASE`), a model base path
            (`EXPORT_BASE/<model_name>`) or a version directory.
        model_name: the model's subdirectory of an export base.
        version: pick this version; None picks the latest.

    Returns:
        The version directory (holding `saved_model.pb`).

    Raises:
        FileNotFoundError: no SavedModel there, or not that version.
    """
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        if version is not None and path.name != str(version):
            raise FileNotFoundError(
                f"{path} is version {path.name}, not {version}"
            )
        return path
    model_dir = path / model_name if (path / model_name).is_dir() else path
    versions = model_versions(model_dir)
    if not versions:
        raise FileNotFoundError(
            f"no SavedModel at {path}: expected saved_model.pb, "
            f"integer version directories, or {model_name}/<version>/"
        )
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise FileNotFoundError(
            f"version {chosen} not found under {model_dir} (versions "
            f"{versions})"
        )
    version_dir = model_dir / str(chosen)
    if not (version_dir / "saved_model.pb").is_file():
        raise FileNotFoundError(f"{version_dir} has no saved_model.pb")
    return version_dir


def read_metadata(version_dir: str | Path) -> dict[str, Any]:
    """`assets.extra/export_metadata.json` of a version directory.

    Raises:
        FileNotFoundError: no metadata (not written by `export_model`).
        ValueError: not a JSON object.
    """
    path = Path(version_dir) / ASSETS_EXTRA / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: not an export of `nppnet export`"
        )
    metadata = json.loads(path.read_text())
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return metadata
