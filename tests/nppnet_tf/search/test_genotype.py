import json
import re
from pathlib import Path

import numpy as np
import pytest

from nppnet_tf.search.genotype import (
    ALL_FIELDS,
    CELL_FIELDS,
    FORMAT,
    SEARCHED_BY_INTERACTION,
    Edge,
    Genotype,
    GenotypeError,
    edges,
)

# The authors' final genotype as the reference tables state it (NPPNET.md
# 2.4-2.9): per node (first term, second term); per interaction target the
# kept (op, source) pairs in the order listed.
ENCODER_NORMAL = [
    ("std_conv_3x3", 0), ("se_connect", 1),  # node 2
    ("se_connect", 1), ("std_conv_3x3", 0),  # node 3
    ("max_pool_3x3", 1), ("std_conv_3x3", 2),  # node 4
    ("std_conv_3x3", 3), ("std_conv_3x3", 0),  # node 5
]  # fmt: skip
ENCODER_REDUCE = [
    ("std_conv_3x3", 0), ("se_connect", 1),
    ("se_connect", 1), ("std_conv_3x3", 2),
    ("dil_conv_3x3_4", 3), ("dil_conv_3x3_4", 2),
    ("max_pool_3x3", 3), ("dil_conv_3x3_2", 0),
]  # fmt: skip
POSE_DECODER = [
    ("std_conv_1x1", 1), ("std_conv_1x1", 0),
    ("std_conv_1x1", 1), ("std_conv_3x3", 0),
    ("std_conv_1x1", 0), ("dil_conv_3x3_2", 1),
    ("std_conv_3x3", 3), ("std_conv_1x1", 1),
]  # fmt: skip
PARSING_DECODER = [
    ("std_conv_3x3", 1), ("se_connect", 0),
    ("dil_conv_3x3_2", 2), ("std_conv_1x1", 1),
    ("poled_conv_x1", 3), ("std_conv_1x1", 2),
    ("std_conv_3x3", 1), ("std_conv_1x1", 2),
]  # fmt: skip
ENCODER_PARSING_TO_POSE = [  # task1, 2.5
    [("dil_conv_3x3_2", 0)],
    [("std_conv_3x3", 1)],
    [("std_conv_1x1", 1), ("std_conv_3x3", 2)],
    [("std_conv_1x1", 2), ("std_conv_3x3", 3)],
]
ENCODER_POSE_TO_PARSING = [  # task2, 2.5
    [("dil_conv_3x3_2", 0)],
    [("poled_conv_x1", 1)],
    [("std_conv_1x1", 2)],
    [("std_conv_3x3", 1), ("std_conv_3x3", 3)],
]
DECODER_PARSING_TO_POSE = [  # task3, 2.7: 0-3 encoder stages, 4-6 decoder
    [("dil_conv_3x3_2", 4), ("dil_conv_3x3_2", 2), ("dil_conv_3x3_2", 1)],
    [
        ("std_conv_3x3", 1), ("std_conv_3x3", 2),
        ("dil_conv_3x3_2", 5), ("dil_conv_3x3_2", 0),
    ],
    [
        ("std_conv_3x3", 1), ("dil_conv_3x3_2", 2),
        ("dil_conv_3x3_4", 5), ("dil_conv_3x3_2", 3),
    ],
]  # fmt: skip
DECODER_POSE_TO_PARSING = [  # task4, 2.7
    [("std_conv_3x3", 0)],
    [("std_conv_3x3", 1)],
    [("std_conv_1x1", 2), ("std_conv_3x3", 1)],
]
POSE_FUSION = [  # 2.9: 0 = A, 1 = P, 2 = S
    ("std_conv_3x3", 1), ("std_conv_3x3", 2),
    ("std_conv_3x3", 0), ("max_pool_3x3", 2),
    ("std_conv_3x3", 4), ("std_conv_3x3", 2),
    ("std_conv_3x3", 4), ("std_conv_3x3", 3),
]  # fmt: skip
PARSING_FUSION = [  # 2.9: 0 = E, 1 = P, 2 = S
    ("dil_conv_3x3_2", 2), ("se_connect", 1),
    ("dil_conv_3x3_2", 2), ("dil_conv_3x3_2", 3),
    ("max_pool_3x3", 3), ("std_conv_3x3", 2),
    ("dil_conv_3x3_2", 5), ("std_conv_3x3", 2),
]  # fmt: skip


