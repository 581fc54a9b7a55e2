"""`EncoderDecoderSupernet`: our encoder-decoder search stage.

The paper's first search stage (task-specific encoder and decoder cells), not
released by the authors (reference NPPNET.md 5.1, 10.1 item 2); the design is
documented in docs/model.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from nppnet_tf.models import parts
from nppnet_tf.models.network import TwoBranchNetwork
from nppnet_tf.search.primitives import PRIMITIVES_ENCODER_DECODER


@keras.saving.register_keras_serializable(package="nppnet")
class EncoderDecoderSupernet(TwoBranchNetwork):
    """Supernet of the task-specific encoder-decoder cell search.

    Each branch has its own searchable normal, reduction and decoding cell
    (DARTS cells: 4 nodes, 14 candidate edges, PC-DARTS partial-channel mixed
    ops with edge normalisation) over `PRIMITIVES_ENCODER_DECODER`. The six
    search spaces are named after the genotype fields they decide:
    `pose_encoder_normal`, `pose_encoder_reduce`, `parsing_encoder_normal`,
    `parsing_encoder_reduce`, `pose_decoder`, `parsing_decoder`. All cells of
    one kind share the kind's architecture parameters (DARTS).

    Stage features pass between the branches' parts unchanged (no
    interactions); stems, aggregation, projections and stage-1 heads are the
    final network's. There is no stage 2 (the fusion cells are searched
    later, with the interactions): the stage-2 output keys repeat the stage-1
    predictions, so the same losses apply.

    Args:
        init_channels: int. C.
        num_cells: int. Cells per encoder, a multiple of 4.
        num_classes: int. Parsing classes.
        num_joints: int. Pose heatmaps.
        partial_channels: int. PC-DARTS proportion K (4 as PC-DARTS); every
            cell's node width must be a multiple of it.
        primitives: sequence of str. Candidate ops.
        sync_batchnorm: bool. Synchronise BatchNorm statistics over replicas.

    Call arguments and returns: as `NPPNet`.
    """

    def __init__(
        self,
        init_channels: int = 32,
        num_cells: int = 16,
        num_classes: int = 20,
        num_joints: int = 16,
        partial_channels: int = 4,
        primitives: Sequence[str] = PRIMITIVES_ENCODER_DECODER,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        super().__init__(
            init_channels,
            num_cells,
            num_classes,
            num_joints,
            sync_batchnorm,
            **kwargs,
        )
        smallest = min(init_channels // 2, self.decoder_channels[-1] // 4)
        if partial_channels < 1 or smallest % partial_channels:
            raise ValueError(
                f"partial_channels must divide the smallest node width "
                f"({smallest} for init_channels={init_channels}), got "
                f"{partial_channels}."
            )
        self.partial_channels = partial_channels
        self.primitives = tuple(primitives)
        parts.add_encoders(self, None, self.primitives, partial_channels)
        parts.add_decoders(self, None, self.primitives, partial_channels)
        self.add_heads(stages=1)

    def get_config(self):
        return {
            **super().get_config(),
            "partial_channels": self.partial_channels,
            "primitives": list(self.primitives),
        }
