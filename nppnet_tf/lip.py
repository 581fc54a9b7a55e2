"""LIP (Look Into Person) definitions: parsing classes, joints, orders, pairs.

Everything the project knows about LIP's label conventions lives here
(reference NPPNET.md sections 6.3, 8.4, 8.5). Two joint orders exist:

* **LIP order**: the order of the 16 (x, y, flag) triples in LIP's pose CSV
  files and the authors' JSON annotations (MPII-like, starting at the right
  ankle).
* **model order**: the order of the network's heatmap channels (head first).

`LIP_TO_MODEL[k]` is the LIP index of model channel k, so
`model_joints = lip_joints[LIP_TO_MODEL]`; `MODEL_TO_LIP[k]` is the model
channel of LIP joint k, so `lip_joints = model_joints[MODEL_TO_LIP]`.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 20
NUM_JOINTS = 16
IGNORE_LABEL = 255

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "hat",
    "hair",
    "glove",
    "sunglasses",
    "upper_clothes",
    "dress",
    "coat",
    "socks",
    "pants",
    "jumpsuits",
    "scarf",
    "skirt",
    "face",
    "left_arm",
    "right_arm",
    "left_leg",
    "right_leg",
    "left_shoe",
    "right_shoe",
)

# The palette LIP's own visualisations use (RGB), one colour per class id.
PALETTE: np.ndarray = np.array(
    [
        [0, 0, 0],
        [128, 0, 0],
        [255, 0, 0],
        [0, 85, 0],
        [170, 0, 51],
        [255, 85, 0],
        [0, 0, 85],
        [0, 119, 221],
        [85, 85, 0],
        [0, 85, 85],
        [85, 51, 0],
        [52, 86, 128],
        [0, 128, 0],
        [0, 0, 255],
        [51, 170, 221],
        [0, 255, 255],
        [85, 255, 170],
        [170, 255, 85],
        [255, 255, 0],
        [255, 170, 0],
    ],
    dtype=np.uint8,
)

# Left/right parsing classes swapped by a horizontal flip (reference 6.3).
PARSING_FLIP_PAIRS: tuple[tuple[int, int], ...] = ((14, 15), (16, 17), (18, 19))

LIP_JOINT_NAMES: tuple[str, ...] = (
    "right_ankle",
    "right_knee",
    "right_hip",
    "left_hip",
    "left_knee",
    "left_ankle",
    "pelvis",
    "thorax",
    "upper_neck",
    "head_top",
    "right_wrist",
    "right_elbow",
    "right_shoulder",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
)

MODEL_JOINT_NAMES: tuple[str, ...] = (
    "head_top",
    "upper_neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "thorax",
    "pelvis",
)

# Model channel k takes LIP joint LIP_TO_MODEL[k] (the authors' loader).
LIP_TO_MODEL: tuple[int, ...] = (
    9,
    8,
    12,
    11,
    10,
    13,
    14,
    15,
    2,
    1,
    0,
    3,
    4,
    5,
    7,
    6,
)
# LIP joint k takes model channel MODEL_TO_LIP[k] (the authors' CSV writer).
MODEL_TO_LIP: tuple[int, ...] = (
    10,
    9,
    8,
    11,
    12,
    13,
    15,
    14,
    1,
    0,
    4,
    3,
    2,
    5,
    6,
    7,
)

# Left/right joint pairs, swapped by a horizontal flip.
MODEL_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (2, 5),
    (3, 6),
    (4, 7),
    (8, 11),
    (9, 12),
    (10, 13),
)
LIP_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (12, 13),
    (11, 14),
    (10, 15),
    (2, 3),
    (1, 4),
    (0, 5),
)

# Limbs drawn on overlays, in model order.
SKELETON: tuple[tuple[int, int], ...] = (
    (0, 1),
    (1, 14),
    (14, 15),
    (1, 2),
    (2, 3),
    (3, 4),
    (1, 5),
    (5, 6),
    (6, 7),
    (15, 8),
    (8, 9),
    (9, 10),
    (15, 11),
    (11, 12),
    (12, 13),
)

# Index of head top and upper neck in LIP order (PCKh head size, reference 7.2).
LIP_HEAD_TOP = 9
LIP_UPPER_NECK = 8


def _flip_permutation(size: int, pairs) -> tuple[int, ...]:
    perm = list(range(size))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


# Channel k of a flipped prediction holds what channel MODEL_FLIP_PERM[k]
# holds for the unflipped image (an involution).
MODEL_FLIP_PERM: tuple[int, ...] = _flip_permutation(
    NUM_JOINTS, MODEL_FLIP_PAIRS
)
LIP_FLIP_PERM: tuple[int, ...] = _flip_permutation(NUM_JOINTS, LIP_FLIP_PAIRS)
PARSING_FLIP_PERM: tuple[int, ...] = _flip_permutation(
    NUM_CLASSES, PARSING_FLIP_PAIRS
)

# Class weights of the authors' OHEM parsing loss (reference 4.2).
CLASS_WEIGHTS: tuple[float, ...] = (
    0.7602572,
    0.94236198,
    0.85644457,
    1.04346266,
    1.10627293,
    0.80980162,
    0.95168713,
    0.8403769,
    1.05798412,
    0.85746254,
    1.01274366,
    1.05854692,
    1.03430773,
    0.84867818,
    0.88027721,
    0.87580925,
    0.98747462,
    0.9876475,
    1.00016535,
    1.00108882,
)


def lip_to_model(joints_lip: np.ndarray) -> np.ndarray:
    """Reorders `(..., 16, k)` joints from LIP order to model order."""
    return np.asarray(joints_lip)[..., list(LIP_TO_MODEL), :]


def model_to_lip(joints_model: np.ndarray) -> np.ndarray:
    """Reorders `(..., 16, k)` joints from model order to LIP order."""
    return np.asarray(joints_model)[..., list(MODEL_TO_LIP), :]


def colorize(label_map: np.ndarray) -> np.ndarray:
    """Maps an integer label map to RGB with `PALETTE`; 255 shows as white."""
    label_map = np.asarray(label_map)
    palette = np.full((256, 3), 255, dtype=np.uint8)
    palette[:NUM_CLASSES] = PALETTE
    return palette[label_map.astype(np.uint8)]