def test_authors_genotype_matches_reference_tables(authors_genotype):
    g = authors_genotype
    assert g.is_complete
    # Both encoders use the same genotype (reference 2.4).
    assert g.pose_encoder_normal == edges(ENCODER_NORMAL)
    assert g.parsing_encoder_normal == edges(ENCODER_NORMAL)
    assert g.pose_encoder_reduce == edges(ENCODER_REDUCE)
    assert g.parsing_encoder_reduce == edges(ENCODER_REDUCE)
    assert g.pose_decoder == edges(POSE_DECODER)
    assert g.parsing_decoder == edges(PARSING_DECODER)
    assert g.encoder_parsing_to_pose == tuple(
        map(edges, ENCODER_PARSING_TO_POSE)
    )
    assert g.encoder_pose_to_parsing == tuple(
        map(edges, ENCODER_POSE_TO_PARSING)
    )
    assert g.decoder_parsing_to_pose == tuple(
        map(edges, DECODER_PARSING_TO_POSE)
    )
    assert g.decoder_pose_to_parsing == tuple(
        map(edges, DECODER_POSE_TO_PARSING)
    )
    assert g.pose_fusion == edges(POSE_FUSION)
    assert g.parsing_fusion == edges(PARSING_FUSION)


def test_json_round_trip(authors_genotype, tmp_path):
    text = authors_genotype.to_json()
    again = Genotype.from_json(text)
    assert again == authors_genotype
    assert again.to_json() == text
    path = authors_genotype.save(tmp_path / "sub" / "genotype.json")
    assert Genotype.load(path) == authors_genotype
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_canonical_json_is_the_committed_file(authors_genotype):
    path = (
        Path(__file__).resolve().parents[3]
        / "configs/genotypes/nppnet_lip.json"
    )
    assert authors_genotype.to_json() == path.read_text()


def test_fingerprint_is_stable_and_sensitive(authors_genotype):
    # Pinned: a change means the canonical JSON changed, which renames every
    # registry tag and cache entry derived from it.
    assert authors_genotype.fingerprint() == (
        "28fda0b77944ba576b5bb78aa683a8fbabef2a24ba870ac6926a1cbae6839fc1"
    )
    changed = authors_genotype.replace(
        pose_decoder=edges([("std_conv_3x3", 1)] + POSE_DECODER[1:])
    )
    assert changed.fingerprint() != authors_genotype.fingerprint()


def test_partial_genotype_round_trip(authors_genotype):
    partial = authors_genotype.cells_only()
    assert not partial.is_complete
    data = json.loads(partial.to_json())
    assert set(data) == set(CELL_FIELDS) | {"format"}
    assert Genotype.from_json(partial.to_json()) == partial
    with pytest.raises(GenotypeError, match="missing encoder_parsing_to_pose"):
        partial.require_complete()
    assert authors_genotype.require_complete() is authors_genotype


def test_lists_and_numpy_sources_are_normalised(authors_genotype):
    fields = {name: getattr(authors_genotype, name) for name in ALL_FIELDS}
    fields["pose_decoder"] = [
        Edge(op, np.int64(source)) for op, source in POSE_DECODER
    ]
    genotype = Genotype(**fields)
    assert genotype == authors_genotype
    assert type(genotype.pose_decoder[0].source) is int
    assert isinstance(genotype.pose_decoder, tuple)
    hash(genotype)


