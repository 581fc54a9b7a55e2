"""LIP definitions: orders, permutations and pairs agree with each other."""

import numpy as np

from nppnet_tf import lip


def test_sizes():
    assert len(lip.CLASS_NAMES) == lip.NUM_CLASSES == 20
    assert lip.PALETTE.shape == (20, 3)
    assert len({tuple(c) for c in lip.PALETTE}) == 20
    assert len(lip.CLASS_WEIGHTS) == 20
    assert len(lip.LIP_JOINT_NAMES) == len(lip.MODEL_JOINT_NAMES) == 16


def test_permutations_are_inverse_and_match_names():
    to_model = np.array(lip.LIP_TO_MODEL)
    to_lip = np.array(lip.MODEL_TO_LIP)
    assert sorted(to_model) == list(range(16))
    np.testing.assert_array_equal(to_model[to_lip], np.arange(16))
    np.testing.assert_array_equal(to_lip[to_model], np.arange(16))
    for k in range(16):
        assert lip.MODEL_JOINT_NAMES[k] == lip.LIP_JOINT_NAMES[to_model[k]]
    joints = np.arange(16 * 2).reshape(16, 2)
    np.testing.assert_array_equal(
        lip.model_to_lip(lip.lip_to_model(joints)), joints
    )


def test_reference_joint_table():
    # Reference 8.4: LIP index -> model channel.
    table = {
        0: 10,
        1: 9,
        2: 8,
        3: 11,
        4: 12,
        5: 13,
        6: 15,
        7: 14,
        8: 1,
        9: 0,
        10: 4,
        11: 3,
        12: 2,
        13: 5,
        14: 6,
        15: 7,
    }
    for lip_index, channel in table.items():
        assert lip.MODEL_TO_LIP[lip_index] == channel
    assert lip.LIP_JOINT_NAMES[lip.LIP_HEAD_TOP] == "head_top"
    assert lip.LIP_JOINT_NAMES[lip.LIP_UPPER_NECK] == "upper_neck"


def _side(name):
    return name.split("_")[0]


def test_flip_pairs_swap_left_and_right_of_the_same_part():
    for pairs, names in (
        (lip.MODEL_FLIP_PAIRS, lip.MODEL_JOINT_NAMES),
        (lip.LIP_FLIP_PAIRS, lip.LIP_JOINT_NAMES),
        (lip.PARSING_FLIP_PAIRS, lip.CLASS_NAMES),
    ):
        for a, b in pairs:
            assert {_side(names[a]), _side(names[b])} == {"left", "right"}
            assert names[a].split("_", 1)[1] == names[b].split("_", 1)[1]
    # The two joint pair lists describe the same pairs in the two orders.
    lip_pairs = {frozenset(p) for p in lip.LIP_FLIP_PAIRS}
    mapped = {
        frozenset(lip.LIP_TO_MODEL[i] for i in p) for p in lip.MODEL_FLIP_PAIRS
    }
    assert mapped == lip_pairs


def test_flip_permutations_are_involutions():
    for perm in (lip.MODEL_FLIP_PERM, lip.LIP_FLIP_PERM, lip.PARSING_FLIP_PERM):
        perm = np.array(perm)
        np.testing.assert_array_equal(perm[perm], np.arange(len(perm)))
    # reference 7.1 pose flip permutation
    assert lip.MODEL_FLIP_PERM == (
        0,
        1,
        5,
        6,
        7,
        2,
        3,
        4,
        11,
        12,
        13,
        8,
        9,
        10,
        14,
        15,
    )


def test_colorize_maps_ignore_to_white():
    rgb = lip.colorize(np.array([[0, 13], [255, 19]]))
    np.testing.assert_array_equal(rgb[0, 1], lip.PALETTE[13])
    np.testing.assert_array_equal(rgb[1, 0], [255, 255, 255])
