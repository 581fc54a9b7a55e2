import math

import numpy as np
import pytest

from nppnet_tf.search import derive
from nppnet_tf.search.architecture_file import (
    ArchitectureFileError,
    pack_space,
    uniform_arrays,
)
from nppnet_tf.search.derive import (
    derive_genotype,
    edge_weight_matrix,
    greedy_edges,
    mean_normalised_entropy,
    parameter_free_share,
    top_two_edges,
)
from nppnet_tf.search.genotype import (
    CELL_FIELDS,
    FUSION_FIELDS,
    INTERACTION_FIELDS,
    SEARCHED_BY_INTERACTION,
    GenotypeError,
    edges,
)
from nppnet_tf.search.primitives import PRIMITIVES_INTER

OPS3 = ("a_conv", "b_conv", "c_pool")  # stand-ins: only names matter here
OPS_NONE = ("none", "std_conv_3x3", "max_pool_3x3")


def _pairs(chosen):
    return [(edge.op, edge.source) for edge in chosen]


def test_edge_weight_matrix_is_op_softmax_times_edge_softmax():
    third = math.log(3.0)
    weights = edge_weight_matrix([[0.0, third], [third, 0.0]], [0.0, third])
    expected = np.array(
        [[0.25 * 0.25, 0.75 * 0.25], [0.75 * 0.75, 0.25 * 0.75]]
    )
    np.testing.assert_allclose(weights, expected)
    assert weights.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="betas"):
        edge_weight_matrix(np.zeros((2, 3)), np.zeros(3))


# ---- cells and fusion cells: DARTS top-2 (reference 3.3) ------------------


@pytest.mark.parametrize(
    "weights, ops, expected",
    [
        (  # two strongest sources, stronger first, each with its best op
            [[0.05, 0.10, 0.05], [0.02, 0.01, 0.30], [0.20, 0.02, 0.25]],
            OPS3,
            [("c_pool", 1), ("c_pool", 2)],
        ),
        (  # a row's sum does not matter, only its best entry
            [[0.09, 0.09, 0.09], [0.0, 0.0, 0.12], [0.11, 0.0, 0.0]],
            OPS3,
            [("c_pool", 1), ("a_conv", 2)],
        ),
        (  # all equal (initialisation): lowest sources, lowest op
            np.full((4, 3), 1 / 12),
            OPS3,
            [("a_conv", 0), ("a_conv", 1)],
        ),
        (  # tie between sources 1 and 3 behind source 2: lower index first
            [
                [0.0, 0.1, 0.0],
                [0.2, 0.0, 0.0],
                [0.0, 0.3, 0.0],
                [0.0, 0.0, 0.2],
            ],
            OPS3,
            [("b_conv", 2), ("a_conv", 1)],
        ),
        (  # `none` is never chosen and does not make an edge strong
            [[0.60, 0.05, 0.05], [0.10, 0.12, 0.02], [0.01, 0.02, 0.03]],
            OPS_NONE,
            [("std_conv_3x3", 1), ("std_conv_3x3", 0)],
        ),
        (  # a single-source node keeps its one edge; `none` is skipped
            [[0.5, 0.2, 0.3]],
            OPS_NONE,
            [("max_pool_3x3", 0)],
        ),
    ],
)
def test_top_two_edges(weights, ops, expected):
    assert _pairs(top_two_edges(np.array(weights), ops)) == expected


def test_top_two_edges_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match=r"weights must be \(sources, 3\)"):
        top_two_edges(np.zeros((2, 4)), OPS3)


# ---- interactions: Algorithm 1 with the tie fix (reference 3.4) ------------


