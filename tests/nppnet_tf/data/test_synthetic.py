"""The synthetic LIP: release layout, CSV quirks, determinism, and labels,
joints and left/right conventions that agree (also after a flip)."""

import re

import numpy as np
import pytest
from PIL import Image

from nppnet_tf.data.lip_files import LIPLayout, read_id_list, read_pose_csv
from nppnet_tf.data.synthetic import MARKER_FILE, write_synthetic_lip
from nppnet_tf.lip import (
    CLASS_NAMES,
    LIP_FLIP_PERM,
    LIP_JOINT_NAMES,
    NUM_CLASSES,
    PARSING_FLIP_PERM,
)

NUM_TRAIN, NUM_VAL, NUM_TEST = 40, 12, 3
SEED = 3

CLASS = {name: index for index, name in enumerate(CLASS_NAMES)}
JOINT = {name: index for index, name in enumerate(LIP_JOINT_NAMES)}
SLEEVES = ("upper_clothes", "dress", "coat", "jumpsuits")
ON_ARM = ("glove", "left_arm", "right_arm", *SLEEVES)
ON_LOWER_LEG = (
    "socks",
    "pants",
    "jumpsuits",
    "left_leg",
    "right_leg",
    "left_shoe",
    "right_shoe",
)
# joint -> (classes of which one must lie within `radius` pixels, radius)
JOINT_CLASSES = {
    "head_top": (("hat", "hair"), 1),
    "upper_neck": (("hair", "face"), 2),
    "right_elbow": (ON_ARM, 1),
    "left_elbow": (ON_ARM, 1),
    "right_wrist": (ON_ARM, 1),
    "left_wrist": (ON_ARM, 1),
    "right_ankle": (ON_LOWER_LEG, 1),
    "left_ankle": (ON_LOWER_LEG, 1),
}


