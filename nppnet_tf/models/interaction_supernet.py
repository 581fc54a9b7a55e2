"""`InteractionSupernet`: the authors' released search supernet (2.11)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from nppnet_tf.models import parts
from nppnet_tf.models.network import TwoBranchNetwork
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.search.primitives import PRIMITIVES_INTER


@keras.saving.register_keras_serializable(package="nppnet")
class InteractionSupernet(TwoBranchNetwork):
    """Supernet of the interaction and fusion search (reference 2.11, 3).

    Fixed genotype encoder and decoder cells; every interaction edge (all
    candidate sources, both directions, encoder and decoder) and every fusion
    cell edge is a partial-channel `MixedOp` over `PRIMITIVES_INTER`. Search
    spaces (genotype field names): `encoder_parsing_to_pose`,
    `encoder_pose_to_parsing` (10 rows), `decoder_parsing_to_pose`,
    `decoder_pose_to_parsing` (18 rows), `pose_fusion`, `parsing_fusion`
    (18 rows, shared by the three rounds); 736 parameters in all.

    Args:
        genotype: `Genotype` (or its `to_dict()`); only its encoder and
            decoder cells are used, so the partial genotype of the
            encoder-decoder search is enough.
        init_channels: int. C (32 in the authors' search).
        num_cells: int. Cells per encoder, a multiple of 4.
        num_classes: int. Parsing classes.
        num_joints: int. Pose heatmaps.
        partial_channels: int. Proportion K of every mixed op (2 as the
            authors).
        primitives: sequence of str. Candidate ops (`PRIMITIVES_INTER`).
        sync_batchnorm: bool. Synchronise BatchNorm statistics over replicas.

    Call arguments and returns: as `NPPNet`.
    """

    def __init__(
        self,
        genotype: Genotype | Mapping[str, Any],
        init_channels: int = 32,
        num_cells: int = 16,
        num_classes: int = 20,
        num_joints: int = 16,
        partial_channels: int = 2,
        primitives: Sequence[str] = PRIMITIVES_INTER,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        if isinstance(genotype, Mapping):
            genotype = Genotype.from_dict(genotype, source="genotype")
        super().__init__(
            init_channels,
            num_cells,
            num_classes,
            num_joints,
            sync_batchnorm,
            **kwargs,
        )
        self.genotype = genotype.cells_only()
        self.partial_channels = partial_channels
        self.primitives = tuple(primitives)
        parts.add_encoders(self, self.genotype)
        parts.add_interactions(self, None, self.primitives, partial_channels)
        parts.add_decoders(self, self.genotype)
        self.add_heads(stages=2)
        parts.add_fusion(self, None, self.primitives, partial_channels)

    def get_config(self):
        return {
            **super().get_config(),
            "genotype": self.genotype.to_dict(),
            "partial_channels": self.partial_channels,
            "primitives": list(self.primitives),
        }