@pytest.mark.parametrize(
    "weights, ops, threshold, max_edges, expected",
    [
        (  # stops once the sum reaches the threshold: 0.5 + 0.3 >= 0.7
            [[0.5, 0.1, 0.0], [0.0, 0.3, 0.1]],
            OPS3, 0.7, 4,
            [("a_conv", 0), ("b_conv", 1)],
        ),
        (  # ">=": 0.5 + 0.25 reaches a threshold of exactly 0.75
            [[0.5, 0.0, 0.0], [0.25, 0.125, 0.125]],
            OPS3, 0.75, 4,
            [("a_conv", 0), ("a_conv", 1)],
        ),
        (  # one dominant pair on a single source: one edge
            [[0.1, 0.8, 0.1]],
            OPS3, 0.7, 4,
            [("b_conv", 0)],
        ),
        (  # single source, no dominant op: several ops on that source
            [[0.3, 0.25, 0.45]],
            OPS3, 0.7, 4,
            [("c_pool", 0), ("a_conv", 0)],
        ),
        (  # the cap stops before the threshold
            np.full((2, 3), 1 / 6),
            OPS3, 0.7, 4,
            [("a_conv", 0), ("b_conv", 0), ("c_pool", 0), ("a_conv", 1)],
        ),
        (  # a smaller cap
            [[0.2, 0.1, 0.1], [0.3, 0.1, 0.2]],
            OPS3, 0.7, 2,
            [("a_conv", 1), ("a_conv", 0)],
        ),
        (  # `none` is never taken, so its 0.5 never reaches the sum:
            # the cap stops at 0.55 (equal weights: lower source first)
            [[0.5, 0.2, 0.05], [0.0, 0.2, 0.1]],
            OPS_NONE, 0.7, 4,
            [
                ("std_conv_3x3", 0), ("std_conv_3x3", 1),
                ("max_pool_3x3", 1), ("max_pool_3x3", 0),
            ],
        ),
        (  # fewer candidates than the cap: stop when none is left
            [[0.9, 0.05, 0.05]],
            OPS_NONE, 0.7, 4,
            [("std_conv_3x3", 0), ("max_pool_3x3", 0)],
        ),
    ],
)  # fmt: skip
def test_greedy_edges(weights, ops, threshold, max_edges, expected):
    chosen = greedy_edges(np.array(weights), ops, threshold, max_edges)
    assert _pairs(chosen) == expected


@pytest.mark.parametrize("num_sources", [1, 2, 5, 7])
def test_exact_ties_give_distinct_pairs(num_sources):
    # At initialisation every entry is equal. The authors' code zeroes all
    # tied entries but appends one, which yields four copies of
    # (std_conv_3x3, 0); ours takes four distinct pairs in index order.
    weights = np.full((num_sources, 7), 1 / (7 * num_sources))
    chosen = greedy_edges(weights, PRIMITIVES_INTER)
    assert _pairs(chosen) == [
        ("std_conv_3x3", 0),
        ("dil_conv_3x3_4", 0),
        ("se_connect", 0),
        ("max_pool_3x3", 0),
    ]


@pytest.mark.parametrize(
    "threshold, max_edges, message",
    [
        (0.0, 4, "threshold must be a number > 0, got 0.0"),
        (float("inf"), 4, "threshold must be finite"),
        (0.7, 0, "max_edges must be >= 1, got 0"),
        (0.7, 2.5, "max_edges must be an integer, got 2.5"),
    ],
)
def test_greedy_edges_rejects_bad_settings(threshold, max_edges, message):
    with pytest.raises(ValueError, match=message):
        greedy_edges(np.ones((1, 3)) / 3, OPS3, threshold, max_edges)


# ---- whole genotypes ---------------------------------------------------------


def test_derivation_reproduces_the_authors_genotype(
    authors_arrays, authors_genotype
):
    # Built from float32 parameters, `none` outweighing the second edge's op
    # in every DARTS cell (see conftest.arrays_favouring).
    assert derive_genotype(authors_arrays) == authors_genotype


def test_uniform_initialisation(authors_genotype):
    arrays = uniform_arrays(SEARCHED_BY_INTERACTION)
    genotype = derive_genotype(arrays, base=authors_genotype.cells_only())
    first_four = edges(
        [
            ("std_conv_3x3", 0),
            ("dil_conv_3x3_4", 0),
            ("se_connect", 0),
            ("max_pool_3x3", 0),
        ]
    )
    for field in INTERACTION_FIELDS:
        assert all(t == first_four for t in getattr(genotype, field))
    for field in FUSION_FIELDS:
        assert getattr(genotype, field) == edges(
            [("std_conv_3x3", 0), ("std_conv_3x3", 1)] * 4
        )
    assert genotype.pose_decoder == authors_genotype.pose_decoder


def test_encoder_decoder_arrays_give_a_partial_genotype(authors_arrays):
    cells = {
        k: v
        for k, v in authors_arrays.items()
        if k.split("/")[0] in CELL_FIELDS
    }
    genotype = derive_genotype(cells)
    assert not genotype.is_complete
    assert genotype.parsing_decoder[0].op == "std_conv_3x3"


