"""The two-branch macro architecture shared by NPPNet and its supernets.

Reference NPPNET.md 2.1-2.10: two stems, two encoders of `num_cells` cells
in 4 stages, interactions at the end of every encoder stage and after every
decoder step (both directions, simultaneous), 3 decoder cells per branch,
the 1/4-resolution aggregation, four projections, stage-1 heads and three
rounds of fusion cells followed by the stage-2 heads.

`TwoBranchNetwork` owns the forward pass and the parts every variant shares
(stems, projections, heads); a subclass adds cells, interactions and fusion
cells with the functions of `parts.py`, in derived (genotype) or searchable
form, which register their search spaces with `add_space`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
from keras import ops

from nppnet_tf.layers.architecture import (
    ArchitectureWeights,
    architecture_arrays,
    assign_architecture,
)
from nppnet_tf.layers.blocks import channels_shape, creation_scope
from nppnet_tf.layers.heads import Head, Projection, Stem
from nppnet_tf.layers.mixed_op import weight_rows
from nppnet_tf.layers.resize import resize_bilinear

NUM_STAGES = 4
NUM_DECODER_STEPS = 3
FUSION_ROUNDS = 3  # REFINE_LAYERS = 1 stage of three rounds (reference 2.9)
# Resolution of every interaction source relative to the 1/4 feature:
# encoder stages 0..3, then decoder steps 0..2 (reference 2.7).
SOURCE_SCALES = (1.0, 0.5, 0.25, 0.125, 0.25, 0.5, 1.0)
BRANCHES = ("pose", "parsing")
OUTPUT_KEYS = (
    "pose",
    "pose_aux",
    "parsing",
    "edge",
    "pose_stage1",
    "pose_aux_stage1",
    "parsing_stage1",
    "edge_stage1",
)


class TwoBranchNetwork(keras.Model):
    """Forward pass and shared parts of NPPNet and its supernets.

    Args:
        init_channels: int. C: stem width is 2C, stage widths are 2C, 4C, 8C,
            16C (reference 2.3). Even.
        num_cells: int. Cells per encoder (the configs' `layers`), a multiple
            of 4; reduction cells start stages 1-3.
        num_classes: int. Parsing classes.
        num_joints: int. Pose heatmaps.
        sync_batchnorm: bool. Synchronise every BatchNorm over replicas.

    Call arguments:
        images: `(batch, height, width, 3)` normalised images, height and
            width multiples of 32.
        training: bool. BatchNorm mode.

    Returns:
        Dict of `OUTPUT_KEYS` -> `(batch, height / 4, width / 4, channels)`:
        `pose`, `pose_aux` (num_joints), `parsing` (num_classes logits),
        `edge` (2 logits) from stage 2 and the same four with `_stage1`.
    """

    def __init__(
        self,
        init_channels: int,
        num_cells: int,
        num_classes: int = 20,
        num_joints: int = 16,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if init_channels < 2 or init_channels % 2:
            raise ValueError(
                f"init_channels must be a positive even int, got {init_channels}."
            )
        if num_cells < NUM_STAGES or num_cells % NUM_STAGES:
            raise ValueError(
                f"num_cells (layers) must be a positive multiple of 4, got "
                f"{num_cells}."
            )
        for name, value in (
            ("num_classes", num_classes),
            ("num_joints", num_joints),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        self.init_channels = init_channels
        self.num_cells = num_cells
        self.num_classes = num_classes
        self.num_joints = num_joints
        self.sync_batchnorm = sync_batchnorm
        # Widths of encoder stages 0..3 and of decoder steps 0..2.
        self.stage_channels = tuple(2 * init_channels * 2**s for s in range(4))
        self.decoder_channels = tuple(
            self.stage_channels[2 - k] for k in range(3)
        )
        self.architecture = {}
        self.encoder_spaces = {branch: [] for branch in BRANCHES}
        self.decoder_spaces = {branch: None for branch in BRANCHES}
        self.interaction_spaces = {}
        self.fusion_spaces = {}
        self.pose_encoder, self.parsing_encoder = [], []
        self.pose_decoder, self.parsing_decoder = [], []
        self.encoder_parsing_to_pose, self.encoder_pose_to_parsing = [], []
        self.decoder_parsing_to_pose, self.decoder_pose_to_parsing = [], []
        self.pose_fusion, self.parsing_fusion = [], []

        sync = dict(synchronized=sync_batchnorm)
        self.pose_stem = Stem(init_channels, name="pose_stem", **sync)
        self.parsing_stem = Stem(init_channels, name="parsing_stem", **sync)
        width = self.stage_channels[0]  # c4, the 1/4 feature width
        self.pose_projection = Projection(
            4 * width, name="pose_projection", **sync
        )
        self.pose_aux_projection = Projection(
            3 * width, name="pose_aux_projection", **sync
        )
        self.parsing_projection = Projection(
            4 * width, name="parsing_projection", **sync
        )
        self.edge_projection = Projection(
            3 * width, name="edge_projection", **sync
        )
        self.pose_head, self.pose_aux_head = [], []
        self.parsing_head, self.edge_head = [], []

    # ----------------------------------------------------------------- parts

    def add_heads(self, stages: int) -> None:
        """One head set per supervised stage (reference 2.8)."""
        sync = dict(synchronized=self.sync_batchnorm)
        for stage in range(1, stages + 1):
            self.pose_head.append(
                Head(256, self.num_joints, 1, name=f"pose_head_{stage}", **sync)
            )
            self.pose_aux_head.append(
                Head(
                    128,
                    self.num_joints,
                    3,
                    name=f"pose_aux_head_{stage}",
                    **sync,
                )
            )
            self.parsing_head.append(
                Head(
                    256,
                    self.num_classes,
                    1,
                    name=f"parsing_head_{stage}",
                    **sync,
                )
            )
            self.edge_head.append(
                Head(6, 2, 3, False, name=f"edge_head_{stage}", **sync)
            )

    def add_space(
        self, name: str, node_sizes: Sequence[int], primitives: Sequence[str]
    ) -> ArchitectureWeights:
        """Registers the alphas and betas of search space `name`."""
        space = ArchitectureWeights(
            node_sizes, primitives, name=f"{name}_architecture"
        )
        self.architecture[name] = space
        return space

    def encoder_plan(self) -> list[tuple[int, bool, bool]]:
        """`(node width, reduction, reduction_prev)` of every encoder cell."""
        plan, filters, reduction_prev = [], self.init_channels // 2, False
        per_stage = self.num_cells // NUM_STAGES
        for index in range(self.num_cells):
            reduction = index > 0 and index % per_stage == 0
            filters *= 2 if reduction else 1
            plan.append((filters, reduction, reduction_prev))
            reduction_prev = reduction
        return plan

    def interaction_sources(self, level: str, target: int):
        """Channels and scales of the candidate sources of one target.

        Encoder stage `target`: the other branch's stages 0..target; decoder
        step `target`: its stages 0..3 and decoder steps 0..target.
        """
        if level == "encoder":
            count = target + 1
            channels = self.stage_channels[:count]
        else:
            count = NUM_STAGES + target + 1
            channels = self.stage_channels + self.decoder_channels[: target + 1]
        return channels, SOURCE_SCALES[:count]

    # ----------------------------------------------------------------- build

    def build(self, input_shape):
        # Every part is built from the channel counts (no symbolic trace):
        # Keras 3 restores weights only into state that build() created.
        with creation_scope():
            if len(input_shape) != 4 or input_shape[-1] != 3:
                raise ValueError(
                    f"images must be (batch, height, width, 3), got {input_shape}."
                )
            self.pose_stem.build(input_shape)
            self.parsing_stem.build(input_shape)
            for cells in (self.pose_encoder, self.parsing_encoder):
                previous = current = channels_shape(self.stage_channels[0])
                for cell, (filters, _, _) in zip(cells, self.encoder_plan()):
                    cell.build(previous, current)
                    previous, current = current, channels_shape(4 * filters)
            for level in ("encoder", "decoder"):
                for direction in ("parsing_to_pose", "pose_to_parsing"):
                    layers = getattr(self, f"{level}_{direction}")
                    for target, layer in enumerate(layers):
                        channels, _ = self.interaction_sources(level, target)
                        layer.build(
                            [channels_shape(c) for c in channels],
                            channels_shape(channels[-1]),
                        )
            for cells in (self.pose_decoder, self.parsing_decoder):
                deep = self.stage_channels[-1]
                for step, cell in enumerate(cells):
                    skip = self.stage_channels[NUM_STAGES - 2 - step]
                    cell.build(channels_shape(deep), channels_shape(skip))
                    deep = self.decoder_channels[step]
            width = self.stage_channels[0]
            aggregated = channels_shape(width + sum(self.decoder_channels))
            for projection in (
                self.pose_projection,
                self.pose_aux_projection,
                self.parsing_projection,
                self.edge_projection,
            ):
                projection.build(aggregated)
            main, aux = channels_shape(4 * width), channels_shape(3 * width)
            for heads, shape in (
                (self.pose_head, main),
                (self.pose_aux_head, aux),
                (self.parsing_head, main),
                (self.edge_head, aux),
            ):
                for head in heads:
                    head.build(shape)
            for cell in (*self.pose_fusion, *self.parsing_fusion):
                cell.build(aux, main, main)

    # --------------------------------------------------------------- forward

    def call(self, images, training=None):
        # Each space's weight rows, unstacked once for all its edges.
        weights = {
            name: (
                weight_rows(space.op_weights(), space.rows),
                weight_rows(space.edge_weights(), space.rows),
            )
            for name, space in self.architecture.items()
        }

        def run(layer, space, *inputs, rows=None):
            if space is None:
                return layer(*inputs, training=training)
            op_weights, edge_weights = weights[space]
            if rows is not None:
                op_weights = op_weights[rows[0] : rows[1]]
                edge_weights = edge_weights[rows[0] : rows[1]]
            return layer(*inputs, op_weights, edge_weights, training=training)

        def interact(field, target_index, sources, target):
            space = self.interaction_spaces.get(field)
            rows = None
            if space is not None:
                rows = self.architecture[space].node_slices()[target_index]
            layer = getattr(self, field)[target_index]
            return run(layer, space, sources, target, rows=rows)

        pose_prev, pose = self.pose_stem(images, training=training)
        parsing_prev, parsing = self.parsing_stem(images, training=training)
        pose_stages, parsing_stages = [], []
        per_stage = self.num_cells // NUM_STAGES
        for index in range(self.num_cells):
            pose_prev, pose = (
                pose,
                run(
                    self.pose_encoder[index],
                    self.encoder_spaces["pose"][index],
                    pose_prev,
                    pose,
                ),
            )
            parsing_prev, parsing = (
                parsing,
                run(
                    self.parsing_encoder[index],
                    self.encoder_spaces["parsing"][index],
                    parsing_prev,
                    parsing,
                ),
            )
            if (index + 1) % per_stage:
                continue
            stage = index // per_stage
            if self.encoder_parsing_to_pose:
                # Simultaneous update: both read the other's old feature.
                pose, parsing = (
                    interact(
                        "encoder_parsing_to_pose",
                        stage,
                        parsing_stages + [parsing],
                        pose,
                    ),
                    interact(
                        "encoder_pose_to_parsing",
                        stage,
                        pose_stages + [pose],
                        parsing,
                    ),
                )
            pose_stages.append(pose)
            parsing_stages.append(parsing)

        pose_decoded, parsing_decoded = [], []
        pose, parsing = pose_stages[-1], parsing_stages[-1]
        for step in range(NUM_DECODER_STEPS):
            skip = NUM_STAGES - 2 - step
            pose = run(
                self.pose_decoder[step],
                self.decoder_spaces["pose"],
                pose,
                pose_stages[skip],
            )
            parsing = run(
                self.parsing_decoder[step],
                self.decoder_spaces["parsing"],
                parsing,
                parsing_stages[skip],
            )
            if self.decoder_parsing_to_pose:
                pose, parsing = (
                    interact(
                        "decoder_parsing_to_pose",
                        step,
                        parsing_stages + parsing_decoded + [parsing],
                        pose,
                    ),
                    interact(
                        "decoder_pose_to_parsing",
                        step,
                        pose_stages + pose_decoded + [pose],
                        parsing,
                    ),
                )
            pose_decoded.append(pose)
            parsing_decoded.append(parsing)

        pose_features = _aggregate(pose_stages, pose_decoded)
        parsing_features = _aggregate(parsing_stages, parsing_decoded)
        pose_main = self.pose_projection(pose_features, training=training)
        pose_aux = self.pose_aux_projection(pose_features, training=training)
        parsing_main = self.parsing_projection(
            parsing_features, training=training
        )
        edge = self.edge_projection(parsing_features, training=training)
        features = (pose_main, pose_aux, parsing_main, edge)
        stage1 = self._predict(0, features, training)
        outputs = {f"{key}_stage1": value for key, value in stage1.items()}
        if not self.pose_fusion:
            # No stage 2 (encoder-decoder search): the stage-2 keys repeat
            # the stage-1 predictions so the same losses apply.
            outputs.update(stage1)
            return outputs
        for round_index in range(FUSION_ROUNDS):
            # Both cells read the old P and S (reference 2.9).
            pose_aux, new_pose = run(
                self.pose_fusion[round_index],
                self.fusion_spaces.get("pose_fusion"),
                pose_aux,
                pose_main,
                parsing_main,
            )
            edge, parsing_main = run(
                self.parsing_fusion[round_index],
                self.fusion_spaces.get("parsing_fusion"),
                edge,
                pose_main,
                parsing_main,
            )
            pose_main = new_pose
        features = (pose_main, pose_aux, parsing_main, edge)
        outputs.update(self._predict(1, features, training))
        return outputs

    def _predict(self, head_set: int, features, training) -> dict:
        pose_main, pose_aux, parsing_main, edge = features
        return {
            "pose": self.pose_head[head_set](pose_main, training=training),
            "pose_aux": self.pose_aux_head[head_set](
                pose_aux, training=training
            ),
            "parsing": self.parsing_head[head_set](
                parsing_main, training=training
            ),
            "edge": self.edge_head[head_set](edge, training=training),
        }

    # --------------------------------------------------- architecture params

    def architecture_variables(self) -> list:
        """alphas and betas of every search space (empty when derived)."""
        return [
            variable
            for space in self.architecture.values()
            for variable in (space.alphas, space.betas)
        ]

    def network_variables(self) -> list:
        """Trainable variables that are not architecture parameters."""
        architecture = {id(v) for v in self.architecture_variables()}
        return [
            v for v in self.trainable_variables if id(v) not in architecture
        ]

    def architecture_arrays(self) -> dict[str, np.ndarray]:
        """`{"<space>/alphas", "<space>/betas", "<space>/ops"}` as numpy."""
        return architecture_arrays(self.architecture)

    def assign_architecture(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Assigns alphas and betas from `architecture_arrays()`-style data.

        Raises:
            ValueError: on a missing key, a shape mismatch or different ops.
        """
        assign_architecture(self.architecture, arrays)

    def get_config(self):
        return {
            **super().get_config(),
            "init_channels": self.init_channels,
            "num_cells": self.num_cells,
            "num_classes": self.num_classes,
            "num_joints": self.num_joints,
            "sync_batchnorm": self.sync_batchnorm,
        }


def _aggregate(stages, decoded):
    """`concat(enc0, dec2, up2(dec1), up4(dec0))` at 1/4 (reference 2.8)."""
    size = ops.shape(stages[0])[1:3]
    return ops.concatenate(
        [
            stages[0],
            decoded[2],
            resize_bilinear(decoded[1], size),
            resize_bilinear(decoded[0], size),
        ],
        axis=-1,
    )
