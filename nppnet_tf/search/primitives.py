"""Names of the candidate operations and the op lists of each search space.

Plain data (no Keras): the genotype code validates names against these lists
and `nppnet_tf.layers.operations.OPS` builds a layer for every name in
`ALL_OPS`. The order of a list is the column order of its `alphas` matrix
(reference NPPNET.md 1.4), so reordering a list is a format change.
"""

from __future__ import annotations

# Every op the project can build (reference 1.1 and the DARTS ops).
ALL_OPS: tuple[str, ...] = (
    "none",
    "avg_pool_3x3",
    "max_pool_3x3",
    "skip_connect",
    "std_conv_3x3",
    "std_conv_1x1",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3_2",
    "dil_conv_3x3_4",
    "dil_conv_5x5_4",
    "se_connect",
    "conv_7x1_1x7",
    "poled_conv_x1",
    "poled_conv_x2",
)

# The authors' list for the (unreleased) encoder search (reference 1.4).
PRIMITIVES_PC: tuple[str, ...] = (
    "std_conv_3x3",
    "se_connect",
    "dil_conv_3x3_4",
    "dil_conv_3x3_2",
    "std_conv_1x1",
    "max_pool_3x3",
    "skip_connect",
)

# Every mixed op of the released supernet: the four interaction spaces and
# the two fusion cells (reference 1.4). Column order of their alphas.
PRIMITIVES_INTER: tuple[str, ...] = (
    "std_conv_3x3",
    "dil_conv_3x3_4",
    "se_connect",
    "max_pool_3x3",
    "dil_conv_3x3_2",
    "std_conv_1x1",
    "poled_conv_x1",
)

# Our encoder-decoder search space (the stage the authors did not release):
# DARTS' `none` first (excluded when a genotype is derived), PRIMITIVES_PC,
# then the decoder-only op that the authors' parsing decoder uses. It covers
# every op of the authors' encoder and decoder genotypes.
PRIMITIVES_ENCODER_DECODER: tuple[str, ...] = (
    ("none",) + PRIMITIVES_PC + ("poled_conv_x1",)
)

# Ops without learnable weights, for the "share of parameter-free ops" monitor.
PARAMETER_FREE_OPS: frozenset[str] = frozenset(
    {"none", "avg_pool_3x3", "max_pool_3x3", "skip_connect"}
)
