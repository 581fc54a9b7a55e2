"""Tiny LIP release folders for tests, good and bad on purpose.

`LIPFixture` writes images, label maps, id lists and pose CSV rows in the
release layout (`nppnet_tf/data/lip_files.py`), with one method per kind of
bad input so that a test can name exactly what it broke.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from nppnet_tf.data.lip_files import LIPLayout, format_pose_row
from nppnet_tf.lip import NUM_JOINTS


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class LIPFixture:
    """Builds a LIP release folder under `root`.

    Call `add` (and the `bad_*` methods) for each image, then `write()` to
    write the id lists and pose CSVs. `input_records` counts the image ids
    (plus unkeyed rows) the job must account for.
    """

    def __init__(self, root: str | Path, seed: int = 0):
        self.layout = LIPLayout(Path(root))
        self.rng = np.random.default_rng(seed)
        self.ids: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        self.csv_lines: dict[str, list[str]] = {"train": [], "val": []}
        self.keys: set[str] = set()
        self.unkeyed = 0
        self.joints: dict[str, np.ndarray] = {}
        for split in ("train", "val"):
            for path in (
                self.layout.image_dir(split),
                self.layout.label_dir(split),
            ):
                path.mkdir(parents=True, exist_ok=True)
            self.layout.pose_csv(split).parent.mkdir(
                parents=True, exist_ok=True
            )

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def input_records(self) -> int:
        return len(self.keys) + self.unkeyed

    def person(
        self, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A random image, a label with a few class rectangles, and joints
        (LIP order) inside the person box, up to three of them absent."""
        image = self.rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = np.zeros((height, width), np.uint8)
        x0, y0 = width // 4, height // 8
        x1, y1 = width - width // 4, height - height // 8
        label[y0:y1, x0:x1] = 5
        label[y0 : y0 + (y1 - y0) // 4, x0:x1] = 13
        label[y1 - (y1 - y0) // 4 : y1, x0:x1] = 9
        joints = np.zeros((NUM_JOINTS, 3))
        joints[:, 0] = self.rng.integers(x0, x1, NUM_JOINTS)
        joints[:, 1] = self.rng.integers(y0, y1, NUM_JOINTS)
        joints[:, 2] = self.rng.integers(0, 2, NUM_JOINTS)
        missing = self.rng.integers(0, 4)
        joints[self.rng.choice(NUM_JOINTS, missing, replace=False)] = np.nan
        return image, label, joints

    def add(
        self,
        split: str,
        image_id: str,
        height: int = 40,
        width: int = 32,
        *,
        image: bytes | None = None,
        label: np.ndarray | bytes | None = None,
        joints: np.ndarray | None = None,
        csv_line: str | None = None,
        write_image: bool = True,
        write_label: bool = True,
        write_row: bool = True,
        list_id: bool = True,
    ) -> None:
        """Adds one image; keyword arguments replace a piece by a given
        (possibly bad) one or leave it out."""
        self.keys.add(image_id)
        good_image, good_label, good_joints = self.person(height, width)
        if write_image:
            data = image if image is not None else jpeg_bytes(good_image)
            self.layout.image_path(split, image_id).write_bytes(data)
        if list_id:
            self.ids[split].append(image_id)
        if split == "test":
            return
        if write_label:
            label = good_label if label is None else label
            data = label if isinstance(label, bytes) else png_bytes(label)
            self.layout.label_path(split, image_id).write_bytes(data)
        if write_row:
            joints = good_joints if joints is None else joints
            self.joints[image_id] = joints
            self.csv_lines[split].append(
                csv_line or format_pose_row(image_id, joints)
            )

    def add_test_split(self, count: int) -> None:
        self.layout.image_dir("test").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            self.add("test", f"test_{index:03d}", 36, 30)

    def add_unkeyed_row(self, split: str, line: str) -> None:
        """A CSV row whose image name is unusable (counts on its own)."""
        self.unkeyed += 1
        self.csv_lines[split].append(line)

    def add_raw_row(self, split: str, line: str) -> None:
        """A CSV row for an id already added (no new input record)."""
        self.csv_lines[split].append(line)

    def write(self) -> Path:
        for split, ids in self.ids.items():
            if split == "test" and not self.layout.image_dir("test").exists():
                continue
            self.layout.id_file(split).write_text("\n".join(ids) + "\n")
        for split, lines in self.csv_lines.items():
            self.layout.pose_csv(split).write_text("\n".join(lines))
        return self.root


def good_fixture(
    root: str | Path, train: int = 6, val: int = 2, seed: int = 0
) -> LIPFixture:
    """A fixture without bad records, sizes varying per image."""
    fixture = LIPFixture(root, seed)
    for index in range(train):
        fixture.add(
            "train", f"{1000 + index}_train", 36 + 4 * index, 28 + 2 * index
        )
    for index in range(val):
        fixture.add("val", f"{2000 + index}_val", 44, 30 + 4 * index)
    fixture.write()
    return fixture
