"""Cells, interactions and fusion cells of a `TwoBranchNetwork`.

Each function adds one kind of part to both branches of a network, derived
from a genotype or, without one, searchable (mixed ops over `primitives`,
with their search spaces registered on the network under the genotype field
names). Reference NPPNET.md 2.3-2.9 and 2.11.
"""

from __future__ import annotations

from collections.abc import Sequence

from nppnet_tf.layers.cells import DerivedCell, DerivedDecoderCell
from nppnet_tf.layers.fusion import DerivedFusionCell, SearchFusionCell
from nppnet_tf.layers.interaction import DerivedInteraction, SearchInteraction
from nppnet_tf.layers.search_cells import (
    SearchCell,
    SearchDecoderCell,
    cell_node_sizes,
)
from nppnet_tf.models.network import (
    BRANCHES,
    FUSION_ROUNDS,
    NUM_DECODER_STEPS,
    NUM_STAGES,
    TwoBranchNetwork,
)
from nppnet_tf.search.genotype import Genotype


def add_encoders(
    network: TwoBranchNetwork,
    genotype: Genotype | None = None,
    primitives: Sequence[str] = (),
    partial_channels: int = 1,
) -> None:
    """`num_cells` encoder cells per branch (reference 2.3, 2.4).

    Derived: the branch's genotype normal/reduction cell. Searchable: one
    `SearchCell` per position; all normal (reduction) cells of a branch share
    the space `<branch>_encoder_normal` (`_reduce`).
    """
    sync = network.sync_batchnorm
    for branch in BRANCHES:
        if genotype is None:
            for kind in ("normal", "reduce"):
                network.add_space(
                    f"{branch}_encoder_{kind}", cell_node_sizes(2), primitives
                )
        cells = getattr(network, f"{branch}_encoder")
        plan = network.encoder_plan()
        for index, (filters, reduction, reduction_prev) in enumerate(plan):
            kind = "reduce" if reduction else "normal"
            name = f"{branch}_encoder_{index}"
            if genotype is None:
                cell = SearchCell(
                    filters,
                    primitives,
                    reduction,
                    reduction_prev,
                    partial_channels,
                    sync,
                    name=name,
                )
                network.encoder_spaces[branch].append(
                    f"{branch}_encoder_{kind}"
                )
            else:
                edges = getattr(genotype, f"{branch}_encoder_{kind}")
                cell = DerivedCell(
                    edges, filters, reduction, reduction_prev, sync, name=name
                )
                network.encoder_spaces[branch].append(None)
            cells.append(cell)


def add_decoders(
    network: TwoBranchNetwork,
    genotype: Genotype | None = None,
    primitives: Sequence[str] = (),
    partial_channels: int = 1,
) -> None:
    """Three decoder cells per branch, node width skip channels / 4 (2.6).

    The three steps of a branch share one genotype cell (or one search space,
    `<branch>_decoder`), with separate weights.
    """
    sync = network.sync_batchnorm
    for branch in BRANCHES:
        space = f"{branch}_decoder"
        if genotype is None:
            network.add_space(space, cell_node_sizes(2), primitives)
            network.decoder_spaces[branch] = space
        cells = getattr(network, f"{branch}_decoder")
        for step, width in enumerate(network.decoder_channels):
            name = f"{branch}_decoder_{step}"
            if genotype is None:
                cell = SearchDecoderCell(
                    width // 4, primitives, partial_channels, sync, name=name
                )
            else:
                edges = getattr(genotype, space)
                cell = DerivedDecoderCell(edges, width // 4, sync, name=name)
            cells.append(cell)


def add_interactions(
    network: TwoBranchNetwork,
    genotype: Genotype | None = None,
    primitives: Sequence[str] = (),
    partial_channels: int = 2,
) -> None:
    """Encoder (4 stages) and decoder (3 steps) interactions, both ways
    (reference 2.5, 2.7; searchable: 2.11, rows of 3.1)."""
    for level, count in (
        ("encoder", NUM_STAGES),
        ("decoder", NUM_DECODER_STEPS),
    ):
        for direction in ("parsing_to_pose", "pose_to_parsing"):
            field = f"{level}_{direction}"
            if genotype is None:
                sizes = [
                    len(network.interaction_sources(level, t)[0])
                    for t in range(count)
                ]
                network.add_space(field, sizes, primitives)
                network.interaction_spaces[field] = field
            layers = getattr(network, field)
            for target in range(count):
                channels, scales = network.interaction_sources(level, target)
                name = f"{field}_{target}"
                if genotype is None:
                    layer = SearchInteraction(
                        channels,
                        scales,
                        primitives,
                        partial_channels,
                        network.sync_batchnorm,
                        name=name,
                    )
                else:
                    layer = DerivedInteraction(
                        getattr(genotype, field)[target],
                        channels,
                        scales,
                        network.sync_batchnorm,
                        name=name,
                    )
                layers.append(layer)


def add_fusion(
    network: TwoBranchNetwork,
    genotype: Genotype | None = None,
    primitives: Sequence[str] = (),
    partial_channels: int = 2,
) -> None:
    """Three rounds of pose and parsing fusion cells (reference 2.9); the
    searchable rounds of a task share one space (2.11)."""
    width = network.stage_channels[0]
    for task in ("pose", "parsing"):
        field = f"{task}_fusion"
        if genotype is None:
            network.add_space(field, cell_node_sizes(3), primitives)
            network.fusion_spaces[field] = field
        for round_index in range(FUSION_ROUNDS):
            name = f"{field}_{round_index}"
            if genotype is None:
                cell = SearchFusionCell(
                    width,
                    primitives,
                    partial_channels,
                    network.sync_batchnorm,
                    name=name,
                )
            else:
                cell = DerivedFusionCell(
                    getattr(genotype, field),
                    width,
                    network.sync_batchnorm,
                    name=name,
                )
            getattr(network, field).append(cell)
