"""Readers and writers of LIP's own release files (no TensorFlow, no Beam).

The release layout (what `nppnet data synth` writes and the real LIP has):

```
<root>/TrainVal_images/train_images/<id>.jpg
<root>/TrainVal_images/val_images/<id>.jpg
<root>/TrainVal_images/train_id.txt            one id per line, no extension
<root>/TrainVal_images/val_id.txt
<root>/TrainVal_parsing_annotations/train_segmentations/<id>.png
<root>/TrainVal_parsing_annotations/val_segmentations/<id>.png
<root>/TrainVal_pose_annotations/lip_train_set.csv
<root>/TrainVal_pose_annotations/lip_val_set.csv
<root>/Testing_images/testing_images/<id>.jpg  (optional, no labels)
<root>/Testing_images/test_id.txt              (optional)
```

Pose CSV rows (reference 8.3): no header; image file name, then 16 triples
`x,y,flag` in LIP joint order (49 fields); a missing joint is `nan,nan,nan`;
the last row may lack a trailing newline. Prediction CSVs (LIP challenge
format): image name (no extension) then 16 `x,y` pairs in LIP order.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from nppnet_tf.lip import NUM_JOINTS

SPLITS = ("train", "val")

POSE_FIELDS = 1 + 3 * NUM_JOINTS  # 49
PREDICTION_FIELDS = 1 + 2 * NUM_JOINTS  # 33


class AnnotationError(ValueError):
    """An annotation row or file cannot be read; the message says why.

    Args:
        message: what is wrong, naming the value.
        reason: a short stable code for dead-letter outputs and counters,
            e.g. `"field_count"`, `"non_numeric"`.
        image_id: the image the row or record belongs to, when it could be
            read; None when even the image name is unusable.
    """

    def __init__(
        self,
        message: str,
        reason: str = "malformed",
        image_id: str | None = None,
    ):
        super().__init__(message)
        self.reason = reason
        self.image_id = image_id


@dataclasses.dataclass(frozen=True)
class LIPLayout:
    """Paths of one LIP release folder."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def image_dir(self, split: str) -> Path:
        if split == "test":
            return self.root / "Testing_images" / "testing_images"
        _check_split(split)
        return self.root / "TrainVal_images" / f"{split}_images"

    def id_file(self, split: str) -> Path:
        if split == "test":
            return self.root / "Testing_images" / "test_id.txt"
        _check_split(split)
        return self.root / "TrainVal_images" / f"{split}_id.txt"

    def label_dir(self, split: str) -> Path:
        _check_split(split)
        return (
            self.root
            / "TrainVal_parsing_annotations"
            / f"{split}_segmentations"
        )

    def pose_csv(self, split: str) -> Path:
        _check_split(split)
        return self.root / "TrainVal_pose_annotations" / f"lip_{split}_set.csv"

    def image_path(self, split: str, image_id: str) -> Path:
        return self.image_dir(split) / f"{image_id}.jpg"

    def label_path(self, split: str, image_id: str) -> Path:
        return self.label_dir(split) / f"{image_id}.png"

    def check(self, splits: Sequence[str] = SPLITS) -> None:
        """Raises FileNotFoundError naming the first missing part of the layout."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"LIP root {self.root} is not a directory")
        for split in splits:
            for path in (self.image_dir(split), self.id_file(split)):
                if not path.exists():
                    raise FileNotFoundError(
                        f"LIP root {self.root}: missing {path.relative_to(self.root)} "
                        f"(expected the LIP release layout, see nppnet_tf/data/lip_files.py)"
                    )
            if split != "test":
                for path in (self.label_dir(split), self.pose_csv(split)):
                    if not path.exists():
                        raise FileNotFoundError(
                            f"LIP root {self.root}: missing {path.relative_to(self.root)}"
                        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def read_id_list(path: str | Path) -> list[str]:
    """Ids of an `<split>_id.txt` file, in file order (blank lines skipped)."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def image_id_of(name: str) -> str:
    """`"100034_483681.jpg"` -> `"100034_483681"` (any extension)."""
    name = name.strip()
    stem, dot, ext = name.rpartition(".")
    if dot and ext.lower() in ("jpg", "jpeg", "png"):
        return stem
    return name


@dataclasses.dataclass(frozen=True)
class PoseAnnotation:
    """One image's joints in LIP order.

    Attributes:
        image_id: the image id (file name without extension).
        joints: `(16, 3)` float array of x, y, flag in original pixels; a
            missing joint is all NaN.
    """

    image_id: str
    joints: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """`(16,)` bool: joint annotated (x and y finite)."""
        return np.isfinite(self.joints[:, 0]) & np.isfinite(self.joints[:, 1])


