"""Input fingerprints and the preprocessing manifest (`<out>/manifest.json`).

The fingerprint is a sha256 over the sorted `(relative path, size, sha256
of the content)` of every input file, so a re-run on unchanged input with
the same configuration can be recognised and skipped.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from apache_beam.io.filesystems import FileSystems
from tqdm import tqdm

from beam_jobs.lip_index import layout_paths, list_files, read_bytes

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def input_files(
    lip_root: str,
    splits: Sequence[str],
    annotation_json: dict[str, str] | None = None,
) -> list[str]:
    """Every file the job reads for `splits` (sorted, no duplicates)."""
    files: set[str] = set()
    annotation_json = annotation_json or {}
    for split in splits:
        paths = layout_paths(lip_root, split)
        files.add(paths["id_file"])
        files.update(list_files(paths["image_dir"]))
        if "label_dir" in paths:
            files.update(list_files(paths["label_dir"]))
            files.add(annotation_json.get(split) or paths["pose_csv"])
    return sorted(files)


def _file_digest(path: str) -> tuple[int, str]:
    data = read_bytes(path)
    return len(data), hashlib.sha256(data).hexdigest()


def fingerprint(
    lip_root: str, files: Sequence[str], workers: int = 4, progress: bool = True
) -> str:
    """sha256 over the sorted (relative path, size, content sha256) triples.

    Args:
        lip_root: paths are made relative to it (files outside it, e.g. an
            annotation JSON elsewhere, keep their full path).
        files: the input files.
        workers: threads reading files.
        progress: show a tqdm bar.
    """
    root = lip_root.rstrip("/") + "/"
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        digests = list(
            tqdm(
                pool.map(_file_digest, files),
                total=len(files),
                desc="fingerprint inputs",
                unit="file",
                disable=not progress,
                leave=False,
            )
        )
    entries = sorted(
        (path[len(root) :] if path.startswith(root) else path, size, digest)
        for path, (size, digest) in zip(files, digests)
    )
    total = hashlib.sha256()
    for relative, size, digest in entries:
        total.update(f"{relative}\0{size}\0{digest}\n".encode())
    return total.hexdigest()


def manifest_path(out_dir: str) -> str:
    return FileSystems.join(out_dir, MANIFEST_NAME)


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    """The manifest in `out_dir`, or None if there is none (or it is not
    JSON, e.g. left by an interrupted write)."""
    path = manifest_path(out_dir)
    if not FileSystems.exists(path):
        return None
    try:
        return json.loads(read_bytes(path).decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("ignoring unreadable manifest %s", path)
        return None


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> str:
    """Writes `manifest.json` (sorted keys, indented); returns its path."""
    path = manifest_path(out_dir)
    with FileSystems.create(path) as handle:
        handle.write(
            json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
        )
    return path
