"""`NPPNet`: the derived network built from a complete genotype."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from nppnet_tf.models import parts
from nppnet_tf.models.network import TwoBranchNetwork
from nppnet_tf.search.genotype import Genotype


@keras.saving.register_keras_serializable(package="nppnet")
class NPPNet(TwoBranchNetwork):
    """NPPNet for joint human parsing and pose estimation (reference 2).

    Genotype cells in both encoders and decoders, the genotype's interaction
    edges (summed without weights) and fusion cells, two supervised stages.
    With the authors' genotype, `init_channels=64`, `num_cells=16` it has
    76,968,332 trainable parameters (the authors' 76,981,324 minus the
    12,992 of the BatchNorms their stride-1 `se_connect` ops never apply;
    reference 9).

    Args:
        genotype: `Genotype` (or its `to_dict()`), complete.
        init_channels: int. C (64 in the paper's final network).
        num_cells: int. Cells per encoder (the configs' `layers`), a
            multiple of 4.
        num_classes: int. Parsing classes (20 for LIP).
        num_joints: int. Pose heatmaps (16 for LIP).
        sync_batchnorm: bool. Synchronise BatchNorm statistics over replicas.

    Call arguments:
        images: `(batch, height, width, 3)` normalised float images, height
            and width multiples of 32.
        training: bool. BatchNorm mode.

    Returns:
        Dict with `pose`, `pose_aux` (num_joints channels), `parsing`
        (num_classes logits), `edge` (2 logits) of stage 2 and the same keys
        suffixed `_stage1`, each `(batch, height / 4, width / 4, channels)`.

    Raises:
        GenotypeError: if the genotype lacks interactions or fusion cells.
    """

    def __init__(
        self,
        genotype: Genotype | Mapping[str, Any],
        init_channels: int = 64,
        num_cells: int = 16,
        num_classes: int = 20,
        num_joints: int = 16,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        if isinstance(genotype, Mapping):
            genotype = Genotype.from_dict(genotype, source="genotype")
        genotype.require_complete("NPPNet")
        super().__init__(
            init_channels,
            num_cells,
            num_classes,
            num_joints,
            sync_batchnorm,
            **kwargs,
        )
        self.genotype = genotype
        parts.add_encoders(self, genotype)
        parts.add_interactions(self, genotype)
        parts.add_decoders(self, genotype)
        self.add_heads(stages=2)
        parts.add_fusion(self, genotype)

    def get_config(self):
        return {**super().get_config(), "genotype": self.genotype.to_dict()}