def _number(text: str, what: str, image_id: str | None = None) -> float:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(
            f"{what}: non-numeric value {text!r}", "non_numeric", image_id
        ) from None
    if math.isinf(value):
        raise AnnotationError(
            f"{what}: infinite value {text!r}", "non_numeric", image_id
        )
    return value


def parse_pose_row(line: str) -> PoseAnnotation:
    """Parses one pose CSV row (49 fields).

    Raises:
        AnnotationError: wrong number of fields, an empty name, a non-numeric
            value, or a joint with only one of x, y given.
    """
    fields = line.rstrip("\r\n").split(",")
    name = fields[0].strip()
    image_id = image_id_of(name) if name else None
    if len(fields) != POSE_FIELDS:
        raise AnnotationError(
            f"pose row has {len(fields)} fields, expected {POSE_FIELDS} "
            f"(name + 16 x,y,flag): {line[:60]!r}",
            "field_count",
            image_id,
        )
    if not image_id:
        raise AnnotationError("pose row has an empty image name", "empty_name")
    values = np.array(
        [
            _number(f, f"{image_id} field {i + 1}", image_id)
            for i, f in enumerate(fields[1:])
        ],
        dtype=np.float64,
    ).reshape(NUM_JOINTS, 3)
    partial = np.isnan(values[:, 0]) != np.isnan(values[:, 1])
    if partial.any():
        joint = int(np.flatnonzero(partial)[0])
        raise AnnotationError(
            f"{image_id}: joint {joint} has only one of x, y",
            "partial_joint",
            image_id,
        )
    return PoseAnnotation(image_id=image_id, joints=values)