def test_base_genotype_sources(authors_arrays, authors_genotype):
    interactions = {
        k: v
        for k, v in authors_arrays.items()
        if k.split("/")[0] in SEARCHED_BY_INTERACTION
    }
    with pytest.raises(
        GenotypeError, match="no base genotype gives pose_encoder_normal"
    ):
        derive_genotype(interactions)
    stored = dict(
        interactions,
        base_genotype=np.array(authors_genotype.cells_only().to_json()),
    )
    assert derive_genotype(stored) == authors_genotype
    # An explicit base wins over the stored one.
    other_base = authors_genotype.cells_only().replace(
        pose_decoder=authors_genotype.parsing_decoder
    )
    derived = derive_genotype(stored, base=other_base)
    assert derived.pose_decoder == authors_genotype.parsing_decoder
    assert derived.pose_fusion == authors_genotype.pose_fusion
    # Searched spaces replace the base's fields.
    assert (
        derive_genotype(
            stored,
            base=authors_genotype.replace(
                pose_fusion=authors_genotype.parsing_fusion
            ),
        ).pose_fusion
        == authors_genotype.pose_fusion
    )


def test_threshold_and_cap_change_the_interactions(authors_arrays):
    loose = derive_genotype(authors_arrays, threshold=0.2)
    # Every target's first pair weighs >= 0.2 (conftest masses).
    for field in INTERACTION_FIELDS:
        assert all(len(target) == 1 for target in getattr(loose, field))
    capped = derive_genotype(authors_arrays, max_edges=2)
    assert len(capped.decoder_parsing_to_pose[1]) == 2
    assert len(capped.decoder_parsing_to_pose[0]) == 2
    with pytest.raises(ValueError, match="threshold"):
        derive_genotype(authors_arrays, threshold=-1.0)


def test_malformed_arrays_are_rejected():
    arrays = uniform_arrays(["pose_fusion"])
    arrays["pose_fusion/alphas"] = np.zeros((3, 7))
    with pytest.raises(ArchitectureFileError, match="'pose_fusion/alphas'"):
        derive_genotype(arrays)


# ---- monitors ----------------------------------------------------------------


def test_mean_normalised_entropy():
    third = math.log(3.0)
    alphas = np.zeros((18, 2))
    alphas[:9] = [0.0, third]  # p = (0.25, 0.75)
    arrays = pack_space(
        "pose_fusion", alphas, np.zeros(18), ("std_conv_3x3", "se_connect")
    )
    decided = np.zeros((18, 7))
    decided[:, 3] = 60.0
    arrays.update(pack_space("parsing_fusion", decided, np.zeros(18)))
    arrays.update(uniform_arrays(["encoder_parsing_to_pose"]))
    entropy = mean_normalised_entropy(arrays)
    h_quarter = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert list(entropy) == [
        "encoder_parsing_to_pose",
        "pose_fusion",
        "parsing_fusion",
    ]
    assert entropy["pose_fusion"] == pytest.approx((h_quarter + 1.0) / 2)
    assert entropy["parsing_fusion"] == pytest.approx(0.0, abs=1e-20)
    assert entropy["encoder_parsing_to_pose"] == pytest.approx(1.0)


def test_parameter_free_share(authors_arrays):
    share = parameter_free_share(authors_arrays)
    # One max_pool_3x3 among the 8 edges of the encoder and fusion cells;
    # the decoders and interactions use only convolutions and SE blocks.
    assert share == {
        "pose_encoder_normal": 0.125,
        "pose_encoder_reduce": 0.125,
        "parsing_encoder_normal": 0.125,
        "parsing_encoder_reduce": 0.125,
        "pose_decoder": 0.0,
        "parsing_decoder": 0.0,
        "encoder_parsing_to_pose": 0.0,
        "encoder_pose_to_parsing": 0.0,
        "decoder_parsing_to_pose": 0.0,
        "decoder_pose_to_parsing": 0.0,
        "pose_fusion": 0.125,
        "parsing_fusion": 0.125,
    }
    # At initialisation each interaction target takes the first four ops,
    # one of them max_pool_3x3.
    uniform = parameter_free_share(uniform_arrays(["decoder_pose_to_parsing"]))
    assert uniform == {"decoder_pose_to_parsing": 0.25}


def test_softmax_is_stable_for_large_values():
    np.testing.assert_allclose(derive.softmax([1000.0, 1000.0]), [0.5, 0.5])