def _data(authors_genotype):
    return json.loads(authors_genotype.to_json())


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["pose_decoder"].__setitem__(0, ["conv_9x9", 1]),
            "pose_decoder[0]: unknown op 'conv_9x9'",
        ),
        (
            lambda d: d["pose_decoder"].__setitem__(0, ["none", 1]),
            "pose_decoder[0]: 'none' cannot be a chosen op",
        ),
        (
            lambda d: d["pose_encoder_normal"].__setitem__(
                2, ["se_connect", 3]
            ),
            "pose_encoder_normal[2]: source 3 out of range for node 3 "
            "(must be 0..2)",
        ),
        (
            lambda d: d["pose_fusion"].__setitem__(0, ["std_conv_3x3", -1]),
            "pose_fusion[0]: source -1 out of range for node 3",
        ),
        (
            lambda d: d["parsing_decoder"].pop(),
            "parsing_decoder: expected 8 edges (2 per node), got 7",
        ),
        (
            lambda d: d["pose_encoder_reduce"].__setitem__(
                1, ["se_connect", 0]
            ),
            "pose_encoder_reduce[1]: node 2 takes source 0 twice",
        ),
        (
            lambda d: d["encoder_pose_to_parsing"][3].append(
                ["std_conv_3x3", 3]
            ),
            "encoder_pose_to_parsing[3][2]: duplicate edge ['std_conv_3x3', 3]",
        ),
        (
            lambda d: d["encoder_parsing_to_pose"][1].append(
                ["std_conv_3x3", 2]
            ),
            "encoder_parsing_to_pose[1][1]: source 2 out of range "
            "(must be 0..1)",
        ),
        (
            lambda d: d["decoder_pose_to_parsing"][0].append(
                ["std_conv_3x3", 5]
            ),
            "decoder_pose_to_parsing[0][1]: source 5 out of range "
            "(must be 0..4)",
        ),
        (
            lambda d: d["decoder_parsing_to_pose"].pop(),
            "decoder_parsing_to_pose: expected 3 targets, got 2",
        ),
        (
            lambda d: d.__setitem__("pose_to_parsing", []),
            "unknown field 'pose_to_parsing'",
        ),
        (
            lambda d: d.pop("parsing_decoder"),
            "missing field 'parsing_decoder'",
        ),
        (
            lambda d: d.__setitem__("format", "nppnet-genotype/0"),
            "format 'nppnet-genotype/0' is not 'nppnet-genotype/1'",
        ),
        (
            lambda d: d["pose_decoder"].__setitem__(3, ["std_conv_3x3", "0"]),
            "pose_decoder[3]: expected [op_name, source_index]",
        ),
        (
            lambda d: d["pose_decoder"].__setitem__(3, ["std_conv_3x3", True]),
            "pose_decoder[3]: expected [op_name, source_index]",
        ),
        (
            lambda d: d.__setitem__("pose_fusion", "std_conv_3x3"),
            "pose_fusion: expected a list of edges",
        ),
    ],
)
def test_validation_errors_name_the_problem(authors_genotype, change, message):
    data = _data(authors_genotype)
    change(data)
    with pytest.raises(GenotypeError, match=re.escape(message)) as error:
        Genotype.from_dict(data, "genotype.json")
    assert str(error.value).startswith("genotype.json: ")


def test_interaction_allows_several_ops_on_one_source(authors_genotype):
    data = _data(authors_genotype)
    data["encoder_parsing_to_pose"][0] = [
        ["dil_conv_3x3_2", 0],
        ["std_conv_3x3", 0],
    ]
    genotype = Genotype.from_dict(data)
    assert len(genotype.encoder_parsing_to_pose[0]) == 2


def test_from_json_and_load_errors(tmp_path):
    with pytest.raises(GenotypeError, match="g.json: not JSON"):
        Genotype.from_json("{", "g.json")
    with pytest.raises(GenotypeError, match="expected a JSON object, got list"):
        Genotype.from_json("[]", "g.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        Genotype.load(tmp_path / "missing.json")


def test_edge_rejects_bad_types():
    with pytest.raises(GenotypeError, match="source must be an integer"):
        Edge("std_conv_3x3", 1.0)
    with pytest.raises(GenotypeError, match="op must be a string"):
        Edge(3, 1)


def test_constructor_rejects_pairs_that_are_not_edges(authors_genotype):
    with pytest.raises(
        GenotypeError, match=r"pose_decoder\[0\]: expected an Edge"
    ):
        authors_genotype.replace(pose_decoder=POSE_DECODER)


def test_field_constants():
    assert FORMAT == "nppnet-genotype/1"
    assert ALL_FIELDS == CELL_FIELDS + SEARCHED_BY_INTERACTION
    assert len(ALL_FIELDS) == 12
