"""A toy supernet for fast tests of the search steps and loop.

The real supernets trace graphs of more than 150,000 ops (minutes on two
CPU cores, whatever the width), too slow for the default test suite. The
toy has the same interface the search uses (`architecture` spaces with the
real names, row layouts and op lists, `architecture_variables()`,
`network_variables()`, `architecture_arrays()`, `assign_architecture()`,
the eight output maps at 1/4 resolution) with a graph of a few hundred ops.

Its forward pass is a pure function of a parameter dict (`forward`), so a
test can differentiate through a virtual weight step exactly:

    features = tanh(BN(conv3x3(avgpool4(images))))        (BN optional)
    mixed_s  = sum_k (sum_r W_s[r, k] c_r) * conv1x1_{s,k}(features)
    hidden   = tanh(features + sum_s mixed_s)
    outputs  = 1x1 conv heads on hidden (stage 2) and features (stage 1),
               parsing and edge upsampled (nearest) to the input size

with `W_s[r, k] = softmax(alphas_s[r])[k] * edge_weights_s[r]` and fixed
per-row constants `c_r`, so every alpha and beta gets its own gradient.
tanh, not ReLU: the function is smooth, so the finite differences of the
second-order step converge to the exact Hessian-vector product.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from nppnet_tf.layers.architecture import ArchitectureWeights
from nppnet_tf.search.primitives import (
    PRIMITIVES_ENCODER_DECODER,
    PRIMITIVES_INTER,
)

INTERACTION_SPACES = (
    ("encoder_parsing_to_pose", (1, 2, 3, 4), PRIMITIVES_INTER),
    ("encoder_pose_to_parsing", (1, 2, 3, 4), PRIMITIVES_INTER),
    ("decoder_parsing_to_pose", (5, 6, 7), PRIMITIVES_INTER),
    ("decoder_pose_to_parsing", (5, 6, 7), PRIMITIVES_INTER),
    ("pose_fusion", (3, 4, 5, 6), PRIMITIVES_INTER),
    ("parsing_fusion", (3, 4, 5, 6), PRIMITIVES_INTER),
)
ENCODER_DECODER_SPACES = tuple(
    (name, (2, 3, 4, 5), PRIMITIVES_ENCODER_DECODER)
    for name in (
        "pose_encoder_normal",
        "pose_encoder_reduce",
        "parsing_encoder_normal",
        "parsing_encoder_reduce",
        "pose_decoder",
        "parsing_decoder",
    )
)
HEADS = (("pose", 16), ("pose_aux", 16), ("parsing", 20), ("edge", 2))
FULL_RESOLUTION = ("parsing", "edge")


class ToySupernet(keras.Model):
    """See the module docstring.

    Args:
        spaces: `(name, node_sizes, primitives)` of every search space.
        channels: feature width.
        batchnorm: a BatchNorm after the stem (off for exact differentiation
            through a virtual step).
        sync_batchnorm: synchronise it across replicas.
    """

    def __init__(
        self,
        spaces=INTERACTION_SPACES,
        channels: int = 4,
        batchnorm: bool = True,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = channels
        self.sync_batchnorm = sync_batchnorm and batchnorm
        self.architecture = {}
        for name, sizes, primitives in spaces:
            self.architecture[name] = ArchitectureWeights(
                sizes, primitives, name=f"{name}_architecture"
            )
        self.norm = (
            keras.layers.BatchNormalization(
                momentum=0.9, epsilon=1e-5, synchronized=sync_batchnorm
            )
            if batchnorm
            else None
        )

    def build(self, input_shape):
        init = keras.initializers.VarianceScaling(
            1.0, "fan_avg", "untruncated_normal", seed=0
        )
        channels = self.channels
        self.parameter = {
            "stem": self.add_weight(
                shape=(3, 3, 3, channels), initializer=init, name="stem"
            )
        }
        for index, (name, space) in enumerate(self.architecture.items()):
            self.parameter[f"mix_{name}"] = self.add_weight(
                shape=(len(space.primitives), 1, 1, channels, channels),
                initializer=keras.initializers.VarianceScaling(
                    1.0, "fan_avg", "untruncated_normal", seed=index + 1
                ),
                name=f"mix_{name}",
            )
        for stage in (1, 2):
            for head, width in HEADS:
                self.parameter[f"{head}_{stage}"] = self.add_weight(
                    shape=(1, 1, channels, width),
                    initializer=keras.initializers.VarianceScaling(
                        1.0, "fan_avg", "untruncated_normal", seed=10 * stage
                    ),
                    name=f"{head}_{stage}",
                )
        if self.norm is not None:
            self.norm.build((None, None, None, channels))
        self.built = True

    def parameters(self) -> dict:
        """Name -> variable of every weight the forward pass reads."""
        values = dict(self.parameter)
        for name, space in self.architecture.items():
            values[f"{name}/alphas"] = space.alphas
            values[f"{name}/betas"] = space.betas
        return values

    def forward(self, values, images, training=False):
        """The forward pass as a function of `values` (`parameters()` keys
        -> tensors)."""
        pooled = tf.nn.avg_pool2d(images, 4, 4, "VALID")
        features = tf.nn.conv2d(pooled, values["stem"], 1, "SAME")
        if self.norm is not None:
            features = self.norm(features, training=training)
        features = tf.tanh(features)
        hidden = features
        for name, space in self.architecture.items():
            alphas = values[f"{name}/alphas"]
            betas = values[f"{name}/betas"]
            op_weights = tf.nn.softmax(alphas, axis=-1)
            edge_weights = _edge_weights(betas, space.node_sizes)
            rows = op_weights.shape[0]
            row_constants = tf.constant(
                np.linspace(1.0, 2.0, rows), tf.float32
            )[:, None]
            per_op = tf.reduce_sum(
                op_weights * edge_weights[:, None] * row_constants, axis=0
            )
            kernels = values[f"mix_{name}"]
            for k in range(len(space.primitives)):
                hidden = hidden + per_op[k] * tf.nn.conv2d(
                    features, kernels[k], 1, "SAME"
                )
        hidden = tf.tanh(hidden)
        outputs = {}
        for stage, source in ((1, features), (2, hidden)):
            suffix = "_stage1" if stage == 1 else ""
            for head, _ in HEADS:
                output = tf.nn.conv2d(
                    source, values[f"{head}_{stage}"], 1, "SAME"
                )
                if head in FULL_RESOLUTION:
                    # Nearest upsampling to the label size: the loss then
                    # skips its bilinear resize, whose gradient has no
                    # gradient (the second-order test differentiates twice).
                    output = tf.repeat(tf.repeat(output, 4, axis=1), 4, axis=2)
                outputs[f"{head}{suffix}"] = output
        return outputs

    def call(self, images, training=None):
        values = {
            k: tf.convert_to_tensor(v) for k, v in self.parameters().items()
        }
        return self.forward(values, images, training=training)

    def architecture_variables(self) -> list:
        return [
            variable
            for space in self.architecture.values()
            for variable in (space.alphas, space.betas)
        ]

    def network_variables(self) -> list:
        architecture = {id(v) for v in self.architecture_variables()}
        return [
            v for v in self.trainable_variables if id(v) not in architecture
        ]

    def architecture_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for name, space in self.architecture.items():
            arrays[f"{name}/alphas"] = np.asarray(space.alphas.numpy())
            arrays[f"{name}/betas"] = np.asarray(space.betas.numpy())
            arrays[f"{name}/ops"] = np.array(space.primitives)
        return arrays

    def assign_architecture(self, arrays) -> None:
        for name, space in self.architecture.items():
            space.alphas.assign(np.asarray(arrays[f"{name}/alphas"], "float32"))
            space.betas.assign(np.asarray(arrays[f"{name}/betas"], "float32"))


def _edge_weights(betas, node_sizes):
    parts, start = [], 0
    for size in node_sizes:
        node = betas[start : start + size]
        parts.append(tf.ones_like(node) if size == 1 else tf.nn.softmax(node))
        start += size
    return tf.concat(parts, axis=0)


def build_toy(
    stage: str = "interaction",
    channels: int = 4,
    batchnorm: bool = True,
    sync_batchnorm: bool = False,
    image_size: int = 64,
) -> ToySupernet:
    """A built toy supernet for `stage` (call inside the strategy scope)."""
    spaces = (
        INTERACTION_SPACES if stage == "interaction" else ENCODER_DECODER_SPACES
    )
    model = ToySupernet(spaces, channels, batchnorm, sync_batchnorm)
    model.build((None, image_size, image_size, 3))
    return model


def search_toy(stage, config, base_genotype=None) -> ToySupernet:
    """The `search.supernet` builder of the CLI tests:
    `--set search.supernet=tests.nppnet_tf.search.toy_supernet:search_toy`."""
    return build_toy(
        stage,
        sync_batchnorm=config.distribute.sync_batchnorm,
        image_size=config.data.image_size,
    )