def iter_pose_lines(
    lines: Iterable[str],
) -> Iterator[tuple[int, str, PoseAnnotation | AnnotationError]]:
    """Yields `(line_number, raw_line, annotation or error)` for every
    non-blank line of pose CSV text (numbering from 1, blank lines counted)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, line, parse_pose_row(line)
        except AnnotationError as err:
            yield number, line, err


def iter_pose_csv(
    path: str | Path,
) -> Iterator[tuple[int, str, PoseAnnotation | AnnotationError]]:
    """Yields `(line_number, raw_line, annotation or error)` for every
    non-blank line, so that callers can route bad rows instead of stopping."""
    with open(path, newline="") as handle:
        yield from iter_pose_lines(handle)


def read_pose_csv(
    path: str | Path, strict: bool = True
) -> dict[str, PoseAnnotation]:
    """Reads a whole pose CSV into `{image_id: PoseAnnotation}`.

    Args:
        path: the CSV file.
        strict: raise on the first bad row (naming file and line); when
            False, bad rows are skipped.

    Raises:
        AnnotationError: a bad row (strict) or a duplicate image id.
    """
    out: dict[str, PoseAnnotation] = {}
    for number, _, item in iter_pose_csv(path):
        if isinstance(item, AnnotationError):
            if strict:
                raise AnnotationError(
                    f"{path}:{number}: {item}", item.reason, item.image_id
                ) from None
            continue
        if item.image_id in out:
            raise AnnotationError(
                f"{path}:{number}: duplicate image {item.image_id!r}",
                "duplicate_id",
                item.image_id,
            )
        out[item.image_id] = item
    return out


def format_pose_row(
    image_id: str, joints_lip: np.ndarray, extension: str = ".jpg"
) -> str:
    """One pose CSV row (without newline): missing joints as `nan,nan,nan`."""
    joints_lip = np.asarray(joints_lip, dtype=np.float64)
    if joints_lip.shape != (NUM_JOINTS, 3):
        raise ValueError(
            f"joints must have shape (16, 3), got {joints_lip.shape}"
        )
    fields = [f"{image_id}{extension}"]
    for x, y, flag in joints_lip:
        if not (np.isfinite(x) and np.isfinite(y)):
            fields += ["nan", "nan", "nan"]
        else:
            fields += [str(int(round(x))), str(int(round(y))), str(int(flag))]
    return ",".join(fields)


def write_pose_csv(
    path: str | Path, rows: Iterable[tuple[str, np.ndarray]]
) -> None:
    """Writes `(image_id, (16, 3) joints)` rows; like the real files, the last
    row has no trailing newline."""
    lines = [format_pose_row(image_id, joints) for image_id, joints in rows]
    Path(path).write_text("\n".join(lines))


def format_prediction_row(image_id: str, joints_lip_xy: np.ndarray) -> str:
    """A prediction CSV row: name without extension, 16 integer x,y pairs."""
    joints = np.asarray(joints_lip_xy, dtype=np.float64)
    if joints.shape[0] != NUM_JOINTS or joints.shape[1] < 2:
        raise ValueError(f"joints must have shape (16, 2+), got {joints.shape}")
    fields = [image_id]
    for x, y in joints[:, :2]:
        fields += [
            str(int(x)) if np.isfinite(x) else "nan",
            str(int(y)) if np.isfinite(y) else "nan",
        ]
    return ",".join(fields)


def parse_prediction_row(line: str) -> tuple[str, np.ndarray]:
    """Parses a 33-field prediction row into `(image_id, (16, 2) xy)`.

    Raises:
        AnnotationError: wrong field count or a non-numeric value.
    """
    fields = line.rstrip("\r\n").split(",")
    if len(fields) != PREDICTION_FIELDS:
        raise AnnotationError(
            f"prediction row has {len(fields)} fields, expected {PREDICTION_FIELDS} "
            f"(name + 16 x,y): {line[:60]!r}"
        )
    image_id = image_id_of(fields[0])
    if not image_id:
        raise AnnotationError("prediction row has an empty image name")
    xy = np.array(
        [
            _number(f, f"{image_id} field {i + 1}")
            for i, f in enumerate(fields[1:])
        ],
        dtype=np.float64,
    ).reshape(NUM_JOINTS, 2)
    return image_id, xy


@dataclasses.dataclass(frozen=True)
class JsonAnnotation:
    """One record of the authors' annotation JSON (reference 8.2).

    Attributes:
        image_id: from `im_name` without extension.
        joints: `(16, 3)` x, y, flag in LIP order; joints with x + y == 0
            (the authors' "missing" convention) are converted to NaN.
        center: `objpos` (x, y) or None.
        scale: `scale_provided` or None.
    """

    image_id: str
    joints: np.ndarray
    center: tuple[float, float] | None
    scale: float | None


def parse_json_record(record: dict) -> JsonAnnotation:
    """Parses one element of the JSON's `root` list.

    Raises:
        AnnotationError: a missing `im_name`/`joint_self` or malformed values.
    """
    if not isinstance(record, dict) or "im_name" not in record:
        raise AnnotationError(
            f"JSON record without im_name: {str(record)[:60]!r}", "empty_name"
        )
    image_id = image_id_of(str(record["im_name"]))
    if not image_id:
        raise AnnotationError("JSON record with an empty im_name", "empty_name")
    if "joint_self" not in record:
        raise AnnotationError(
            f"{image_id}: JSON record without joint_self",
            "field_count",
            image_id,
        )
    try:
        joints = np.array(record["joint_self"], dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(
            f"{image_id}: joint_self is not numeric", "non_numeric", image_id
        ) from None
    if joints.shape != (NUM_JOINTS, 3):
        raise AnnotationError(
            f"{image_id}: joint_self has shape {joints.shape}, expected (16, 3)",
            "field_count",
            image_id,
        )
    if not np.isfinite(joints).all():
        raise AnnotationError(
            f"{image_id}: joint_self has a non-finite value",
            "non_numeric",
            image_id,
        )
    missing = (joints[:, 0] + joints[:, 1]) == 0
    joints[missing, :] = np.nan
    center = None
    if "objpos" in record and record["objpos"] is not None:
        try:
            cx, cy = (float(v) for v in record["objpos"])
        except (TypeError, ValueError):
            raise AnnotationError(
                f"{image_id}: objpos is not two numbers",
                "non_numeric",
                image_id,
            ) from None
        center = (cx, cy)
    scale = record.get("scale_provided")
    try:
        scale = float(scale) if scale is not None else None
    except (TypeError, ValueError):
        raise AnnotationError(
            f"{image_id}: scale_provided is not a number",
            "non_numeric",
            image_id,
        ) from None
    return JsonAnnotation(
        image_id=image_id, joints=joints, center=center, scale=scale
    )


def read_annotation_json(
    path: str | Path,
) -> list[JsonAnnotation | AnnotationError]:
    """All records of an authors' annotation JSON; bad records come back as
    `AnnotationError` values so that callers can route them.

    Raises:
        AnnotationError: the file is not JSON or has no `root` list.
    """
    return parse_annotation_json(Path(path).read_text(), source=str(path))


def parse_annotation_json(
    text: str, source: str = "<json>"
) -> list[JsonAnnotation | AnnotationError]:
    """Like `read_annotation_json`, on the file's text; `source` names the
    file in errors.

    Raises:
        AnnotationError: the text is not JSON or has no `root` list.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{source}: not JSON ({err})", "not_json"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("root"), list):
        raise AnnotationError(
            f"{source}: expected an object with a 'root' list", "not_json"
        )
    out: list[JsonAnnotation | AnnotationError] = []
    for record in data["root"]:
        try:
            out.append(parse_json_record(record))
        except AnnotationError as err:
            out.append(err)
    return out
