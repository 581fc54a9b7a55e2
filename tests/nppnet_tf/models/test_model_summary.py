"""Parameter and multiply-add counts (reference NPPNET.md 9)."""

import json

import pytest

from nppnet_tf.models.interaction_supernet import InteractionSupernet
from nppnet_tf.models.nppnet import NPPNet
from nppnet_tf.models.summary import part_of, summarize
from nppnet_tf.search.genotype import Genotype
from pipeline.cli import main

GENOTYPE = Genotype.load("configs/genotypes/nppnet_lip.json")

# Reference 9, authors' final network (C = 64, 384 x 384): parameters and
# G multiply-adds per part. Their stride-1 se_connect ops own a BatchNorm
# (2 x width parameters) that they never apply and we omit: 5,888 in each
# encoder (26 ops in 13 normal cells), 448 in the parsing decoder and 768 in
# the three parsing fusion cells, 12,992 in all.
REFERENCE_9 = {
    "stems": (447_104, 4.2),
    "pose_encoder": (16_624_576 - 5_888, 7.5),
    "parsing_encoder": (16_624_576 - 5_888, 7.5),
    "encoder_parsing_to_pose": (13_393_792, 4.7),
    "encoder_pose_to_parsing": (11_164_288, 3.4),
    "pose_decoder": (780_640, 0.62),
    "parsing_decoder": (953_232 - 448, 0.86),
    "decoder_parsing_to_pose": (6_514_048, 8.5),
    "decoder_pose_to_parsing": (1_821_952, 5.3),
    "projections": (1_840_384, 16.9),
    "pose_fusion": (3_645_696, 33.5),
    "parsing_fusion": (1_694_016 - 768, 15.1),
    "pose_head": (271_904, 2.5),
    "pose_aux_head": (889_632, 8.2),
    "parsing_head": (273_960, 2.5),
    "edge_head": (41_524, 0.4),
}


def test_part_names():
    assert part_of("pose_encoder_13") == "pose_encoder"
    assert part_of("parsing_stem") == "stems"
    assert part_of("edge_projection_1") == "projections"
    assert part_of("pose_fusion_architecture") == "architecture"
    assert part_of("decoder_parsing_to_pose_2_1") == "decoder_parsing_to_pose"


def test_summary_command_at_small_size(capsys):
    code = main(
        ["model", "summary", "--init-channels", "8", "--layers", "4"]
        + ["--image-size", "64", "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    parts = summary["parts"]
    assert list(parts)[0] == "stems" and list(parts)[-1] == "edge_head"
    assert (
        sum(p["parameters"] for p in parts.values())
        == summary["trainable_parameters"]
    )
    assert (
        sum(p["non_trainable"] for p in parts.values())
        == summary["non_trainable_parameters"]
    )
    assert (
        sum(p["multiply_adds"] for p in parts.values())
        == summary["multiply_adds"]
    )
    assert summary["architecture_parameters"] == 0
    # Two stems: 3x3 convs 3->8 at 32x32, 8->16 and 16->16 at 16x16.
    stem = 27 * 8 * 32**2 + 9 * 8 * 16 * 16**2 + 9 * 16 * 16 * 16**2
    assert parts["stems"]["multiply_adds"] == 2 * stem
    # Stride-1 se_connect BNs the authors keep: cell 0 of each encoder
    # (2 ops x 2 x 4), the parsing decoder (2 x (16 + 8 + 4)) and three
    # parsing fusion cells (3 x 2 x 16).
    assert summary["unused_se_batchnorm_parameters"] == 32 + 56 + 96


@pytest.mark.slow
def test_final_network_matches_reference_9():
    summary = summarize(NPPNet(GENOTYPE, init_channels=64, num_cells=16), 384)
    assert summary["trainable_parameters"] == 76_968_332
    assert summary["non_trainable_parameters"] == 118_104
    assert summary["unused_se_batchnorm_parameters"] == 12_992
    assert summary["trainable_parameters"] + 12_992 == 76_981_324  # authors'
    assert summary["authors_trainable_parameters"] == 76_981_324
    assert summary["multiply_adds"] / 1e9 == pytest.approx(121.7, abs=0.05)
    for part, (parameters, gmacs) in REFERENCE_9.items():
        assert summary["parts"][part]["parameters"] == parameters, part
        macs = summary["parts"][part]["multiply_adds"] / 1e9
        assert macs == pytest.approx(gmacs, abs=0.051), part


@pytest.mark.slow
def test_interaction_supernet_matches_reference_9():
    supernet = InteractionSupernet(GENOTYPE, init_channels=32, num_cells=16)
    summary = summarize(supernet, 384)
    assert summary["architecture_parameters"] == 736
    assert summary["network_parameters"] == 33_649_780
    # The authors' 33,674,068 counts the BatchNorm of every stride-1
    # se_connect: 6,112 in the fixed cells and 18,176 in the mixed ops.
    assert summary["unused_se_batchnorm_parameters"] == 24_288
    assert summary["network_parameters"] + 24_288 == 33_674_068
    assert summary["authors_network_parameters"] == 33_674_068
    assert summary["authors_trainable_parameters"] == 33_674_804
    assert summary["multiply_adds"] / 1e9 == pytest.approx(44.3, abs=0.1)
