"""The input records of a LIP release folder, and how they are joined.

An *input record* is one image id: the union, per id, of its entries in the
split's id list, image folder, label folder and annotation file (pose CSV,
or the authors' JSON when one is given for the split); plus every
annotation row or record whose image name cannot be read at all. Each
input record ends up in exactly one output: an example, or one dead letter
that names its stage and reason.

Reading uses Beam's `FileSystems`, so `lip_root` may be a local folder or a
remote one (gs://, s3://, ...) that the runner can reach.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.lip_examples import LIPRow
from nppnet_tf.data.lip_files import (
    AnnotationError,
    JsonAnnotation,
    LIPLayout,
    PoseAnnotation,
    image_id_of,
    iter_pose_lines,
    parse_annotation_json,
)

ANNOTATED_SPLITS = ("train", "val")

# Source kinds, in the order a row needs them.
ID_ENTRY = "id"
IMAGE = "image"
LABEL = "label"
POSE = "pose"  # a CSV row or a JSON record


@dataclasses.dataclass(frozen=True)
class Source:
    """One piece of an input record.

    Attributes:
        kind: `"id"`, `"image"`, `"label"` or `"pose"`.
        split: the release split the piece belongs to.
        where: file path, or `path:line` for a CSV row, `path#index` for a
            JSON record.
        payload: for `"pose"`, the parsed annotation or its AnnotationError.
    """

    kind: str
    split: str
    where: str
    payload: Any = None


def dead_letter(
    image_id: str | None,
    split: str | None,
    stage: str,
    reason: str,
    message: str,
    sources: Sequence[str] = (),
) -> dict:
    """The one JSON-able dict shape of every dead-letter entry."""
    return {
        "image_id": image_id,
        "split": split,
        "stage": stage,
        "reason": reason,
        "message": message,
        "sources": list(sources),
    }


def layout_paths(lip_root: str, split: str) -> dict[str, str]:
    """Paths (as strings, FileSystems-joined) of one split's inputs, from
    `LIPLayout`'s relative layout."""
    layout = LIPLayout(".")

    def join(path) -> str:
        relative = str(path.relative_to(layout.root))
        return FileSystems.join(lip_root, *relative.split("/"))

    paths = {
        "id_file": join(layout.id_file(split)),
        "image_dir": join(layout.image_dir(split)),
    }
    if split in ANNOTATED_SPLITS:
        paths["label_dir"] = join(layout.label_dir(split))
        paths["pose_csv"] = join(layout.pose_csv(split))
    return paths


def list_files(directory: str) -> list[str]:
    """Every file directly in `directory` (sorted); [] if it has none."""
    pattern = FileSystems.join(directory, "*")
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def read_text(path: str) -> str:
    with FileSystems.open(path) as handle:
        return io.TextIOWrapper(handle, encoding="utf-8", newline="").read()


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def split_sources(
    lip_root: str, split: str, annotation_json: str | None = None
) -> Iterator[tuple[str | None, Source]]:
    """Yields `(image_id or None, Source)` for every piece of one split.

    Args:
        lip_root: the LIP release folder.
        split: "train", "val" or "test".
        annotation_json: the authors' JSON for this split; when given it
            replaces the split's pose CSV as the joint source.
    """
    paths = layout_paths(lip_root, split)
    for number, line in enumerate(
        read_text(paths["id_file"]).splitlines(), start=1
    ):
        if line.strip():
            where = f"{paths['id_file']}:{number}"
            yield image_id_of(line), Source(ID_ENTRY, split, where)
    for path in list_files(paths["image_dir"]):
        yield image_id_of(path.rsplit("/", 1)[-1]), Source(IMAGE, split, path)
    if split not in ANNOTATED_SPLITS:
        return
    for path in list_files(paths["label_dir"]):
        yield image_id_of(path.rsplit("/", 1)[-1]), Source(LABEL, split, path)
    if annotation_json:
        records = parse_annotation_json(
            read_text(annotation_json), annotation_json
        )
        for index, record in enumerate(records):
            where = f"{annotation_json}#{index}"
            yield record.image_id, Source(POSE, split, where, record)
    else:
        csv_path = paths["pose_csv"]
        lines = io.StringIO(read_text(csv_path))
        for number, _, row in iter_pose_lines(lines):
            yield row.image_id, Source(POSE, split, f"{csv_path}:{number}", row)


def unkeyed_dead_letter(source: Source) -> dict:
    """Dead letter of a piece without a usable image id (a CSV row or JSON
    record whose name cannot be read)."""
    error = source.payload
    reason = (
        error.reason if isinstance(error, AnnotationError) else "unreadable"
    )
    return dead_letter(
        None, source.split, "parse_pose", reason, str(error), [source.where]
    )


def join_sources(image_id: str, sources: Iterable[Source]) -> LIPRow | dict:
    """Joins the pieces of one image id into a `LIPRow`, or returns the
    dead letter saying why they cannot become an example.

    Stage `read_index`: `duplicate_id` (the id in several splits, or twice
    in one id list or annotation file), `missing_image`, `not_in_id_list`,
    `missing_label`, `missing_annotation`. Stage `parse_pose`: the
    annotation row's own error reason.
    """
    sources = sorted(sources, key=lambda s: (s.kind, s.where))
    where = [s.where for s in sources]
    splits = sorted({s.split for s in sources})
    split = splits[0]
    if len(splits) > 1:
        return dead_letter(
            image_id, "+".join(splits), "read_index", "duplicate_id",
            f"id appears in splits {', '.join(splits)}", where,
        )  # fmt: skip
    by_kind: Mapping[str, list[Source]] = collections.defaultdict(list)
    for source in sources:
        by_kind[source.kind].append(source)
    for kind in (ID_ENTRY, POSE, IMAGE, LABEL):
        if len(by_kind[kind]) > 1:
            return dead_letter(
                image_id, split, "read_index", "duplicate_id",
                f"{len(by_kind[kind])} {kind} entries for one id", where,
            )  # fmt: skip
    pose = by_kind[POSE][0].payload if by_kind[POSE] else None
    if isinstance(pose, AnnotationError):
        return dead_letter(
            image_id, split, "parse_pose", pose.reason, str(pose), where
        )
    if not by_kind[IMAGE]:
        return dead_letter(
            image_id,
            split,
            "read_index",
            "missing_image",
            "no image file",
            where,
        )
    if not by_kind[ID_ENTRY]:
        return dead_letter(
            image_id, split, "read_index", "not_in_id_list",
            f"image is not listed in the {split} id list", where,
        )  # fmt: skip
    image_path = by_kind[IMAGE][0].where
    if split not in ANNOTATED_SPLITS:
        return LIPRow(
            image_id=image_id,
            split=split,
            image_path=image_path,
            sources=tuple(where),
        )
    if not by_kind[LABEL]:
        return dead_letter(
            image_id,
            split,
            "read_index",
            "missing_label",
            "no parsing label file",
            where,
        )
    if pose is None:
        return dead_letter(
            image_id, split, "read_index", "missing_annotation",
            "no pose annotation row", where,
        )  # fmt: skip
    center = scale = None
    if isinstance(pose, JsonAnnotation):
        center, scale = pose.center, pose.scale
    assert isinstance(pose, (PoseAnnotation, JsonAnnotation))
    return LIPRow(
        image_id=image_id,
        split=split,
        image_path=image_path,
        label_path=by_kind[LABEL][0].where,
        joints=pose.joints,
        center=center,
        scale=scale,
        sources=tuple(where),
    )