@pytest.fixture(scope="module")
def lip(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_lip")
    summary = write_synthetic_lip(
        root, NUM_TRAIN, NUM_VAL, SEED, num_test=NUM_TEST, progress=False
    )
    return LIPLayout(root), summary


@pytest.fixture(scope="module")
def samples(lip):
    """(image_id, image, label, joints) of every train and val image."""
    layout, _ = lip
    out = []
    for split in ("train", "val"):
        poses = read_pose_csv(layout.pose_csv(split))
        for image_id in read_id_list(layout.id_file(split)):
            with Image.open(layout.image_path(split, image_id)) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                pixels = np.asarray(image)
            with Image.open(layout.label_path(split, image_id)) as label:
                assert label.format == "PNG" and label.mode == "L"
                label_map = np.asarray(label)
            out.append((image_id, pixels, label_map, poses[image_id].joints))
    return out


def _flip(label, joints):
    """Horizontal flip with LIP's class and joint swaps (reference 6.3)."""
    flipped_label = np.asarray(PARSING_FLIP_PERM, np.uint8)[label[:, ::-1]]
    flipped = joints[list(LIP_FLIP_PERM)].copy()
    flipped[:, 0] = label.shape[1] - 1 - flipped[:, 0]
    return flipped_label, flipped


def _classes_near(label, joint, radius):
    x, y = int(joint[0]), int(joint[1])
    window = label[
        max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1
    ]
    return {CLASS_NAMES[value] for value in np.unique(window)}


def _distance_to_limb(pixels, joints):
    """Distance of each of `(n, 2)` xy pixels to the polyline through
    `joints`."""
    best = np.full(len(pixels), np.inf)
    for start, end in zip(joints[:-1], joints[1:]):
        along = end - start
        t = np.clip(
            (pixels - start) @ along / max(along @ along, 1e-9), 0.0, 1.0
        )
        nearest = start + t[:, None] * along
        best = np.minimum(best, np.hypot(*(pixels - nearest).T))
    return best


def _check_joint_classes(label, joints):
    for name, (classes, radius) in JOINT_CLASSES.items():
        joint = joints[JOINT[name]]
        if np.isfinite(joint[0]):
            near = _classes_near(label, joint, radius)
            assert near & set(classes), (name, joint, near)


def _side_scores(label, joints):
    """For each limb class whose side's joints are all present: the share
    of its pixels nearer to its own side's joints than to the other side's
    (crossed arms lower it, swapped classes bring it near 0)."""
    scores = []
    for limb, names in (
        ("arm", ("shoulder", "elbow", "wrist")),
        ("leg", ("hip", "knee", "ankle")),
    ):
        chains = {
            side: joints[[JOINT[f"{side}_{name}"] for name in names], :2]
            for side in ("left", "right")
        }
        if not all(np.isfinite(chain).all() for chain in chains.values()):
            continue
        for side, other in (("left", "right"), ("right", "left")):
            rows, columns = np.nonzero(label == CLASS[f"{side}_{limb}"])
            if len(rows) < 10:
                continue
            pixels = np.stack([columns, rows], axis=1).astype(float)
            own = _distance_to_limb(pixels, chains[side])
            scores.append(
                np.mean(own < _distance_to_limb(pixels, chains[other]))
            )
    return scores


def _check_sides(samples):
    """Left and right limb classes follow their joints in nearly every
    image (a few crossed arms are ambiguous)."""
    scores = [
        s for label, joints in samples for s in _side_scores(label, joints)
    ]
    assert len(scores) > len(samples)
    assert np.mean(np.array(scores) > 0.75) > 0.95, sorted(scores)[:10]


def _facing(label, joints):
    """+1 facing the camera, -1 seen from the back (judged by the classes at
    the head's middle), 0 when the joints needed are missing."""
    needed = [JOINT[name] for name in ("head_top", "upper_neck")]
    if not np.isfinite(joints[needed, 0]).all():
        return 0
    middle = _classes_near(label, joints[needed].mean(axis=0).round(), 1)
    if middle & {"face", "sunglasses"}:
        return 1
    assert "hair" in middle, middle
    return -1


def _check_facing(label, joints):
    """Facing the camera, the person's right shoulder is on the image's left
    (LIP's convention); from the back, on the image's right."""
    facing = _facing(label, joints)
    right = joints[JOINT["right_shoulder"], 0]
    left = joints[JOINT["left_shoulder"], 0]
    if facing == 0 or not (np.isfinite(right) and np.isfinite(left)):
        return 0
    assert (right < left) == (facing == 1), (facing, right, left)
    return facing


def test_release_layout_and_counts(lip):
    layout, summary = lip
    layout.check(("train", "val", "test"))
    assert {path.name for path in layout.root.iterdir()} == {
        "TrainVal_images",
        "TrainVal_parsing_annotations",
        "TrainVal_pose_annotations",
        "Testing_images",
        MARKER_FILE,
    }
    assert summary["counts"] == {
        "train": NUM_TRAIN,
        "val": NUM_VAL,
        "test": NUM_TEST,
    }
    assert summary["root"] == str(layout.root)
    assert (layout.root / summary["paths"]["val_pose_csv"]).is_file()
    every_id = []
    for split, count in (
        ("train", NUM_TRAIN),
        ("val", NUM_VAL),
        ("test", NUM_TEST),
    ):
        ids = read_id_list(layout.id_file(split))
        assert len(ids) == count
        assert all(re.fullmatch(r"\d+_\d+", image_id) for image_id in ids)
        images = {path.name for path in layout.image_dir(split).iterdir()}
        assert images == {f"{image_id}.jpg" for image_id in ids}
        if split != "test":
            labels = {path.name for path in layout.label_dir(split).iterdir()}
            assert labels == {f"{image_id}.png" for image_id in ids}
            assert set(read_pose_csv(layout.pose_csv(split))) == set(ids)
        every_id += ids
    assert len(set(every_id)) == len(every_id)


def test_pose_csv_has_the_real_files_quirks(lip):
    layout, summary = lip
    missing = total = occluded = 0
    for split in ("train", "val"):
        text = layout.pose_csv(split).read_text()
        assert not text.endswith("\n")
        lines = text.split("\n")
        names = [line.split(",", 1)[0] for line in lines]
        assert names == sorted(names)
        for line in lines:
            fields = line.split(",")
            assert len(fields) == 49 and fields[0].endswith(".jpg")
            for triple in zip(fields[1::3], fields[2::3], fields[3::3]):
                if "nan" in triple:
                    assert triple == ("nan", "nan", "nan")
                    missing += 1
                else:
                    assert all(re.fullmatch(r"\d+", v) for v in triple)
                    assert triple[2] in ("0", "1")
                    occluded += triple[2] == "1"
                total += 1
    assert summary["joints"] == {
        "total": total,
        "missing": missing,
        "occluded": occluded,
    }
    assert 0.03 < missing / total < 0.25
    assert 0.02 < occluded / (total - missing) < 0.2


def test_label_maps_match_images(samples):
    shapes = set()
    for _, image, label, _ in samples:
        height, width = label.shape
        assert image.shape == (height, width, 3)
        assert 96 <= height <= 192 and 96 <= width <= 192
        assert label.dtype == np.uint8 and label.max() < NUM_CLASSES
        assert {CLASS["face"], CLASS["hair"]} & set(np.unique(label))
        shapes.add("portrait" if height > width else "landscape")
    assert shapes == {"portrait", "landscape"}


def test_figures_fill_most_of_the_height(samples):
    fractions = []
    for _, _, label, _ in samples:
        rows = np.flatnonzero(label.any(axis=1))
        fractions.append((rows[-1] - rows[0] + 1) / label.shape[0])
    assert 0.55 < np.median(fractions) < 1.0
    assert np.quantile(fractions, 0.1) > 0.4


def test_joints_lie_inside_the_image(samples):
    for image_id, _, label, joints in samples:
        present = joints[np.isfinite(joints[:, 0])]
        assert (present[:, 0] >= 0).all() and (present[:, 1] >= 0).all()
        assert (present[:, 0] < label.shape[1]).all(), image_id
        assert (present[:, 1] < label.shape[0]).all(), image_id


def test_joints_sit_on_their_body_parts(samples):
    for _, _, label, joints in samples:
        _check_joint_classes(label, joints)


def test_wrists_sit_on_their_own_hands(samples):
    # Not every one: the other arm may cross in front of a wrist.
    on_hand = []
    for _, _, label, joints in samples:
        for side in ("left", "right"):
            wrist = joints[JOINT[f"{side}_wrist"]]
            if np.isfinite(wrist[0]):
                near = _classes_near(label, wrist, 1)
                on_hand.append(bool(near & {"glove", f"{side}_arm"}))
    assert len(on_hand) > len(samples) and np.mean(on_hand) > 0.97


def test_left_and_right_follow_lips_convention(samples):
    _check_sides([(label, joints) for _, _, label, joints in samples])
    facings = [_check_facing(label, joints) for _, _, label, joints in samples]
    assert facings.count(1) > facings.count(-1) > 0


def test_flipped_samples_keep_the_conventions(samples):
    flipped = [_flip(label, joints) for _, _, label, joints in samples]
    for label, joints in flipped:
        _check_joint_classes(label, joints)
    _check_sides(flipped)
    facings = [_check_facing(label, joints) for label, joints in flipped]
    assert facings.count(1) > facings.count(-1) > 0


def test_flip_checks_catch_forgotten_swaps(samples):
    """Without the class swaps, the flipped samples fail the side check."""
    unswapped = [
        (label[:, ::-1], _flip(label, joints)[1])
        for _, _, label, joints in samples
    ]
    with pytest.raises(AssertionError):
        _check_sides(unswapped)


def _tree(root):
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = write_synthetic_lip(
        tmp_path / "a", 3, 2, 7, num_test=1, progress=False
    )
    write_synthetic_lip(tmp_path / "b", 3, 2, 7, num_test=1, progress=False)
    write_synthetic_lip(tmp_path / "c", 3, 2, 8, num_test=1, progress=False)
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert a == b
    assert first["counts"] == {"train": 3, "val": 2, "test": 1}
    images_a = {v for k, v in a.items() if k.endswith(".jpg")}
    images_c = {v for k, v in c.items() if k.endswith(".jpg")}
    assert len(images_a) == 6 and not images_a & images_c


def test_an_image_does_not_depend_on_the_counts(tmp_path):
    write_synthetic_lip(tmp_path / "small", 1, 1, 11, progress=False)
    write_synthetic_lip(tmp_path / "large", 4, 3, 11, progress=False)
    small, large = _tree(tmp_path / "small"), _tree(tmp_path / "large")
    shared = [key for key in small if key.endswith((".jpg", ".png"))]
    assert len(shared) == 4
    assert all(small[key] == large[key] for key in shared)


def test_rewrites_its_own_folder_and_refuses_others(tmp_path):
    root = tmp_path / "lip"
    write_synthetic_lip(root, 4, 2, 0, progress=False)
    write_synthetic_lip(root, 2, 1, 1, progress=False)
    layout = LIPLayout(root)
    assert len(list(layout.image_dir("train").iterdir())) == 2
    assert len(read_pose_csv(layout.pose_csv("val"))) == 1

    foreign = tmp_path / "real_lip"
    foreign.mkdir()
    (foreign / "README").write_text("not synthetic")
    with pytest.raises(FileExistsError, match="real_lip"):
        write_synthetic_lip(foreign, 1, 1, 0, progress=False)


@pytest.mark.parametrize(
    "arguments, error, name",
    [
        ({"num_train": -1}, ValueError, "num_train"),
        ({"num_val": 2.0}, TypeError, "num_val"),
        ({"seed": -3}, ValueError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"min_size": 16}, ValueError, "min_size"),
        ({"max_size": 64}, ValueError, "max_size"),
        ({"num_train": 0, "num_val": 0}, ValueError, "num_train"),
    ],
)
def test_rejects_bad_arguments(tmp_path, arguments, error, name):
    call = {"num_train": 1, "num_val": 1, "seed": 0, **arguments}
    with pytest.raises(error, match=name):
        write_synthetic_lip(tmp_path / "lip", progress=False, **call)
    assert not (tmp_path / "lip").exists()
