import re

import pytest

from nppnet_tf.search.architecture_file import (
    ArchitectureFileError,
    uniform_arrays,
)
from nppnet_tf.search.draw import (
    cell_graph,
    describe_genotype,
    draw_genotype,
    interaction_graph,
    plot_architecture_weights,
    source_name,
    target_name,
)
from nppnet_tf.search.genotype import ALL_FIELDS, CELL_FIELDS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "field, source, name",
    [
        ("pose_encoder_normal", 0, "s0 (cell k-2)"),
        ("parsing_encoder_reduce", 1, "s1 (cell k-1)"),
        ("pose_encoder_normal", 3, "node 3"),
        ("pose_decoder", 0, "s0 (deep input)"),
        ("parsing_decoder", 1, "s1 (skip input)"),
        ("pose_fusion", 0, "A (pose aux)"),
        ("parsing_fusion", 0, "E (edge)"),
        ("parsing_fusion", 1, "P (pose)"),
        ("pose_fusion", 2, "S (parsing)"),
        ("pose_fusion", 5, "node 5"),
        ("encoder_parsing_to_pose", 2, "parsing stage 2"),
        ("encoder_pose_to_parsing", 0, "pose stage 0"),
        ("decoder_parsing_to_pose", 3, "parsing encoder stage 3"),
        ("decoder_parsing_to_pose", 4, "parsing decoder step 0"),
        ("decoder_pose_to_parsing", 6, "pose decoder step 2"),
    ],
)
def test_source_names_follow_the_index_conventions(field, source, name):
    assert source_name(field, source) == name


def test_target_names():
    assert target_name("encoder_parsing_to_pose", 3) == "pose stage 3"
    assert target_name("decoder_pose_to_parsing", 1) == "parsing decoder step 1"
    assert target_name("pose_fusion", 6) == "node 6"
    with pytest.raises(ValueError, match="unknown genotype field 'task1'"):
        target_name("task1", 0)


def test_describe_genotype(authors_genotype):
    text = describe_genotype(authors_genotype)
    lines = text.splitlines()
    for field in ALL_FIELDS:
        assert any(line.startswith(f"{field}: ") for line in lines)
    # reference 2.4: node 4 of the normal cell is max_pool_3x3(s1') + ...
    assert re.search(r"node 4 +max_pool_3x3 +1  s1 \(cell k-1\)", text)
    # reference 2.7: task4 step 2 has two edges, from pose enc2 and enc1
    assert re.search(
        r"parsing decoder step 2 +std_conv_1x1 +2  pose encoder stage 2\n"
        r" +std_conv_3x3 +1  pose encoder stage 1",
        text,
    )
    partial = describe_genotype(authors_genotype.cells_only())
    assert partial.count("(absent: not searched yet)") == 6


def test_cell_graph_has_one_labelled_edge_per_genotype_edge(authors_genotype):
    source = cell_graph(authors_genotype, "parsing_fusion").source
    labelled = re.findall(r"(s\d+) -> (s\d+) \[label=(\w+)\]", source)
    assert labelled == [
        ("s2", "s3", "dil_conv_3x3_2"),
        ("s1", "s3", "se_connect"),
        ("s2", "s4", "dil_conv_3x3_2"),
        ("s3", "s4", "dil_conv_3x3_2"),
        ("s3", "s5", "max_pool_3x3"),
        ("s2", "s5", "std_conv_3x3"),
        ("s5", "s6", "dil_conv_3x3_2"),
        ("s2", "s6", "std_conv_3x3"),
    ]
    assert '"E (edge)"' in source
    assert "parsing_fusion" in source  # the title


def test_interaction_graph_edges(authors_genotype):
    source = interaction_graph(
        authors_genotype, "decoder_pose_to_parsing"
    ).source
    labelled = re.findall(r"(source\d) -> (target\d) \[label=(\w+)", source)
    assert labelled == [
        ("source0", "target0", "std_conv_3x3"),
        ("source1", "target1", "std_conv_3x3"),
        ("source2", "target2", "std_conv_1x1"),
        ("source1", "target2", "std_conv_3x3"),
    ]
    # all seven candidate sources are drawn, unused ones too
    assert len(re.findall(r"\tsource\d \[label=", source)) == 7
    with pytest.raises(ValueError, match="not an interaction field"):
        interaction_graph(authors_genotype, "pose_fusion")
    with pytest.raises(ValueError, match="has no 'pose_fusion'"):
        cell_graph(authors_genotype.cells_only(), "pose_fusion")


def test_draw_genotype_writes_svg_and_png(authors_genotype, tmp_path):
    written = draw_genotype(authors_genotype.cells_only(), tmp_path / "cells")
    assert [p.name for p in written] == [
        f"{field}.{fmt}" for field in CELL_FIELDS for fmt in ("svg", "png")
    ]
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(PNG_MAGIC)
        else:
            assert b"<svg" in data
    svg = (tmp_path / "cells" / "parsing_decoder.svg").read_text()
    assert "poled_conv_x1" in svg and "s1 (skip input)" in svg


def test_plot_architecture_weights(tmp_path):
    arrays = uniform_arrays(["pose_fusion", "decoder_pose_to_parsing"])
    path = plot_architecture_weights(arrays, tmp_path / "plots" / "weights.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    svg = plot_architecture_weights(arrays, tmp_path / "weights.svg")
    text = svg.read_text()
    assert "pose_fusion" in text and "step 2 &lt;- 6" in text
    del arrays["pose_fusion/betas"]
    with pytest.raises(ArchitectureFileError, match="pose_fusion/betas"):
        plot_architecture_weights(arrays, tmp_path / "bad.png")
